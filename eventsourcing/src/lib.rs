//! Event-sourced aggregates on the converge outbox.
//!
//! The outbox is each aggregate's ordered event log; this crate makes it the
//! aggregate's state:
//!
//! * [`Aggregate`] — apply an event to the state; decide a command into
//!   events, or refuse it with a typed domain error.
//! * [`Repository`] — loads an aggregate by folding its history (from a
//!   snapshot, taken every N events, ignored when the state's shape version
//!   changes), and saves the events a command decides with the version it
//!   loaded expected, in the caller's transaction or in one of its own
//!   retried on conflicts. Event-sourced types are kept from retention.
//! * [`Projection`] — read models: inline (in the transaction that saves
//!   the events) or asynchronous ([`ProjectionRunner`], from the outbox with
//!   a cursor committed with the read model), rebuilt from history beside
//!   the live tables and swapped in without stopping writers.
//! * Payloads evolve: every event carries its schema version, and
//!   [`Upcasters`](converge_outbox::Upcasters) bring old payloads to the
//!   current shape on every read.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod aggregate;
mod error;
mod projection;
mod repository;
mod retention;
mod snapshot;

pub use aggregate::{event_types, Aggregate, CodecError};
pub use error::{CommandError, ProjectionError, RepositoryError};
pub use projection::{
    cancel_rebuild, forget_projection, request_rebuild, ProjectedEvent, Projection, ProjectionMode,
    ProjectionRunner, ProjectionTx, ProjectionsHandle, RunnerConfig,
};
pub use repository::{Executed, Loaded, Recorded, Repository, RepositoryBuilder, RepositoryConfig};
pub use retention::{is_kept_forever, keep_forever};
