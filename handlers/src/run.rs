//! Running one key through a reconciler: the one entry point of every path.

use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use tracing::Instrument;

use converge_outbox::TraceParent;

use crate::error::ReconcileError;
use crate::exclusion::ExclusionLost;
use crate::lease::{guarded, FenceState, HeldLease, KeyLeases, LeasePool, LeaseTimes};
use crate::metrics as metrics_names;
use crate::reconciler::{Context, Outcome, Reconciler, Trigger};

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
    /// `changed`, `unchanged`, `busy`, `interrupted` (the key's lease was
    /// lost and the run stopped), `retryable` or `permanent`: for spans and
    /// metrics.
    pub fn label(&self) -> &'static str {
        match self {
            RunResult::Done(Outcome::Changed) => "changed",
            RunResult::Done(Outcome::Unchanged) => "unchanged",
            RunResult::Busy => "busy",
            RunResult::Failed(e) if ExclusionLost::in_error(e).is_some() => "interrupted",
            RunResult::Failed(e) if e.is_retryable() => "retryable",
            RunResult::Failed(_) => "permanent",
        }
    }
}

/// Runs `reconciler` (registered as `name`) for `key`, under the key's lease.
///
/// This is the one function behind the event path, sweeps and operators'
/// manual runs: same lease, same panic isolation, same span. A panic is caught
/// and returned as a retryable failure of that key; the caller keeps running.
/// When the lease is lost while the reconcile runs, the reconcile is stopped
/// (dropped at its next `.await`) and the run fails with
/// [`ExclusionLost`](crate::ExclusionLost), retryable.
pub async fn run_key<R: Reconciler + ?Sized>(
    reconciler: &R,
    name: &str,
    ctx: &Context,
    key: &str,
) -> RunResult {
    let leases = KeyLeases::start(
        LeasePool::shared(ctx.pool().clone()),
        ctx.claimant().to_owned(),
        times(ctx),
    );
    run_key_leased(reconciler, name, ctx, key, &leases, true).await
}

/// The lease times of runs of `ctx`.
pub(crate) fn times(ctx: &Context) -> LeaseTimes {
    LeaseTimes { ttl: ctx.key_lease }
}

/// [`run_key`] with the lease taken through a running lease service.
pub(crate) async fn run_key_leased<R: Reconciler + ?Sized>(
    reconciler: &R,
    name: &str,
    ctx: &Context,
    key: &str,
    leases: &KeyLeases,
    wait_for_release: bool,
) -> RunResult {
    let held = match leases.try_acquire_one(name, key).await {
        Ok(Some(held)) => held,
        Ok(None) => return traced(name, ctx, key, async { RunResult::Busy }).await,
        Err(e) => {
            let failed = RunResult::Failed(ReconcileError::retryable(e));
            return traced(name, ctx, key, async { failed }).await;
        }
    };
    let ctx = ctx.for_run(held.fence.clone());
    let result = traced(
        name,
        &ctx,
        key,
        reconcile_fenced(reconciler, &ctx, key, &held),
    )
    .await;
    if wait_for_release {
        held.release(converged(&ctx, &result)).await;
    } else {
        held.release_later(converged(&ctx, &result));
    }
    result
}

/// The reconcile of a leased key, stopped when the lease is lost.
async fn reconcile_fenced<R: Reconciler + ?Sized>(
    reconciler: &R,
    ctx: &Context,
    key: &str,
    held: &HeldLease,
) -> RunResult {
    match guarded(&[&held.fence], reconcile_caught(reconciler, ctx, key)).await {
        Some(result) => result,
        None => lost(&held.fence),
    }
}

/// Whether `result` resolves the key's open dead letter: the run changed the
/// key, on the event or sweep path (an operator's retry resolves its letter
/// itself, as `retried`). `Unchanged` does not: it cannot tell a converged
/// key from one that is not this reconciler's business.
fn converged(ctx: &Context, result: &RunResult) -> bool {
    matches!(result, RunResult::Done(Outcome::Changed))
        && !matches!(ctx.trigger(), Trigger::Manual { .. })
}

