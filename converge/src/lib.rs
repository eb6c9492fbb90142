//! converge: reliable domain-event processing on PostgreSQL and NATS JetStream.
//!
//! * [`Outbox`] — append domain events in the business transaction.
//! * [`Relay`] — publish committed events to JetStream, in commit order per
//!   aggregate, exactly once on the stream, with several instances sharing the work.
//! * [`migrate`] — create or upgrade the `converge` schema the library owns.
//! * [`handlers`] — reconcilers, the durable consumer, the state machine,
//!   rate limits and dead letters; [`sweeper`] — scheduled sweeps driving the
//!   same reconcilers.
//! * [`eventsourcing`] — event-sourced aggregates (repositories with
//!   snapshots), projections inline or asynchronous, rebuilt beside the live
//!   read model; payloads evolve with [`Upcasters`].
//! * [`Worker`] — the runtime: one builder wiring an application's relay,
//!   consumers, sweeps and [`control`] plane into a running worker with one
//!   shutdown handle; operators reach it with the `converge` CLI.
//! * [`nats`] and [`postgres`] — connecting as production runs them: NATS
//!   clusters with credentials and TLS, a PostgreSQL primary and its standbys
//!   behind one multi-host URL, followed through a fail-over.
//! * [`metrics`] — what converge measures, through the `metrics` facade
//!   (feature `prometheus` serves a scrape endpoint).
//!
//! # Quick start
//!
//! ```no_run
//! use converge::{DomainEvent, Outbox, Relay, RelayConfig, StreamConfig};
//!
//! #[derive(serde::Serialize)]
//! struct OrderShipped { order_id: i64 }
//!
//! impl DomainEvent for OrderShipped {
//!     fn aggregate_type(&self) -> &str { "order" }
//!     fn aggregate_id(&self) -> String { self.order_id.to_string() }
//!     fn event_type(&self) -> &str { "OrderShipped" }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/app").await?;
//!     converge::migrate(&pool).await?;
//!
//!     let nats = async_nats::connect("127.0.0.1:4222").await?;
//!     let relay = Relay::new(pool.clone(), nats, RelayConfig::new(StreamConfig::new("ORDERS", "orders")))
//!         .start()
//!         .await?;
//!
//!     let outbox = Outbox::default();
//!     let mut tx = pool.begin().await?;
//!     sqlx::query("UPDATE orders SET state = 'SHIPPED' WHERE id = $1")
//!         .bind(42_i64)
//!         .execute(&mut *tx)
//!         .await?;
//!     outbox.append(&mut tx, &OrderShipped { order_id: 42 }).await?;
//!     tx.commit().await?; // now, and only now, the relay publishes `orders.order.OrderShipped`
//!
//!     relay.shutdown().await?;
//!     Ok(())
//! }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod control;
pub mod metrics;
pub mod nats;
pub mod postgres;
mod worker;

pub use converge_outbox::*;
pub use converge_schema::{
    grant_sql, latest_migration, migrate, InvalidRoleName, MigrateError, Role, RELAY_PARTITIONS,
    SCHEMA,
};
pub use worker::{
    shutdown_signal, Registration, Worker, WorkerError, WorkerHandle, DEFAULT_NATS_STALL_TIMEOUT,
};

/// Reconcilers on the fast path: the trait, the consumer, the state machine,
/// rate limits and dead letters.
pub use converge_handlers as handlers;

/// Event-sourced aggregates, repositories, snapshots and projections.
pub use converge_eventsourcing as eventsourcing;

/// Scheduled sweeps driving the same reconcilers: schedules, the cluster
/// lease, overlap policies, bounded batches and run history.
pub use converge_sweeper as sweeper;

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

/// The PostgreSQL driver converge is built on, with the features it needs:
/// use it rather than depending on a `sqlx` of your own (one version, one
/// set of features, one pool type).
pub use sqlx;

/// The NATS client converge is built on (connect with [`nats::NatsConnect`]
/// or `async_nats::connect`).
pub use async_nats;

/// IANA time zones for sweep schedules ([`sweeper::Schedule::cron`]).
pub use chrono_tz;

/// What an application using converge imports: `use converge::prelude::*;`.
pub mod prelude {
    pub use crate::eventsourcing::{
        Aggregate, CommandError, ProjectedEvent, Projection, ProjectionError, ProjectionTx,
        Repository,
    };
    pub use crate::handlers::{Context, Outcome, ReconcileError, Reconciler, ResultExt};
    pub use crate::sweeper::{EventCandidates, KeyType, Schedule, SqlCandidates, Timing};
    pub use crate::{
        transaction, DomainEvent, Event, Outbox, OutboxError, Registration, RelayConfig,
        StreamConfig, TransactionRetry, Upcasters, Worker, WorkerError, WorkerHandle,
    };
}
