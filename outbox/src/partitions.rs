//! Changing the relay partition count on a live system.
//!
//! Every aggregate's partition is recorded in its head
//! (`converge.outbox_heads.partition`) when the head is created, and every
//! append puts the event where the head says. Changing the count
//! ([`Partitions::set_count`]) changes only where *new* aggregates go. An
//! existing aggregate is moved ([`Partitions::move_aggregates`]) only while
//! none of its events is unpublished: its head is locked (skipping heads an
//! append holds), then — in a statement whose snapshot sees every append
//! that held the lock before — its old partition's cursor is checked to be
//! past all its events, and only then is the head rewritten. Its next event
//! goes to the new partition and sorts after that partition's cursor (every
//! cursor stays below the oldest running transaction), so it is published
//! after every earlier event of the aggregate: per-aggregate order holds
//! across the change, with appends and relays running throughout.
//!
//! Shrinking retires the partitions at or above the new count: once no
//! aggregate is left in them ([`Partitions::close_retired`]), the heads'
//! range constraint is tightened (one scan of the heads under their table
//! lock: appends wait for it), so no event can reach them again; a retired
//! partition is removed once it holds no event at all (retention deletes
//! its published ones; [`Partitions::remove_retired`]), and is served by
//! the relays meanwhile.
//!
//! Condition: every process that appends runs a converge with this scheme
//! (the migration `partition_count`). An instance of an earlier version puts
//! events where `converge.partition_of` says, whatever the head records.

use std::time::Duration;

use sqlx::{PgPool, Row};

use crate::error::is_retryable_sqlx;

/// The largest partition count (the relay's read rotates over 1024).
pub const MAX_PARTITIONS: i32 = 1024;

/// Why a partition change failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PartitionError {
    /// The count asked for is not between 1 and [`MAX_PARTITIONS`].
    #[error("{requested} partitions is out of range: choose 1 to {MAX_PARTITIONS}")]
    OutOfRange {
        /// The count asked for.
        requested: i32,
    },
    /// The heads' table lock was not granted in time: a transaction that
    /// appended (or holds `converge.outbox_heads` otherwise) is still open.
    #[error(
        "could not lock converge.outbox_heads within {timeout:?} to {action}: a transaction that \
         appended events is still open (see `converge status`'s \"held back by\", or \
         pg_stat_activity); nothing changed — run the command again, or give it a longer \
         --lock-timeout (appends wait while it waits)"
    )]
    LockTimeout {
        /// What the lock was for.
        action: &'static str,
        /// How long it waited.
        timeout: Duration,
    },
    /// Retiring found an aggregate still recorded in a retired partition
    /// (its move waited for an unpublished event, or an append of an
    /// earlier converge created it): nothing changed.
    #[error(
        "an aggregate is still recorded in a partition at or above the count: move the \
         aggregates first (`converge partitions set` does, waiting for the relays to publish \
         their events); nothing was retired"
    )]
    AggregatesLeft,
    /// Removing retired partitions before they were closed
    /// ([`Partitions::close_retired`]): an append could still reach them.
    #[error(
        "the retired partitions are not closed yet (the heads' range still admits them): \
         close them first (`converge partitions set` does); nothing was removed"
    )]
    NotClosed,
    /// The database could not be reached or a statement failed.
    #[error("partition change: database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl PartitionError {
    /// Whether running the same step again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            PartitionError::LockTimeout { .. }
            | PartitionError::AggregatesLeft
            | PartitionError::NotClosed => true,
            PartitionError::Database(e) => is_retryable_sqlx(e),
            PartitionError::OutOfRange { .. } => false,
        }
    }
}

impl From<sqlx::Error> for PartitionError {
    fn from(e: sqlx::Error) -> Self {
        PartitionError::Database(e)
    }
}

/// How a partition change works through the heads.
#[derive(Debug, Clone)]
pub struct PartitionChangeConfig {
    /// Heads read (and at most moved) per transaction. Default 1000.
    pub batch_size: i64,
    /// How long a step that locks `converge.outbox_heads` waits for the lock
    /// (appends queue behind it meanwhile). Default 5 s.
    pub lock_timeout: Duration,
}

