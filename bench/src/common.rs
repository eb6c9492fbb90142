//! What every scenario shares: configuration, a throw-away database, stream
//! clean-up, peak RSS and the JSON result line.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};

/// The error type of the harness.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The result type of the harness.
pub(crate) type Result<T, E = BoxError> = std::result::Result<T, E>;

/// Default `DATABASE_URL`.
const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Default `NATS_URL`.
const DEFAULT_NATS_URL: &str = "127.0.0.1:4222";

/// Where Postgres and NATS are, from `DATABASE_URL` and `NATS_URL`.
#[derive(Debug, Clone)]
pub(crate) struct Env {
    /// URL of a database to connect to for `CREATE DATABASE` / `DROP DATABASE`.
    pub(crate) database_url: String,
    /// NATS server address.
    pub(crate) nats_url: String,
}

impl Env {
    /// Reads the environment, with local defaults.
    pub(crate) fn from_env() -> Self {
        let get = |name: &str, default: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.into())
        };
        Env {
            database_url: get("DATABASE_URL", DEFAULT_DATABASE_URL),
            nats_url: get("NATS_URL", DEFAULT_NATS_URL),
        }
    }

    /// Connect options for database `name` on the configured server.
    pub(crate) fn options_for(&self, name: &str) -> Result<PgConnectOptions> {
        Ok(PgConnectOptions::from_str(&self.database_url)?.database(name))
    }

    /// A pool of `size` connections to database `name`.
    pub(crate) async fn pool_for(&self, name: &str, size: u32) -> Result<PgPool> {
        Ok(PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(self.options_for(name)?)
            .await?)
    }

    /// Connects to NATS (`NATS_URL` may list several servers, comma-separated).
    pub(crate) async fn nats(&self) -> Result<async_nats::Client> {
        let servers = self
            .nats_url
            .split(',')
            .map(|url| url.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(async_nats::connect(servers).await?)
    }
}

/// A short random suffix for database and stream names.
pub(crate) fn random_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// A database created for one run and dropped at its end.
#[derive(Debug)]
pub(crate) struct TempDb {
    /// The database's name.
    pub(crate) name: String,
    admin: PgPool,
}

impl TempDb {
    /// Creates `converge_bench_<random>`.
    pub(crate) async fn create(env: &Env) -> Result<Self> {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(PgConnectOptions::from_str(&env.database_url)?)
            .await?;
        let name = format!("converge_bench_{}", random_suffix());
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await?;
        Ok(TempDb { name, admin })
    }

    /// Drops the database, closing whatever connections remain.
    pub(crate) async fn drop_db(self) -> Result<()> {
        self.admin
            .execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str())
            .await?;
        self.admin.close().await;
        Ok(())
    }
}

/// Deletes JetStream streams, ignoring those already gone.
pub(crate) async fn delete_streams(client: &async_nats::Client, names: &[String]) {
    let js = async_nats::jetstream::new(client.clone());
    for name in names {
        if let Err(error) = js.delete_stream(name).await {
            tracing::debug!(%error, stream = %name, "stream not deleted");
        }
    }
}

/// The number of messages a stream holds.
/// Creates a baseline stream shaped like the relay's (subjects `<prefix>.>`,
/// the default duplicate window, storage and replicas, limits retention).
pub(crate) async fn create_raw_stream(
    js: &async_nats::jetstream::Context,
    name: &str,
    prefix: &str,
) -> Result<()> {
    create_raw_stream_replicated(js, name, prefix, converge::StreamConfig::default().replicas).await
}

/// [`create_raw_stream`] with `replicas` replicas.
pub(crate) async fn create_raw_stream_replicated(
    js: &async_nats::jetstream::Context,
    name: &str,
    prefix: &str,
    replicas: usize,
) -> Result<()> {
    let defaults = converge::StreamConfig::default();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("{prefix}.>")],
        duplicate_window: defaults.duplicate_window,
        storage: defaults.storage,
        num_replicas: replicas,
        retention: async_nats::jetstream::stream::RetentionPolicy::Limits,
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// Runs a child process of the bench (a hidden subcommand, so its peak RSS is
/// its own) and parses the JSON object on the last line of its stdout.
pub(crate) async fn child_json(
    command: &mut tokio::process::Command,
    what: &str,
) -> Result<serde_json::Value> {
    let output = command
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!("{what} failed ({}): {stdout}", output.status).into());
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    Ok(serde_json::from_str(line)?)
}

pub(crate) async fn stream_messages(client: &async_nats::Client, name: &str) -> Result<u64> {
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream(name).await?;
    Ok(stream.info().await?.state.messages)
}

/// A `Vm*:` figure of `/proc/self/status`, in KiB.
fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        line.strip_prefix(field)?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// Peak resident set size of this process so far (`VmHWM`), in KiB.
pub(crate) fn peak_rss_kib() -> Option<u64> {
    proc_status_kib("VmHWM:")
}

/// Current resident set size of this process (`VmRSS`), in KiB.
pub(crate) fn current_rss_kib() -> Option<u64> {
    proc_status_kib("VmRSS:")
}

/// Rounds to two decimals for the report.
pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Rounds to three decimals for the report.
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Prints the result line; it must be the last line of stdout.
pub(crate) fn emit(result: &serde_json::Value) {
    println!("{result}");
}

/// Runs `body`, then `cleanup` whatever happened, and returns `body`'s result
/// (or the clean-up's error if only that failed).
pub(crate) async fn with_cleanup<T, B, C>(body: B, cleanup: C) -> Result<T>
where
    B: std::future::Future<Output = Result<T>>,
    C: std::future::Future<Output = Result<()>>,
{
    let result = body.await;
    let cleaned = cleanup.await;
    match (result, cleaned) {
        (Ok(value), Ok(())) => Ok(value),
        (Ok(_), Err(e)) => Err(e),
        (Err(e), Err(cleanup_error)) => {
            eprintln!("clean-up also failed: {cleanup_error}");
            Err(e)
        }
        (Err(e), Ok(())) => Err(e),
    }
}
