//! Reading an aggregate's events back.

use sqlx::{PgExecutor, Row};

use crate::error::OutboxError;
use crate::event::StoredEvent;
use crate::Outbox;

impl Outbox {
    /// Reads an aggregate's events in version order, starting after `after_version`
    /// (0 for all of them), at most `limit` events.
    ///
    /// With a retention period set on the relay, only events within it remain
    /// (the aggregate's version does not restart: [`Outbox::version`]); with
    /// [`Retention::Forever`](crate::Retention) this is the aggregate's whole
    /// history. A stored event that cannot be read back (written around the
    /// API: a time outside the years 1 to 9999, headers that are not strings) is an
    /// [`OutboxError::Unreadable`] naming it.
    ///
    /// Payloads are as stored, each with its `schema_version`: bring them to
    /// the current shape with [`StoredEvent::upcast`](crate::StoredEvent::upcast)
    /// or decode them with [`StoredEvent::decode_event`](crate::StoredEvent::decode_event).
    pub async fn history<'e>(
        executor: impl PgExecutor<'e>,
        aggregate_type: &str,
        aggregate_id: &str,
        after_version: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, OutboxError> {
        let rows = sqlx::query(
            "SELECT id, event_id, aggregate_type, aggregate_id, version, event_type, \
                    converge.event_time(occurred_at), \
                    headers::text, payload::text, schema_version \
             FROM converge.outbox \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND version > $3 \
             ORDER BY version LIMIT $4",
        )
        .bind(aggregate_type)
        .bind(aggregate_id)
        .bind(after_version)
        .bind(limit)
        .fetch_all(executor)
        .await
        .map_err(OutboxError::Database)?;
        rows.iter().map(stored_event).collect()
    }
}

fn stored_event(r: &sqlx::postgres::PgRow) -> Result<StoredEvent, OutboxError> {
    let event_id: uuid::Uuid = r.get(1);
    let unreadable = |reason: String| OutboxError::Unreadable { event_id, reason };
    let headers: String = r.get(7);
    let payload: String = r.get(8);
    Ok(StoredEvent {
        position: r.get(0),
        event_id,
        aggregate_type: r.get(2),
        aggregate_id: r.get(3),
        version: r.get(4),
        event_type: r.get(5),
        schema_version: u32::try_from(r.get::<i32, _>(9))
            .ok()
            .filter(|v| *v > 0)
            .ok_or_else(|| unreadable("schema_version is not positive".into()))?,
        occurred_at: r.get::<Option<_>, _>(6).ok_or_else(|| {
            unreadable("occurred_at is not a time between the years 1 and 9999".into())
        })?,
        headers: serde_json::from_str(&headers)
            .map_err(|e| unreadable(format!("headers are not an object of strings: {e}")))?,
        payload: serde_json::from_str(&payload)
            .map_err(|e| unreadable(format!("payload is not JSON: {e}")))?,
    })
}
