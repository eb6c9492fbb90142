//! The `converge` binary driving an in-process `converge::Worker` through the
//! control plane (a subject per sweep and per reconciler): sweep run / replay
//! / list / history, dead-letter retry across reconcilers, status of a live
//! worker. The edges (no answer, timeouts, ctrl-c) are in `control_edges.rs`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::orders::CANDIDATES;
use common::{converge, last_audit};
use converge::handlers::{ConsumerConfig, Context, Outcome, ReconcileError, Reconciler};
use converge::sweeper::{Lease, LeaseConfig, Schedule, SqlCandidates, SweepConfig, Timing};
use converge::{Worker, WorkerHandle};
use converge_tests::TestEnv;

/// SHIPPED → INVOICED; fails permanently for key 7 while `broken`.
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

async fn orders(env: &TestEnv, n: i64) {
    sqlx::query("CREATE TABLE orders (id bigint PRIMARY KEY, state text NOT NULL)")
        .execute(&env.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO orders SELECT g, 'SHIPPED' FROM generate_series(1, $1) g")
        .bind(n)
        .execute(&env.pool)
        .await
        .unwrap();
}

async fn states(env: &TestEnv) -> Vec<(i64, String)> {
    sqlx::query_as("SELECT id, state FROM orders ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

async fn start(env: &TestEnv, app: &str, invoice: Arc<Invoice>) -> WorkerHandle {
    start_on(env, env.pool.clone(), app, invoice).await
}

async fn start_on(
    env: &TestEnv,
    pool: sqlx::PgPool,
    app: &str,
    invoice: Arc<Invoice>,
) -> WorkerHandle {
    let subject = format!("{}.order.Shipped", env.prefix);
    let mut consumer = ConsumerConfig::new("invoicing", env.stream.clone(), subject);
    consumer.retry.max_attempts = 1;
    let mut sweep = SweepConfig::new(
        "invoices",
        "invoicing",
        Timing::new(Schedule::FixedRate(Duration::from_secs(3600))),
    );
    sweep.retry.max_attempts = 1;
    sweep.lease.lock_at_least_for = Duration::ZERO; // runs back to back
    Worker::new(pool, env.nats.clone(), app)
        .instance_name(format!("{app}-w1"))
        .relay(env.relay_config())
        .consumer(consumer, invoice.clone())
        .sweep(sweep, SqlCandidates::new(CANDIDATES), invoice.clone())
        .shutdown_timeout(Duration::from_secs(10))
        // Another reconciler: its own value (one value under two names is refused).
        .reconciler(
            "shipping",
            Arc::new(Invoice {
                broken: AtomicBool::new(false),
            }),
        )
        .start()
        .await
        .expect("worker starts")
}

#[tokio::test(flavor = "multi_thread")]
async fn sweep_run_with_keys_converges_exactly_those_keys() {
    let env = TestEnv::new().await;
    orders(&env, 5).await;
    let app = common::app();
    let invoice = Arc::new(Invoice {
        broken: AtomicBool::new(false),
    });
    let worker = start(&env, &app, invoice).await;

    let run = converge(
        &env,
        &[
            "sweep", "run", "invoices", "--key", "1", "--key", "2", "--wait", "--app", &app,
        ],
    )
    .await
    .expect(0);
    assert!(
        run.stdout.contains("completed; scanned 2, changed 2"),
        "{run:#?}"
    );
    let shipped: Vec<i64> = states(&env)
        .await
        .into_iter()
        .filter(|(_, s)| s == "SHIPPED")
        .map(|(id, _)| id)
        .collect();
    assert_eq!(shipped, vec![3, 4, 5], "exactly keys 1 and 2 converged");
    let (actor, action, target, _, details, outcome) = last_audit(&env).await;
    assert_eq!(
        (actor.as_str(), action.as_str(), target.as_str()),
        ("tester", "sweep.run", "invoices")
    );
    assert_eq!(details["keys"], serde_json::json!(["1", "2"]));
    assert_eq!(details["scanned"], 2);
    assert_eq!(outcome.as_deref(), Some("ok"));

    // Dry run: the candidates, nothing run, nothing audited.
    let audits = common::audit_rows(&env).await;
    let run = converge(&env, &["sweep", "run", "invoices", "--dry-run", "--json"])
        .await
        .expect(0);
    assert_eq!(run.json()["keys"], serde_json::json!(["3", "4", "5"]));
    assert_eq!(common::audit_rows(&env).await, audits);

    // Without --wait (and without --app: the only live application).
    let run = converge(&env, &["sweep", "run", "invoices", "--key", "3"])
        .await
        .expect(0);
    assert!(
        run.stdout
            .contains(&format!("accepted by instance {app}-w1")),
        "{run:#?}"
    );

    // An unknown sweep: nobody would answer on its subject, so the known
    // sweeps are named before anything is sent or audited; exit 2.
    let audits = common::audit_rows(&env).await;
    let run = converge(&env, &["sweep", "run", "nightly", "--app", &app])
        .await
        .expect(2);
    assert!(run.stderr.contains("known sweeps: invoices"), "{run:#?}");
    assert_eq!(common::audit_rows(&env).await, audits);

    let list = converge(&env, &["sweep", "list", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(list[0]["sweep"], "invoices");
    assert_eq!(list[0]["application"], app.as_str());
    assert!(list[0]["last_run_id"].is_i64(), "{list:#}");
    let run = converge(&env, &["sweep", "list"]).await.expect(0);
    assert!(
        run.stdout.contains("invoices") && run.stdout.contains("NEXT FIRE"),
        "{run:#?}"
    );

    let history = converge(&env, &["sweep", "history", "invoices", "--json"])
        .await
        .expect(0)
        .json();
    let runs = history["runs"].as_array().unwrap();
    assert!(
        runs.iter()
            .any(|r| r["scanned"] == 2 && r["status"] == "completed"),
        "{history:#}"
    );
    let actions = history["operator_actions"].as_array().unwrap();
    assert!(
        actions.iter().all(|a| a["action"] == "sweep.run"),
        "{history:#}"
    );
    assert_eq!(actions.len(), 2, "runs of invoices only: {history:#}");
    let run = converge(&env, &["sweep", "history", "invoices"])
        .await
        .expect(0);
    assert!(run.stdout.contains("operator actions:"), "{run:#?}");

    // Status sees the live worker and its consumer's figures.
    let report = converge(&env, &["status", "--json"]).await.expect(0).json();
    assert_eq!(report["workers"][0]["instance"], format!("{app}-w1"));
    let consumer = &report["consumers"][0];
    assert_eq!(consumer["consumer"], "invoicing");
    assert_eq!(consumer["stream"], env.stream.as_str());
    assert!(consumer["error"].is_null(), "{report:#}");
    assert_eq!(consumer["pending"], 0);
    assert_eq!(report["relays"].as_array().unwrap().len(), 1, "{report:#}");
    let screen = converge(&env, &["status"]).await.expect(0).stdout;
    for needle in [
        "CONSUMERS",
        "invoicing",
        &format!("{app}-w1"),
        "invoices",
        "RELAYS",
    ] {
        assert!(screen.contains(needle), "{needle:?} missing:\n{screen}");
    }

    // Another instance holds the sweep's lease: nothing runs, and who holds it is said.
    let mut config = LeaseConfig::default();
    config.lock_at_most_for = Duration::from_secs(600);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // The run of key 3 (not awaited above) may still hold it for a moment.
        if Lease::try_acquire(&env.pool, "invoices", "elsewhere", &config)
            .await
            .unwrap()
            .is_some()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sweep's lease never came free"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let run = converge(&env, &["sweep", "run", "invoices", "--key", "4", "--wait"])
        .await
        .expect(1);
    assert!(run.stderr.contains("held by elsewhere"), "{run:#?}");
    assert_eq!(states(&env).await[3].1, "SHIPPED");
    converge(&env, &["locks", "release", "invoices", "--force"])
        .await
        .expect(0);
    converge(&env, &["sweep", "run", "invoices", "--key", "4", "--wait"])
        .await
        .expect(0);
    assert_eq!(states(&env).await[3].1, "INVOICED");
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_key_fails_the_run_and_replay_failed_only_converges_it() {
    let env = TestEnv::new().await;
    orders(&env, 8).await;
    let app = common::app();
    let invoice = Arc::new(Invoice {
        broken: AtomicBool::new(true),
    });
    let worker = start(&env, &app, invoice.clone()).await;
    let run = converge(
        &env,
        &[
            "sweep", "run", "invoices", "--wait", "--app", &app, "--json",
        ],
    )
    .await
    .expect(1);
    let ran = run.json();
    assert_eq!(ran["failed"], 1, "{ran:#}");
    assert_eq!(ran["reconciled"], 7, "{ran:#}");
    let run_id = ran["run_id"].as_i64().unwrap().to_string();
    let (_, _, _, _, _, outcome) = last_audit(&env).await;
    assert_eq!(outcome.as_deref(), Some("partial"));

    invoice.broken.store(false, Ordering::SeqCst);
    let run = converge(
        &env,
        &[
            "sweep",
            "replay",
            &run_id,
            "--failed-only",
            "--wait",
            "--app",
            &app,
        ],
    )
    .await
    .expect(0);
    assert!(run.stdout.contains("scanned 1, changed 1"), "{run:#?}");
    assert!(states(&env).await.iter().all(|(_, s)| s == "INVOICED"));
    let (_, action, target, _, details, outcome) = last_audit(&env).await;
    assert_eq!(
        (action.as_str(), target.as_str()),
        ("sweep.replay", run_id.as_str())
    );
    assert_eq!(details["sweep"], "invoices");
    assert_eq!(outcome.as_deref(), Some("ok"));
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_retry_resolves_what_succeeds_and_reports_what_fails() {
    let env = TestEnv::new().await;
    orders(&env, 8).await;
    let app = common::app();
    let invoice = Arc::new(Invoice {
        broken: AtomicBool::new(true),
    });
    let worker = start(&env, &app, invoice.clone()).await;
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO converge.dead_letters (reconciler, aggregate_key, path, error, permanent, attempts) \
         VALUES ('invoicing', '6', 'event', 'boom', false, 5), \
                ('invoicing', '7', 'event', 'no customer', true, 1), \
                ('shipping', '2', 'sweep', 'timeout', false, 5) RETURNING id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let (six, seven, two) = (ids[0].to_string(), ids[1].to_string(), ids[2].to_string());

    // Two reconcilers: one request to each one's subject; ids named twice once.
    let run = converge(
        &env,
        &[
            "dead-letters",
            "retry",
            &two,
            &seven,
            &six,
            &two,
            "--app",
            &app,
        ],
    )
    .await
    .expect(1);
    assert!(
        run.stdout.contains("changed") && run.stdout.contains("permanent"),
        "{run:#?}"
    );
    assert!(
        run.stdout.contains("shipping") && run.stdout.contains("invoicing"),
        "{run:#?}"
    );
    assert!(
        run.stdout.contains("3 retried, 2 resolved, 1 failed"),
        "{run:#?}"
    );
    let (_, action, target, _, details, outcome) = last_audit(&env).await;
    assert_eq!(
        (action.as_str(), outcome.as_deref()),
        ("dead_letter.retry", Some("partial"))
    );
    assert_eq!(target, format!("dead letters {}", common::id_list(&ids)));
    assert_eq!(
        details["reconcilers"],
        serde_json::json!(["invoicing", "shipping"])
    );

    let resolved: Vec<(i64, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT id, resolution, resolved_by FROM converge.dead_letters ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(resolved[0].1.as_deref(), Some("retried"));
    assert_eq!(resolved[0].2.as_deref(), Some("tester"));
    assert_eq!(resolved[1].1, None);
    assert_eq!(resolved[2].1.as_deref(), Some("retried"));
    assert_eq!(states(&env).await[1].1, "INVOICED", "shipping ran key 2");

    invoice.broken.store(false, Ordering::SeqCst);
    let run = converge(
        &env,
        &[
            "dead-letters",
            "retry",
            "--reconciler",
            "invoicing",
            "--all",
            "--app",
            &app,
            "--json",
        ],
    )
    .await
    .expect(0);
    let results = run.json();
    assert_eq!(
        results.as_array().unwrap().len(),
        1,
        "only the open one: {results:#}"
    );
    assert_eq!(results[0]["key"], "7");
    assert_eq!(results[0]["outcome"], "changed");
    assert!(states(&env)
        .await
        .iter()
        .filter(|(id, _)| *id == 6 || *id == 7)
        .all(|(_, s)| s == "INVOICED"));
    let run = converge(&env, &["dead-letters", "retry", &seven, "--app", &app])
        .await
        .expect(2);
    assert!(run.stderr.contains("already resolved"), "{run:#?}");
    worker.shutdown().await.unwrap();
}

/// Sends `request` to `subject` and returns the worker's first reply.
async fn first_reply(
    env: &TestEnv,
    subject: String,
    request: &converge::control::ControlRequest,
) -> converge::control::ControlReply {
    use futures::StreamExt;
    let inbox = env.nats.new_inbox();
    let mut replies = env.nats.subscribe(inbox.clone()).await.unwrap();
    env.nats
        .publish_with_reply(subject, inbox, serde_json::to_vec(request).unwrap().into())
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("a reply within 10 s")
        .expect("a reply");
    serde_json::from_slice(&reply.payload).unwrap()
}

fn error_kind(reply: &converge::control::ControlReply) -> Option<(&'static str, String)> {
    match reply {
        converge::control::ControlReply::Error { kind, message, .. } => {
            Some((kind.as_str(), message.clone()))
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_out_of_bounds_are_refused_and_a_flood_is_answered_busy() {
    use converge::control::{
        reconciler_subject, sweep_subject, ControlRequest, MAX_CONTROL_TASKS, MAX_DRY_RUN_LIMIT,
        MAX_REQUEST_KEYS,
    };
    let env = TestEnv::new().await;
    let n = MAX_CONTROL_TASKS as i64 + 4;
    orders(&env, n).await;
    let app = common::app();
    let invoice = Arc::new(Invoice {
        broken: AtomicBool::new(false),
    });
    // Room for every blocked retry's connection: the cap, not the pool, is
    // what this test meets.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2 * MAX_CONTROL_TASKS as u32 + 10)
        .connect_with(env.connect_options())
        .await
        .unwrap();
    let worker = start_on(&env, pool, &app, invoice).await;

    // A dry run asking for every candidate there is.
    let huge = ControlRequest::SweepRun {
        sweep: "invoices".into(),
        keys: None,
        dry_run: true,
        limit: Some(u64::MAX),
    };
    let reply = first_reply(&env, sweep_subject(&app, "invoices"), &huge).await;
    let (kind, message) = error_kind(&reply).unwrap_or_else(|| panic!("{reply:?}"));
    assert_eq!(kind, "bad_request");
    assert!(
        message.contains(&MAX_DRY_RUN_LIMIT.to_string()),
        "{message}"
    );
    let many = ControlRequest::SweepRun {
        sweep: "invoices".into(),
        keys: Some((0..=MAX_REQUEST_KEYS).map(|k| k.to_string()).collect()),
        dry_run: false,
        limit: None,
    };
    let reply = first_reply(&env, sweep_subject(&app, "invoices"), &many).await;
    assert_eq!(
        error_kind(&reply).map(|k| k.0),
        Some("bad_request"),
        "{reply:?}"
    );
    // Both refusals are in the worker's audit log, under their action.
    let refused: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT action, outcome, details->>'error' FROM converge.audit \
         WHERE details->>'recorded_by' = 'worker' ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let bad = |action: &str| {
        (
            action.into(),
            Some("failed".into()),
            Some("bad_request".into()),
        )
    };
    assert_eq!(refused, vec![bad("sweep.dry_run"), bad("sweep.run")]);

    // A flood: each retry blocks on an order row the test holds, so the
    // worker's tasks fill up; what comes past the cap is answered `busy`.
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO converge.dead_letters (reconciler, aggregate_key, path, error, permanent, attempts) \
         SELECT 'shipping', g::text, 'event', 'boom', false, 1 FROM generate_series(1, $1) g \
         RETURNING id",
    )
    .bind(n)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let mut hold = env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM orders FOR UPDATE")
        .execute(&mut *hold)
        .await
        .unwrap();
    let mut kinds = Vec::new();
    for id in &ids {
        let retry = ControlRequest::DeadLetterRetry {
            ids: vec![*id],
            actor: "tester".into(),
        };
        let reply = first_reply(&env, reconciler_subject(&app, "shipping"), &retry).await;
        kinds.push(error_kind(&reply).map_or("accepted", |k| k.0));
    }
    hold.rollback().await.unwrap();
    assert_eq!(
        kinds.iter().filter(|k| **k == "accepted").count(),
        MAX_CONTROL_TASKS,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "busy").count(),
        4,
        "{kinds:?}"
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn filtered_bulk_retry_and_discard_take_exactly_the_matching_letters() {
    let env = TestEnv::new().await;
    orders(&env, 8).await;
    let app = common::app();
    let invoice = Arc::new(Invoice {
        broken: AtomicBool::new(false),
    });
    let worker = start(&env, &app, invoice).await;
    sqlx::query(
        "INSERT INTO converge.dead_letters \
           (reconciler, aggregate_key, path, error, permanent, attempts, failed_at) \
         VALUES ('invoicing', '1', 'event', 'HTTP 503: Timeout', false, 5, now()), \
                ('invoicing', '2', 'event', 'read timeout', false, 5, now() - interval '1 hour'), \
                ('invoicing', '3', 'sweep', 'TIMEOUT after 30 s', false, 5, now()), \
                ('invoicing', '4', 'event', 'timeout', false, 5, now() - interval '3 hours'), \
                ('invoicing', '5', 'event', 'no customer', true, 1, now()), \
                ('shipping', '6', 'event', 'timeout', false, 5, now())",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let shipped = || async {
        states(&env)
            .await
            .into_iter()
            .filter(|(_, s)| s == "SHIPPED")
            .map(|(id, _)| id)
            .collect::<Vec<_>>()
    };
    let filter = [
        "--reconciler",
        "invoicing",
        "--since",
        "2h",
        "--error-like",
        "timeout",
    ];
    let with = |extra: &[&str]| {
        let mut args = vec!["dead-letters", "retry"];
        args.extend(filter);
        args.extend(["--app", app.as_str()]);
        args.extend(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let audits_before = common::audit_rows(&env).await;

    // Not a terminal, no --yes: refused, naming the count; nothing done.
    let args = with(&[]);
    let run = converge(&env, &args.iter().map(String::as_str).collect::<Vec<_>>())
        .await
        .expect(2);
    assert!(
        run.stderr.contains("3 open dead letters") && run.stderr.contains("--yes"),
        "{run:#?}"
    );
    // A dry run lists them and does nothing.
    let args = with(&["--dry-run"]);
    let run = converge(&env, &args.iter().map(String::as_str).collect::<Vec<_>>())
        .await
        .expect(0);
    assert!(
        run.stdout.contains("dry run: 3 open dead letters"),
        "{run:#?}"
    );
    assert_eq!(shipped().await, (1..=8).collect::<Vec<_>>());
    assert_eq!(common::audit_rows(&env).await, audits_before);

    let args = with(&["--yes", "--json"]);
    let run = converge(&env, &args.iter().map(String::as_str).collect::<Vec<_>>())
        .await
        .expect(0);
    assert_eq!(run.json().as_array().unwrap().len(), 3, "{run:#?}");
    assert_eq!(
        shipped().await,
        vec![4, 5, 6, 7, 8],
        "exactly the matching keys ran"
    );
    let (_, action, target, _, details, outcome) = last_audit(&env).await;
    assert_eq!(
        (action.as_str(), outcome.as_deref()),
        ("dead_letter.retry", Some("ok"))
    );
    assert!(
        target.starts_with("3 dead letters of reconciler invoicing"),
        "{target}"
    );
    assert_eq!(details["count"], 3);
    assert_eq!(details["filter"]["error_like"], "timeout");
    assert_eq!(
        common::audit_rows(&env).await,
        audits_before + 1,
        "one action"
    );

    // Discard by error text across reconcilers: the two other timeouts.
    let run = converge(
        &env,
        &[
            "dead-letters",
            "discard",
            "--error-like",
            "TIMEOUT",
            "--yes",
        ],
    )
    .await
    .expect(0);
    assert!(run.stdout.contains("discarded 2 dead letters"), "{run:#?}");
    let open: Vec<String> = sqlx::query_scalar(
        "SELECT aggregate_key FROM converge.dead_letters WHERE resolved_at IS NULL",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(open, vec!["5"]);
    let (_, action, _, _, details, outcome) = last_audit(&env).await;
    assert_eq!(
        (action.as_str(), outcome.as_deref()),
        ("dead_letter.discard", Some("ok"))
    );
    assert_eq!(details["discarded"], 2);
    assert_eq!(shipped().await, vec![4, 5, 6, 7, 8], "discard runs nothing");

    // A typo in the reconciler, ids and a filter together: exit 2.
    let run = converge(
        &env,
        &[
            "dead-letters",
            "discard",
            "--reconciler",
            "invoicng",
            "--yes",
        ],
    )
    .await
    .expect(2);
    assert!(run.stderr.contains("known: invoicing"), "{run:#?}");
    let run = converge(&env, &["dead-letters", "discard", "1", "--yes"])
        .await
        .expect(2);
    assert!(run.stderr.contains("not both"), "{run:#?}");
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bulk_retry_of_more_letters_than_one_request_takes_is_sent_in_batches() {
    let env = TestEnv::new().await;
    let n = converge::control::MAX_RETRY_IDS as i64 + 5;
    orders(&env, n).await;
    let app = common::app();
    let invoice = Arc::new(Invoice {
        broken: AtomicBool::new(false),
    });
    let worker = start(&env, &app, invoice).await;
    sqlx::query(
        "INSERT INTO converge.dead_letters (reconciler, aggregate_key, path, error, permanent, attempts) \
         SELECT 'invoicing', g::text, 'event', 'timeout', false, 5 FROM generate_series(1, $1) g",
    )
    .bind(n)
    .execute(&env.pool)
    .await
    .unwrap();
    let run = converge(
        &env,
        &[
            "dead-letters",
            "retry",
            "--reconciler",
            "invoicing",
            "--yes",
            "--app",
            &app,
            "--json",
        ],
    )
    .await
    .expect(0);
    assert_eq!(
        run.json().as_array().unwrap().len() as i64,
        n,
        "{}",
        run.stderr
    );
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM converge.dead_letters WHERE resolved_at IS NULL")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(left, 0);
    assert!(states(&env).await.iter().all(|(_, s)| s == "INVOICED"));
    let (_, _, _, _, details, outcome) = last_audit(&env).await;
    assert_eq!(outcome.as_deref(), Some("ok"));
    assert_eq!(details["count"], n);
    worker.shutdown().await.unwrap();
}
