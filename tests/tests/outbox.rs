//! The outbox API against a real PostgreSQL: transactional appends, versions,
//! optimistic concurrency, bad input and history.

use converge::{AppendOptions, DomainEvent, Outbox, OutboxConfig, OutboxError};
use converge_tests::TestEnv;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct OrderShipped {
    order_id: String,
    carrier: String,
}

impl DomainEvent for OrderShipped {
    fn aggregate_type(&self) -> &str {
        "order"
    }
    fn aggregate_id(&self) -> String {
        self.order_id.clone()
    }
    fn event_type(&self) -> &str {
        "OrderShipped"
    }
}

fn shipped(id: &str) -> OrderShipped {
    OrderShipped {
        order_id: id.into(),
        carrier: "dhl".into(),
    }
}

async fn count(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM converge.outbox")
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn rollback_leaves_no_event_and_commit_keeps_it() {
    let env = TestEnv::new().await;
    let outbox = Outbox::default();

    let mut tx = env.pool.begin().await.unwrap();
    outbox.append(&mut tx, &shipped("1")).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(
        count(&env).await,
        0,
        "a rolled-back append must leave nothing"
    );

    let mut tx = env.pool.begin().await.unwrap();
    let a = outbox.append(&mut tx, &shipped("1")).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(&env).await, 1);
    assert_eq!(a.version, 1);
    assert_eq!(a.event_id.get_version_num(), 7, "event ids are UUIDv7");
}

#[tokio::test]
async fn versions_count_per_aggregate_and_history_reads_back() {
    let env = TestEnv::new().await;
    let outbox = Outbox::default();
    for i in 1..=3 {
        let mut tx = env.pool.begin().await.unwrap();
        let a = outbox.append(&mut tx, &shipped("A")).await.unwrap();
        assert_eq!(a.version, i);
        let b = outbox.append(&mut tx, &shipped("B")).await.unwrap();
        assert_eq!(b.version, i);
        tx.commit().await.unwrap();
    }
    // Several events of one aggregate in one batch get consecutive versions.
    let mut tx = env.pool.begin().await.unwrap();
    let batch = outbox
        .append_all(&mut tx, &[shipped("A"), shipped("C"), shipped("A")])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        batch.iter().map(|a| a.version).collect::<Vec<_>>(),
        vec![4, 1, 5]
    );

    let history = Outbox::history(&env.pool, "order", "A", 0, 100)
        .await
        .unwrap();
    assert_eq!(
        history.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(history[0].decode::<OrderShipped>().unwrap(), shipped("A"));
    assert_eq!(history[4].event_id, batch[2].event_id);
    let tail = Outbox::history(&env.pool, "order", "A", 3, 1)
        .await
        .unwrap();
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].version, 4);
    assert_eq!(Outbox::version(&env.pool, "order", "B").await.unwrap(), 3);
    assert_eq!(
        Outbox::version(&env.pool, "order", "nope").await.unwrap(),
        0
    );
}

