//! How a key of a run ends: retried with backoff, given up (dead letter,
//! recover hook, failure row) or left for the next run; every record fenced by
//! the sweep's lease token.

use converge_handlers::{Context, Outcome, ReconcileError, RunResult, Trigger};

use super::{Stops, SweepShared};
use crate::history::RunCounts;
use converge_handlers::metrics as handler_metrics;

/// A key whose retries a stop cut short: counted failed in this run and
/// recorded for replay, but not dead-lettered (the next run tries it again).
async fn interrupted(
    s: &SweepShared,
    run_id: i64,
    token: i64,
    key: &str,
    e: &ReconcileError,
    attempt: u32,
    counts: &mut RunCounts,
) {
    counts.failed += 1;
    record_failure(
        s,
        run_id,
        token,
        key,
        &format!("interrupted after: {e}"),
        attempt,
    )
    .await;
}

/// Records a failed key of the run, fenced by the sweep's lease token: a
/// holder that lost its lease records nothing.
async fn record_failure(
    s: &SweepShared,
    run_id: i64,
    token: i64,
    key: &str,
    message: &str,
    attempt: u32,
) {
    let recorded = sqlx::query(
        "INSERT INTO converge.sweep_run_failures (run_id, aggregate_key, error, attempts) \
         SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM converge.leases \
             WHERE name = $5 AND token = $6 AND lock_until > now()) \
         ON CONFLICT DO NOTHING",
    )
    .bind(run_id)
    .bind(key)
    .bind(message)
    .bind(attempt as i32)
    .bind(&s.config.name)
    .bind(token)
    .execute(&s.pool)
    .await;
    if let Err(db) = recorded {
        tracing::warn!(error = %db, key, "cannot record a failed sweep key");
    }
}

/// Whether the sweep's lease with `token` is still held (database clock).
async fn lease_held(s: &SweepShared, token: i64) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM converge.leases \
                        WHERE name = $1 AND token = $2 AND lock_until > now())",
    )
    .bind(&s.config.name)
    .bind(token)
    .fetch_one(&s.pool)
    .await
    .unwrap_or(false)
}

/// The context of the sweep's runs under its lease at `token`.
pub(super) fn context(s: &SweepShared, token: i64, attempt: u32) -> Context {
    Context::new(
        s.pool.clone(),
        Trigger::Sweep {
            sweep: s.config.name.clone(),
        },
        attempt,
        s.limits.clone(),
        format!("{}/{}", s.instance, s.config.name),
    )
    .with_key_lease(s.config.key_lease)
    .with_sweep_lease(&s.config.name, token)
}

/// Counts a key's first result, retrying a retryable failure with backoff up
/// to the policy's attempts, then giving the key up (dead letter, recover
/// hook, failure row). A failing key never stops the run.
pub(super) async fn settle(
    s: &SweepShared,
    run_id: i64,
    token: i64,
    key: &str,
    first: RunResult,
    counts: &mut RunCounts,
    stops: &Stops,
) {
    let cfg = &s.config;
    let mut attempt = 1;
    let mut result = first;
    loop {
        match result {
            RunResult::Done(Outcome::Changed) => counts.reconciled += 1,
            RunResult::Done(_) => counts.converged += 1,
            // The event path holds the key right now: it is being reconciled.
            RunResult::Busy => counts.busy += 1,
            RunResult::Failed(e)
                if e.is_retryable()
                    && attempt < cfg.retry.max_attempts
                    && !stops.shutdown.is_cancelled()
                    && !stops.supersede.is_cancelled() =>
            {
                let delay = cfg.retry.delay(attempt, e.retry_after_hint());
                if delay > cfg.retry.max_backoff.saturating_mul(2) {
                    // A long Retry-After: the next run tries the key, this
                    // one does not wait for it.
                    interrupted(s, run_id, token, key, &e, attempt, counts).await;
                    return;
                }
                metrics::counter!(handler_metrics::RETRIES, "reconciler" => cfg.reconciler.clone())
                    .increment(1);
                tokio::select! {
                    _ = stops.shutdown.cancelled() => {}
                    _ = stops.supersede.cancelled() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
                if stops.shutdown.is_cancelled() || stops.supersede.is_cancelled() {
                    interrupted(s, run_id, token, key, &e, attempt, counts).await;
                    return;
                }
                attempt += 1;
                result = (s.run)(context(s, token, attempt), key.to_owned()).await;
                continue;
            }
            RunResult::Failed(e)
                if e.is_retryable()
                    && attempt < cfg.retry.max_attempts
                    && (stops.shutdown.is_cancelled() || stops.supersede.is_cancelled()) =>
            {
                // Stopping: a key that only failed transiently is not given up.
                interrupted(s, run_id, token, key, &e, attempt, counts).await;
            }
            other => {
                let e = match other {
                    RunResult::Failed(e) => e,
                    _ => ReconcileError::retryable("unexpected run result"),
                };
                counts.failed += 1;
                let message = e.to_string();
                // Fenced: only while this instance holds the sweep's lease.
                if lease_held(s, token).await {
                    if let Err(db) =
                        (s.give_up)(context(s, token, attempt), key.to_owned(), e, attempt).await
                    {
                        tracing::warn!(error = %db, key, "cannot record the dead letter of a sweep key");
                    }
                } else {
                    tracing::warn!(key, "sweep lease lost: the key is not given up here");
                }
                record_failure(s, run_id, token, key, &message, attempt).await;
            }
        }
        return;
    }
}