/// The result of a run whose lease was lost.
fn lost(fence: &FenceState) -> RunResult {
    crate::metrics::count_lease_loss(&fence.reconciler);
    tracing::error!(
        reconciler = %fence.reconciler,
        key = %fence.key,
        token = fence.token,
        "key lease lost: the run was stopped"
    );
    RunResult::Failed(lost_error(fence))
}

/// The error of a run whose lease was lost.
fn lost_error(fence: &FenceState) -> ReconcileError {
    ExclusionLost {
        reconciler: fence.reconciler.clone(),
        key: fence.key.clone(),
        token: fence.token,
    }
    .into()
}

/// Runs `reconciler` for a batch of keys, at most `concurrency` at once: the
/// sweep path's form of [`run_key`], with the same per-key leases, taken for
/// the whole batch in one statement and each released as soon as its key is
/// done. The held keys go to [`Reconciler::reconcile_batch`] first; when it
/// declines (`None`, the default), each goes through `reconcile`. Keys
/// another run holds come back [`RunResult::Busy`]; keys not started before
/// `stop` is cancelled are not returned (their leases are released).
pub async fn run_keys<R: Reconciler + ?Sized>(
    reconciler: &R,
    name: &str,
    ctx: &Context,
    keys: &[String],
    concurrency: usize,
    stop: &tokio_util::sync::CancellationToken,
) -> Vec<(String, RunResult)> {
    use futures::StreamExt;

    let leases = KeyLeases::start(
        LeasePool::shared(ctx.pool().clone()),
        ctx.claimant().to_owned(),
        times(ctx),
    );
    // A key given twice is leased once (the second is busy).
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<String> = keys.iter().filter(|k| seen.insert(*k)).cloned().collect();
    let mut granted: std::collections::HashMap<String, HeldLease> =
        match leases.try_acquire(name, unique.clone()).await {
            Ok(held) => unique
                .into_iter()
                .zip(held)
                .filter_map(|(k, h)| h.map(|h| (k, h)))
                .collect(),
            Err(e) => {
                return keys
                    .iter()
                    .map(|k| {
                        (
                            k.clone(),
                            RunResult::Failed(ReconcileError::retryable(e.clone())),
                        )
                    })
                    .collect();
            }
        };
    let mut pending: Vec<(String, Option<HeldLease>)> = keys
        .iter()
        .map(|k| (k.clone(), granted.remove(k)))
        .collect();
    let held: Vec<String> = pending
        .iter()
        .filter(|(_, h)| h.is_some())
        .map(|(k, _)| k.clone())
        .collect();
    if !held.is_empty() && !stop.is_cancelled() {
        let fences: Vec<&HeldLease> = pending.iter().filter_map(|(_, h)| h.as_ref()).collect();
        let page = ctx.for_batch();
        if let Some(results) = batch_caught(reconciler, name, &page, &held, &fences).await {
            let mut results: std::collections::HashMap<String, RunResult> =
                held.into_iter().zip(results).collect();
            let mut all = Vec::with_capacity(pending.len());
            let mut leases = Vec::new();
            for (k, lease) in pending {
                let r = results.remove(&k).unwrap_or(RunResult::Busy);
                leases.extend(lease.map(|l| (l, converged(ctx, &r))));
                all.push((k, r));
            }
            futures::future::join_all(leases.into_iter().map(|(l, c)| l.release(c))).await;
            return all;
        }
    }
    let mut pending = std::mem::take(&mut pending).into_iter();
    let mut running = futures::stream::FuturesUnordered::new();
    let mut results = Vec::with_capacity(keys.len());
    loop {
        while running.len() < concurrency.max(1) && !stop.is_cancelled() {
            let Some((key, held)) = pending.next() else {
                break;
            };
            running.push(async move {
                let result = match held {
                    Some(held) => {
                        let ctx = ctx.for_run(held.fence.clone());
                        let r = traced(
                            name,
                            &ctx,
                            &key,
                            reconcile_fenced(reconciler, &ctx, &key, &held),
                        )
                        .await;
                        // Now, not at the end of the page.
                        held.release(converged(&ctx, &r)).await;
                        r
                    }
                    None => traced(name, ctx, &key, async { RunResult::Busy }).await,
                };
                (key, result)
            });
        }
        match running.next().await {
            Some(done) => results.push(done),
            None => break,
        }
    }
    // Keys a stop kept from starting: free at once.
    let unstarted = pending.filter_map(|(_, lease)| lease);
    futures::future::join_all(unstarted.map(|l| l.release(false))).await;
    results
}

