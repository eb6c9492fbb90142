//! Behind a real PgBouncer (Debian's 1.18): transaction pooling is refused at
//! start with what to configure; session pooling works (the invoicing demo
//! through it is in `examples/invoicing/tests/cli.rs`).

use std::time::Duration;

use converge::Relay;
use converge_tests::{PgBouncer, PoolMode, TestEnv};
use sqlx::postgres::PgPoolOptions;

async fn bouncer_pool(env: &TestEnv, mode: PoolMode) -> (PgBouncer, sqlx::PgPool) {
    let opts = env.connect_options();
    let target = format!("{}:{}", opts.get_host(), opts.get_port());
    let target = if target.starts_with('/') {
        format!("127.0.0.1:{}", opts.get_port())
    } else {
        target
    };
    let bouncer = PgBouncer::start(&target, mode, 5).await;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts.host("127.0.0.1").port(bouncer.port()))
        .await
        .expect("connect through pgbouncer");
    (bouncer, pool)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pooling_is_refused_at_start_saying_what_to_configure() {
    let env = TestEnv::new().await;
    let (bouncer, pool) = bouncer_pool(&env, PoolMode::Transaction).await;
    let e = converge::migrate(&pool)
        .await
        .expect_err("transaction pooling accepted");
    let message = e.to_string();
    assert!(
        message.contains("pool_mode = session") && message.contains("same server session"),
        "{message}\npgbouncer log:\n{}",
        bouncer.log()
    );
    assert!(!e.is_retryable());
    // A relay (each part migrates at start) refuses too, naming the fix.
    let relay = Relay::new(pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .map(|_| ())
        .expect_err("a relay started behind transaction pooling");
    assert!(relay.to_string().contains("pool_mode = session"), "{relay}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pooling_is_accepted_and_leaks_no_search_path() {
    let env = TestEnv::new().await;
    let (_bouncer, pool) = bouncer_pool(&env, PoolMode::Session).await;
    converge::migrate(&pool).await.expect("session pooling");
    // The application's connections through the same pooler keep their own
    // search path.
    for _ in 0..5 {
        let path: String = sqlx::query_scalar("SHOW search_path")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(!path.contains("converge"), "search_path leaked: {path}");
    }
}
