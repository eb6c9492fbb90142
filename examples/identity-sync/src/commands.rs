//! The command line: `demo`, `serve` and `next-runs`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use converge::sweeper::{RunOutcome, SqlCandidates, SweepError, TriggerKind};
use converge::{Worker, WorkerError};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::api::{ApiConfig, ApiError, ApiStats, IdentityApi};
use crate::reconciler::{limits, IdentitySync, RATE};
use crate::schema::{self, StateCounts};
use crate::sweep::{self, SWEEP};

/// The database used when neither `--database-url` nor `DATABASE_URL` is set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The NATS server used when neither `--nats-url` nor `NATS_URL` is set.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// The worker's application name (its control-plane subject).
pub const APPLICATION: &str = "identity-sync";

/// How long past the lease's `lock_at_least_for` the demo waits for the lease.
const LEASE_PATIENCE: Duration = Duration::from_secs(2);

/// Changed records synced to a rate-limited identity API on a night-time
/// schedule (a converge example).
#[derive(Debug, Parser)]
#[command(name = "identity-sync", version)]
pub struct Cli {
    /// PostgreSQL to use.
    #[arg(long, global = true, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Seed users, sync them through the local identity API at 2/s, report.
    Demo {
        /// Users to seed (each one changed record).
        #[arg(long, default_value_t = 20)]
        users: u32,
        /// Probability (0.0–1.0) that the API fails a call with 503.
        #[arg(long, default_value_t = 0.1, value_parser = parse_fail_rate)]
        fail_rate: f64,
    },
    /// Run the sweep on its schedule (a converge worker) until SIGTERM or ctrl-c.
    Serve {
        /// NATS, for the worker's control plane.
        #[arg(long, env = "NATS_URL", default_value = DEFAULT_NATS_URL)]
        nats_url: String,
        /// The identity API (default: start the local one in-process).
        #[arg(long)]
        api_url: Option<String>,
        /// Serve converge's metrics for Prometheus on `GET http://ADDR/metrics`,
        /// e.g. 127.0.0.1:9464 (off by default).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Print the sweep's next fire times, Melbourne time and UTC.
    NextRuns {
        /// How many.
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// Fire times after this instant (RFC 3339; default: now).
        #[arg(long, value_parser = parse_instant)]
        from: Option<DateTime<Utc>>,
    },
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// `--database-url` is not a Postgres URL.
    #[error("invalid --database-url / DATABASE_URL: {0}")]
    BadDatabaseUrl(#[source] sqlx::Error),
    /// Postgres did not answer.
    #[error(
        "cannot connect to PostgreSQL at {target}: start PostgreSQL there \
         (or point --database-url / DATABASE_URL at a running server)"
    )]
    DatabaseUnreachable {
        /// host:port/database.
        target: String,
        /// What the driver said.
        #[source]
        source: sqlx::Error,
    },
    /// A statement failed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// converge's schema could not be migrated.
    #[error("cannot migrate converge's schema")]
    Migrate(#[from] converge::MigrateError),
    /// The local identity API did not start.
    #[error("cannot start the identity API")]
    Api(#[from] ApiError),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client")]
    Http(#[from] reqwest::Error),
    /// The sweeper failed.
    #[error("sweep failed")]
    Sweep(#[from] SweepError),
    /// The sweep is held elsewhere.
    #[error(
        "another instance holds the `{SWEEP}` sweep's lease (an `identity-sync serve`?): \
         stop it or use another database"
    )]
    LeaseHeld,
    /// NATS did not answer.
    #[error("cannot connect to NATS at {url}: {source}")]
    NatsUnreachable {
        /// The URL as given.
        url: String,
        /// Unreachable, refused credentials or failed TLS, with what to do.
        #[source]
        source: converge::nats::NatsConnectError,
    },
    /// The Prometheus endpoint (`--metrics-listen`) could not start.
    #[error("--metrics-listen: {0}")]
    Metrics(#[from] converge::metrics::PrometheusError),
    /// The worker failed to start or to stop cleanly.
    #[error("worker failed")]
    Worker(#[from] WorkerError),
}

fn parse_instant(value: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(value.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            format!("{e}: expected an RFC 3339 instant such as 2026-11-23T22:00:00+11:00 or 2026-11-23T11:00:00Z")
        })
}

fn parse_fail_rate(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err("expected a probability between 0.0 and 1.0, e.g. 0.1".into()),
    }
}

/// Runs the command; the exit code says whether it succeeded.
pub async fn run(cli: Cli) -> Result<ExitCode, CommandError> {
    match cli.command {
        Command::NextRuns { count, from } => {
            for at in sweep::next_runs(from.unwrap_or_else(Utc::now), count) {
                println!("{}", sweep::format_fire_time(at));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { users, fail_rate } => demo(&cli.database_url, users, fail_rate).await,
        Command::Serve {
            nats_url,
            api_url,
            metrics_listen,
        } => serve(&cli.database_url, &nats_url, api_url, metrics_listen).await,
    }
}

/// Connects (failing fast with a clear message) and migrates both schemas.
async fn connect(url: &str) -> Result<PgPool, CommandError> {
    let options: PgConnectOptions = url.parse().map_err(CommandError::BadDatabaseUrl)?;
    let target = format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("postgres")
    );
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .map_err(|source| CommandError::DatabaseUnreachable { target, source })?;
    converge::migrate(&pool).await?;
    schema::migrate(&pool).await?;
    Ok(pool)
}

#[tracing::instrument(skip(database_url), err)]
async fn demo(database_url: &str, users: u32, fail_rate: f64) -> Result<ExitCode, CommandError> {
    let pool = connect(database_url).await?;
    schema::reset(&pool).await?;
    schema::seed_users(&pool, users).await?;
    let api = IdentityApi::start(ApiConfig {
        fail_rate,
        ..ApiConfig::default()
    })
    .await?;
    let reconciler = IdentitySync::new(api.base_url())?;
    let config = sweep::sweep_config();
    let sweeper = sweep::start_sweeper(pool.clone(), config.clone(), reconciler).await?;
    println!(
        "syncing {users} changed records to the identity API at {} ({RATE}, ~{:.0} s)",
        api.base_url(),
        f64::from(users) * RATE.interval().as_secs_f64()
    );
    // A previous run's `lock_at_least_for` may still hold the lease for a
    // moment, and a scheduled fire may get there first: try again briefly.
    let patience = tokio::time::Instant::now() + config.lease.lock_at_least_for + LEASE_PATIENCE;
    let outcome = loop {
        match sweeper.run(SWEEP, None, TriggerKind::Operator).await {
            Ok(RunOutcome::Skipped) => {}
            Ok(RunOutcome::LeaseHeld) if tokio::time::Instant::now() < patience => {}
            other => break other,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let shutdown = sweeper.shutdown().await;
    let stats = api.stats();
    api.shutdown().await;
    let summary = match outcome? {
        RunOutcome::Ran(summary) => summary,
        _ => return Err(CommandError::LeaseHeld),
    };
    shutdown?;
    let counts = schema::state_counts(&pool).await?;
    print_report(&counts, &stats, summary.run_id);
    let ok = stats.rate_limited == 0 && stats.max_per_window <= 2 && counts.pending == 0;
    if !ok {
        eprintln!(
            "identity-sync demo: expectations not met (0 × 429, ≤ 2 per second, nothing pending)"
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_report(counts: &StateCounts, stats: &ApiStats, run_id: i64) {
    println!("sweep run:           {run_id}");
    println!("records synced:      {}", counts.synced);
    println!("records failed:      {}", counts.failed);
    println!("records pending:     {}", counts.pending);
    println!("api requests:        {}", stats.requests);
    println!("api 503s (injected): {}", stats.unavailable);
    println!("api 429s:            {}", stats.rate_limited);
    println!("max requests in 1 s: {}", stats.max_per_window);
    if let Some(span) = stats.closest_span {
        println!("closest 3 requests:  {:.3} s apart", span.as_secs_f64());
    }
}

#[tracing::instrument(skip(database_url, nats_url), err)]
async fn serve(
    database_url: &str,
    nats_url: &str,
    api_url: Option<String>,
    metrics_listen: Option<std::net::SocketAddr>,
) -> Result<ExitCode, CommandError> {
    // Signals from here on drain the worker (even one still starting).
    let stop = converge::shutdown_signal().map_err(WorkerError::Signal)?;
    if let Some(addr) = metrics_listen {
        converge::metrics::serve_prometheus(addr)?;
    }
    let pool = connect(database_url).await?;
    // Several servers, credentials and TLS: the `nats` CLI's environment.
    let mut nats = converge::nats::NatsConnect::from_env();
    nats.servers = nats_url.to_owned();
    let nats = nats
        .name("identity-sync")
        .connect()
        .await
        .map_err(|source| CommandError::NatsUnreachable {
            url: converge::nats::masked(nats_url),
            source,
        })?;
    let (base_url, local_api) = match api_url {
        Some(url) => (url, None),
        None => {
            let api = IdentityApi::start(ApiConfig::default()).await?;
            (api.base_url(), Some(api))
        }
    };
    let worker = Worker::new(pool, nats, APPLICATION)
        .limits(limits())
        .shutdown_timeout(Duration::from_secs(10))
        .sweep(
            sweep::sweep_config(),
            SqlCandidates::new(sweep::CANDIDATES).with_backlog(sweep::BACKLOG),
            Arc::new(IdentitySync::new(&base_url)?),
        )
        .start()
        .await?;
    println!(
        "serving: sweep `{SWEEP}` on `{}` ({}) to {base_url} as {}; stop with SIGTERM or ctrl-c",
        sweep::CRON,
        sweep::ZONE,
        worker.instance()
    );
    let stopped = worker.run_until(stop).await;
    if let Some(api) = local_api {
        api.shutdown().await;
    }
    stopped?;
    println!("stopped");
    Ok(ExitCode::SUCCESS)
}
