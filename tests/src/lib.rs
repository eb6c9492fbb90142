//! Test support for converge's integration tests: every test gets its own
//! database and its own stream, so tests run in parallel and share nothing.
//!
//! Services come from `DATABASE_URL` / `NATS_URL`, defaulting to the local ones
//! (127.0.0.1:5432 and 127.0.0.1:4222). When neither variable is set and the
//! local services do not answer, the `docker` feature starts both with
//! testcontainers (a developer laptop with Docker).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod accounts;
mod certificates;
mod nats_cluster;
mod nats_server;
pub mod orders;
mod pg_cluster;
mod pgbouncer;
pub mod projections;
mod proxy;
mod services;

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Executor, PgPool};

pub use certificates::make_certificates;
pub use nats_cluster::NatsCluster;
pub use nats_server::{clear_nats_client_env, NatsServer, NATS_CLIENT_ENV};
pub use pg_cluster::{pg_bin, pg_dump, pg_restore, wait_for_postgres, PgCluster};
pub use pgbouncer::{PgBouncer, PoolMode};
pub use proxy::{ProxyMode, TcpProxy};
pub use services::{database_url, nats_url};

/// Connects to NATS at `url`: one server or several, comma-separated (as
/// `NATS_URL` takes them; the client alone does not split them), retrying
/// until one answers.
pub async fn connect_nats(url: &str) -> async_nats::Client {
    let servers: Vec<async_nats::ServerAddr> = url
        .split(',')
        .map(|s| s.trim().parse().expect("a NATS server URL"))
        .collect();
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(servers)
        .await
        .expect("connect to NATS")
}

/// Installs a tracing subscriber once (honours `RUST_LOG`, default `warn`).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A fresh database (migrated) and a unique stream name for one test.
/// Dropping it drops the database and deletes the stream.
pub struct TestEnv {
    /// Pool on the test's own database.
    pub pool: PgPool,
    /// NATS client.
    pub nats: async_nats::Client,
    /// JetStream context on `nats`.
    pub js: jetstream::Context,
    /// The database's name.
    pub db_name: String,
    /// A unique stream name for this test.
    pub stream: String,
    /// A unique subject prefix for this test.
    pub prefix: String,
    admin_url: String,
    nats_url: String,
}

impl TestEnv {
    /// Creates the database, migrates it and connects to NATS.
    pub async fn new() -> TestEnv {
        Self::with_nats_url(&nats_url().await).await
    }

    /// Like [`TestEnv::new`], with NATS at `url` (e.g. a private [`NatsServer`]).
    pub async fn with_nats_url(url: &str) -> TestEnv {
        let env = Self::unmigrated(url).await;
        converge::migrate(&env.pool).await.expect("migrate");
        env
    }

    /// A fresh database without the converge schema (for tests of the
    /// migrations themselves), and NATS at `url`.
    pub async fn unmigrated(url: &str) -> TestEnv {
        Self::unmigrated_on(&database_url().await, url).await
    }

    /// Like [`TestEnv::with_nats_url`], with the test's database made on the
    /// PostgreSQL at `admin_url` (e.g. a private [`PgCluster`], or a proxy in
    /// front of one that a fail-over retargets).
    pub async fn on_postgres(admin_url: &str, nats_url: &str) -> TestEnv {
        let env = Self::unmigrated_on(admin_url, nats_url).await;
        converge::migrate(&env.pool).await.expect("migrate");
        env
    }

    async fn unmigrated_on(admin_url: &str, url: &str) -> TestEnv {
        init_tracing();
        let admin_url = admin_url.to_owned();
        let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let db_name = format!("converge_t_{tag}");
        let mut admin = admin_options(&admin_url)
            .connect()
            .await
            .expect("connect to Postgres");
        admin
            .execute(format!("CREATE DATABASE {db_name}").as_str())
            .await
            .expect("create test database");
        drop(admin);
        let opts = admin_options(&admin_url).database(&db_name);
        let pool = PgPoolOptions::new()
            .max_connections(12)
            .acquire_timeout(Duration::from_secs(20))
            .connect_with(opts)
            .await
            .expect("connect to test database");
        let nats = connect_nats(url).await;
        let js = jetstream::new(nats.clone());
        TestEnv {
            pool,
            nats,
            js,
            db_name,
            stream: format!("T_{tag}"),
            prefix: format!("t{tag}"),
            admin_url,
            nats_url: url.to_owned(),
        }
    }

    /// Connection options for this test's database.
    pub fn connect_options(&self) -> PgConnectOptions {
        admin_options(&self.admin_url).database(&self.db_name)
    }

    /// The URL of this test's own database, e.g. for a child process's `DATABASE_URL`.
    pub fn database_url(&self) -> String {
        let url = self.admin_url.as_str();
        let host_start = url.find("://").map_or(0, |i| i + 3);
        let (base, query) = match url.find('?') {
            Some(q) => (&url[..q], &url[q..]),
            None => (url, ""),
        };
        let authority_end = base[host_start..]
            .find('/')
            .map_or(base.len(), |i| host_start + i);
        format!("{}/{}{}", &base[..authority_end], self.db_name, query)
    }

