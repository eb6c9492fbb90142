//! Why a worker could not start or stop cleanly.

use converge_handlers::ConsumerError;
use converge_outbox::RelayError;
use converge_sweeper::SweepError;

/// Why a worker could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The worker's configuration is invalid.
    #[error("invalid worker configuration: {0}")]
    Config(String),
    /// The relay failed.
    #[error("relay: {0}")]
    Relay(#[from] RelayError),
    /// A consumer failed.
    #[error("consumer: {0}")]
    Consumer(#[from] ConsumerError),
    /// The sweeper failed.
    #[error("sweeper: {0}")]
    Sweep(#[from] SweepError),
    /// The projections could not start (a declaration, a projection
    /// registered in the other mode, the database).
    #[error("projections: {0}")]
    Projections(#[from] converge_eventsourcing::RepositoryError),
    /// The schema is not migrated, the PostgreSQL role lacks privileges, or
    /// migrating at start ([`crate::Worker::migrate_at_start`]) failed.
    #[error("schema: {0}")]
    Schema(#[from] converge_schema::MigrateError),
    /// A database call failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Subscribing to the control plane failed.
    #[error("control plane: could not subscribe to {subject}: {source}")]
    Control {
        /// The control subject.
        subject: String,
        /// The NATS error.
        #[source]
        source: async_nats::SubscribeError,
    },
    /// Waiting for a shutdown signal failed.
    #[error("could not listen for shutdown signals: {0}")]
    Signal(#[source] std::io::Error),
    /// Parts of the worker were still running when the shutdown timed out.
    #[error("shutdown: {0}")]
    Shutdown(String),
}

impl WorkerError {
    /// Whether starting again later may succeed (the database or NATS was
    /// unreachable, a serialization failure) rather than a configuration error.
    pub fn is_retryable(&self) -> bool {
        match self {
            WorkerError::Relay(e) => e.is_retryable(),
            WorkerError::Consumer(e) => e.is_retryable(),
            WorkerError::Sweep(e) => e.is_retryable(),
            WorkerError::Database(e) => converge_outbox::is_retryable_sqlx(e),
            WorkerError::Schema(e) => e.is_retryable(),
            WorkerError::Projections(e) => e.is_retryable(),
            WorkerError::Control { .. } => true,
            WorkerError::Config(_) | WorkerError::Signal(_) | WorkerError::Shutdown(_) => false,
        }
    }
}
