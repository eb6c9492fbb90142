//! How a reconcile fails: retryable (maybe after a given delay) or permanent.

use std::time::Duration;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A failed reconcile, classified.
///
/// Build one with [`ReconcileError::retryable`] or [`ReconcileError::permanent`],
/// or mark a `Result` with [`ResultExt::retryable`] / [`ResultExt::permanent`].
/// `?` on a `sqlx::Error` classifies it by SQLSTATE and kind (serialization
/// failures, deadlocks, lost connections and pool time-outs are retryable).
#[derive(Debug, thiserror::Error)]
#[error("{}{source}", if *.permanent { "permanent: " } else { "retryable: " })]
pub struct ReconcileError {
    permanent: bool,
    retry_after: Option<Duration>,
    #[source]
    source: BoxError,
}

impl ReconcileError {
    /// A failure that may go away: the reconcile is tried again with backoff.
    pub fn retryable(error: impl Into<BoxError>) -> Self {
        ReconcileError {
            permanent: false,
            retry_after: None,
            source: error.into(),
        }
    }

    /// A failure that will not go away by retrying: the key goes to the dead
    /// letters at once and the recover hook runs.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        ReconcileError {
            permanent: true,
            retry_after: None,
            source: error.into(),
        }
    }

    /// Retry no sooner than `delay` (e.g. an HTTP `Retry-After`).
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// Whether retrying can succeed.
    pub fn is_retryable(&self) -> bool {
        !self.permanent
    }

    /// The delay the failure asked for, if any.
    pub fn retry_after_hint(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The underlying error.
    pub fn source_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self.source.as_ref()
    }
}

impl From<sqlx::Error> for ReconcileError {
    fn from(error: sqlx::Error) -> Self {
        if converge_outbox::is_retryable_sqlx(&error) {
            ReconcileError::retryable(error)
        } else {
            ReconcileError::permanent(error)
        }
    }
}

/// Classified by [`converge_outbox::OutboxError::is_retryable`]: a
/// concurrent append or version conflict is retried (run the whole
/// transaction again, e.g. with [`converge_outbox::transaction`]), an invalid
/// event is permanent.
impl From<converge_outbox::OutboxError> for ReconcileError {
    fn from(error: converge_outbox::OutboxError) -> Self {
        if error.is_retryable() {
            ReconcileError::retryable(error)
        } else {
            ReconcileError::permanent(error)
        }
    }
}

/// Classified by [`crate::RateLimitError::is_retryable`]: an unknown limiter
/// is permanent (a configuration error), a database failure may be retried.
/// An event this build cannot read (a schema version newer than it knows,
/// one no upcaster leads from, a payload that does not decode) fails the
/// same way every time: permanent, so the key is dead-lettered at once —
/// never a redelivery loop.
impl From<converge_outbox::UpcastError> for ReconcileError {
    fn from(error: converge_outbox::UpcastError) -> Self {
        ReconcileError::permanent(error)
    }
}

impl From<crate::RateLimitError> for ReconcileError {
    fn from(error: crate::RateLimitError) -> Self {
        if error.is_retryable() {
            ReconcileError::retryable(error)
        } else {
            ReconcileError::permanent(error)
        }
    }
}

/// Retryable: a reconcile is idempotent, so running it again after a COMMIT
/// whose answer was lost re-reads the state and finds what did commit.
impl From<converge_outbox::CommitUnknown> for ReconcileError {
    fn from(error: converge_outbox::CommitUnknown) -> Self {
        ReconcileError::retryable(error)
    }
}

/// A retryable reconcile error lets [`converge_outbox::transaction`] run the
/// reconciler's transaction again.
impl converge_outbox::Retryable for ReconcileError {
    fn is_retryable(&self) -> bool {
        ReconcileError::is_retryable(self)
    }
}

/// Marks a `Result`'s error as retryable or permanent.
pub trait ResultExt<T> {
    /// The error may go away: retry with backoff.
    fn retryable(self) -> Result<T, ReconcileError>;
    /// The error will not go away: dead-letter the key.
    fn permanent(self) -> Result<T, ReconcileError>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for Result<T, E> {
    fn retryable(self) -> Result<T, ReconcileError> {
        self.map_err(ReconcileError::retryable)
    }
    fn permanent(self) -> Result<T, ReconcileError> {
        self.map_err(ReconcileError::permanent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_and_hints() {
        let e = ReconcileError::retryable("api down").retry_after(Duration::from_secs(3));
        assert!(e.is_retryable());
        assert_eq!(e.retry_after_hint(), Some(Duration::from_secs(3)));
        assert_eq!(e.to_string(), "retryable: api down");
        let e: Result<(), _> = Err::<(), _>("bad").permanent();
        let e = e.unwrap_err();
        assert!(!e.is_retryable());
        assert_eq!(e.to_string(), "permanent: bad");
        let e: ReconcileError = sqlx::Error::PoolTimedOut.into();
        assert!(e.is_retryable());
        let e: ReconcileError = sqlx::Error::RowNotFound.into();
        assert!(!e.is_retryable());
    }

    #[test]
    fn converge_errors_convert_by_their_own_classification() {
        use converge_outbox::OutboxError;
        let race: ReconcileError = OutboxError::ConcurrentAppend {
            aggregate_type: "order".into(),
            aggregate_id: "1".into(),
        }
        .into();
        assert!(race.is_retryable(), "{race}");
        let bad: ReconcileError = OutboxError::InvalidEvent {
            field: "aggregate_id",
            reason: "must not be empty".into(),
        }
        .into();
        assert!(!bad.is_retryable(), "{bad}");
        let unknown: ReconcileError = crate::RateLimitError::Unknown {
            name: "billing".into(),
            known: vec![],
        }
        .into();
        assert!(!unknown.is_retryable(), "{unknown}");
        let lost: ReconcileError = crate::RateLimitError::Database {
            name: "billing".into(),
            source: sqlx::Error::PoolTimedOut,
        }
        .into();
        assert!(lost.is_retryable(), "{lost}");
    }
}