#[tokio::test]
async fn expected_version_conflict_is_a_clear_retryable_error() {
    let env = TestEnv::new().await;
    let outbox = Outbox::default();
    let mut tx = env.pool.begin().await.unwrap();
    outbox
        .append_with(&mut tx, &shipped("A"), &AppendOptions::expect_version(0))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let mut tx = env.pool.begin().await.unwrap();
    let err = outbox
        .append_with(&mut tx, &shipped("A"), &AppendOptions::expect_version(0))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            OutboxError::VersionConflict {
                expected: 0,
                actual: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert!(err.to_string().contains("order/A"), "{err}");
    tx.rollback().await.unwrap();

    let mut tx = env.pool.begin().await.unwrap();
    let ok = outbox
        .append_with(
            &mut tx,
            &shipped("A"),
            &AppendOptions::expect_version(1).header("tenant", "t1"),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(ok.version, 2);
    let history = Outbox::history(&env.pool, "order", "A", 1, 10)
        .await
        .unwrap();
    assert_eq!(
        history[0].headers.get("tenant").map(String::as_str),
        Some("t1")
    );
}

#[tokio::test]
async fn concurrent_appends_to_one_aggregate_never_share_a_version() {
    let env = TestEnv::new().await;
    let outbox = Outbox::default();
    // Transaction 1 appends version 1 and stays open.
    let mut tx1 = env.pool.begin().await.unwrap();
    outbox.append(&mut tx1, &shipped("A")).await.unwrap();
    // Transaction 2 (READ COMMITTED) queues on the aggregate's head.
    let pool = env.pool.clone();
    let second = tokio::spawn(async move {
        let outbox = Outbox::default();
        let mut tx2 = pool.begin().await.unwrap();
        let r = outbox.append(&mut tx2, &shipped("A")).await;
        if r.is_ok() {
            tx2.commit().await.unwrap();
        }
        r
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "the second append waits for the first transaction"
    );
    tx1.commit().await.unwrap();
    let appended = second.await.unwrap().unwrap();
    assert_eq!(
        appended.version, 2,
        "it continues from the committed version"
    );
    assert_eq!(count(&env).await, 2);

    // Had the first rolled back, the second would have taken version 2 — the
    // head's committed version + 1 — not a version left behind.
    let mut tx3 = env.pool.begin().await.unwrap();
    assert_eq!(
        outbox
            .append(&mut tx3, &shipped("A"))
            .await
            .unwrap()
            .version,
        3
    );
    tx3.rollback().await.unwrap();
    let mut tx4 = env.pool.begin().await.unwrap();
    assert_eq!(
        outbox
            .append(&mut tx4, &shipped("A"))
            .await
            .unwrap()
            .version,
        3
    );
    tx4.commit().await.unwrap();
}

#[derive(Serialize)]
struct Custom {
    #[serde(skip)]
    agg_type: String,
    #[serde(skip)]
    agg_id: String,
    #[serde(skip)]
    event_type: String,
    #[serde(serialize_with = "fail_if")]
    fail: bool,
    blob: String,
}

fn fail_if<S: serde::Serializer>(fail: &bool, s: S) -> Result<S::Ok, S::Error> {
    if *fail {
        Err(serde::ser::Error::custom(
            "this payload refuses to serialize",
        ))
    } else {
        s.serialize_bool(false)
    }
}

impl DomainEvent for Custom {
    fn aggregate_type(&self) -> &str {
        &self.agg_type
    }
    fn aggregate_id(&self) -> String {
        self.agg_id.clone()
    }
    fn event_type(&self) -> &str {
        &self.event_type
    }
}

fn custom(agg_type: &str, agg_id: &str, event_type: &str) -> Custom {
    Custom {
        agg_type: agg_type.into(),
        agg_id: agg_id.into(),
        event_type: event_type.into(),
        fail: false,
        blob: String::new(),
    }
}

#[tokio::test]
async fn bad_input_is_rejected_before_anything_is_written() {
    let env = TestEnv::new().await;
    let mut config = OutboxConfig::default();
    config.max_event_bytes = 4096;
    let outbox = Outbox::new(config);
    let mut tx = env.pool.begin().await.unwrap();

    let err = outbox
        .append(&mut tx, &custom("order", "", "Shipped"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("aggregate_id is empty"), "{err}");
    let err = outbox
        .append(&mut tx, &custom("order.v2", "1", "Shipped"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("aggregate_type"), "{err}");
    let err = outbox
        .append(&mut tx, &custom("order", "1", "Ship*"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("event_type"), "{err}");
    let mut failing = custom("order", "1", "Shipped");
    failing.fail = true;
    let err = outbox.append(&mut tx, &failing).await.unwrap_err();
    assert!(matches!(err, OutboxError::Serialize { .. }), "{err:?}");
    assert!(err.to_string().contains("refuses to serialize"), "{err}");
    let mut big = custom("order", "1", "Shipped");
    big.blob = "x".repeat(5000);
    let err = outbox.append(&mut tx, &big).await.unwrap_err();
    assert!(
        matches!(err, OutboxError::TooLarge { limit: 4096, .. }),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    // A batch with one bad event writes none of them.
    let err = outbox
        .append_all(
            &mut tx,
            &[
                custom("order", "1", "Shipped"),
                custom("order", "", "Shipped"),
            ],
        )
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        OutboxError::InvalidEvent {
            field: "aggregate_id",
            ..
        }
    ));

    // The transaction is still usable: checks ran before any statement.
    outbox
        .append(&mut tx, &custom("order", "1", "Shipped"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(&env).await, 1);
}

#[tokio::test]
async fn migrate_is_idempotent_and_safe_when_run_concurrently() {
    let env = TestEnv::new().await;
    let runs = (0..4).map(|_| {
        let pool = env.pool.clone();
        tokio::spawn(async move { converge::migrate(&pool).await })
    });
    for r in futures::future::join_all(runs).await {
        r.unwrap().unwrap();
    }
    // converge's migration history lives in its own schema, not the application's.
    let own: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('converge._sqlx_migrations')::text")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(own.is_some());
    let public: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations')::text")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        public, None,
        "the application's migration table must stay untouched"
    );
}

/// `converge.append(...)` from SQL, and a plain INSERT into converge.outbox,
/// take the same path as `Outbox::append`: versions from the aggregate's head
/// (a plain INSERT's own version is replaced), the same order.
#[tokio::test]
async fn sql_appends_and_plain_inserts_share_versions_with_rust() {
    let env = TestEnv::new().await;
    let outbox = Outbox::default();
    let mut tx = env.pool.begin().await.unwrap();
    assert_eq!(
        outbox.append(&mut tx, &shipped("A")).await.unwrap().version,
        1
    );
    let v: i64 = sqlx::query_scalar(
        "SELECT converge.append('order', 'A', 'OrderShipped', '{\"order_id\": \"A\"}', \
                                '{\"tenant\": \"t1\"}')",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(v, 2);
    assert_eq!(
        outbox.append(&mut tx, &shipped("A")).await.unwrap().version,
        3
    );
    // A plain INSERT, as SQL written for an earlier converge (or by hand) does.
    let plain: i64 = sqlx::query_scalar(
        "INSERT INTO converge.outbox (aggregate_type, aggregate_id, version, event_type, payload) \
         VALUES ('order', 'A', 1, 'OrderShipped', '{\"order_id\": \"A\"}') RETURNING version",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(plain, 4, "the head's next version, not the one given");
    assert_eq!(
        outbox.append(&mut tx, &shipped("A")).await.unwrap().version,
        5
    );
    tx.commit().await.unwrap();
    let history = Outbox::history(&env.pool, "order", "A", 0, 10)
        .await
        .unwrap();
    assert_eq!(
        history.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(
        history[1].headers.get("tenant").map(String::as_str),
        Some("t1")
    );

    // The same checks as the API, each naming what is wrong.
    for (sql, needle) in [
        (
            "SELECT converge.append('or.der', 'A', 'E', '{}')",
            "aggregate_type",
        ),
        (
            "SELECT converge.append('order', '', 'E', '{}')",
            "aggregate_id",
        ),
        (
            "SELECT converge.append('order', 'A', 'E', '{}', '{\"Nats-Msg-Id\": \"x\"}')",
            "Nats-Msg-Id",
        ),
        (
            "SELECT converge.append('order', 'A', 'E', '{}', '{\"n\": 1}')",
            "header",
        ),
        (
            "SELECT converge.append('order', 'A', 'E', '{}', '{}', 1)",
            "version conflict",
        ),
    ] {
        let err = sqlx::query(sql).execute(&env.pool).await.unwrap_err();
        assert!(err.to_string().contains(needle), "{sql}: {err}");
    }
    assert_eq!(Outbox::version(&env.pool, "order", "A").await.unwrap(), 5);
    // The same order as the API's: the relay publishes them 1..5.
    let orders: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT version, tx_order FROM converge.outbox WHERE aggregate_id = 'A' \
         ORDER BY tx_order, id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        orders.iter().map(|o| o.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
}