impl Default for PartitionChangeConfig {
    fn default() -> Self {
        PartitionChangeConfig {
            batch_size: 1000,
            lock_timeout: Duration::from_secs(5),
        }
    }
}

/// The partition layout as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionLayout {
    /// The count new aggregates are hashed into.
    pub partitions: i32,
    /// The count before the last change, if any.
    pub previous: Option<i32>,
    /// Every partition the relays serve (`converge.relay_partitions`),
    /// retired ones (at or above `partitions`) included.
    pub served: Vec<i32>,
}

impl PartitionLayout {
    /// Partitions served but at or above the count: no new aggregate goes
    /// there; they go once empty.
    pub fn retired(&self) -> Vec<i32> {
        self.served
            .iter()
            .copied()
            .filter(|p| *p >= self.partitions)
            .collect()
    }
}

/// One pass of [`Partitions::move_aggregates`] over every head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MovePass {
    /// Heads read.
    pub scanned: u64,
    /// Aggregates moved to the partition the count gives them.
    pub moved: u64,
    /// Aggregates still elsewhere: an event of theirs is unpublished, or an
    /// append held their head. A later pass moves them.
    pub waiting: u64,
}

/// What [`Partitions::remove_retired`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Retirement {
    /// Retired partitions removed from `converge.relay_partitions` (empty).
    pub removed: Vec<i32>,
    /// Retired partitions kept: `(partition, events still stored)`; every
    /// event of theirs is published, and retention deletes them in time.
    pub kept: Vec<(i32, i64)>,
    /// Events of retired partitions not yet published (wait for the relays).
    pub unpublished: i64,
}

/// Changes the relay partition count of one database.
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool) -> Result<(), converge_outbox::PartitionError> {
/// use converge_outbox::Partitions;
/// let partitions = Partitions::new(pool);
/// partitions.set_count(64).await?;
/// while partitions.move_aggregates().await?.waiting > 0 {
///     tokio::time::sleep(std::time::Duration::from_millis(500)).await;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Partitions {
    pool: PgPool,
    config: PartitionChangeConfig,
}

impl Partitions {
    /// Works on the database of `pool` (connected as the schema's owner: the
    /// change rewrites a function and a constraint).
    pub fn new(pool: PgPool) -> Self {
        Partitions {
            pool,
            config: PartitionChangeConfig::default(),
        }
    }

    /// With this configuration.
    pub fn with_config(mut self, config: PartitionChangeConfig) -> Self {
        self.config = config;
        self
    }

