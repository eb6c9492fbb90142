//! One run of the reconciler, the way production runs it: through
//! `run_key` (or `run_keys` for the sweep path), with a context built by
//! `Context::new` and a step hook that records the steps and may crash one.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use converge::handlers::{
    run_key, run_keys, Context, EventHint, ReconcileError, Reconciler, RunResult, SimulatedCrash,
    StepHook, Trigger,
};
use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use crate::report::{RunOutcome, RunRecord};
use crate::Kit;

/// The sweep name the kit's sweep-path runs carry.
pub(crate) const SWEEP_NAME: &str = "converge-testkit";

/// Which path a run takes.
#[derive(Debug, Clone)]
pub(crate) enum Path {
    /// `run_key` with `Trigger::Event`.
    Event(Box<EventHint>),
    /// `run_keys` (the sweep's page form) with `Trigger::Sweep`.
    Sweep,
    /// `run_key` with `Trigger::Sweep`: a sweep-labelled run of one key, for
    /// the concurrency check, where every run goes through `run_key`.
    SweepOne,
    /// `run_key` with `Trigger::Manual`.
    Manual,
}

/// One run to make.
#[derive(Debug, Clone)]
pub(crate) struct RunSpec {
    pub(crate) path: Path,
    pub(crate) attempt: u32,
    pub(crate) claimant: String,
    /// Crash at the step with this index (0 = the first step of the run).
    pub(crate) crash_at: Option<usize>,
    /// Through the per-key lock (`run_key`/`run_keys`, as production runs),
    /// or — for [`Kit::run_concurrently`]'s unlocked runs — a direct call of
    /// [`Reconciler::reconcile`] with no lock, to exercise the reconciler's
    /// own concurrency safety.
    pub(crate) locked: bool,
}

/// What a run left: the record and the result itself (for its error).
pub(crate) struct Ran {
    pub(crate) record: RunRecord,
    pub(crate) result: RunResult,
    /// Whether the plan's crash fired (the run reached the crash step).
    pub(crate) crash_fired: bool,
}

/// The step hook of one run: records every step, crashes at one if asked.
#[derive(Debug, Default)]
struct StepPlan {
    crash_at: Option<usize>,
    state: Mutex<PlanState>,
}

#[derive(Debug, Default)]
struct PlanState {
    seen: Vec<String>,
    crash_fired: bool,
}

impl StepPlan {
    fn state(&self) -> std::sync::MutexGuard<'_, PlanState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl StepHook for StepPlan {
    fn on_step(&self, name: &str) -> Result<(), ReconcileError> {
        let mut state = self.state();
        let index = state.seen.len();
        state.seen.push(name.to_owned());
        if self.crash_at == Some(index) {
            state.crash_fired = true;
            tracing::debug!(step = name, index, "converge-testkit: simulated crash");
            return Err(SimulatedCrash::at(name).into());
        }
        Ok(())
    }
}

impl<R: Reconciler> Kit<R> {
    /// A claimant for a new simulated process.
    pub(crate) fn new_claimant(&self) -> String {
        let n = self
            .instances
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("converge-testkit-{n}/{}", self.name)
    }

    /// The event the kit delivers for `key`: the configured template with a
    /// new event id and `key` as the aggregate id.
    pub(crate) fn hint(&self, key: &str) -> Box<EventHint> {
        Box::new(EventHint::new(
            self.event.aggregate_type.clone(),
            key,
            self.event.event_type.clone(),
            self.event.payload.clone(),
        ))
    }

    /// Runs the reconciler once for `key`, as `spec` says.
    pub(crate) async fn run(&self, key: &str, spec: RunSpec) -> Ran {
        let plan = Arc::new(StepPlan {
            crash_at: spec.crash_at,
            ..StepPlan::default()
        });
        let trigger = match &spec.path {
            Path::Event(hint) => Trigger::Event(EventHint::clone(hint)),
            Path::Sweep | Path::SweepOne => Trigger::Sweep {
                sweep: SWEEP_NAME.to_owned(),
            },
            Path::Manual => Trigger::Manual {
                reason: Some("converge-testkit".to_owned()),
            },
        };
        let ctx = Context::new(
            self.pool.clone(),
            trigger,
            spec.attempt,
            self.limits.clone(),
            spec.claimant.clone(),
        )
        .with_step_hook(plan.clone());
        let reconciler: &R = &self.reconciler;
        let result = match spec.path {
            _ if !spec.locked => reconcile_unlocked(reconciler, &ctx, key).await,
            Path::Sweep => {
                let keys = [key.to_owned()];
                let stop = CancellationToken::new();
                run_keys(reconciler, &self.name, &ctx, &keys, 1, &stop)
                    .await
                    .into_iter()
                    .next()
                    .map(|(_, result)| result)
                    .unwrap_or(RunResult::Busy)
            }
            _ => run_key(reconciler, &self.name, &ctx, key).await,
        };
        let (steps, crash_fired) = {
            let state = plan.state();
            (state.seen.clone(), state.crash_fired)
        };
        let record = RunRecord {
            path: ctx.trigger().path(),
            attempt: spec.attempt,
            claimant: spec.claimant,
            steps,
            outcome: RunOutcome::of(&result),
            locked: spec.locked,
        };
        Ran {
            record,
            result,
            crash_fired,
        }
    }
}

/// [`Reconciler::reconcile`] without the per-key lock, a panic caught as
/// `run_key` catches it (a retryable failure of the run).
async fn reconcile_unlocked<R: Reconciler>(reconciler: &R, ctx: &Context, key: &str) -> RunResult {
    match AssertUnwindSafe(reconciler.reconcile(ctx, key))
        .catch_unwind()
        .await
    {
        Ok(Ok(outcome)) => RunResult::Done(outcome),
        Ok(Err(e)) => RunResult::Failed(e),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_owned());
            RunResult::Failed(ReconcileError::retryable(format!(
                "reconciler panicked: {message}"
            )))
        }
    }
}
