//! One batch: the rows read after a cursor applied in one transaction that
//! holds the projection's row locked at that cursor, and moves the cursor —
//! the live one, or a rebuild's. Whoever locks the row with the cursor it
//! read (and its version) applies the batch; another runner, the row moved
//! meanwhile, or a newer version registered, finds nothing to lock and
//! leaves it.

use super::apply::apply_rows;
use super::fetch::{OutboxRow, Position};
use super::runner::{StepError, Task};
use super::Tables;

/// Which cursor a batch moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cursor {
    /// The live read model's.
    Live,
    /// A rebuild's copies'.
    Build,
}

impl Cursor {
    fn lock_sql(self) -> &'static str {
        match self {
            Cursor::Live => {
                "SELECT 1 FROM converge.projections \
                 WHERE name = $1 AND cursor_tx_order = $2 AND cursor_id = $3 AND version = $4 \
                 FOR UPDATE SKIP LOCKED"
            }
            Cursor::Build => {
                "SELECT 1 FROM converge.projections \
                 WHERE name = $1 AND rebuild_state = 'building' \
                   AND build_cursor_tx_order = $2 AND build_cursor_id = $3 AND version = $4 \
                 FOR UPDATE SKIP LOCKED"
            }
        }
    }

    fn advance_sql(self) -> &'static str {
        match self {
            Cursor::Live => {
                "UPDATE converge.projections \
                 SET cursor_tx_order = $2, cursor_id = $3, applied = applied + $4, \
                     last_applied_at = CASE WHEN $4 > 0 THEN now() ELSE last_applied_at END, \
                     error = NULL, error_event_id = NULL, error_at = NULL \
                 WHERE name = $1"
            }
            Cursor::Build => {
                "UPDATE converge.projections \
                 SET build_cursor_tx_order = $2, build_cursor_id = $3, \
                     build_applied = build_applied + $4, rebuild_error = NULL \
                 WHERE name = $1"
            }
        }
    }

    fn tables(self, declared: &[&str]) -> Tables {
        match self {
            Cursor::Live => Tables::live(declared),
            Cursor::Build => Tables::copies(declared),
        }
    }
}

/// Applies `rows` (read after `from`) as one batch moving `cursor`, for at
/// most the runner's `max_batch_duration`. Returns the events applied, or
/// `None` when another runner holds the batch or moved the cursor.
pub(super) async fn apply_batch(
    task: &Task,
    conn: &mut sqlx::PgConnection,
    cursor: Cursor,
    from: Position,
    rows: &[OutboxRow],
) -> Result<Option<i64>, StepError> {
    let name = task.projection.name();
    let mut tx = sqlx::Connection::begin(conn).await?;
    // The cursor read, and this build's version: a runner of an older
    // version never applies a batch once a newer one registered.
    let mine: Option<i32> = sqlx::query_scalar(cursor.lock_sql())
        .bind(name)
        .bind(from.0)
        .bind(from.1)
        .bind(task.projection.version() as i32)
        .fetch_optional(&mut *tx)
        .await?;
    if mine.is_none() {
        return Ok(None);
    }
    let tables = cursor.tables(task.projection.tables());
    let until = std::time::Instant::now() + task.config.max_batch_duration;
    let done = apply_rows(
        task.projection.as_ref(),
        &task.upcasters,
        &mut tx,
        &tables,
        rows,
        Some(until),
    )
    .await
    .map_err(StepError::Event)?;
    let last = rows[done.through - 1].position;
    sqlx::query(cursor.advance_sql())
        .bind(name)
        .bind(last.0)
        .bind(last.1)
        .bind(done.applied)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(done.applied))
}
