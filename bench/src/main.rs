//! converge-bench: converge measured against raw baselines in the same run.
//!
//! `cargo run --release -p converge-bench -- relay --events 200000`,
//! `... -- relay --compare-rss`, `... -- relay --instances 1,2,4` (N relay
//! processes sharing one outbox, order checked; `--include-handout` times the
//! partition hand-out too), `... -- replicas` (raw and relay into R1 and R3
//! streams of a private three-node cluster; `NATS_SERVER_BIN` picks the
//! server), `... -- append --seconds 10 --writers 16`,
//! `... -- latency --rate 1000 --seconds 10`, `... -- handlers --events 100000`,
//! `... -- sweep --keys 100000`, `... -- sweep --compare-rss`,
//! `... -- retention --sizes 1000000,10000000`, `... -- aggregate --events 1000`.
//! Each scenario creates its own database and streams, drops them at the end,
//! prints a human summary and, as the last line of stdout, one JSON object.
#![forbid(unsafe_code)]

mod aggregate;
mod append;
mod common;
mod consumers;
mod handlers;
mod latency;
mod order;
mod relay;
mod replicas;
mod retention;
mod scale;
mod sweep;

use clap::{Parser, Subcommand};

/// Benchmarks of converge against raw Postgres and JetStream baselines.
#[derive(Debug, Parser)]
#[command(name = "converge-bench", version)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

/// The scenarios.
#[derive(Debug, Subcommand)]
enum Scenario {
    /// Relay throughput and peak RSS against raw JetStream publishing.
    Relay(relay::RelayArgs),
    /// Transaction throughput with and without appending an event.
    Append(append::AppendArgs),
    /// Commit-to-reconcile latency under steady load, against a raw JetStream
    /// publish-to-consume round trip.
    Latency(latency::LatencyArgs),
    /// No-op reconciler throughput draining a stream, against a raw JetStream
    /// consumer draining it.
    Handlers(handlers::HandlersArgs),
    /// One durable consumer bound by several worker processes, against a raw
    /// JetStream consumer draining the same stream.
    Consumers(consumers::ConsumersArgs),
    /// Stale-aggregate sweep throughput and peak RSS with a DB-only
    /// reconciler, against the same UPDATEs issued directly in batches.
    Sweep(sweep::SweepArgs),
    /// Retention's deleted rows/s and an idle pass at 1M and 10M stored
    /// events, and the relay's throughput while it runs.
    Retention(retention::RetentionArgs),
    /// Event-sourced aggregates: loading 1,000 events with and without
    /// snapshots against a raw read, and commands against raw appends.
    Aggregate(aggregate::AggregateArgs),
    /// Publish cost of replication: raw publishing and the relay into R1 and
    /// R3 streams of a private three-node JetStream cluster.
    Replicas(replicas::ReplicasArgs),
    /// Internal: the relay alone, in its own process (used by `relay`).
    #[command(hide = true)]
    RelayOnly(relay::RelayOnlyArgs),
    /// Internal: one worker's consumer, in its own process (used by `consumers`).
    #[command(hide = true)]
    ConsumerOnly(consumers::ConsumerOnlyArgs),
    /// Internal: one sweep run alone, in its own process (used by `sweep`).
    #[command(hide = true)]
    SweepOnly(sweep::SweepOnlyArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let env = common::Env::from_env();
    let result = match &cli.scenario {
        Scenario::Relay(args) => relay::run(&env, args).await,
        Scenario::Append(args) => append::run(&env, args).await,
        Scenario::Latency(args) => latency::run(&env, args).await,
        Scenario::Handlers(args) => handlers::run(&env, args).await,
        Scenario::Consumers(args) => consumers::run(&env, args).await,
        Scenario::ConsumerOnly(args) => consumers::consumer_only(&env, args).await,
        Scenario::Sweep(args) => sweep::run(&env, args).await,
        Scenario::Retention(args) => retention::run(&env, args).await,
        Scenario::Aggregate(args) => aggregate::run(&env, args).await,
        Scenario::Replicas(args) => replicas::run(&env, args).await,
        Scenario::RelayOnly(args) => relay::relay_only(&env, args).await,
        Scenario::SweepOnly(args) => sweep::sweep_only(&env, args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("converge-bench: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
