//! Connecting to NATS as production runs it: several servers, credentials,
//! TLS. The settings and their environment variables are the `nats` CLI's
//! (`NATS_URL`, `NATS_CREDS`, `NATS_NKEY`, `NATS_USER`, `NATS_PASSWORD`,
//! `NATS_TOKEN`, `NATS_CA`, `NATS_CERT`, `NATS_KEY`), so one environment
//! serves the `nats` CLI, the `converge` CLI and the workers.
//!
//! ```no_run
//! # async fn f() -> Result<(), converge::nats::NatsConnectError> {
//! // NATS_URL=tls://n1:4222,tls://n2:4222 NATS_CREDS=/etc/nats/worker.creds …
//! let client = converge::nats::NatsConnect::from_env().name("billing-worker").connect().await?;
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{ConnectErrorKind, ServerAddr};

/// A secret (password, token): never printed, not even by `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Secret(value.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Log filter directives that keep NATS secrets out of logs: async-nats
/// writes its CONNECT message (password, token, JWT and signature included)
/// at TRACE under `async_nats::connection`, and server addresses (with any
/// user and password in the URL) at DEBUG under `async_nats::connector`.
/// Add them to the application's filter after `RUST_LOG`'s, e.g.
/// `EnvFilter::from_default_env().add_directive(d.parse()?)` for each: a
/// more specific directive wins, so `RUST_LOG=trace` stays safe.
pub const SECRET_SAFE_LOG_DIRECTIVES: [&str; 2] =
    ["async_nats::connection=debug", "async_nats::connector=info"];

/// How to reach and authenticate to NATS. At most one way to authenticate
/// (credentials file, NKey seed file, user and password, token); TLS (a CA,
/// a client certificate and key) combines with any of them.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct NatsConnect {
    /// Servers, comma-separated (`nats://`, `tls://` URLs or `host:port`);
    /// the client picks one and fails over to the others. Default
    /// `nats://127.0.0.1:4222`.
    pub servers: String,
    /// A credentials file (JWT and NKey seed), `NATS_CREDS`.
    pub creds: Option<PathBuf>,
    /// A file holding an NKey seed (`SU…`), `NATS_NKEY`.
    pub nkey: Option<PathBuf>,
    /// User name, `NATS_USER` (with `password`).
    pub user: Option<String>,
    /// Password, `NATS_PASSWORD` (with `user`).
    pub password: Option<Secret>,
    /// Token, `NATS_TOKEN`.
    pub token: Option<Secret>,
    /// CA certificate(s) to trust for the servers' TLS, `NATS_CA`.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate for mutual TLS, `NATS_CERT` (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's key, `NATS_KEY`.
    pub tls_key: Option<PathBuf>,
    /// The connection's name, shown by the server (`connz`).
    pub connection_name: Option<String>,
    /// The prefix of this client's reply inboxes, `NATS_INBOX_PREFIX`
    /// (default `_INBOX`). Under converge's NATS permissions each role has
    /// its own: see [`crate::control::inbox_prefix`].
    pub inbox_prefix: Option<String>,
    /// How often the client pings its server while the connection is idle;
    /// `None`: every [`DEFAULT_PING_INTERVAL`] (async-nats's own default is a
    /// minute). After two unanswered pings the client drops the connection
    /// and reconnects. Every command the client sends postpones its next
    /// ping, so a busy client never pings: a `Worker` watches its connection
    /// for that case (`Worker::nats_stall_timeout`).
    pub ping_interval: Option<Duration>,
    /// The last permissions violation the server reported on a connection
    /// made from this configuration (shared by its clones).
    refusals: Arc<Mutex<Option<String>>>,
}

/// How often a client made by [`NatsConnect`] pings an idle server unless
/// [`NatsConnect::ping_interval`] says otherwise.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(10);

