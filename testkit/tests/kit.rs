//! The kit against real PostgreSQL: a correct invoice reconciler passes every
//! check; broken ones are caught, each by the check meant for its bug.

mod common;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Barrier;

use common::{create_schema, invoiced_once, loosely_invoiced_once, order_facts, reset_order};
use converge::handlers::{
    run_key, Context, Outcome, RateLimits, ReconcileError, Reconciler, RunResult, SimulatedCrash,
    StepHook, Trigger,
};
use converge_testkit::{BoxError, Kit, KitError, RunOutcome};
use converge_tests::TestEnv;
use sqlx::PgPool;

async fn env() -> TestEnv {
    let env = TestEnv::new().await;
    create_schema(&env.pool).await;
    env
}

fn kit<R: Reconciler>(pool: &PgPool, reconciler: R) -> Kit<R> {
    Kit::new(pool.clone(), "invoicing", Arc::new(reconciler))
        .setup(reset_order)
        .recovery(40, Duration::from_millis(25))
}

#[tokio::test]
async fn a_correct_reconciler_passes_every_check() {
    let env = env().await;
    let kit = kit(&env.pool, common::Invoicing::new()).invariant(invoiced_once);

    let twice = kit.run_twice("42").await.expect("run_twice");
    assert_eq!(
        twice.outcomes(),
        [&RunOutcome::Changed, &RunOutcome::Unchanged]
    );
    assert_eq!(twice.steps(), ["claimed", "invoiced"]);

    let concurrent = kit
        .run_concurrently("42", 8)
        .await
        .expect("run_concurrently");
    assert_eq!(concurrent.runs.len(), 8);
    assert_eq!(concurrent.changed_runs(), 1, "{concurrent}");
    assert!(concurrent.outcomes().iter().all(|o| matches!(
        o,
        RunOutcome::Changed | RunOutcome::Unchanged | RunOutcome::Busy
    )));

    let duplicates = kit
        .duplicate_events("42", 3)
        .await
        .expect("duplicate_events");
    assert_eq!(duplicates.runs.len(), 3);
    assert_eq!(duplicates.changed_runs(), 1);
    assert!(duplicates.runs.iter().all(|r| r.path == "event"));
    assert_eq!(
        duplicates
            .runs
            .iter()
            .map(|r| r.attempt)
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );

    let paths = kit.every_path("42").await.expect("every_path");
    assert_eq!(paths.runs.len(), 9, "three rounds of three paths: {paths}");
    let firsts: Vec<_> = paths.runs.chunks(3).map(|round| round[0].path).collect();
    assert_eq!(firsts, ["event", "sweep", "manual"]);
    assert_eq!(
        paths.changed_runs(),
        3,
        "each round's first run converges: {paths}"
    );

    let crashes = kit
        .crash_after_each_step("42")
        .await
        .expect("crash_after_each_step");
    assert_eq!(crashes.len(), 2);
    for (report, step) in crashes.iter().zip(["claimed", "invoiced"]) {
        let crash = report.crashed_at.as_ref().expect("crash point");
        assert_eq!(crash.step, step);
        assert_eq!(
            report.runs[0].outcome,
            RunOutcome::Crashed { step: step.into() }
        );
        assert_eq!(report.runs.last().unwrap().outcome, RunOutcome::Unchanged);
    }
    // Crashed after the claim: a later run (after the lease) did the work.
    assert_eq!(crashes[0].changed_runs(), 1, "{}", crashes[0]);
    // Crashed after the last commit: the work was done, nothing left to do.
    assert_eq!(crashes[1].changed_runs(), 0, "{}", crashes[1]);

    // The whole set again, through all_checks, on another key.
    let reports = kit.all_checks("7").await.expect("all_checks");
    assert_eq!(reports.len(), 6);
    for key in ["42", "7"] {
        assert_eq!(
            order_facts(&env.pool, key, "invoices").await.unwrap(),
            ("INVOICED".to_owned(), 1, 1)
        );
    }
}

