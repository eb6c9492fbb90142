//! The `converge` binary against a real PostgreSQL and NATS: bad input,
//! unreachable services, migrate, the audit log, leases and dead letters.

mod common;

use std::time::Duration;

use common::{audit_rows, converge, converge_with, last_audit};
use converge_tests::TestEnv;

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_exits_2_with_a_message_and_acts_on_nothing() {
    let env = TestEnv::new().await;
    let cases: &[(&[&str], &str)] = &[
        (&["outbox", "list", "--since", "yesterday"], "RFC 3339"),
        (&["outbox", "list", "--until", "15min"], "relative time"),
        (
            &["outbox", "list", "--since", "1h", "--until", "2h"],
            "--since must be before",
        ),
        (&["outbox", "list", "--limit", "many"], "invalid value"),
        (
            &[
                "outbox",
                "replay",
                "--unpublished",
                "--stream",
                "S",
                "--prefix",
                "p",
            ],
            "never runs ahead",
        ),
        (
            &["outbox", "replay", "--prefix", "p"],
            "--prefix needs --stream",
        ),
        (
            &["dead-letters", "show", "999"],
            "no dead letter with id 999",
        ),
        (
            &["dead-letters", "discard", "999"],
            "no dead letter with id 999",
        ),
        (&["dead-letters", "retry", "--all"], "--reconciler"),
        (&["locks", "release", "nope"], "no lease named \"nope\""),
        (
            &["sweep", "replay", "999", "--app", "x"],
            "no sweep run with id 999",
        ),
        (&["sweep", "run", "x"], "no application has a live worker"),
        (&["status", "--watch", "0"], "invalid value"),
        (&["frobnicate"], "unrecognized subcommand"),
    ];
    for (args, message) in cases {
        let run = converge(&env, args).await;
        assert_eq!(run.code, 2, "{args:?}: {run:#?}");
        assert!(run.stderr.contains(message), "{args:?}: {run:#?}");
    }
    assert_eq!(
        audit_rows(&env).await,
        0,
        "bad input must not be audited as an action"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_services_name_the_url_and_exit_1() {
    let env = TestEnv::new().await;
    let run = converge_with(
        "postgres://postgres:secret@127.0.0.1:1/x".into(),
        env.nats_url().into(),
        &["status"],
    )
    .await
    .expect(1);
    assert!(
        run.stderr.contains("postgres://postgres:***@127.0.0.1:1/x"),
        "{run:#?}"
    );
    assert!(run.stderr.contains("start PostgreSQL"), "{run:#?}");
    assert!(!run.stderr.contains("secret"), "{run:#?}");

    // A live worker row, so the CLI gets as far as sending.
    common::register_worker(&env, "nobody", &["invoices"], &[]).await;
    let run = converge_with(
        env.database_url(),
        "nats://127.0.0.1:1".into(),
        &["sweep", "run", "invoices", "--app", "nobody"],
    )
    .await
    .expect(1);
    assert!(run.stderr.contains("nats://127.0.0.1:1"), "{run:#?}");
    assert!(run.stderr.contains("nats-server"), "{run:#?}");
    let (_, action, _, _, details, outcome) = last_audit(&env).await;
    assert_eq!(action, "sweep.run");
    assert_eq!(outcome.as_deref(), Some("failed"));
    assert!(
        details["error"].as_str().unwrap().contains("NATS"),
        "{details}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_is_idempotent_and_audit_lists_actions() {
    let env = TestEnv::new().await;
    let run = converge(&env, &["migrate"]).await.expect(0);
    assert!(run.stdout.contains("up to date"), "{run:#?}");
    let run = converge(&env, &["audit", "--json"]).await.expect(0);
    assert_eq!(run.json(), serde_json::json!([]));
    sqlx::query(
        "INSERT INTO converge.leases (name, holder, token, lock_until) VALUES ('old', 'w9', 4, now())",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    converge(&env, &["locks", "release", "old", "--reason", "cleanup"])
        .await
        .expect(0);
    let run = converge(&env, &["audit"]).await.expect(0);
    assert!(run.stdout.contains("lock.release"), "{run:#?}");
    assert!(run.stdout.contains("cleanup"), "{run:#?}");
    let rows = converge(&env, &["audit", "--json"]).await.expect(0).json();
    assert_eq!(rows[0]["actor"], "tester");
    assert_eq!(rows[0]["outcome"], "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn locks_release_refuses_a_live_lease_and_force_fences_its_holder() {
    let env = TestEnv::new().await;
    let mut config = converge::sweeper::LeaseConfig::default();
    config.lock_at_most_for = Duration::from_secs(600);
    let mut lease = converge::sweeper::Lease::try_acquire(&env.pool, "invoices", "w1", &config)
        .await
        .unwrap()
        .expect("lease acquired");

    let rows = converge(&env, &["locks", "list", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(rows[0]["name"], "invoices");
    assert_eq!(rows[0]["holder"], "w1");
    assert_eq!(rows[0]["live"], true);
    let run = converge(&env, &["locks", "list"]).await.expect(0);
    assert!(
        run.stdout.contains("invoices") && run.stdout.contains("yes"),
        "{run:#?}"
    );

    let run = converge(&env, &["locks", "release", "invoices"])
        .await
        .expect(1);
    assert!(run.stderr.contains("held by w1 until"), "{run:#?}");
    assert!(run.stderr.contains("--force"), "{run:#?}");
    assert!(
        lease.is_held(&env.pool).await.unwrap(),
        "a refused release changes nothing"
    );

    let run = converge(
        &env,
        &[
            "locks", "release", "invoices", "--force", "--actor", "alice", "--reason", "w1 hung",
        ],
    )
    .await
    .expect(0);
    assert!(run.stdout.contains("released lease invoices"), "{run:#?}");
    assert!(!lease.is_held(&env.pool).await.unwrap());
    assert!(
        !lease.heartbeat(&env.pool).await.unwrap(),
        "the old holder is fenced off"
    );
    let row = converge(&env, &["locks", "list", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(row[0]["live"], false);
    assert!(row[0]["holder"].is_null());
    assert!(!row[0]["released_at"].is_null());
    let (actor, action, target, reason, details, outcome) = last_audit(&env).await;
    assert_eq!(
        (actor.as_str(), action.as_str(), target.as_str()),
        ("alice", "lock.release", "invoices")
    );
    assert_eq!(reason.as_deref(), Some("w1 hung"));
    assert_eq!(details["holder"], "w1");
    assert_eq!(outcome.as_deref(), Some("ok"));
    // Free for the next instance.
    assert!(
        converge::sweeper::Lease::try_acquire(&env.pool, "invoices", "w2", &config)
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_list_show_and_discard() {
    let env = TestEnv::new().await;
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO converge.dead_letters \
           (reconciler, aggregate_key, path, subject, headers, payload, error, permanent, attempts) \
         VALUES ('invoicing', '7', 'event', 'orders.order.Shipped', '{\"X-Tenant\": \"acme\"}', \
                 convert_to('{\"id\": 7}', 'UTF8'), 'no customer', true, 1), \
                ('shipping', '8', 'sweep', NULL, NULL, NULL, 'timeout', false, 5) \
         RETURNING id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let list = converge(&env, &["dead-letters", "list", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(list.as_array().unwrap().len(), 2);
    let list = converge(
        &env,
        &["dead-letters", "list", "--reconciler", "shipping", "--json"],
    )
    .await
    .expect(0)
    .json();
    assert_eq!(list[0]["aggregate_key"], "8");
    let run = converge(&env, &["dead-letters", "list"]).await.expect(0);
    assert!(
        run.stdout.contains("no customer") && run.stdout.contains("(permanent)"),
        "{run:#?}"
    );

    let id = ids[0].to_string();
    let shown = converge(&env, &["dead-letters", "show", &id, "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(shown["payload"]["id"], 7);
    assert_eq!(shown["headers"]["X-Tenant"], "acme");
    let run = converge(&env, &["dead-letters", "show", &id])
        .await
        .expect(0);
    assert!(
        run.stdout.contains("\"id\": 7") && run.stdout.contains("orders.order.Shipped"),
        "{run:#?}"
    );

    // An id named twice is one dead letter.
    converge(
        &env,
        &[
            "dead-letters",
            "discard",
            &id,
            &id,
            "--reason",
            "customer deleted",
        ],
    )
    .await
    .expect(0);
    let (resolution, by): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT resolution, resolved_by FROM converge.dead_letters WHERE id = $1")
            .bind(ids[0])
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        (resolution.as_deref(), by.as_deref()),
        (Some("discarded"), Some("tester"))
    );
    let (_, action, target, reason, _, outcome) = last_audit(&env).await;
    assert_eq!(action, "dead_letter.discard");
    assert_eq!(target, format!("dead letters {id}"));
    assert_eq!(reason.as_deref(), Some("customer deleted"));
    assert_eq!(outcome.as_deref(), Some("ok"));

    let run = converge(&env, &["dead-letters", "discard", &id, &ids[1].to_string()])
        .await
        .expect(2);
    assert!(
        run.stderr.contains("already resolved") && run.stderr.contains("discarded by tester"),
        "{run:#?}"
    );
    let open: i64 =
        sqlx::query_scalar("SELECT count(*) FROM converge.dead_letters WHERE resolved_at IS NULL")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(open, 1, "a refused discard discards nothing");
    let list = converge(&env, &["dead-letters", "list", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let list = converge(&env, &["dead-letters", "list", "--all", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(list.as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_watch_refreshes_until_stopped() {
    use tokio::io::AsyncBufReadExt;
    let env = TestEnv::new().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_converge"))
        .args(["status", "--watch", "1", "--json"])
        .env("DATABASE_URL", env.database_url())
        .env("NATS_URL", env.nats_url())
        .env_remove("CONVERGE_APP")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut reports = Vec::new();
    while reports.len() < 2 {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("a refresh within 20 s")
            .unwrap()
            .expect("still running");
        let report: serde_json::Value = serde_json::from_str(&line).unwrap();
        reports.push(report);
    }
    assert_eq!(reports[0]["outbox"]["backlog"], 0);
    assert_ne!(
        reports[0]["now"], reports[1]["now"],
        "each refresh reads again"
    );
    assert!(child.try_wait().unwrap().is_none(), "--watch keeps running");
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn several_hosts_take_the_writable_one_and_name_each_when_none_answers() {
    let env = TestEnv::new().await;
    let options = env.connect_options();
    // A dead host first: the CLI goes on to the next one.
    let both = format!(
        "postgres://postgres@127.0.0.1:1,{}:{}/{}",
        options.get_host(),
        options.get_port(),
        env.db_name
    );
    converge_with(both, env.nats_url().into(), &["status"])
        .await
        .expect(0);

    let none = converge_with(
        "postgres://postgres:secret@127.0.0.1:1,127.0.0.1:2/x".into(),
        env.nats_url().into(),
        &["status"],
    )
    .await
    .expect(1);
    assert!(none.stderr.contains("127.0.0.1:1:"), "{none:#?}");
    assert!(none.stderr.contains("127.0.0.1:2:"), "{none:#?}");
    assert!(none.stderr.contains("takes writes"), "{none:#?}");
    assert!(!none.stderr.contains("secret"), "{none:#?}");

    let standby = converge_with(
        format!(
            "postgres://postgres@127.0.0.1:1,{}:{}/x?target_session_attrs=standby",
            options.get_host(),
            options.get_port()
        ),
        env.nats_url().into(),
        &["status"],
    )
    .await
    .expect(2);
    assert!(
        standby.stderr.contains("target_session_attrs=standby"),
        "{standby:#?}"
    );
}