    /// The layout as stored now.
    #[tracing::instrument(skip(self), err)]
    pub async fn layout(&self) -> Result<PartitionLayout, PartitionError> {
        let (partitions, previous): (i32, Option<i32>) =
            sqlx::query_as("SELECT partitions, previous FROM converge.partition_layout")
                .fetch_one(&self.pool)
                .await?;
        let served = sqlx::query_scalar(
            "SELECT partition FROM converge.relay_partitions ORDER BY partition",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(PartitionLayout {
            partitions,
            previous,
            served,
        })
    }

    /// Makes `count` the number of partitions new aggregates are hashed
    /// into; returns the previous count. Adds the partitions that do not
    /// exist yet (the relays claim them at their next heartbeat) and records
    /// where the heads without a recorded partition are. Existing aggregates
    /// stay where they are until [`Partitions::move_aggregates`] moves them.
    /// Appends wait for the heads' table lock for the last moment of it.
    #[tracing::instrument(skip(self), err)]
    pub async fn set_count(&self, count: i32) -> Result<i32, PartitionError> {
        if !(1..=MAX_PARTITIONS).contains(&count) {
            return Err(PartitionError::OutOfRange { requested: count });
        }
        // Heads created before the partition was recorded are where the
        // current function puts them: record most of them now, a page at a
        // time in key order, without the table lock (the function records
        // the rest under it, before it changes the count).
        let mut after: Option<(String, String)> = None;
        loop {
            let (after_type, after_id) = after.clone().unwrap_or_default();
            let page: Vec<(String, String)> =
                sqlx::query_as(&page_sql(after.is_none(), "aggregate_type, aggregate_id"))
                    .bind(&after_type)
                    .bind(&after_id)
                    .bind(self.config.batch_size)
                    .fetch_all(&self.pool)
                    .await?;
            let Some(last) = page.last().cloned() else {
                break;
            };
            let (types, ids): (Vec<String>, Vec<String>) = page.into_iter().unzip();
            sqlx::query(
                "UPDATE converge.outbox_heads h \
                 SET partition = converge.partition_of(h.aggregate_type, h.aggregate_id) \
                 FROM (SELECT x.aggregate_type, x.aggregate_id FROM converge.outbox_heads x \
                       JOIN unnest($1::text[], $2::text[]) AS k(aggregate_type, aggregate_id) \
                         ON x.aggregate_type = k.aggregate_type \
                        AND x.aggregate_id = k.aggregate_id \
                       WHERE x.partition IS NULL FOR UPDATE OF x SKIP LOCKED) n \
                 WHERE h.aggregate_type = n.aggregate_type AND h.aggregate_id = n.aggregate_id",
            )
            .bind(&types)
            .bind(&ids)
            .execute(&self.pool)
            .await?;
            after = Some(last);
        }
        let mut tx = self.pool.begin().await?;
        set_lock_timeout(&mut tx, self.config.lock_timeout).await?;
        let previous: i32 = sqlx::query_scalar("SELECT converge.set_partition_count($1)")
            .bind(count)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| self.lock_error(e, "change the partition count"))?;
        tx.commit().await?;
        tracing::info!(previous, count, "relay partition count changed");
        Ok(previous)
    }

    /// One pass over every head: moves each aggregate whose recorded
    /// partition is not the one the count gives it, if none of its events
    /// is unpublished and no append holds its head. Run it again while
    /// [`MovePass::waiting`] is not zero (the relays publish meanwhile).
    #[tracing::instrument(skip(self), err)]
    pub async fn move_aggregates(&self) -> Result<MovePass, PartitionError> {
        let mut pass = MovePass::default();
        let mut after: Option<(String, String)> = None;
        loop {
            let (after_type, after_id) = after.clone().unwrap_or_default();
            let page = sqlx::query(&page_sql(
                after.is_none(),
                "aggregate_type, aggregate_id, partition IS NOT NULL \
                 AND partition <> converge.partition_of(aggregate_type, aggregate_id)",
            ))
            .bind(&after_type)
            .bind(&after_id)
            .bind(self.config.batch_size)
            .fetch_all(&self.pool)
            .await?;
            let Some(last) = page.last() else { break };
            after = Some((last.try_get(0)?, last.try_get(1)?));
            pass.scanned += page.len() as u64;
            let (types, ids): (Vec<String>, Vec<String>) = page
                .iter()
                .filter(|r| r.get::<bool, _>(2))
                .map(|r| (r.get(0), r.get(1)))
                .unzip();
            if types.is_empty() {
                continue;
            }
            let moved = self.move_batch(&types, &ids).await?;
            pass.moved += moved;
            pass.waiting += (types.len() as u64).saturating_sub(moved);
        }
        tracing::info!(
            scanned = pass.scanned,
            moved = pass.moved,
            waiting = pass.waiting,
            "relay partition move pass"
        );
        Ok(pass)
    }

