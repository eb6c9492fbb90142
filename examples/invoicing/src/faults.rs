//! Faults injected around the reconciler, for demos and the reliability
//! suite: the reconciler itself ([`crate::reconciler`]) is the code an
//! application would ship, with no fault in its path.

use std::sync::Arc;

use converge::handlers::{Context, EventHint, Outcome, ReconcileError, Reconciler, StepHook};

use crate::reconciler::ReconcileStats;

/// Faults to inject.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Probability (0 to 1) that a reconcile fails transiently before doing anything.
    pub fail_rate: f64,
    /// Probability (0 to 1) that the process aborts right after claiming
    /// `INVOICING`, before the invoice exists.
    pub crash_after_claim: f64,
    /// Orders whose id is a multiple of this fail permanently (they end in
    /// dead letters and `FAILED`; nothing else is held up).
    pub fail_every: Option<u64>,
}

impl Faults {
    /// No faults.
    pub const NONE: Faults = Faults {
        fail_rate: 0.0,
        crash_after_claim: 0.0,
        fail_every: None,
    };
}

/// An injected transient failure.
#[derive(Debug, thiserror::Error)]
#[error("injected transient failure (--fail-rate)")]
pub struct InjectedFailure;

/// An injected permanent failure.
#[derive(Debug, thiserror::Error)]
#[error("injected permanent failure: order {0} has no billing account (--fail-every)")]
pub struct InjectedPermanentFailure(pub String);

fn chance(probability: f64) -> bool {
    probability > 0.0 && rand::random::<f64>() < probability
}

/// Aborts the process at the step `claimed` with the given probability
/// (`--crash-after-claim`): a worker dying between its two commits.
#[derive(Debug)]
struct AbortAfterClaim(f64);

impl StepHook for AbortAfterClaim {
    fn on_step(&self, name: &str) -> Result<(), ReconcileError> {
        if name == "claimed" && chance(self.0) {
            tracing::error!("--crash-after-claim: aborting after the claim, before the invoice");
            std::process::abort();
        }
        Ok(())
    }
}

/// A reconciler with [`Faults`] injected before it runs and at its steps.
#[derive(Debug, Clone)]
pub struct WithFaults<R> {
    inner: R,
    faults: Faults,
    stats: Arc<ReconcileStats>,
}

impl<R: Reconciler> WithFaults<R> {
    /// `inner` with `faults`; injected failures are counted in `stats`.
    pub fn new(inner: R, faults: Faults, stats: Arc<ReconcileStats>) -> Self {
        WithFaults {
            inner,
            faults,
            stats,
        }
    }
}

impl<R: Reconciler> Reconciler for WithFaults<R> {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        if chance(self.faults.fail_rate) {
            self.stats.injected_failure();
            return Err(ReconcileError::retryable(InjectedFailure));
        }
        if let Some(every) = self.faults.fail_every {
            if key
                .parse::<u64>()
                .is_ok_and(|id| every > 0 && id % every == 0)
            {
                return Err(ReconcileError::permanent(InjectedPermanentFailure(
                    key.to_owned(),
                )));
            }
        }
        if self.faults.crash_after_claim > 0.0 {
            let ctx = ctx
                .clone()
                .with_step_hook(Arc::new(AbortAfterClaim(self.faults.crash_after_claim)));
            return self.inner.reconcile(&ctx, key).await;
        }
        self.inner.reconcile(ctx, key).await
    }

    fn key_for(&self, event: &EventHint) -> Option<String> {
        self.inner.key_for(event)
    }

    // `reconcile_batch` is left at its default (none): faults are injected
    // key by key, so a sweep's page goes through `reconcile`.

    async fn recover(
        &self,
        ctx: &Context,
        key: &str,
        error: &ReconcileError,
    ) -> Result<(), ReconcileError> {
        self.inner.recover(ctx, key, error).await
    }
}
