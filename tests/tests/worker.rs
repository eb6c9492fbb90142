//! The runtime: one `Worker` wiring relay, consumer, sweep and control plane,
//! against real Postgres and NATS; the control plane answered over NATS
//! request/reply by exactly one worker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use converge::control::{
    reconciler_subject, sweep_subject, ControlErrorKind, ControlReply, ControlRequest,
};
use converge::handlers::{ConsumerConfig, Context, Outcome, ReconcileError, Reconciler};
use converge::sweeper::{Schedule, SqlCandidates, SweepConfig, Timing};
use converge::{Outbox, Worker, WorkerHandle};
use converge_tests::orders::{Shipped, BACKLOG, CANDIDATES};
use converge_tests::TestEnv;
use futures::StreamExt;

/// SHIPPED → INVOICED; fails permanently while `broken` is set for key 7.
struct Invoice {
    broken: AtomicBool,
}

impl Reconciler for Invoice {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        if key == "7" && self.broken.load(Ordering::SeqCst) {
            return Err(ReconcileError::permanent("order 7 has no customer"));
        }
        converge_tests::orders::invoice(ctx, key).await
    }
}

async fn start(env: &TestEnv, app: &str, instance: &str, invoice: Arc<Invoice>) -> WorkerHandle {
    let subject = format!("{}.order.Shipped", env.prefix);
    let mut consumer = ConsumerConfig::new("invoicing", env.stream.clone(), subject);
    consumer.retry.max_attempts = 1;
    let mut sweep = SweepConfig::new(
        "invoices",
        "invoicing",
        Timing::new(Schedule::FixedRate(Duration::from_secs(3600))),
    );
    sweep.retry.max_attempts = 1;
    sweep.lease.lock_at_least_for = Duration::ZERO;
    Worker::new(env.pool.clone(), env.nats.clone(), app)
        .instance_name(instance)
        .relay(env.relay_config())
        .consumer(consumer, invoice.clone())
        .sweep(
            sweep,
            SqlCandidates::new(CANDIDATES).with_backlog(BACKLOG),
            invoice,
        )
        .measure_interval(Duration::from_millis(200))
        .shutdown_timeout(Duration::from_secs(10))
        .start()
        .await
        .expect("worker starts")
}

async fn orders(env: &TestEnv) {
    converge_tests::orders::create_table(&env.pool).await;
}

async fn state(env: &TestEnv, id: i64) -> String {
    converge_tests::orders::state(&env.pool, id).await
}

/// Sends `request` to the sweep's or reconciler's subject and collects the
/// replies up to the final one.
async fn ask(env: &TestEnv, app: &str, request: &ControlRequest) -> Vec<ControlReply> {
    let subject = match request {
        ControlRequest::SweepRun { sweep, .. } => sweep_subject(app, sweep),
        ControlRequest::DeadLetterRetry { .. } => reconciler_subject(app, "invoicing"),
        _ => sweep_subject(app, "invoices"),
    };
    ask_on(env, subject, request).await
}

/// Sends `request` on `subject` and collects the replies up to the final one.
async fn ask_on(env: &TestEnv, subject: String, request: &ControlRequest) -> Vec<ControlReply> {
    let inbox = env.nats.new_inbox();
    let mut replies = env.nats.subscribe(inbox.clone()).await.unwrap();
    env.nats
        .publish_with_reply(subject, inbox, serde_json::to_vec(request).unwrap().into())
        .await
        .unwrap();
    let mut got = Vec::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), replies.next())
            .await
            .expect("a worker answers")
            .unwrap();
        let reply: ControlReply = serde_json::from_slice(&message.payload).unwrap();
        let done = !matches!(reply, ControlReply::Accepted { .. });
        got.push(reply);
        if done {
            return got;
        }
    }
}

