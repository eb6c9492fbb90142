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
//! * Per-key mutual exclusion across paths and processes: a session-level
//!   advisory lock per (reconciler, key), taken with `try` (no deadlock, no
//!   other key blocked) and released by the database if the process dies —
//!   per key ([`run_key`]), per page ([`run_keys`]) or through the consumer's
//!   lock service (one connection, requests grouped per round trip).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod consumer;
mod dead_letter;
mod error;
mod event_hint;
mod limits;
mod lock;
pub mod metrics;
mod reconciler;
mod run;
mod state;
mod step;

pub use consumer::{Consumer, ConsumerConfig, ConsumerError, ConsumerHandle, RetryPolicy};
pub use dead_letter::{dead_letter_key, DeadLetter};
pub use error::{ReconcileError, ResultExt};
pub use limits::*;
pub use reconciler::{Context, EventHint, Outcome, Reconciler, Trigger};
pub use run::{run_key, run_keys, RunResult};
pub use state::*;
pub use step::{SimulatedCrash, StepHook};

pub use converge_outbox as outbox;
