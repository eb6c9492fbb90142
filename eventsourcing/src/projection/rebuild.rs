//! Rebuilding a projection from history without stopping writers: copies of
//! its tables are filled beside the live ones from the outbox's first event,
//! then renamed into place in one short transaction.
//!
//! An operator requests it (`converge projections rebuild NAME`: the row's
//! `rebuild_state = 'requested'`, with an audit entry); a runner of the
//! projection checks it can (the tables exist, its role owns them and may
//! create beside them, retention has kept the history), creates the copies
//! (`LIKE … INCLUDING ALL`, with the tables' grants) and fills them batch by
//! batch with a cursor of their own — fenced like the live cursor, so any
//! runner may go on after a crash. Once the copies are caught up:
//!
//! * asynchronous: under the projection's row lock (no live batch runs) the
//!   copies get the events up to the live cursor; the tables are swapped;
//!   the live cursor continues from where the copies are;
//! * inline: the live tables are locked `ACCESS EXCLUSIVE` — writers that
//!   applied an event to them finish first, the others wait — the copies
//!   get every committed event after their cursor, and the tables are
//!   swapped; a waiting writer then applies its event to the new table.
//!
//! The runner records the rebuild in `converge.audit` (action
//! `projection.rebuild`, the requester as actor, `details.requested_in` the
//! request's own entry) when it starts it or refuses it, and settles that
//! entry in the swap's transaction. The old tables are dropped with it.

use sqlx::{Connection, PgConnection, Row};

use super::apply::apply_rows;
use super::fetch::{rows_after, Bound, Position};
use super::names::REBUILD_SUFFIX;
use super::register::ProjectionMode;
use super::runner::{StepError, Task};
use super::Tables;

/// What a rebuild step did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum RebuildStep {
    /// Progress: go on at once.
    Worked,
    /// Nothing to do (no rebuild, or another runner has the batch).
    Idle,
}

/// The rebuild columns of a projection's row.
struct State {
    rebuild_state: Option<String>,
    build: Position,
    /// The request's audit entry (`requested`), then the runner's own
    /// (`building`).
    audit_id: Option<i64>,
    requested_by: Option<String>,
}

/// Swapped-out tables are renamed to `<table>__swapped` until dropped.
const SWAPPED_SUFFIX: &str = "__swapped";

/// One step of the projection's rebuild, if one is requested or under way.
pub(super) async fn step(task: &Task) -> Result<RebuildStep, StepError> {
    let row = sqlx::query(
        "SELECT rebuild_state, coalesce(build_cursor_tx_order, 0), coalesce(build_cursor_id, 0), \
                rebuild_audit_id, rebuild_requested_by \
         FROM converge.projections WHERE name = $1",
    )
    .bind(task.projection.name())
    .fetch_optional(&task.pool)
    .await?
    .ok_or(StepError::Forgotten)?;
    let state = State {
        rebuild_state: row.try_get(0)?,
        build: (row.try_get(1)?, row.try_get(2)?),
        audit_id: row.try_get(3)?,
        requested_by: row.try_get(4)?,
    };
    match state.rebuild_state.as_deref() {
        Some("requested") => begin(task, &state).await,
        Some("building") => build(task, &state).await,
        _ => Ok(RebuildStep::Idle),
    }
}

