//! The checks: each runs the reconciler a certain way and holds it to a rule.

use converge::handlers::{Outcome, Reconciler, RunResult};

use crate::error::KitError;
use crate::report::{CrashPoint, Report, RunOutcome};
use crate::runner::{Path, Ran, RunSpec};
use crate::Kit;

/// Why a check needs a setup: without one it starts from a converged key.
const SETUP_FOR_WORK: &str = "a closure re-creating the key's initial state (e.g. an order \
    SHIPPED without an invoice) before the check, so its first run has work to do; without \
    one the key is already converged and a run that changes it again goes unseen";

impl<R: Reconciler> Kit<R> {
    /// Runs the key twice in a row (manual path). With a [setup](Self::setup)
    /// the first run must change it (without one it may); the second must
    /// find nothing to do ([`Outcome::Unchanged`]) and the invariant must hold
    /// after it.
    ///
    /// Errors with [`KitError::NotIdempotent`] if the second run reports
    /// Changed, [`KitError::InvariantBroken`] if it (silently) repeated a side
    /// effect the invariant counts, [`KitError::NothingChanged`] if the first
    /// run after the setup reports Unchanged.
    #[tracing::instrument(skip(self), fields(reconciler = %self.name), err)]
    pub async fn run_twice(&self, key: &str) -> Result<Report, KitError> {
        const CHECK: &str = "run_twice";
        self.prepare(CHECK, key).await?;
        let claimant = self.new_claimant();
        let mut report = Report::new(CHECK, key);
        let runs = (0..2)
            .map(|_| self.spec(Path::Manual, 1, &claimant))
            .collect();
        self.sequence(CHECK, key, runs, &mut report).await?;
        Ok(report)
    }

    /// Delivers the same event (one event id) `deliveries` times, as
    /// JetStream redelivers an event whose ack was lost: attempts 1, 2, ….
    /// From the [setup](Self::setup) state (which it needs), the first
    /// delivery must change the key and no later one may; the invariant must
    /// hold afterwards.
    #[tracing::instrument(skip(self), fields(reconciler = %self.name), err)]
    pub async fn duplicate_events(&self, key: &str, deliveries: u32) -> Result<Report, KitError> {
        const CHECK: &str = "duplicate_events";
        if deliveries < 2 {
            return Err(KitError::InvalidArgument {
                check: CHECK,
                problem: format!("{deliveries} deliveries duplicate nothing: ask for 2 or more"),
            });
        }
        self.require_setup(CHECK)?;
        self.prepare(CHECK, key).await?;
        let hint = self.hint(key);
        let claimant = self.new_claimant();
        let runs = (1..=deliveries)
            .map(|attempt| self.spec(Path::Event(hint.clone()), attempt, &claimant))
            .collect();
        let mut report = Report::new(CHECK, key);
        self.sequence(CHECK, key, runs, &mut report).await?;
        Ok(report)
    }

    /// Runs the key on the event path, the sweep path
    /// ([`run_keys`](converge::handlers::run_keys), which tries
    /// [`Reconciler::reconcile_batch`] first) and the manual path in turn:
    /// the first run must change it, the other two must find nothing to do.
    /// Three rounds, each from the [setup](Self::setup) state (which it
    /// needs) and with another path going first, so each path alone must
    /// converge the key.
    #[tracing::instrument(skip(self), fields(reconciler = %self.name), err)]
    pub async fn every_path(&self, key: &str) -> Result<Report, KitError> {
        const CHECK: &str = "every_path";
        self.require_setup(CHECK)?;
        let hint = self.hint(key);
        let paths = [Path::Event(hint), Path::Sweep, Path::Manual];
        let mut report = Report::new(CHECK, key);
        for round in 0..paths.len() {
            self.prepare(CHECK, key).await?;
            let claimant = self.new_claimant();
            let runs = (0..paths.len())
                .map(|i| self.spec(paths[(round + i) % paths.len()].clone(), 1, &claimant))
                .collect();
            self.sequence(CHECK, key, runs, &mut report).await?;
        }
        Ok(report)
    }

