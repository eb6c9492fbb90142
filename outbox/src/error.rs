//! Errors of the outbox and the relay; each can say whether retrying can help.

use std::time::Duration;

/// Whether a database error is transient: a serialization failure or
/// deadlock (SQLSTATE 40001 / 40P01), a lost, refused or timed-out connection
/// (class 08, 57P01–03, 25P03), exhausted resources (class 53), a statement or
/// lock timeout (57014, 55P03), an I/O error or an exhausted pool.
pub fn is_retryable_sqlx(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_transient_sqlstate(&code)),
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// SQLSTATEs that say "try again": serialization failures and deadlocks,
/// lost or refused connections (class 08, the server shutting down or
/// starting, a session ended by `idle_in_transaction_session_timeout`),
/// exhausted resources (class 53), and a statement or lock wait cut short by
/// `statement_timeout` / `lock_timeout`.
fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(
            code,
            "40001" | "40P01" | "40003" | "57P01" | "57P02" | "57P03" | "57014" | "55P03" | "25P03"
        )
}

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

#[cfg(test)]
mod tests {
    use super::is_transient_sqlstate;

    #[test]
    fn transient_sqlstates_are_retryable_and_others_not() {
        for code in [
            "40001", "40P01", "08006", "08003", "57P01", "25P03", "53300", "57014", "55P03",
        ] {
            assert!(is_transient_sqlstate(code), "{code} should be retryable");
        }
        // Constraint violations, bad input and missing objects will not heal by retrying.
        for code in ["23505", "23514", "22P02", "42P01", "42703"] {
            assert!(!is_transient_sqlstate(code), "{code} should be permanent");
        }
    }
}
