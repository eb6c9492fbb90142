//! Sweep candidates from the event log: "transfers with `Requested` and no
//! `Credited` or `Refunded`", in keyset pages, counted, quiet for a while,
//! checked at start, and read through indexes.
use std::time::Duration;

use converge::eventsourcing::Aggregate;
use converge::sweeper::{Candidates, CheckError, EventCandidates};
use converge_tests::TestEnv;
use sqlx::PgPool;

async fn append(pool: &PgPool, id: &str, event_type: &str) {
    sqlx::query("SELECT converge.append('transfer', $1, $2, '{}')")
        .bind(id)
        .bind(event_type)
        .execute(pool)
        .await
        .unwrap();
}

fn unfinished() -> EventCandidates {
    EventCandidates::named("transfer")
        .having(["Requested"])
        .lacking(["Credited", "Refunded"])
        .with_backlog()
}

async fn all_pages(c: &EventCandidates, pool: &PgPool, limit: i64) -> Vec<String> {
    let mut keys = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = c.page(pool, after.as_deref(), limit).await.unwrap();
        if page.is_empty() {
            return keys;
        }
        after = page.last().cloned();
        keys.extend(page);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn aggregates_with_some_events_and_without_others_in_keyset_pages() {
    let env = TestEnv::new().await;
    for (id, events) in [
        ("t1", &["Requested"][..]),
        ("t2", &["Requested", "Debited", "Credited"]),
        ("t3", &["Requested", "Debited"]),
        ("t4", &["Debited"]),
        ("t5", &["Requested", "Debited", "Refunded"]),
        ("t6", &["Requested"]),
    ] {
        for e in events {
            append(&env.pool, id, e).await;
        }
    }
    let c = unfinished();
    assert_eq!(all_pages(&c, &env.pool, 10).await, ["t1", "t3", "t6"]);
    assert_eq!(all_pages(&c, &env.pool, 1).await, ["t1", "t3", "t6"]);
    let backlog = c.backlog(&env.pool).await.unwrap().unwrap();
    assert_eq!(backlog.keys, 3);
    assert!(backlog.oldest.is_some());

    // Quiet for a minute: none yet; then t1 "an hour ago".
    let quiet = unfinished().quiet_for(Duration::from_secs(60));
    assert!(all_pages(&quiet, &env.pool, 10).await.is_empty());
    sqlx::query(
        "UPDATE converge.outbox SET recorded_at = now() - interval '1 hour' \
         WHERE aggregate_type = 'transfer' AND aggregate_id = 't1'",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    assert_eq!(all_pages(&quiet, &env.pool, 10).await, ["t1"]);
    // Finishing a transfer takes it out.
    append(&env.pool, "t3", "Credited").await;
    assert_eq!(all_pages(&c, &env.pool, 10).await, ["t1", "t6"]);
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Transfer;

#[derive(serde::Serialize, serde::Deserialize)]
enum TransferEvent {
    Requested,
    Debited,
    Credited,
    Refunded,
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Aggregate for Transfer {
    const TYPE: &'static str = "transfer";
    type Event = TransferEvent;
    type Command = ();
    type Error = Never;
    fn apply(&mut self, _: &TransferEvent) {}
    fn decide(&self, _: &()) -> Result<Vec<TransferEvent>, Never> {
        Ok(vec![])
    }
}

/// At start: event types the aggregate does not have are refused, naming
/// the ones it has; a usable sweep keeps the type's history from retention.
#[tokio::test(flavor = "multi_thread")]
async fn the_check_names_unknown_event_types_and_keeps_the_history() {
    let env = TestEnv::new().await;
    let typo = EventCandidates::of::<Transfer>()
        .having(["Requested"])
        .lacking(["Credit"]);
    let err = typo.check(&env.pool).await.unwrap_err();
    assert!(matches!(err, CheckError::Unusable(_)));
    let message = err.to_string();
    assert!(
        message.contains("Credit") && message.contains("Requested, Debited, Credited, Refunded"),
        "{message}"
    );
    let none = EventCandidates::of::<Transfer>();
    assert!(none.check(&env.pool).await.is_err());
    let kept = || async {
        converge::eventsourcing::is_kept_forever(&env.pool, "transfer")
            .await
            .unwrap()
    };
    assert!(!kept().await);
    EventCandidates::of::<Transfer>()
        .having(["Requested"])
        .lacking(["Credited", "Refunded"])
        .check(&env.pool)
        .await
        .unwrap();
    assert!(kept().await);
}

/// With thousands of transfers, a page is read through the heads' primary
/// key and the outbox's (aggregate_type, aggregate_id, version) index: no
/// sequential scan of the outbox, and a later page starts at its key in the
/// index even under a generic plan (which a prepared statement gets after a
/// few runs), rather than walking the pages before it.
#[tokio::test(flavor = "multi_thread")]
async fn pages_are_read_through_indexes() {
    let env = TestEnv::new().await;
    for event in ["Requested", "Debited", "Credited"] {
        sqlx::query(
            "INSERT INTO converge.outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'transfer', 't' || lpad(g::text, 5, '0'), $1, '{}' \
             FROM generate_series(1, 5000) g WHERE $1 <> 'Credited' OR g % 10 <> 0",
        )
        .bind(event)
        .execute(&env.pool)
        .await
        .unwrap();
    }
    sqlx::query("ANALYZE converge.outbox, converge.outbox_heads")
        .execute(&env.pool)
        .await
        .unwrap();
    let c = unfinished();
    let first = c.page(&env.pool, None, 100).await.unwrap();
    assert_eq!(first.len(), 100);
    assert_eq!(first[0], "t00010");
    assert_eq!(c.backlog(&env.pool).await.unwrap().unwrap().keys, 500);
    let mut conn = env.pool.acquire().await.unwrap();
    sqlx::raw_sql(&format!(
        "SET plan_cache_mode = force_generic_plan; \
         PREPARE page (text, bigint, text, text[], text[], float8) AS {}",
        EventCandidates::sql()
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN EXECUTE page('t00100', 100, 'transfer', '{Requested}', '{Credited,Refunded}', 60)",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    sqlx::raw_sql("DEALLOCATE page")
        .execute(&mut *conn)
        .await
        .unwrap();
    let plan = plan.join("\n");
    assert!(!plan.contains("Seq Scan"), "{plan}");
    assert!(
        plan.lines()
            .any(|l| l.contains("Index Cond") && l.contains("aggregate_id > $1")),
        "the page's start is not an index condition:\n{plan}"
    );
}
