//! Random interleavings of every way a key gets reconciled — event runs,
//! sweep pages, crashes at any step, duplicate deliveries, concurrent runs —
//! over three orders always end, after a final sweep, with every order
//! INVOICED and each side effect applied exactly once.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{create_schema, order_facts, Invoicing, LEASE};
use converge::handlers::{
    run_key, run_keys, Context, EventHint, Outcome, RateLimits, ReconcileError, RunResult,
    SimulatedCrash, StepHook, Trigger,
};
use converge_testkit::Kit;
use converge_tests::TestEnv;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use tokio_util::sync::CancellationToken;

const NAME: &str = "invoicing";
const KEYS: [&str; 3] = ["1", "2", "3"];
/// The reconciler's steps, in order.
const STEPS: [&str; 2] = ["claimed", "invoiced"];

#[derive(Debug, Clone)]
enum Action {
    /// One event-path run.
    Event(usize),
    /// One sweep page over the keys whose bits are set.
    Sweep(u8),
    /// A run (event or sweep path) that dies at the step with this index.
    Crash {
        key: usize,
        step: usize,
        on_sweep: bool,
    },
    /// One event delivered twice (same event id).
    Duplicate(usize),
    /// Several runs of one key at once.
    Concurrent { key: usize, runs: usize },
    /// Time passes: crashed claims may expire.
    Wait,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        (0..3usize).prop_map(Action::Event),
        (1..8u8).prop_map(Action::Sweep),
        (0..3usize, 0..STEPS.len(), any::<bool>()).prop_map(|(key, step, on_sweep)| {
            Action::Crash {
                key,
                step,
                on_sweep,
            }
        }),
        (0..3usize).prop_map(Action::Duplicate),
        (0..3usize, 2..5usize).prop_map(|(key, runs)| Action::Concurrent { key, runs }),
        Just(Action::Wait),
    ]
}

/// Crashes the run at the step with index `at`.
struct CrashAt {
    at: usize,
    seen: std::sync::Mutex<usize>,
}

impl StepHook for CrashAt {
    fn on_step(&self, name: &str) -> Result<(), ReconcileError> {
        let mut seen = self.seen.lock().unwrap();
        let index = *seen;
        *seen += 1;
        if index == self.at {
            return Err(SimulatedCrash::at(name).into());
        }
        Ok(())
    }
}

struct Case<'a> {
    env: &'a TestEnv,
    reconciler: Arc<Invoicing>,
    kit: &'a Kit<Invoicing>,
    /// Per key: runs that did the work (Changed, or crashed after the last commit).
    work_done: BTreeMap<&'static str, usize>,
    crashes: usize,
}