    /// Moves those of these aggregates that can move now; returns how many.
    async fn move_batch(&self, types: &[String], ids: &[String]) -> Result<u64, PartitionError> {
        let mut tx = self.pool.begin().await?;
        // 1. Lock the heads no append holds. An append holds its head until
        // it commits, so every event of a locked aggregate is committed…
        let locked = sqlx::query(
            "SELECT h.aggregate_type, h.aggregate_id FROM converge.outbox_heads h \
             JOIN unnest($1::text[], $2::text[]) AS k(aggregate_type, aggregate_id) \
               ON h.aggregate_type = k.aggregate_type AND h.aggregate_id = k.aggregate_id \
             WHERE h.partition <> converge.partition_of(h.aggregate_type, h.aggregate_id) \
             FOR UPDATE OF h SKIP LOCKED",
        )
        .bind(types)
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
        if locked.is_empty() {
            return Ok(0);
        }
        let (types, ids): (Vec<String>, Vec<String>) =
            locked.iter().map(|r| (r.get(0), r.get(1))).unzip();
        // 2. … and visible to this statement's snapshot (taken after the
        // locks): move those whose old partition's cursor is past every
        // event of theirs. The cursor read may be older than the relay's:
        // that only keeps an aggregate waiting.
        let moved = sqlx::query(
            "UPDATE converge.outbox_heads h \
             SET partition = converge.partition_of(h.aggregate_type, h.aggregate_id) \
             FROM unnest($1::text[], $2::text[]) AS k(aggregate_type, aggregate_id) \
             WHERE h.aggregate_type = k.aggregate_type AND h.aggregate_id = k.aggregate_id \
               AND NOT EXISTS ( \
                   SELECT 1 FROM converge.relay_partitions p \
                   JOIN converge.outbox o ON o.partition = p.partition \
                   WHERE p.partition = h.partition \
                     AND (o.tx_order, o.id) > (p.cursor_tx_order, p.cursor_id) \
                     AND o.aggregate_type = h.aggregate_type \
                     AND o.aggregate_id = h.aggregate_id)",
        )
        .bind(&types)
        .bind(&ids)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(moved)
    }

    /// Closes the partitions at or above the count, once no aggregate is
    /// left in them ([`Partitions::move_aggregates`] found none waiting):
    /// tightens the heads' range, so no event can reach them again. Appends
    /// wait for one scan of the heads under their table lock. Fails with
    /// [`PartitionError::AggregatesLeft`], changing nothing, if an aggregate
    /// is still recorded there. Does nothing when no partition is retired.
    #[tracing::instrument(skip(self), err)]
    pub async fn close_retired(&self) -> Result<(), PartitionError> {
        let mut tx = self.pool.begin().await?;
        // Under the layout's row lock: a concurrent change of the count
        // waits, so the range tightened is the count's.
        let Some(layout) = locked_layout(&mut tx).await? else {
            return Ok(());
        };
        set_lock_timeout(&mut tx, self.config.lock_timeout).await?;
        sqlx::query(&format!(
            "ALTER TABLE converge.outbox_heads \
             DROP CONSTRAINT outbox_heads_partition_range, \
             ADD CONSTRAINT outbox_heads_partition_range \
                 CHECK (partition >= 0 AND partition < {})",
            layout.partitions
        ))
        .execute(&mut *tx)
        .await
        .map_err(|e| self.lock_error(e, "close the retired partitions"))?;
        tx.commit().await?;
        Ok(())
    }

