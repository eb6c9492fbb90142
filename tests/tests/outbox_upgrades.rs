//! The outbox across upgrades and re-bases: an outbox written by an earlier
//! converge (duplicate event ids), instances of the previous version appending
//! during a rolling upgrade, and a re-base that must reach sessions already
//! open.

use std::time::Duration;

use converge::{Relay, Retention};
use converge_tests::{append_changed, assert_once_in_order, nats_url, TestEnv};
use sqlx::postgres::PgPoolOptions;
use sqlx::Connection;

/// The statement `Outbox::append` ran before the heads existed (converge at
/// 17cde2f), as an instance of that version still sends it during a rolling
/// upgrade: it computes the version from the latest stored event and leaves
/// the relay partition to a generated column that no longer exists.
const PREVIOUS_APPEND: &str = "INSERT INTO converge.outbox \
       (tx_order, event_id, aggregate_type, aggregate_id, version, event_type, \
        occurred_at, headers, payload, traceparent) \
     SELECT greatest(pg_current_xact_id()::text::bigint, coalesce(l.tx_order, 0)), \
            gen_random_uuid(), 'account', $1, coalesce(l.version, 0) + 1, 'Changed', now(), \
            '{}'::jsonb, json_build_object('id', $1::text), NULL \
     FROM (SELECT 1) AS one \
     LEFT JOIN LATERAL ( \
         SELECT version, tx_order FROM converge.outbox \
         WHERE aggregate_type = 'account' AND aggregate_id = $1 \
         ORDER BY version DESC LIMIT 1) AS l ON true \
     RETURNING version";

/// A database of its own with the migrations before `first_left_out`
/// applied, as the version that had only those applied them.
async fn migrated_before(first_left_out: &str) -> TestEnv {
    let env = TestEnv::unmigrated(&nats_url().await).await;
    let dir = std::env::temp_dir().join(format!("converge-migrations-{}", env.db_name));
    std::fs::create_dir_all(&dir).unwrap();
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema/migrations");
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.as_str() < first_left_out {
            std::fs::copy(&path, dir.join(&name)).unwrap();
        }
    }
    let previous = sqlx::migrate::Migrator::new(dir.as_path()).await.unwrap();
    let mut conn = sqlx::PgConnection::connect_with(&env.connect_options())
        .await
        .unwrap();
    for sql in ["CREATE SCHEMA converge", "SET search_path TO converge"] {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
    previous.run_direct(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    env
}

#[tokio::test]
async fn appends_of_the_previous_version_during_a_rolling_upgrade_get_the_heads_versions() {
    let env = TestEnv::new().await;
    let mut config = env.relay_config();
    config.retention = Retention::For(Duration::from_millis(1));
    config.cleanup_interval = Duration::from_millis(100);
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), config)
        .start()
        .await
        .unwrap();
    assert_eq!(append_changed(&env.pool, "a").await.unwrap().version, 1);
    assert_eq!(append_changed(&env.pool, "a").await.unwrap().version, 2);
    // Retention deletes both: an old instance would now start again at 1.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.outbox")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention did not run"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let old: i64 = sqlx::query_scalar(PREVIOUS_APPEND)
        .bind("a")
        .fetch_one(&env.pool)
        .await
        .expect("an append of the previous version still works");
    assert_eq!(old, 3, "the head's next version, not the one it computed");
    assert_eq!(append_changed(&env.pool, "a").await.unwrap().version, 4);
    let old: i64 = sqlx::query_scalar(PREVIOUS_APPEND)
        .bind("b")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(old, 1);
    let messages = env.read_stream(5, Duration::from_secs(15)).await;
    assert_once_in_order(&messages, 5);
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_outbox_with_duplicate_event_ids_from_an_earlier_version_migrates() {
    let env = migrated_before("20261129000007").await;
    // A retry after an ambiguous commit, as that version stored it: the same
    // event id twice, as versions 1 and 2.
    let id = uuid::Uuid::now_v7();
    for version in 1..=2_i64 {
        sqlx::query(
            "INSERT INTO converge.outbox (event_id, aggregate_type, aggregate_id, version, \
                                          event_type, payload) \
             VALUES ($1, 'account', 'a', $2, 'Changed', '{}')",
        )
        .bind(id)
        .bind(version)
        .execute(&env.pool)
        .await
        .unwrap();
    }

    converge::migrate(&env.pool)
        .await
        .expect("the migration copes with the duplicates");
    let rows: Vec<(i64, uuid::Uuid)> =
        sqlx::query_as("SELECT version, event_id FROM converge.outbox ORDER BY version")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 2, "both stored events keep their rows");
    assert_eq!(rows[0].1, id, "the first keeps its id");
    assert_ne!(rows[1].1, id, "the second gets an id of its own");
    assert_eq!(append_changed(&env.pool, "a").await.unwrap().version, 3);
}

