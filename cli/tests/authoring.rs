//! The CLI's conventions: a typo'd application exits 2 naming the known
//! ones, keys are checked against the sweep's key type before anything runs,
//! `sweep run --wait-for-lease` waits for a busy sweep instead of failing,
//! `leases` (alias `locks`), `-o json`, shell completions — against a real
//! worker, database and NATS.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{converge, orders::ship};
use converge::handlers::{Context, Outcome, ReconcileError, Reconciler};
use converge::sweeper::{KeyType, Schedule, SqlCandidates, Timing};
use converge::{Worker, WorkerHandle};
use converge_tests::TestEnv;

/// SHIPPED → INVOICED, slowly: a run over a few orders takes seconds.
struct SlowInvoice;

impl Reconciler for SlowInvoice {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        tokio::time::sleep(Duration::from_millis(400)).await;
        converge_tests::orders::invoice(ctx, key).await
    }
}

async fn start(env: &TestEnv, app: &str) -> WorkerHandle {
    converge_tests::orders::create_table(&env.pool).await;
    Worker::new(env.pool.clone(), env.nats.clone(), app)
        .reconciler("invoicing", Arc::new(SlowInvoice))
        .sweep_with(
            Timing::new(Schedule::fixed_rate(Duration::from_secs(3600)).unwrap()),
            SqlCandidates::keyset("orders", "id", KeyType::BigInt, "state <> 'INVOICED'"),
            |s| {
                s.name = "invoices".into();
                s.concurrency = 1;
                s.lease.lock_at_least_for = Duration::ZERO;
            },
        )
        .start()
        .await
        .expect("worker starts")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_app_exits_2_naming_the_known_ones() {
    let env = TestEnv::new().await;
    let app = common::app();
    let worker = start(&env, &app).await;
    for args in [
        vec!["status", "--app", "invocing"],
        vec!["sweep", "list", "--app", "invocing"],
        vec!["sweep", "run", "invoices", "--app", "invocing"],
    ] {
        let run = converge(&env, &args).await.expect(2);
        assert!(
            run.stderr.contains("\"invocing\"") && run.stderr.contains(&app),
            "{args:?}: {run:#?}"
        );
    }
    converge(&env, &["status", "--app", &app]).await.expect(0);
    worker.shutdown().await.unwrap();
}

/// `--key abc` for a bigint key used to become a permanent dead letter: now
/// refused before any run, naming the type.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_of_the_wrong_type_is_refused_before_any_run() {
    let env = TestEnv::new().await;
    let app = common::app();
    let worker = start(&env, &app).await;
    let run = converge(
        &env,
        &[
            "sweep", "run", "invoices", "--key", "abc", "--wait", "--app", &app,
        ],
    )
    .await;
    assert_ne!(run.code, 0, "{run:#?}");
    assert!(
        run.stderr.contains("\"abc\"") && run.stderr.contains("bigint"),
        "{run:#?}"
    );
    let (runs, letters): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM converge.sweep_runs), (SELECT count(*) FROM converge.dead_letters)",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        (runs, letters),
        (0, 0),
        "nothing ran, nothing dead-lettered"
    );
    worker.shutdown().await.unwrap();
}

/// A second `sweep run --wait` while a run holds the sweep used to be
/// refused (lease held, or dropped by the overlap policy); with
/// `--wait-for-lease` it asks again until the sweep is free and runs.
#[tokio::test(flavor = "multi_thread")]
async fn sweep_run_waits_for_a_busy_sweep_with_wait_for_lease() {
    let env = TestEnv::new().await;
    let app = common::app();
    let worker = start(&env, &app).await;
    ship(&env.pool, 1..=6).await; // ~2.4 s of work for one run
    let first =
        common::spawn_converge(&env, &["sweep", "run", "invoices", "--wait", "--app", &app]);
    // Until the first run holds the lease.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM converge.sweep_runs")
        .fetch_one(&env.pool)
        .await
        .unwrap()
        == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first run did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = converge(&env, &["sweep", "run", "invoices", "--wait", "--app", &app])
        .await
        .expect(1);
    assert!(refused.stderr.contains("--wait-for-lease"), "{refused:#?}");

    let waited = converge(
        &env,
        &[
            "sweep",
            "run",
            "invoices",
            "--wait-for-lease",
            "30",
            "--app",
            &app,
        ],
    )
    .await
    .expect(0);
    assert!(waited.stderr.contains("asking again"), "{waited:#?}");
    assert!(waited.stdout.contains("completed"), "{waited:#?}");
    common::finish(first).await.expect(0);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_locks_output_json_and_completions() {
    let env = TestEnv::new().await;
    let app = common::app();
    let worker = start(&env, &app).await;
    converge(&env, &["sweep", "run", "invoices", "--wait", "--app", &app])
        .await
        .expect(0);
    let a = converge(&env, &["leases", "list", "--json"])
        .await
        .expect(0)
        .json();
    let b = converge(&env, &["locks", "list", "-o", "json"])
        .await
        .expect(0)
        .json();
    assert_eq!(
        a.as_array().map(Vec::len),
        b.as_array().map(Vec::len),
        "{a} / {b}"
    );
    assert!(a.to_string().contains("invoices"), "{a}");
    converge(&env, &["leases", "list", "-o", "yaml"])
        .await
        .expect(2);

    let bash = converge(&env, &["completions", "bash"]).await.expect(0);
    assert!(
        bash.stdout.contains("_converge") && bash.stdout.contains("dead-letters"),
        "{bash:#?}"
    );
    converge(&env, &["completions", "cmd"]).await.expect(2);

    let help = converge(&env, &["--help"]).await.expect(0);
    assert!(
        !help.stdout.contains("=]"),
        "help shows empty env values: {}",
        help.stdout
    );
    worker.shutdown().await.unwrap();
}

/// A sweep run that fails (its candidate query broke after start) shows its
/// error in `status` and `sweep history`, not only "failed".
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_run_shows_its_error_in_status_and_history() {
    let env = TestEnv::new().await;
    let app = common::app();
    let worker = start(&env, &app).await;
    sqlx::query("ALTER TABLE orders RENAME TO orders_gone")
        .execute(&env.pool)
        .await
        .unwrap();
    let run = converge(&env, &["sweep", "run", "invoices", "-w", "-a", &app]).await;
    assert_ne!(run.code, 0, "{run:#?}");
    let status = converge(&env, &["status", "-a", &app]).await.expect(0);
    assert!(
        status.stdout.contains("failed") && status.stdout.contains("does not exist"),
        "the last run's error: {}",
        status.stdout
    );
    let history = converge(&env, &["sweep", "history", "invoices", "-o", "json"])
        .await
        .expect(0)
        .json();
    let error = history["runs"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains("does not exist"), "{history}");
    worker.shutdown().await.unwrap();
}
