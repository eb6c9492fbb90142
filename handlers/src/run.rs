//! Running one key through a reconciler: the one entry point of every path.

use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use tracing::Instrument;

use converge_outbox::TraceParent;

use crate::error::ReconcileError;
use crate::lock::{try_lock, try_lock_all};
use crate::metrics as metrics_names;
use crate::reconciler::{Context, Outcome, Reconciler};

/// How a run of one key ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum RunResult {
    /// The reconciler returned.
    Done(Outcome),
    /// Another run holds the key right now; nothing was done.
    Busy,
    /// The reconciler failed, panicked, or the lock could not be taken.
    Failed(ReconcileError),
}

impl RunResult {
    /// `changed`, `unchanged`, `busy`, `retryable` or `permanent`: for spans and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            RunResult::Done(Outcome::Changed) => "changed",
            RunResult::Done(Outcome::Unchanged) => "unchanged",
            RunResult::Busy => "busy",
            RunResult::Failed(e) if e.is_retryable() => "retryable",
            RunResult::Failed(_) => "permanent",
        }
    }
}

/// Runs `reconciler` (registered as `name`) for `key`, under the key's lock.
///
/// This is the one function behind the event path, sweeps and operators'
/// manual runs: same lock, same panic isolation, same span. A panic is caught
/// and returned as a retryable failure of that key; the caller keeps running.
pub async fn run_key<R: Reconciler + ?Sized>(
    reconciler: &R,
    name: &str,
    ctx: &Context,
    key: &str,
) -> RunResult {
    let lock = match try_lock(ctx.pool(), name, key).await {
        Ok(Some(lock)) => lock,
        Ok(None) => return traced(name, ctx, key, async { RunResult::Busy }).await,
        Err(e) => {
            let failed = RunResult::Failed(ReconcileError::from(e).into_retryable());
            return traced(name, ctx, key, async { failed }).await;
        }
    };
    let result = traced(name, ctx, key, reconcile_caught(reconciler, ctx, key)).await;
    lock.release().await;
    result
}

/// [`run_key`] with the lock taken through the consumer's lock service.
pub(crate) async fn run_key_locked<R: Reconciler + ?Sized>(
    reconciler: &R,
    name: &str,
    ctx: &Context,
    key: &str,
    locker: &crate::lock::Locker,
) -> RunResult {
    let held = match locker.try_lock(name, key).await {
        Ok(Some(held)) => held,
        Ok(None) => return traced(name, ctx, key, async { RunResult::Busy }).await,
        Err(e) => {
            let failed = RunResult::Failed(ReconcileError::retryable(e));
            return traced(name, ctx, key, async { failed }).await;
        }
    };
    let result = traced(name, ctx, key, reconcile_caught(reconciler, ctx, key)).await;
    drop(held);
    result
}

