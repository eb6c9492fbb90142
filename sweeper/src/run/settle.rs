//! How a key of a run ends: retried with backoff, given up (dead letter,
//! recover hook, failure row) or left for the next run; every record fenced by
//! the sweep's lease token.

use converge_handlers::{Context, ExclusionLost, Outcome, ReconcileError, RunResult, Trigger};
use tokio_util::sync::CancellationToken;

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
    .with_sweep_lease(&s.config.name, &s.instance, token)
}

/// The run a key belongs to: its id, the sweep lease's token, and the token
/// cancelled once that lease is lost.
pub(super) struct RunRef<'a> {
    pub(super) id: i64,
    pub(super) token: i64,
    pub(super) lease_lost: &'a CancellationToken,
}

/// Counts a key's first result, retrying a retryable failure with backoff up
/// to the policy's attempts, then giving the key up (dead letter, recover
/// hook, failure row). A failing key never stops the run. Returns whether the
/// key is left for the next run because a stop (replacement, shutdown, a
/// lost lease) cut its retries short: the run's saved cursor must not pass
/// it.
pub(super) async fn settle(
    s: &SweepShared,
    run: &RunRef<'_>,
    key: &str,
    first: RunResult,
    counts: &mut RunCounts,
    stops: &Stops,
) -> bool {
    let (run_id, token, lease_lost) = (run.id, run.token, run.lease_lost);
    let cfg = &s.config;
    let mut attempt = 1;
    let mut result = first;
    // Shutting down, replaced, or the sweep's lease is gone: a key that only
    // failed transiently is not retried here (its runs could only fail their
    // fence) and not given up; the next run tries it.
    let stopping = || {
        stops.shutdown.is_cancelled() || stops.supersede.is_cancelled() || lease_lost.is_cancelled()
    };
    loop {
        if let RunResult::Failed(e) = &result {
            // A fence that failed because the sweep's lease is gone: every
            // retry would fail the same way (after repeating the run's work).
            if ExclusionLost::in_error(e).is_some()
                && !lease_lost.is_cancelled()
                && !lease_held(s, token).await
            {
                lease_lost.cancel();
            }
        }
        match result {
            RunResult::Done(Outcome::Changed) => counts.reconciled += 1,
            RunResult::Done(_) => counts.converged += 1,
            // The event path holds the key right now: it is being reconciled.
            RunResult::Busy => counts.busy += 1,
            RunResult::Failed(e)
                if e.is_retryable() && attempt < cfg.retry.max_attempts && !stopping() =>
            {
                let delay = cfg.retry.delay(attempt, e.retry_after_hint());
                if delay > cfg.retry.max_backoff.saturating_mul(2) {
                    // A long Retry-After: this run does not wait for it. It
                    // is recorded for replay and the next pass tries it; it
                    // does not hold the cursor back (capped runs would
                    // otherwise never get past it).
                    interrupted(s, run_id, token, key, &e, attempt, counts).await;
                    return false;
                }
                metrics::counter!(handler_metrics::RETRIES, "reconciler" => cfg.reconciler.clone())
                    .increment(1);
                tokio::select! {
                    _ = stops.shutdown.cancelled() => {}
                    _ = stops.supersede.cancelled() => {}
                    _ = lease_lost.cancelled() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
                if stopping() {
                    interrupted(s, run_id, token, key, &e, attempt, counts).await;
                    return true;
                }
                attempt += 1;
                result = s
                    .run
                    .run_key(context(s, token, attempt), key.to_owned())
                    .await;
                continue;
            }
            RunResult::Failed(e) if e.is_retryable() && attempt < cfg.retry.max_attempts => {
                // Stopping: a key that only failed transiently is not given up.
                interrupted(s, run_id, token, key, &e, attempt, counts).await;
                return true;
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
        return false;
    }
}
