//! Misuse is reported with a fix: swallowed crashes, no steps, a reconciler
//! that changes nothing, checks that need a setup; step hooks of the
//! application's own.

mod common;

use common::{env, kit};

use std::sync::Arc;
use std::time::Duration;

use common::{invoiced_once, order_facts, reset_order};
use converge::handlers::{
    run_key, Context, Outcome, RateLimits, ReconcileError, Reconciler, RunResult, SimulatedCrash,
    StepHook, Trigger,
};
use converge_testkit::{BoxError, Kit, KitError, RunOutcome};
use sqlx::PgPool;

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
