//! Snapshots: an aggregate's state folded up to a version, one per
//! aggregate, tagged with the state's shape version.

use sqlx::PgConnection;

use crate::aggregate::Aggregate;

/// The aggregate's snapshot, if it has one of the current shape that
/// deserializes: `(version, state)`. A snapshot that does not deserialize
/// (the state's fields changed without a new `SHAPE_VERSION`) is ignored
/// with a warning: the aggregate is folded from its events instead.
pub(crate) async fn read<A: Aggregate>(
    conn: &mut PgConnection,
    id: &str,
) -> Result<Option<(i64, A)>, sqlx::Error> {
    let row: Option<(i64, String)> = sqlx::query_as(
        "SELECT version, state::text FROM converge.snapshots \
         WHERE aggregate_type = $1 AND aggregate_id = $2 AND shape_version = $3",
    )
    .bind(A::TYPE)
    .bind(id)
    .bind(A::SHAPE_VERSION as i32)
    .fetch_optional(conn)
    .await?;
    Ok(
        row.and_then(|(version, state)| match serde_json::from_str(&state) {
            Ok(state) => Some((version, state)),
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
        }),
    )
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