/// Why a NATS connection could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsConnectError {
    /// A server address does not parse (its user info masked).
    #[error("NATS server {server:?} is not a valid address ({source}); expected e.g. nats://127.0.0.1:4222 or tls://nats.example:4222, several separated by commas")]
    InvalidServer {
        /// The address as given.
        server: String,
        /// Why it does not parse.
        #[source]
        source: std::io::Error,
    },
    /// The settings contradict each other or miss a part.
    #[error("NATS settings: {0}")]
    Settings(String),
    /// A credentials or key file cannot be read.
    #[error("cannot read the NATS {what} {path}: {source}")]
    File {
        /// What the file is.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// The servers refused the credentials.
    #[error("NATS at {servers} refused {method}: {source} (check --creds/--nkey/--user/--password/--token or NATS_CREDS, NATS_NKEY, NATS_USER, NATS_PASSWORD, NATS_TOKEN)")]
    Refused {
        /// The servers.
        servers: String,
        /// How the client authenticated.
        method: &'static str,
        /// The server's answer.
        #[source]
        source: async_nats::ConnectError,
    },
    /// TLS failed (certificate not trusted, server requires TLS, …).
    #[error("TLS with NATS at {servers} failed: {source} (check the URL scheme tls://, --tlsca, --tlscert and --tlskey or NATS_CA, NATS_CERT, NATS_KEY)")]
    Tls {
        /// The servers.
        servers: String,
        /// The cause.
        #[source]
        source: async_nats::ConnectError,
    },
    /// No server answered.
    #[error("no NATS server answers at {servers}: {source}; start one (e.g. nats-server -js) or point --nats-url / NATS_URL at a running server")]
    Unreachable {
        /// The servers.
        servers: String,
        /// The cause.
        #[source]
        source: async_nats::ConnectError,
    },
}

