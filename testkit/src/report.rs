//! What the checks saw: one record per run, one report per check.

use std::fmt;

use converge::handlers::{Outcome, RunResult, SimulatedCrash};

/// How one run of the reconciler ended, as the kit saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RunOutcome {
    /// The reconciler reported [`Outcome::Changed`].
    Changed,
    /// The reconciler reported [`Outcome::Unchanged`].
    Unchanged,
    /// Another run held the key's lock; the reconciler did not run.
    Busy,
    /// The kit's fault plan stopped the run at this step.
    Crashed {
        /// The step.
        step: String,
    },
    /// The reconciler (or the lock around it) failed.
    Failed {
        /// Whether the failure was retryable.
        retryable: bool,
        /// The error, as text.
        error: String,
    },
}

impl RunOutcome {
    /// The outcome of a [`RunResult`].
    pub fn of(result: &RunResult) -> RunOutcome {
        match result {
            RunResult::Done(Outcome::Changed) => RunOutcome::Changed,
            RunResult::Done(_) => RunOutcome::Unchanged,
            RunResult::Busy => RunOutcome::Busy,
            RunResult::Failed(e) => match SimulatedCrash::in_error(e) {
                Some(crash) => RunOutcome::Crashed {
                    step: crash.step.clone(),
                },
                None => RunOutcome::Failed {
                    retryable: e.is_retryable(),
                    error: e.to_string(),
                },
            },
            other => RunOutcome::Failed {
                retryable: true,
                error: format!("unknown run result {}", other.label()),
            },
        }
    }

    /// Whether the run reported [`Outcome::Changed`].
    pub fn is_changed(&self) -> bool {
        matches!(self, RunOutcome::Changed)
    }

    /// Whether the reconciler ran to the end: Changed or Unchanged.
    pub fn is_completed(&self) -> bool {
        matches!(self, RunOutcome::Changed | RunOutcome::Unchanged)
    }
}

impl fmt::Display for RunOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunOutcome::Changed => f.write_str("Changed"),
            RunOutcome::Unchanged => f.write_str("Unchanged"),
            RunOutcome::Busy => f.write_str("Busy"),
            RunOutcome::Crashed { step } => write!(f, "Crashed at {step:?}"),
            RunOutcome::Failed { error, .. } => write!(f, "Failed ({error})"),
        }
    }
}

/// One run of the reconciler for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunRecord {
    /// The path it ran on: `event`, `sweep` or `manual`.
    pub path: &'static str,
    /// The attempt number the context carried (a redelivery counts up).
    pub attempt: u32,
    /// The claimant the context carried: one per simulated process.
    pub claimant: String,
    /// The steps ([`Context::step`](converge::handlers::Context::step)) the
    /// run passed, in order, including the one it crashed at.
    pub steps: Vec<String>,
    /// How it ended.
    pub outcome: RunOutcome,
    /// Whether it ran under the per-key lock (`run_key`/`run_keys`). Only
    /// [`run_concurrently`](crate::Kit::run_concurrently)'s unlocked runs
    /// (see [`Kit::unlocked_concurrent_runs`](crate::Kit::unlocked_concurrent_runs))
    /// call `reconcile` directly, without it.
    pub locked: bool,
}

impl fmt::Display for RunRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} #{}{} {} [{}]",
            self.path,
            self.attempt,
            if self.locked { "" } else { " unlocked" },
            self.outcome,
            self.steps.join(", ")
        )
    }
}

/// Where a run was crashed: the `index`-th step it passed, named `step`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CrashPoint {
    /// 0 for the first step of the run.
    pub index: usize,
    /// The step's name.
    pub step: String,
}

impl fmt::Display for CrashPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step #{} {:?}", self.index + 1, self.step)
    }
}

/// What one check did for one key: every run in order and, for a crash
/// check, where the crash was.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// The check: `run_twice`, `run_concurrently`, `duplicate_events`,
    /// `every_path` or `crash_after_each_step`.
    pub check: &'static str,
    /// The key.
    pub key: String,
    /// Every run, in the order they ended.
    pub runs: Vec<RunRecord>,
    /// For `crash_after_each_step`: the step this report's crash was at.
    pub crashed_at: Option<CrashPoint>,
}

impl Report {
    pub(crate) fn new(check: &'static str, key: &str) -> Self {
        Report {
            check,
            key: key.to_owned(),
            runs: Vec::new(),
            crashed_at: None,
        }
    }

    /// The runs' outcomes, in order.
    pub fn outcomes(&self) -> Vec<&RunOutcome> {
        self.runs.iter().map(|r| &r.outcome).collect()
    }

    /// How many runs reported Changed.
    pub fn changed_runs(&self) -> usize {
        self.runs.iter().filter(|r| r.outcome.is_changed()).count()
    }

    /// How many runs the reconciler completed (Changed or Unchanged).
    pub fn completed_runs(&self) -> usize {
        self.runs
            .iter()
            .filter(|r| r.outcome.is_completed())
            .count()
    }

    /// The steps the first run passed (the clean run's steps, for most checks).
    pub fn steps(&self) -> &[String] {
        self.runs.first().map_or(&[], |r| r.steps.as_slice())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of key {}", self.check, self.key)?;
        if let Some(crash) = &self.crashed_at {
            write!(f, " (crash at {crash})")?;
        }
        f.write_str(":")?;
        for (i, run) in self.runs.iter().enumerate() {
            write!(f, " {}. {run};", i + 1)?;
        }
        Ok(())
    }
}
