//! Faults injected around the saga, for the demo and the fault tests: the
//! saga itself ([`crate::saga`]) is the code an application would ship.

use std::sync::Arc;

use converge::handlers::{Context, EventHint, Outcome, ReconcileError, Reconciler, StepHook};

/// Faults to inject.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Probability (0 to 1) that a run fails transiently before doing anything.
    pub fail_rate: f64,
    /// Probability (0 to 1) that a run stops right after the debit commits,
    /// leaving the transfer `DEBITED` (as a crash there would).
    pub stop_after_debit: f64,
    /// Abort the process there instead of failing the run.
    pub abort: bool,
}

fn chance(probability: f64) -> bool {
    probability > 0.0 && rand::random::<f64>() < probability
}

/// An injected transient failure.
#[derive(Debug, thiserror::Error)]
#[error("injected transient failure (--fail-rate)")]
pub struct InjectedFailure;

/// Stops a run at the saga's `debited` step.
#[derive(Debug)]
struct StopAfterDebit {
    probability: f64,
    abort: bool,
}

impl StepHook for StopAfterDebit {
    fn on_step(&self, name: &str) -> Result<(), ReconcileError> {
        if name == "debited" && chance(self.probability) {
            if self.abort {
                tracing::error!("--stop-after-debit: aborting between the debit and the credit");
                std::process::abort();
            }
            return Err(ReconcileError::retryable(InjectedFailure));
        }
        Ok(())
    }
}

/// A reconciler with [`Faults`] around it.
#[derive(Debug)]
pub struct WithFaults<R> {
    inner: R,
    faults: Faults,
}

impl<R: Reconciler> WithFaults<R> {
    /// `inner` with `faults`.
    pub fn new(inner: R, faults: Faults) -> Self {
        WithFaults { inner, faults }
    }
}

impl<R: Reconciler> Reconciler for WithFaults<R> {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        if chance(self.faults.fail_rate) {
            return Err(ReconcileError::retryable(InjectedFailure));
        }
        if self.faults.stop_after_debit > 0.0 {
            let hook = StopAfterDebit {
                probability: self.faults.stop_after_debit,
                abort: self.faults.abort,
            };
            let ctx = ctx.clone().with_step_hook(Arc::new(hook));
            return self.inner.reconcile(&ctx, key).await;
        }
        self.inner.reconcile(ctx, key).await
    }

    fn key_for(&self, event: &EventHint) -> Option<String> {
        self.inner.key_for(event)
    }
}