impl NatsConnectError {
    /// Whether trying again later may succeed: only when no server answered.
    pub fn is_retryable(&self) -> bool {
        matches!(self, NatsConnectError::Unreachable { .. })
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl NatsConnect {
    /// Servers `servers` (comma-separated), no authentication, no TLS.
    pub fn new(servers: impl Into<String>) -> Self {
        NatsConnect {
            servers: servers.into(),
            ..NatsConnect::default()
        }
    }

    /// From the `nats` CLI's environment variables (`NATS_URL`, `NATS_CREDS`,
    /// `NATS_NKEY`, `NATS_USER`, `NATS_PASSWORD`, `NATS_TOKEN`, `NATS_CA`,
    /// `NATS_CERT`, `NATS_KEY`, `NATS_INBOX_PREFIX`); unset or empty ones are
    /// left out.
    pub fn from_env() -> Self {
        NatsConnect {
            servers: env("NATS_URL").unwrap_or_default(),
            creds: env("NATS_CREDS").map(PathBuf::from),
            nkey: env("NATS_NKEY").map(PathBuf::from),
            user: env("NATS_USER"),
            password: env("NATS_PASSWORD").map(Secret),
            token: env("NATS_TOKEN").map(Secret),
            tls_ca: env("NATS_CA").map(PathBuf::from),
            tls_cert: env("NATS_CERT").map(PathBuf::from),
            tls_key: env("NATS_KEY").map(PathBuf::from),
            connection_name: None,
            inbox_prefix: env("NATS_INBOX_PREFIX"),
            ping_interval: None,
            refusals: Arc::default(),
        }
    }

    /// The last permissions violation a server reported to a client this
    /// configuration connected (e.g. `Permissions Violation for Publish to
    /// "converge.control.app.sweep.invoices"`): NATS drops a refused publish
    /// or subscription without failing the call, so a request then times out;
    /// this says why.
    pub fn last_refusal(&self) -> Option<String> {
        self.refusals.lock().expect("refusals lock").clone()
    }

    /// [`NatsConnect::last_refusal`], forgetting it: call before an action
    /// so that only a refusal of that action is reported.
    pub fn take_refusal(&self) -> Option<String> {
        self.refusals.lock().expect("refusals lock").take()
    }

    /// This configuration with the connection named `name`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// The servers, parsed; an empty list means the local default.
    pub fn server_addrs(&self) -> Result<Vec<ServerAddr>, NatsConnectError> {
        let listed: Vec<&str> = self
            .servers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let listed = if listed.is_empty() {
            vec!["nats://127.0.0.1:4222"]
        } else {
            listed
        };
        listed
            .into_iter()
            .map(|server| {
                server
                    .parse::<ServerAddr>()
                    .map_err(|source| NatsConnectError::InvalidServer {
                        server: masked(server),
                        source,
                    })
            })
            .collect()
    }

    /// The servers as shown in messages (no user info).
    fn shown(&self) -> String {
        match self.server_addrs() {
            Ok(addrs) => addrs
                .iter()
                .map(|a| format!("{}://{}:{}", a.scheme(), a.host(), a.port()))
                .collect::<Vec<_>>()
                .join(","),
            Err(_) => "(invalid)".into(),
        }
    }

    fn method(&self) -> &'static str {
        match self {
            NatsConnect { creds: Some(_), .. } => "the credentials file",
            NatsConnect { nkey: Some(_), .. } => "the NKey",
            NatsConnect { user: Some(_), .. } => "the user and password",
            NatsConnect { token: Some(_), .. } => "the token",
            _ => "an unauthenticated connection",
        }
    }

    /// The `async-nats` options these settings make (files read, checked).
    pub async fn options(&self) -> Result<async_nats::ConnectOptions, NatsConnectError> {
        let ways = [
            self.creds.is_some(),
            self.nkey.is_some(),
            self.user.is_some() || self.password.is_some(),
            self.token.is_some(),
        ]
        .iter()
        .filter(|w| **w)
        .count();
        if ways > 1 {
            return Err(NatsConnectError::Settings(
                "give one way to authenticate: a credentials file, an NKey, a user and \
                 password, or a token"
                    .into(),
            ));
        }
        let mut options = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .ping_interval(self.ping_interval.unwrap_or(DEFAULT_PING_INTERVAL));
        if let Some(name) = &self.connection_name {
            options = options.name(name);
        }
        if let Some(prefix) = &self.inbox_prefix {
            if prefix.is_empty()
                || prefix.contains(['*', '>'])
                || prefix.chars().any(|c| c.is_whitespace() || c.is_control())
                || prefix.ends_with('.')
            {
                return Err(NatsConnectError::Settings(format!(
                    "inbox prefix {prefix:?}: a subject without wildcards, spaces or a \
                     trailing '.' (e.g. _INBOX_invoicing_operator)"
                )));
            }
            options = options.custom_inbox_prefix(prefix);
        }
        let refusals = self.refusals.clone();
        options = options.event_callback(move |event| {
            let refusals = refusals.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let text = e.to_string();
                    tracing::warn!(error = %text, "NATS server error");
                    if text.to_ascii_lowercase().contains("permissions violation") {
                        *refusals.lock().expect("refusals lock") = Some(text);
                    }
                }
            }
        });
        if let Some(path) = &self.creds {
            options =
                options
                    .credentials_file(path)
                    .await
                    .map_err(|source| NatsConnectError::File {
                        what: "credentials file",
                        path: path.clone(),
                        source,
                    })?;
        }
        if let Some(path) = &self.nkey {
            let seed = std::fs::read_to_string(path).map_err(|source| NatsConnectError::File {
                what: "NKey seed file",
                path: path.clone(),
                source,
            })?;
            let seed = seed
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with('S'))
                .ok_or_else(|| {
                    NatsConnectError::Settings(format!(
                        "{} holds no NKey seed (a line starting with S, e.g. SU…)",
                        path.display()
                    ))
                })?;
            options = options.nkey(seed.to_owned());
        }
        match (&self.user, &self.password) {
            (Some(user), Some(password)) => {
                options = options.user_and_password(user.clone(), password.expose().to_owned())
            }
            (None, None) => {}
            _ => {
                return Err(NatsConnectError::Settings(
                    "a user needs a password and a password a user (--user/--password, \
                     NATS_USER/NATS_PASSWORD)"
                        .into(),
                ))
            }
        }
        if let Some(token) = &self.token {
            options = options.token(token.expose().to_owned());
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                options = options
                    .add_client_certificate(cert.clone(), key.clone())
                    .require_tls(true)
            }
            (None, None) => {}
            _ => {
                return Err(NatsConnectError::Settings(
                    "a client certificate needs its key and a key its certificate \
                     (--tlscert/--tlskey, NATS_CERT/NATS_KEY)"
                        .into(),
                ))
            }
        }
        Ok(options)
    }

    /// Connects, naming what was refused when it fails: unreachable servers,
    /// refused credentials, failed TLS. Once connected the client reconnects
    /// by itself, to any of the servers.
    pub async fn connect(&self) -> Result<async_nats::Client, NatsConnectError> {
        let addrs = self.server_addrs()?;
        let options = self.options().await?;
        options.connect(addrs).await.map_err(|source| {
            let servers = self.shown();
            match source.kind() {
                ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                    NatsConnectError::Refused {
                        servers,
                        method: self.method(),
                        source,
                    }
                }
                // Other refusals (an expired or revoked credential, an
                // authentication timeout) come back as I/O errors carrying
                // the server's -ERR text.
                ConnectErrorKind::Io if refusal(&source) => NatsConnectError::Refused {
                    servers,
                    method: self.method(),
                    source,
                },
                ConnectErrorKind::Tls => NatsConnectError::Tls { servers, source },
                // A failed handshake comes back as an I/O error.
                ConnectErrorKind::Io if tls_failure(&source) => {
                    NatsConnectError::Tls { servers, source }
                }
                _ => NatsConnectError::Unreachable { servers, source },
            }
        })
    }
}

