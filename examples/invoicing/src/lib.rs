//! The invoicing example: orders move `CREATED → SHIPPED`; shipping appends an
//! [`OrderShipped`](domain::OrderShipped) event to the outbox in the same
//! transaction, and one reconciler — driven by those events *and* by a sweep —
//! takes every shipped order through `SHIPPED → INVOICING → INVOICED`, creating
//! exactly one invoice per order, even when events are missing (the "legacy"
//! shipping path emits none), reconciles fail, or a worker dies half-way.
//!
//! * [`schema`] — the example's own `invoicing` schema and its migration.
//! * [`domain`] — the order states, the event, and shipping.
//! * [`reconciler`] — the invoice reconciler (a [`converge::handlers::StateMachine`]
//!   with the claimed intermediate state `INVOICING`).
//! * [`billing`] — the external side effect: a local billing service that
//!   honours idempotency keys and counts double charges, and its client.
//! * [`worker`] — a [`converge::Worker`]: relay, consumer, sweep, control plane.
//! * [`check`] — the convergence check.
//! * [`demo`] — the end-to-end demo.
//! * [`cli`] — the command line.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod billing;
pub mod check;
pub mod cli;
pub mod demo;
pub mod domain;
mod error;
pub mod faults;
pub mod reconciler;
pub mod schema;
pub mod worker;

pub use error::{connect_nats, connect_postgres, InvoicingError};
