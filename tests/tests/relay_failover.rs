//! The relay across a physical fail-over: a streaming standby (made by the
//! test with `pg_basebackup`) that had not received the primary's last
//! transactions is promoted. It is the same cluster (system identifier) on a
//! new timeline, and it hands out again the xids of the transactions it never
//! received: a relay that kept its cursors from the old primary would skip
//! every new event below them.

use std::time::Duration;

use converge::Relay;
use converge_tests::{append_changed, PgCluster, ProxyMode, TcpProxy, TestEnv};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

async fn pool(port: u16, database: &str, max: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(3))
        .connect_with(
            PgConnectOptions::new()
                .host("127.0.0.1")
                .port(port)
                .username("postgres")
                .database(database),
        )
        .await
        .unwrap()
}

/// Waits until the standby has replayed everything the primary wrote so far.
async fn caught_up(primary: &PgPool, standby: &PgPool) {
    let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(primary)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let done: bool = sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
            .bind(&lsn)
            .fetch_one(standby)
            .await
            .unwrap();
        if done {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the standby did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// Several threads: PostgreSQL's programs run synchronously while the proxies
// they go through run on the runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_promotion_that_lost_the_last_transactions_new_events_are_all_published() {
    let shared = TestEnv::new().await; // NATS and a unique stream
    let primary = PgCluster::start(&[]);
    primary.psql("postgres", "CREATE DATABASE app");
    let primary_pool = pool(primary.port(), "app", 4).await;
    converge::migrate(&primary_pool).await.unwrap();
    let replication = TcpProxy::start(&format!("127.0.0.1:{}", primary.port())).await;
    let mut standby = PgCluster::standby_of(replication.port(), &[]);
    let standby_pool = pool(standby.port(), "app", 4).await;

    // The application reaches "the primary" through one address.
    let address = TcpProxy::start(&format!("127.0.0.1:{}", primary.port())).await;
    let relay_pool = pool(address.port(), "app", 4).await;
    let relay = Relay::new(relay_pool, shared.nats.clone(), shared.relay_config())
        .start()
        .await
        .unwrap();
    for i in 0..20 {
        append_changed(&primary_pool, &format!("a{i}"))
            .await
            .unwrap();
    }
    shared.read_stream(20, Duration::from_secs(15)).await;
    caught_up(&primary_pool, &standby_pool).await;

    // Replication stops; the primary goes on for a while (its xid counter
    // runs well ahead of the standby's) and the relay publishes what it writes.
    replication.set(ProxyMode::Cut);
    for _ in 0..500 {
        sqlx::query("SELECT txid_current()")
            .execute(&primary_pool)
            .await
            .unwrap();
    }
    for i in 0..20 {
        append_changed(&primary_pool, &format!("lost{i}"))
            .await
            .unwrap();
    }
    shared.read_stream(40, Duration::from_secs(15)).await;

    // The primary dies; the standby, which never got those transactions, is
    // promoted and the address now leads to it.
    primary_pool.close().await;
    let mut primary = primary;
    primary.crash();
    standby.promote();
    address
        .retarget(&format!("127.0.0.1:{}", standby.port()))
        .await;
    let new_primary = pool(standby.port(), "app", 4).await;
    let mut appended = Vec::new();
    for i in 0..30 {
        let a = append_changed(&new_primary, &format!("b{i}"))
            .await
            .unwrap();
        appended.push(a.event_id.to_string());
    }

    // Every event the new primary holds after the promotion reaches the
    // stream (the 20 lost ones were published before the primary died: they
    // are on the stream and nowhere else, the price of asynchronous
    // replication).
    let messages = shared.read_stream(70, Duration::from_secs(30)).await;
    let on_stream: std::collections::HashSet<&str> =
        messages.iter().map(|m| m.msg_id.as_str()).collect();
    let missing: Vec<&String> = appended
        .iter()
        .filter(|id| !on_stream.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of 30 events appended after the promotion never reached the stream",
        missing.len()
    );
    assert_eq!(
        on_stream.len(),
        messages.len(),
        "an event is on the stream twice"
    );
    assert_eq!(messages.len(), 70);
    relay.shutdown().await.unwrap();
}
