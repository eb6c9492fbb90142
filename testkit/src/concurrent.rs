//! The concurrency check: N runs of one key at once.

use std::sync::Arc;

use converge::handlers::{Reconciler, RunResult};
use tokio::sync::Barrier;

use crate::error::KitError;
use crate::report::Report;
use crate::runner::{Path, RunSpec};
use crate::Kit;

impl<R: Reconciler> Kit<R> {
    /// Starts `runs` runs of the key at once (from the [setup](Self::setup)
    /// state, if there is one), each as its own process (its own claimant),
    /// with event, sweep and manual triggers in turn.
    ///
    /// By default every run goes through
    /// [`run_key`](converge::handlers::run_key), as production runs them: the
    /// per-key lock lets one run at a time, and the others find the key busy
    /// or find the work done. With
    /// [`unlocked_concurrent_runs`](Self::unlocked_concurrent_runs), every
    /// second run (the 2nd, 4th, …) instead calls
    /// [`Reconciler::reconcile`] directly, without the lock, so several runs
    /// really execute the reconciler at once and its own concurrency safety
    /// (compare-and-set claims) is what keeps them apart. Each
    /// [`RunRecord`](crate::RunRecord) says which it was (`locked`).
    ///
    /// The rules: none may fail; at least one run under the lock must
    /// complete ([`KitError::NeverRan`] otherwise: the key's lock is held
    /// elsewhere, so nothing was tested); at most one run may report Changed
    /// and, with a setup, exactly one must ([`KitError::NothingChanged`]);
    /// the invariant must hold afterwards.
    #[tracing::instrument(skip(self), fields(reconciler = %self.name), err)]
    pub async fn run_concurrently(&self, key: &str, runs: usize) -> Result<Report, KitError> {
        const CHECK: &str = "run_concurrently";
        if runs < 2 {
            return Err(KitError::InvalidArgument {
                check: CHECK,
                problem: format!("{runs} runs are not concurrent: ask for 2 or more"),
            });
        }
        self.prepare(CHECK, key).await?;
        let hint = self.hint(key);
        let specs: Vec<RunSpec> = (0..runs)
            .map(|i| {
                let path = match i % 3 {
                    0 => Path::Event(hint.clone()),
                    1 => Path::SweepOne,
                    _ => Path::Manual,
                };
                let mut spec = self.spec(path, 1, &self.new_claimant());
                spec.locked = !(self.unlocked_runs && i % 2 == 1);
                spec
            })
            .collect();
        let locked = specs.iter().filter(|spec| spec.locked).count();
        let start = Arc::new(Barrier::new(runs));
        let ran = futures::future::join_all(specs.into_iter().map(|spec| {
            let start = start.clone();
            async move {
                start.wait().await;
                self.run(key, spec).await
            }
        }))
        .await;
        let mut report = Report::new(CHECK, key);
        report.runs = ran.iter().map(|r| r.record.clone()).collect();
        for (i, ran) in ran.into_iter().enumerate() {
            if let RunResult::Failed(source) = ran.result {
                return Err(KitError::RunFailed {
                    check: CHECK,
                    key: key.to_owned(),
                    run: i + 1,
                    source,
                    report: Box::new(report),
                });
            }
        }
        let completed_locked = report
            .runs
            .iter()
            .filter(|run| run.locked && run.outcome.is_completed())
            .count();
        if completed_locked == 0 {
            return Err(KitError::NeverRan {
                key: key.to_owned(),
                locked,
                report: Box::new(report),
            });
        }
        let changed = report.changed_runs();
        if changed > 1 {
            return Err(KitError::ConcurrentChanges {
                key: key.to_owned(),
                changed,
                runs,
                report: Box::new(report),
            });
        }
        if changed == 0 && self.setup.is_some() {
            return Err(KitError::NothingChanged {
                check: CHECK,
                key: key.to_owned(),
                report: Box::new(report),
            });
        }
        self.check_invariant(
            CHECK,
            key,
            || format!("after {runs} concurrent runs"),
            &report,
        )
        .await?;
        Ok(report)
    }
}
