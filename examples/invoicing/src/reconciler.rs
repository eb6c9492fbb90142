//! The invoice reconciler: one function for the event path, the sweep and
//! operators, taking a shipped order to `INVOICED` with exactly one invoice.
//!
//! ```text
//! SHIPPED ──claim──▶ INVOICING ──invoice + transition──▶ INVOICED
//!                     (claimed_by, claimed_at; resumed once older than the lease)
//! ```
//!
//! 1. **Claim** (own transaction): `SHIPPED → INVOICING`, recording the
//!    claimant and the database time — or take over an `INVOICING` claim older
//!    than the lease (a worker died half-way). Anything else (`INVOICED`, a
//!    live claim, an order still `CREATED`, no such order) ends here:
//!    [`Outcome::Unchanged`], so duplicate and late events cost one statement.
//! 2. **Charge** (with `--billing-url`): charge the order through the billing
//!    service under [`Context::idempotency_key`]`("charge")` — the same key
//!    for every run of this step, so a charge whose answer was lost (a crash,
//!    a cut connection, a stopped process) is never applied twice.
//! 3. **Invoice** (a transaction fenced by the run's key lease,
//!    [`Context::check_fence`]): insert the invoice with
//!    `ON CONFLICT (order_id) DO NOTHING` — the unique constraint makes a
//!    resumed or repeated step harmless — and move `INVOICING → INVOICED`,
//!    fenced by the claim: a worker whose claim was taken over rolls back;
//!    the charge step is completed in the same transaction.
//!
//! The points between the two commits are marked with
//! [`Context::step`]: `"claimed"` (the claim is committed, the invoice is not),
//! `"charged"` and `"invoiced"` — the crash points `converge-testkit`
//! exercises, and where the demo's injected faults
//! ([`crate::faults::WithFaults`], kept out of this file) abort the process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use converge::handlers::{
    Claim, Context, Outcome, ReconcileError, Reconciler, StateMachine, Transition, Trigger,
};

use crate::billing::BillingClient;
use crate::domain::{state, state_machine};

/// The reconciler's name: the durable consumer's name, the per-key lock
/// namespace (shared by the consumer and the sweep) and the dead letters'
/// `reconciler` column.
pub const RECONCILER_NAME: &str = "invoicing";

/// The step whose idempotency key the billing call sends.
pub const CHARGE_STEP: &str = "charge";

/// What reconcilers did, counted in memory (shared by the demo's workers).
#[derive(Debug, Default)]
pub struct ReconcileStats {
    invoiced_by_event: AtomicU64,
    invoiced_by_sweep: AtomicU64,
    invoiced_manually: AtomicU64,
    injected_failures: AtomicU64,
    resumed_claims: AtomicU64,
}

/// A snapshot of [`ReconcileStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Orders invoiced on the event path.
    pub invoiced_by_event: u64,
    /// Orders invoiced by a sweep.
    pub invoiced_by_sweep: u64,
    /// Orders invoiced by a manual run (operator, application code).
    pub invoiced_manually: u64,
    /// Reconciles failed on purpose (`--fail-rate`), then retried.
    pub injected_failures: u64,
    /// Expired `INVOICING` claims taken over.
    pub resumed_claims: u64,
}

impl ReconcileStats {
    /// The counts now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            invoiced_by_event: self.invoiced_by_event.load(Ordering::Relaxed),
            invoiced_by_sweep: self.invoiced_by_sweep.load(Ordering::Relaxed),
            invoiced_manually: self.invoiced_manually.load(Ordering::Relaxed),
            injected_failures: self.injected_failures.load(Ordering::Relaxed),
            resumed_claims: self.resumed_claims.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn injected_failure(&self) {
        self.injected_failures.fetch_add(1, Ordering::Relaxed);
    }

