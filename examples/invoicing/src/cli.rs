//! The command line: `serve`, `ship`, `check` and `demo`.
//!
//! The reliability suite drives `serve`, `ship` and `check` as child
//! processes: their flags and output lines are stable.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::check::check;
use crate::demo::{self, DemoOptions};
use crate::domain::{ship, ShipOptions};
use crate::error::{connect_nats, connect_postgres, InvoicingError};
use crate::faults::Faults;
use crate::schema::migrate;
use crate::worker::{self, StreamNames, SweepTiming, WorkerOptions};

/// Orders shipped → invoiced exactly once, by events and by sweeps.
#[derive(Debug, Parser)]
#[command(name = "invoicing", version, about, long_about = None)]
pub struct Cli {
    /// PostgreSQL holding the orders, the invoices and converge's tables.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        global = true,
        hide_env_values = true
    )]
    pub database_url: String,
    /// NATS with JetStream.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub nats_url: String,
    /// The JetStream stream; its subject prefix is its name in lower case.
    #[arg(
        long,
        env = "INVOICING_STREAM",
        default_value = "ORDERS",
        global = true
    )]
    pub stream: String,
    /// Replicas of the stream when `serve` or `demo` creates it (1 to 5; 3 on
    /// a three-node JetStream cluster). An existing stream is not changed: a
    /// worker finding other replicas warns (`nats stream edit --replicas N`
    /// changes them live).
    #[arg(
        long,
        env = "INVOICING_STREAM_REPLICAS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u8).range(1..=5),
        global = true
    )]
    pub stream_replicas: u8,
    /// The converge application name (the control plane's subject).
    #[arg(
        long,
        env = "INVOICING_APP",
        default_value = "invoicing",
        global = true
    )]
    pub app: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a worker (relay, consumer, sweep, control plane) until SIGTERM or ctrl-c.
    Serve(ServeArgs),
    /// Create and ship orders, most with an OrderShipped event.
    Ship(ShipArgs),
    /// Verify that every shipped order is invoiced exactly once (exit 0), or not (exit 1).
    Check(CheckArgs),
    /// The end-to-end demo: workers, shipments, faults, convergence.
    Demo(DemoArgs),
    /// Run the local billing service (charges with idempotency keys) until SIGTERM or ctrl-c.
    BillingApi(BillingApiArgs),
}

/// `billing-api` options.
#[derive(Debug, Clone, Args)]
pub struct BillingApiArgs {
    /// Address to listen on, e.g. 127.0.0.1:7070 (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: std::net::SocketAddr,
    /// Milliseconds every answer takes after the charge is applied.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub latency_ms: u64,
}

/// `serve` options.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// This instance's name (default: <hostname>-<pid>).
    #[arg(long)]
    pub instance: Option<String>,
    /// Probability that a reconcile fails transiently before doing anything.
    #[arg(long, default_value_t = 0.0, value_parser = parse_probability)]
    pub fail_rate: f64,
    /// Probability that the process aborts right after claiming INVOICING.
    #[arg(long, default_value_t = 0.0, value_parser = parse_probability)]
    pub crash_after_claim: f64,
    /// Seconds between sweeps (fixed rate, plus one at start-up).
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_seconds)]
    pub sweep_every: Duration,
    /// Sweep on this cron schedule instead (6 or 7 fields with seconds), e.g. "0 0 2 * * *".
    #[arg(long, value_name = "EXPR", conflicts_with = "sweep_every")]
    pub sweep_cron: Option<String>,
    /// The IANA time zone of --sweep-cron.
    #[arg(long, value_name = "ZONE", default_value = "Europe/Berlin")]
    pub sweep_time_zone: String,
    /// Seconds after which an INVOICING claim counts as dead and is resumed.
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_seconds)]
    pub claim_lease: Duration,
    /// Orders whose id is a multiple of N fail permanently: dead letters, state FAILED.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub fail_every: Option<u64>,
    /// Seconds a relay partition lease lasts: how soon a killed worker's
    /// partitions are taken over.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_seconds)]
    pub relay_lease: Duration,
    /// Attempts of an event before it is dead-lettered (the sweep still converges it).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
    /// Charge each order through the billing service at this URL (see
    /// `invoicing billing-api`) before invoicing it.
    #[arg(long, value_name = "URL", env = "INVOICING_BILLING_URL")]
    pub billing_url: Option<String>,
    /// Seconds a running order's key lease lasts: how long a killed worker's
    /// orders stay busy; a run cut off from PostgreSQL stops after 3/4 of it.
    #[arg(long, value_name = "SECS", default_value = "20", value_parser = parse_seconds)]
    pub key_lease: Duration,
    /// Connections in the worker's pool: the worker holds at most this many
    /// PostgreSQL sessions, plus one for the relay's LISTEN (size a
    /// PgBouncer session pool for the sum over workers).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(4..=500))]
    pub max_connections: u32,
    /// Serve converge's metrics for Prometheus on `GET http://ADDR/metrics`,
    /// e.g. 127.0.0.1:9464 (off by default).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// `ship` options.
