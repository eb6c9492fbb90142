//! The invoice reconciler under `converge-testkit`: idempotent on every path,
//! safe under concurrent runs and redelivered events, and crash-safe at each of
//! its steps (`"claimed"`, `"invoiced"`), with exactly one invoice per order.

use std::sync::Arc;
use std::time::Duration;

use converge_testkit::{BoxError, Kit, Report, RunOutcome};
use converge_tests::TestEnv;
use invoicing::domain::{create_orders, AGGREGATE_TYPE, ORDER_SHIPPED};
use invoicing::reconciler::{InvoiceReconciler, RECONCILER_NAME};
use invoicing::schema::migrate;
use sqlx::PgPool;

/// A short claim lease, so a run crashed after its claim is resumed quickly.
const CLAIM_LEASE: Duration = Duration::from_millis(150);

/// The order `key` as just shipped: `SHIPPED`, unclaimed, without an invoice.
async fn shipped_without_invoice(pool: PgPool, key: String) -> Result<(), BoxError> {
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM invoicing.invoices WHERE order_id = $1::bigint")
        .bind(&key)
        .execute(&mut *tx)
        .await?;
    let reset = sqlx::query(
        "UPDATE invoicing.orders \
         SET state = 'SHIPPED', shipped_at = now(), claimed_by = NULL, claimed_at = NULL, \
             invoiced_at = NULL \
         WHERE id = $1::bigint",
    )
    .bind(&key)
    .execute(&mut *tx)
    .await?;
    if reset.rows_affected() != 1 {
        return Err(format!("order {key} does not exist: create it before the checks").into());
    }
    tx.commit().await?;
    Ok(())
}

/// Converged: the order is `INVOICED`, unclaimed, with exactly one invoice of
/// its amount.
async fn invoiced_once(pool: PgPool, key: String) -> Result<(), BoxError> {
    let (state, claimed_by, invoices, amount_matches): (String, Option<String>, i64, bool) =
        sqlx::query_as(
            "SELECT o.state, o.claimed_by, \
                    (SELECT count(*) FROM invoicing.invoices i WHERE i.order_id = o.id), \
                    COALESCE((SELECT bool_and(i.amount_cents = o.amount_cents) \
                              FROM invoicing.invoices i WHERE i.order_id = o.id), false) \
             FROM invoicing.orders o WHERE o.id = $1::bigint",
        )
        .bind(&key)
        .fetch_one(&pool)
        .await?;
    if state != "INVOICED" || invoices != 1 {
        return Err(format!("order {key} is {state} with {invoices} invoices").into());
    }
    if let Some(claimant) = claimed_by {
        return Err(format!("order {key} is INVOICED but still claimed by {claimant}").into());
    }
    if !amount_matches {
        return Err(format!("order {key}'s invoice does not carry the order's amount").into());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invoice_reconciler_passes_every_check_of_the_kit() {
    let env = TestEnv::new().await;
    migrate(&env.pool)
        .await
        .expect("migrate the invoicing schema");
    let ids = create_orders(&env.pool, 3).await.expect("create orders");
    let reconciler = Arc::new(InvoiceReconciler::new(CLAIM_LEASE));
    let kit = Kit::new(env.pool.clone(), RECONCILER_NAME, reconciler.clone())
        // The reconciler reads the order, not the event's payload.
        .event(AGGREGATE_TYPE, ORDER_SHIPPED, "{}")
        .setup(shipped_without_invoice)
        .invariant(invoiced_once);

    for id in &ids {
        let key = id.to_string();
        let reports = kit
            .all_checks(&key)
            .await
            .unwrap_or_else(|e| panic!("order {key}: {e}"));

        // A clean run passes both steps, in order.
        let run_twice = &reports[0];
        assert_eq!(run_twice.check, "run_twice");
        assert_eq!(run_twice.steps(), ["claimed", "invoiced"], "{run_twice}");

        let crashes: Vec<&Report> = reports.iter().filter(|r| r.crashed_at.is_some()).collect();
        let crash_steps: Vec<&str> = crashes
            .iter()
            .map(|r| r.crashed_at.as_ref().unwrap().step.as_str())
            .collect();
        assert_eq!(crash_steps, ["claimed", "invoiced"]);
        for crash in &crashes {
            let step = &crash.crashed_at.as_ref().unwrap().step;
            assert_eq!(
                crash.runs[0].outcome,
                RunOutcome::Crashed { step: step.clone() },
                "{crash}"
            );
            // Crashed after the claim, the invoice is still to do: exactly one
            // later run (taking over the expired claim) does it. Crashed after
            // the invoice, nothing is left: no later run changes anything.
            let changed_after = crash.runs[1..]
                .iter()
                .filter(|r| r.outcome.is_changed())
                .count();
            let expected = usize::from(step == "claimed");
            assert_eq!(changed_after, expected, "{crash}");
        }
        invoiced_once(env.pool.clone(), key)
            .await
            .expect("converged after the checks");
    }
    // Only the crash after the claim leaves a claim to take over: one per order.
    assert_eq!(
        reconciler.stats().snapshot().resumed_claims,
        ids.len() as u64
    );
}
