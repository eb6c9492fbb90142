//! The relay under faults: NATS stopped and restarted, Postgres connections
//! terminated, and a transaction that took its xid before a later writer of
//! the same aggregate.

use std::time::Duration;

use converge::{Outbox, Relay};
use converge_tests::{
    append_changed, assert_once_in_order, AccountChanged, NatsServer, ProxyMode, TcpProxy, TestEnv,
};

async fn append(env: &TestEnv, id: &str) {
    append_changed(&env.pool, id).await.unwrap();
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
                    .append(&mut tx, &AccountChanged::new(format!("acc-{}", done % 20)))
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
        .append(&mut l, &AccountChanged::new("X"))
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

/// A relay's own PostgreSQL pool, through `proxy`.
async fn pool_through(env: &TestEnv, proxy: &TcpProxy) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with(env.connect_options().host("127.0.0.1").port(proxy.port()))
        .await
        .unwrap()
}

fn nats_addr(env: &TestEnv) -> String {
    env.nats_url().trim_start_matches("nats://").to_owned()
}

/// PostgreSQL becomes unreachable for the relay after JetStream acknowledged a
/// batch and before the relay recorded it, for longer than the stream's
/// duplicate window. The relay must write what it published before reading
/// again: re-sending after the window would store every event twice.
#[tokio::test]
async fn acknowledged_events_are_recorded_before_any_re_read_after_a_long_outage() {
    acknowledged_then_postgres_away(false).await;
}

/// The same, with the publisher panicking while it waits to write: the one
/// the relay restarts writes what its predecessor published.
#[tokio::test]
async fn acknowledged_events_survive_a_publisher_panic_during_the_outage() {
    acknowledged_then_postgres_away(true).await;
}

async fn acknowledged_then_postgres_away(panic_meanwhile: bool) {
    let env = TestEnv::new().await;
    let pg = TcpProxy::start(&format!(
        "{}:{}",
        env.connect_options().get_host(),
        env.connect_options().get_port()
    ))
    .await;
    let nats = TcpProxy::start(&nats_addr(&env)).await;
    let relay_nats = async_nats::connect(nats.addr()).await.unwrap();
    let mut config = env.relay_config();
    config.stream.duplicate_window = Duration::from_secs(5); // lease 2 s + publish 2 s < 5 s
    let relay = Relay::new(pool_through(&env, &pg).await, relay_nats, config)
        .start()
        .await
        .unwrap();
    append(&env, "warm-up").await;
    env.read_stream(1, Duration::from_secs(10)).await;

    // Hold the relay's publishes (and their acks) in the proxy.
    nats.set(ProxyMode::Paused);
    // One transaction, so that the relay reads them as one batch (and sends
    // them well within its 2 s publish timeout).
    let mut tx = env.pool.begin().await.unwrap();
    for i in 0..20 {
        Outbox::default()
            .append(&mut tx, &AccountChanged::new(format!("acc-{i}")))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let held = nats.held_bytes();
        if held > 20 * 200 && held == last {
            break; // the whole batch was sent
        }
        last = held;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay sent nothing ({held} bytes held)"
        );
    }
    // PostgreSQL goes away, then JetStream gets the batch and acknowledges it.
    pg.set(ProxyMode::Cut);
    nats.set(ProxyMode::Open);
    env.read_stream(21, Duration::from_secs(10)).await;
    if panic_meanwhile {
        tokio::time::sleep(Duration::from_secs(1)).await; // its write has failed
        relay.inject_publisher_panic();
    }
    // Longer than the duplicate window.
    tokio::time::sleep(Duration::from_secs(7)).await;
    pg.set(ProxyMode::Open);

    wait_recorded(&env, 21).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let messages = env.read_stream(21, Duration::ZERO).await;
    assert_once_in_order(&messages, 21);
    relay.shutdown().await.unwrap();
}

async fn wait_recorded(env: &TestEnv, n: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let published: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(published), 0)::bigint FROM converge.relay_partitions",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        if published >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay recorded {published} of {n} events"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A relay that reaches PostgreSQL but not NATS must not keep its partitions:
/// a healthy relay takes them over and publishes their events.
#[tokio::test]
async fn a_relay_cut_off_from_nats_hands_its_partitions_over() {
    let env = TestEnv::new().await;
    let nats = TcpProxy::start(&nats_addr(&env)).await;
    let cut_off_nats = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(nats.addr())
        .await
        .unwrap();
    let cut_off = Relay::new(env.pool.clone(), cut_off_nats, env.relay_config())
        .start()
        .await
        .unwrap();
    let healthy = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    // Both hold partitions.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cut_off.partitions().is_empty() || healthy.partitions().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no even share");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nats.set(ProxyMode::Cut);
    for i in 0..100 {
        append(&env, &format!("acc-{i}")).await;
    }
    let messages = env.read_stream(100, Duration::from_secs(40)).await;
    assert_once_in_order(&messages, 100);
    assert!(
        cut_off.partitions().is_empty(),
        "the cut-off relay still holds {:?}",
        cut_off.partitions()
    );
    healthy.shutdown().await.unwrap();
    cut_off.kill().await;
}

/// A publisher that panics (a bug) is restarted: its partitions do not stay
/// leased to a task that no longer runs.
#[tokio::test]
async fn a_publisher_that_panics_is_restarted_within_a_lease() {
    let env = TestEnv::new().await;
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    append(&env, "before").await;
    env.read_stream(1, Duration::from_secs(10)).await;
    relay.inject_publisher_panic();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..20 {
        append(&env, &format!("acc-{i}")).await;
    }
    // Within one lease (2 s in tests) and then some.
    let messages = env.read_stream(21, Duration::from_secs(4)).await;
    assert_once_in_order(&messages, 21);
    assert_eq!(
        relay.partitions().len(),
        32,
        "the partitions stayed with the restarted publisher"
    );
    relay.shutdown().await.unwrap();
}
