//! The `converge` binary against a real PostgreSQL and NATS: the outbox
//! (list, replay to the stream) and the status screen.

mod common;

use std::time::Duration;

use common::{audit_rows, converge, last_audit};
use converge::{AppendOptions, DomainEvent, Outbox, StoredEvent};
use converge_tests::TestEnv;

#[derive(serde::Serialize)]
struct Ev {
    #[serde(skip)]
    kind: &'static str,
    #[serde(skip)]
    event: &'static str,
    id: String,
    n: i64,
}

impl DomainEvent for Ev {
    fn aggregate_type(&self) -> &str {
        self.kind
    }
    fn aggregate_id(&self) -> String {
        self.id.clone()
    }
    fn event_type(&self) -> &str {
        self.event
    }
}

fn ev(kind: &'static str, id: &str, event: &'static str, n: i64) -> Ev {
    Ev {
        kind,
        event,
        id: id.into(),
        n,
    }
}

async fn append(env: &TestEnv, events: &[Ev]) {
    let outbox = Outbox::default();
    let mut tx = env.pool.begin().await.unwrap();
    for e in events {
        outbox
            .append_with(
                &mut tx,
                e,
                &AppendOptions::default().header("X-Tenant", "acme"),
            )
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

/// Marks every event as published without a relay (moves every cursor past them).
async fn mark_published(env: &TestEnv) {
    sqlx::query(
        "UPDATE converge.relay_partitions p SET (cursor_tx_order, cursor_id) = \
         (SELECT coalesce(max(tx_order), 0), coalesce(max(id), 0) FROM converge.outbox)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
}

/// Creates the test's stream as the relay does (2-minute duplicate window),
/// publishes every outbox event with the relay's envelope and `Nats-Msg-Id`
/// = event id, in (tx_order, id) order, and moves the cursors past them.
async fn publish_like_the_relay(env: &TestEnv) {
    env.js
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: env.stream.clone(),
            subjects: vec![format!("{}.>", env.prefix)],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .unwrap();
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT aggregate_type, aggregate_id, version FROM converge.outbox ORDER BY tx_order, id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    for (aggregate_type, aggregate_id, version) in rows {
        let event: StoredEvent =
            Outbox::history(&env.pool, &aggregate_type, &aggregate_id, version - 1, 1)
                .await
                .unwrap()
                .remove(0);
        let envelope = converge::Envelope {
            event_id: event.event_id,
            aggregate_type: &event.aggregate_type,
            aggregate_id: &event.aggregate_id,
            version: event.version,
            event_type: &event.event_type,
            schema_version: event.schema_version,
            occurred_at: event.occurred_at,
            traceparent: None,
            headers: event
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
        };
        let message = async_nats::jetstream::message::PublishMessage::build()
            .headers(envelope.header_map(&event.event_id.to_string()))
            .payload(serde_json::to_vec(&event.payload).unwrap().into());
        let subject = format!(
            "{}.{}.{}",
            env.prefix, event.aggregate_type, event.event_type
        );
        env.js
            .send_publish(subject, message)
            .await
            .unwrap()
            .await
            .unwrap();
    }
    mark_published(env).await;
}

/// Registers a live worker row for `app` with the test's stream.
async fn register(env: &TestEnv, app: &str) {
    sqlx::query(
        "INSERT INTO converge.workers (instance, application, stream, stream_prefix, consumers) \
         VALUES ($1, $2, $3, $4, ARRAY['ghost', $5])",
    )
    .bind(format!("{app}-w1"))
    .bind(app)
    .bind(&env.stream)
    .bind(&env.prefix)
    // A consumer on another stream, named as workers register them.
    .bind(format!("NOSUCH_{app}/named"))
    .execute(&env.pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn outbox_list_filters_by_aggregate_event_time_and_state() {
    let env = TestEnv::new().await;
    append(
        &env,
        &[
            ev("order", "1", "Placed", 1),
            ev("order", "1", "Shipped", 2),
            ev("order", "2", "Placed", 3),
            ev("customer", "1", "Joined", 4),
        ],
    )
    .await;
    let all = converge(&env, &["outbox", "list", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(all.as_array().unwrap().len(), 4);
    assert!(all
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["status"] == "pending"));
    assert_eq!(all[1]["payload"]["n"], 2);
    assert_eq!(all[1]["headers"]["X-Tenant"], "acme");

    let count = |args: Vec<&'static str>| {
        let env = &env;
        async move {
            let mut full = vec!["outbox", "list", "--json"];
            full.extend(args);
            converge(env, &full)
                .await
                .expect(0)
                .json()
                .as_array()
                .unwrap()
                .len()
        }
    };
    assert_eq!(count(vec!["--aggregate-type", "order"]).await, 3);
    assert_eq!(
        count(vec!["--aggregate-type", "order", "--aggregate-id", "1"]).await,
        2
    );
    assert_eq!(count(vec!["--event-type", "Placed"]).await, 2);
    assert_eq!(count(vec!["--since", "1h"]).await, 4);
    assert_eq!(count(vec!["--until", "1h"]).await, 0);
    assert_eq!(count(vec!["--since", "2020-01-01T00:00:00Z"]).await, 4);
    assert_eq!(count(vec!["--limit", "3"]).await, 3);
    assert_eq!(count(vec!["--unpublished"]).await, 4);
    mark_published(&env).await;
    assert_eq!(count(vec!["--unpublished"]).await, 0);

    let run = converge(&env, &["outbox", "list", "--aggregate-type", "order"])
        .await
        .expect(0);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("AGGREGATE"),
        "{run:#?}"
    );
    assert_eq!(lines.len(), 4, "{run:#?}");
    assert!(
        lines[2].contains("order/1") && lines[2].contains("Shipped"),
        "{run:#?}"
    );
    assert!(lines[2].contains("published"), "{run:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_backlog_the_transaction_holding_the_relay_leases_and_dead_letters() {
    let env = TestEnv::new().await;
    append(
        &env,
        &[ev("order", "1", "Placed", 1), ev("order", "2", "Placed", 2)],
    )
    .await;
    sqlx::query(
        "INSERT INTO converge.leases (name, holder, token, acquired_at, heartbeat_at, lock_until) \
         VALUES ('invoices', 'w1', 3, now(), now(), now() + interval '1 hour'), \
                ('stale', 'w2', 1, now(), now(), now() - interval '1 hour')",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO converge.dead_letters (reconciler, aggregate_key, path, error, permanent, attempts) \
         VALUES ('invoicing', '7', 'event', 'boom', true, 1), ('invoicing', '8', 'sweep', 'boom', false, 5)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let app = common::app();
    register(&env, &app).await;
    // A transaction with an xid, left open: the relay cannot read past it.
    let mut open = env.pool.begin().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *open)
        .await
        .unwrap();
    let xact_start: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT xact_start FROM pg_stat_activity WHERE pid = pg_backend_pid()")
            .fetch_one(&mut *open)
            .await
            .unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *open)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;

    let report = converge(&env, &["status", "--json"]).await.expect(0).json();
    assert_eq!(report["outbox"]["backlog"], 2, "{report:#}");
    assert!(
        report["outbox"]["oldest_unpublished_age_secs"]
            .as_f64()
            .unwrap()
            >= 6.0
    );
    // Ours, or an older one of another test on this shared server.
    let holder = &report["holding_transaction"];
    assert!(holder["age_secs"].as_f64().unwrap() >= 6.0, "{report:#}");
    let started =
        chrono::DateTime::parse_from_rfc3339(holder["started_at"].as_str().unwrap()).unwrap();
    assert!(holder["pid"] == pid || started <= xact_start, "{report:#}");
    if holder["pid"] == pid {
        assert_eq!(holder["database"], env.db_name.as_str(), "{report:#}");
        assert_eq!(holder["state"], "idle in transaction", "{report:#}");
        assert_eq!(holder["prepared"], false, "{report:#}");
        assert!(
            holder["xid"].as_str().is_some_and(|x| !x.is_empty()),
            "{report:#}"
        );
    }
    assert_eq!(report["leases"].as_array().unwrap().len(), 1, "{report:#}");
    assert_eq!(report["leases"][0]["holder"], "w1");
    assert_eq!(report["dead_letters"][0]["reconciler"], "invoicing");
    assert_eq!(report["dead_letters"][0]["open"], 2);
    assert_eq!(report["workers"][0]["application"], app.as_str());
    assert_eq!(report["unowned_partitions"].as_array().unwrap().len(), 32);
    let consumer = &report["consumers"][0];
    assert_eq!(consumer["consumer"], "ghost");
    assert_eq!(
        consumer["stream"],
        env.stream.as_str(),
        "a bare name is on the worker's stream"
    );
    assert!(
        consumer["error"].as_str().unwrap().contains("missing"),
        "{report:#}"
    );
    let consumer = &report["consumers"][1];
    assert_eq!(consumer["consumer"], "named");
    assert_eq!(consumer["stream"], format!("NOSUCH_{app}"));
    assert!(
        consumer["error"]
            .as_str()
            .unwrap()
            .contains("stream NOSUCH_"),
        "{report:#}"
    );

    let run = converge(&env, &["status"]).await.expect(0);
    for needle in [
        "backlog 2 events",
        "holds the relays back",
        "no relay running",
        "invoicing",
        "LEASES",
        "w1",
    ] {
        assert!(
            run.stdout.contains(needle),
            "{needle:?} missing: {}",
            run.stdout
        );
    }
    assert!(
        !run.stdout.contains("stale"),
        "a lapsed lease is not held: {}",
        run.stdout
    );
    open.rollback().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_republishes_published_events_in_order_and_skips_unpublished_ones() {
    let env = TestEnv::new().await;
    let app = common::app();
    register(&env, &app).await;
    append(
        &env,
        &[
            ev("order", "1", "Placed", 1),
            ev("order", "2", "Placed", 2),
            ev("order", "1", "Shipped", 3),
        ],
    )
    .await;
    // Published as the relay does it (not by a Relay: on a shared server another
    // test's open transaction can hold every relay back for minutes).
    publish_like_the_relay(&env).await;
    let first = env.read_stream(3, Duration::from_secs(20)).await;
    assert_eq!(first.len(), 3);
    append(&env, &[ev("order", "3", "Placed", 4)]).await; // not published yet

    let dry = converge(&env, &["outbox", "replay", "--app", &app, "--dry-run"])
        .await
        .expect(0);
    assert!(dry.stdout.contains("would replay 3 events"), "{dry:#?}");
    assert!(
        dry.stdout
            .contains(&format!("{}.order.Shipped", env.prefix)),
        "{dry:#?}"
    );
    assert!(
        dry.stdout
            .contains("skipped 1 matching events the relay has not published"),
        "{dry:#?}"
    );
    assert_eq!(audit_rows(&env).await, 0, "a dry run is not an action");

    let run = converge(
        &env,
        &[
            "outbox",
            "replay",
            "--app",
            &app,
            "--reason",
            "lost invoices",
        ],
    )
    .await
    .expect(0);
    assert!(run.stdout.contains("replayed 3 events"), "{run:#?}");
    let (actor, action, target, reason, details, outcome) = last_audit(&env).await;
    assert_eq!(
        (actor.as_str(), action.as_str()),
        ("tester", "outbox.replay")
    );
    assert_eq!(target, "all events");
    assert_eq!(reason.as_deref(), Some("lost invoices"));
    assert_eq!(details["sent"], 3);
    assert_eq!(details["skipped_unpublished"], 1);
    assert_eq!(outcome.as_deref(), Some("ok"));
    let audit_id: i64 = sqlx::query_scalar("SELECT max(id) FROM converge.audit")
        .fetch_one(&env.pool)
        .await
        .unwrap();

    let all = env.read_stream(6, Duration::from_secs(20)).await;
    assert_eq!(
        all.len(),
        6,
        "the replay is on the stream, not dropped as duplicates"
    );
    let replayed = &all[3..];
    for (original, again) in first.iter().zip(replayed) {
        assert_eq!(again.subject, original.subject);
        assert_eq!(again.payload, original.payload);
        assert_eq!(
            again.msg_id,
            format!("{}:replay:{audit_id}", original.msg_id)
        );
        assert_eq!(again.headers["Converge-Event-Id"], original.msg_id);
        assert_eq!(again.headers["Converge-Replay"], audit_id.to_string());
        assert_eq!(again.headers["X-Tenant"], "acme");
        for h in [
            "Converge-Aggregate-Version",
            "Converge-Occurred-At",
            "Converge-Event-Type",
        ] {
            assert_eq!(again.headers[h], original.headers[h], "{h}");
        }
    }

    // Filtered, by the stream named on the command line, as JSON.
    let run = converge(
        &env,
        &[
            "outbox",
            "replay",
            "--stream",
            &env.stream,
            "--aggregate-id",
            "1",
            "--json",
        ],
    )
    .await
    .expect(0);
    assert_eq!(run.json()["replayed"], 2);
    let all = env.read_stream(8, Duration::from_secs(20)).await;
    assert_eq!(all[6].version, 1);
    assert_eq!(all[7].version, 2);

    let run = converge(
        &env,
        &[
            "outbox", "replay", "--stream", "NOPE_X", "--prefix", "x", "--yes",
        ],
    )
    .await
    .expect(2);
    assert!(run.stderr.contains("does not exist"), "{run:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_replay_needs_yes_and_a_failure_midway_is_reported_exactly() {
    let env = TestEnv::new().await;
    let events: Vec<Ev> = (0..1001)
        .map(|i| ev("order", &i.to_string(), "Placed", i))
        .collect();
    let outbox = Outbox::default();
    let mut tx = env.pool.begin().await.unwrap();
    outbox.append_all(&mut tx, &events).await.unwrap();
    tx.commit().await.unwrap();
    mark_published(&env).await;
    let run = converge(
        &env,
        &["outbox", "replay", "--stream", "S", "--prefix", "p"],
    )
    .await
    .expect(2);
    assert!(
        run.stderr.contains("refusing to replay 1001 events"),
        "{run:#?}"
    );
    assert!(run.stderr.contains("--yes"), "{run:#?}");
    assert_eq!(audit_rows(&env).await, 0);

    // A stream that takes two messages and refuses the third.
    env.js
        .create_stream(async_nats::jetstream::stream::Config {
            name: env.stream.clone(),
            subjects: vec![format!("{}.>", env.prefix)],
            max_messages: 2,
            discard: async_nats::jetstream::stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .unwrap();
    let third: i64 =
        sqlx::query_scalar("SELECT id FROM converge.outbox ORDER BY tx_order, id OFFSET 2 LIMIT 1")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    let run = converge(
        &env,
        &[
            "outbox",
            "replay",
            "--stream",
            &env.stream,
            "--prefix",
            &env.prefix,
            "--yes",
            "--batch",
            "1",
        ],
    )
    .await
    .expect(1);
    assert!(
        run.stderr.contains("2 of 1001 events were sent"),
        "{run:#?}"
    );
    assert!(
        run.stderr
            .contains(&format!("first event not sent: outbox id {third} ")),
        "{run:#?}"
    );
    assert!(
        run.stderr
            .contains("may resend events of other aggregates from the same batch"),
        "{run:#?}"
    );
    let (_, _, _, _, details, outcome) = last_audit(&env).await;
    assert_eq!(outcome.as_deref(), Some("partial"));
    assert_eq!(details["sent"], 2);
}

/// After a restore into another cluster (simulated: the clock names a cluster
/// this is not), appends are refused until `converge migrate` re-bases the
/// outbox, which says so.
#[tokio::test]
async fn migrate_rebases_an_outbox_restored_from_another_cluster_and_says_so() {
    let env = TestEnv::new().await;
    let outbox = Outbox::default();
    let mut tx = env.pool.begin().await.unwrap();
    outbox
        .append(&mut tx, &ev("order", "1", "Shipped", 1))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    sqlx::query("UPDATE converge.outbox_clock SET system_identifier = 42")
        .execute(&env.pool)
        .await
        .unwrap();
    // A new session: the cluster check runs once per session.
    let pool = sqlx::PgPool::connect_with(env.connect_options())
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let err = outbox
        .append(&mut tx, &ev("order", "1", "Shipped", 2))
        .await
        .unwrap_err();
    assert!(
        matches!(err, converge::OutboxError::ForeignCluster { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("converge migrate"), "{err}");
    tx.rollback().await.unwrap();

    let run = converge(&env, &["migrate"]).await.expect(0);
    assert!(run.stdout.contains("re-based the outbox"), "{run:?}");
    assert!(run.stdout.contains("was 42"), "{run:?}");
    let mut tx = pool.begin().await.unwrap();
    let appended = outbox
        .append(&mut tx, &ev("order", "1", "Shipped", 2))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(appended.version, 2);
    // Nothing to do the second time.
    let run = converge(&env, &["migrate"]).await.expect(0);
    assert!(!run.stdout.contains("re-based"), "{run:?}");
}
