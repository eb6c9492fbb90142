//! Scheduled sweeps that drive the same reconcilers as the fast path.
//!
//! A missed event costs latency, never correctness: a sweep re-scans
//! aggregates by state (orders SHIPPED and not INVOICED, INVOICING claims past
//! their lease) in keyset-paginated batches and runs every key through the
//! reconciler the event path runs, under the same per-key lock.
//!
//! * [`Timing`] — cron with seconds in an IANA zone (correct across DST),
//!   fixed rate or fixed delay, optional start-up run, time window, misfire
//!   policy; all computed from an injected clock.
//! * [`Lease`] — one run at a time across the cluster (ShedLock done right:
//!   database clock, `lock_at_most_for`, `lock_at_least_for`, heartbeats,
//!   fencing token). The planned fire time lives in the database and is
//!   claimed with a compare-and-set, so exactly one instance runs each fire.
//! * [`Overlap`] — a trigger during a run is skipped, queued (coalesced) or
//!   replaces the run.
//! * [`SweepRun`] — the run history with counts, caps, errors and failed keys.
//! * [`SqlCandidates`] — which keys a sweep visits, from the application's
//!   tables; [`EventCandidates`] — from the event log ("aggregates with
//!   `Requested` and no `Credited`").
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod candidates;
mod config;
mod error;
mod event_log;
mod history;
mod inspect;
mod lease;
pub mod metrics;
mod probe;
mod run;
pub mod schedule;
mod sweeper;

pub use candidates::{Backlog, Candidates, CheckError, KeyType, SqlCandidates};
pub use config::{Overlap, SweepConfig, MAX_BATCH_SIZE};
pub use error::SweepError;
pub use event_log::EventCandidates;
pub use history::{RunCounts, RunOutcome, RunStatus, RunSummary, SweepRun, TriggerKind};
pub use inspect::{Convergence, HISTORY_RETENTION};
pub use lease::{Lease, LeaseConfig};
pub use schedule::*;
pub use sweeper::{Sweeper, SweeperHandle};