/// Why the projection cannot be rebuilt here, if it cannot.
async fn refusal(task: &Task) -> Result<Option<String>, sqlx::Error> {
    let name = task.projection.name();
    let tables = task.projection.tables();
    if tables.is_empty() {
        return Ok(Some(format!(
            "projection {name} declares no TABLES, so it cannot be rebuilt: declare the tables \
             it writes (Projection::TABLES)"
        )));
    }
    for table in tables {
        let (schema, _) = table.split_once('.').unwrap_or(("", table));
        let found: Option<(bool, bool, String, String)> = sqlx::query_as(
            "SELECT pg_has_role(c.relowner, 'USAGE'), has_schema_privilege(c.relnamespace, 'CREATE'), \
                    c.relowner::regrole::text, current_user::text \
             FROM pg_class c WHERE c.oid = to_regclass($1)",
        )
        .bind(table)
        .fetch_optional(&task.pool)
        .await?;
        match found {
            None => {
                return Ok(Some(format!(
                    "table {table} of projection {name} does not exist"
                )))
            }
            Some((false, _, owner, user)) => {
                return Ok(Some(format!(
                    "the role {user} does not own {table} (its owner is {owner}): a rebuild \
                     renames its copy into place, which only the owner may; run the workers \
                     that rebuild {name} as {owner}, or make {user} a member of {owner}"
                )))
            }
            Some((true, false, _, user)) => {
                return Ok(Some(format!(
                    "the role {user} may not create tables in schema {schema}, where the \
                     rebuild of {name} puts its copies: GRANT CREATE ON SCHEMA {schema} TO {user}"
                )))
            }
            Some(_) => {}
        }
    }
    let deleted: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(deleted), 0)::bigint FROM converge.outbox_retention",
    )
    .fetch_one(&task.pool)
    .await?;
    if deleted > 0 {
        let types = task.projection.aggregate_types();
        if types.is_empty() {
            return Ok(Some(format!(
                "retention has deleted {deleted} events and projection {name} reads every \
                 aggregate type: rebuilt from what is left, it would lose them. Declare the \
                 aggregate types it reads (Projection::AGGREGATE_TYPES) and keep their history \
                 (event-source them)"
            )));
        }
        let unkept: Vec<String> = sqlx::query_scalar(
            "SELECT t FROM unnest($1::text[]) AS t \
             WHERE NOT EXISTS (SELECT 1 FROM converge.retention_policies k WHERE k.aggregate_type = t)",
        )
        .bind(types)
        .fetch_all(&task.pool)
        .await?;
        if !unkept.is_empty() {
            return Ok(Some(format!(
                "retention deletes events of {} (only event-sourced types are kept for ever), so \
                 the history of projection {name} is incomplete: rebuilt from it, the read model \
                 would lose what was deleted",
                unkept.join(", ")
            )));
        }
    }
    Ok(None)
}

/// Starts a requested rebuild: checks, then creates the copies.
async fn begin(task: &Task, state: &State) -> Result<RebuildStep, StepError> {
    let name = task.projection.name();
    if let Some(why) = refusal(task).await? {
        tracing::warn!(projection = name, reason = %why, "projection rebuild refused");
        let mut tx = task.pool.begin().await?;
        let refused = sqlx::query(
            "UPDATE converge.projections SET rebuild_state = NULL, rebuild_error = $2 \
             WHERE name = $1 AND rebuild_state = 'requested'",
        )
        .bind(name)
        .bind(&why)
        .execute(&mut *tx)
        .await?;
        if refused.rows_affected() > 0 {
            let entry = record(&mut tx, task, state).await?;
            let why = serde_json::json!({ "error": why });
            settle(&mut tx, Some(entry), "failed", why).await?;
        }
        tx.commit().await?;
        return Ok(RebuildStep::Worked);
    }
    let mut tx = task.pool.begin().await?;
    let claimed: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM converge.projections \
         WHERE name = $1 AND rebuild_state = 'requested' FOR UPDATE SKIP LOCKED",
    )
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?;
    if claimed.is_none() {
        return Ok(RebuildStep::Idle);
    }
    let entry = record(&mut tx, task, state).await?;
    sqlx::query(
        "UPDATE converge.projections \
         SET rebuild_state = 'building', build_cursor_tx_order = 0, build_cursor_id = 0, \
             build_applied = 0, build_started_at = now(), build_instance = $2, \
             rebuild_error = NULL, rebuild_audit_id = $3 \
         WHERE name = $1",
    )
    .bind(name)
    .bind(&task.instance)
    .bind(entry)
    .execute(&mut *tx)
    .await?;
    for table in task.projection.tables() {
        create_copy(&mut tx, table).await?;
    }
    tx.commit().await?;
    tracing::info!(
        projection = name,
        "projection rebuild started: filling copies of its tables"
    );
    Ok(RebuildStep::Worked)
}

