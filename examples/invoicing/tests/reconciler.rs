//! The invoice reconciler in-process: repeated, concurrent and resumed runs
//! leave exactly one invoice per order.

use std::sync::Arc;
use std::time::Duration;

use converge::handlers::{
    run_key, Context, Outcome, RateLimits, ReconcileError, Reconciler, RunResult, Trigger,
};
use converge::Outbox;
use converge_tests::TestEnv;
use invoicing::domain::{create_orders, ship_order};
use invoicing::faults::{Faults, WithFaults};
use invoicing::reconciler::{InvoiceReconciler, RECONCILER_NAME};
use invoicing::schema::migrate;

async fn shipped_orders(env: &TestEnv, n: u64) -> Vec<i64> {
    migrate(&env.pool).await.expect("migrate");
    let ids = create_orders(&env.pool, n).await.expect("create orders");
    let outbox = Outbox::default();
    for id in &ids {
        assert!(ship_order(&env.pool, &outbox, *id, false).await.unwrap());
    }
    ids
}

fn context(env: &TestEnv, who: &str) -> Context {
    Context::new(
        env.pool.clone(),
        Trigger::Manual {
            reason: Some("test".into()),
        },
        1,
        RateLimits::default(),
        format!("{who}/{RECONCILER_NAME}"),
    )
}

async fn invoices_of(env: &TestEnv, order: i64) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM invoicing.invoices WHERE order_id = $1")
        .bind(order)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

