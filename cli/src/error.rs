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
    /// PostgreSQL or NATS refused the action for lack of a privilege or a
    /// permission: exit 77 (EX_NOPERM).
    #[error("{0}")]
    PermissionDenied(String),
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
            CliError::PermissionDenied(_) => ExitCode::from(77),
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
        let refused = e
            .as_database_error()
            .filter(|d| d.code().as_deref() == Some("42501"));
        if let Some(db) = refused {
            CliError::PermissionDenied(format!(
                "PostgreSQL refused: {}\nhint: the PostgreSQL role this CLI connects as lacks a \
                 privilege this command needs (viewers read; operators also act); \
                 `converge grants --role operator --to ROLE` prints an operator's grants",
                db.message()
            ))
        } else if missing {
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

/// The error for a permissions violation NATS reported (`text`, the server's
/// words), with what to change.
pub(crate) fn nats_refused(text: &str) -> CliError {
    let hint = if text.contains("Subscription to") {
        "this NATS user may not subscribe to the CLI's reply inbox: set --inbox-prefix \
         (NATS_INBOX_PREFIX) to the prefix its permissions allow, _INBOX_<app>_<role> \
         (`converge nats-permissions` prints it)"
    } else if text.contains("\"converge.control.") {
        "this NATS user may not send control actions: only operators may \
         (`converge nats-permissions --app APP --role operator` prints their permissions)"
    } else {
        "this NATS user's permissions do not allow it (`converge nats-permissions` prints \
         each role's)"
    };
    CliError::PermissionDenied(format!("NATS refused: {text}\nhint: {hint}"))
}
