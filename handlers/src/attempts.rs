//! The consumer's attempt count: deliveries that could have run.
//!
//! JetStream's delivery count also counts deliveries put back because the
//! key was busy (a sweep or another worker held it), which never ran. The
//! consumer counts those rounds per event and subtracts them: an attempt is a
//! delivery that ran (or crashed while running — a crash-looping event still
//! runs out of attempts). Written only when an event is put back busy.

use sqlx::PgPool;
use uuid::Uuid;

/// The rounds `event_id` was put back busy under `reconciler`.
pub(crate) async fn busy_rounds(
    pool: &PgPool,
    reconciler: &str,
    event_id: Uuid,
) -> Result<u32, sqlx::Error> {
    let rounds: Option<i32> = sqlx::query_scalar(
        "SELECT busy_rounds FROM converge.event_attempts WHERE reconciler = $1 AND event_id = $2",
    )
    .bind(reconciler)
    .bind(event_id)
    .fetch_optional(pool)
    .await?;
    Ok(rounds.unwrap_or(0).max(0) as u32)
}

/// Counts one more busy round.
pub(crate) async fn count_busy(
    pool: &PgPool,
    reconciler: &str,
    event_id: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO converge.event_attempts (reconciler, event_id, busy_rounds) \
         VALUES ($1, $2, 1) \
         ON CONFLICT (reconciler, event_id) DO UPDATE \
             SET busy_rounds = event_attempts.busy_rounds + 1, updated_at = now()",
    )
    .bind(reconciler)
    .bind(event_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Forgets the count once the event is done with (best effort: a row left
/// behind only gives a replay of the same event more attempts).
pub(crate) async fn forget(pool: &PgPool, reconciler: &str, event_id: Uuid) {
    let result =
        sqlx::query("DELETE FROM converge.event_attempts WHERE reconciler = $1 AND event_id = $2")
            .bind(reconciler)
            .bind(event_id)
            .execute(pool)
            .await;
    if let Err(error) = result {
        tracing::warn!(%error, "cannot forget an event's busy rounds");
    }
}
