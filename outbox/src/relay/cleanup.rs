//! Retention: deleting published events older than the retention period.
//!
//! An event's age is the time it was stored (`recorded_at`; for rows stored
//! before that column existed, `occurred_at`, and a time converge cannot
//! carry counts as expired), never a time the application chose.
//!
//! Each partition is cleaned from where the last batch stopped
//! (`converge.retention_positions`), in `(tx_order, id)` order — the relay's
//! index — up to the partition's cursor, and only up to the first event still
//! inside the period: a batch reads the rows it deletes and nothing else, at
//! any table size. One batch is one short transaction; no transaction id is
//! held between batches. One instance cleans at a time (a transaction-scoped
//! advisory lock, so a crashed holder never leaves it taken). Versions live
//! in `converge.outbox_heads`, so every published event may go, the latest of
//! an aggregate included.
//!
//! Two things are never deleted: the events of aggregate types listed in
//! `converge.retention_policies` (event-sourced aggregates: their history is
//! their state) — the position steps over them — and events a projection
//! still needs: an event of a type a projection reads (or of any type, for
//! one that reads every type) after its live cursor (asynchronous
//! projections), or at all while a rebuild of it is requested or under way
//! (its copies are filled from the first event, and the swap refuses a
//! history that lost events meanwhile). The position stops at the first
//! such event: every later event of that partition waits with it, whatever
//! its type, until the projection moves on (or is forgotten).

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;

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
        let cancel = shared.cancel.clone();
        let batch = shared.config.cleanup_batch;
        match delete_expired(&shared.pool, period, batch, || cancel.is_cancelled()).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "outbox retention cleanup"),
            Err(error) => tracing::warn!(%error, "outbox retention cleanup failed; retrying later"),
        }
    }
}

/// Whether the outbox row `o` may be passed by retention's position: kept
/// for ever (its type's policy), or published long enough ago (`$PERIOD`
/// seconds) and needed by no projection.
fn passable(period: &str) -> String {
    format!(
        "({kept} \
          OR (coalesce(coalesce(o.recorded_at, converge.event_time(o.occurred_at)) \
                       < now() - make_interval(secs => {period}), true) \
              AND NOT {held}))",
        kept = KEPT,
        held = HELD
    )
}

/// Whether the outbox row `o` is of a type kept for ever. Whether any
/// policy exists is read once per statement; only then is each row's type
/// looked up (by the policies' primary key, however many there are).
const KEPT: &str = "((SELECT EXISTS (SELECT 1 FROM converge.retention_policies)) \
     AND EXISTS (SELECT 1 FROM converge.retention_policies k \
                 WHERE k.aggregate_type = o.aggregate_type))";

/// Whether a projection still needs the outbox row `o`. Without any
/// projection (read once per statement) no row is probed.
const HELD: &str = "((SELECT EXISTS (SELECT 1 FROM converge.projections)) \
     AND EXISTS (SELECT 1 FROM converge.projections p \
       WHERE (cardinality(p.aggregate_types) = 0 OR o.aggregate_type = ANY (p.aggregate_types)) \
         AND ((p.mode = 'async' \
               AND (coalesce(p.cursor_tx_order, 0), coalesce(p.cursor_id, 0)) \
                   < (o.tx_order, o.id)) \
              OR p.rebuild_state IS NOT NULL)))";

/// Where a partition's retention stands: its position (locked, so one batch
/// at a time), its cursor, and whether the first event after the position is
/// published and passable (when it is not, there is nothing to do: one index
/// probe).
static POSITION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT r.after_tx_order, r.after_id, p.cursor_tx_order, p.cursor_id, \
                coalesce(( \
                    SELECT {passable} FROM converge.outbox o \
                    WHERE o.partition = r.partition \
                      AND (o.tx_order, o.id) > (r.after_tx_order, r.after_id) \
                      AND (o.tx_order, o.id) <= (p.cursor_tx_order, p.cursor_id) \
                    ORDER BY o.tx_order, o.id LIMIT 1), false) \
         FROM converge.retention_positions r \
         JOIN converge.relay_partitions p ON p.partition = r.partition \
         WHERE r.partition = $1 \
         FOR UPDATE OF r",
        passable = passable("$2")
    )
});

