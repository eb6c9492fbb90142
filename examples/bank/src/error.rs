//! The example's error type, and its connections to PostgreSQL and NATS.

use std::time::Duration;

use converge::eventsourcing::{CommandError, RepositoryError};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

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
/// reported at once. Sessions end a transaction left idle for 5 s.
pub async fn connect_postgres(url: &str, max_connections: u32) -> Result<PgPool, BankError> {
    let options: PgConnectOptions = url.parse().map_err(|e| BankError::InvalidArgument {
        option: "--database-url",
        message: format!("not a PostgreSQL URL ({e}), e.g. postgres://postgres@127.0.0.1/postgres"),
    })?;
    let unreachable = |source| BankError::PostgresUnreachable { source };
    let probe = tokio::time::timeout(Duration::from_secs(5), options.connect())
        .await
        .map_err(|_| unreachable(sqlx::Error::PoolTimedOut))?
        .map_err(unreachable)?;
    let _ = probe.close().await;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(|conn, _| {
            Box::pin(async move {
                use sqlx::Executor;
                conn.execute("SET idle_in_transaction_session_timeout = '5s'")
                    .await
                    .map(|_| ())
            })
        })
        .connect_lazy_with(options))
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
