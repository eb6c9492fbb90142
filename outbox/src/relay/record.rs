//! Recording what was published: each partition's cursor over its
//! acknowledged (or rejected) prefix, and the rejects, fenced by the lease
//! epoch and the cluster.

use uuid::Uuid;

use super::lease;
use super::message::OutboxRow;
use super::Shared;
use crate::clock::{Clock, TIMELINE_SQL};
use crate::metrics as metrics_names;

/// What happened to one row of a batch.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Status {
    /// Not sent (a previous round failed, or the lease deadline passed).
    Pending,
    Acked,
    /// Can never be published; recorded in `converge.relay_rejects`.
    Rejected(String),
    Failed,
}

/// A cursor move: partition, epoch, the last `(tx_order, id)`, events passed.
#[derive(Debug, Clone)]
pub(super) struct Advance {
    pub(super) partition: i32,
    pub(super) epoch: i64,
    pub(super) tx_order: i64,
    pub(super) id: i64,
    pub(super) events: i64,
}

/// Published progress not yet written: kept until it is, and written before
/// anything is read again, so an acknowledged event is never sent again
/// because its cursor write failed.
#[derive(Debug, Clone, Default)]
pub(super) struct Progress {
    pub(super) advance: Vec<Advance>,
    /// outbox id, event id, reason.
    pub(super) rejects: Vec<(i64, Uuid, String)>,
}

impl Progress {
    /// The progress of a published batch: per partition, the prefix that was
    /// acknowledged or rejected (the cursor never passes a pending row).
    pub(super) fn of(
        rows: &[OutboxRow],
        statuses: &[Status],
        epoch_of: impl Fn(i32) -> i64,
    ) -> Self {
        let mut p = Progress::default();
        let mut blocked: Option<i32> = None;
        for (row, status) in rows.iter().zip(statuses) {
            if blocked == Some(row.partition) {
                continue;
            }
            match status {
                Status::Acked | Status::Rejected(_) => {
                    if let Status::Rejected(reason) = status {
                        tracing::error!(event_id = %row.event_id, outbox_id = row.id, reason = %reason, "relay rejected an event it can never publish");
                        p.rejects.push((row.id, row.event_id, reason.clone()));
                    }
                    match p.advance.last_mut() {
                        Some(a) if a.partition == row.partition => {
                            a.tx_order = row.tx_order;
                            a.id = row.id;
                            a.events += 1;
                        }
                        _ => p.advance.push(Advance {
                            partition: row.partition,
                            epoch: epoch_of(row.partition),
                            tx_order: row.tx_order,
                            id: row.id,
                            events: 1,
                        }),
                    }
                }
                Status::Pending | Status::Failed => blocked = Some(row.partition),
            }
        }
        p
    }

    pub(super) fn is_empty(&self) -> bool {
        self.advance.is_empty()
    }
}

/// Why progress was not written.
#[derive(Debug, thiserror::Error)]
pub(super) enum RecordError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The database is not the cluster (or the timeline) the rows were read
    /// from, or the cursor is ahead of anything this database can hold.
    #[error(
        "the database is no longer the PostgreSQL cluster (or timeline) the events were read from"
    )]
    OtherCluster,
}

/// Writes `progress`: moves the cursors (of the partitions still held at the
/// same epoch) and records the rejects, in one transaction. Returns the events
/// recorded; the partitions another instance took over meanwhile are dropped
/// from this one's state (their new owner sends from the old cursor).
pub(super) async fn record(
    shared: &Shared,
    clock: Clock,
    progress: &Progress,
) -> Result<usize, RecordError> {
    if progress.is_empty() {
        return Ok(0);
    }
    let mut tx = shared.pool.begin().await?;
    if !progress.rejects.is_empty() {
        let ids: Vec<i64> = progress.rejects.iter().map(|r| r.0).collect();
        let event_ids: Vec<Uuid> = progress.rejects.iter().map(|r| r.1).collect();
        let reasons: Vec<&str> = progress.rejects.iter().map(|r| r.2.as_str()).collect();
        sqlx::query(
            "INSERT INTO converge.relay_rejects (outbox_id, event_id, reason) \
             SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[]) \
             WHERE (SELECT system_identifier FROM pg_control_system()) = $4 \
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(&ids)
        .bind(&event_ids)
        .bind(&reasons)
        .bind(clock.system_identifier)
        .execute(&mut *tx)
        .await?;
    }
    let a = &progress.advance;
    let partitions: Vec<i32> = a.iter().map(|a| a.partition).collect();
    let epochs: Vec<i64> = a.iter().map(|a| a.epoch).collect();
    let tx_orders: Vec<i64> = a.iter().map(|a| a.tx_order).collect();
    let ids: Vec<i64> = a.iter().map(|a| a.id).collect();
    let counts: Vec<i64> = a.iter().map(|a| a.events).collect();
    // One statement: the cursors move only on the cluster and timeline the
    // rows came from, and never past what this database can have written (a
    // promoted standby may be behind what was read from its old primary).
    let sql = format!(
        "WITH cluster AS ( \
             SELECT system_identifier = $7 AND {TIMELINE_SQL} = $8 \
                    AND (SELECT max(t) FROM unnest($4::bigint[]) AS t) \
                        < txid_snapshot_xmax(txid_current_snapshot()) + $9 AS same \
             FROM pg_control_system()), \
         moved AS ( \
             UPDATE converge.relay_partitions p \
             SET cursor_tx_order = c.tx_order, cursor_id = c.id, \
                 published = p.published + c.n, updated_at = now() \
             FROM unnest($2::int[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[]) \
                  AS c(partition, epoch, tx_order, id, n), cluster \
             WHERE cluster.same AND p.partition = c.partition AND p.owner_id = $1 \
               AND p.epoch = c.epoch \
             RETURNING p.partition) \
         SELECT (SELECT same FROM cluster), coalesce(array_agg(partition), '{{}}') FROM moved"
    );
    let (same_cluster, kept): (bool, Vec<i32>) = sqlx::query_as(&sql)
        .bind(shared.instance_id)
        .bind(&partitions)
        .bind(&epochs)
        .bind(&tx_orders)
        .bind(&ids)
        .bind(&counts)
        .bind(clock.system_identifier)
        .bind(clock.timeline)
        .bind(clock.tx_offset)
        .fetch_one(&mut *tx)
        .await?;
    if !same_cluster {
        return Err(RecordError::OtherCluster);
    }
    tx.commit().await?;
    if !progress.rejects.is_empty() {
        metrics::counter!(metrics_names::RELAY_REJECTS, "stream" => shared.config.stream.name.clone())
            .increment(progress.rejects.len() as u64);
    }
    let mut recorded = 0;
    let mut owned = shared.owned.lock().expect("relay state lock");
    for a in &progress.advance {
        let held = owned.get(&a.partition).is_some_and(|o| o.epoch == a.epoch);
        if kept.contains(&a.partition) {
            recorded += a.events as usize;
            if held {
                if let Some(o) = owned.get_mut(&a.partition) {
                    o.cursor = (a.tx_order, a.id);
                }
            }
        } else if held {
            // Only the lease this progress belongs to: a newer claim stays.
            tracing::warn!(
                partition = a.partition,
                "relay partition was taken over before its progress was recorded; dropping it"
            );
            owned.remove(&a.partition);
            lease::count_loss(shared);
        }
    }
    lease::gauge_owned(shared, owned.len());
    Ok(recorded)
}
