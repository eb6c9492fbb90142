//! `converge partitions set N` against a real PostgreSQL and NATS: the
//! relay partition count changed while events are appended and relays
//! publish, with per-aggregate order and exactly-once checked on the stream.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::converge;
use converge::{Outbox, Relay};
use converge_tests::{append_changed, assert_once_in_order, AccountChanged, TestEnv};

async fn outbox_count(env: &TestEnv) -> usize {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM converge.outbox")
        .fetch_one(&env.pool)
        .await
        .unwrap() as usize
}

/// Aggregates whose events are not all in one partition.
async fn split_aggregates(env: &TestEnv) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT aggregate_id FROM converge.outbox GROUP BY aggregate_id \
         HAVING count(DISTINCT partition) > 1 ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

/// Appends round after round to `ids` (one event per transaction, and every
/// fifth round the batch statement) until `stop`.
fn appender(
    env: &TestEnv,
    ids: Vec<String>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    let pool = env.pool.clone();
    tokio::spawn(async move {
        let mut n = 0;
        let mut round = 0;
        while !stop.load(Ordering::Relaxed) {
            round += 1;
            if round % 5 == 0 {
                let events: Vec<AccountChanged> =
                    ids.iter().take(10).map(AccountChanged::new).collect();
                let mut tx = pool.begin().await.unwrap();
                Outbox::default()
                    .append_all(&mut tx, &events)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                n += events.len() as u64;
            }
            for id in &ids {
                append_changed(&pool, id).await.unwrap();
                n += 1;
            }
        }
        n
    })
}