    /// Removes each retired partition that holds no event, once
    /// [`Partitions::close_retired`] closed them (the table lock it took
    /// waited for every append that could still add one), and reports the
    /// others. Partitions still holding events stay, served by the relays,
    /// until their events are published and retention has deleted them;
    /// run it again then.
    #[tracing::instrument(skip(self), err)]
    pub async fn remove_retired(&self) -> Result<Retirement, PartitionError> {
        let mut tx = self.pool.begin().await?;
        // Under the layout's row lock, in one transaction with the removal:
        // a concurrent change of the count cannot bring a partition back
        // into use between the check and the delete.
        let Some(layout) = locked_layout(&mut tx).await? else {
            return Ok(Retirement::default());
        };
        let closed: bool = sqlx::query_scalar(
            "SELECT pg_get_constraintdef(c.oid) LIKE '%< ' || $1 || ')%' \
             FROM pg_constraint c \
             WHERE c.conrelid = 'converge.outbox_heads'::regclass \
               AND c.conname = 'outbox_heads_partition_range' AND c.convalidated",
        )
        .bind(layout.partitions.to_string())
        .fetch_optional(&mut *tx)
        .await?
        .unwrap_or(false);
        if !closed {
            return Err(PartitionError::NotClosed);
        }
        let removed: Vec<i32> = sqlx::query_scalar(
            "WITH gone AS ( \
                 DELETE FROM converge.relay_partitions p \
                 WHERE p.partition >= $1 \
                   AND NOT EXISTS (SELECT 1 FROM converge.outbox o WHERE o.partition = p.partition) \
                 RETURNING p.partition), \
             positions AS ( \
                 DELETE FROM converge.retention_positions r USING gone \
                 WHERE r.partition = gone.partition) \
             SELECT partition FROM gone ORDER BY partition",
        )
        .bind(layout.partitions)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let rows = sqlx::query(
            "SELECT p.partition, \
                    (SELECT count(*) FROM converge.outbox o WHERE o.partition = p.partition), \
                    (SELECT count(*) FROM converge.outbox o WHERE o.partition = p.partition \
                       AND (o.tx_order, o.id) > (p.cursor_tx_order, p.cursor_id)) \
             FROM converge.relay_partitions p WHERE p.partition >= $1 ORDER BY p.partition",
        )
        .bind(layout.partitions)
        .fetch_all(&self.pool)
        .await?;
        let mut retirement = Retirement {
            removed,
            ..Retirement::default()
        };
        for r in rows {
            retirement.kept.push((r.try_get(0)?, r.try_get(1)?));
            retirement.unpublished += r.try_get::<i64, _>(2)?;
        }
        tracing::info!(
            removed = retirement.removed.len(),
            kept = retirement.kept.len(),
            unpublished = retirement.unpublished,
            "retired relay partitions"
        );
        Ok(retirement)
    }

    fn lock_error(&self, e: sqlx::Error, action: &'static str) -> PartitionError {
        match &e {
            sqlx::Error::Database(d) if d.code().as_deref() == Some("55P03") => {
                PartitionError::LockTimeout {
                    action,
                    timeout: self.config.lock_timeout,
                }
            }
            sqlx::Error::Database(d) if d.code().as_deref() == Some("23514") => {
                PartitionError::AggregatesLeft
            }
            _ => PartitionError::Database(e),
        }
    }
}

/// A page of heads in key order after `($1, $2)` (from the first when
/// `first`; `$1`, `$2` are then unused), at most `$3`: two statements, so
/// each keeps its index plan (sqlx prepares each text once per connection).
fn page_sql(first: bool, columns: &str) -> String {
    let after = if first {
        "WHERE $1::text IS NOT NULL AND $2::text IS NOT NULL"
    } else {
        "WHERE (aggregate_type, aggregate_id) > ($1, $2)"
    };
    format!(
        "SELECT {columns} FROM converge.outbox_heads {after} \
         ORDER BY aggregate_type, aggregate_id LIMIT $3"
    )
}

/// The layout, its row locked for the transaction; `None` (and the lock
/// kept) when no partition is retired.
async fn locked_layout(
    tx: &mut sqlx::PgTransaction<'_>,
) -> Result<Option<PartitionLayout>, sqlx::Error> {
    let (partitions, previous): (i32, Option<i32>) =
        sqlx::query_as("SELECT partitions, previous FROM converge.partition_layout FOR UPDATE")
            .fetch_one(&mut **tx)
            .await?;
    let served: Vec<i32> =
        sqlx::query_scalar("SELECT partition FROM converge.relay_partitions ORDER BY partition")
            .fetch_all(&mut **tx)
            .await?;
    let layout = PartitionLayout {
        partitions,
        previous,
        served,
    };
    Ok((!layout.retired().is_empty()).then_some(layout))
}

async fn set_lock_timeout(
    tx: &mut sqlx::PgTransaction<'_>,
    timeout: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(format!("{}ms", timeout.as_millis().max(1)))
        .execute(&mut **tx)
        .await?;
    Ok(())
}