    /// The NATS URL this test connects to.
    pub fn nats_url(&self) -> &str {
        &self.nats_url
    }

    /// A relay configuration for this test's stream, with short timings.
    pub fn relay_config(&self) -> converge::RelayConfig {
        let mut c =
            converge::RelayConfig::new(converge::StreamConfig::new(&self.stream, &self.prefix));
        c.poll_interval = Duration::from_millis(100);
        c.lease_ttl = Duration::from_secs(2);
        c.heartbeat_interval = Duration::from_millis(300);
        c.publish_timeout = Duration::from_secs(2);
        c.max_backoff = Duration::from_millis(500);
        c.shutdown_timeout = Duration::from_secs(5);
        c.handover_after = Duration::from_secs(3);
        c
    }

    /// Waits until the stream holds `count` messages, then reads them all.
    pub async fn read_stream(&self, count: usize, within: Duration) -> Vec<StreamMessage> {
        read_stream(&self.js, &self.stream, count, within).await
    }
}

/// The tests' generic event: aggregate type `account`, event type `Changed`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AccountChanged {
    /// The aggregate id.
    pub id: String,
}

impl AccountChanged {
    /// The event for account `id`.
    pub fn new(id: impl Into<String>) -> Self {
        AccountChanged { id: id.into() }
    }
}

impl converge::DomainEvent for AccountChanged {
    fn aggregate_type(&self) -> &str {
        "account"
    }
    fn aggregate_id(&self) -> String {
        self.id.clone()
    }
    fn event_type(&self) -> &str {
        "Changed"
    }
}

/// Appends one [`AccountChanged`] in a transaction of its own and commits it.
pub async fn append_changed(
    pool: &PgPool,
    id: &str,
) -> Result<converge::Appended, converge::OutboxError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(converge::OutboxError::Database)?;
    let appended = converge::Outbox::default()
        .append(&mut tx, &AccountChanged::new(id))
        .await?;
    tx.commit().await.map_err(converge::OutboxError::Database)?;
    Ok(appended)
}

/// A message read back from the stream.
#[derive(Debug, Clone)]
pub struct StreamMessage {
    /// Stream sequence.
    pub sequence: u64,
    /// Subject.
    pub subject: String,
    /// `Nats-Msg-Id`.
    pub msg_id: String,
    /// `Converge-Aggregate-Id`.
    pub aggregate_id: String,
    /// `Converge-Aggregate-Version`.
    pub version: i64,
    /// Every header, first value of each.
    pub headers: std::collections::BTreeMap<String, String>,
    /// Payload.
    pub payload: serde_json::Value,
}

/// Waits until `stream` holds at least `count` messages (or `within` passes),
/// then reads every message in sequence order.
pub async fn read_stream(
    js: &jetstream::Context,
    stream: &str,
    count: usize,
    within: Duration,
) -> Vec<StreamMessage> {
    let deadline = tokio::time::Instant::now() + within;
    // Finding the stream is not what is waited for: a JetStream that is still
    // recovering after a restart is given 30 s whatever `within` is.
    let find_by = tokio::time::Instant::now() + within.max(Duration::from_secs(30));
    let mut s = loop {
        match js.get_stream(stream).await {
            Ok(s) => break s,
            Err(_) if tokio::time::Instant::now() < find_by => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("stream {stream} not found: {e}"),
        }
    };
    loop {
        let n = s.info().await.expect("stream info").state.messages as usize;
        if n >= count || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total = s.info().await.expect("stream info").state.messages as usize;
    if total == 0 {
        return Vec::new();
    }
    // A cluster that just elected a leader or took a node back answers
    // "temporarily unavailable" for a while, or places the reader on a node
    // that delivers nothing yet: the test's reader starts over, for a while.
    let retry_until = deadline + Duration::from_secs(30);
    let mut out = Vec::with_capacity(total);
    let mut stalls = 0;
    'read: loop {
        out.clear();
        let consumer = loop {
            match s
                .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
                .await
            {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() < retry_until => {
                    tracing::warn!(error = %e, "ordered consumer refused; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("ordered consumer: {e}"),
            }
        };
        let mut messages = consumer.messages().await.expect("consume");
        while out.len() < total {
            let m = match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
                Ok(m) => m.expect("stream open").expect("message"),
                Err(_) if stalls >= 1 => {
                    // A second stall: an ordered consumer (R1) may sit on a
                    // replica that delivers nothing more; the leader has the
                    // rest (direct reads by sequence reach it).
                    tracing::warn!(
                        read = out.len(),
                        total,
                        "no message within 10 s again; reading the rest from the stream leader"
                    );
                    let after = out.last().map_or(0, |m: &StreamMessage| m.sequence);
                    let last = s.info().await.expect("stream info").state.last_sequence;
                    for sequence in after + 1..=last {
                        match s.get_raw_message(sequence).await {
                            Ok(m) => out.push(stream_message(
                                m.subject.as_str(),
                                m.sequence,
                                Some(&m.headers),
                                &m.payload,
                            )),
                            Err(e) if e.to_string().contains("no message found") => {}
                            Err(e) => panic!("message {sequence} from the stream leader: {e}"),
                        }
                    }
                    return out;
                }
                Err(_) if tokio::time::Instant::now() < retry_until => {
                    stalls += 1;
                    tracing::warn!(
                        read = out.len(),
                        total,
                        "no message within 10 s; reading again"
                    );
                    continue 'read;
                }
                Err(_) => panic!("message within 10 s: {} of {total} read", out.len()),
            };
            let info = m.info().expect("jetstream message info");
            out.push(stream_message(
                m.subject.as_str(),
                info.stream_sequence,
                m.headers.as_ref(),
                &m.payload,
            ));
        }
        return out;
    }
}

fn stream_message(
    subject: &str,
    sequence: u64,
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
) -> StreamMessage {
    let mut map = std::collections::BTreeMap::new();
    if let Some(h) = headers {
        for (k, v) in h.iter() {
            if let Some(first) = v.first() {
                map.insert(k.to_string(), first.to_string());
            }
        }
    }
    StreamMessage {
        sequence,
        subject: subject.to_owned(),
        msg_id: map.get("Nats-Msg-Id").cloned().unwrap_or_default(),
        aggregate_id: map
            .get(converge::HEADER_AGGREGATE_ID)
            .cloned()
            .unwrap_or_default(),
        version: map
            .get(converge::HEADER_AGGREGATE_VERSION)
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1),
        headers: map,
        payload: serde_json::from_slice(payload).unwrap_or(serde_json::Value::Null),
    }
}