    /// Crashes a run at each of the reconciler's steps in turn and checks
    /// that later runs finish the work, with every side effect applied once.
    ///
    /// 1. From the [setup](Self::setup) state, a clean run discovers the steps
    ///    (every [`ctx.step`](converge::handlers::Context::step) it passes).
    /// 2. For each step: setup; an event-path run that crashes at that step
    ///    (its `ctx.step` returns a simulated crash, so `?` abandons the rest
    ///    of the run); then, as a restarted process, redeliveries of the event
    ///    alternating with sweep-path runs, until a run finds nothing to do
    ///    and the [invariant](Self::invariant) holds — at most the
    ///    [recovery](Self::recovery) budget.
    ///
    /// Returns one report per step. Needs a setup and an invariant.
    #[tracing::instrument(skip(self), fields(reconciler = %self.name), err)]
    pub async fn crash_after_each_step(&self, key: &str) -> Result<Vec<Report>, KitError> {
        const CHECK: &str = "crash_after_each_step";
        if self.setup.is_none() {
            return Err(KitError::Missing {
                check: CHECK,
                missing: "setup",
                why: "a closure re-creating the key's initial state before each crash",
            });
        }
        if self.invariant.is_none() {
            return Err(KitError::Missing {
                check: CHECK,
                missing: "invariant",
                why: "a closure telling a settled key from one still half-done after a crash",
            });
        }
        self.prepare(CHECK, key).await?;
        let mut clean = Report::new(CHECK, key);
        self.sequence(
            CHECK,
            key,
            vec![self.spec(Path::Manual, 1, &self.new_claimant())],
            &mut clean,
        )
        .await?;
        let steps = clean.steps().to_vec();
        if steps.is_empty() {
            return Err(KitError::NoSteps {
                key: key.to_owned(),
                report: Box::new(clean),
            });
        }
        let mut reports = Vec::with_capacity(steps.len());
        for (index, step) in steps.into_iter().enumerate() {
            let crash = CrashPoint { index, step };
            reports.push(self.crash_at(key, crash).await?);
        }
        Ok(reports)
    }

    /// Every check in turn, each from the [setup](Self::setup) state (which
    /// it needs): [`run_twice`](Self::run_twice),
    /// [`run_concurrently`](Self::run_concurrently) (8 runs),
    /// [`duplicate_events`](Self::duplicate_events) (3 deliveries),
    /// [`every_path`](Self::every_path) and, with an invariant,
    /// [`crash_after_each_step`](Self::crash_after_each_step).
    pub async fn all_checks(&self, key: &str) -> Result<Vec<Report>, KitError> {
        self.require_setup("all_checks")?;
        let mut reports = vec![
            self.run_twice(key).await?,
            self.run_concurrently(key, 8).await?,
            self.duplicate_events(key, 3).await?,
            self.every_path(key).await?,
        ];
        if self.invariant.is_some() {
            reports.extend(self.crash_after_each_step(key).await?);
        }
        Ok(reports)
    }

    /// One crash and the recovery after it.
    async fn crash_at(&self, key: &str, crash: CrashPoint) -> Result<Report, KitError> {
        const CHECK: &str = "crash_after_each_step";
        self.prepare(CHECK, key).await?;
        let mut report = Report::new(CHECK, key);
        report.crashed_at = Some(crash.clone());
        let hint = self.hint(key);
        let mut spec = self.spec(Path::Event(hint.clone()), 1, &self.new_claimant());
        spec.crash_at = Some(crash.index);
        let ran = self.run(key, spec).await;
        let crashed = matches!(ran.record.outcome, RunOutcome::Crashed { .. });
        let fired = ran.crash_fired;
        let outcome = ran.record.outcome.to_string();
        report.runs.push(ran.record);
        match (fired, crashed) {
            (true, true) => {}
            (true, false) => {
                return Err(KitError::CrashIgnored {
                    key: key.to_owned(),
                    crashed_at: crash,
                    outcome,
                    report: Box::new(report),
                })
            }
            (false, _) => {
                return Err(KitError::StepNotReached {
                    key: key.to_owned(),
                    crashed_at: crash,
                    report: Box::new(report),
                })
            }
        }

        // A restarted process: a new claimant, redeliveries and sweeps.
        let claimant = self.new_claimant();
        let mut changed_by: Option<usize> = None;
        let mut broken = None;
        for n in 0..self.recovery_runs {
            let path = if n % 2 == 0 {
                Path::Event(hint.clone())
            } else {
                Path::Sweep
            };
            let attempt = if n % 2 == 0 { n as u32 / 2 + 2 } else { 1 };
            let ran = self.run(key, self.spec(path, attempt, &claimant)).await;
            report.runs.push(ran.record);
            let run = report.runs.len();
            match ran.result {
                RunResult::Done(Outcome::Changed) => {
                    if changed_by.is_some() {
                        return Err(not_idempotent(CHECK, key, run, report));
                    }
                    changed_by = Some(run);
                    continue; // straight on: the next run must find it done
                }
                RunResult::Done(_) => match self.invariant_holds(key).await {
                    Ok(()) => return Ok(report),
                    // The reconciler finished and says so, but the state is wrong.
                    Err(source) if changed_by.is_some() => {
                        return Err(KitError::InvariantBroken {
                            check: CHECK,
                            key: key.to_owned(),
                            after: format!("after recovering from the crash at {crash}"),
                            source,
                            report: Box::new(report),
                        })
                    }
                    // Maybe a claim not yet expired: try again later.
                    Err(source) => broken = Some(source),
                },
                RunResult::Failed(source) if !source.is_retryable() => {
                    return Err(KitError::RunFailed {
                        check: CHECK,
                        key: key.to_owned(),
                        run,
                        source,
                        report: Box::new(report),
                    })
                }
                _ => {} // busy, or a retryable failure: retry later
            }
            tokio::time::sleep(self.retry_delay).await;
        }
        Err(match broken {
            Some(source) => KitError::InvariantBroken {
                check: CHECK,
                key: key.to_owned(),
                after: format!("{} runs after the crash at {crash}", report.runs.len() - 1),
                source,
                report: Box::new(report),
            },
            None => KitError::NotSettled {
                key: key.to_owned(),
                crashed_at: crash,
                runs: report.runs.len() - 1,
                report: Box::new(report),
            },
        })
    }