/// The reconciler's batch form, if it has one: one span for the page, a panic
/// or a wrong number of results failing every key of it (retryably).
async fn batch_caught<R: Reconciler + ?Sized>(
    reconciler: &R,
    name: &str,
    ctx: &Context,
    keys: &[String],
    fences: &[&HeldLease],
) -> Option<Vec<RunResult>> {
    let span = tracing::info_span!(
        "reconcile_batch",
        reconciler = name,
        keys = keys.len(),
        path = ctx.trigger().path(),
        attempt = ctx.attempt(),
    );
    let trace = trace_context(ctx, &span);
    // The page runs while every one of its leases holds: the first lost one
    // stops it (and fails each key, retryably).
    let run = TraceParent::scope(
        trace,
        AssertUnwindSafe(reconciler.reconcile_batch(ctx, keys)).catch_unwind(),
    )
    .instrument(span.clone());
    let guards: Vec<&FenceState> = fences.iter().map(|h| &*h.fence).collect();
    let outcome = match guarded(&guards, run).await {
        Some(outcome) => outcome,
        None => {
            let lost_one = fences.iter().find(|h| h.fence.is_lost()).map(|h| &h.fence);
            let why = lost_one.map_or_else(
                || "a key lease of the page was lost".to_owned(),
                |f| {
                    format!(
                        "the lease on key {:?} was lost; the page was stopped",
                        f.key
                    )
                },
            );
            span.in_scope(|| tracing::error!(error = %why, "batch reconcile stopped"));
            if let Some(f) = lost_one {
                crate::metrics::count_lease_loss(&f.reconciler);
            }
            return Some(
                fences
                    .iter()
                    .map(|h| RunResult::Failed(lost_error(&h.fence)))
                    .collect(),
            );
        }
    };
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

/// The recover hook could not run: its key stayed busy.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct StayedBusy(String);

/// Runs the recover hook under the key's lease, waiting for the key a while.
/// The hook holds no connection while it waits or runs beyond what it uses.
pub(crate) async fn run_recover<R: Reconciler + ?Sized>(
    reconciler: &R,
    name: &str,
    ctx: &Context,
    key: &str,
    error: &ReconcileError,
    lock_wait: std::time::Duration,
) -> Result<(), ReconcileError> {
    let leases = KeyLeases::start(
        LeasePool::shared(ctx.pool().clone()),
        ctx.claimant().to_owned(),
        times(ctx),
    );
    let deadline = tokio::time::Instant::now() + lock_wait;
    let held = loop {
        match leases
            .try_acquire_one(name, key)
            .await
            .map_err(ReconcileError::retryable)?
        {
            Some(held) => break held,
            None if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            None => {
                return Err(ReconcileError::retryable(StayedBusy(format!(
                    "key {key} stayed busy for {lock_wait:?}; recover hook not run"
                ))))
            }
        }
    };
    let ctx = ctx.for_run(held.fence.clone());
    // The hook continues the event's trace, as the reconcile did.
    let trace = ctx
        .trigger()
        .event()
        .and_then(|e| e.traceparent)
        .map_or_else(TraceParent::current, |parent| parent.child());
    let hook = TraceParent::scope(
        trace,
        AssertUnwindSafe(reconciler.recover(&ctx, key, error)).catch_unwind(),
    );
    let result = guarded(&[&held.fence], hook).await;
    held.release(false).await;
    match result {
        Some(Ok(result)) => result,
        Some(Err(_)) => Err(ReconcileError::permanent("recover hook panicked")),
        None => Err(lost_error(&ctx.fence.clone().expect("set for the run"))),
    }
}
