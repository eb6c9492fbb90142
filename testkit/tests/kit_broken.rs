//! Broken reconcilers are caught, each by the check meant for its bug: a
//! duplicate side effect, a second run reporting Changed, a crash between
//! side effects.

mod common;

use common::{env, kit};

use common::{loosely_invoiced_once, order_facts};
use converge::handlers::{Context, Outcome, ReconcileError, Reconciler};
use converge_testkit::{KitError, RunOutcome};

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
