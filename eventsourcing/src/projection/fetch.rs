//! Reading the outbox in its `(tx_order, id)` order for projections.
//!
//! The same order and the same rule as the relay: a row is read only once
//! every transaction that could still add a row before it has ended (its
//! `tx_order` is below the xmin of the reading statement's snapshot, plus the
//! cluster's offset), so a cursor over `(tx_order, id)` never passes a row
//! whose transaction commits late. The relay reads per partition; a
//! projection reads all partitions merged into one order (an index-only probe
//! of each partition's next rows, then the rows picked).

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

/// A position in the outbox's order.
pub(crate) type Position = (i64, i64);

/// One outbox row.
#[derive(Debug)]
pub(crate) struct OutboxRow {
    pub(crate) position: Position,
    pub(crate) event_id: Uuid,
    pub(crate) aggregate_type: String,
    pub(crate) aggregate_id: String,
    pub(crate) version: i64,
    pub(crate) event_type: String,
    pub(crate) schema_version: i32,
    pub(crate) occurred_at: Option<DateTime<Utc>>,
    /// `None` for a row of an aggregate type the projection does not read.
    pub(crate) payload: Option<String>,
}

/// Which rows after the position a read may return.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Bound {
    /// Only rows no open transaction can still precede (the relay's rule).
    Settled,
    /// Up to and including this position (rows a cursor already passed are
    /// settled).
    UpTo(Position),
    /// Every committed row: for the last catch-up of an inline projection's
    /// rebuild, while its tables are locked against the writers that apply
    /// it.
    Committed,
}

fn sql(bound: &str) -> String {
    format!(
        "WITH pick AS ( \
             SELECT o.partition, o.tx_order, o.id \
             FROM converge.relay_partitions p \
             CROSS JOIN LATERAL ( \
                 SELECT o.partition, o.tx_order, o.id FROM converge.outbox o \
                 WHERE o.partition = p.partition AND (o.tx_order, o.id) > ($1, $2) {bound} \
                 ORDER BY o.tx_order, o.id LIMIT $3) o \
             ORDER BY o.tx_order, o.id LIMIT $3) \
         SELECT o.tx_order, o.id, o.event_id, o.aggregate_type, o.aggregate_id, o.version, \
                o.event_type, o.schema_version, converge.event_time(o.occurred_at), \
                CASE WHEN cardinality($4::text[]) = 0 OR o.aggregate_type = ANY($4::text[]) \
                     THEN o.payload::text END \
         FROM pick JOIN converge.outbox o \
           ON o.partition = pick.partition AND o.tx_order = pick.tx_order AND o.id = pick.id \
         ORDER BY o.tx_order, o.id"
    )
}

static SETTLED: LazyLock<String> = LazyLock::new(|| {
    sql(
        "AND o.tx_order < (SELECT txid_snapshot_xmin(txid_current_snapshot())) \
                         + (SELECT c.tx_offset FROM converge.outbox_clock c)",
    )
});
static UP_TO: LazyLock<String> = LazyLock::new(|| sql("AND (o.tx_order, o.id) <= ($5, $6)"));
static COMMITTED: LazyLock<String> = LazyLock::new(|| sql(""));

/// What a read found.
#[derive(Debug)]
pub(crate) struct Fetched {
    /// The rows, in order.
    pub(crate) rows: Vec<OutboxRow>,
    /// The read stopped at its limit or its byte budget: there may be more.
    pub(crate) full: bool,
}

/// Up to `limit` rows after `after`, in order, within `bound`; payloads only
/// for `types` (every type when empty). Stops taking rows once their payloads
/// add up to `byte_budget` (at least one row is taken), so memory is one
/// budget whatever the events' sizes.
pub(crate) async fn rows_after(
    conn: &mut PgConnection,
    after: Position,
    limit: i64,
    types: &[&str],
    bound: Bound,
    byte_budget: usize,
) -> Result<Fetched, sqlx::Error> {
    let (sql, upto) = match bound {
        Bound::Settled => (SETTLED.as_str(), None),
        Bound::UpTo(p) => (UP_TO.as_str(), Some(p)),
        Bound::Committed => (COMMITTED.as_str(), None),
    };
    let mut query = sqlx::query(sql)
        .bind(after.0)
        .bind(after.1)
        .bind(limit)
        .bind(types);
    if let Some(p) = upto {
        query = query.bind(p.0).bind(p.1);
    }
    let mut stream = query.fetch(conn);
    let mut rows = Vec::new();
    let mut bytes = 0;
    let mut over_budget = false;
    while let Some(r) = futures::TryStreamExt::try_next(&mut stream).await? {
        let row = OutboxRow {
            position: (r.try_get(0)?, r.try_get(1)?),
            event_id: r.try_get(2)?,
            aggregate_type: r.try_get(3)?,
            aggregate_id: r.try_get(4)?,
            version: r.try_get(5)?,
            event_type: r.try_get(6)?,
            schema_version: r.try_get(7)?,
            occurred_at: r.try_get(8)?,
            payload: r.try_get(9)?,
        };
        bytes += row.payload.as_ref().map_or(0, String::len);
        rows.push(row);
        if bytes >= byte_budget {
            over_budget = true;
            break; // the rest of the result is read and dropped, not kept
        }
    }
    let full = over_budget || rows.len() as i64 >= limit;
    Ok(Fetched { rows, full })
}
