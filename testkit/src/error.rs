//! What a check found wrong, and how to fix it.

use converge::handlers::ReconcileError;

use crate::report::{CrashPoint, Report};
use crate::BoxError;

/// A check failed: the reconciler (or the test's setup) broke a rule. Every
/// variant that ran the reconciler carries the [`Report`] of the runs so far;
/// the message names the rule, the key and what to change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KitError {
    /// A run reported Changed after an earlier run had already taken the key
    /// where it should be.
    #[error(
        "{check}: run {run} of key {key} reported Changed after an earlier run already had: \
         reconcile is not idempotent — read the state first and return Outcome::Unchanged \
         when there is nothing left to do ({report})"
    )]
    NotIdempotent {
        /// The check.
        check: &'static str,
        /// The key.
        key: String,
        /// The offending run, from 1.
        run: usize,
        /// The runs so far.
        report: Box<Report>,
    },
    /// More than one of a set of concurrent runs reported Changed.
    #[error(
        "run_concurrently: {changed} of {runs} concurrent runs of key {key} reported Changed; \
         at most one may — every run after the one that did the work, and every run racing it, \
         must find the work done: check the state before acting and, if runs without the \
         per-key lock disagree, make the change a compare-and-set (e.g. a StateMachine claim) \
         ({report})"
    )]
    ConcurrentChanges {
        /// The key.
        key: String,
        /// How many reported Changed.
        changed: usize,
        /// How many ran.
        runs: usize,
        /// The runs.
        report: Box<Report>,
    },
    /// A run failed where it should have succeeded.
    #[error(
        "{check}: run {run} of key {key} failed: {source} — a reconcile of a healthy key must \
         succeed: fix the error, or the setup if the key's initial state is not what the \
         reconciler expects ({report})"
    )]
    RunFailed {
        /// The check.
        check: &'static str,
        /// The key.
        key: String,
        /// The run, from 1.
        run: usize,
        /// The reconciler's error.
        #[source]
        source: ReconcileError,
        /// The runs so far.
        report: Box<Report>,
    },
    /// A run found the key locked by someone else.
    #[error(
        "{check}: run {run} of key {key} found the key locked by another run: stop consumers and \
         sweepers registered under the same reconciler name on the test database, and give each \
         test its own database ({report})"
    )]
    KeyBusy {
        /// The check.
        check: &'static str,
        /// The key.
        key: String,
        /// The run, from 1.
        run: usize,
        /// The runs so far.
        report: Box<Report>,
    },
    /// None of the concurrent runs under the per-key lock got it: the
    /// reconciler never ran under the lock, so the check proved nothing.
    #[error(
        "run_concurrently: none of the {locked} runs of key {key} under the per-key lock \
         completed — the key was never actually run under the lock (every one found it busy): \
         something else holds the key's lock, e.g. a consumer or sweeper \
         registered under the same reconciler name on the test database, or a lock left \
         held; stop it, or give each test its own database ({report})"
    )]
    NeverRan {
        /// The key.
        key: String,
        /// How many runs went through the lock.
        locked: usize,
        /// The runs.
        report: Box<Report>,
    },
    /// With a setup, the first run after it reported Unchanged.
    #[error(
        "{check}: the first run after setup changed nothing (key {key}): the setup does not \
         leave work to do, or reconcile does nothing — make the setup re-create a state the \
         reconciler must act on, and return Outcome::Changed when reconcile acts ({report})"
    )]
    NothingChanged {
        /// The check.
        check: &'static str,
        /// The key.
        key: String,
        /// The runs.
        report: Box<Report>,
    },
    /// The user's invariant did not hold after the check's runs.
    #[error(
        "{check}: the invariant for key {key} does not hold {after}: {source} — a side effect \
         ran twice or not at all: make each one idempotent (a unique constraint with ON CONFLICT \
         DO NOTHING, a state check in the same transaction as the write) ({report})"
    )]
    InvariantBroken {
        /// The check.
        check: &'static str,
        /// The key.
        key: String,
        /// When: e.g. `after run 2`, `after recovering from a crash at step #1 "claimed"`.
        after: String,
        /// What the invariant reported.
        #[source]
        source: BoxError,
        /// The runs so far.
        report: Box<Report>,
    },
    /// Runs after a crash kept reporting Changed or failing: the key never settled.
    #[error(
        "crash_after_each_step: key {key} did not settle within {runs} runs after the crash at \
         {crashed_at} (a run reporting Unchanged with the invariant holding): a reconcile must \
         finish the step a crashed run left half-done — resume an expired claim — and then \
         report Unchanged; with claim leases, keep the lease shorter than the kit's recovery \
         budget (Kit::recovery) ({report})"
    )]
    NotSettled {
        /// The key.
        key: String,
        /// Where the crash was.
        crashed_at: CrashPoint,
        /// How many recovery runs ran.
        runs: usize,
        /// The runs.
        report: Box<Report>,
    },
    /// The reconciler went on after a step returned the simulated crash.
    #[error(
        "crash_after_each_step: the reconcile of key {key} went on after the simulated crash at \
         {crashed_at} and ended {outcome}: propagate the error of ctx.step(..) with `?` ({report})"
    )]
    CrashIgnored {
        /// The key.
        key: String,
        /// Where the crash was.
        crashed_at: CrashPoint,
        /// How the run ended instead.
        outcome: String,
        /// The runs.
        report: Box<Report>,
    },
    /// The crash run did not pass the step the clean run passed.
    #[error(
        "crash_after_each_step: the run of key {key} never reached {crashed_at}, which the clean \
         run passed: the steps must be the same on every run from the setup state — does the \
         setup re-create the whole initial state? ({report})"
    )]
    StepNotReached {
        /// The key.
        key: String,
        /// The step the clean run passed.
        crashed_at: CrashPoint,
        /// The runs.
        report: Box<Report>,
    },
    /// The clean run passed no step, so there is nowhere to crash.
    #[error(
        "crash_after_each_step: the clean run of key {key} passed no step: mark the points \
         between side effects with ctx.step(\"name\")? so the kit can crash the run there \
         ({report})"
    )]
    NoSteps {
        /// The key.
        key: String,
        /// The clean run.
        report: Box<Report>,
    },
    /// The check needs a closure the kit was not given.
    #[error("{check} needs Kit::{missing}: call .{missing}(..) with {why}")]
    Missing {
        /// The check.
        check: &'static str,
        /// `setup` or `invariant`.
        missing: &'static str,
        /// What it is for.
        why: &'static str,
    },
    /// The user's setup closure failed.
    #[error("{check}: the setup of key {key} failed: {source}")]
    Setup {
        /// The check.
        check: &'static str,
        /// The key.
        key: String,
        /// The setup's error.
        #[source]
        source: BoxError,
    },
    /// A check was asked for something impossible (e.g. zero runs).
    #[error("{check}: {problem}")]
    InvalidArgument {
        /// The check.
        check: &'static str,
        /// What is wrong and what to pass instead.
        problem: String,
    },
}

impl KitError {
    /// The report of the runs, when the check ran the reconciler.
    pub fn report(&self) -> Option<&Report> {
        match self {
            KitError::NotIdempotent { report, .. }
            | KitError::ConcurrentChanges { report, .. }
            | KitError::RunFailed { report, .. }
            | KitError::KeyBusy { report, .. }
            | KitError::NeverRan { report, .. }
            | KitError::NothingChanged { report, .. }
            | KitError::InvariantBroken { report, .. }
            | KitError::NotSettled { report, .. }
            | KitError::CrashIgnored { report, .. }
            | KitError::StepNotReached { report, .. }
            | KitError::NoSteps { report, .. } => Some(report),
            KitError::Missing { .. }
            | KitError::Setup { .. }
            | KitError::InvalidArgument { .. } => None,
        }
    }
}
