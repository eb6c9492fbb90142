//! The convergence check: every shipped order is `INVOICED` with exactly one
//! invoice, and no invoice exists without an `INVOICED` order.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use sqlx::PgPool;

use crate::billing::BillingClient;
use crate::domain::state;
use crate::error::InvoicingError;

/// Order ids listed per unconverged state in a report.
pub const SAMPLE_IDS: i64 = 10;

/// What [`check`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// Orders in total.
    pub orders: i64,
    /// Orders per state (every state listed, zeros included).
    pub orders_by_state: BTreeMap<String, i64>,
    /// Invoices in total.
    pub invoices: i64,
    /// Invoices beyond the first of an order (impossible by the unique
    /// constraint; counted anyway).
    pub duplicates: i64,
    /// Invoices whose order is not `INVOICED`.
    pub orphan_invoices: i64,
    /// `INVOICED` orders without an invoice.
    pub invoiced_without_invoice: i64,
    /// Up to [`SAMPLE_IDS`] order ids per state still to converge
    /// (`SHIPPED`, `INVOICING`, `FAILED`, and `INVOICED` without an invoice).
    pub unconverged: BTreeMap<String, Vec<i64>>,
    /// What the billing service says, when it was checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub billing: Option<BillingCheck>,
    /// Whether everything shipped is invoiced exactly once (and, with the
    /// billing service checked, charged exactly once).
    pub converged: bool,
}

/// The billing service's side of the check: effects, not calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BillingCheck {
    /// Calls the service received (retries included).
    pub calls: u64,
    /// Charges applied.
    pub charges: u64,
    /// Orders charged more than once.
    pub charged_twice: Vec<i64>,
    /// `INVOICED` orders the service never charged.
    pub invoiced_not_charged: Vec<i64>,
    /// Charged orders that are not `INVOICED`.
    pub charged_not_invoiced: Vec<i64>,
    /// Calls for an order made while another call for it was in flight.
    pub overlapping_calls: u64,
}

impl CheckReport {
    /// Orders in `state`.
    pub fn in_state(&self, state: &str) -> i64 {
        self.orders_by_state.get(state).copied().unwrap_or(0)
    }

    /// Orders that were shipped (`SHIPPED`, `INVOICING`, `INVOICED` or `FAILED`).
    pub fn shipped(&self) -> i64 {
        self.in_state(state::SHIPPED)
            + self.in_state(state::INVOICING)
            + self.in_state(state::INVOICED)
            + self.in_state(state::FAILED)
    }

    /// Why the data has not converged, one clause per problem; empty when it has.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let created = self.in_state(state::CREATED);
        if created > 0 {
            out.push(format!(
                "{created} orders still CREATED: shipping them was asked for and did not happen \
                 (e.g. {})",
                sample(self.unconverged.get(state::CREATED))
            ));
        }
        for s in [state::SHIPPED, state::INVOICING] {
            let n = self.in_state(s);
            if n > 0 {
                out.push(format!(
                    "{n} orders in {s} (e.g. {})",
                    sample(self.unconverged.get(s))
                ));
            }
        }
        let failed = self.in_state(state::FAILED);
        if failed > 0 {
            out.push(format!(
                "{failed} orders FAILED (e.g. {}; see `converge dead-letters list`, retry with `converge dead-letters retry`)",
                sample(self.unconverged.get(state::FAILED))
            ));
        }
        if self.invoiced_without_invoice > 0 {
            out.push(format!(
                "{} INVOICED orders without an invoice (e.g. {})",
                self.invoiced_without_invoice,
                sample(self.unconverged.get("INVOICED without invoice"))
            ));
        }
        if self.duplicates > 0 {
            out.push(format!("{} duplicate invoices", self.duplicates));
        }
        if self.orphan_invoices > 0 {
            out.push(format!(
                "{} invoices whose order is not INVOICED",
                self.orphan_invoices
            ));
        }
        if let Some(b) = &self.billing {
            let list = |ids: &[i64]| {
                ids.iter()
                    .take(SAMPLE_IDS as usize)
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if !b.charged_twice.is_empty() {
                out.push(format!(
                    "{} orders charged more than once (e.g. {})",
                    b.charged_twice.len(),
                    list(&b.charged_twice)
                ));
            }
            if !b.invoiced_not_charged.is_empty() {
                out.push(format!(
                    "{} INVOICED orders never charged (e.g. {})",
                    b.invoiced_not_charged.len(),
                    list(&b.invoiced_not_charged)
                ));
            }
            if b.overlapping_calls > 0 {
                out.push(format!(
                    "{} calls to the billing service overlapped another call for the same order",
                    b.overlapping_calls
                ));
            }
            if !b.charged_not_invoiced.is_empty() {
                out.push(format!(
                    "{} charged orders not INVOICED (e.g. {})",
                    b.charged_not_invoiced.len(),
                    list(&b.charged_not_invoiced)
                ));
            }
        }
        out
    }

