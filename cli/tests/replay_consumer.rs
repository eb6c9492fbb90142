//! `converge outbox replay` reaching a running worker's consumer again: the
//! relay published the events once, the consumer reconciled them; the replay
//! publishes them again past the stream's duplicate window and the consumer
//! sees each one a second time, with the same event id.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::orders::Shipped;
use common::{converge, last_audit};
use converge::handlers::{ConsumerConfig, Context, Outcome, ReconcileError, Reconciler, Trigger};
use converge::{Outbox, Worker};
use converge_tests::TestEnv;

/// Records every event-path delivery: (key, event id, replay header).
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(String, String, Option<String>)>>,
}

impl Reconciler for Recorder {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        if let Trigger::Event(hint) = ctx.trigger() {
            self.seen.lock().unwrap().push((
                key.to_owned(),
                hint.event_id.to_string(),
                hint.headers.get("Converge-Replay").cloned(),
            ));
        }
        Ok(Outcome::Unchanged)
    }
}

impl Recorder {
    async fn wait_for(&self, n: usize) -> Vec<(String, String, Option<String>)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let seen = self.seen.lock().unwrap().clone();
            if seen.len() >= n {
                return seen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {n} deliveries: {seen:?}",
                seen.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_reaches_the_running_consumer_again() {
    let env = TestEnv::new().await;
    let app = common::app();
    let recorder = Arc::new(Recorder::default());
    let subject = format!("{}.order.Shipped", env.prefix);
    let worker = Worker::new(env.pool.clone(), env.nats.clone(), app.as_str())
        .instance_name(format!("{app}-w1"))
        .relay(env.relay_config())
        .consumer(
            ConsumerConfig::new("recorder", env.stream.clone(), subject),
            recorder.clone(),
        )
        .shutdown_timeout(Duration::from_secs(10))
        .start()
        .await
        .expect("worker starts");

    let outbox = Outbox::default();
    for id in 1..=3 {
        let mut tx = env.pool.begin().await.unwrap();
        outbox.append(&mut tx, &Shipped { id }).await.unwrap();
        tx.commit().await.unwrap();
    }
    let first = recorder.wait_for(3).await;
    assert!(
        first.iter().all(|(_, _, replay)| replay.is_none()),
        "{first:?}"
    );
    // Wait for the relay to record all three as published (replay skips the rest).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let published: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(published), 0)::bigint FROM converge.relay_partitions",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        if published == 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay recorded {published}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Within the stream's duplicate window: a plain re-publish would be dropped.
    let run = converge(
        &env,
        &[
            "outbox",
            "replay",
            "--yes",
            "--app",
            &app,
            "--reason",
            "lost invoices",
        ],
    )
    .await
    .expect(0);
    assert!(run.stdout.contains("replayed 3 events"), "{run:#?}");

    let all = recorder.wait_for(6).await;
    let again = &all[3..];
    let (_, action, _, _, _, outcome) = last_audit(&env).await;
    assert_eq!(
        (action.as_str(), outcome.as_deref()),
        ("outbox.replay", Some("ok"))
    );
    for (key, event_id, replay) in again {
        assert!(replay.is_some(), "a replayed delivery is marked: {again:?}");
        assert!(
            first.iter().any(|(k, e, _)| k == key && e == event_id),
            "the replay carries the original event id of key {key}: {first:?} / {again:?}"
        );
    }
    let mut keys: Vec<&str> = again.iter().map(|(k, _, _)| k.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        vec!["1", "2", "3"],
        "each event reached the consumer once more"
    );
    worker.shutdown().await.unwrap();
}

/// Version 3 of a price: cents and a currency.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Priced {
    cents: i64,
    currency: String,
}

impl converge::Event for Priced {
    const AGGREGATE_TYPE: &'static str = "order";
    const EVENT_TYPE: &'static str = "Priced";
    const SCHEMA_VERSION: u32 = 3;
    fn aggregate_id(&self) -> String {
        String::new()
    }
}

/// One delivery: the published schema version, the decoded price (or the
/// error), whether it was a replay.
type PriceSeen = (u32, Result<Priced, String>, bool);

#[derive(Default)]
struct PriceReader {
    seen: Mutex<Vec<PriceSeen>>,
}

impl Reconciler for PriceReader {
    async fn reconcile(&self, ctx: &Context, _key: &str) -> Result<Outcome, ReconcileError> {
        if let Trigger::Event(hint) = ctx.trigger() {
            let decoded = match ctx.event::<Priced>() {
                Ok(Some(p)) => Ok(p),
                Ok(None) => Err("not a Priced".to_owned()),
                Err(e) => Err(e.to_string()),
            };
            self.seen.lock().unwrap().push((
                hint.schema_version,
                decoded,
                hint.headers.contains_key("Converge-Replay"),
            ));
        }
        Ok(Outcome::Unchanged)
    }
}

/// An event stored at schema version 2, replayed: the replay carries the
/// stored version, so the consumer brings it to version 3 like the first
/// delivery (read as version 1, the 1→2 upcaster would refuse it).
#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_old_event_is_read_in_its_current_shape() {
    let env = TestEnv::new().await;
    let app = common::app();
    let reader = Arc::new(PriceReader::default());
    let upcasters = converge::Upcasters::new()
        .add::<Priced>(1, |mut v| {
            let euros = v["euros"].as_i64().ok_or("euros is not a number")?;
            v["cents"] = serde_json::json!(euros * 100);
            Ok(v)
        })
        .add::<Priced>(2, |mut v| {
            v["currency"] = serde_json::json!("EUR");
            Ok(v)
        });
    let mut config = ConsumerConfig::new(
        "prices",
        env.stream.clone(),
        format!("{}.order.Priced", env.prefix),
    );
    config.upcasters = upcasters;
    let worker = Worker::new(env.pool.clone(), env.nats.clone(), app.as_str())
        .instance_name(format!("{app}-w1"))
        .relay(env.relay_config())
        .consumer(config, reader.clone())
        .start()
        .await
        .expect("worker starts");
    sqlx::query(
        "SELECT converge.append('order', '7', 'Priced', '{\"cents\": 5}', schema_version => 2)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let wait = |n: usize| {
        let reader = reader.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let seen = reader.seen.lock().unwrap().clone();
                if seen.len() >= n {
                    return seen;
                }
                assert!(tokio::time::Instant::now() < deadline, "{seen:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait(1).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while sqlx::query_scalar::<_, i64>(
        "SELECT coalesce(sum(published), 0)::bigint FROM converge.relay_partitions",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap()
        < 1
    {
        assert!(tokio::time::Instant::now() < deadline, "never published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let run = converge(
        &env,
        &[
            "outbox", "replay", "--yes", "--app", &app, "--reason", "prices",
        ],
    )
    .await
    .expect(0);
    assert!(run.stdout.contains("replayed 1 event"), "{run:#?}");
    let seen = wait(2).await;
    worker.shutdown().await.unwrap();
    let price = Priced {
        cents: 5,
        currency: "EUR".into(),
    };
    assert_eq!(
        seen,
        [(2, Ok(price.clone()), false), (2, Ok(price), true)],
        "both deliveries read version 2 as version 3"
    );
}
