//! The relay when its database moves to another cluster: a `pg_dump` restored
//! into a fresh cluster (started by the test with `initdb` + `pg_ctl`), whose
//! transaction counter is far below the source's. Nothing may be skipped,
//! hidden or published twice because of it.

use std::time::Duration;

use converge::Relay;
use converge_tests::{
    append_changed, assert_once_in_order, pg_dump, pg_restore, PgCluster, TestEnv,
};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

async fn append(pool: &PgPool, id: &str) -> Result<(), converge::OutboxError> {
    append_changed(pool, id).await.map(|_| ())
}

/// Moves the source's transaction counter well past what a fresh cluster
/// reaches while restoring, as any production database's is.
async fn age_the_source(pool: &PgPool) {
    let xid: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
        .fetch_one(pool)
        .await
        .unwrap();
    for _ in xid..20_000 {
        sqlx::query("SELECT pg_current_xact_id()")
            .execute(pool)
            .await
            .unwrap();
    }
}

/// A source database with 60 published and 20 unpublished events, dumped and
/// restored into a fresh cluster. Returns the source, the cluster and a pool
/// on the restored copy.
async fn restored_copy() -> (TestEnv, PgCluster, PgPool) {
    let env = TestEnv::new().await;
    age_the_source(&env.pool).await;
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    for i in 0..60 {
        append(&env.pool, &format!("old-{}", i % 20)).await.unwrap();
    }
    env.read_stream(60, Duration::from_secs(20)).await;
    relay.shutdown().await.unwrap();
    for i in 0..20 {
        append(&env.pool, &format!("old-{i}")).await.unwrap();
    }
    let file = std::env::temp_dir().join(format!("{}.dump", env.db_name));
    pg_dump(&env.database_url(), &file);

    let cluster = PgCluster::start(&[]);
    cluster.psql("postgres", "CREATE DATABASE app");
    pg_restore(&cluster.url("app"), &file);
    let _ = std::fs::remove_file(&file);
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&cluster.url("app"))
        .await
        .unwrap();
    (env, cluster, pool)
}

#[tokio::test]
async fn a_dump_restored_into_a_fresh_cluster_loses_and_repeats_nothing() {
    let (env, _cluster, pool) = restored_copy().await;
    // The application starts on the copy as it always does.
    converge::migrate(&pool).await.unwrap();
    let relay = Relay::new(pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    // New aggregates and existing ones.
    for i in 0..50 {
        append(&pool, &format!("new-{i}")).await.unwrap();
        append(&pool, &format!("old-{}", i % 20)).await.unwrap();
    }
    let messages = env.read_stream(180, Duration::from_secs(30)).await;
    assert_once_in_order(&messages, 180);
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_append_on_a_restored_copy_before_migrating_is_refused_and_names_the_fix() {
    let (env, _cluster, pool) = restored_copy().await;
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    let err = append(&pool, "new-0")
        .await
        .expect_err("an append on a copy in another cluster must be refused until re-based");
    let text = err.to_string();
    assert!(text.contains("converge migrate"), "{text}");
    assert!(text.contains("cluster"), "{text}");
    assert!(err.is_retryable(), "{err:?}");
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(before, after, "nothing written");

    // The fix the error names, then the same append succeeds and is published.
    converge::migrate(&pool).await.unwrap();
    append(&pool, "new-0").await.unwrap();
    let relay = Relay::new(pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    let messages = env.read_stream(81, Duration::from_secs(30)).await;
    assert_once_in_order(&messages, 81);
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_relay_started_on_a_copy_without_migrating_rebases_before_publishing() {
    let (env, _cluster, pool) = restored_copy().await;
    let relay = Relay::new(pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    for i in 0..20 {
        append(&pool, &format!("new-{i}")).await.unwrap();
    }
    let messages = env.read_stream(100, Duration::from_secs(30)).await;
    assert_once_in_order(&messages, 100);
    relay.shutdown().await.unwrap();
}
