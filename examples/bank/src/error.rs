//! The example's error type, and its connections to PostgreSQL and NATS.

use converge::eventsourcing::{CommandError, RepositoryError};
use sqlx::PgPool;

use crate::domain::{AccountError, TransferError};

/// Why a bank command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BankError {
    /// PostgreSQL did not answer.
    #[error(
        "cannot connect to PostgreSQL ({source}): start it (e.g. `pg_ctlcluster 15 main start`) \
         or point --database-url / DATABASE_URL at a running server"
    )]
    PostgresUnreachable {
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// None of the URL's PostgreSQL hosts takes writes.
    #[error("{0}; if a fail-over is under way, try again once a standby is promoted")]
    NoWritablePostgres(#[source] converge::postgres::PgConnectError),
    /// NATS did not answer.
    #[error(
        "cannot connect to NATS: {0}; start nats-server with JetStream (`nats-server -js`) or \
         point --nats-url / NATS_URL at one"
    )]
    NatsUnreachable(#[source] converge::nats::NatsConnectError),
    /// A database statement failed.
    #[error("database error while {action}: {source}")]
    Database {
        /// What the command was doing.
        action: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// converge's schema could not be migrated.
    #[error("cannot migrate the converge schema: {0}")]
    Migrate(#[from] converge::MigrateError),
    /// A repository could not start or load.
    #[error("event store: {0}")]
    Repository(#[from] RepositoryError),
    /// An account command failed.
    #[error("account: {0}")]
    Account(#[from] CommandError<AccountError>),
    /// A transfer command failed.
    #[error("transfer: {0}")]
    Transfer(#[from] CommandError<TransferError>),
    /// The worker failed to start or stop.
    #[error("worker: {0}")]
    Worker(#[from] converge::WorkerError),
    /// The sweep's schedule.
    #[error("sweep schedule: {0}")]
    Schedule(#[from] converge::sweeper::ScheduleError),
    /// A JetStream management call failed.
    #[error("JetStream {action} failed: {message}")]
    JetStream {
        /// What the command was doing.
        action: &'static str,
        /// The client's message.
        message: String,
    },
    /// A command-line value is not usable.
    #[error("invalid {option}: {message}")]
    InvalidArgument {
        /// The option.
        option: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
}

impl BankError {
    /// A [`BankError::Database`] error, for `map_err`.
    pub(crate) fn db(action: &'static str) -> impl FnOnce(sqlx::Error) -> BankError {
        move |source| BankError::Database { action, source }
    }
}

/// A pool of at most `max_connections` on `url`; an unreachable server is
/// reported at once. Sessions end a transaction left idle for 5 s. `url` may
/// name a primary and its standbys (`postgres://u@h1,h2/db`): the pool uses
/// the one that takes writes and follows a fail-over.
pub async fn connect_postgres(url: &str, max_connections: u32) -> Result<PgPool, BankError> {
    use converge::postgres::{PgConnect, PgConnectError};
    PgConnect::new(url)
        .max_connections(max_connections)
        .session("SET idle_in_transaction_session_timeout = '5s'")
        .connect()
        .await
        .map_err(|e| match e {
            PgConnectError::InvalidUrl { .. } => BankError::InvalidArgument {
                option: "--database-url",
                message: e.to_string(),
            },
            PgConnectError::Unreachable { source, .. } => BankError::PostgresUnreachable { source },
            other => BankError::NoWritablePostgres(other),
        })
}

/// A NATS client on `url` (several servers comma-separated; credentials
/// and TLS from the `nats` CLI's environment variables).
pub async fn connect_nats(url: &str) -> Result<async_nats::Client, BankError> {
    let mut nats = converge::nats::NatsConnect::from_env();
    nats.servers = url.to_owned();
    nats.name("bank")
        .connect()
        .await
        .map_err(BankError::NatsUnreachable)
}
