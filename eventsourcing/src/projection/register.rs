//! A projection's row in `converge.projections`: registered by whatever runs
//! it (a repository for an inline projection, a runner for an asynchronous
//! one or for an inline one's rebuilds), with one mode for good, a version,
//! and its declarations.

use sqlx::{PgExecutor, PgPool, Row};

use super::names::{check_table_name, quoted};
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

/// Who registers: a repository applies an inline projection; a runner runs
/// an asynchronous one, or an inline one's rebuilds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Registrar {
    Repository,
    Runner,
}

/// Checks a projection's declarations (name, version, tables).
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
    if projection.version() == 0 || projection.version() > i32::MAX as u32 {
        return Err(RepositoryError::Config(format!(
            "projection {name}: VERSION {} is not a version (1 or more)",
            projection.version()
        )));
    }
    for table in projection.tables() {
        check_table_name(name, table).map_err(RepositoryError::Config)?;
    }
    Ok(())
}

fn config(message: String) -> RepositoryError {
    RepositoryError::Config(message)
}

/// The same declarations, in any order.
fn same(a: &[String], b: &[&str]) -> bool {
    let mut a: Vec<&str> = a.iter().map(String::as_str).collect();
    let mut b = b.to_vec();
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

/// Serialises registrations (a transaction-scoped advisory lock): the
/// shared-table check and the insert see every other registration whole.
const REGISTRATION_LOCK_KEY: i64 = 0x636f_6e76_7072_6a72; // "convprjr"

/// Where an asynchronous projection registered over filled tables starts:
/// the outbox's last event (a rebuild fills copies from the first).
const HEAD: &str = "\
    (SELECT coalesce(max(o.tx_order), 0) FROM ( \
         SELECT o.tx_order, o.id FROM converge.relay_partitions rp \
         CROSS JOIN LATERAL ( \
             SELECT tx_order, id FROM converge.outbox o \
             WHERE o.partition = rp.partition \
             ORDER BY tx_order DESC, id DESC LIMIT 1) o \
         ORDER BY 1 DESC, 2 DESC LIMIT 1) o), \
    (SELECT coalesce(max(o.id), 0) FROM ( \
         SELECT o.tx_order, o.id FROM converge.relay_partitions rp \
         CROSS JOIN LATERAL ( \
             SELECT tx_order, id FROM converge.outbox o \
             WHERE o.partition = rp.partition \
             ORDER BY tx_order DESC, id DESC LIMIT 1) o \
         ORDER BY 1 DESC, 2 DESC LIMIT 1) o)";

/// Registers `projection` in `mode` and checks it against what is
/// registered. Refused: the other mode (every event would be applied twice);
/// a table another projection declares; a registered version newer than
/// this build's; declarations that changed without a new `VERSION`. A runner
/// registering a newer version requests a rebuild, so the change reaches
/// every event. A first registration that would not show every event of
/// the history requests one too, in the same statement that inserts the
/// row: an asynchronous projection over tables that already hold rows
/// (applied from the first event onto them, each would count twice; it
/// starts at the outbox's head instead), an inline one over types that
/// already have events (it sees only what is saved from now on).
pub(crate) async fn register(
    pool: &PgPool,
    projection: &dyn DynProjection,
    mode: ProjectionMode,
    registrar: Registrar,
    instance: &str,
) -> Result<(), RepositoryError> {
    check(projection)?;
    let name = projection.name();
    let tables: Vec<&str> = projection.tables().to_vec();
    let types: Vec<&str> = projection.aggregate_types().to_vec();
    let version = projection.version() as i32;
    // Whether a first registration would miss part of the history; read
    // before the insert, so the row is born with its rebuild request (a
    // crash between two statements would leave it without).
    let incomplete = match mode {
        ProjectionMode::Async => filled(pool, projection).await?,
        ProjectionMode::Inline => {
            sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM converge.outbox_heads \
                                WHERE cardinality($1::text[]) = 0 OR aggregate_type = ANY ($1))",
            )
            .bind(&types)
            .fetch_one(pool)
            .await?
        }
    };
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(REGISTRATION_LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    let shared: Option<String> = sqlx::query_scalar(
        "SELECT name FROM converge.projections WHERE name <> $1 AND tables && $2::text[] LIMIT 1",
    )
    .bind(name)
    .bind(&tables)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(other) = shared {
        return Err(config(format!(
            "projection {name} declares a table projection {other} declares too: a rebuild of \
             one would delete the other's rows; give each projection tables of its own"
        )));
    }
    let why = match mode {
        ProjectionMode::Async => "converge (first registration over tables with rows)",
        ProjectionMode::Inline => "converge (first registration over an existing history)",
    };
    // An inline projection has no cursor (and the application's role may
    // not write one).
    let (cursor_columns, cursor) = match (mode, incomplete) {
        (ProjectionMode::Inline, _) => ("", String::new()),
        (ProjectionMode::Async, false) => ("cursor_tx_order, cursor_id, ", "0, 0, ".to_owned()),
        (ProjectionMode::Async, true) => ("cursor_tx_order, cursor_id, ", format!("{HEAD}, ")),
    };
    let sql = format!(
        "INSERT INTO converge.projections AS p \
             (name, mode, version, tables, aggregate_types, seen_by, {cursor_columns}\
              rebuild_state, rebuild_requested_at, rebuild_requested_by) \
         VALUES ($1, $2, $3, $4, $5, $6, {cursor}\
                 CASE WHEN $7 THEN 'requested' END, CASE WHEN $7 THEN now() END, \
                 CASE WHEN $7 THEN $8 END) \
         ON CONFLICT (name) DO UPDATE SET seen_at = now(), seen_by = excluded.seen_by \
         RETURNING p.mode, p.version, p.tables, p.aggregate_types, (xmax = 0) AS inserted"
    );
    let row = sqlx::query(&sql)
        .bind(name)
        .bind(mode.as_str())
        .bind(version)
        .bind(&tables)
        .bind(&types)
        .bind(instance)
        .bind(incomplete)
        .bind(why)
        .fetch_one(&mut *tx)
        .await?;
    let (stored_mode, stored_version): (String, i32) = (row.try_get(0)?, row.try_get(1)?);
    let (stored_tables, stored_types): (Vec<String>, Vec<String>) =
        (row.try_get(2)?, row.try_get(3)?);
    let inserted: bool = row.try_get(4)?;
    if stored_mode != mode.as_str() {
        let other = match mode {
            ProjectionMode::Inline => "asynchronous (run by a worker)",
            ProjectionMode::Async => "inline (applied by a Repository)",
        };
        return Err(config(format!(
            "projection {name} is registered as {other}; a projection is kept one way only, or \
             every event would be applied twice. Keep it that way, or stop what runs it and \
             `converge projections forget {name}` before registering it anew"
        )));
    }
    if inserted {
        tx.commit().await?;
        if incomplete {
            tracing::warn!(
                projection = name,
                mode = mode.as_str(),
                "a new projection that would miss part of the history (an asynchronous one's \
                 tables already hold rows, or an inline one's types already have events): a \
                 rebuild from history is requested"
            );
        }
        if crate::projection::rebuild::history_thinned(pool, projection.aggregate_types()).await? {
            tracing::warn!(
                projection = name,
                "retention has deleted events this new projection reads: it is built from what \
                 is left (keep the types' history for ever to have all of it)"
            );
        }
        return Ok(());
    }
    if stored_version > version {
        return Err(config(format!(
            "projection {name} is registered at version {stored_version}, newer than this \
             build's {version}: a newer build runs it; deploy that build here too"
        )));
    }
    let declared_same = same(&stored_tables, &tables) && same(&stored_types, &types);
    if stored_version == version {
        if declared_same {
            tx.commit().await?;
            return Ok(());
        }
        return Err(config(format!(
            "projection {name}'s TABLES or AGGREGATE_TYPES changed ({stored_tables:?}, \
             {stored_types:?} registered; {tables:?}, {types:?} now) without a new VERSION: \
             raise Projection::VERSION to {} — its first runner then rebuilds it, so the \
             change reaches every event",
            version + 1
        )));
    }
    // A newer version: its runner takes the row over and rebuilds.
    match registrar {
        Registrar::Repository => {
            tx.commit().await?;
            tracing::warn!(
                projection = name,
                registered = stored_version,
                version,
                "an inline projection of a newer version is applied here; a worker running \
                 its rebuilds (ProjectionRunner::rebuilds_of) registers the version and \
                 rebuilds it from history"
            );
            Ok(())
        }
        Registrar::Runner => {
            // A rebuild of the old version under way is superseded: its
            // runner's audit entry is settled saying so.
            sqlx::query(
                "WITH old AS ( \
                     SELECT rebuild_audit_id FROM converge.projections \
                     WHERE name = $1 AND version < $2 AND rebuild_state = 'building'), \
                 settled AS ( \
                     UPDATE converge.audit a \
                     SET outcome = 'failed', finished_at = now(), \
                         details = a.details || jsonb_build_object('error', \
                             'superseded by version ' || $2 || ' of the projection') \
                     FROM old WHERE a.id = old.rebuild_audit_id AND a.finished_at IS NULL \
                       AND a.details->>'recorded_by' = 'worker') \
                 UPDATE converge.projections \
                 SET version = $2, tables = $3, aggregate_types = $4, \
                     rebuild_state = 'requested', rebuild_requested_at = now(), \
                     rebuild_requested_by = $5, rebuild_audit_id = NULL, rebuild_error = NULL, \
                     build_cursor_tx_order = NULL, build_cursor_id = NULL, build_applied = NULL \
                 WHERE name = $1 AND version < $2",
            )
            .bind(name)
            .bind(version)
            .bind(&tables)
            .bind(&types)
            .bind(format!("converge (version {stored_version} → {version})"))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            tracing::warn!(
                projection = name,
                from = stored_version,
                to = version,
                "projection version raised: rebuilding it from history"
            );
            Ok(())
        }
    }
}

