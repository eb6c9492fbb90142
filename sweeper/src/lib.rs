//! Scheduled sweeps that drive the same reconcilers as the fast path.
//!
//! This crate is the place of the sweeper layer (schema ← outbox ← handlers ←
//! sweeper ← converge). Its API — schedules, the cluster-wide lease, overlap
//! policies, bounded batches and run history — is the subject of the sweeper
//! issue and is not written yet; until then it re-exports the handlers layer so
//! the dependency chain is in place.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub use converge_handlers as handlers;