#[derive(Debug, Clone, Args)]
pub struct ShipArgs {
    /// Orders to create and ship.
    #[arg(long)]
    pub orders: u64,
    /// Fraction (0 to 1) shipped by the legacy path, which emits no event
    /// (every k-th order, deterministically).
    #[arg(long, default_value_t = 0.0, value_parser = parse_probability)]
    pub legacy_fraction: f64,
    /// Shipping transactions at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub connections: u16,
}

/// `check` options.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also check the billing service at this URL: every invoiced order
    /// charged exactly once, no order charged twice or without its invoice.
    #[arg(long, value_name = "URL", env = "INVOICING_BILLING_URL")]
    pub billing_url: Option<String>,
}

/// `demo` options.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Orders to ship.
    #[arg(long, default_value_t = 1000)]
    pub orders: u64,
    /// Workers started in-process.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub workers: u16,
    /// Seconds to wait for convergence.
    #[arg(long, value_name = "SECS", default_value = "120", value_parser = parse_seconds)]
    pub timeout: Duration,
    /// Connections in each worker's pool (a worker holds at most this many
    /// PostgreSQL sessions, plus one for the relay's LISTEN; the demo itself
    /// uses 4 more).
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(4..=200))]
    pub max_connections: u32,
}

fn parse_probability(s: &str) -> Result<f64, String> {
    let p: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number; give a value from 0 to 1, e.g. 0.2"))?;
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!(
            "{p} is outside 0..=1; give a value from 0 to 1, e.g. 0.2"
        ))
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds, e.g. 10 or 0.5"))?;
    if secs.is_finite() && secs > 0.0 && secs < 1e9 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(format!(
            "{s} seconds: give a positive number of seconds, e.g. 10 or 0.5"
        ))
    }
}

/// The default log filter of a command (overridden by `RUST_LOG`).
pub fn default_log_filter(command: &Command) -> &'static str {
    match command {
        // The demo draws progress; its workers' retries would drown it.
        Command::Demo(_) => "error",
        Command::Serve(_) => "info",
        Command::Ship(_) | Command::Check(_) => "warn",
        Command::BillingApi(_) => "info",
    }
}

