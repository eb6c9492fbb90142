//! Rebuilding a projection from history without stopping writers: copies of
//! its tables are filled beside the live ones from the outbox's first event,
//! then the live tables are made equal to them in one transaction.
//!
//! An operator requests it (`converge projections rebuild NAME`: the row's
//! `rebuild_state = 'requested'`, with an audit entry); a runner of the
//! projection checks it can (the tables exist, its role may write them and
//! create beside them, retention has kept the history), creates the copies
//! (`<table>__rebuild`, `LIKE … INCLUDING ALL`: the same columns, defaults,
//! constraints and indexes) and fills them batch by batch with a cursor of
//! their own — fenced like the live cursor, so any runner may go on after a
//! crash. Once the copies are caught up, one transaction:
//!
//! * locks the live tables `EXCLUSIVE` — writers wait, readers do not — and
//!   gives the copies their last events: for an asynchronous projection up
//!   to the live cursor (its row is locked, so no live batch runs); for an
//!   inline one every committed event (the lock waits for the writers that
//!   applied one to the live tables; the others wait and apply theirs after);
//! * makes each live table equal to its copy, writing only the rows that
//!   differ (compared whole, as text: no key needed), and drops the copies.
//!
//! The live tables keep their identity — grants, indexes, views, foreign
//! keys — and the swap is MVCC-safe: a reader sees the old rows or the new
//! ones, never a mix, whatever its snapshot's age (a table renamed into
//! place would show old snapshots the new table without the swap's last
//! rows, as `TRUNCATE` does). The price is the comparison, while writers
//! wait: it reads both tables whole.
//!
//! The runner records the rebuild in `converge.audit` (action
//! `projection.rebuild`, the requester as actor, `details.requested_in` the
//! request's own entry) when it starts it or refuses it, and settles that
//! entry in the swap's transaction with the rows the swap changed.

mod tables;

pub(crate) use tables::history_thinned;

use sqlx::{PgConnection, Row};

use super::apply::apply_rows;
use super::batch::{apply_batch, Cursor};
use super::fetch::{rows_after, Bound, Position};
use super::names::quoted;
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

/// One step of the projection's rebuild, if one is requested or under way.
pub(super) async fn step(task: &Task) -> Result<RebuildStep, StepError> {
    let row = sqlx::query(
        "SELECT rebuild_state, coalesce(build_cursor_tx_order, 0), coalesce(build_cursor_id, 0), \
                rebuild_audit_id, rebuild_requested_by, version \
         FROM converge.projections WHERE name = $1",
    )
    .bind(task.projection.name())
    .fetch_optional(&task.pool)
    .await?
    .ok_or(StepError::Forgotten)?;
    if row.try_get::<i32, _>(5)? != task.projection.version() as i32 {
        // Another version's rebuild: its runners carry it out.
        return Ok(RebuildStep::Idle);
    }
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

/// Starts a requested rebuild: checks, then creates the copies.
async fn begin(task: &Task, state: &State) -> Result<RebuildStep, StepError> {
    let name = task.projection.name();
    if let Some(why) = tables::refusal(task).await? {
        refuse(task, state, &why).await?;
        return Ok(RebuildStep::Worked);
    }
    let mut tx = task.pool.begin().await?;
    // Only a runner of the registered version claims it (an older one
    // would fill copies of its own declarations), and with the request as
    // it stands now: it may have been cancelled and asked again since
    // `state` was read.
    let claimed: Option<(Option<i64>, Option<String>)> = sqlx::query_as(
        "SELECT rebuild_audit_id, rebuild_requested_by FROM converge.projections \
         WHERE name = $1 AND rebuild_state = 'requested' AND version = $2 \
         FOR UPDATE SKIP LOCKED",
    )
    .bind(name)
    .bind(task.projection.version() as i32)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((audit_id, requested_by)) = claimed else {
        return Ok(RebuildStep::Idle);
    };
    let state = &State {
        rebuild_state: state.rebuild_state.clone(),
        build: state.build,
        audit_id,
        requested_by,
    };
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
        match tables::create_copy(&mut tx, name, table).await {
            Ok(()) => {}
            Err(tables::CopyError::Database(e)) => return Err(e.into()),
            Err(tables::CopyError::Taken(copy)) => {
                drop(tx);
                let why = format!(
                    "a table {copy} exists and is not a converge rebuild copy: rename it \
                     (rebuilds of {name} put their copies there)"
                );
                refuse(task, state, &why).await?;
                return Ok(RebuildStep::Worked);
            }
        }
    }
    tx.commit().await?;
    tracing::info!(
        projection = name,
        "projection rebuild started: filling copies of its tables"
    );
    Ok(RebuildStep::Worked)
}

