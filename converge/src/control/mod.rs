//! The control plane between operators (the `converge` CLI) and an
//! application's running workers: NATS request/reply on one subject per
//! sweep and per reconciler of an application, answered by exactly one worker of its queue group.

mod protocol;

pub use protocol::*;
