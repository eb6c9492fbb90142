//! Applying outbox rows to a projection inside one transaction.

use converge_outbox::Upcasters;
use sqlx::PgConnection;
use uuid::Uuid;

use super::fetch::OutboxRow;
use super::{DynProjection, ProjectedEvent, ProjectionTx, Tables};
use crate::error::ProjectionError;

/// An event a projection could not apply.
#[derive(Debug)]
pub(crate) struct Failed {
    pub(crate) event_id: Uuid,
    pub(crate) position: super::fetch::Position,
    pub(crate) error: ProjectionError,
}

/// A panic's message, for the error that replaces it.
fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

/// The event of `row` as the projection sees it (payload upcast to the
/// newest shape known), or why it cannot be read.
pub(crate) fn projected(
    row: &OutboxRow,
    payload: &str,
    upcasters: &Upcasters,
) -> Result<ProjectedEvent, ProjectionError> {
    let value: serde_json::Value = serde_json::from_str(payload).map_err(|e| {
        ProjectionError::permanent(format!("event {} is not JSON: {e}", row.event_id))
    })?;
    let stored = u32::try_from(row.schema_version)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| {
            ProjectionError::permanent(format!(
                "event {} has schema_version {}",
                row.event_id, row.schema_version
            ))
        })?;
    let (schema_version, payload) =
        upcasters.upcast(&row.aggregate_type, &row.event_type, stored, value)?;
    Ok(ProjectedEvent {
        event_id: row.event_id,
        aggregate_type: row.aggregate_type.clone(),
        aggregate_id: row.aggregate_id.clone(),
        version: row.version,
        event_type: row.event_type.clone(),
        schema_version,
        occurred_at: row.occurred_at,
        payload,
    })
}

/// What [`apply_rows`] got through.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Applied {
    /// Events applied (rows of types the projection reads).
    pub(crate) applied: i64,
    /// Rows gone through, from the first: the cursor may move past these.
    pub(crate) through: usize,
}

/// Applies each row the projection reads, in order, into `tables`, until
/// the rows end or `until` passes (checked between rows: a prefix is done).
pub(crate) async fn apply_rows(
    projection: &dyn DynProjection,
    upcasters: &Upcasters,
    conn: &mut PgConnection,
    tables: &Tables,
    rows: &[OutboxRow],
    until: Option<std::time::Instant>,
) -> Result<Applied, Failed> {
    let mut applied = 0;
    let mut through = 0;
    for row in rows {
        if through > 0 && until.is_some_and(|u| std::time::Instant::now() >= u) {
            break;
        }
        through += 1;
        let Some(payload) = &row.payload else {
            continue;
        };
        if !projection.reads(&row.aggregate_type) {
            continue;
        }
        let fail = |error| Failed {
            event_id: row.event_id,
            position: row.position,
            error,
        };
        // The upcasters and `apply` are the application's code: a panic is
        // that event's failure (recorded, retried), not the runner's end.
        let event = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            projected(row, payload, upcasters)
        }))
        .unwrap_or_else(|p| {
            Err(ProjectionError::permanent(format!(
                "converting the event panicked: {}",
                panic_message(p)
            )))
        })
        .map_err(fail)?;
        let mut tx = ProjectionTx::new(&mut *conn, tables);
        let applied_one = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
            projection.apply(&mut tx, &event),
        ))
        .await
        .unwrap_or_else(|p| {
            Err(ProjectionError::permanent(format!(
                "apply panicked: {}",
                panic_message(p)
            )))
        });
        applied_one.map_err(fail)?;
        applied += 1;
    }
    Ok(Applied { applied, through })
}
