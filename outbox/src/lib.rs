//! The transactional outbox of converge, and its relay to NATS JetStream.
//!
//! Application code appends domain events with [`Outbox::append`] in the same
//! sqlx transaction as the change they describe: if the transaction rolls back,
//! the events never existed; once it commits, the [`Relay`] publishes them to a
//! JetStream stream, in commit order per aggregate, exactly once on the stream.
//!
//! ```no_run
//! use converge_outbox::{DomainEvent, Outbox, Relay, RelayConfig, StreamConfig};
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
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/app").await?;
//! converge_schema::migrate(&pool).await?;
//!
//! // In the business transaction:
//! let outbox = Outbox::default();
//! let mut tx = pool.begin().await?;
//! sqlx::query("UPDATE orders SET state = 'SHIPPED' WHERE id = $1")
//!     .bind(42_i64)
//!     .execute(&mut *tx)
//!     .await?;
//! outbox.append(&mut tx, &OrderShipped { order_id: 42 }).await?;
//! tx.commit().await?;
//!
//! // Somewhere in the process, once:
//! let nats = async_nats::connect("127.0.0.1:4222").await?;
//! let relay = Relay::new(pool, nats, RelayConfig::new(StreamConfig::new("ORDERS", "orders")))
//!     .start()
//!     .await?;
//! // ... on SIGTERM:
//! relay.shutdown().await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod append;
mod append_sql;
mod backoff;
mod clock;
mod envelope;
mod error;
mod event;
mod evolve;
mod history;
pub mod metrics;
mod partitions;
mod relay;
mod stream;
pub mod trace;
mod transaction;
mod validate;

pub use append::{AppendOptions, Outbox, OutboxConfig, DEFAULT_MAX_EVENT_BYTES, NOTIFY_CHANNEL};
pub use envelope::{wire_size, Envelope, HEADER_MESSAGE_ID};
pub use error::{is_retryable_sqlx, OutboxError, RelayError};
pub use event::{Appended, DomainEvent, Event, StoredEvent};
pub use evolve::{TypeName, UpcastError, Upcasters};
pub use partitions::{
    MovePass, PartitionChangeConfig, PartitionError, PartitionLayout, Partitions, Retirement,
    MAX_PARTITIONS,
};
pub use relay::{
    holding_transaction, HoldingTransaction, Relay, RelayConfig, RelayHandle, Retention,
};
pub use stream::{
    subjects_overlap, StreamConfig, HEADER_AGGREGATE_ID, HEADER_AGGREGATE_TYPE,
    HEADER_AGGREGATE_VERSION, HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_OCCURRED_AT,
    HEADER_SCHEMA_VERSION,
};
pub use trace::{TraceParent, TraceParentError, HEADER_TRACEPARENT};
pub use transaction::{transaction, CommitUnknown, Retryable, TransactionRetry};

/// This machine's (or container's) host name: the kernel's, else `$HOSTNAME`.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}
