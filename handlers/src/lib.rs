//! Idempotent reconcilers on the JetStream fast path.
//!
//! This crate is the place of the handlers layer (schema ← outbox ← handlers ←
//! sweeper ← converge). Its API — reconcilers keyed by aggregate, the state
//! machine helper, retries, rate limits and dead letters — is the subject of the
//! handlers issue and is not written yet; until then it re-exports the outbox so
//! the dependency chain is in place.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub use converge_outbox as outbox;
