//! identity-sync: the second seed article as a converge application.
//!
//! A business table (`identity_sync.users`) whose inserts and updates a SQL
//! trigger records in `identity_sync.changed_records` (PENDING). A sweep on
//! the seed's out-of-hours schedule (`0 */5 22-23,0-5 * * *`, Melbourne time,
//! under converge's cluster lease) runs every PENDING record through the
//! [`IdentitySync`](reconciler::IdentitySync) reconciler, which waits on a
//! 2-per-second rate limiter and `PUT`s the user to the identity API; the
//! sweep retries transient failures with exponential backoff and, once it
//! gives up, the reconciler's recover hook marks the record FAILED.
//!
//! * [`schema`] — the example's own Postgres schema and its trigger.
//! * [`api`] — a local, rate-limited, occasionally failing identity API.
//! * [`reconciler`] — the reconciler and its rate limit.
//! * [`sweep`] — the sweep's candidates, schedule and retries.
//! * [`commands`] — the `identity-sync` command line.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod commands;
pub mod reconciler;
pub mod schema;
pub mod sweep;
