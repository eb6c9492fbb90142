//! Which PostgreSQL cluster, and which timeline of it, the outbox's order and
//! the relay's cursors belong to.
//!
//! `tx_order` is the appending transaction's xid plus the cluster's offset
//! (`converge.outbox_clock`). Xids belong to one cluster: after a dump is
//! restored elsewhere, a logical-replication cut-over or pg_upgrade, the
//! outbox is re-based (`converge.rebase()`, run by every migration and relay
//! start) before events are appended or published. A promoted standby or a
//! point-in-time restore is the same cluster on a new timeline, which may
//! hand out again the xids of transactions it never received: the relay's
//! cursors in memory may then be ahead of what the database holds, so on a
//! new timeline the relay drops them and reads its cursors again. The relay
//! reads and writes only while the database is the cluster and timeline it
//! checked.

use sqlx::{PgPool, Row};

/// The current timeline, from the WAL position being written (available at
/// once after a promotion, unlike the last checkpoint's).
pub(crate) const TIMELINE_SQL: &str =
    "('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int";

/// The clock the relay works with: the cluster, its offset and its timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Clock {
    /// `pg_control_system().system_identifier` of the cluster.
    pub(crate) system_identifier: i64,
    /// Added to xids to make `tx_order`.
    pub(crate) tx_offset: i64,
    /// The timeline the database was on when checked.
    pub(crate) timeline: i32,
}

/// Re-bases the outbox on the cluster `pool` reaches if it has to (another
/// cluster, or stored events ordered ahead of this cluster's xids), then
/// returns the clock. Logs a re-base.
pub(crate) async fn check(pool: &PgPool) -> Result<Clock, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let rebased: bool = sqlx::query_scalar("SELECT converge.rebase()")
        .fetch_one(&mut *tx)
        .await?;
    let row = sqlx::query(&format!(
        "SELECT system_identifier, tx_offset, previous_system_identifier, {TIMELINE_SQL} \
         FROM converge.outbox_clock"
    ))
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    let clock = Clock {
        system_identifier: row.get(0),
        tx_offset: row.get(1),
        timeline: row.get(3),
    };
    if rebased {
        let previous: Option<i64> = row.get(2);
        tracing::warn!(
            system_identifier = clock.system_identifier,
            previous_system_identifier = ?previous,
            tx_offset = clock.tx_offset,
            "the outbox was re-based on this PostgreSQL cluster (restored, moved or upgraded): \
             events appended from now on sort after every stored one"
        );
    }
    Ok(clock)
}

/// Whether the database is still the cluster, offset and timeline `known`.
pub(crate) async fn unchanged(pool: &PgPool, known: Clock) -> Result<bool, sqlx::Error> {
    let same: bool = sqlx::query_scalar(&format!(
        "SELECT c.system_identifier = $1 AND c.tx_offset = $2 \
                AND (SELECT system_identifier FROM pg_control_system()) = $1 \
                AND {TIMELINE_SQL} = $3 \
         FROM converge.outbox_clock c"
    ))
    .bind(known.system_identifier)
    .bind(known.tx_offset)
    .bind(known.timeline)
    .fetch_optional(pool)
    .await?
    .unwrap_or(false);
    Ok(same)
}
