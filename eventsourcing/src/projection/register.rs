//! A projection's row in `converge.projections`: registered by whatever runs
//! it (a repository for an inline projection, a runner for an asynchronous
//! one), with one mode for good.

use sqlx::{PgExecutor, PgPool};

use super::names::check_table_name;
use super::DynProjection;
use crate::error::RepositoryError;

/// How a projection is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProjectionMode {
    /// Applied in the transaction that saves the events (by the
    /// [`Repository`](crate::Repository) it is registered on).
    Inline,
    /// Applied after commit from the outbox by a
    /// [`ProjectionRunner`](crate::ProjectionRunner), with a cursor.
    Async,
}

impl ProjectionMode {
    /// `inline` or `async`, as `converge.projections.mode` stores it.
    pub fn as_str(self) -> &'static str {
        match self {
            ProjectionMode::Inline => "inline",
            ProjectionMode::Async => "async",
        }
    }
}

/// Checks a projection's declarations (name, tables, aggregate types).
pub(crate) fn check(projection: &dyn DynProjection) -> Result<(), RepositoryError> {
    let name = projection.name();
    if name.is_empty()
        || name.len() > 128
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(RepositoryError::Config(format!(
            "projection name {name:?} must be 1 to 128 ASCII letters, digits, _ or -"
        )));
    }
    for table in projection.tables() {
        check_table_name(name, table).map_err(RepositoryError::Config)?;
    }
    Ok(())
}

/// Registers `projection` in `mode` (or refreshes its declarations): a
/// projection registered in the other mode is refused — inline and
/// asynchronous at once would apply every event twice.
pub(crate) async fn register(
    pool: &PgPool,
    projection: &dyn DynProjection,
    mode: ProjectionMode,
    instance: &str,
) -> Result<(), RepositoryError> {
    check(projection)?;
    let tables: Vec<&str> = projection.tables().to_vec();
    let types: Vec<&str> = projection.aggregate_types().to_vec();
    let registered: Option<String> = sqlx::query_scalar(
        "INSERT INTO converge.projections AS p \
             (name, mode, tables, aggregate_types, cursor_tx_order, cursor_id, seen_by) \
         VALUES ($1, $2, $3, $4, CASE WHEN $2 = 'async' THEN 0 END, \
                 CASE WHEN $2 = 'async' THEN 0 END, $5) \
         ON CONFLICT (name) DO UPDATE \
             SET tables = excluded.tables, aggregate_types = excluded.aggregate_types, \
                 seen_at = now(), seen_by = excluded.seen_by \
             WHERE p.mode = excluded.mode \
         RETURNING p.mode",
    )
    .bind(projection.name())
    .bind(mode.as_str())
    .bind(&tables)
    .bind(&types)
    .bind(instance)
    .fetch_optional(pool)
    .await?;
    if registered.is_none() {
        let other = match mode {
            ProjectionMode::Inline => "asynchronous (run by a worker)",
            ProjectionMode::Async => "inline (applied by a Repository)",
        };
        return Err(RepositoryError::Config(format!(
            "projection {} is registered as {other}; a projection is kept one way only, or \
             every event would be applied twice. Keep it that way, or stop what runs it and \
             `converge projections forget {}` before registering it anew",
            projection.name(),
            projection.name()
        )));
    }
    Ok(())
}

/// Forgets a projection: its row (cursor, errors, rebuild) is deleted, its
/// tables are left as they are. A projection registered again afterwards
/// starts over (an asynchronous one from the outbox's first event). Returns
/// whether it was registered.
pub async fn forget_projection<'e>(
    executor: impl PgExecutor<'e>,
    name: &str,
) -> Result<bool, sqlx::Error> {
    let deleted = sqlx::query("DELETE FROM converge.projections WHERE name = $1")
        .bind(name)
        .execute(executor)
        .await?;
    Ok(deleted.rows_affected() > 0)
}

/// Requests a rebuild of the projection `name` (`converge projections
/// rebuild` does it, with an audit entry `audit_id`): a runner of the
/// projection carries it out. Returns `false` when the projection is not
/// registered or a rebuild is already requested or under way.
pub async fn request_rebuild<'e>(
    executor: impl PgExecutor<'e>,
    name: &str,
    requested_by: &str,
    audit_id: Option<i64>,
) -> Result<bool, sqlx::Error> {
    let requested = sqlx::query(
        "UPDATE converge.projections \
         SET rebuild_state = 'requested', rebuild_requested_at = now(), \
             rebuild_requested_by = $2, rebuild_audit_id = $3, rebuild_error = NULL \
         WHERE name = $1 AND rebuild_state IS NULL",
    )
    .bind(name)
    .bind(requested_by)
    .bind(audit_id)
    .execute(executor)
    .await?;
    Ok(requested.rows_affected() > 0)
}