/// One batch of one partition: the published events after the position
/// (`$2`, `$3`) up to the cursor (`$4`, `$5`), at most `$7` of them, up to
/// the first one that is not passable (`$6`: the period in seconds); those
/// of a kept type are passed over, the others deleted with their rejects;
/// the position moves to the last one passed. Returns how many were passed
/// and how many deleted.
static DELETE_BATCH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH cand AS ( \
             SELECT o.tx_order, o.id, {passable} AS passable, \
                    {kept} AS kept \
             FROM converge.outbox o \
             WHERE o.partition = $1 \
               AND (o.tx_order, o.id) > ($2, $3) \
               AND (o.tx_order, o.id) <= ($4, $5) \
             ORDER BY o.tx_order, o.id \
             LIMIT $7), \
         stop AS ( \
             SELECT tx_order, id FROM cand WHERE NOT passable ORDER BY tx_order, id LIMIT 1), \
         passed AS ( \
             SELECT c.tx_order, c.id, c.kept FROM cand c \
             WHERE NOT EXISTS (SELECT 1 FROM stop s \
                               WHERE (c.tx_order, c.id) >= (s.tx_order, s.id))), \
         del AS ( \
             DELETE FROM converge.outbox o USING passed d \
             WHERE NOT d.kept AND o.partition = $1 AND o.tx_order = d.tx_order AND o.id = d.id \
             RETURNING o.tx_order, o.id, o.event_id), \
         rejects AS ( \
             DELETE FROM converge.relay_rejects r USING del WHERE r.event_id = del.event_id), \
         last AS ( \
             SELECT tx_order, id FROM passed ORDER BY tx_order DESC, id DESC LIMIT 1), \
         n AS (SELECT (SELECT count(*) FROM passed) AS passed, (SELECT count(*) FROM del) AS n) \
         UPDATE converge.retention_positions t \
         SET after_tx_order = last.tx_order, after_id = last.id, deleted = t.deleted + n.n, \
             updated_at = now() \
         FROM last, n \
         WHERE t.partition = $1 \
         RETURNING n.passed, n.n",
        passable = passable("$6"),
        kept = KEPT
    )
});

/// Deletes expired events of every partition, batch after batch, until a
/// batch comes back short (or another instance holds the cleanup lock).
/// Returns the number of rows deleted.
pub(crate) async fn delete_expired(
    pool: &PgPool,
    period: Duration,
    batch: usize,
    stop: impl Fn() -> bool,
) -> Result<u64, sqlx::Error> {
    let partitions: Vec<i32> =
        sqlx::query_scalar("SELECT partition FROM converge.retention_positions ORDER BY partition")
            .fetch_all(pool)
            .await?;
    let batch = batch.max(1) as i64;
    let mut total = 0;
    for partition in partitions {
        loop {
            if stop() {
                return Ok(total);
            }
            let mut tx = pool.begin().await?;
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
                .bind(CLEANUP_LOCK_KEY)
                .fetch_one(&mut *tx)
                .await?;
            if !locked {
                return Ok(total);
            }
            let (after_tx, after_id, cursor_tx, cursor_id, expired): (i64, i64, i64, i64, bool) =
                sqlx::query_as(POSITION.as_str())
                    .bind(partition)
                    .bind(period.as_secs_f64())
                    .fetch_one(&mut *tx)
                    .await?;
            if !expired {
                tx.commit().await?;
                break; // nothing published and expired after the position
            }
            let (passed, deleted): (i64, i64) = sqlx::query_as(DELETE_BATCH.as_str())
                .bind(partition)
                .bind(after_tx)
                .bind(after_id)
                .bind(cursor_tx)
                .bind(cursor_id)
                .bind(period.as_secs_f64())
                .bind(batch)
                .fetch_optional(&mut *tx)
                .await?
                .unwrap_or((0, 0));
            tx.commit().await?;
            total += deleted as u64;
            if passed < batch {
                break;
            }
        }
    }
    Ok(total)
}