/// `schema.table__rebuild`, empty, with the table's columns, defaults,
/// constraints, indexes and grants.
async fn create_copy(conn: &mut PgConnection, table: &str) -> Result<(), sqlx::Error> {
    let copy = format!("{table}{REBUILD_SUFFIX}");
    sqlx::query(&format!("DROP TABLE IF EXISTS {copy}"))
        .execute(&mut *conn)
        .await?;
    sqlx::query(&format!("CREATE TABLE {copy} (LIKE {table} INCLUDING ALL)"))
        .execute(&mut *conn)
        .await?;
    let grants: Vec<(String, String)> = sqlx::query_as(
        "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END, \
                a.privilege_type \
         FROM pg_class c, aclexplode(c.relacl) a \
         WHERE c.oid = $1::regclass AND a.grantee <> c.relowner",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    for (grantee, privilege) in grants {
        // Both come from the catalog: a privilege keyword and a role name
        // regrole already quoted.
        sqlx::query(&format!("GRANT {privilege} ON {copy} TO {grantee}"))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// One batch into the copies, or the swap once they have caught up.
async fn build(task: &Task, state: &State) -> Result<RebuildStep, StepError> {
    let name = task.projection.name();
    let mut conn = task.pool.acquire().await?;
    let rows = rows_after(
        &mut conn,
        state.build,
        task.config.batch_size,
        task.projection.aggregate_types(),
        Bound::Settled,
    )
    .await?;
    if (rows.len() as i64) < task.config.batch_size {
        drop(conn);
        return swap(task).await;
    }
    let last = rows.last().map(|r| r.position).unwrap_or(state.build);
    let mut tx = conn.begin().await?;
    let mine: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM converge.projections \
         WHERE name = $1 AND rebuild_state = 'building' \
           AND build_cursor_tx_order = $2 AND build_cursor_id = $3 \
         FOR UPDATE SKIP LOCKED",
    )
    .bind(name)
    .bind(state.build.0)
    .bind(state.build.1)
    .fetch_optional(&mut *tx)
    .await?;
    if mine.is_none() {
        return Ok(RebuildStep::Idle);
    }
    let copies = Tables::copies(task.projection.tables());
    let applied = apply_rows(
        task.projection.as_ref(),
        &task.upcasters,
        &mut tx,
        &copies,
        &rows,
    )
    .await
    .map_err(StepError::Event)?;
    sqlx::query(
        "UPDATE converge.projections \
         SET build_cursor_tx_order = $2, build_cursor_id = $3, build_applied = build_applied + $4, \
             rebuild_error = NULL \
         WHERE name = $1",
    )
    .bind(name)
    .bind(last.0)
    .bind(last.1)
    .bind(applied)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(RebuildStep::Worked)
}

/// The copies' last events, then the swap, in one transaction.
async fn swap(task: &Task) -> Result<RebuildStep, StepError> {
    let name = task.projection.name();
    let tables = task.projection.tables();
    let mut tx = task.pool.begin().await?;
    // Readers of the live tables delay the swap, and everyone queues behind
    // a waiting ACCESS EXCLUSIVE request: wait briefly, try again later.
    sqlx::query("SET LOCAL lock_timeout = '2s'")
        .execute(&mut *tx)
        .await?;
    let row = sqlx::query(
        "SELECT rebuild_state, coalesce(cursor_tx_order, 0), coalesce(cursor_id, 0), \
                build_cursor_tx_order, build_cursor_id, build_applied, rebuild_audit_id \
         FROM converge.projections WHERE name = $1 FOR UPDATE",
    )
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(StepError::Forgotten)?;
    if row.try_get::<Option<String>, _>(0)?.as_deref() != Some("building") {
        return Ok(RebuildStep::Idle);
    }
    let live: Position = (row.try_get(1)?, row.try_get(2)?);
    let mut build: Position = (row.try_get(3)?, row.try_get(4)?);
    let mut applied: i64 = row.try_get(5)?;
    let audit_id: Option<i64> = row.try_get(6)?;
    let lock = format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", tables.join(", "));
    let bound = match task.mode {
        // Up to the live cursor: every event before it is settled, and no
        // live batch runs while the row is locked.
        ProjectionMode::Async => Bound::UpTo(live),
        // Every committed event: the writers that apply this projection
        // inline are kept out of its tables by the lock.
        ProjectionMode::Inline => {
            sqlx::query(&lock).execute(&mut *tx).await?;
            Bound::Committed
        }
    };
    let copies = Tables::copies(tables);
    loop {
        let rows = rows_after(
            &mut tx,
            build,
            task.config.batch_size,
            task.projection.aggregate_types(),
            bound,
        )
        .await?;
        let Some(last) = rows.last().map(|r| r.position) else {
            break;
        };
        applied += apply_rows(
            task.projection.as_ref(),
            &task.upcasters,
            &mut tx,
            &copies,
            &rows,
        )
        .await
        .map_err(StepError::Event)?;
        build = last;
        if (rows.len() as i64) < task.config.batch_size {
            break;
        }
    }
    if task.mode == ProjectionMode::Async {
        sqlx::query(&lock).execute(&mut *tx).await?;
    }
    for table in tables {
        swap_table(&mut tx, table).await?;
    }
    let cursor = (task.mode == ProjectionMode::Async).then(|| build.max(live));
    let generation: i32 = sqlx::query_scalar(
        "UPDATE converge.projections \
         SET generation = generation + 1, cursor_tx_order = $2, cursor_id = $3, applied = $4, \
             last_applied_at = now(), rebuild_state = NULL, build_cursor_tx_order = NULL, \
             build_cursor_id = NULL, build_applied = NULL, build_instance = NULL, \
             rebuilt_at = now(), rebuild_error = NULL, \
             error = NULL, error_event_id = NULL, error_at = NULL \
         WHERE name = $1 RETURNING generation",
    )
    .bind(name)
    .bind(cursor.map(|c| c.0))
    .bind(cursor.map(|c| c.1))
    .bind(applied)
    .fetch_one(&mut *tx)
    .await?;
    settle(
        &mut tx,
        audit_id,
        "ok",
        serde_json::json!({ "events": applied, "generation": generation }),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(
        projection = name,
        events = applied,
        generation,
        "projection rebuilt and swapped in"
    );
    Ok(RebuildStep::Worked)
}

/// Renames the copy of `table` into its place and drops the old table; the
/// copy's indexes get the old names back.
async fn swap_table(conn: &mut PgConnection, table: &str) -> Result<(), sqlx::Error> {
    let (schema, bare) = table.split_once('.').unwrap_or(("public", table));
    for statement in [
        format!("ALTER TABLE {table} RENAME TO {bare}{SWAPPED_SUFFIX}"),
        format!("ALTER TABLE {table}{REBUILD_SUFFIX} RENAME TO {bare}"),
        format!("DROP TABLE {schema}.{bare}{SWAPPED_SUFFIX}"),
    ] {
        sqlx::query(&statement).execute(&mut *conn).await?;
    }
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE i.indrelid = $1::regclass AND starts_with(c.relname::text, $2)",
    )
    .bind(table)
    .bind(format!("{bare}{REBUILD_SUFFIX}"))
    .fetch_all(&mut *conn)
    .await?;
    for index in indexes {
        let renamed = format!("{bare}{}", &index[bare.len() + REBUILD_SUFFIX.len()..]);
        sqlx::query(&format!(
            "ALTER INDEX {schema}.\"{}\" RENAME TO \"{}\"",
            index.replace('"', "\"\""),
            renamed.replace('"', "\"\"")
        ))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The runner's audit entry of the rebuild: the requester as actor, the
/// request's entry and this runner in the details. Returns its id.
async fn record(conn: &mut PgConnection, task: &Task, state: &State) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO converge.audit (actor, action, target, details) \
         VALUES ($1, 'projection.rebuild', $2, $3) RETURNING id",
    )
    .bind(state.requested_by.as_deref().unwrap_or("unclaimed"))
    .bind(task.projection.name())
    .bind(serde_json::json!({
        "recorded_by": "worker",
        "instance": task.instance,
        "requested_in": state.audit_id,
        "mode": task.mode.as_str(),
    }))
    .fetch_one(conn)
    .await
}

/// Settles the runner's audit entry of the rebuild.
async fn settle(
    conn: &mut PgConnection,
    audit_id: Option<i64>,
    outcome: &str,
    details: serde_json::Value,
) -> Result<(), sqlx::Error> {
    let Some(id) = audit_id else {
        return Ok(());
    };
    sqlx::query(
        "UPDATE converge.audit SET outcome = $2, finished_at = now(), details = details || $3 \
         WHERE id = $1 AND finished_at IS NULL",
    )
    .bind(id)
    .bind(outcome)
    .bind(details)
    .execute(conn)
    .await?;
    Ok(())
}