/// Whether any of the projection's tables holds a row (a table missing or
/// unreadable counts as empty: the rebuild check names it later).
async fn filled(pool: &PgPool, projection: &dyn DynProjection) -> Result<bool, RepositoryError> {
    for table in projection.tables() {
        match sqlx::query_scalar::<_, bool>(&format!(
            "SELECT EXISTS (SELECT 1 FROM {})",
            quoted(table)
        ))
        .fetch_one(pool)
        .await
        {
            Ok(true) => return Ok(true),
            Ok(false) | Err(sqlx::Error::Database(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(false)
}

/// Forgets a projection: its row (cursor, errors, rebuild) is deleted, its
/// tables are left as they are. A projection registered again afterwards
/// starts over: an asynchronous one over tables with rows is rebuilt into
/// copies and swapped in. Returns whether it was registered.
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

/// Cancels a requested or running rebuild of `name`: the runner building
/// it stops at its next step, and its audit entry of the rebuild is settled
/// `failed` with `"error": "cancelled by <cancelled_by>"`. Its copies stay
/// until the next rebuild replaces them. Returns `false` when none was
/// requested or under way (a swap that committed meanwhile finished it).
pub async fn cancel_rebuild(
    pool: &PgPool,
    name: &str,
    cancelled_by: &str,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Waits for a runner's step holding the row; then sees its result.
    let cancelled: Option<Option<i64>> = sqlx::query_scalar(
        "UPDATE converge.projections \
         SET rebuild_state = NULL, rebuild_error = 'cancelled by ' || $2 \
         WHERE name = $1 AND rebuild_state IS NOT NULL \
         RETURNING rebuild_audit_id",
    )
    .bind(name)
    .bind(cancelled_by)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(audit_id) = cancelled else {
        return Ok(false);
    };
    // A statement of its own: its snapshot sees the entry of a runner that
    // claimed the rebuild while the update above waited.
    sqlx::query(
        "UPDATE converge.audit \
         SET outcome = 'failed', finished_at = now(), \
             details = details || jsonb_build_object('error', 'cancelled by ' || $2) \
         WHERE id = $1 AND finished_at IS NULL AND details->>'recorded_by' = 'worker'",
    )
    .bind(audit_id)
    .bind(cancelled_by)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}
