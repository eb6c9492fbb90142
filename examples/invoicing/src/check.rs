//! The convergence check: every shipped order is `INVOICED` with exactly one
//! invoice, and no invoice exists without an `INVOICED` order.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use sqlx::PgPool;

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
    /// Whether everything shipped is invoiced exactly once.
    pub converged: bool,
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
        out
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
    for s in [state::SHIPPED, state::INVOICING, state::FAILED] {
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