/// Asserts that `messages` hold `expected` events, each once, and per
/// aggregate in version order 1, 2, 3, …
pub fn assert_once_in_order(messages: &[StreamMessage], expected: usize) {
    let ids: std::collections::HashSet<&str> = messages.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(ids.len(), messages.len(), "an event is on the stream twice");
    assert_eq!(messages.len(), expected, "events missing from the stream");
    let mut last: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
    for m in messages {
        let prev = last.insert(m.aggregate_id.as_str(), m.version).unwrap_or(0);
        assert_eq!(
            m.version,
            prev + 1,
            "aggregate {} out of order at stream sequence {}",
            m.aggregate_id,
            m.sequence
        );
    }
}

/// A PostgreSQL login role for one test (roles are cluster-wide: the name
/// is unique), dropped with what it owns and its privileges in the test's
/// database when the guard is dropped — declare it after the [`TestEnv`].
pub struct RoleGuard {
    /// The role's name.
    pub name: String,
    url: String,
}

impl RoleGuard {
    /// Creates the role `<base>_<random>`.
    pub async fn new(env: &TestEnv, base: &str) -> RoleGuard {
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let name = format!("{base}_{tag}");
        sqlx::query(&format!("CREATE ROLE {name} LOGIN"))
            .execute(&env.pool)
            .await
            .expect("create a test role");
        RoleGuard {
            name,
            url: env.database_url(),
        }
    }
}

impl Drop for RoleGuard {
    fn drop(&mut self) {
        let (name, url) = (self.name.clone(), self.url.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async move {
                    if let Ok(mut conn) = admin_options(&url).connect().await {
                        let _ = sqlx::raw_sql(&format!("DROP OWNED BY {name}; DROP ROLE {name}"))
                            .execute(&mut conn)
                            .await;
                    }
                });
            }
        })
        .join();
    }
}

fn admin_options(url: &str) -> PgConnectOptions {
    url.parse::<PgConnectOptions>()
        .expect("DATABASE_URL is a valid Postgres URL")
        .disable_statement_logging()
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let db = self.db_name.clone();
        let url = self.admin_url.clone();
        let nats_url = self.nats_url.clone();
        let stream = self.stream.clone();
        // Async clean-up from a sync Drop: on a thread with its own runtime and
        // its own connections (the test's runtime is blocked meanwhile).
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async move {
                    let delete = async {
                        let servers: Vec<async_nats::ServerAddr> = nats_url
                            .split(',')
                            .filter_map(|s| s.trim().parse().ok())
                            .collect();
                        let nats = async_nats::connect(servers).await.ok()?;
                        jetstream::new(nats).delete_stream(&stream).await.ok()
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(5), delete).await;
                    if let Ok(mut admin) = admin_options(&url).connect().await {
                        let _ = admin
                            .execute(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)").as_str())
                            .await;
                    }
                });
            }
        })
        .join();
    }
}
