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
