//! The event-sourcing example: accounts and transfers are event-sourced
//! aggregates ([`domain`]) — their state is the fold of their events in
//! converge's outbox, nothing else is stored — and a saga ([`saga`]) moves
//! each transfer `REQUESTED → DEBITED → CREDITED`, or `REFUNDED` when the
//! credit is refused, one transaction per step over the two aggregates it
//! touches. The saga runs on the transfer events (the fast path) and on a
//! sweep over the event log — transfers with `Requested` and no final event —
//! so a lost event, a crash between two steps or a dead-lettered event costs
//! latency, never a transfer.
//!
//! * [`domain`] — the `Account` and `Transfer` aggregates.
//! * [`saga`] — the transfer reconciler.
//! * [`projections`] — `bank.balances` (inline) and `bank.transfers`
//!   (asynchronous), rebuildable from history.
//! * [`worker`] — a converge `Worker` running it all.
//! * [`check`] — the convergence check from the event log.
//! * [`demo`] — the end-to-end demo; [`cli`] — the command line.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod check;
pub mod cli;
pub mod demo;
pub mod domain;
mod error;
pub mod faults;
pub mod projections;
pub mod saga;
pub mod schema;
pub mod worker;

pub use error::{connect_nats, connect_postgres, BankError};