/// Inserts an invoice without checking anything first, on a table with no
/// unique constraint; then reports Changed only when it moved the state —
/// so a second run reports Unchanged but leaves a second invoice.
struct InvoicesBlindly;

impl Reconciler for InvoicesBlindly {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let mut tx = ctx.pool().begin().await?;
        sqlx::query("INSERT INTO loose_invoices (order_id) VALUES ($1::bigint)")
            .bind(key)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO side_effects (order_id, applied) VALUES ($1::bigint, 1) \
             ON CONFLICT (order_id) DO UPDATE SET applied = side_effects.applied + 1",
        )
        .bind(key)
        .execute(&mut *tx)
        .await?;
        let moved = sqlx::query(
            "UPDATE orders SET state = 'INVOICED' WHERE id = $1::bigint AND state = 'SHIPPED'",
        )
        .bind(key)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        ctx.step("invoiced")?;
        Ok(if moved > 0 {
            Outcome::Changed
        } else {
            Outcome::Unchanged
        })
    }
}

#[tokio::test]
async fn a_duplicate_side_effect_is_caught_through_the_invariant() {
    let env = env().await;
    let kit = kit(&env.pool, InvoicesBlindly).invariant(loosely_invoiced_once);

    let err = kit
        .run_twice("42")
        .await
        .expect_err("the second run invoices again");
    let KitError::InvariantBroken { check, key, .. } = &err else {
        panic!("expected InvariantBroken, got {err}");
    };
    assert_eq!((*check, key.as_str()), ("run_twice", "42"));
    let message = err.to_string();
    assert!(
        message.contains("2 invoice(s)") && message.contains("make each one idempotent"),
        "{message}"
    );
    let report = err.report().expect("report");
    assert_eq!(
        report.outcomes(),
        [&RunOutcome::Changed, &RunOutcome::Unchanged]
    );
    assert_eq!(
        order_facts(&env.pool, "42", "loose_invoices")
            .await
            .unwrap(),
        ("INVOICED".to_owned(), 2, 2)
    );

    let err = kit
        .duplicate_events("42", 3)
        .await
        .expect_err("redeliveries invoice again");
    assert!(matches!(err, KitError::InvariantBroken { .. }), "{err}");
}

/// Like [`InvoicesBlindly`], but honest about it: always reports Changed.
struct AlwaysChanges;

impl Reconciler for AlwaysChanges {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        InvoicesBlindly.reconcile(ctx, key).await?;
        Ok(Outcome::Changed)
    }
}

#[tokio::test]
async fn a_second_run_reporting_changed_is_not_idempotent() {
    let env = env().await;
    // Even with no invariant, the outcomes give it away.
    let kit = kit(&env.pool, AlwaysChanges);

    let err = kit
        .run_twice("42")
        .await
        .expect_err("run 2 reports Changed");
    let KitError::NotIdempotent {
        check, key, run, ..
    } = &err
    else {
        panic!("expected NotIdempotent, got {err}");
    };
    assert_eq!((*check, key.as_str(), *run), ("run_twice", "42", 2));
    let message = err.to_string();
    assert!(
        message.starts_with("run_twice: run 2 of key 42 reported Changed")
            && message.contains("reconcile is not idempotent")
            && message.contains("Outcome::Unchanged"),
        "{message}"
    );

    let err = kit.duplicate_events("42", 3).await.expect_err("redelivery");
    assert!(
        matches!(
            &err,
            KitError::NotIdempotent {
                check: "duplicate_events",
                run: 2,
                ..
            }
        ),
        "{err}"
    );
    let err = kit.every_path("42").await.expect_err("every path");
    assert!(
        matches!(
            &err,
            KitError::NotIdempotent {
                check: "every_path",
                run: 2,
                ..
            }
        ),
        "{err}"
    );
}

/// Checks the state first (so it passes run_twice) but writes the invoice and
/// the state in two transactions: a crash between them leaves an invoiced
/// order still SHIPPED, and the next run invoices it again.
struct NotCrashSafe;