    fn invoiced(&self, trigger: &Trigger) {
        let counter = match trigger {
            Trigger::Event(_) => &self.invoiced_by_event,
            Trigger::Sweep { .. } => &self.invoiced_by_sweep,
            _ => &self.invoiced_manually,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Creates one invoice per shipped order; see the module docs.
#[derive(Debug, Clone)]
pub struct InvoiceReconciler {
    machine: StateMachine,
    stats: Arc<ReconcileStats>,
    billing: Option<BillingClient>,
}

impl InvoiceReconciler {
    /// A reconciler whose `INVOICING` claims expire after `claim_lease`.
    /// Faults are injected around it, not in it ([`crate::faults::WithFaults`]).
    pub fn new(claim_lease: Duration) -> Self {
        InvoiceReconciler {
            machine: state_machine(claim_lease),
            stats: Arc::default(),
            billing: None,
        }
    }

    /// Charges each order through `billing` before invoicing it, under the
    /// step's idempotency key.
    pub fn with_billing(mut self, billing: BillingClient) -> Self {
        self.billing = Some(billing);
        self
    }

    /// Counts into `stats` (e.g. one set shared by several reconcilers).
    pub fn with_stats(mut self, stats: Arc<ReconcileStats>) -> Self {
        self.stats = stats;
        self
    }

    /// What this reconciler did so far.
    pub fn stats(&self) -> &Arc<ReconcileStats> {
        &self.stats
    }

    /// The state machine it drives.
    pub fn machine(&self) -> &StateMachine {
        &self.machine
    }
}

impl Reconciler for InvoiceReconciler {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let claimant = ctx.claimant();
        if matches!(ctx.trigger(), Trigger::Manual { .. }) {
            // An operator's retry of a dead letter: a FAILED order starts over.
            sqlx::query(
                "UPDATE invoicing.orders SET state = 'SHIPPED', claimed_by = NULL, claimed_at = NULL \
                 WHERE id = $1::bigint AND state = 'FAILED'",
            )
            .bind(key)
            .execute(ctx.pool())
            .await?;
        }

        let mut tx = ctx.pool().begin().await?;
        match self
            .machine
            .claim(&mut tx, key, state::SHIPPED, state::INVOICING, claimant)
            .await?
        {
            Claim::Claimed => {}
            Claim::Resumed { previous } => {
                self.stats.resumed_claims.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    order = key,
                    ?previous,
                    "resuming an expired INVOICING claim"
                );
            }
            Claim::NotClaimable { .. } => return Ok(Outcome::Unchanged),
        }
        tx.commit().await?;
        // A crash point: the claim is committed, the invoice is not.
        ctx.step("claimed")?;

        if let Some(billing) = &self.billing {
            // The external side effect, once in effect: every run of this
            // step (a retry, a redelivery, the sweep, a resumed claim) sends
            // the same idempotency key until the step completes below.
            let order_id: i64 = key.parse().map_err(|_| {
                ReconcileError::permanent(format!("order id {key:?} is not a number"))
            })?;
            let amount: i64 =
                sqlx::query_scalar("SELECT amount_cents FROM invoicing.orders WHERE id = $1")
                    .bind(order_id)
                    .fetch_one(ctx.pool())
                    .await?;
            let idempotency_key = ctx.idempotency_key(CHARGE_STEP).await?;
            billing.charge(order_id, amount, idempotency_key).await?;
            // A crash point: the order is charged, the invoice is not.
            ctx.step("charged")?;
        }

        let mut tx = ctx.pool().begin().await?;
        // Fenced: if this run lost its key (stalled past its lease), the
        // transaction writes nothing.
        ctx.check_fence(&mut tx).await?;
        sqlx::query(
            "INSERT INTO invoicing.invoices (order_id, amount_cents) \
             SELECT id, amount_cents FROM invoicing.orders WHERE id = $1::bigint \
             ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(key)
        .execute(&mut *tx)
        .await?;
        match self
            .machine
            .transition_to(&mut tx, key, state::INVOICING, state::INVOICED, claimant)
            .await?
        {
            Transition::Applied => {
                sqlx::query(
                    "UPDATE invoicing.orders SET invoiced_at = now() WHERE id = $1::bigint",
                )
                .bind(key)
                .execute(&mut *tx)
                .await?;
                if self.billing.is_some() {
                    ctx.complete_step(&mut tx, CHARGE_STEP).await?;
                }
                tx.commit().await?;
                self.stats.invoiced(ctx.trigger());
                // The invoice and INVOICED are committed; nothing is left to do.
                ctx.step("invoiced")?;
                Ok(Outcome::Changed)
            }
            Transition::Conflict {
                current,
                claimed_by,
            } => {
                // Our claim was taken over (we stalled past the lease): the
                // new claimant finishes the step; write nothing.
                tx.rollback().await?;
                tracing::warn!(order = key, ?current, ?claimed_by, "INVOICING claim lost");
                Ok(Outcome::Unchanged)
            }
        }
    }

    /// Given up on (permanent error or attempts exhausted, after the dead
    /// letter is recorded): the order becomes `FAILED`, so sweeps stop
    /// visiting it until an operator retries it.
    async fn recover(
        &self,
        ctx: &Context,
        key: &str,
        error: &ReconcileError,
    ) -> Result<(), ReconcileError> {
        if error.is_retryable() {
            // Attempts ran out on a transient failure: leave the order to the
            // next sweep rather than fail it.
            return Ok(());
        }
        sqlx::query(
            "UPDATE invoicing.orders SET state = 'FAILED' \
             WHERE id = $1::bigint AND state IN ('SHIPPED', 'INVOICING')",
        )
        .bind(key)
        .execute(ctx.pool())
        .await?;
        Ok(())
    }
}