/// Whether an I/O error of the client carries a server's refusal of the
/// credentials.
fn refusal(error: &async_nats::ConnectError) -> bool {
    let text = format!("{error} {error:?}").to_ascii_lowercase();
    [
        "authorization",
        "authentication",
        "expired",
        "revoked",
        "permissions violation",
    ]
    .iter()
    .any(|word| text.contains(word))
}

/// `servers` (one, or several comma-separated) with any user, password or
/// token in them replaced by `***`.
pub fn masked(servers: &str) -> String {
    servers
        .split(',')
        .map(masked_one)
        .collect::<Vec<_>>()
        .join(",")
}

fn masked_one(server: &str) -> String {
    match server.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => server.to_owned(),
        },
        None => match server.rsplit_once('@') {
            Some((_, host)) => format!("***@{host}"),
            None => server.to_owned(),
        },
    }
}

/// Whether an I/O error of the client is a TLS handshake's (rustls names
/// certificates, TLS or the handshake in its messages).
fn tls_failure(error: &async_nats::ConnectError) -> bool {
    let text = error.to_string().to_ascii_lowercase();
    ["certificate", "tls", "handshake"]
        .iter()
        .any(|word| text.contains(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_servers_parse_and_a_bad_one_is_named() {
        let c = NatsConnect::new("nats://a:4222, tls://b:4223,c:4224");
        let addrs = c.server_addrs().unwrap();
        assert_eq!(addrs.len(), 3);
        assert_eq!(addrs[1].host(), "b");
        assert_eq!(addrs[1].port(), 4223);
        let err = NatsConnect::new("nats://a:4222,nats://b:notaport")
            .server_addrs()
            .unwrap_err();
        assert!(err.to_string().contains("nats://b:notaport"), "{err}");
        let err = NatsConnect::new("nats://u:hunter2@h:bad")
            .server_addrs()
            .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert_eq!(
            masked("nats://u:p@a:1,tls://t0k@b:2,c:3"),
            "nats://***@a:1,tls://***@b:2,c:3"
        );
        assert_eq!(NatsConnect::new("").server_addrs().unwrap().len(), 1);
    }

    #[test]
    fn secrets_do_not_print() {
        let c = NatsConnect {
            password: Some(Secret::new("hunter2")),
            token: Some(Secret::new("t0ken")),
            ..NatsConnect::new("nats://a:4222")
        };
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("t0ken"),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn contradictions_are_refused_before_connecting() {
        let two = NatsConnect {
            user: Some("u".into()),
            password: Some(Secret::new("p")),
            token: Some(Secret::new("t")),
            ..NatsConnect::default()
        };
        assert!(matches!(
            two.options().await,
            Err(NatsConnectError::Settings(_))
        ));
        let half = NatsConnect {
            user: Some("u".into()),
            ..NatsConnect::default()
        };
        assert!(matches!(
            half.options().await,
            Err(NatsConnectError::Settings(_))
        ));
    }
}
