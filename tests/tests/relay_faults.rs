//! The relay under faults: NATS stopped and restarted, Postgres connections
//! terminated, and a transaction that took its xid before a later writer of
//! the same aggregate.

use std::time::Duration;

use converge::{DomainEvent, Outbox, Relay};
use converge_tests::{assert_once_in_order, NatsServer, TestEnv};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
struct Changed {
    id: String,
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

async fn append(env: &TestEnv, id: &str) {
    let mut tx = env.pool.begin().await.unwrap();
    Outbox::default()
        .append(&mut tx, &Changed { id: id.into() })
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn nats_down_then_back_loses_and_duplicates_nothing() {
    let mut server = NatsServer::start().await;
    let env = TestEnv::with_nats_url(&server.url()).await;
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    for i in 0..50 {
        append(&env, &format!("acc-{}", i % 10)).await;
    }
    env.read_stream(50, Duration::from_secs(10)).await;

    server.stop().await;
    for i in 50..150 {
        append(&env, &format!("acc-{}", i % 10)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart().await;

    let messages = env.read_stream(150, Duration::from_secs(30)).await;
    assert_once_in_order(&messages, 150);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        env.read_stream(150, Duration::ZERO).await.len(),
        150,
        "re-sent after recovery"
    );
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn terminated_postgres_connections_are_survived() {
    let env = TestEnv::new().await;
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    let admin = sqlx::PgPool::connect_with(env.connect_options())
        .await
        .unwrap();
    let writer = {
        let pool = env.pool.clone();
        tokio::spawn(async move {
            let outbox = Outbox::default();
            let mut done = 0;
            while done < 300 {
                let Ok(mut tx) = pool.begin().await else {
                    continue;
                };
                let ok = outbox
                    .append(
                        &mut tx,
                        &Changed {
                            id: format!("acc-{}", done % 20),
                        },
                    )
                    .await
                    .is_ok();
                if ok && tx.commit().await.is_ok() {
                    done += 1;
                }
            }
        })
    };
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Kill every connection of the test database but this one.
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .execute(&admin)
        .await
        .unwrap();
    }
    writer.await.unwrap();
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.outbox")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(total, 300);
    let messages = env.read_stream(300, Duration::from_secs(30)).await;
    assert_once_in_order(&messages, 300);
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_older_transaction_appending_after_a_newer_one_keeps_version_order() {
    let env = TestEnv::new().await;
    sqlx::query("CREATE TABLE side (id int)")
        .execute(&env.pool)
        .await
        .unwrap();
    let outbox = Outbox::default();
    // L takes its xid first, by writing something else.
    let mut l = env.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO side VALUES (1)")
        .execute(&mut *l)
        .await
        .unwrap();
    // M, with a later xid, appends version 1 of X and commits.
    append(&env, "X").await;
    // L now appends version 2 of X and commits.
    outbox
        .append(&mut l, &Changed { id: "X".into() })
        .await
        .unwrap();
    l.commit().await.unwrap();

    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    let messages = env.read_stream(2, Duration::from_secs(10)).await;
    assert_once_in_order(&messages, 2);
    relay.shutdown().await.unwrap();
}