/// Ends a requested rebuild as refused: the reason on the projection's row
/// and in a settled audit entry.
async fn refuse(task: &Task, state: &State, why: &str) -> Result<(), StepError> {
    let name = task.projection.name();
    tracing::warn!(projection = name, reason = %why, "projection rebuild refused");
    let mut tx = task.pool.begin().await?;
    let refused: Option<(Option<i64>, Option<String>)> = sqlx::query_as(
        "UPDATE converge.projections SET rebuild_state = NULL, rebuild_error = $2 \
         WHERE name = $1 AND rebuild_state = 'requested' AND version = $3 \
         RETURNING rebuild_audit_id, rebuild_requested_by",
    )
    .bind(name)
    .bind(why)
    .bind(task.projection.version() as i32)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((audit_id, requested_by)) = refused {
        let state = &State {
            rebuild_state: state.rebuild_state.clone(),
            build: state.build,
            audit_id,
            requested_by,
        };
        let entry = record(&mut tx, task, state).await?;
        let why = serde_json::json!({ "error": why });
        settle(&mut tx, Some(entry), "failed", why).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Ends a rebuild under way as failed, saying why, and settles its audit
/// entry; the live tables are left as they are.
async fn abandon(task: &Task, why: &str) -> Result<(), StepError> {
    let name = task.projection.name();
    tracing::warn!(projection = name, reason = %why, "projection rebuild abandoned");
    let mut tx = task.pool.begin().await?;
    let audit: Option<Option<i64>> = sqlx::query_scalar(
        "UPDATE converge.projections \
         SET rebuild_state = NULL, rebuild_error = $2, build_cursor_tx_order = NULL, \
             build_cursor_id = NULL, build_applied = NULL \
         WHERE name = $1 AND rebuild_state = 'building' AND version = $3 \
         RETURNING rebuild_audit_id",
    )
    .bind(name)
    .bind(why)
    .bind(task.projection.version() as i32)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(entry) = audit {
        settle(
            &mut tx,
            entry,
            "failed",
            serde_json::json!({ "error": why }),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// One batch into the copies, or the swap once they have caught up.
async fn build(task: &Task, state: &State) -> Result<RebuildStep, StepError> {
    let mut conn = task.pool.acquire().await?;
    let rows = rows_after(
        &mut conn,
        state.build,
        task.config.batch_size,
        task.projection.aggregate_types(),
        Bound::Settled,
        task.config.max_batch_bytes,
    )
    .await?;
    if !rows.full {
        drop(conn);
        return swap(task).await;
    }
    let rows = rows.rows;
    match apply_batch(task, &mut conn, Cursor::Build, state.build, &rows).await? {
        Some(_) => Ok(RebuildStep::Worked),
        None => Ok(RebuildStep::Idle),
    }
}

/// The copies' last events, then the swap, in one transaction.
async fn swap(task: &Task) -> Result<RebuildStep, StepError> {
    let name = task.projection.name();
    let tables = task.projection.tables();
    if task.mode == ProjectionMode::Inline {
        // The last catch-up runs under the writers' lock: only when what is
        // committed after the copies' cursor is small (a long transaction
        // elsewhere holds the settled reads back; wait for it).
        let build: Option<(Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT build_cursor_tx_order, build_cursor_id FROM converge.projections \
             WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&task.pool)
        .await?;
        let Some((Some(t), Some(i))) = build else {
            return Ok(RebuildStep::Idle);
        };
        let mut conn = task.pool.acquire().await?;
        let ahead = rows_after(
            &mut conn,
            (t, i),
            task.config.batch_size,
            task.projection.aggregate_types(),
            Bound::Committed,
            task.config.max_batch_bytes,
        )
        .await?;
        if ahead.full {
            return Ok(RebuildStep::Idle);
        }
    }
    // Retention holds back what a rebuild reads from the moment it is
    // requested; a batch of it already under way then may have deleted an
    // aggregate's first events: look again before installing the copies
    // (once per attempt: a probe per aggregate of the types).
    if tables::history_thinned(&task.pool, task.projection.aggregate_types()).await? {
        abandon(task, "the history lost events while the copies were filled").await?;
        return Ok(RebuildStep::Worked);
    }
    let mut tx = task.pool.begin().await?;
    // A long transaction writing a live table delays the lock, and the
    // writers queue behind the waiting request: wait briefly, try later.
    sqlx::query("SET LOCAL lock_timeout = '2s'")
        .execute(&mut *tx)
        .await?;
    let row = sqlx::query(
        "SELECT rebuild_state, coalesce(cursor_tx_order, 0), coalesce(cursor_id, 0), \
                build_cursor_tx_order, build_cursor_id, build_applied, rebuild_audit_id, version \
         FROM converge.projections WHERE name = $1 FOR UPDATE",
    )
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(StepError::Forgotten)?;
    if row.try_get::<Option<String>, _>(0)?.as_deref() != Some("building")
        || row.try_get::<i32, _>(7)? != task.projection.version() as i32
    {
        return Ok(RebuildStep::Idle);
    }
    let live: Position = (row.try_get(1)?, row.try_get(2)?);
    let mut build: Position = (row.try_get(3)?, row.try_get(4)?);
    let mut applied: i64 = row.try_get(5)?;
    let audit_id: Option<i64> = row.try_get(6)?;
    // Writers of the live tables wait from here to the commit; readers
    // read the old rows meanwhile. Always in one order: two swaps, or a
    // swap and writers locking (inline projections), take them alike.
    let mut sorted: Vec<String> = tables.iter().map(|t| quoted(t)).collect();
    sorted.sort();
    let lock = format!("LOCK TABLE {} IN EXCLUSIVE MODE", sorted.join(", "));
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
    // What follows waits for rows at most (inline: the tables are locked).
    sqlx::query("SET LOCAL lock_timeout = '30s'")
        .execute(&mut *tx)
        .await?;
    let copies = Tables::copies(tables);
    loop {
        let rows = rows_after(
            &mut tx,
            build,
            task.config.batch_size,
            task.projection.aggregate_types(),
            bound,
            task.config.max_batch_bytes,
        )
        .await?
        .rows;
        let Some(last) = rows.last().map(|r| r.position) else {
            break;
        };
        applied += apply_rows(
            task.projection.as_ref(),
            &task.upcasters,
            &mut tx,
            &copies,
            &rows,
            None,
        )
        .await
        .map_err(StepError::Event)?
        .applied;
        build = last;
    }
    if task.mode == ProjectionMode::Async {
        // Nothing of the projection's writes these tables but its batches,
        // kept out by the row lock: a wait here is someone else's lock.
        sqlx::query("SET LOCAL lock_timeout = '2s'")
            .execute(&mut *tx)
            .await?;
        sqlx::query(&lock).execute(&mut *tx).await?;
        sqlx::query("SET LOCAL lock_timeout = '30s'")
            .execute(&mut *tx)
            .await?;
    }
    let mut changed = 0;
    for table in tables {
        match tables::make_equal_to_copy(&mut tx, table).await {
            Ok(n) => changed += n,
            // A constraint the copy's rows break in the live table (one
            // the copy lacks, or a trigger's): every attempt would fail
            // alike, each holding the writers back meanwhile.
            Err(sqlx::Error::Database(db)) if db.code().is_some_and(|c| c.starts_with("23")) => {
                drop(tx);
                let why = format!(
                    "the swap cannot make {table} equal to its copy: {}",
                    db.message()
                );
                abandon(task, &why).await?;
                return Ok(RebuildStep::Worked);
            }
            Err(e) => return Err(e.into()),
        }
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
        serde_json::json!({ "events": applied, "generation": generation, "rows_changed": changed }),
    )
    .await?;
    tx.commit().await?;
    tables::drop_copies(&task.pool, tables).await;
    tracing::info!(
        projection = name,
        events = applied,
        generation,
        rows_changed = changed,
        "projection rebuilt: its tables are equal to their copies"
    );
    Ok(RebuildStep::Worked)
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
