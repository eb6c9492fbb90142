//! Errors of repositories, commands and projections; each says whether
//! retrying can help.

use converge_outbox::{CommitUnknown, OutboxError, Retryable, UpcastError};
use uuid::Uuid;

use crate::aggregate::CodecError;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a repository could not start, or an aggregate could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepositoryError {
    /// The schema is missing, too old, or the role lacks privileges.
    #[error(transparent)]
    Schema(Box<converge_schema::MigrateError>),
    /// The aggregate's or a projection's declarations cannot work: what is
    /// wrong and how to fix it.
    #[error("{0}")]
    Config(String),
    /// A stored event could not be brought to the current shape.
    #[error("event {event_id} of {aggregate_type}/{aggregate_id}: {source}")]
    Upcast {
        /// The aggregate type.
        aggregate_type: String,
        /// The aggregate id.
        aggregate_id: String,
        /// The event.
        event_id: Uuid,
        /// Why.
        #[source]
        source: Box<UpcastError>,
    },
    /// A stored event does not decode into the aggregate's event enum.
    #[error("event {event_id} of {aggregate_type}/{aggregate_id}: {source}")]
    Codec {
        /// The aggregate type.
        aggregate_type: String,
        /// The aggregate id.
        aggregate_id: String,
        /// The event.
        event_id: Uuid,
        /// Why.
        #[source]
        source: Box<CodecError>,
    },
    /// The aggregate's history has a hole: an event was deleted (by hand, or
    /// by retention before the type was event-sourced).
    #[error(
        "the history of {aggregate_type}/{aggregate_id} has a gap: expected version {expected}, \
         found {found}. Events of an event-sourced type must never be deleted; restore them \
         (converge keeps event-sourced types from retention once a Repository has started)"
    )]
    HistoryGap {
        /// The aggregate type.
        aggregate_type: String,
        /// The aggregate id.
        aggregate_id: String,
        /// The version expected next.
        expected: i64,
        /// The version found.
        found: i64,
    },
    /// The database failed.
    #[error("event store database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl From<converge_schema::MigrateError> for RepositoryError {
    fn from(error: converge_schema::MigrateError) -> Self {
        RepositoryError::Schema(Box::new(error))
    }
}

impl RepositoryError {
    /// Whether trying again can succeed (a database hiccup, not bad data).
    pub fn is_retryable(&self) -> bool {
        match self {
            RepositoryError::Database(e) => converge_outbox::is_retryable_sqlx(e),
            RepositoryError::Schema(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// Why a command was not carried out. `E` is the aggregate's domain error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError<E: std::error::Error + 'static> {
    /// The aggregate refused the command (its domain error). Not retryable.
    #[error("refused: {0}")]
    Rejected(#[source] E),
    /// Loading the aggregate failed.
    #[error(transparent)]
    Load(#[from] RepositoryError),
    /// Saving the events failed; [`OutboxError::VersionConflict`] (another
    /// writer saved first) is retryable: run the command again on the fresh
    /// state ([`Repository::execute`](crate::Repository::execute) does).
    #[error(transparent)]
    Save(#[from] OutboxError),
    /// An inline projection failed; the transaction must roll back.
    #[error("inline projection {projection}: {source}")]
    Projection {
        /// The projection's name.
        projection: &'static str,
        /// Its error.
        #[source]
        source: ProjectionError,
    },
    /// COMMIT got no answer: the command may or may not have been saved.
    #[error(transparent)]
    CommitUnknown(#[from] CommitUnknown),
}

impl<E: std::error::Error + 'static> CommandError<E> {
    /// Whether running the command again (in a new transaction) can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            CommandError::Rejected(_) | CommandError::CommitUnknown(_) => false,
            CommandError::Load(e) => e.is_retryable(),
            CommandError::Save(e) => e.is_retryable(),
            CommandError::Projection { source, .. } => source.is_retryable(),
        }
    }

    /// The domain error, when the aggregate refused the command.
    pub fn rejection(&self) -> Option<&E> {
        match self {
            CommandError::Rejected(e) => Some(e),
            _ => None,
        }
    }
}

impl<E: std::error::Error + 'static> Retryable for CommandError<E> {
    fn is_retryable(&self) -> bool {
        CommandError::is_retryable(self)
    }
}

impl<E: std::error::Error + 'static> From<sqlx::Error> for CommandError<E> {
    fn from(error: sqlx::Error) -> Self {
        CommandError::Load(RepositoryError::Database(error))
    }
}

/// A command's failure in a reconciler: `?` keeps its classification (a
/// domain refusal is permanent, a version conflict retryable).
impl<E: std::error::Error + Send + Sync + 'static> From<CommandError<E>>
    for converge_handlers::ReconcileError
{
    fn from(error: CommandError<E>) -> Self {
        if error.is_retryable() {
            converge_handlers::ReconcileError::retryable(error)
        } else {
            converge_handlers::ReconcileError::permanent(error)
        }
    }
}

impl From<RepositoryError> for converge_handlers::ReconcileError {
    fn from(error: RepositoryError) -> Self {
        if error.is_retryable() {
            converge_handlers::ReconcileError::retryable(error)
        } else {
            converge_handlers::ReconcileError::permanent(error)
        }
    }
}

/// A projection function's failure: retryable (a database hiccup) or
/// permanent (an event it cannot apply). Either way an asynchronous
/// projection stops at the event, records the error and tries it again with
/// backoff — a read model never skips an event; an inline projection fails
/// the command.
#[derive(Debug, thiserror::Error)]
#[error("{}{source}", if *.retryable { "retryable: " } else { "permanent: " })]
pub struct ProjectionError {
    retryable: bool,
    #[source]
    source: BoxError,
}

impl ProjectionError {
    /// A failure that may pass.
    pub fn retryable(error: impl Into<BoxError>) -> Self {
        ProjectionError {
            retryable: true,
            source: error.into(),
        }
    }

    /// A failure that will not pass by trying again.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        ProjectionError {
            retryable: false,
            source: error.into(),
        }
    }

    /// Whether trying again can succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
}

impl From<sqlx::Error> for ProjectionError {
    fn from(error: sqlx::Error) -> Self {
        ProjectionError {
            retryable: converge_outbox::is_retryable_sqlx(&error),
            source: Box::new(error),
        }
    }
}

impl From<UpcastError> for ProjectionError {
    fn from(error: UpcastError) -> Self {
        ProjectionError::permanent(error)
    }
}

impl From<CodecError> for ProjectionError {
    fn from(error: CodecError) -> Self {
        ProjectionError::permanent(error)
    }
}