#[tokio::test]
async fn a_worker_relays_reconciles_sweeps_and_answers_operators() {
    let env = TestEnv::new().await;
    orders(&env).await;
    let app = format!("app{}", &env.db_name[11..]);
    let invoice = Arc::new(Invoice {
        broken: AtomicBool::new(true),
    });
    let worker = start(&env, &app, "w1", invoice.clone()).await;

    // The event path: an order shipped with its event is invoiced.
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders (id, state) VALUES (1, 'SHIPPED')")
        .execute(&mut *tx)
        .await
        .unwrap();
    Outbox::default()
        .append(&mut tx, &Shipped { id: 1 })
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while state(&env, 1).await != "INVOICED" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "order 1 not invoiced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The registry names what the worker runs.
    let (stream, consumers, sweeps): (Option<String>, Vec<String>, Vec<String>) = sqlx::query_as(
        "SELECT stream, consumers, sweeps FROM converge.workers WHERE instance = 'w1' AND application = $1",
    )
    .bind(&app)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(stream.as_deref(), Some(env.stream.as_str()));
    assert_eq!(consumers, vec![format!("{}/invoicing", env.stream)]);
    assert_eq!(sweeps, vec!["invoices"]);

    // Legacy orders (no event): only a sweep converges them.
    sqlx::query("INSERT INTO orders (id, state) SELECT g, 'SHIPPED' FROM generate_series(2, 9) g")
        .execute(&env.pool)
        .await
        .unwrap();
    // The convergence figure is measured and recorded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let figure: Option<i64> = sqlx::query_scalar(
            "SELECT unconverged_keys FROM converge.sweep_schedules WHERE sweep = 'invoices'",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        if figure == Some(8) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "figure {figure:?}, expected 8"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Dry run: the candidates, nothing reconciled.
    let replies = ask(
        &env,
        &app,
        &ControlRequest::SweepRun {
            sweep: "invoices".into(),
            keys: None,
            dry_run: true,
            limit: Some(3),
        },
    )
    .await;
    assert!(matches!(&replies[0], ControlReply::Accepted { instance } if instance == "w1"));
    assert_eq!(
        replies[1],
        ControlReply::Candidates {
            sweep: "invoices".into(),
            keys: vec!["2".into(), "3".into(), "4".into()],
            truncated: true
        }
    );
    assert_eq!(state(&env, 2).await, "SHIPPED");

    // A manual run for two given keys converges exactly those.
    let replies = ask(
        &env,
        &app,
        &ControlRequest::SweepRun {
            sweep: "invoices".into(),
            keys: Some(vec!["3".into(), "5".into()]),
            dry_run: false,
            limit: None,
        },
    )
    .await;
    match &replies[1] {
        ControlReply::SweepRan {
            instance,
            status,
            scanned,
            reconciled,
            ..
        } => {
            assert_eq!((instance.as_str(), status.as_str()), ("w1", "completed"));
            assert_eq!((*scanned, *reconciled), (2, 2));
        }
        other => panic!("expected a run, got {other:?}"),
    }
    // Sent without the CLI (no actor claimed): the worker's audit log has
    // both requests, settled with their outcomes.
    let recorded: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT action, target, actor, outcome FROM converge.audit \
         WHERE details->>'recorded_by' = 'worker' AND details->>'instance' = 'w1' ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let unclaimed = "unknown (no actor claimed)".to_owned();
    assert_eq!(
        recorded,
        vec![
            (
                "sweep.dry_run".into(),
                "invoices".into(),
                unclaimed.clone(),
                Some("ok".into())
            ),
            (
                "sweep.run".into(),
                "invoices".into(),
                unclaimed,
                Some("ok".into())
            ),
        ]
    );
    for (id, expected) in [
        (2, "SHIPPED"),
        (3, "INVOICED"),
        (4, "SHIPPED"),
        (5, "INVOICED"),
    ] {
        assert_eq!(state(&env, id).await, expected, "order {id}");
    }

    // A full run: key 7 fails permanently and is dead-lettered; the rest converge.
    let replies = ask(
        &env,
        &app,
        &ControlRequest::SweepRun {
            sweep: "invoices".into(),
            keys: None,
            dry_run: false,
            limit: None,
        },
    )
    .await;
    let run_id = match &replies[1] {
        ControlReply::SweepRan {
            run_id,
            failed,
            reconciled,
            ..
        } => {
            assert_eq!((*failed, *reconciled), (1, 5));
            *run_id
        }
        other => panic!("expected a run, got {other:?}"),
    };
    let dead: i64 = sqlx::query_scalar(
        "SELECT id FROM converge.dead_letters WHERE aggregate_key = '7' AND resolved_at IS NULL",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();

    // Fixed: retry the dead letter through the control plane.
    invoice.broken.store(false, Ordering::SeqCst);
    let replies = ask(
        &env,
        &app,
        &ControlRequest::DeadLetterRetry {
            ids: vec![dead, 999_999],
            actor: "alice".into(),
        },
    )
    .await;
    match &replies[1] {
        ControlReply::Retried { results } => {
            assert_eq!(results[0].outcome, "changed", "{results:?}");
            assert_eq!(results[1].outcome, "not_found", "{results:?}");
        }
        other => panic!("expected retry results, got {other:?}"),
    }
    assert_eq!(state(&env, 7).await, "INVOICED");
    let (resolution, by): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT resolution, resolved_by FROM converge.dead_letters WHERE id = $1")
            .bind(dead)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        (resolution.as_deref(), by.as_deref()),
        (Some("retried"), Some("alice"))
    );

    // Replay of a run without failed keys is refused with a reason.
    let replies = ask(
        &env,
        &app,
        &ControlRequest::SweepReplay {
            run_id: run_id + 100,
            failed_only: true,
        },
    )
    .await;
    assert!(
        matches!(
            &replies[0],
            ControlReply::Error {
                kind: ControlErrorKind::NotFound,
                ..
            }
        ),
        "{replies:?}"
    );

    // Nobody listens for an unknown sweep; a request for one that reaches a
    // worker anyway (sent on another sweep's subject) names the known ones.
    let replies = ask_on(
        &env,
        sweep_subject(&app, "invoices"),
        &ControlRequest::SweepRun {
            sweep: "nope".into(),
            keys: None,
            dry_run: false,
            limit: None,
        },
    )
    .await;
    match &replies[0] {
        ControlReply::Error { kind, known, .. } => {
            assert_eq!(*kind, ControlErrorKind::UnknownSweep);
            assert_eq!(known, &vec!["invoices".to_owned()]);
        }
        other => panic!("expected an error, got {other:?}"),
    }

    worker.shutdown().await.expect("clean shutdown");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.workers")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "a stopped worker leaves the registry");
}