impl Case<'_> {
    fn ctx(&self, trigger: Trigger, claimant: &str) -> Context {
        Context::new(
            self.env.pool.clone(),
            trigger,
            1,
            RateLimits::new(),
            claimant,
        )
    }

    fn sweep() -> Trigger {
        Trigger::Sweep {
            sweep: "property".into(),
        }
    }

    fn event(key: &str) -> Trigger {
        Trigger::Event(EventHint::new("order", key, "OrderShipped", "{}"))
    }

    fn count(&mut self, key: &'static str, result: &RunResult) -> Result<(), TestCaseError> {
        match result {
            RunResult::Done(Outcome::Changed) => *self.work_done.entry(key).or_default() += 1,
            RunResult::Done(_) => {}
            other => prop_assert!(false, "run of key {key} ended {other:?}"),
        }
        Ok(())
    }

    async fn apply(&mut self, action: &Action) -> Result<(), TestCaseError> {
        match *action {
            Action::Event(k) => {
                let ctx = self.ctx(Self::event(KEYS[k]), "app-1/invoicing");
                let result = run_key(&*self.reconciler, NAME, &ctx, KEYS[k]).await;
                self.count(KEYS[k], &result)?;
            }
            Action::Sweep(mask) => {
                let keys: Vec<String> = (0..3)
                    .filter(|i| mask & (1 << i) != 0)
                    .map(|i| KEYS[i].to_owned())
                    .collect();
                let ctx = self.ctx(Self::sweep(), "app-2/invoicing");
                let stop = CancellationToken::new();
                let results = run_keys(&*self.reconciler, NAME, &ctx, &keys, 2, &stop).await;
                prop_assert_eq!(results.len(), keys.len());
                for (key, result) in results {
                    let key = KEYS.iter().find(|k| **k == key).unwrap();
                    self.count(key, &result)?;
                }
            }
            Action::Crash {
                key: k,
                step,
                on_sweep,
            } => {
                self.crashes += 1;
                let claimant = format!("crashed-{}/invoicing", self.crashes);
                let trigger = if on_sweep {
                    Self::sweep()
                } else {
                    Self::event(KEYS[k])
                };
                let hook = Arc::new(CrashAt {
                    at: step,
                    seen: Default::default(),
                });
                let ctx = self.ctx(trigger, &claimant).with_step_hook(hook);
                let result = if on_sweep {
                    let stop = CancellationToken::new();
                    let keys = [KEYS[k].to_owned()];
                    let mut results =
                        run_keys(&*self.reconciler, NAME, &ctx, &keys, 1, &stop).await;
                    prop_assert_eq!(results.len(), 1);
                    results.remove(0).1
                } else {
                    run_key(&*self.reconciler, NAME, &ctx, KEYS[k]).await
                };
                match &result {
                    // The key had nothing to do: the run never reached the step.
                    RunResult::Done(Outcome::Unchanged) => {}
                    RunResult::Failed(e) => {
                        let crash = SimulatedCrash::in_error(e);
                        prop_assert_eq!(crash, Some(&SimulatedCrash::at(STEPS[step])));
                        if step == STEPS.len() - 1 {
                            // Died after the last commit: the work is done.
                            *self.work_done.entry(KEYS[k]).or_default() += 1;
                        }
                    }
                    other => prop_assert!(false, "crash run of key {} ended {other:?}", KEYS[k]),
                }
            }
            Action::Duplicate(k) => {
                // One event, delivered twice (attempts 1 and 2). Not the kit's
                // duplicate_events: that starts from its setup, this from
                // wherever the interleaving left the key.
                let event = Self::event(KEYS[k]);
                for attempt in 1..=2 {
                    let ctx = Context::new(
                        self.env.pool.clone(),
                        event.clone(),
                        attempt,
                        RateLimits::new(),
                        "app-3/invoicing",
                    );
                    let result = run_key(&*self.reconciler, NAME, &ctx, KEYS[k]).await;
                    self.count(KEYS[k], &result)?;
                }
            }
            Action::Concurrent { key: k, runs } => {
                let report = self
                    .kit
                    .run_concurrently(KEYS[k], runs)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                *self.work_done.entry(KEYS[k]).or_default() += report.changed_runs();
            }
            Action::Wait => tokio::time::sleep(LEASE / 2).await,
        }
        for key in KEYS {
            let done = self.work_done.get(key).copied().unwrap_or(0);
            prop_assert!(done <= 1, "key {key} was invoiced {done} times");
        }
        Ok(())
    }

    /// Sweeps every key until all are INVOICED (crashed claims expire first).
    async fn final_sweep(&mut self) -> Result<(), TestCaseError> {
        let keys: Vec<String> = KEYS.iter().map(|k| k.to_string()).collect();
        for _ in 0..100 {
            let ctx = self.ctx(Self::sweep(), "final/invoicing");
            let stop = CancellationToken::new();
            for (key, result) in run_keys(&*self.reconciler, NAME, &ctx, &keys, 3, &stop).await {
                let key = KEYS.iter().find(|k| **k == key).unwrap();
                self.count(key, &result)?;
            }
            let pending: i64 =
                sqlx::query_scalar("SELECT count(*) FROM orders WHERE state <> 'INVOICED'")
                    .fetch_one(&self.env.pool)
                    .await
                    .unwrap();
            if pending == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        prop_assert!(false, "orders still not INVOICED after the final sweeps");
        Ok(())
    }
}

async fn reset(env: &TestEnv) {
    sqlx::query("TRUNCATE orders, invoices, side_effects, loose_invoices")
        .execute(&env.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO orders (id, state) SELECT g, 'SHIPPED' FROM generate_series(1, 3) g")
        .execute(&env.pool)
        .await
        .unwrap();
}

async fn run_case(
    env: &TestEnv,
    kit: &Kit<Invoicing>,
    reconciler: &Arc<Invoicing>,
    actions: &[Action],
) -> Result<(), TestCaseError> {
    reset(env).await;
    let mut case = Case {
        env,
        reconciler: reconciler.clone(),
        kit,
        work_done: BTreeMap::new(),
        crashes: 0,
    };
    for action in actions {
        case.apply(action).await?;
    }
    case.final_sweep().await?;
    for key in KEYS {
        let facts = order_facts(&env.pool, key, "invoices").await.unwrap();
        prop_assert_eq!(
            facts,
            ("INVOICED".to_owned(), 1, 1),
            "order {}: (state, invoices, side effects)",
            key
        );
        prop_assert_eq!(case.work_done.get(key).copied(), Some(1), "order {}", key);
    }
    let claimed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orders WHERE claimed_by IS NOT NULL")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    prop_assert_eq!(claimed, 0, "claims left behind");
    Ok(())
}

#[test]
fn any_interleaving_converges_with_each_side_effect_once() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let env = rt.block_on(async {
        let env = TestEnv::new().await;
        create_schema(&env.pool).await;
        env
    });
    let reconciler = Arc::new(Invoicing::new());
    let kit = Kit::new(env.pool.clone(), NAME, reconciler.clone());

    let mut runner = TestRunner::new(ProptestConfig {
        cases: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&prop::collection::vec(action(), 1..12), |actions| {
        rt.block_on(run_case(&env, &kit, &reconciler, &actions))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
