//! Snapshots: an aggregate's state folded up to a version, one per
//! aggregate, tagged with the state's shape version.

use sqlx::PgConnection;

use crate::aggregate::Aggregate;

/// The first page of an aggregate's events after its snapshot, with the
/// snapshot, in one round trip: `$1` aggregate type, `$2` id, `$3` the
/// current shape version, `$4` the page size. The snapshot's row (if any)
/// comes first, with a NULL event id, its version and its state as text;
/// every row also carries the aggregate's head version (column 5), read in
/// the same snapshot.
pub(crate) const FIRST_PAGE: &str = "\
    WITH s AS ( \
        SELECT version, state::text AS state FROM converge.snapshots \
        WHERE aggregate_type = $1 AND aggregate_id = $2 AND shape_version = $3) \
    SELECT page.*, (SELECT h.version FROM converge.outbox_heads h \
                    WHERE h.aggregate_type = $1 AND h.aggregate_id = $2) AS head \
    FROM ( \
        SELECT NULL::uuid AS event_id, s.version, NULL::text AS event_type, \
               NULL::integer AS schema_version, s.state AS payload FROM s \
        UNION ALL \
        (SELECT o.event_id, o.version, o.event_type, o.schema_version, o.payload::text \
         FROM converge.outbox o \
         WHERE o.aggregate_type = $1 AND o.aggregate_id = $2 \
           AND o.version > coalesce((SELECT version FROM s), 0) \
         ORDER BY o.version LIMIT $4)) page \
    ORDER BY page.event_id IS NOT NULL, page.version";

/// A snapshot's state, if it deserializes. One of the current shape that
/// does not (the state's fields changed without a new `SHAPE_VERSION`) is
/// ignored with a warning: the aggregate is folded from its events instead.
pub(crate) fn decode<A: Aggregate>(id: &str, state: &str) -> Option<A> {
    match serde_json::from_str(state) {
        Ok(state) => Some(state),
        Err(error) => {
            tracing::warn!(
                aggregate_type = A::TYPE,
                aggregate_id = id,
                %error,
                "a snapshot of the current SHAPE_VERSION does not deserialize; folding the \
                 history instead (raise Aggregate::SHAPE_VERSION when the state changes)"
            );
            None
        }
    }
}

/// Stores `state` at `version` as the aggregate's snapshot (replacing an
/// older one, or one of another shape), in the caller's transaction.
pub(crate) async fn write<A: Aggregate>(
    conn: &mut PgConnection,
    id: &str,
    version: i64,
    state: &A,
) -> Result<(), sqlx::Error> {
    let state = serde_json::to_string(state).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query(
        "INSERT INTO converge.snapshots AS s (aggregate_type, aggregate_id, shape_version, version, state) \
         VALUES ($1, $2, $3, $4, $5::json) \
         ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE \
             SET shape_version = excluded.shape_version, version = excluded.version, \
                 state = excluded.state, taken_at = now() \
             WHERE s.version < excluded.version OR s.shape_version <> excluded.shape_version",
    )
    .bind(A::TYPE)
    .bind(id)
    .bind(A::SHAPE_VERSION as i32)
    .bind(version)
    .bind(state)
    .execute(conn)
    .await?;
    Ok(())
}
