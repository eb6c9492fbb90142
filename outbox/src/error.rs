//! Errors of the outbox and the relay; each can say whether retrying can help.

use std::time::Duration;

pub use converge_schema::is_retryable_sqlx;

/// Why an append or a history read failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// A field of the event cannot be stored or published as it is.
    #[error("invalid event: {field} {reason}")]
    InvalidEvent {
        /// The offending field (`aggregate_type`, `aggregate_id`, `event_type`,
        /// `headers`, `occurred_at`).
        field: &'static str,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// The event's payload could not be serialized to JSON.
    #[error("event payload of {event_type} could not be serialized to JSON: {source}")]
    Serialize {
        /// The event type.
        event_type: String,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// The event would exceed the largest message the stream accepts.
    #[error(
        "event {event_type} for {aggregate_type}/{aggregate_id} is {size} bytes with headers, \
         over the limit of {limit} bytes (OutboxConfig::max_event_bytes, which must not exceed \
         the NATS server's max_payload): store large data elsewhere and send a reference"
    )]
    TooLarge {
        /// The aggregate type.
        aggregate_type: String,
        /// The aggregate id.
        aggregate_id: String,
        /// The event type.
        event_type: String,
        /// The event's size in bytes, payload and headers.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The aggregate's version was not the one the caller expected.
    #[error(
        "version conflict on {aggregate_type}/{aggregate_id}: expected version {expected}, \
         found {actual}; reload the aggregate and retry the transaction"
    )]
    VersionConflict {
        /// The aggregate type.
        aggregate_type: String,
        /// The aggregate id.
        aggregate_id: String,
        /// The version the caller expected.
        expected: i64,
        /// The version in the outbox.
        actual: i64,
    },
    /// Another transaction appended to the same aggregate at the same time and
    /// committed first. The transaction is aborted: roll it back and retry.
    #[error(
        "concurrent append to {aggregate_type}/{aggregate_id}: another transaction committed \
         an event for it first; roll back and retry the transaction"
    )]
    ConcurrentAppend {
        /// The aggregate type.
        aggregate_type: String,
        /// The aggregate id.
        aggregate_id: String,
    },
    /// The event id is already in the outbox: an earlier attempt of the same
    /// operation committed it. Nothing was appended.
    #[error(
        "event {event_id} is already in the outbox{}: an earlier attempt of this operation \
         committed it, so it is not appended again",
        match version { Some(v) => format!(" (version {v})"), None => " (appended by a transaction \
         that committed meanwhile; this transaction is aborted: roll it back)".to_owned() }
    )]
    AlreadyAppended {
        /// The event id.
        event_id: uuid::Uuid,
        /// The stored event's version, when it could be read.
        version: Option<i64>,
    },
    /// The outbox's order belongs to another PostgreSQL cluster (a dump
    /// restored, a logical-replication cut-over, pg_upgrade) and has not been
    /// re-based yet. `converge migrate`, or any relay starting,
    /// re-bases it; retry then.
    #[error("{message}")]
    ForeignCluster {
        /// The server's explanation and the command that fixes it.
        message: String,
    },
    /// A stored event cannot be read back (written around the API).
    #[error("stored event {event_id} cannot be read: {reason}")]
    Unreadable {
        /// The event id.
        event_id: uuid::Uuid,
        /// What is wrong with it.
        reason: String,
    },
    /// The database failed.
    #[error("outbox database error: {0}")]
    Database(#[source] sqlx::Error),
    /// COMMIT got no answer: the transaction may or may not have committed
    /// (see [`crate::transaction`]). Not retryable: look first.
    #[error(transparent)]
    CommitUnknown(#[from] crate::CommitUnknown),
}

impl From<sqlx::Error> for OutboxError {
    fn from(error: sqlx::Error) -> Self {
        OutboxError::Database(error)
    }
}

impl OutboxError {
    /// Whether retrying the whole transaction can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            OutboxError::VersionConflict { .. }
            | OutboxError::ConcurrentAppend { .. }
            | OutboxError::ForeignCluster { .. } => true,
            OutboxError::Database(e) => is_retryable_sqlx(e),
            _ => false,
        }
    }
}

/// Why the relay could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The relay's configuration is not usable.
    #[error("relay configuration: {0}")]
    Config(String),
    /// The JetStream stream exists with settings converge cannot work with.
    #[error(
        "JetStream stream {stream} exists with incompatible settings: {}. converge does not \
         change an existing stream: edit it (e.g. `nats stream edit {stream}`) or point \
         StreamConfig at another name",
        problems.join("; ")
    )]
    IncompatibleStream {
        /// The stream's name.
        stream: String,
        /// Each setting that does not fit, with the value found and the value needed.
        problems: Vec<String>,
    },
    /// The stream is missing and the server refused to create it.
    #[error(
        "JetStream refused to create stream {stream} (subjects {subjects:?}, {replicas} \
         replicas): {source}. A stream whose subjects overlap another stream's, or more \
         replicas than the cluster has servers up, is refused: create the stream yourself \
         (`nats stream add`) or change StreamConfig (name, subjects, replicas)"
    )]
    StreamNotCreated {
        /// The stream's name.
        stream: String,
        /// The subjects it was to capture.
        subjects: Vec<String>,
        /// The replicas asked for.
        replicas: usize,
        /// The server's answer.
        #[source]
        source: async_nats::Error,
    },
    /// A JetStream API call failed.
    #[error("JetStream {operation} failed: {source}")]
    JetStream {
        /// What the relay was doing.
        operation: &'static str,
        /// The client's error.
        #[source]
        source: async_nats::Error,
    },
    /// The database failed.
    #[error("relay database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema is missing or out of date.
    #[error(transparent)]
    Schema(#[from] converge_schema::MigrateError),
    /// Tasks did not stop within the shutdown timeout; they were aborted.
    #[error("relay tasks did not stop within {0:?} and were aborted; unpublished events stay in the outbox")]
    ShutdownTimedOut(Duration),
}

impl RelayError {
    /// Whether starting again later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            RelayError::JetStream { .. } => true,
            RelayError::Database(e) => is_retryable_sqlx(e),
            RelayError::Schema(e) => e.is_retryable(),
            _ => false,
        }
    }
}
