//! A worker whose NATS server goes silent (the socket stays open, nothing
//! answers: a stopped or cut-off node) reconnects instead of waiting on it.
//!
//! The server sits behind a proxy the test pauses while the relay publishes.
//! async-nats's own pings only run while the client is idle, so without the
//! worker's watchdog the client keeps its one connection through the silence
//! (one connect in its statistics); with it, the client reconnects once the
//! stall timeout passed (two connects). Then every event is on the stream
//! exactly once.

use std::time::Duration;

use converge::Worker;
use converge_tests::{append_changed, assert_once_in_order, NatsServer, ProxyMode, TcpProxy};
use converge_tests::{connect_nats, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_on_a_silent_server_reconnects_after_the_stall_timeout() {
    let nats = NatsServer::start().await;
    let proxy = TcpProxy::start(nats.url().trim_start_matches("nats://")).await;
    let env = TestEnv::with_nats_url(&nats.url()).await;
    let client = connect_nats(&format!("nats://{}", proxy.addr())).await;
    let mut relay = env.relay_config();
    relay.publish_timeout = Duration::from_secs(1);
    let worker = Worker::new(
        env.pool.clone(),
        client.clone(),
        format!("app_{}", env.prefix),
    )
    .relay(relay)
    .control_plane(false)
    .nats_stall_timeout(Duration::from_secs(3))
    .shutdown_timeout(Duration::from_secs(5))
    .start()
    .await
    .expect("worker starts");
    for i in 0..20 {
        append_changed(&env.pool, &format!("before-{i}"))
            .await
            .unwrap();
    }
    env.read_stream(20, Duration::from_secs(10)).await;
    assert_eq!(
        client
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    proxy.set(ProxyMode::Paused);
    for i in 0..20 {
        append_changed(&env.pool, &format!("during-{i}"))
            .await
            .unwrap();
    }
    // Past the stall timeout (3 s) with the relay publishing into the silence.
    tokio::time::sleep(Duration::from_secs(6)).await;
    proxy.set(ProxyMode::Open);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let connects = loop {
        let connects = client
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed);
        if connects >= 2 || tokio::time::Instant::now() >= deadline {
            break connects;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        connects >= 2,
        "the client never reconnected: it stayed on the silent connection ({connects} connect)"
    );
    let messages = env.read_stream(40, Duration::from_secs(20)).await;
    assert_once_in_order(&messages, 40);
    worker.shutdown().await.expect("clean shutdown");
}