    /// Runs `runs` one after another, right after [`prepare`](Self::prepare):
    /// none may fail or find the key busy, none but the first may report
    /// Changed and, with a setup, the first must; then the invariant.
    async fn sequence(
        &self,
        check: &'static str,
        key: &str,
        runs: Vec<RunSpec>,
        report: &mut Report,
    ) -> Result<(), KitError> {
        for (i, spec) in runs.into_iter().enumerate() {
            let Ran { record, result, .. } = self.run(key, spec).await;
            report.runs.push(record);
            let run = report.runs.len();
            match result {
                RunResult::Done(Outcome::Changed) if i > 0 => {
                    return Err(not_idempotent(check, key, run, report.clone()));
                }
                RunResult::Done(Outcome::Changed) => {}
                RunResult::Done(_) if i == 0 && self.setup.is_some() => {
                    return Err(KitError::NothingChanged {
                        check,
                        key: key.to_owned(),
                        report: Box::new(report.clone()),
                    });
                }
                RunResult::Done(_) => {}
                RunResult::Busy => {
                    return Err(KitError::KeyBusy {
                        check,
                        key: key.to_owned(),
                        run,
                        report: Box::new(report.clone()),
                    })
                }
                RunResult::Failed(source) => {
                    return Err(KitError::RunFailed {
                        check,
                        key: key.to_owned(),
                        run,
                        source,
                        report: Box::new(report.clone()),
                    })
                }
                _ => {}
            }
        }
        let run = report.runs.len();
        self.check_invariant(check, key, || format!("after run {run}"), report)
            .await
    }

    /// A run of `path` under the per-key lock, with no crash.
    pub(crate) fn spec(&self, path: Path, attempt: u32, claimant: &str) -> RunSpec {
        RunSpec {
            path,
            attempt,
            claimant: claimant.to_owned(),
            crash_at: None,
            locked: true,
        }
    }

    /// [`KitError::Missing`] for a check that needs a setup.
    fn require_setup(&self, check: &'static str) -> Result<(), KitError> {
        match self.setup {
            Some(_) => Ok(()),
            None => Err(KitError::Missing {
                check,
                missing: "setup",
                why: SETUP_FOR_WORK,
            }),
        }
    }

    /// Runs the setup, if there is one.
    pub(crate) async fn prepare(&self, check: &'static str, key: &str) -> Result<(), KitError> {
        let Some(setup) = &self.setup else {
            return Ok(());
        };
        setup(self.pool.clone(), key.to_owned())
            .await
            .map_err(|source| KitError::Setup {
                check,
                key: key.to_owned(),
                source,
            })
    }

    /// The invariant's verdict (`Ok` without one).
    async fn invariant_holds(&self, key: &str) -> Result<(), crate::BoxError> {
        match &self.invariant {
            Some(invariant) => invariant(self.pool.clone(), key.to_owned()).await,
            None => Ok(()),
        }
    }

    /// The invariant, as a check's error.
    pub(crate) async fn check_invariant(
        &self,
        check: &'static str,
        key: &str,
        after: impl FnOnce() -> String,
        report: &Report,
    ) -> Result<(), KitError> {
        self.invariant_holds(key)
            .await
            .map_err(|source| KitError::InvariantBroken {
                check,
                key: key.to_owned(),
                after: after(),
                source,
                report: Box::new(report.clone()),
            })
    }
}

fn not_idempotent(check: &'static str, key: &str, run: usize, report: Report) -> KitError {
    KitError::NotIdempotent {
        check,
        key: key.to_owned(),
        run,
        report: Box::new(report),
    }
}
