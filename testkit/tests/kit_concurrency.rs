//! Concurrent runs: under the per-key lock, and without it to test a
//! reconciler's own safety.

mod common;

use common::{env, kit};

use std::time::Duration;

use tokio::sync::Barrier;

use common::{invoiced_once, loosely_invoiced_once, order_facts};
use converge::handlers::{
    run_key, Context, Outcome, RateLimits, ReconcileError, Reconciler, RunResult, Trigger,
};
use converge_testkit::{KitError, RunOutcome};

#[tokio::test]
async fn concurrent_runs_that_never_get_the_lock_are_an_error() {
    let env = env().await;
    // No invariant: with every run busy, nothing else would notice.
    let locked_only = kit(&env.pool, common::Invoicing::new());

    // Another process holds key 42 of "invoicing" (its lease row, for an hour).
    sqlx::query(
        "INSERT INTO converge.key_leases (reconciler, key, token, holder, acquired_at, expires_at) \
         VALUES ('invoicing', '42', nextval('converge.key_lease_tokens'), 'another process', \
                 now(), now() + interval '1 hour')",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let ctx = Context::new(
        env.pool.clone(),
        Trigger::Manual { reason: None },
        1,
        RateLimits::new(),
        "probe/invoicing",
    );
    let probe = run_key(&common::Invoicing::new(), "invoicing", &ctx, "42").await;
    assert!(
        matches!(probe, RunResult::Busy),
        "the held lock is the key's: {probe:?}"
    );

    let err = locked_only
        .run_concurrently("42", 8)
        .await
        .expect_err("no run gets the lock");
    let KitError::NeverRan {
        key,
        locked,
        report,
    } = &err
    else {
        panic!("expected NeverRan, got {err}");
    };
    assert_eq!((key.as_str(), *locked), ("42", 8));
    assert!(
        report.outcomes().iter().all(|o| **o == RunOutcome::Busy),
        "{report}"
    );
    assert!(
        err.to_string()
            .contains("never actually run under the lock"),
        "{err}"
    );

    // Unlocked runs complete, but none under the lock did: still an error.
    let err = kit(&env.pool, common::Invoicing::new())
        .unlocked_concurrent_runs()
        .run_concurrently("42", 4)
        .await
        .expect_err("the locked runs find the key busy");
    let KitError::NeverRan { locked, report, .. } = &err else {
        panic!("expected NeverRan, got {err}");
    };
    assert_eq!(*locked, 2_usize);
    assert_eq!(report.completed_runs(), 2, "{report}");
    assert!(report
        .runs
        .iter()
        .all(|r| r.locked == (r.outcome == RunOutcome::Busy)));

    // Released: the same check passes.
    sqlx::query("DELETE FROM converge.key_leases WHERE reconciler = 'invoicing' AND key = '42'")
        .execute(&env.pool)
        .await
        .unwrap();
    let report = locked_only
        .run_concurrently("42", 8)
        .await
        .expect("run_concurrently");
    assert_eq!(report.changed_runs(), 1, "{report}");
}

/// Reads the state, then writes without a compare-and-set: safe only under
/// the per-key lock. Every run that saw SHIPPED waits (up to 2 s) for a
/// second one to have seen it too before writing, so two runs that really
/// run at once both invoice.
struct ReadsThenWrites {
    together: Barrier,
}

impl Reconciler for ReadsThenWrites {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let state: String = sqlx::query_scalar("SELECT state FROM orders WHERE id = $1::bigint")
            .bind(key)
            .fetch_one(ctx.pool())
            .await?;
        if state != "SHIPPED" {
            return Ok(Outcome::Unchanged);
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.together.wait()).await;
        let mut tx = ctx.pool().begin().await?;
        sqlx::query("INSERT INTO loose_invoices (order_id) VALUES ($1::bigint)")
            .bind(key)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO side_effects (order_id, applied) VALUES ($1::bigint, 1) \
             ON CONFLICT (order_id) DO UPDATE SET applied = side_effects.applied + 1",
        )
        .bind(key)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE orders SET state = 'INVOICED' WHERE id = $1::bigint")
            .bind(key)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        ctx.step("invoiced")?;
        Ok(Outcome::Changed)
    }
}

fn reads_then_writes() -> ReadsThenWrites {
    ReadsThenWrites {
        together: Barrier::new(2),
    }
}

#[tokio::test]
async fn unlocked_concurrent_runs_test_the_reconcilers_own_safety() {
    let env = env().await;

    // Compare-and-set claims: safe with several runs at once.
    let report = kit(&env.pool, common::Invoicing::new())
        .invariant(invoiced_once)
        .unlocked_concurrent_runs()
        .run_concurrently("42", 8)
        .await
        .expect("claims keep unlocked runs apart");
    let unlocked: Vec<_> = report.runs.iter().filter(|r| !r.locked).collect();
    assert_eq!(unlocked.len(), 4, "{report}");
    assert!(
        unlocked.iter().all(|r| r.outcome.is_completed()),
        "{report}"
    );
    assert_eq!(report.changed_runs(), 1, "{report}");
    assert!(report.to_string().contains(" unlocked "), "{report}");

    // Read, then write: the lock alone keeps it correct...
    let report = kit(&env.pool, reads_then_writes())
        .invariant(loosely_invoiced_once)
        .run_concurrently("43", 8)
        .await
        .expect("one run at a time under the lock");
    assert_eq!(report.changed_runs(), 1, "{report}");

    // ...runs without it invoice twice.
    let err = kit(&env.pool, reads_then_writes())
        .invariant(loosely_invoiced_once)
        .unlocked_concurrent_runs()
        .run_concurrently("44", 8)
        .await
        .expect_err("two runs at once both invoice");
    let KitError::ConcurrentChanges { changed, runs, .. } = &err else {
        panic!("expected ConcurrentChanges, got {err}");
    };
    assert!(*changed >= 2 && *runs == 8, "{err}");
    let (_, invoices, _) = order_facts(&env.pool, "44", "loose_invoices")
        .await
        .unwrap();
    assert!(invoices >= 2, "{invoices} invoices");
}
