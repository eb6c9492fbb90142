//! Reading committed events after each owned partition's cursor.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sqlx::Row;

use super::message::OutboxRow;
use super::Shared;
use crate::clock::{Clock, TIMELINE_SQL};

/// A partition to read: number, lease epoch, cursor `(tx_order, id)`.
pub(super) type Part = (i32, i64, (i64, i64));

/// Reads up to `limit` events per partition after its cursor, only below the
/// xmin of the snapshot (plus the cluster's offset): every transaction that
/// could still add a row there has ended. Stops taking rows once their
/// payloads add up to `byte_budget` (at least one row is taken): the rest of
/// the result is discarded as it arrives, so memory is one budget whatever
/// the events' sizes. Partitions come in an order rotated by `first`, so a
/// budget that runs out never starves the same ones. Nothing is read unless
/// the database is the cluster and timeline `clock` belongs to.
pub(super) async fn fetch(
    shared: &Shared,
    clock: Clock,
    parts: &[Part],
    limit: usize,
    byte_budget: usize,
    first: i32,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    let partitions: Vec<i32> = parts.iter().map(|p| p.0).collect();
    let tx_orders: Vec<i64> = parts.iter().map(|p| p.2 .0).collect();
    let ids: Vec<i64> = parts.iter().map(|p| p.2 .1).collect();
    let sql = format!(
        "SELECT o.partition, o.tx_order, o.id, o.event_id, o.aggregate_type, o.aggregate_id, \
                o.version, o.event_type, converge.event_time(o.occurred_at), \
                o.headers::text, o.payload::text, o.traceparent, o.schema_version \
         FROM unnest($1::int[], $2::bigint[], $3::bigint[]) AS c(partition, tx_order, id) \
         CROSS JOIN LATERAL ( \
             SELECT * FROM converge.outbox o \
             WHERE o.partition = c.partition \
               AND (o.tx_order, o.id) > (c.tx_order, c.id) \
               AND o.tx_order < (SELECT txid_snapshot_xmin(txid_current_snapshot())) + $5 \
             ORDER BY o.tx_order, o.id \
             LIMIT $4) AS o \
         WHERE (SELECT system_identifier FROM pg_control_system()) = $6 \
           AND (SELECT {TIMELINE_SQL}) = $8 \
         ORDER BY (o.partition - $7 + 1024) % 1024, o.tx_order, o.id"
    );
    let mut stream = sqlx::query(&sql)
        .bind(&partitions)
        .bind(&tx_orders)
        .bind(&ids)
        .bind(limit as i64)
        .bind(clock.tx_offset)
        .bind(clock.system_identifier)
        .bind(first)
        .bind(clock.timeline)
        .fetch(&shared.pool);
    let mut rows = Vec::new();
    let mut bytes = 0;
    while let Some(r) = futures::TryStreamExt::try_next(&mut stream).await? {
        let row = OutboxRow {
            partition: r.try_get(0)?,
            tx_order: r.try_get(1)?,
            id: r.try_get(2)?,
            event_id: r.try_get(3)?,
            aggregate_type: r.try_get(4)?,
            aggregate_id: r.try_get(5)?,
            version: r.try_get(6)?,
            event_type: r.try_get(7)?,
            occurred_at: r.try_get(8)?,
            headers: r.try_get(9)?,
            payload: Bytes::from(r.try_get::<String, _>(10)?),
            traceparent: r.try_get(11)?,
            schema_version: r.try_get(12)?,
        };
        bytes += row.payload.len();
        rows.push(row);
        if bytes >= byte_budget {
            break; // the rest of the result is read and dropped, not kept
        }
    }
    // Back in (partition, tx_order, id) order, as the relay publishes.
    rows.sort_by_key(|r| (r.partition, r.tx_order, r.id));
    Ok(rows)
}

/// What waits in the owned partitions beyond what a read may publish.
#[derive(Debug, Clone, Copy)]
pub(super) struct Waiting {
    /// When the oldest committed, unpublished event occurred, if there is one.
    pub(super) oldest: Option<DateTime<Utc>>,
    /// Some of them are hidden from the relay by an open transaction.
    pub(super) held_back: bool,
}

/// The first committed, unpublished event of each partition, whether or not
/// the xmin bound lets the relay read it yet: how long events have been
/// waiting, and whether a transaction holds them back. One index probe per
/// partition.
pub(super) async fn waiting(
    shared: &Shared,
    clock: Clock,
    parts: &[Part],
) -> Result<Waiting, sqlx::Error> {
    let partitions: Vec<i32> = parts.iter().map(|p| p.0).collect();
    let tx_orders: Vec<i64> = parts.iter().map(|p| p.2 .0).collect();
    let ids: Vec<i64> = parts.iter().map(|p| p.2 .1).collect();
    let (oldest, held_back): (Option<DateTime<Utc>>, Option<bool>) = sqlx::query_as(
        "SELECT min(converge.event_time(f.occurred_at)), \
                bool_or(f.tx_order >= (SELECT txid_snapshot_xmin(txid_current_snapshot())) + $4) \
         FROM unnest($1::int[], $2::bigint[], $3::bigint[]) AS c(partition, tx_order, id) \
         CROSS JOIN LATERAL ( \
             SELECT o.occurred_at, o.tx_order FROM converge.outbox o \
             WHERE o.partition = c.partition AND (o.tx_order, o.id) > (c.tx_order, c.id) \
             ORDER BY o.tx_order, o.id LIMIT 1) AS f",
    )
    .bind(&partitions)
    .bind(&tx_orders)
    .bind(&ids)
    .bind(clock.tx_offset)
    .fetch_one(&shared.pool)
    .await?;
    Ok(Waiting {
        oldest,
        held_back: held_back.unwrap_or(false),
    })
}
