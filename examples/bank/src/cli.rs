//! The command line: `demo`, `check`, `serve`, `open`, `transfer`.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::check::check;
use crate::demo::{self, open_accounts, request_transfers, DemoOptions};
use crate::error::{connect_nats, connect_postgres, BankError};
use crate::faults::Faults;
use crate::schema::migrate;
use crate::worker::{self, WorkerOptions};

/// Event-sourced accounts and a transfer saga that converges.
#[derive(Debug, Parser)]
#[command(name = "bank", version, about, long_about = None)]
pub struct Cli {
    /// PostgreSQL holding converge's tables (the event log) and the bank's read models.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        global = true,
        hide_env_values = true
    )]
    pub database_url: String,
    /// NATS with JetStream (several servers comma-separated).
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub nats_url: String,
    /// The JetStream stream; its subject prefix is its name in lower case.
    #[arg(long, env = "BANK_STREAM", default_value = "BANK", global = true)]
    pub stream: String,
    /// The converge application name.
    #[arg(long, env = "BANK_APP", default_value = "bank", global = true)]
    pub app: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The end-to-end demo: accounts, workers, faults, transfers, convergence.
    Demo(DemoArgs),
    /// Verify from the event log that every transfer finished, the books
    /// balance and nothing was applied twice (exit 0), or not (exit 1).
    Check(CheckArgs),
    /// Run a worker (relay, saga on events and sweeps, projections) until SIGTERM.
    Serve(ServeArgs),
    /// Open accounts a000… (those open already are left as they are).
    Open(OpenArgs),
    /// Request transfers t00001… between random accounts.
    Transfer(TransferArgs),
}

/// `demo` options.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Transfers to request.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub transfers: u32,
    /// Accounts to open.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(2..=1000))]
    pub accounts: u32,
    /// Workers started in-process.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub workers: u16,
    /// Seconds to wait for convergence.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,
}

/// `check` options.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `serve` options.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// This instance's name.
    #[arg(long)]
    pub instance: Option<String>,
    /// Probability that a run fails transiently before doing anything.
    #[arg(long, default_value_t = 0.0, value_parser = probability)]
    pub fail_rate: f64,
    /// Probability that a run stops between the debit and the credit.
    #[arg(long, default_value_t = 0.0, value_parser = probability)]
    pub stop_after_debit: f64,
    /// With --stop-after-debit: abort the process there (a crash).
    #[arg(long)]
    pub abort: bool,
    /// Seconds between sweeps over the event log.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub sweep_every: u64,
    /// Attempts of an event before its transfer is dead-lettered.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
    /// Seconds a relay partition lease lasts (how soon a dead worker's
    /// partitions are taken over).
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub relay_lease: u64,
    /// Seconds a running transfer's lease lasts (how long a dead worker's
    /// transfers stay busy).
    #[arg(long, value_name = "SECS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub key_lease: u64,
}

/// `open` options.
#[derive(Debug, Clone, Args)]
pub struct OpenArgs {
    /// Accounts to open.
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=1000))]
    pub accounts: u32,
    /// Freeze every N-th (0: none).
    #[arg(long, default_value_t = 16)]
    pub frozen_every: u32,
}

/// `transfer` options.
#[derive(Debug, Clone, Args)]
pub struct TransferArgs {
    /// Transfers to request.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub count: u32,
    /// Between the first this many accounts.
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=1000))]
    pub accounts: u32,
}

fn probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!(
            "{s:?} is not a probability: give a number from 0 to 1, e.g. 0.2"
        )),
    }
}

/// The default log filter of a command (overridden by `RUST_LOG`).
pub fn default_log_filter(command: &Command) -> &'static str {
    match command {
        // The demo draws progress and reports its dead letters itself.
        Command::Demo(_) => "error,converge_handlers::dead_letter=off",
        Command::Serve(_) => "info",
        _ => "warn",
    }
}

/// Runs a parsed command line; the process's exit code.
pub async fn run(cli: Cli) -> Result<ExitCode, BankError> {
    match &cli.command {
        Command::Demo(args) => {
            let outcome = demo::run(&DemoOptions {
                database_url: cli.database_url.clone(),
                nats_url: cli.nats_url.clone(),
                stream: cli.stream.clone(),
                app: cli.app.clone(),
                transfers: args.transfers as usize,
                accounts: args.accounts as usize,
                workers: usize::from(args.workers),
                timeout: Duration::from_secs(args.timeout),
            })
            .await?;
            Ok(exit(outcome.converged))
        }
        Command::Check(args) => {
            let pool = connect_postgres(&cli.database_url, 4).await?;
            migrate(&pool).await?;
            let report = check(&pool).await?;
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("a report serializes")
                );
            } else {
                println!("{report}");
            }
            let _ = std::io::stdout().flush();
            pool.close().await;
            Ok(exit(report.converged))
        }
        Command::Serve(args) => {
            let stop = converge::shutdown_signal().map_err(converge::WorkerError::Signal)?;
            let pool = connect_postgres(&cli.database_url, 16).await?;
            let nats = connect_nats(&cli.nats_url).await?;
            migrate(&pool).await?;
            let mut options = WorkerOptions::new(cli.app.clone(), cli.stream.clone());
            options.instance.clone_from(&args.instance);
            options.sweep_every = Duration::from_secs(args.sweep_every.max(1));
            options.max_attempts = args.max_attempts;
            options.relay_lease = Duration::from_secs(args.relay_lease);
            options.key_lease = Duration::from_secs(args.key_lease);
            options.faults = Faults {
                fail_rate: args.fail_rate,
                stop_after_debit: args.stop_after_debit,
                abort: args.abort,
            };
            let handle = worker::start(&pool, &nats, &options).await?;
            tracing::info!(instance = handle.instance(), "bank worker started");
            handle.run_until(stop).await?;
            pool.close().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Open(args) => {
            let pool = connect_postgres(&cli.database_url, 4).await?;
            migrate(&pool).await?;
            open_accounts(&pool, args.accounts as usize, args.frozen_every as usize).await?;
            println!("opened {} accounts", args.accounts);
            Ok(ExitCode::SUCCESS)
        }
        Command::Transfer(args) => {
            let pool = connect_postgres(&cli.database_url, 8).await?;
            migrate(&pool).await?;
            request_transfers(&pool, args.count as usize, args.accounts as usize, 4).await?;
            println!("requested {} transfers", args.count);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
