//! Errors of the sweeper.

/// Why a sweep could not be set up, triggered or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SweepError {
    /// A sweep's configuration is not usable.
    #[error("sweep configuration: {0}")]
    Config(String),
    /// A sweep's candidate or backlog query would fail every run.
    #[error("sweep {sweep:?}: {problem}")]
    Candidates {
        /// The sweep.
        sweep: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// A key named for a run is not a value of the sweep's key type.
    #[error("sweep {sweep:?}: {problem}; no run was started")]
    BadKey {
        /// The sweep.
        sweep: String,
        /// Which key and what type.
        problem: String,
    },
    /// No sweep of that name is registered.
    #[error("unknown sweep {name:?}; known sweeps: {}", known.join(", "))]
    UnknownSweep {
        /// The name asked for.
        name: String,
        /// The registered sweeps.
        known: Vec<String>,
    },
    /// The sweeper has stopped.
    #[error("the sweeper is shut down")]
    Stopped,
    /// The database failed.
    #[error("sweeper database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema is not migrated, the role lacks privileges, or a pooler shares sessions.
    #[error(transparent)]
    Schema(#[from] converge_schema::MigrateError),
}

impl SweepError {
    /// Whether trying again later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            SweepError::Database(e) => converge_outbox::is_retryable_sqlx(e),
            SweepError::Schema(e) => e.is_retryable(),
            _ => false,
        }
    }
}
