//! Retention: deleting published events older than the retention period.
//!
//! Runs on one instance at a time (a transaction-scoped advisory lock, so a
//! crashed holder never leaves it taken), in short transactions of at most
//! `cleanup_batch` rows, so no long lock or DELETE storm hits the outbox.

use std::sync::Arc;
use std::time::Duration;

use super::Shared;

const CLEANUP_LOCK_KEY: i64 = 0x636f_6e76_636c_6e75; // "convclnu"

/// Deletes expired events every `cleanup_interval` until cancelled.
pub(super) async fn cleanup_loop(shared: Arc<Shared>, period: Duration) {
    let mut interval = tokio::time::interval(shared.config.cleanup_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = interval.tick() => {}
        }
        match delete_expired(&shared, period).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "outbox retention cleanup"),
            Err(error) => tracing::warn!(%error, "outbox retention cleanup failed; retrying later"),
        }
    }
}

/// Deletes batches until a batch comes back short (or another instance holds
/// the cleanup lock). Returns the number of rows deleted.
pub(crate) async fn delete_expired(shared: &Shared, period: Duration) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        if shared.cancel.is_cancelled() {
            return Ok(total);
        }
        let mut tx = shared.pool.begin().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(CLEANUP_LOCK_KEY)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            return Ok(total);
        }
        // Published = at or before the partition's cursor. Each aggregate's
        // latest event stays, so the next append continues its versions.
        let deleted = sqlx::query(
            "DELETE FROM converge.outbox WHERE id IN ( \
                 SELECT o.id FROM converge.outbox o \
                 JOIN converge.relay_partitions p ON p.partition = o.partition \
                 WHERE o.occurred_at < now() - make_interval(secs => $1) \
                   AND (o.tx_order, o.id) <= (p.cursor_tx_order, p.cursor_id) \
                   AND EXISTS ( \
                       SELECT 1 FROM converge.outbox n \
                       WHERE n.aggregate_type = o.aggregate_type \
                         AND n.aggregate_id = o.aggregate_id AND n.version > o.version) \
                 LIMIT $2)",
        )
        .bind(period.as_secs_f64())
        .bind(shared.config.cleanup_batch as i64)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(
            "DELETE FROM converge.relay_rejects r WHERE NOT EXISTS ( \
                 SELECT 1 FROM converge.outbox o WHERE o.id = r.outbox_id)",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        total += deleted;
        if deleted < shared.config.cleanup_batch as u64 {
            return Ok(total);
        }
    }
}