async fn state_of(env: &TestEnv, order: i64) -> (String, Option<String>) {
    sqlx::query_as("SELECT state, claimed_by FROM invoicing.orders WHERE id = $1")
        .bind(order)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

fn reconciler() -> InvoiceReconciler {
    InvoiceReconciler::new(Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_a_key_twice_invoices_once() {
    let env = TestEnv::new().await;
    let ids = shipped_orders(&env, 1).await;
    let key = ids[0].to_string();
    let r = reconciler();
    let ctx = context(&env, "w1");
    let first = run_key(&r, RECONCILER_NAME, &ctx, &key).await;
    assert!(
        matches!(first, RunResult::Done(Outcome::Changed)),
        "{first:?}"
    );
    let second = run_key(&r, RECONCILER_NAME, &ctx, &key).await;
    assert!(
        matches!(second, RunResult::Done(Outcome::Unchanged)),
        "{second:?}"
    );
    assert_eq!(invoices_of(&env, ids[0]).await, 1);
    assert_eq!(state_of(&env, ids[0]).await, ("INVOICED".to_owned(), None));
    let has_time: bool =
        sqlx::query_scalar("SELECT invoiced_at IS NOT NULL FROM invoicing.orders WHERE id = $1")
            .bind(ids[0])
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(has_time);
    assert_eq!(r.stats().snapshot().invoiced_manually, 1);

    // An unknown order, or one not shipped, is none of its business.
    let missing = run_key(&r, RECONCILER_NAME, &ctx, "999999").await;
    assert!(
        matches!(missing, RunResult::Done(Outcome::Unchanged)),
        "{missing:?}"
    );
    let created = create_orders(&env.pool, 1).await.unwrap()[0];
    let not_shipped = run_key(&r, RECONCILER_NAME, &ctx, &created.to_string()).await;
    assert!(matches!(not_shipped, RunResult::Done(Outcome::Unchanged)));
    assert_eq!(state_of(&env, created).await.0, "CREATED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_runs_of_a_key_invoice_once() {
    let env = TestEnv::new().await;
    let ids = shipped_orders(&env, 5).await;
    let r = Arc::new(reconciler());
    for id in &ids {
        let key = id.to_string();
        // Through run_key (the per-key lock) ...
        let runs = (0..6).map(|i| {
            let (r, key, ctx) = (r.clone(), key.clone(), context(&env, &format!("w{i}")));
            async move { run_key(r.as_ref(), RECONCILER_NAME, &ctx, &key).await }
        });
        let results = futures::future::join_all(runs).await;
        let changed = results
            .iter()
            .filter(|r| matches!(r, RunResult::Done(Outcome::Changed)))
            .count();
        assert_eq!(changed, 1, "{results:?}");
        assert!(
            results
                .iter()
                .all(|r| matches!(r, RunResult::Done(_) | RunResult::Busy)),
            "{results:?}"
        );
        assert_eq!(invoices_of(&env, *id).await, 1);
    }

    // ... and bypassing the lock: the compare-and-set claim alone lets one win.
    let more = shipped_orders(&env, 3).await;
    for id in &more {
        let key = id.to_string();
        let runs = (0..6).map(|i| {
            let (r, key, ctx) = (r.clone(), key.clone(), context(&env, &format!("raw{i}")));
            async move { r.reconcile(&ctx, &key).await }
        });
        let results: Vec<Result<Outcome, ReconcileError>> = futures::future::join_all(runs).await;
        let changed = results
            .iter()
            .filter(|r| matches!(r, Ok(Outcome::Changed)))
            .count();
        assert_eq!(changed, 1, "{results:?}");
        assert_eq!(invoices_of(&env, *id).await, 1);
        assert_eq!(state_of(&env, *id).await.0, "INVOICED");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_claim_is_resumed_and_a_live_one_is_left_alone() {
    let env = TestEnv::new().await;
    let ids = shipped_orders(&env, 2).await;
    let (dead, live) = (ids[0], ids[1]);
    sqlx::query(
        "UPDATE invoicing.orders SET state = 'INVOICING', claimed_by = 'dead/invoicing', \
         claimed_at = now() - interval '1 hour' WHERE id = $1",
    )
    .bind(dead)
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE invoicing.orders SET state = 'INVOICING', claimed_by = 'busy/invoicing', \
         claimed_at = now() WHERE id = $1",
    )
    .bind(live)
    .execute(&env.pool)
    .await
    .unwrap();
    // The dead worker got as far as the invoice: resuming must not add one.
    sqlx::query(
        "INSERT INTO invoicing.invoices (order_id, amount_cents) \
         SELECT id, amount_cents FROM invoicing.orders WHERE id = $1",
    )
    .bind(dead)
    .execute(&env.pool)
    .await
    .unwrap();

    let r = reconciler();
    let ctx = context(&env, "w2");
    let resumed = run_key(&r, RECONCILER_NAME, &ctx, &dead.to_string()).await;
    assert!(
        matches!(resumed, RunResult::Done(Outcome::Changed)),
        "{resumed:?}"
    );
    assert_eq!(invoices_of(&env, dead).await, 1);
    assert_eq!(state_of(&env, dead).await, ("INVOICED".to_owned(), None));
    assert_eq!(r.stats().snapshot().resumed_claims, 1);

    let left = run_key(&r, RECONCILER_NAME, &ctx, &live.to_string()).await;
    assert!(
        matches!(left, RunResult::Done(Outcome::Unchanged)),
        "{left:?}"
    );
    assert_eq!(
        state_of(&env, live).await,
        ("INVOICING".to_owned(), Some("busy/invoicing".to_owned()))
    );
    assert_eq!(invoices_of(&env, live).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_failure_is_retryable_and_changes_nothing() {
    let env = TestEnv::new().await;
    let ids = shipped_orders(&env, 1).await;
    let stats = std::sync::Arc::new(invoicing::reconciler::ReconcileStats::default());
    let failing = WithFaults::new(
        InvoiceReconciler::new(Duration::from_secs(30)),
        Faults {
            fail_rate: 1.0,
            ..Faults::NONE
        },
        stats.clone(),
    );
    let result = run_key(
        &failing,
        RECONCILER_NAME,
        &context(&env, "w3"),
        &ids[0].to_string(),
    )
    .await;
    match result {
        RunResult::Failed(e) => assert!(e.is_retryable(), "{e}"),
        other => panic!("expected a retryable failure, got {other:?}"),
    }
    assert_eq!(state_of(&env, ids[0]).await, ("SHIPPED".to_owned(), None));
    assert_eq!(stats.snapshot().injected_failures, 1);
}
