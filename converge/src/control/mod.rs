//! The control plane between operators (the `converge` CLI) and an
//! application's running workers: NATS request/reply on one subject per
//! sweep and per reconciler of an application, answered by exactly one worker of its queue group.

mod permissions;
mod protocol;

pub use permissions::{inbox_prefix, nats_permissions, NatsRole, StreamScope, UnknownNatsRole};

/// The bounds a worker holds control requests to (larger ones are answered
/// `bad_request` naming the bound; past [`MAX_CONTROL_TASKS`] at once, `busy`).
pub use crate::worker::control::{
    MAX_ACTOR_CHARS, MAX_CONTROL_TASKS, MAX_DRY_RUN_LIMIT, MAX_KEY_BYTES, MAX_REQUEST_KEYS,
    MAX_RETRY_IDS,
};
pub use protocol::*;

/// The headers a control request may carry for the worker's audit row: who
/// asks (claimed) and the sending client.
pub use crate::worker::audit::{ACTOR_HEADER, CLIENT_HEADER};