/// Runs `reconciler` for a batch of keys, at most `concurrency` at once: the
/// sweep path's form of [`run_key`], with the same per-key locks, taken and
/// released for the whole batch in one statement each. The held keys go to
/// [`Reconciler::reconcile_batch`] first; when it declines (`None`, the
/// default), each goes through `reconcile`. Keys another run holds come back
/// [`RunResult::Busy`]; keys not started before `stop` is cancelled are not
/// returned.
pub async fn run_keys<R: Reconciler + ?Sized>(
    reconciler: &R,
    name: &str,
    ctx: &Context,
    keys: &[String],
    concurrency: usize,
    stop: &tokio_util::sync::CancellationToken,
) -> Vec<(String, RunResult)> {
    use futures::StreamExt;

    let locks = match try_lock_all(ctx.pool(), name, keys).await {
        Ok(locks) => locks,
        Err(e) => {
            let e = ReconcileError::from(e).into_retryable();
            return keys
                .iter()
                .map(|k| {
                    (
                        k.clone(),
                        RunResult::Failed(ReconcileError::retryable(e.to_string())),
                    )
                })
                .collect();
        }
    };
    let held: Vec<String> = keys
        .iter()
        .zip(locks.held())
        .filter(|(_, h)| *h)
        .map(|(k, _)| k.clone())
        .collect();
    if !held.is_empty() && !stop.is_cancelled() {
        if let Some(results) = batch_caught(reconciler, name, ctx, &held).await {
            let mut results: std::collections::HashMap<String, RunResult> =
                held.into_iter().zip(results).collect();
            let all = keys
                .iter()
                .map(|k| {
                    let r = results.remove(k).unwrap_or(RunResult::Busy);
                    (k.clone(), r)
                })
                .collect();
            locks.release().await;
            return all;
        }
    }
    let mut pending = keys.iter().cloned().zip(locks.held());
    let mut running = futures::stream::FuturesUnordered::new();
    let mut results = Vec::with_capacity(keys.len());
    loop {
        while running.len() < concurrency.max(1) && !stop.is_cancelled() {
            let Some((key, held)) = pending.next() else {
                break;
            };
            running.push(async move {
                let result = if held {
                    traced(name, ctx, &key, reconcile_caught(reconciler, ctx, &key)).await
                } else {
                    traced(name, ctx, &key, async { RunResult::Busy }).await
                };
                (key, result)
            });
        }
        match running.next().await {
            Some(done) => results.push(done),
            None => break,
        }
    }
    locks.release().await;
    results
}

/// The reconciler's batch form, if it has one: one span for the page, a panic
/// or a wrong number of results failing every key of it (retryably).
async fn batch_caught<R: Reconciler + ?Sized>(
    reconciler: &R,
    name: &str,
    ctx: &Context,
    keys: &[String],
) -> Option<Vec<RunResult>> {
    let span = tracing::info_span!(
        "reconcile_batch",
        reconciler = name,
        keys = keys.len(),
        path = ctx.trigger().path(),
        attempt = ctx.attempt(),
    );
    let trace = trace_context(ctx, &span);
    let outcome = TraceParent::scope(
        trace,
        AssertUnwindSafe(reconciler.reconcile_batch(ctx, keys)).catch_unwind(),
    )
    .instrument(span.clone())
    .await;
    let fail_all = |why: String| {
        span.in_scope(|| tracing::error!(error = %why, "batch reconcile failed"));
        Some(
            keys.iter()
                .map(|_| RunResult::Failed(ReconcileError::retryable(why.clone())))
                .collect(),
        )
    };
    let results = match outcome {
        Ok(None) => None,
        Ok(Some(results)) if results.len() == keys.len() => Some(
            results
                .into_iter()
                .map(|r| match r {
                    Ok(outcome) => RunResult::Done(outcome),
                    Err(e) => RunResult::Failed(e),
                })
                .collect(),
        ),
        Ok(Some(results)) => fail_all(format!(
            "reconcile_batch returned {} results for {} keys",
            results.len(),
            keys.len()
        )),
        Err(_) => fail_all("reconcile_batch panicked".into()),
    };
    for result in results.iter().flatten() {
        count_run(name, ctx, result, None);
    }
    results
}

/// The reconcile itself, with a panic turned into a retryable failure.
async fn reconcile_caught<R: Reconciler + ?Sized>(
    reconciler: &R,
    ctx: &Context,
    key: &str,
) -> RunResult {
    match AssertUnwindSafe(reconciler.reconcile(ctx, key))
        .catch_unwind()
        .await
    {
        Ok(Ok(outcome)) => RunResult::Done(outcome),
        Ok(Err(e)) => RunResult::Failed(e),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            tracing::error!(panic = %message, "reconciler panicked");
            RunResult::Failed(ReconcileError::retryable(format!(
                "reconciler panicked: {message}"
            )))
        }
    }
}

