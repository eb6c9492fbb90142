//! Which PostgreSQL cluster the outbox's order belongs to.
//!
//! `tx_order` is the appending transaction's xid plus the cluster's offset
//! (`converge.outbox_clock`). Xids belong to one cluster: after a dump is
//! restored elsewhere, a logical-replication cut-over or pg_upgrade, the
//! outbox must be re-based (`converge.rebase()`, run by every migration and
//! relay start) before events are appended or published. The relay reads
//! and writes only while the database is the cluster it checked.

use sqlx::{PgPool, Row};

/// The clock the relay works with: the cluster and its offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Clock {
    /// `pg_control_system().system_identifier` of the cluster.
    pub(crate) system_identifier: i64,
    /// Added to xids to make `tx_order`.
    pub(crate) tx_offset: i64,
}

/// Re-bases the outbox on the cluster `pool` reaches if it has to (another
/// cluster, or stored events ordered ahead of this cluster's xids), then
/// returns the clock. Logs a re-base.
pub(crate) async fn check(pool: &PgPool) -> Result<Clock, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let rebased: bool = sqlx::query_scalar("SELECT converge.rebase()")
        .fetch_one(&mut *tx)
        .await?;
    let row = sqlx::query(
        "SELECT system_identifier, tx_offset, previous_system_identifier \
         FROM converge.outbox_clock",
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    let clock = Clock {
        system_identifier: row.get(0),
        tx_offset: row.get(1),
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

/// The clock as stored, if the database is still the cluster it belongs to
/// (`None`: another cluster, or a stored clock that changed: check again).
pub(crate) async fn unchanged(pool: &PgPool, known: Clock) -> Result<bool, sqlx::Error> {
    let same: bool = sqlx::query_scalar(
        "SELECT c.system_identifier = $1 AND c.tx_offset = $2 \
                AND (SELECT system_identifier FROM pg_control_system()) = $1 \
         FROM converge.outbox_clock c",
    )
    .bind(known.system_identifier)
    .bind(known.tx_offset)
    .fetch_optional(pool)
    .await?
    .unwrap_or(false);
    Ok(same)
}
