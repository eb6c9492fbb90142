//! The dead-letter table: keys given up on, with everything needed to retry them.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::error::ReconcileError;
use crate::reconciler::{Context, Reconciler, Trigger};
use crate::run::run_recover;

/// A key a reconciler gave up on.
#[derive(Debug, Clone, sqlx::FromRow)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Row id.
    pub id: i64,
    /// The reconciler's name.
    pub reconciler: String,
    /// The key.
    pub aggregate_key: String,
    /// `event`, `sweep` or `manual`.
    pub path: String,
    /// The event that triggered the last attempt, if one did.
    pub event_id: Option<Uuid>,
    /// The event's subject.
    pub subject: Option<String>,
    /// The last error.
    pub error: String,
    /// Whether the error was permanent (otherwise the attempts ran out).
    pub permanent: bool,
    /// Attempts made.
    pub attempts: i32,
    /// When the first attempt was made (the event's time on the stream).
    pub first_attempt_at: Option<DateTime<Utc>>,
    /// When the key was given up on.
    pub failed_at: DateTime<Utc>,
    /// When the recover hook succeeded.
    pub recovered_at: Option<DateTime<Utc>>,
    /// Why the recover hook failed.
    pub recover_error: Option<String>,
}

impl DeadLetter {
    /// Open (unresolved) dead letters, newest first; all reconcilers when `reconciler` is `None`.
    pub async fn list<'e>(
        executor: impl PgExecutor<'e>,
        reconciler: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, sqlx::Error> {
        sqlx::query_as(
            "SELECT id, reconciler, aggregate_key, path, event_id, subject, error, permanent, \
                    attempts, first_attempt_at, failed_at, recovered_at, recover_error \
             FROM converge.dead_letters \
             WHERE resolved_at IS NULL AND ($1::text IS NULL OR reconciler = $1) \
             ORDER BY id DESC LIMIT $2",
        )
        .bind(reconciler)
        .bind(limit)
        .fetch_all(executor)
        .await
    }
}

/// Gives up on a key: records the dead letter, then runs the reconciler's
/// recover hook under the key's lock and records its result. Returns the dead
/// letter's id (`None` when this event was already recorded and its hook ran). The caller acknowledges the work only after this
/// returned `Ok`: nothing is given up on without a record.
#[allow(clippy::too_many_arguments)]
pub async fn dead_letter_key<R: Reconciler + ?Sized>(
    reconciler: &R,
    name: &str,
    ctx: &Context,
    key: &str,
    error: &ReconcileError,
    attempts: u32,
    first_attempt_at: Option<DateTime<Utc>>,
    lock_wait: std::time::Duration,
) -> Result<Option<i64>, sqlx::Error> {
    let id = record(
        ctx.pool(),
        name,
        key,
        ctx.trigger(),
        error,
        attempts,
        first_attempt_at,
    )
    .await?;
    tracing::error!(reconciler = name, key, attempts, error = %error, "key dead-lettered");
    if let Some(id) = id {
        let recovered = run_recover(reconciler, name, ctx, key, error, lock_wait).await;
        if let Err(e) = &recovered {
            tracing::error!(key, error = %e, "recover hook failed");
        }
        record_recovery(ctx.pool(), id, &recovered).await?;
    }
    Ok(id)
}

/// Records a dead letter; returns its id (None when this event was already recorded).
pub(crate) async fn record<'e>(
    executor: impl PgExecutor<'e>,
    reconciler: &str,
    key: &str,
    trigger: &Trigger,
    error: &ReconcileError,
    attempts: u32,
    first_attempt_at: Option<DateTime<Utc>>,
) -> Result<Option<i64>, sqlx::Error> {
    let event = trigger.event();
    let headers = event.map(|e| serde_json::to_value(&e.headers).unwrap_or_default());
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO converge.dead_letters \
           (reconciler, aggregate_key, path, event_id, subject, headers, payload, error, \
            permanent, attempts, first_attempt_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
         ON CONFLICT (reconciler, event_id) WHERE event_id IS NOT NULL DO NOTHING \
         RETURNING id",
    )
    .bind(reconciler)
    .bind(key)
    .bind(trigger.path())
    .bind(event.map(|e| e.event_id))
    .bind(event.map(|e| e.subject.clone()))
    .bind(headers)
    .bind(event.map(|e| e.payload.to_vec()))
    .bind(error.to_string())
    .bind(!error.is_retryable())
    .bind(attempts as i32)
    .bind(first_attempt_at)
    .fetch_optional(executor)
    .await?;
    if id.is_some() {
        metrics::counter!(
            crate::metrics::DEAD_LETTERS,
            "reconciler" => reconciler.to_owned(),
            "path" => trigger.path()
        )
        .increment(1);
    }
    Ok(id)
}

/// Records the recover hook's result on a dead letter.
pub(crate) async fn record_recovery<'e>(
    executor: impl PgExecutor<'e>,
    id: i64,
    result: &Result<(), ReconcileError>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE converge.dead_letters \
         SET recovered_at = CASE WHEN $2::text IS NULL THEN now() END, recover_error = $2 \
         WHERE id = $1",
    )
    .bind(id)
    .bind(result.as_ref().err().map(|e| e.to_string()))
    .execute(executor)
    .await?;
    Ok(())
}