impl Reconciler for NotCrashSafe {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let state: String = sqlx::query_scalar("SELECT state FROM orders WHERE id = $1::bigint")
            .bind(key)
            .fetch_one(ctx.pool())
            .await?;
        if state != "SHIPPED" {
            return Ok(Outcome::Unchanged);
        }
        let mut tx = ctx.pool().begin().await?;
        sqlx::query("INSERT INTO loose_invoices (order_id) VALUES ($1::bigint)")
            .bind(key)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO side_effects (order_id, applied) VALUES ($1::bigint, 1) \
             ON CONFLICT (order_id) DO UPDATE SET applied = side_effects.applied + 1",
        )
        .bind(key)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        ctx.step("invoiced")?;
        sqlx::query("UPDATE orders SET state = 'INVOICED' WHERE id = $1::bigint")
            .bind(key)
            .execute(ctx.pool())
            .await?;
        ctx.step("marked")?;
        Ok(Outcome::Changed)
    }
}

#[tokio::test]
async fn a_crash_between_side_effects_is_caught() {
    let env = env().await;
    let kit = kit(&env.pool, NotCrashSafe).invariant(loosely_invoiced_once);

    // The simple checks cannot see this bug...
    kit.run_twice("42").await.expect("run_twice passes");
    kit.duplicate_events("42", 3)
        .await
        .expect("duplicates pass");

    // ...a crash after the first step can.
    let err = kit
        .crash_after_each_step("42")
        .await
        .expect_err("the crash leaves a second invoice");
    let KitError::InvariantBroken { check, after, .. } = &err else {
        panic!("expected InvariantBroken, got {err}");
    };
    assert_eq!(*check, "crash_after_each_step");
    assert!(after.contains("step #1 \"invoiced\""), "{after}");
    let report = err.report().expect("report");
    assert_eq!(
        report.runs[0].outcome,
        RunOutcome::Crashed {
            step: "invoiced".into()
        }
    );
    assert_eq!(report.runs[1].outcome, RunOutcome::Changed);
    assert_eq!(
        order_facts(&env.pool, "42", "loose_invoices")
            .await
            .unwrap(),
        ("INVOICED".to_owned(), 2, 2)
    );
}

/// Swallows the step's error and goes on.
struct IgnoresCrashes;

impl Reconciler for IgnoresCrashes {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let _ = ctx.step("checked");
        common::Invoicing::new().reconcile(ctx, key).await
    }
}

/// Marks no step.
struct Stepless;

impl Reconciler for Stepless {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let moved = sqlx::query(
            "UPDATE orders SET state = 'INVOICED' WHERE id = $1::bigint AND state = 'SHIPPED'",
        )
        .bind(key)
        .execute(ctx.pool())
        .await?
        .rows_affected();
        Ok(if moved > 0 {
            Outcome::Changed
        } else {
            Outcome::Unchanged
        })
    }
}

