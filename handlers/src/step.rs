//! Crash points: the named steps a reconcile passes between its side effects,
//! where a test (or an application's own fault injection) can stop it.

use crate::error::ReconcileError;

/// Called at every [`Context::step`](crate::Context::step) of a reconcile run
/// with a context built by [`Context::with_step_hook`](crate::Context::with_step_hook).
///
/// Return `Ok(())` to let the reconcile go on; return an error to stop it
/// there: the reconciler's `?` abandons the rest of the run, its open
/// transaction rolls back on drop and no later statement runs — what a process
/// dying at that point leaves behind. The test kit (`converge-testkit`)
/// returns a retryable error wrapping [`SimulatedCrash`]; an application may
/// install its own hook for fault injection, e.g. abort the process at a
/// given step in a chaos run.
///
/// ```
/// use converge_handlers::{ReconcileError, SimulatedCrash, StepHook};
///
/// /// Crashes every run at the step named `claimed`.
/// struct CrashAfterClaim;
///
/// impl StepHook for CrashAfterClaim {
///     fn on_step(&self, name: &str) -> Result<(), ReconcileError> {
///         if name == "claimed" {
///             return Err(SimulatedCrash::at(name).into());
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait StepHook: Send + Sync + 'static {
    /// The reconcile reached the step `name`.
    fn on_step(&self, name: &str) -> Result<(), ReconcileError>;
}

/// The failure a fault plan returns from a step: the run stops there as if the
/// process had died. Retryable, like any crash: the event is redelivered and
/// the sweep comes back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "simulated crash at step {step:?}: a fault plan stopped the reconcile here, \
     as if the process had died"
)]
#[non_exhaustive]
pub struct SimulatedCrash {
    /// The step the run stopped at.
    pub step: String,
}

impl SimulatedCrash {
    /// A crash at the step `step`.
    pub fn at(step: impl Into<String>) -> Self {
        SimulatedCrash { step: step.into() }
    }

    /// The simulated crash behind `error`, if it is one.
    pub fn in_error(error: &ReconcileError) -> Option<&SimulatedCrash> {
        error.source_error().downcast_ref::<SimulatedCrash>()
    }
}

impl From<SimulatedCrash> for ReconcileError {
    /// Retryable: a crashed run is tried again.
    fn from(crash: SimulatedCrash) -> Self {
        ReconcileError::retryable(crash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_simulated_crash_is_retryable_and_recognised() {
        let e: ReconcileError = SimulatedCrash::at("claimed").into();
        assert!(e.is_retryable());
        assert_eq!(
            SimulatedCrash::in_error(&e),
            Some(&SimulatedCrash::at("claimed"))
        );
        assert!(e
            .to_string()
            .contains("simulated crash at step \"claimed\""));
        let other = ReconcileError::retryable("api down");
        assert_eq!(SimulatedCrash::in_error(&other), None);
    }
}