#[tokio::test]
async fn each_control_request_is_answered_by_exactly_one_of_several_workers() {
    let env = TestEnv::new().await;
    orders(&env).await;
    let app = format!("app{}", &env.db_name[11..]);
    let invoice = Arc::new(Invoice {
        broken: AtomicBool::new(false),
    });
    let a = start(&env, &app, "a", invoice.clone()).await;
    let b = start(&env, &app, "b", invoice).await;
    sqlx::query("INSERT INTO orders (id, state) SELECT g, 'SHIPPED' FROM generate_series(1, 5) g")
        .execute(&env.pool)
        .await
        .unwrap();
    for _ in 0..4 {
        let inbox = env.nats.new_inbox();
        let mut replies = env.nats.subscribe(inbox.clone()).await.unwrap();
        let request = ControlRequest::SweepRun {
            sweep: "invoices".into(),
            keys: None,
            dry_run: true,
            limit: None,
        };
        env.nats
            .publish_with_reply(
                sweep_subject(&app, "invoices"),
                inbox,
                serde_json::to_vec(&request).unwrap().into(),
            )
            .await
            .unwrap();
        let mut count = 0;
        while let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(700), replies.next()).await
        {
            count += 1;
        }
        assert_eq!(
            count, 2,
            "one Accepted and one Candidates, from one worker only"
        );
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_convergence_figure_is_measured_once_per_interval_and_a_failure_stays_visible() {
    use converge::sweeper::Sweeper;
    let env = TestEnv::new().await;
    orders(&env).await;
    sqlx::query("INSERT INTO orders (id, state) SELECT g, 'SHIPPED' FROM generate_series(1, 4) g")
        .execute(&env.pool)
        .await
        .unwrap();
    let timing = || Timing::new(Schedule::FixedRate(Duration::from_secs(3600)));
    let invoice = Arc::new(Invoice {
        broken: AtomicBool::new(false),
    });
    sqlx::query("CREATE TABLE doomed (x timestamptz)")
        .execute(&env.pool)
        .await
        .unwrap();
    let sweeper = Sweeper::new(env.pool.clone())
        .sweep(
            SweepConfig::new("good", "invoicing", timing()),
            SqlCandidates::new(CANDIDATES).with_backlog(BACKLOG),
            invoice.clone(),
        )
        .sweep(
            SweepConfig::new("broken", "invoicing", timing()),
            SqlCandidates::new(CANDIDATES).with_backlog("SELECT count(*), min(x) FROM doomed"),
            invoice,
        )
        .start()
        .await
        .unwrap();
    // A backlog query that breaks after start (start refuses one broken before).
    sqlx::query("DROP TABLE doomed")
        .execute(&env.pool)
        .await
        .unwrap();
    let every = Duration::from_secs(60);

    // The good sweep is measured; the broken one is left out, not fatal.
    let figures = sweeper.measure(every).await;
    assert_eq!(figures.len(), 1, "{figures:?}");
    assert_eq!((figures[0].sweep.as_str(), figures[0].keys), ("good", 4));

    // Within the interval the recorded figure is read back, not re-measured.
    sqlx::query("UPDATE orders SET state = 'INVOICED' WHERE id <= 2")
        .execute(&env.pool)
        .await
        .unwrap();
    let again = sweeper.measure(every).await;
    assert_eq!(again[0].keys, 4, "measured once per interval, cluster-wide");

    // Claims are released; the broken sweep's figures stay visibly unmeasured.
    let rows: Vec<(String, Option<i64>, bool, bool)> = sqlx::query_as(
        "SELECT sweep, unconverged_keys, measured_at IS NOT NULL, measure_claimed_at IS NOT NULL \
         FROM converge.sweep_schedules ORDER BY sweep",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            ("broken".to_owned(), None, false, false),
            ("good".to_owned(), Some(4), true, false)
        ]
    );

    // Once the interval has passed, the next measurement sees the change.
    let fresh = sweeper.measure(Duration::from_millis(1)).await;
    assert_eq!(fresh[0].keys, 2);
    sweeper.shutdown().await.unwrap();
}
