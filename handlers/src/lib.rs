//! Idempotent reconcilers on the JetStream fast path.
//!
//! A [`Reconciler`] is keyed by aggregate: given a key, it reads the current
//! state and takes the next step toward the target state. Events on the stream
//! only hint that a key may need work; the same reconciler runs for an event,
//! for a sweep and for an operator, through [`run_key`].
//!
//! * [`StateMachine`] — compare-and-set transitions in the caller's
//!   transaction, with claimed intermediate states resumable after a lease.
//! * [`Consumer`] — a durable JetStream pull consumer per reconciler: bounded
//!   concurrency, ack after success, retries with backoff and jitter, dead
//!   letters and a recover hook after the last attempt.
//! * [`RateLimits`] — named limiters shared by every path in the process, or
//!   cluster-wide through Postgres.
//! * Per-key mutual exclusion across paths and processes: a lease per
//!   (reconciler, key) in `converge.key_leases`, taken with `try` (no
//!   deadlock, no other key blocked), renewed while the run works, with a
//!   fencing token ([`Context::fencing_token`], [`Context::check_fence`]). A
//!   run whose lease is lost is stopped before the lease can expire in the
//!   database, so two runs of one key never overlap — whatever happens to
//!   connections, poolers or fail-overs (the conditions are in the README).
//! * [`Context::idempotency_key`] — one key per logical step of a key, the
//!   same across retries, redeliveries, sweeps and resumed claims: at-least-once
//!   execution, exactly-once effect against a target that honours it.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod attempts;
mod consumer;
mod dead_letter;
mod error;
mod event_hint;
mod exclusion;
mod lease;
mod limits;
pub mod metrics;
mod named;
mod reconciler;
mod run;
mod state;
mod step;

pub use consumer::{Consumer, ConsumerConfig, ConsumerError, ConsumerHandle, RetryPolicy};
pub use dead_letter::{dead_letter_key, DeadLetter};
pub use error::{ReconcileError, ResultExt};
pub use exclusion::{ExclusionLost, NotInRun};
#[doc(hidden)]
pub use lease::sql as lease_sql;
pub use lease::DEFAULT_KEY_LEASE;
pub use limits::*;
pub use named::NamedReconciler;
pub use reconciler::{Context, EventHint, Outcome, Reconciler, Trigger};
pub use run::{run_key, run_keys, RunResult};
pub use state::*;
pub use step::{SimulatedCrash, StepHook};

pub use converge_outbox::host_name;

/// A name for this process, unique per host and process start:
/// `{prefix}-{hostname}-{pid}-{4 random hex digits}`. Containers all run as
/// pid 1, so the host name (the container's) and a random suffix keep two
/// replicas' claimants apart.
pub fn instance_name(prefix: &str) -> String {
    let host = host_name().unwrap_or_else(|| "host".to_owned());
    let suffix: u16 = rand::random();
    format!("{prefix}-{host}-{}-{suffix:04x}", std::process::id())
}