/// A re-base on the same cluster (rows restored into a migrated database,
/// ordered ahead of its xids) must reach sessions that are already open:
/// their next append sorts after the restored rows, and is published.
#[tokio::test]
async fn a_rebase_reaches_sessions_already_open() {
    let env = TestEnv::new().await;
    // One connection: the same session appends before and after.
    let app = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(env.connect_options())
        .await
        .unwrap();
    append_changed(&app, "a").await.unwrap();
    // What a data-only restore of a busier cluster leaves: published up to a
    // tx_order this cluster has not reached.
    let ahead: i64 = sqlx::query_scalar(
        "UPDATE converge.relay_partitions \
         SET cursor_tx_order = txid_current() + 1000000000 RETURNING cursor_tx_order",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap()
    .into_iter()
    .max()
    .unwrap();
    converge::migrate(&env.pool).await.unwrap(); // re-bases
    append_changed(&app, "b").await.unwrap();
    let tx_order: i64 =
        sqlx::query_scalar("SELECT tx_order FROM converge.outbox WHERE aggregate_id = 'b'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(
        tx_order > ahead,
        "the open session appended at {tx_order}, behind the cursors at {ahead}"
    );
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    let messages = env.read_stream(1, Duration::from_secs(10)).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].aggregate_id, "b");
    relay.shutdown().await.unwrap();
}

/// Migration 11 renames retention's positions (an earlier converge's
/// cleanup knows nothing of kept types and projections) and leaves, for
/// instances of that version, an empty table of the old name with the
/// grants the old one had: their privilege checks pass, their cleanup finds
/// no partition, and a row can never be put back into it.
#[tokio::test]
async fn an_earlier_relays_retention_finds_nothing_to_clean_after_the_event_sourcing_migration() {
    let env = migrated_before("20261207000011").await;
    let worker = converge_tests::RoleGuard::new(&env, "old_worker").await;
    sqlx::query(&format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON converge.outbox_retention TO {}",
        worker.name
    ))
    .execute(&env.pool)
    .await
    .unwrap();

    converge::migrate(&env.pool).await.unwrap();
    // What the earlier version's start checks, and its cleanup reads.
    let (old, new): (bool, bool) = sqlx::query_as(&format!(
        "SELECT has_table_privilege('{0}', 'converge.outbox_retention', 'SELECT, INSERT, UPDATE, DELETE'), \
                has_table_privilege('{0}', 'converge.retention_positions', 'SELECT, INSERT, UPDATE, DELETE')",
        worker.name
    ))
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(old && new, "the grants came along to both tables");
    let partitions: Vec<i32> =
        sqlx::query_scalar("SELECT partition FROM converge.outbox_retention ORDER BY partition")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert!(partitions.is_empty(), "{partitions:?}");
    let positions: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.retention_positions")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(positions > 0, "the positions moved to retention_positions");
    let err = sqlx::query("INSERT INTO converge.outbox_retention (partition) VALUES (0)")
        .execute(&env.pool)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("outbox_retention is retired"),
        "{err}"
    );
}