    /// Checks the billing service's charges against the orders: every
    /// `INVOICED` order charged exactly once, nothing else charged.
    pub async fn add_billing(
        &mut self,
        pool: &PgPool,
        billing: &BillingClient,
    ) -> Result<(), InvoicingError> {
        let unreachable = |e: crate::billing::BillingError| InvoicingError::InvalidArgument {
            option: "--billing-url",
            message: format!("cannot read the billing service's charges: {e}"),
        };
        let stats = billing.stats().await.map_err(unreachable)?;
        let charges = billing.charges().await.map_err(unreachable)?;
        let invoiced: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM invoicing.orders WHERE state = 'INVOICED' ORDER BY id",
        )
        .fetch_all(pool)
        .await
        .map_err(InvoicingError::db("listing invoiced orders"))?;
        let invoiced_set: std::collections::BTreeSet<i64> = invoiced.iter().copied().collect();
        self.billing = Some(BillingCheck {
            calls: stats.calls,
            charges: stats.applied,
            charged_twice: charges
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(o, _)| *o)
                .collect(),
            invoiced_not_charged: invoiced
                .iter()
                .copied()
                .filter(|o| !charges.contains_key(o))
                .collect(),
            charged_not_invoiced: charges
                .keys()
                .copied()
                .filter(|o| !invoiced_set.contains(o))
                .collect(),
            overlapping_calls: stats.overlapping,
        });
        self.converged = self.problems().is_empty();
        Ok(())
    }
}

fn sample(ids: Option<&Vec<i64>>) -> String {
    ids.map(|ids| {
        ids.iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    })
    .unwrap_or_default()
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let states: Vec<String> = state::ALL
            .iter()
            .map(|s| format!("{s} {}", self.in_state(s)))
            .collect();
        writeln!(f, "orders: {} ({})", self.orders, states.join(", "))?;
        writeln!(f, "invoices: {}", self.invoices)?;
        writeln!(f, "duplicates: {}", self.duplicates)?;
        writeln!(f, "orphan invoices: {}", self.orphan_invoices)?;
        writeln!(
            f,
            "invoiced without invoice: {}",
            self.invoiced_without_invoice
        )?;
        if let Some(b) = &self.billing {
            writeln!(
                f,
                "billing: {} calls, {} charges, {} orders charged twice",
                b.calls,
                b.charges,
                b.charged_twice.len()
            )?;
        }
        if self.converged {
            write!(f, "converged")
        } else {
            write!(f, "not converged: {}", self.problems().join("; "))
        }
    }
}

/// Counts orders by state, invoices, duplicates and orphans.
#[tracing::instrument(skip(pool), err)]
pub async fn check(pool: &PgPool) -> Result<CheckReport, InvoicingError> {
    let db = InvoicingError::db;
    let by_state: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM invoicing.orders GROUP BY state")
            .fetch_all(pool)
            .await
            .map_err(db("counting orders"))?;
    let mut orders_by_state: BTreeMap<String, i64> =
        state::ALL.iter().map(|s| (s.to_string(), 0)).collect();
    orders_by_state.extend(by_state);
    let orders = orders_by_state.values().sum();

    let (invoices, duplicates, orphan_invoices, invoiced_without_invoice): (i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT \
               (SELECT count(*) FROM invoicing.invoices), \
               (SELECT coalesce(sum(n - 1), 0)::bigint FROM \
                  (SELECT count(*) AS n FROM invoicing.invoices GROUP BY order_id HAVING count(*) > 1) d), \
               (SELECT count(*) FROM invoicing.invoices i \
                  LEFT JOIN invoicing.orders o ON o.id = i.order_id \
                  WHERE o.id IS NULL OR o.state <> 'INVOICED'), \
               (SELECT count(*) FROM invoicing.orders o WHERE o.state = 'INVOICED' \
                  AND NOT EXISTS (SELECT 1 FROM invoicing.invoices i WHERE i.order_id = o.id))",
        )
        .fetch_one(pool)
        .await
        .map_err(db("counting invoices"))?;

    let mut unconverged = BTreeMap::new();
    for s in [
        state::CREATED,
        state::SHIPPED,
        state::INVOICING,
        state::FAILED,
    ] {
        if orders_by_state.get(s).copied().unwrap_or(0) > 0 {
            let ids: Vec<i64> = sqlx::query_scalar(
                "SELECT id FROM invoicing.orders WHERE state = $1 ORDER BY id LIMIT $2",
            )
            .bind(s)
            .bind(SAMPLE_IDS)
            .fetch_all(pool)
            .await
            .map_err(db("listing unconverged orders"))?;
            unconverged.insert(s.to_owned(), ids);
        }
    }
    if invoiced_without_invoice > 0 {
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT o.id FROM invoicing.orders o WHERE o.state = 'INVOICED' \
             AND NOT EXISTS (SELECT 1 FROM invoicing.invoices i WHERE i.order_id = o.id) \
             ORDER BY o.id LIMIT $1",
        )
        .bind(SAMPLE_IDS)
        .fetch_all(pool)
        .await
        .map_err(db("listing unconverged orders"))?;
        unconverged.insert("INVOICED without invoice".to_owned(), ids);
    }

    let mut report = CheckReport {
        orders,
        orders_by_state,
        invoices,
        duplicates,
        orphan_invoices,
        invoiced_without_invoice,
        unconverged,
        billing: None,
        converged: false,
    };
    report.converged = report.problems().is_empty();
    Ok(report)
}

/// Orders `INVOICED` and orders in total: the demo's progress.
pub async fn progress(pool: &PgPool) -> Result<(i64, i64), InvoicingError> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'INVOICED'), count(*) FROM invoicing.orders",
    )
    .fetch_one(pool)
    .await
    .map_err(InvoicingError::db("counting invoiced orders"))
}