#[tokio::test]
async fn the_count_grows_and_shrinks_while_appends_and_two_relays_run() {
    let env = TestEnv::new().await;
    let relays = [
        Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
            .start()
            .await
            .unwrap(),
        Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
            .start()
            .await
            .unwrap(),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let appenders: Vec<_> = (0..3)
        .map(|t| {
            let ids = (0..40).map(|i| format!("a{t}-{i}")).collect();
            appender(&env, ids, stop.clone())
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let grown = converge(&env, &["--json", "partitions", "set", "64"])
        .await
        .expect(0)
        .json();
    assert_eq!(grown["previous"], 32, "{grown}");
    assert!(
        grown["moved"].as_u64().unwrap() > 0,
        "nothing moved: {grown}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let shrunk = converge(&env, &["--json", "partitions", "set", "8"])
        .await
        .expect(0)
        .json();
    assert!(
        shrunk["moved"].as_u64().unwrap() > 0,
        "nothing moved: {shrunk}"
    );
    assert_eq!(shrunk["unpublished"], 0, "{shrunk}");
    // Partitions 8..63 holding events are kept (published, and stored until
    // retention deletes them), the others removed; none gets a new event.
    let kept = shrunk["kept"].as_array().unwrap().len();
    assert!(kept > 0, "{shrunk}");
    assert_eq!(
        kept + shrunk["removed"].as_array().unwrap().len(),
        56,
        "{shrunk}"
    );
    let before_last: i64 = sqlx::query_scalar("SELECT max(id) FROM converge.outbox")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut appended = 0;
    for a in appenders {
        appended += a.await.unwrap();
    }

    let total = outbox_count(&env).await;
    assert_eq!(total as u64, appended);
    let messages = env.read_stream(total, Duration::from_secs(60)).await;
    assert_once_in_order(&messages, total);
    let late_in_retired: i64 =
        sqlx::query_scalar("SELECT count(*) FROM converge.outbox WHERE id > $1 AND partition >= 8")
            .bind(before_last)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        late_in_retired, 0,
        "events appended after the shrink in retired partitions"
    );
    let misplaced: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM converge.outbox_heads \
         WHERE partition IS DISTINCT FROM converge.partition_of(aggregate_type, aggregate_id) \
            OR partition >= 8",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(misplaced, 0);
    for r in relays {
        r.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn an_aggregate_with_unpublished_events_stays_until_they_are_published() {
    let env = TestEnv::new().await;
    let ids: Vec<String> = (0..100).map(|i| format!("w{i}")).collect();
    for _ in 0..3 {
        for id in &ids {
            append_changed(&env.pool, id).await.unwrap();
        }
    }
    // No relay runs: nothing is published, so nothing may move.
    let run = converge(&env, &["partitions", "set", "64", "--timeout", "2"])
        .await
        .expect(1);
    let shown = converge(&env, &["--json", "partitions", "show"])
        .await
        .expect(0)
        .json();
    assert_eq!(shown["partitions"], 64, "{shown}");
    let to_move = shown["aggregates_to_move"].as_i64().unwrap();
    assert!(to_move > 30, "{shown}");
    assert!(
        run.stderr
            .contains(&format!("{to_move} aggregates still wait to move")),
        "{run:?}"
    );
    // Each of the three ways to append puts the event where the head says.
    for (i, id) in ids.iter().enumerate() {
        match i % 3 {
            0 => {
                append_changed(&env.pool, id).await.unwrap();
            }
            1 => {
                sqlx::query("SELECT converge.append('account', $1, 'Changed', '{}')")
                    .bind(id)
                    .execute(&env.pool)
                    .await
                    .unwrap();
            }
            _ => {
                sqlx::query(
                    "INSERT INTO converge.outbox (event_id, aggregate_type, aggregate_id, \
                     event_type, payload) VALUES (gen_random_uuid(), 'account', $1, 'Changed', '{}')",
                )
                .bind(id)
                .execute(&env.pool)
                .await
                .unwrap();
            }
        }
    }
    assert_eq!(split_aggregates(&env).await, Vec::<String>::new());

    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    let done = converge(&env, &["--json", "partitions", "set", "64"])
        .await
        .expect(0)
        .json();
    let moved = done["moved"].as_u64().unwrap();
    assert!(moved > 30, "{done}");
    for _ in 0..2 {
        for id in &ids {
            append_changed(&env.pool, id).await.unwrap();
        }
    }
    assert_eq!(split_aggregates(&env).await.len() as u64, moved);
    let total = outbox_count(&env).await;
    let messages = env.read_stream(total, Duration::from_secs(30)).await;
    assert_once_in_order(&messages, total);
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn empty_retired_partitions_go_and_bad_counts_are_refused() {
    let env = TestEnv::new().await;
    converge(&env, &["partitions", "set", "40"]).await.expect(0);
    let served = |v: &serde_json::Value| v["served"].as_array().unwrap().len();
    let shown = converge(&env, &["--json", "partitions", "show"])
        .await
        .expect(0)
        .json();
    assert_eq!(served(&shown), 40);
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    append_changed(&env.pool, "x").await.unwrap();
    env.read_stream(1, Duration::from_secs(10)).await;
    let partition: i32 = sqlx::query_scalar("SELECT partition FROM converge.outbox")
        .fetch_one(&env.pool)
        .await
        .unwrap();

    // Back to 32: the empty retired partitions go; one holding an event
    // stays (published, so its aggregate moved) until retention deletes it.
    let run = converge(&env, &["--json", "partitions", "set", "32"])
        .await
        .expect(0)
        .json();
    let kept = usize::from(partition >= 32);
    assert_eq!(run["removed"].as_array().unwrap().len(), 8 - kept, "{run}");
    assert_eq!(run["kept"].as_array().unwrap().len(), kept, "{run}");
    let shown = converge(&env, &["--json", "partitions", "show"])
        .await
        .expect(0)
        .json();
    assert_eq!(served(&shown), 32 + kept, "{shown}");
    assert_eq!(shown["aggregates_to_move"], 0, "{shown}");
    // Retention deleted the event: the partition goes on the next run.
    sqlx::query("DELETE FROM converge.outbox")
        .execute(&env.pool)
        .await
        .unwrap();
    converge(&env, &["partitions", "set", "32"]).await.expect(0);
    let shown = converge(&env, &["--json", "partitions", "show"])
        .await
        .expect(0)
        .json();
    assert_eq!(served(&shown), 32, "{shown}");
    assert_eq!(shown["retired"].as_array().unwrap().len(), 0);
    append_changed(&env.pool, "x").await.unwrap();
    env.read_stream(2, Duration::from_secs(10)).await;
    relay.shutdown().await.unwrap();

    for bad in ["0", "1025", "many"] {
        let run = converge(&env, &["partitions", "set", bad]).await.expect(2);
        assert!(
            run.stderr.contains("count") || run.stderr.contains("COUNT"),
            "{run:?}"
        );
    }
    let audit: Vec<(String, String)> = sqlx::query_as(
        "SELECT target, outcome FROM converge.audit WHERE action = 'partitions.set' ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(audit.len(), 3, "{audit:?}");
    assert_eq!(audit[0], ("40".into(), "ok".into()));
}