#[tokio::test]
async fn misuse_is_reported_with_a_fix() {
    let env = env().await;

    let err = kit(&env.pool, IgnoresCrashes)
        .invariant(invoiced_once)
        .crash_after_each_step("42")
        .await
        .expect_err("the crash is swallowed");
    assert!(matches!(err, KitError::CrashIgnored { .. }), "{err}");
    assert!(err.to_string().contains("with `?`"), "{err}");

    // No steps: nowhere to crash.
    let err = kit(&env.pool, Stepless)
        .invariant(|_, _| async { Ok::<(), BoxError>(()) })
        .crash_after_each_step("43")
        .await
        .expect_err("no step to crash at");
    assert!(matches!(err, KitError::NoSteps { .. }), "{err}");
    assert!(err.to_string().contains("ctx.step(\"name\")?"), "{err}");

    // Missing setup or invariant.
    let bare = Kit::new(
        env.pool.clone(),
        "invoicing",
        Arc::new(common::Invoicing::new()),
    );
    let err = bare
        .crash_after_each_step("42")
        .await
        .expect_err("no setup");
    assert!(
        matches!(
            err,
            KitError::Missing {
                missing: "setup",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "crash_after_each_step needs Kit::setup: call .setup(..) with a closure re-creating the \
         key's initial state before each crash"
    );
    let err = bare
        .setup(reset_order)
        .crash_after_each_step("42")
        .await
        .expect_err("no invariant");
    assert!(
        matches!(
            err,
            KitError::Missing {
                missing: "invariant",
                ..
            }
        ),
        "{err}"
    );

    // A failing setup names the key.
    let err = Kit::new(
        env.pool.clone(),
        "invoicing",
        Arc::new(common::Invoicing::new()),
    )
    .setup(|_, _| async { Err::<(), BoxError>("no such fixture".into()) })
    .run_twice("42")
    .await
    .expect_err("setup fails");
    assert_eq!(
        err.to_string(),
        "run_twice: the setup of key 42 failed: no such fixture"
    );
}

/// An application's own fault injection: stop every run at `claimed`.
struct StopAtClaimed;

impl StepHook for StopAtClaimed {
    fn on_step(&self, name: &str) -> Result<(), ReconcileError> {
        if name == "claimed" {
            return Err(SimulatedCrash::at(name).into());
        }
        Ok(())
    }
}

#[tokio::test]
async fn steps_are_no_ops_without_a_hook_and_crash_points_with_one() {
    let env = env().await;
    reset_order(env.pool.clone(), "42".into()).await.unwrap();
    let reconciler = common::Invoicing::new();
    let ctx = Context::new(
        env.pool.clone(),
        Trigger::Manual { reason: None },
        1,
        RateLimits::new(),
        "app-1/invoicing",
    );
    assert!(ctx.step("anything").is_ok());

    let faulty = ctx.clone().with_step_hook(Arc::new(StopAtClaimed));
    let RunResult::Failed(e) = run_key(&reconciler, "invoicing", &faulty, "42").await else {
        panic!("the hook stops the run");
    };
    assert!(e.is_retryable());
    assert_eq!(
        SimulatedCrash::in_error(&e),
        Some(&SimulatedCrash::at("claimed"))
    );
    // Stopped after the claim's commit, before the invoice.
    assert_eq!(
        order_facts(&env.pool, "42", "invoices").await.unwrap(),
        ("INVOICING".to_owned(), 0, 0)
    );

    // Without the hook, once the claim's lease is over, the run finishes.
    tokio::time::sleep(common::LEASE + Duration::from_millis(50)).await;
    let result = run_key(&reconciler, "invoicing", &ctx, "42").await;
    assert!(
        matches!(result, RunResult::Done(Outcome::Changed)),
        "{result:?}"
    );
    invoiced_once(env.pool.clone(), "42".into()).await.unwrap();
}

/// Does nothing and says so: every run reports Unchanged.
struct DoesNothing;

impl Reconciler for DoesNothing {
    async fn reconcile(&self, ctx: &Context, _key: &str) -> Result<Outcome, ReconcileError> {
        ctx.step("looked")?;
        Ok(Outcome::Unchanged)
    }
}

/// An invariant that only counts duplicates: at most one invoice, the side
/// effect applied at most once. A reconciler that does nothing satisfies it.
async fn never_twice(pool: PgPool, key: String) -> Result<(), BoxError> {
    let (_, invoices, applied) = order_facts(&pool, &key, "invoices").await?;
    if invoices > 1 || applied > 1 {
        return Err(format!("order {key}: {invoices} invoices, applied {applied} times").into());
    }
    Ok(())
}

#[tokio::test]
async fn a_reconciler_that_changes_nothing_fails_every_check_after_a_setup() {
    let env = env().await;
    let kit = kit(&env.pool, DoesNothing).invariant(never_twice);

    let err = kit.all_checks("42").await.expect_err("nothing is invoiced");
    let KitError::NothingChanged { check, key, report } = &err else {
        panic!("expected NothingChanged, got {err}");
    };
    assert_eq!((*check, key.as_str()), ("run_twice", "42"));
    assert_eq!(report.outcomes(), [&RunOutcome::Unchanged]);
    assert!(
        err.to_string().contains(
            "the first run after setup changed nothing (key 42): the setup does not leave work \
             to do, or reconcile does nothing"
        ),
        "{err}"
    );

    // Each check on its own, too.
    for (check, result) in [
        ("run_twice", kit.run_twice("42").await),
        ("run_concurrently", kit.run_concurrently("42", 4).await),
        ("duplicate_events", kit.duplicate_events("42", 3).await),
        ("every_path", kit.every_path("42").await),
    ] {
        let err = result.expect_err(check);
        assert!(
            matches!(&err, KitError::NothingChanged { check: c, .. } if *c == check),
            "{check}: {err}"
        );
    }
    let err = kit
        .crash_after_each_step("42")
        .await
        .expect_err("the clean run changes nothing");
    assert!(
        matches!(
            err,
            KitError::NothingChanged {
                check: "crash_after_each_step",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        order_facts(&env.pool, "42", "invoices").await.unwrap(),
        ("SHIPPED".to_owned(), 0, 0)
    );
}

#[tokio::test]
async fn checks_of_redeliveries_and_paths_need_a_setup() {
    let env = env().await;
    reset_order(env.pool.clone(), "42".into()).await.unwrap();
    let bare = Kit::new(
        env.pool.clone(),
        "invoicing",
        Arc::new(common::Invoicing::new()),
    )
    .invariant(invoiced_once);

    let duplicates = bare.duplicate_events("42", 3).await;
    let paths = bare.every_path("42").await;
    let all = bare.all_checks("42").await;
    for (check, result) in [
        ("duplicate_events", duplicates.map(|_| ())),
        ("every_path", paths.map(|_| ())),
        ("all_checks", all.map(|_| ())),
    ] {
        let err = result.expect_err(check);
        assert!(
            matches!(&err, KitError::Missing { check: c, missing: "setup", .. } if *c == check),
            "{check}: {err}"
        );
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("{check} needs Kit::setup: call .setup(..) with")),
            "{message}"
        );
    }
    // Nothing ran.
    assert_eq!(
        order_facts(&env.pool, "42", "invoices").await.unwrap(),
        ("SHIPPED".to_owned(), 0, 0)
    );
}

#[tokio::test]
async fn concurrent_runs_that_never_get_the_lock_are_an_error() {
    let env = env().await;
    // No invariant: with every run busy, nothing else would notice.
    let locked_only = kit(&env.pool, common::Invoicing::new());

    // Another process holds key 42 of "invoicing" (its lease row, for an hour).
    sqlx::query(
        "INSERT INTO converge.key_leases (reconciler, key, token, holder, acquired_at, expires_at) \
         VALUES ('invoicing', '42', nextval('converge.key_lease_tokens'), 'another process', \
                 now(), now() + interval '1 hour')",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let ctx = Context::new(
        env.pool.clone(),
        Trigger::Manual { reason: None },
        1,
        RateLimits::new(),
        "probe/invoicing",
    );
    let probe = run_key(&common::Invoicing::new(), "invoicing", &ctx, "42").await;
    assert!(
        matches!(probe, RunResult::Busy),
        "the held lock is the key's: {probe:?}"
    );

    let err = locked_only
        .run_concurrently("42", 8)
        .await
        .expect_err("no run gets the lock");
    let KitError::NeverRan {
        key,
        locked,
        report,
    } = &err
    else {
        panic!("expected NeverRan, got {err}");
    };
    assert_eq!((key.as_str(), *locked), ("42", 8));
    assert!(
        report.outcomes().iter().all(|o| **o == RunOutcome::Busy),
        "{report}"
    );
    assert!(
        err.to_string()
            .contains("never actually run under the lock"),
        "{err}"
    );

    // Unlocked runs complete, but none under the lock did: still an error.
    let err = kit(&env.pool, common::Invoicing::new())
        .unlocked_concurrent_runs()
        .run_concurrently("42", 4)
        .await
        .expect_err("the locked runs find the key busy");
    let KitError::NeverRan { locked, report, .. } = &err else {
        panic!("expected NeverRan, got {err}");
    };
    assert_eq!(*locked, 2_usize);
    assert_eq!(report.completed_runs(), 2, "{report}");
    assert!(report
        .runs
        .iter()
        .all(|r| r.locked == (r.outcome == RunOutcome::Busy)));

    // Released: the same check passes.
    sqlx::query("DELETE FROM converge.key_leases WHERE reconciler = 'invoicing' AND key = '42'")
        .execute(&env.pool)
        .await
        .unwrap();
    let report = locked_only
        .run_concurrently("42", 8)
        .await
        .expect("run_concurrently");
    assert_eq!(report.changed_runs(), 1, "{report}");
}

/// Reads the state, then writes without a compare-and-set: safe only under
/// the per-key lock. Every run that saw SHIPPED waits (up to 2 s) for a
/// second one to have seen it too before writing, so two runs that really
/// run at once both invoice.
struct ReadsThenWrites {
    together: Barrier,
}

impl Reconciler for ReadsThenWrites {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let state: String = sqlx::query_scalar("SELECT state FROM orders WHERE id = $1::bigint")
            .bind(key)
            .fetch_one(ctx.pool())
            .await?;
        if state != "SHIPPED" {
            return Ok(Outcome::Unchanged);
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.together.wait()).await;
        let mut tx = ctx.pool().begin().await?;
        sqlx::query("INSERT INTO loose_invoices (order_id) VALUES ($1::bigint)")
            .bind(key)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO side_effects (order_id, applied) VALUES ($1::bigint, 1) \
             ON CONFLICT (order_id) DO UPDATE SET applied = side_effects.applied + 1",
        )
        .bind(key)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE orders SET state = 'INVOICED' WHERE id = $1::bigint")
            .bind(key)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        ctx.step("invoiced")?;
        Ok(Outcome::Changed)
    }
}

fn reads_then_writes() -> ReadsThenWrites {
    ReadsThenWrites {
        together: Barrier::new(2),
    }
}

#[tokio::test]
async fn unlocked_concurrent_runs_test_the_reconcilers_own_safety() {
    let env = env().await;

    // Compare-and-set claims: safe with several runs at once.
    let report = kit(&env.pool, common::Invoicing::new())
        .invariant(invoiced_once)
        .unlocked_concurrent_runs()
        .run_concurrently("42", 8)
        .await
        .expect("claims keep unlocked runs apart");
    let unlocked: Vec<_> = report.runs.iter().filter(|r| !r.locked).collect();
    assert_eq!(unlocked.len(), 4, "{report}");
    assert!(
        unlocked.iter().all(|r| r.outcome.is_completed()),
        "{report}"
    );
    assert_eq!(report.changed_runs(), 1, "{report}");
    assert!(report.to_string().contains(" unlocked "), "{report}");

    // Read, then write: the lock alone keeps it correct...
    let report = kit(&env.pool, reads_then_writes())
        .invariant(loosely_invoiced_once)
        .run_concurrently("43", 8)
        .await
        .expect("one run at a time under the lock");
    assert_eq!(report.changed_runs(), 1, "{report}");

    // ...runs without it invoice twice.
    let err = kit(&env.pool, reads_then_writes())
        .invariant(loosely_invoiced_once)
        .unlocked_concurrent_runs()
        .run_concurrently("44", 8)
        .await
        .expect_err("two runs at once both invoice");
    let KitError::ConcurrentChanges { changed, runs, .. } = &err else {
        panic!("expected ConcurrentChanges, got {err}");
    };
    assert!(*changed >= 2 && *runs == 8, "{err}");
    let (_, invoices, _) = order_facts(&env.pool, "44", "loose_invoices")
        .await
        .unwrap();
    assert!(invoices >= 2, "{invoices} invoices");
}
