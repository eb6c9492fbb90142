//! What holds the relays back, named: a prepared transaction left behind (it
//! survives restarts and no session timeout ends it), on a private cluster
//! that allows two-phase commit.

use std::time::Duration;

use converge::Relay;
use converge_tests::{append_changed, assert_once_in_order, PgCluster, TestEnv};
use sqlx::postgres::PgPoolOptions;

#[tokio::test]
async fn a_prepared_transaction_in_another_database_is_named_and_ending_it_releases_the_relay() {
    let shared = TestEnv::new().await; // for NATS and a unique stream
    let cluster = PgCluster::start(&["max_prepared_transactions = 5"]);
    cluster.psql("postgres", "CREATE DATABASE app");
    cluster.psql("postgres", "CREATE DATABASE other");
    cluster.psql("other", "CREATE TABLE t (x int)");
    cluster.psql(
        "other",
        "BEGIN; INSERT INTO t VALUES (1); PREPARE TRANSACTION 'forgotten-by-a-coordinator'",
    );
    let pool = PgPoolOptions::new()
        .max_connections(6)
        .connect(&cluster.url("app"))
        .await
        .unwrap();
    converge::migrate(&pool).await.unwrap();
    let relay = Relay::new(pool.clone(), shared.nats.clone(), shared.relay_config())
        .start()
        .await
        .unwrap();
    for i in 0..5 {
        append_changed(&pool, &format!("a{i}")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        shared.read_stream(1, Duration::ZERO).await.is_empty(),
        "nothing committed after the prepared transaction can be published"
    );
    let holder = converge::holding_transaction(&pool)
        .await
        .unwrap()
        .expect("the prepared transaction is named");
    assert!(holder.prepared, "{holder:?}");
    assert_eq!(holder.gid.as_deref(), Some("forgotten-by-a-coordinator"));
    assert_eq!(holder.database.as_deref(), Some("other"));
    assert_eq!(holder.pid, None);
    assert!(
        holder.to_string().contains("forgotten-by-a-coordinator"),
        "{holder}"
    );

    cluster.psql("other", "ROLLBACK PREPARED 'forgotten-by-a-coordinator'");
    let messages = shared.read_stream(5, Duration::from_secs(10)).await;
    assert_once_in_order(&messages, 5);
    assert_eq!(converge::holding_transaction(&pool).await.unwrap(), None);
    relay.shutdown().await.unwrap();
}
