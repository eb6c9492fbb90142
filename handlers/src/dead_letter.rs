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

/// Gives up on a key: records the dead letter (one open letter per
/// reconciler and key: a later failure updates it; a permanent failure stays
/// the letter's error until it is resolved), then runs the
/// reconciler's recover hook under the key's lease and records its result.
/// The hook runs for a new letter, for a letter whose hook never succeeded,
/// and for every failure on the event path (a replayed or new event that
/// failed again); a sweep failing again on a key whose letter is open and
/// recovered only updates the letter, unless the letter was transient
/// (attempts ran out) and this failure is permanent: then the hook runs
/// again, with the permanent error. Returns the letter's id (`None` for a
/// malformed event recorded before). The caller acknowledges the work only
/// after this returned `Ok`: nothing is given up on without a record. A
/// crash between recording and the hook leaves the letter unrecovered:
/// the consumer runs such hooks later.
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
    let recorded = record(
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
    let Some(Recorded { id, run_hook }) = recorded else {
        return Ok(None);
    };
    if run_hook {
        let recovered = run_recover(reconciler, name, ctx, key, error, lock_wait).await;
        if let Err(e) = &recovered {
            tracing::error!(key, error = %e, "recover hook failed");
        }
        record_recovery(ctx.pool(), id, &recovered).await?;
    }
    Ok(Some(id))
}

/// Runs the recover hook of open letters of `name` whose hook never ran to an
/// end (a crash between recording the letter and the hook): at most `limit`,
/// recorded more than `older_than` ago (so not one being recovered right
/// now). Returns how many hooks ran.
pub(crate) async fn recover_pending<R: Reconciler + ?Sized>(
    reconciler: &R,
    name: &str,
    ctx: &Context,
    older_than: std::time::Duration,
    limit: i64,
    lock_wait: std::time::Duration,
) -> Result<usize, sqlx::Error> {
    let pending: Vec<(i64, String, String, bool)> = sqlx::query_as(
        "SELECT id, aggregate_key, error, permanent FROM converge.dead_letters \
         WHERE reconciler = $1 AND resolved_at IS NULL AND aggregate_key <> '' \
           AND recovered_at IS NULL AND recover_error IS NULL \
           AND failed_at < now() - $2 * interval '1 millisecond' \
         ORDER BY id LIMIT $3",
    )
    .bind(name)
    .bind(older_than.as_millis() as i64)
    .bind(limit)
    .fetch_all(ctx.pool())
    .await?;
    let ran = pending.len();
    for (id, key, message, permanent) in pending {
        let error = if permanent {
            ReconcileError::permanent(message)
        } else {
            ReconcileError::retryable(message)
        };
        tracing::warn!(
            reconciler = name,
            key,
            id,
            "running a recover hook a crash left undone"
        );
        let recovered = run_recover(reconciler, name, ctx, &key, &error, lock_wait).await;
        if let Err(e) = &recovered {
            if e.source_error().is::<crate::run::StayedBusy>() {
                // Someone runs the key (perhaps this very hook): next pass.
                continue;
            }
        }
        record_recovery(ctx.pool(), id, &recovered).await?;
    }
    Ok(ran)
}

/// A recorded dead letter.
pub(crate) struct Recorded {
    /// Its id.
    pub(crate) id: i64,
    /// Whether the recover hook should run (see [`dead_letter_key`]).
    pub(crate) run_hook: bool,
}

/// Records a dead letter: opens one, or updates the key's open letter.
/// `None` for a malformed event (no key) already recorded.
pub(crate) async fn record(
    pool: &sqlx::PgPool,
    reconciler: &str,
    key: &str,
    trigger: &Trigger,
    error: &ReconcileError,
    attempts: u32,
    first_attempt_at: Option<DateTime<Utc>>,
) -> Result<Option<Recorded>, sqlx::Error> {
    let event = trigger.event();
    let headers = event.map(|e| serde_json::to_value(&e.headers).unwrap_or_default());
    // Keyed letters upsert the open letter; a malformed event (no key) is
    // recorded once per event.
    let conflict = if key.is_empty() {
        "ON CONFLICT (reconciler, event_id) \
             WHERE resolved_at IS NULL AND aggregate_key = '' AND event_id IS NOT NULL DO NOTHING"
    } else {
        "ON CONFLICT (reconciler, aggregate_key) WHERE resolved_at IS NULL AND aggregate_key <> '' \
         DO UPDATE SET path = excluded.path, \
             event_id = coalesce(excluded.event_id, d.event_id), \
             subject = coalesce(excluded.subject, d.subject), \
             headers = coalesce(excluded.headers, d.headers), \
             payload = coalesce(excluded.payload, d.payload), \
             error = CASE WHEN d.permanent AND NOT excluded.permanent THEN d.error \
                          ELSE excluded.error END, \
             permanent = d.permanent OR excluded.permanent, \
             attempts = d.attempts + excluded.attempts, \
             failed_at = now(), \
             recovered_at = CASE WHEN $12 AND (d.permanent OR NOT excluded.permanent) \
                                 THEN d.recovered_at END, \
             recover_error = CASE WHEN $12 AND (d.permanent OR NOT excluded.permanent) \
                                  THEN d.recover_error END"
    };
    // The hook runs again unless this is a sweep (or manual) failure of a
    // key whose open letter's hook already succeeded for the same kind of
    // failure: a letter that turns permanent (its attempts had run out on a
    // transient failure, whose hook may have left the key to the next sweep)
    // runs the hook again with the permanent error.
    let sql = format!(
        "INSERT INTO converge.dead_letters AS d \
           (reconciler, aggregate_key, path, event_id, subject, headers, payload, error, \
            permanent, attempts, first_attempt_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) {conflict} \
         RETURNING id, recovered_at IS NULL"
    );
    let keep_recovery = event.is_none();
    let row: Option<(i64, bool)> = sqlx::query_as(&sql)
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
        .bind(keep_recovery)
        .fetch_optional(pool)
        .await?;
    if row.is_some() {
        metrics::counter!(
            crate::metrics::DEAD_LETTERS,
            "reconciler" => reconciler.to_owned(),
            "path" => trigger.path()
        )
        .increment(1);
    }
    Ok(row.map(|(id, unrecovered)| Recorded {
        id,
        run_hook: unrecovered,
    }))
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
