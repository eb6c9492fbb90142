//! The transaction holding the relays back.
//!
//! The relay reads only events below the xmin of its snapshot: the oldest
//! transaction that holds an xid anywhere on the server — any database, a
//! long batch UPDATE, CREATE INDEX, REFRESH MATERIALIZED VIEW, a prepared
//! transaction left behind (it survives restarts) — keeps every event
//! committed after it waiting. `idle_in_transaction_session_timeout` covers
//! none but idle sessions. This names it.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

/// The oldest transaction holding an xid on the server: what keeps the
/// relays from reading events committed after it began.
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct HoldingTransaction {
    /// The backend's process id (`None` for a prepared transaction: it has
    /// no session; `ROLLBACK PREPARED 'gid'` or `COMMIT PREPARED` ends it).
    pub pid: Option<i32>,
    /// The database it runs in.
    pub database: Option<String>,
    /// Its transaction id.
    pub xid: String,
    /// `active`, `idle in transaction`, … or `prepared`.
    pub state: Option<String>,
    /// Whether it is a prepared (two-phase) transaction.
    pub prepared: bool,
    /// A prepared transaction's global id.
    pub gid: Option<String>,
    /// The role it runs as.
    pub user_name: Option<String>,
    /// When it began (or was prepared).
    pub started_at: Option<DateTime<Utc>>,
    /// How long ago that was, in seconds.
    pub age_secs: Option<f64>,
    /// The start of its current (or last) statement.
    pub query: Option<String>,
}

/// The oldest transaction holding an xid on the server, sessions and
/// prepared transactions alike, other than the caller's own.
///
/// Without `pg_read_all_stats` (or `pg_monitor`), sessions of other roles
/// show no state, start or query.
pub async fn holding_transaction<'e>(
    executor: impl PgExecutor<'e>,
) -> Result<Option<HoldingTransaction>, sqlx::Error> {
    sqlx::query_as(
        "SELECT pid, database, xid::text AS xid, state, prepared, gid, user_name, started_at, \
                extract(epoch FROM now() - started_at)::float8 AS age_secs, query \
         FROM ( \
             SELECT pid, datname::text AS database, backend_xid AS xid, state, false AS prepared, \
                    NULL::text AS gid, usename::text AS user_name, xact_start AS started_at, \
                    left(regexp_replace(query, '\\s+', ' ', 'g'), 120) AS query \
             FROM pg_stat_activity \
             WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() \
             UNION ALL \
             SELECT NULL, database::text, transaction, 'prepared', true, gid, owner::text, prepared, \
                    NULL \
             FROM pg_prepared_xacts) t \
         ORDER BY age(xid) DESC \
         LIMIT 1",
    )
    .fetch_optional(executor)
    .await
}

impl std::fmt::Display for HoldingTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prepared {
            write!(
                f,
                "prepared transaction {:?}",
                self.gid.as_deref().unwrap_or("?")
            )?;
        } else {
            write!(f, "pid {}", self.pid.map_or("?".into(), |p| p.to_string()))?;
        }
        write!(
            f,
            " (xid {}, database {}, {}",
            self.xid,
            self.database.as_deref().unwrap_or("?"),
            self.state.as_deref().unwrap_or("state unknown")
        )?;
        if let Some(age) = self.age_secs {
            write!(f, ", open {age:.0} s")?;
        }
        write!(f, ")")
    }
}
