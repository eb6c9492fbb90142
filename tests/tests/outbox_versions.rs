//! Versions that hold under every isolation level, with retention deleting
//! old events at the same time; idempotent appends; retention that keeps no
//! row per aggregate for ever.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use converge::{AppendOptions, Outbox, Relay, Retention};
use converge_tests::{append_changed, assert_once_in_order, AccountChanged, TestEnv};
use sqlx::PgPool;
use tokio::sync::Mutex;
use uuid::Uuid;

fn changed(id: &str) -> AccountChanged {
    AccountChanged::new(id)
}

async fn append(pool: &PgPool, id: &str) -> i64 {
    append_changed(pool, id).await.unwrap().version
}

async fn rows(pool: &PgPool, id: &str) -> Vec<i64> {
    sqlx::query_scalar("SELECT version FROM converge.outbox WHERE aggregate_id = $1 ORDER BY 1")
        .bind(id)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// A relay deleting every published event at once (retention of 1 ms).
async fn relay_with_eager_retention(env: &TestEnv) -> converge::RelayHandle {
    let mut c = env.relay_config();
    c.retention = Retention::For(Duration::from_millis(1));
    c.cleanup_interval = Duration::from_millis(100);
    Relay::new(env.pool.clone(), env.nats.clone(), c)
        .start()
        .await
        .unwrap()
}

async fn wait_for(pool: &PgPool, id: &str, want: Vec<i64>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let have = rows(pool, id).await;
        if have == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id}: rows {have:?}, waiting for {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A transaction whose snapshot predates appends (and retention's deletes)
/// of the same aggregate must not reuse a version, at any isolation level.
async fn a_stale_snapshot_never_reuses_a_version(level: &str) {
    let env = TestEnv::new().await;
    let relay = relay_with_eager_retention(&env).await;
    assert_eq!(append(&env.pool, "a").await, 1);

    let mut stale = env.pool.begin().await.unwrap();
    sqlx::query(&format!("SET TRANSACTION ISOLATION LEVEL {level}"))
        .execute(&mut *stale)
        .await
        .unwrap();
    sqlx::query("SELECT count(*) FROM converge.outbox")
        .execute(&mut *stale)
        .await
        .unwrap(); // takes the snapshot

    assert_eq!(append(&env.pool, "a").await, 2);
    assert_eq!(append(&env.pool, "a").await, 3);
    // Retention deleted versions 1 and 2 (and 3 too, once nothing keeps the
    // latest event).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while rows(&env.pool, "a").await.iter().any(|v| *v < 3) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention did not run"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    match Outbox::default().append(&mut stale, &changed("a")).await {
        Ok(a) => {
            assert_eq!(a.version, 4, "{level}: the append must follow version 3");
            stale.commit().await.unwrap();
        }
        Err(e) => {
            assert!(e.is_retryable(), "{level}: {e:?}");
            stale.rollback().await.unwrap();
            assert_eq!(append(&env.pool, "a").await, 4, "{level}: retried");
        }
    }
    let messages = env.read_stream(4, Duration::from_secs(15)).await;
    assert_once_in_order(&messages, 4);
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn read_committed_never_reuses_a_version() {
    a_stale_snapshot_never_reuses_a_version("READ COMMITTED").await;
}

#[tokio::test]
async fn repeatable_read_never_reuses_a_version() {
    a_stale_snapshot_never_reuses_a_version("REPEATABLE READ").await;
}

#[tokio::test]
async fn serializable_never_reuses_a_version() {
    a_stale_snapshot_never_reuses_a_version("SERIALIZABLE").await;
}

/// Writers at one isolation level, retrying what is retryable, while retention
/// deletes: every committed version is distinct and contiguous per aggregate,
/// and the stream has them once, in version order.
async fn concurrent_writers_keep_versions(level: &'static str) {
    let env = TestEnv::new().await;
    let relay = relay_with_eager_retention(&env).await;
    let committed: Arc<Mutex<BTreeMap<String, Vec<i64>>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..6 {
        let pool = env.pool.clone();
        let committed = committed.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                let id = format!("agg-{}", (w + i) % 3);
                loop {
                    let mut tx = pool.begin().await.unwrap();
                    sqlx::query(&format!("SET TRANSACTION ISOLATION LEVEL {level}"))
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    // Read first, as a business transaction does.
                    sqlx::query("SELECT count(*) FROM converge.outbox")
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    match Outbox::default().append(&mut tx, &changed(&id)).await {
                        Ok(a) => match tx.commit().await {
                            Ok(()) => {
                                committed
                                    .lock()
                                    .await
                                    .entry(id)
                                    .or_default()
                                    .push(a.version);
                                break;
                            }
                            Err(e) if converge::is_retryable_sqlx(&e) => continue,
                            Err(e) => panic!("{level}: commit: {e}"),
                        },
                        Err(e) if e.is_retryable() => {
                            let _ = tx.rollback().await;
                        }
                        Err(e) => panic!("{level}: {e:?}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let committed = committed.lock().await.clone();
    let mut total = 0;
    for (id, versions) in &committed {
        let set: BTreeSet<i64> = versions.iter().copied().collect();
        assert_eq!(
            set.len(),
            versions.len(),
            "{level}: {id} reused a version: {versions:?}"
        );
        assert_eq!(
            set.into_iter().collect::<Vec<_>>(),
            (1..=versions.len() as i64).collect::<Vec<_>>(),
            "{level}: {id} versions have a gap"
        );
        total += versions.len();
    }
    assert_eq!(total, 120);
    let messages = env.read_stream(total, Duration::from_secs(30)).await;
    assert_once_in_order(&messages, total);
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn concurrent_read_committed_writers_keep_versions() {
    concurrent_writers_keep_versions("READ COMMITTED").await;
}

#[tokio::test]
async fn concurrent_repeatable_read_writers_keep_versions() {
    concurrent_writers_keep_versions("REPEATABLE READ").await;
}

#[tokio::test]
async fn concurrent_serializable_writers_keep_versions() {
    concurrent_writers_keep_versions("SERIALIZABLE").await;
}

#[tokio::test]
async fn appending_an_event_id_that_exists_never_adds_a_second_row() {
    let env = TestEnv::new().await;
    let id = Uuid::now_v7();
    let mut options = AppendOptions::default();
    options.event_id = Some(id);
    let mut tx = env.pool.begin().await.unwrap();
    let first = Outbox::default()
        .append_with(&mut tx, &changed("a"), &options)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(first.version, 1);

    // A retry after an ambiguous commit: the very same event again.
    let mut tx = env.pool.begin().await.unwrap();
    let again = Outbox::default()
        .append_with(&mut tx, &changed("a"), &options)
        .await;
    match again {
        Err(converge::OutboxError::AlreadyAppended { event_id, version }) => {
            assert_eq!((event_id, version), (id, Some(1)));
        }
        other => panic!("expected AlreadyAppended, got {other:?}"),
    }
    tx.commit().await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.outbox WHERE event_id = $1")
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(n, 1, "one row per event id");
    assert_eq!(
        append(&env.pool, "a").await,
        2,
        "the version was not consumed"
    );
}

#[tokio::test]
async fn retention_keeps_no_row_per_aggregate_and_versions_continue() {
    let env = TestEnv::new().await;
    for _ in 0..3 {
        append(&env.pool, "a").await;
    }
    append(&env.pool, "b").await;
    let relay = relay_with_eager_retention(&env).await;
    wait_for(&env.pool, "a", vec![]).await;
    wait_for(&env.pool, "b", vec![]).await;
    assert_eq!(append(&env.pool, "a").await, 4);
    assert_eq!(append(&env.pool, "b").await, 2);
    assert_eq!(Outbox::version(&env.pool, "account", "a").await.unwrap(), 4);
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn retention_never_deletes_what_is_not_yet_published() {
    let env = TestEnv::new().await;
    // An open transaction holding an xid keeps the relay from publishing.
    let mut holder = env.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *holder)
        .await
        .unwrap();
    for _ in 0..3 {
        append(&env.pool, "a").await;
    }
    let relay = relay_with_eager_retention(&env).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        rows(&env.pool, "a").await,
        vec![1, 2, 3],
        "unpublished events stay"
    );
    holder.rollback().await.unwrap();
    let messages = env.read_stream(3, Duration::from_secs(15)).await;
    assert_once_in_order(&messages, 3);
    wait_for(&env.pool, "a", vec![]).await;
    relay.shutdown().await.unwrap();
}
