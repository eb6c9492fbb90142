//! Connecting to PostgreSQL as production runs it: a primary and its
//! standbys behind one libpq-style URL, and a fail-over that moves the
//! primary while workers run.
//!
//! sqlx takes one host per URL. [`PgConnect`] reads libpq's multi-host form,
//! `postgres://user@h1:5432,h2:5432/db?target_session_attrs=read-write`,
//! opens the pool on the first host (in the URL's order) that takes writes,
//! and follows the writable host afterwards: a sentinel connection asks the
//! current host every [`PgConnect::probe_interval`]; when it is gone or has
//! turned read-only, the hosts are asked again and the pool's new
//! connections go to the one that takes writes. Connections opened before
//! the move are closed rather than handed out, and a new connection that
//! lands on a read-only server is refused (the pool tries again), so no
//! statement runs on a standby.
//!
//! ```no_run
//! # async fn f() -> Result<(), converge::postgres::PgConnectError> {
//! let pool = converge::postgres::PgConnect::new(
//!     "postgres://app@pg-a:5432,pg-b:5432/orders?target_session_attrs=read-write",
//! )
//! .session("SET idle_in_transaction_session_timeout = '5s'")
//! .connect()
//! .await?;
//! # Ok(()) }
//! ```
//!
//! What it does not do: fence an old primary. Two hosts that both take
//! writes (an old primary cut off but still running beside a promoted
//! standby) are two primaries; each process stays on the one it has. Stop
//! the old primary as part of the fail-over, as any PostgreSQL HA setup must.

mod follow;
mod hosts;

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgPool};

pub use hosts::{redact, PgHosts, TargetSession};

/// How to reach PostgreSQL: a URL with one host or several, and the pool's
/// size and timeouts. The URL's password never shows in `Debug` or errors.
#[derive(Clone)]
#[non_exhaustive]
pub struct PgConnect {
    url: String,
    /// The pool's size (default 10).
    pub max_connections: u32,
    /// How long a statement waits for a connection, a fail-over included
    /// (default 30 s).
    pub acquire_timeout: Duration,
    /// How long one host may take to connect and answer (default 5 s).
    pub connect_timeout: Duration,
    /// How often the current host is asked whether it still takes writes,
    /// with several hosts (default 1 s): the longest a fail-over goes
    /// unnoticed.
    pub probe_interval: Duration,
    /// SQL run on every new connection (e.g. session settings), if any.
    pub session: Option<String>,
}

impl std::fmt::Debug for PgConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConnect")
            .field("url", &redact(&self.url))
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("probe_interval", &self.probe_interval)
            .field("session", &self.session)
            .finish()
    }
}

/// Why no pool could be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgConnectError {
    /// The URL does not parse, or asks for what converge cannot use.
    #[error("{url} is not a PostgreSQL URL converge can use: {message} (expected e.g. postgres://user@127.0.0.1:5432/db, or several hosts: postgres://user@h1:5432,h2:5432/db?target_session_attrs=read-write)")]
    InvalidUrl {
        /// The URL, its password masked.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The one host could not be reached (refused, unknown database,
    /// credentials refused…).
    #[error("PostgreSQL at {url} is unreachable: {source}")]
    Unreachable {
        /// The URL, its password masked.
        url: String,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// No host of the URL is what `target_session_attrs` asks for (or none
    /// of several answers).
    #[error("no PostgreSQL host of {url} takes writes (target_session_attrs={target}): {hosts}")]
    NoSuitableHost {
        /// The URL, its password masked.
        url: String,
        /// The target asked for.
        target: &'static str,
        /// Each host and why it was not taken.
        hosts: String,
    },
}

impl PgConnectError {
    /// Whether trying again later can succeed: an unreachable server or a
    /// fail-over in progress can; a bad URL or refused credentials cannot.
    pub fn is_retryable(&self) -> bool {
        match self {
            PgConnectError::InvalidUrl { .. } => false,
            PgConnectError::Unreachable { source, .. } => {
                converge_schema::is_retryable_sqlx(source)
            }
            PgConnectError::NoSuitableHost { .. } => true,
        }
    }
}

impl PgConnect {
    /// Connects to `url` (one host, or several comma-separated) with the
    /// defaults.
    pub fn new(url: impl Into<String>) -> Self {
        PgConnect {
            url: url.into(),
            max_connections: 10,
            acquire_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            probe_interval: Duration::from_secs(1),
            session: None,
        }
    }

    /// The pool's size.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// How long a statement waits for a connection.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// SQL run on every new connection.
    pub fn session(mut self, sql: impl Into<String>) -> Self {
        self.session = Some(sql.into());
        self
    }

    /// The URL, its password masked.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// Reads the URL's hosts without connecting.
    pub fn hosts(&self) -> Result<PgHosts, PgConnectError> {
        PgHosts::parse(&self.url)
    }

    /// Opens the pool: connects once now, so an unreachable server (or no
    /// writable one) is reported at start with its cause, then opens
    /// connections as they are needed. With several hosts it follows the
    /// writable one until the pool is closed (`pool.close().await`).
    pub async fn connect(&self) -> Result<PgPool, PgConnectError> {
        let hosts = Arc::new(self.hosts()?);
        let (current, first) = match follow::find(&hosts, 0, self.connect_timeout).await {
            Ok(found) => found,
            Err(mut reasons)
                if hosts.len() == 1 && matches!(reasons[0].1, follow::Refusal::Connect(_)) =>
            {
                // One host it could not reach: sqlx's own error says why.
                let Some((_, follow::Refusal::Connect(source))) = reasons.pop() else {
                    unreachable!("matched above")
                };
                return Err(PgConnectError::Unreachable {
                    url: self.redacted_url(),
                    source,
                });
            }
            Err(reasons) => {
                return Err(PgConnectError::NoSuitableHost {
                    url: self.redacted_url(),
                    target: hosts.target.as_str(),
                    hosts: follow::describe(&reasons),
                })
            }
        };
        let moved = Arc::new(follow::Moved::default());
        let (target, session) = (hosts.target, self.session.clone());
        let mut options = PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            .after_connect(move |conn, _| {
                let session = session.clone();
                Box::pin(async move {
                    follow::check_kind(conn, target).await?;
                    if let Some(sql) = session {
                        use sqlx::Executor;
                        conn.execute(sqlx::raw_sql(&sql)).await?;
                    }
                    Ok(())
                })
            });
        if hosts.len() > 1 {
            let moved = moved.clone();
            options = options.before_acquire(move |_, meta| {
                let keep = moved.opened_since(meta.age);
                Box::pin(async move { Ok(keep) })
            });
        }
        let pool = options.connect_lazy_with(hosts.hosts[current].options.clone());
        if hosts.len() > 1 {
            tracing::info!(
                host = %hosts.hosts[current].label,
                hosts = %hosts.labels().collect::<Vec<_>>().join(","),
                "PostgreSQL: connected to the writable host; following it"
            );
            tokio::spawn(follow::follow(
                pool.clone(),
                hosts,
                current,
                Some(first),
                moved,
                self.probe_interval,
                self.connect_timeout,
            ));
        } else {
            let _ = first.close().await;
        }
        Ok(pool)
    }
}
