//! The relay against real PostgreSQL and real NATS JetStream: exactly once on
//! the stream, per-aggregate order, late commits never skipped, several
//! instances, take-over, poison rows, and bad stream settings.

use std::collections::HashSet;
use std::time::Duration;

use converge::{DomainEvent, Outbox, Relay, RelayError};
use converge_tests::{assert_once_in_order, TestEnv};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
struct Changed {
    id: String,
    n: u32,
}

impl DomainEvent for Changed {
    fn aggregate_type(&self) -> &str {
        "account"
    }
    fn aggregate_id(&self) -> String {
        self.id.clone()
    }
    fn event_type(&self) -> &str {
        "Changed"
    }
}

async fn append(env: &TestEnv, id: &str, n: u32) {
    let mut tx = env.pool.begin().await.unwrap();
    Outbox::default()
        .append(&mut tx, &Changed { id: id.into(), n })
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn published(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT coalesce(sum(published), 0)::bigint FROM converge.relay_partitions")
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

async fn wait_published(env: &TestEnv, n: i64, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while published(env).await < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay did not publish {n} events in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn publishes_committed_events_once_with_headers_and_subjects() {
    let env = TestEnv::new().await;
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    for n in 1..=3 {
        append(&env, "acc-1", n).await;
    }
    let mut tx = env.pool.begin().await.unwrap();
    Outbox::default()
        .append(
            &mut tx,
            &Changed {
                id: "rolled-back".into(),
                n: 0,
            },
        )
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let messages = env.read_stream(3, Duration::from_secs(10)).await;
    assert_once_in_order(&messages, 3);
    let m = &messages[0];
    assert_eq!(m.subject, format!("{}.account.Changed", env.prefix));
    assert_eq!(m.headers["Converge-Aggregate-Type"], "account");
    assert_eq!(m.headers["Converge-Event-Type"], "Changed");
    assert_eq!(m.headers["Converge-Event-Id"], m.msg_id);
    assert_eq!(m.payload, serde_json::json!({"id": "acc-1", "n": 1}));
    let history = Outbox::history(&env.pool, "account", "acc-1", 0, 10)
        .await
        .unwrap();
    assert_eq!(
        history[0].event_id.to_string(),
        m.msg_id,
        "Nats-Msg-Id is the event id"
    );

    relay.shutdown().await.unwrap();
    // A restarted relay resumes at the cursor and sends nothing again.
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    append(&env, "acc-1", 4).await;
    let messages = env.read_stream(4, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_once_in_order(&env.read_stream(4, Duration::ZERO).await, 4);
    assert_eq!(messages.len(), 4);
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_transaction_committing_late_is_never_skipped() {
    let env = TestEnv::new().await;
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    let outbox = Outbox::default();

    // A begins first (lower position), B and C commit before it.
    let mut a = env.pool.begin().await.unwrap();
    outbox
        .append(
            &mut a,
            &Changed {
                id: "a".into(),
                n: 1,
            },
        )
        .await
        .unwrap();
    append(&env, "b", 1).await;
    append(&env, "c", 1).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    // While A is open, nothing after it may be marked published past it.
    let early = published(&env).await;
    a.commit().await.unwrap();
    append(&env, "d", 1).await;

    let messages = env.read_stream(4, Duration::from_secs(10)).await;
    assert_once_in_order(&messages, 4);
    let got: HashSet<&str> = messages.iter().map(|m| m.aggregate_id.as_str()).collect();
    assert_eq!(
        got,
        HashSet::from(["a", "b", "c", "d"]),
        "the late commit was skipped"
    );
    assert_eq!(
        early, 0,
        "events committed after an open transaction's append were published before it"
    );
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn interleaved_out_of_order_commits_under_load_lose_nothing() {
    let env = TestEnv::new().await;
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    // 8 writers, each holding its transaction open for a random moment, so
    // positions are assigned in one order and committed in another.
    let writers = (0..8).map(|w| {
        let pool = env.pool.clone();
        tokio::spawn(async move {
            let outbox = Outbox::default();
            for i in 0..40u32 {
                let mut tx = pool.begin().await.unwrap();
                outbox
                    .append(
                        &mut tx,
                        &Changed {
                            id: format!("w{w}-{}", i % 5),
                            n: i,
                        },
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(u64::from((i * 7 + w * 3) % 11))).await;
                tx.commit().await.unwrap();
            }
        })
    });
    for w in futures::future::join_all(writers).await {
        w.unwrap();
    }
    let messages = env.read_stream(320, Duration::from_secs(20)).await;
    assert_once_in_order(&messages, 320);
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn several_relays_share_partitions_and_keep_order() {
    let env = TestEnv::new().await;
    let mut relays = Vec::new();
    for i in 0..3 {
        let mut c = env.relay_config();
        c.instance_name = format!("relay-{i}");
        c.batch_size = 50;
        relays.push(
            Relay::new(env.pool.clone(), env.nats.clone(), c)
                .start()
                .await
                .unwrap(),
        );
    }
    // Let the heartbeat rebalance: 32 partitions over 3 instances.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let shares: Vec<usize> = relays.iter().map(|r| r.partitions().len()).collect();
        if shares.iter().all(|s| *s >= 10) && shares.iter().sum::<usize>() == 32 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "partitions never balanced: {shares:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let writers = (0..4).map(|w| {
        let pool = env.pool.clone();
        tokio::spawn(async move {
            let outbox = Outbox::default();
            for i in 0..150u32 {
                let mut tx = pool.begin().await.unwrap();
                outbox
                    .append(
                        &mut tx,
                        &Changed {
                            id: format!("acc-{}", (i + w) % 40),
                            n: i,
                        },
                    )
                    .await
                    .map(|_| ())
                    .or_else(|e| if e.is_retryable() { Ok(()) } else { Err(e) })
                    .unwrap();
                let _ = tx.commit().await;
            }
        })
    });
    for w in futures::future::join_all(writers).await {
        w.unwrap();
    }
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.outbox")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let messages = env
        .read_stream(total as usize, Duration::from_secs(20))
        .await;
    assert_once_in_order(&messages, total as usize);
    let owners: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT owner_id) FROM converge.relay_partitions WHERE published > 0",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(owners, 3, "every instance should have published");
    for r in relays {
        r.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn a_dead_instance_is_taken_over_within_its_lease() {
    let env = TestEnv::new().await;
    let first = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    let second = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The first instance dies without handing anything back.
    first.kill().await;
    for i in 0..200 {
        append(&env, &format!("acc-{i}"), 1).await;
    }
    // Lease 2 s + heartbeat 0.3 s: the second instance owns everything soon after.
    let started = tokio::time::Instant::now();
    wait_published(&env, 200, Duration::from_secs(15)).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(second.partitions().len(), 32);
    let messages = env.read_stream(200, Duration::from_secs(5)).await;
    assert_once_in_order(&messages, 200);
    second.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_hands_partitions_back() {
    let env = TestEnv::new().await;
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    assert_eq!(
        relay.partitions().len(),
        32,
        "a lone relay claims every partition at start"
    );
    relay.shutdown().await.unwrap();
    let (owned, instances): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM converge.relay_partitions WHERE owner_id IS NOT NULL), \
                (SELECT count(*) FROM converge.relay_instances)",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((owned, instances), (0, 0));
}

#[tokio::test]
async fn poison_rows_written_by_raw_sql_are_rejected_and_block_nothing() {
    let env = TestEnv::new().await;
    append(&env, "before", 1).await;
    // Around the API: a subject-breaking event type, and an oversized payload.
    sqlx::query(
        "INSERT INTO converge.outbox (partition, tx_order, aggregate_type, aggregate_id, version, event_type, payload) \
         VALUES (converge.partition_of('account', 'poison'), converge.tx_order(), 'account', 'poison', 1, 'bad.type', '{}'), \
                (converge.partition_of('account', 'huge'), converge.tx_order(), 'account', 'huge', 1, 'Changed', json_build_object('x', repeat('x', 2000000)))",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    append(&env, "after", 1).await;
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    let messages = env.read_stream(2, Duration::from_secs(10)).await;
    wait_published(&env, 4, Duration::from_secs(10)).await;
    let ids: Vec<&str> = messages.iter().map(|m| m.aggregate_id.as_str()).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&"before") && ids.contains(&"after"), "{ids:?}");
    let rejects: Vec<(String, String)> = sqlx::query_as(
        "SELECT o.aggregate_id, r.reason FROM converge.relay_rejects r \
         JOIN converge.outbox o ON o.event_id = r.event_id ORDER BY o.aggregate_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(rejects.len(), 2, "{rejects:?}");
    assert_eq!(rejects[0].0, "huge");
    assert!(rejects[0].1.contains("max_payload"), "{}", rejects[0].1);
    assert_eq!(rejects[1].0, "poison");
    assert!(rejects[1].1.contains("subject token"), "{}", rejects[1].1);
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_incompatible_existing_stream_is_a_clear_error_and_left_unchanged() {
    let env = TestEnv::new().await;
    env.js
        .create_stream(async_nats::jetstream::stream::Config {
            name: env.stream.clone(),
            subjects: vec![format!("{}.other.>", env.prefix)],
            duplicate_window: Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(err, RelayError::IncompatibleStream { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("subjects") && text.contains("duplicate_window"),
        "{text}"
    );
    let info = env
        .js
        .get_stream(&env.stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(
        info.duplicate_window,
        Duration::from_secs(1),
        "the stream was changed"
    );
}

#[tokio::test]
async fn bad_relay_configuration_is_rejected_with_the_reason() {
    let env = TestEnv::new().await;
    let mut c = env.relay_config();
    c.heartbeat_interval = c.lease_ttl;
    let err = Relay::new(env.pool.clone(), env.nats.clone(), c)
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("heartbeat_interval"), "{err}");

    let mut c = env.relay_config();
    c.stream = converge::StreamConfig::new("has space", "p");
    let err = Relay::new(env.pool.clone(), env.nats.clone(), c)
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("stream name"), "{err}");

    let mut c = env.relay_config();
    c.max_event_bytes = 64 * 1024 * 1024;
    let err = Relay::new(env.pool.clone(), env.nats.clone(), c)
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("max_payload"), "{err}");
}

#[tokio::test]
async fn retention_deletes_published_events_older_than_the_period_and_keeps_versions() {
    let env = TestEnv::new().await;
    for n in 1..=3 {
        append(&env, "a", n).await;
    }
    append(&env, "b", 1).await;
    sqlx::query("UPDATE converge.outbox SET recorded_at = now() - interval '1 hour'")
        .execute(&env.pool)
        .await
        .unwrap();
    append(&env, "c", 1).await; // inside the period
    let mut c = env.relay_config();
    c.retention = converge::Retention::For(Duration::from_secs(60));
    c.cleanup_interval = Duration::from_millis(200);
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), c)
        .start()
        .await
        .unwrap();
    wait_published(&env, 5, Duration::from_secs(10)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<(String, i64)> = sqlx::query_as(
            "SELECT aggregate_id, version FROM converge.outbox ORDER BY aggregate_id, version",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap();
        if left == vec![("c".to_string(), 1)] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cleanup left {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Versions continue after clean-up, from the aggregate's head.
    let mut tx = env.pool.begin().await.unwrap();
    let a = Outbox::default()
        .append(
            &mut tx,
            &Changed {
                id: "a".into(),
                n: 4,
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(a.version, 4);
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_idle_relay_is_woken_at_commit_not_at_its_next_poll() {
    let env = TestEnv::new().await;
    let mut c = env.relay_config();
    c.poll_interval = Duration::from_secs(30);
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), c)
        .start()
        .await
        .unwrap();
    // Idle: the relay arms notifications.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let armed: bool = sqlx::query_scalar(
            "SELECT coalesce(bool_or(armed), false) FROM converge.relay_instances",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        if armed {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "an idle relay never armed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = tokio::time::Instant::now();
    append(&env, "wake", 1).await;
    let messages = env.read_stream(1, Duration::from_secs(10)).await;
    assert_eq!(messages.len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the event waited for the 30 s poll: {:?}",
        started.elapsed()
    );
    relay.shutdown().await.unwrap();
}

/// A stream the server refuses to create (more replicas than servers; its
/// subjects overlapping another stream's) fails the start naming it, instead
/// of trying to create it again at once, forever (seen: the start never
/// returned).
#[tokio::test]
async fn a_stream_the_server_refuses_to_create_fails_the_start_naming_why() {
    let env = TestEnv::new().await;
    let mut config = env.relay_config();
    config.stream.replicas = 3;
    let started = tokio::time::timeout(
        Duration::from_secs(30),
        Relay::new(env.pool.clone(), env.nats.clone(), config).start(),
    )
    .await
    .expect("the start returns");
    let err = started.unwrap_err();
    assert!(
        matches!(err, RelayError::StreamNotCreated { replicas: 3, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("3 replicas"), "{err}");

    // Another stream already captures part of these subjects.
    env.js
        .create_stream(async_nats::jetstream::stream::Config {
            name: format!("{}_OTHER", env.stream),
            subjects: vec![format!("{}.account.>", env.prefix)],
            ..Default::default()
        })
        .await
        .unwrap();
    let started = tokio::time::timeout(
        Duration::from_secs(30),
        Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config()).start(),
    )
    .await
    .expect("the start returns");
    let err = started.unwrap_err();
    assert!(
        matches!(err, RelayError::StreamNotCreated { .. }),
        "{err:?}"
    );
    let _ = env.js.delete_stream(format!("{}_OTHER", env.stream)).await;
}
