//! The example's error type and its connections to PostgreSQL and NATS.

use sqlx::PgPool;

/// Why an invoicing command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InvoicingError {
    /// PostgreSQL did not answer.
    #[error(
        "cannot connect to PostgreSQL at {url}: {source}\n\
         start PostgreSQL there (e.g. `sudo pg_ctlcluster 15 main start`) \
         or point --database-url / DATABASE_URL at a running server"
    )]
    PostgresUnreachable {
        /// The URL, password masked.
        url: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// None of the URL's PostgreSQL hosts takes writes.
    #[error(
        "{0}\n\
         if a fail-over is under way, try again once a standby is promoted"
    )]
    NoWritablePostgres(#[source] converge::postgres::PgConnectError),
    /// NATS did not answer.
    #[error("cannot connect to NATS at {url}: {source}")]
    NatsUnreachable {
        /// The URL.
        url: String,
        /// Unreachable, refused credentials or failed TLS, with what to do.
        #[source]
        source: converge::nats::NatsConnectError,
    },
    /// A database statement failed.
    #[error("database error while {action}: {source}")]
    Database {
        /// What the command was doing.
        action: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// converge's own schema could not be migrated.
    #[error("cannot migrate the converge schema: {0}")]
    Migrate(#[from] converge::MigrateError),
    /// Appending an event failed.
    #[error("cannot append the OrderShipped event: {0}")]
    Outbox(#[from] converge::OutboxError),
    /// A JetStream management call failed.
    #[error("JetStream {action} failed: {message}")]
    JetStream {
        /// What the command was doing.
        action: &'static str,
        /// The client's message.
        message: String,
    },
    /// The sweep's schedule is not usable.
    #[error("sweep schedule: {0}")]
    Schedule(#[from] converge::sweeper::ScheduleError),
    /// The converge worker failed to start or to stop cleanly.
    #[error("worker: {0}")]
    Worker(#[from] converge::WorkerError),
    /// A background task panicked.
    #[error("the {task} task failed: {source}")]
    TaskFailed {
        /// Which task.
        task: &'static str,
        /// Why.
        #[source]
        source: tokio::task::JoinError,
    },
    /// A command-line value is not usable.
    #[error("invalid {option}: {message}")]
    InvalidArgument {
        /// The option, e.g. `--stream`.
        option: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
}

impl InvoicingError {
    /// A [`InvoicingError::Database`] error, for `map_err`.
    pub(crate) fn db(action: &'static str) -> impl FnOnce(sqlx::Error) -> InvoicingError {
        move |source| InvoicingError::Database { action, source }
    }
}

/// `url` with its password replaced by `***`, for messages.
pub(crate) fn masked(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// A pool of at most `max_connections` on `url`, failing within a few seconds
/// with [`InvoicingError::PostgresUnreachable`] when nothing answers. `url`
/// may name a primary and its standbys, libpq's way
/// (`postgres://u@h1:5432,h2:5432/db?target_session_attrs=read-write`): the
/// pool uses the one that takes writes and follows a fail-over
/// ([`converge::postgres::PgConnect`]).
pub async fn connect_postgres(url: &str, max_connections: u32) -> Result<PgPool, InvoicingError> {
    use converge::postgres::{PgConnect, PgConnectError};
    // No transaction of this application legitimately sits idle: if a process
    // stalls (or is stopped) inside one, Postgres ends it after 5 s, which
    // frees its row locks and stops it holding every relay's xmin back. Set
    // after connecting, not as a startup `options` parameter: PgBouncer
    // drops those (`ignore_startup_parameters`), and behind it the stalled
    // process would hold its locks for ever.
    const SESSION: &str = "SET idle_in_transaction_session_timeout = '5s'";
    PgConnect::new(url)
        .max_connections(max_connections)
        .session(SESSION)
        .connect()
        .await
        .map_err(|e| match e {
            PgConnectError::InvalidUrl { .. } => InvoicingError::InvalidArgument {
                option: "--database-url",
                message: e.to_string(),
            },
            PgConnectError::Unreachable { url, source } => {
                InvoicingError::PostgresUnreachable { url, source }
            }
            other => InvoicingError::NoWritablePostgres(other),
        })
}

/// A NATS client on `url`, failing at once with
/// [`InvoicingError::NatsUnreachable`] when nothing answers or the
/// credentials are refused. `url` may list several servers, comma-separated;
/// credentials and TLS come from the `nats` CLI's environment variables
/// (`NATS_CREDS`, `NATS_NKEY`, `NATS_USER`/`NATS_PASSWORD`, `NATS_TOKEN`,
/// `NATS_CA`, `NATS_CERT`/`NATS_KEY`). Once connected, the client reconnects
/// by itself.
pub async fn connect_nats(url: &str) -> Result<async_nats::Client, InvoicingError> {
    let mut nats = converge::nats::NatsConnect::from_env();
    nats.servers = url.to_owned();
    nats.name("invoicing")
        .connect()
        .await
        .map_err(|source| InvoicingError::NatsUnreachable {
            url: masked(url),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::masked;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            masked("postgres://app:secret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            masked("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
        assert_eq!(masked("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }
}