/// One span per reconcile: reconciler, key, path, event id, attempt, trace id,
/// traceparent, outcome; and the reconcile metrics.
///
/// The run happens inside [`TraceParent::scope`]: for an event, a child of the
/// event's `traceparent`; otherwise [`TraceParent::current`] (a new trace
/// unless the caller runs in one). The span's `traceparent` field is that
/// context.
async fn traced(
    name: &str,
    ctx: &Context,
    key: &str,
    run: impl std::future::Future<Output = RunResult>,
) -> RunResult {
    let event_id = ctx.trigger().event().map(|e| e.event_id.to_string());
    let span = tracing::info_span!(
        "reconcile",
        reconciler = name,
        key,
        path = ctx.trigger().path(),
        event_id = event_id.as_deref(),
        attempt = ctx.attempt(),
        trace_id = tracing::field::Empty,
        traceparent = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    let trace = trace_context(ctx, &span);
    if !span.is_disabled() {
        span.record("trace_id", trace.trace_id().as_str());
        span.record("traceparent", tracing::field::display(&trace));
    }
    let started = std::time::Instant::now();
    let result = TraceParent::scope(trace, run)
        .instrument(span.clone())
        .await;
    count_run(name, ctx, &result, Some(started.elapsed()));
    span.record("outcome", result.label());
    if let RunResult::Failed(e) = &result {
        span.in_scope(|| tracing::warn!(error = %e, "reconcile failed"));
    }
    result
}

/// The trace context a run of `ctx` executes in (see [`traced`]); with the
/// `opentelemetry` feature, also makes the event's context the span's parent
/// and prefers the span's own OpenTelemetry context.
fn trace_context(ctx: &Context, span: &tracing::Span) -> TraceParent {
    let incoming = ctx.trigger().event().and_then(|e| e.traceparent);
    #[cfg(feature = "opentelemetry")]
    {
        if let Some(parent) = incoming {
            parent.set_parent_of(span);
        }
        if let Some(own) = TraceParent::from_span(span) {
            return own;
        }
    }
    #[cfg(not(feature = "opentelemetry"))]
    let _ = span;
    match incoming {
        Some(parent) => parent.child(),
        None => TraceParent::current(),
    }
}

/// Records `converge_reconciles_total` and, for a run that reconciled,
/// `converge_reconcile_duration_seconds`.
fn count_run(name: &str, ctx: &Context, result: &RunResult, took: Option<std::time::Duration>) {
    let path = ctx.trigger().path();
    metrics::counter!(
        metrics_names::RECONCILES,
        "reconciler" => name.to_owned(),
        "path" => path,
        "outcome" => result.label()
    )
    .increment(1);
    if let Some(took) = took.filter(|_| !matches!(result, RunResult::Busy)) {
        metrics::histogram!(
            metrics_names::RECONCILE_DURATION,
            "reconciler" => name.to_owned(),
            "path" => path
        )
        .record(took.as_secs_f64());
    }
}

/// Runs the recover hook under the key's lock, waiting for the lock a while.
pub(crate) async fn run_recover<R: Reconciler + ?Sized>(
    reconciler: &R,
    name: &str,
    ctx: &Context,
    key: &str,
    error: &ReconcileError,
    lock_wait: std::time::Duration,
) -> Result<(), ReconcileError> {
    let deadline = tokio::time::Instant::now() + lock_wait;
    let lock = loop {
        match try_lock(ctx.pool(), name, key).await? {
            Some(lock) => break lock,
            None if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            None => {
                return Err(ReconcileError::retryable(format!(
                    "key {key} stayed locked for {lock_wait:?}; recover hook not run"
                )))
            }
        }
    };
    // The hook continues the event's trace, as the reconcile did.
    let trace = ctx
        .trigger()
        .event()
        .and_then(|e| e.traceparent)
        .map_or_else(TraceParent::current, |parent| parent.child());
    let result = TraceParent::scope(
        trace,
        AssertUnwindSafe(reconciler.recover(ctx, key, error)).catch_unwind(),
    )
    .await;
    lock.release().await;
    result.unwrap_or_else(|_| Err(ReconcileError::permanent("recover hook panicked")))
}