/// Runs a parsed command line; the process's exit code.
pub async fn run(cli: Cli) -> Result<ExitCode, InvoicingError> {
    let stream = StreamNames::new(&cli.stream)?.with_replicas(cli.stream_replicas);
    match &cli.command {
        Command::Serve(args) => serve(&cli, stream, args).await,
        Command::Ship(args) => {
            let pool = connect_postgres(&cli.database_url, u32::from(args.connections) + 1).await?;
            migrate(&pool).await?;
            let report = ship(
                &pool,
                &ShipOptions {
                    orders: args.orders,
                    legacy_fraction: args.legacy_fraction,
                    concurrency: usize::from(args.connections),
                },
            )
            .await?;
            println!("{report}");
            pool.close().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(args) => {
            let pool = connect_postgres(&cli.database_url, 2).await?;
            migrate(&pool).await?;
            let mut report = check(&pool).await?;
            if let Some(url) = &args.billing_url {
                let billing = billing_client(url)?;
                report.add_billing(&pool, &billing).await?;
            }
            if args.json {
                let json = serde_json::to_string_pretty(&report)
                    .expect("a check report always serializes");
                println!("{json}");
            } else {
                println!("{report}");
            }
            let _ = std::io::stdout().flush();
            pool.close().await;
            Ok(if report.converged {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::BillingApi(args) => {
            let stop = converge::shutdown_signal().map_err(converge::WorkerError::Signal)?;
            crate::billing::serve(
                args.listen,
                Duration::from_millis(args.latency_ms),
                |addr| {
                    println!("billing-api listening on http://{addr}");
                    let _ = std::io::stdout().flush();
                },
                stop,
            )
            .await
            .map_err(|e| InvoicingError::InvalidArgument {
                option: "--listen",
                message: format!("cannot serve on {}: {e}", args.listen),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => {
            let outcome = demo::run(&DemoOptions {
                database_url: cli.database_url.clone(),
                nats_url: cli.nats_url.clone(),
                stream,
                app: cli.app.clone(),
                orders: args.orders,
                workers: usize::from(args.workers),
                timeout: args.timeout,
                max_connections: args.max_connections,
            })
            .await?;
            Ok(if outcome.converged {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

async fn serve(
    cli: &Cli,
    stream: StreamNames,
    args: &ServeArgs,
) -> Result<ExitCode, InvoicingError> {
    let sweep = match &args.sweep_cron {
        Some(expression) => SweepTiming::Cron {
            expression: expression.clone(),
            time_zone: args.sweep_time_zone.clone(),
        },
        None => SweepTiming::Every(args.sweep_every),
    };
    // Signals from here on drain the worker (even one still starting).
    let stop = converge::shutdown_signal().map_err(converge::WorkerError::Signal)?;
    // Validate everything before connecting.
    sweep.timing()?;
    if let Some(addr) = args.metrics_listen {
        converge::metrics::serve_prometheus(addr).map_err(|e| InvoicingError::InvalidArgument {
            option: "--metrics-listen",
            message: e.to_string(),
        })?;
    }
    let pool = connect_postgres(&cli.database_url, args.max_connections).await?;
    let nats = connect_nats(&cli.nats_url).await?;
    migrate(&pool).await?;
    let mut options = WorkerOptions::new(cli.app.clone(), stream);
    options.instance = args.instance.clone();
    options.faults = Faults {
        fail_rate: args.fail_rate,
        crash_after_claim: args.crash_after_claim,
        fail_every: args.fail_every,
    };
    options.relay_lease = args.relay_lease;
    options.sweep = sweep;
    options.claim_lease = args.claim_lease;
    options.max_attempts = args.max_attempts;
    options.key_lease = args.key_lease;
    if let Some(url) = &args.billing_url {
        options.billing = Some(billing_client(url)?);
    }
    let handle = worker::start_retrying(&pool, &nats, &options, Duration::from_secs(60)).await?;
    tracing::info!(
        instance = handle.instance(),
        stream = %options.stream.stream,
        subjects = %options.stream.order_shipped_subject(),
        app = %options.app,
        sweep = ?options.sweep,
        claim_lease = ?options.claim_lease,
        fail_rate = args.fail_rate,
        crash_after_claim = args.crash_after_claim,
        "invoicing worker started"
    );
    handle.run_until(stop).await?;
    tracing::info!("invoicing worker stopped");
    pool.close().await;
    Ok(ExitCode::SUCCESS)
}

fn billing_client(url: &str) -> Result<crate::billing::BillingClient, InvoicingError> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(InvoicingError::InvalidArgument {
            option: "--billing-url",
            message: format!(
                "{url:?} is not an http:// or https:// URL, e.g. http://127.0.0.1:7070"
            ),
        });
    }
    crate::billing::BillingClient::new(url).map_err(|e| InvoicingError::InvalidArgument {
        option: "--billing-url",
        message: e.to_string(),
    })
}
