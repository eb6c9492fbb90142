//! The CLI's errors and the exit code each one maps to: 2 bad input, 130
//! interrupted (ctrl-c), 1 everything else.

use std::process::ExitCode;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum CliError {
    /// Malformed or unknown input: exit 2.
    #[error("{0}")]
    BadInput(String),
    /// PostgreSQL did not answer.
    #[error(
        "cannot connect to PostgreSQL at {url}: {source}\n\
         hint: start PostgreSQL, or point --database-url / DATABASE_URL at a running server"
    )]
    DatabaseUnreachable {
        /// The URL tried (password hidden).
        url: String,
        /// What went wrong.
        #[source]
        source: sqlx::Error,
    },
    /// NATS did not answer, or refused the connection.
    #[error("cannot connect to NATS: {source}")]
    NatsUnreachable {
        /// What went wrong (unreachable, refused credentials, TLS).
        #[source]
        source: converge::nats::NatsConnectError,
    },
    /// The converge schema is missing or older than this CLI.
    #[error(
        "the converge schema is missing or not up to date ({source})\nhint: run `converge migrate`"
    )]
    SchemaMissing {
        /// The database error.
        #[source]
        source: sqlx::Error,
    },
    /// A database statement failed.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// The operation failed (already reported in detail): exit 1.
    #[error("{0}")]
    Failed(String),
    /// The operator pressed ctrl-c: exit 130, as a shell does for SIGINT.
    #[error("{0}")]
    Interrupted(String),
}

impl CliError {
    /// The process exit code for this error.
    pub(crate) fn exit_code(&self) -> ExitCode {
        match self {
            CliError::BadInput(_) => ExitCode::from(2),
            CliError::Interrupted(_) => ExitCode::from(130),
            _ => ExitCode::from(1),
        }
    }
}

impl From<sqlx::Error> for CliError {
    fn from(e: sqlx::Error) -> Self {
        let missing = e
            .as_database_error()
            .and_then(|d| d.code())
            .is_some_and(|c| c == "42P01" || c == "42703" || c == "3F000");
        if missing {
            CliError::SchemaMissing { source: e }
        } else {
            CliError::Database(e)
        }
    }
}

/// Shorthand for the CLI's results.
pub(crate) type CliResult<T> = Result<T, CliError>;

/// A bad-input error.
pub(crate) fn bad_input(message: impl Into<String>) -> CliError {
    CliError::BadInput(message.into())
}
