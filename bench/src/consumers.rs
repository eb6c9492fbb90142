//! `consumers`: one durable consumer spread over several worker processes,
//! against a raw JetStream consumer draining the same stream.
//!
//! One run: fill `converge.outbox` with N events (N/4 aggregates of 4) and
//! relay them to a fresh stream, as `handlers` does. Then, `--rounds` times:
//! the raw baseline (one durable pull consumer acknowledging every message),
//! and for each `--workers` value W a new durable converge consumer bound by
//! W processes at once (`consumer-only`, each with its own pool and NATS
//! connection, a no-op reconciler, the same `--concurrency`). Each process
//! exits once the server shows nothing pending and nothing awaiting an ack,
//! and reports its reconcile calls and the times of its first and last; the
//! drain is the span from the first call of any process to the last. Calls
//! beyond N (redeliveries) and each process's share are reported.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use converge::handlers::{Consumer, ConsumerConfig, Context, Outcome, ReconcileError, Reconciler};
use serde_json::json;

use crate::common::{
    child_json, delete_streams, emit, random_suffix, round2, round3, stream_messages, with_cleanup,
    Env, Result, TempDb,
};

/// Connections all worker processes may hold together (PostgreSQL's default
/// `max_connections` is 100).
const CONNECTIONS: u32 = 90;

/// Options of the `consumers` scenario.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ConsumersArgs {
    /// Events to put on the stream and drain.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Worker processes binding the durable consumer, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    workers: Vec<usize>,
    /// `ConsumerConfig::concurrency` of each process.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Messages per pull request of the raw baseline consumer.
    #[arg(long, default_value_t = 500)]
    raw_batch: usize,
    /// Rounds (each a new durable consumer); the best of each is reported.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
}

/// Options of the hidden `consumer-only` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ConsumerOnlyArgs {
    /// Database (on `DATABASE_URL`'s server).
    #[arg(long)]
    database: String,
    /// The filled stream.
    #[arg(long)]
    stream: String,
    /// Its subject prefix.
    #[arg(long)]
    prefix: String,
    /// The durable consumer's name (shared by the processes of one drain).
    #[arg(long)]
    durable: String,
    /// `ConsumerConfig::concurrency`.
    #[arg(long)]
    concurrency: usize,
    /// Pool size.
    #[arg(long)]
    pool: u32,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Counts calls and remembers the first and the last (Unix nanoseconds).
#[derive(Default)]
struct Calls {
    calls: AtomicU64,
    first: AtomicU64,
    last: AtomicU64,
}

struct Counting(Arc<Calls>);

impl Reconciler for Counting {
    async fn reconcile(&self, _ctx: &Context, _key: &str) -> Result<Outcome, ReconcileError> {
        let now = unix_nanos();
        let calls = &self.0;
        let _ = calls
            .first
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        calls.last.fetch_max(now, Ordering::Relaxed);
        calls.calls.fetch_add(1, Ordering::Relaxed);
        Ok(Outcome::Unchanged)
    }
}

/// `consumer-only`: binds the durable consumer until the server shows it
/// drained, then prints its calls as one JSON line.
pub(crate) async fn consumer_only(env: &Env, args: &ConsumerOnlyArgs) -> Result<()> {
    let pool = env.pool_for(&args.database, args.pool).await?;
    let client = env.nats().await?;
    let calls = Arc::new(Calls::default());
    let mut config = ConsumerConfig::new(&args.durable, &args.stream, format!("{}.>", args.prefix));
    config.concurrency = args.concurrency;
    let consumer = Consumer::new(
        pool.clone(),
        client.clone(),
        Counting(calls.clone()),
        config,
    )
    .start()
    .await?;
    let js = jetstream::new(client.clone());
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut drained_seen = 0;
    while drained_seen < 3 {
        if Instant::now() > deadline {
            let _ = consumer.shutdown().await;
            return Err("the consumer did not drain in time".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut durable: jetstream::consumer::PullConsumer = match js
            .get_stream(&args.stream)
            .await?
            .get_consumer(&args.durable)
            .await
        {
            Ok(c) => c,
            Err(_) => continue,
        };
        let info = durable.info().await?;
        if info.num_pending == 0 && info.num_ack_pending == 0 && info.delivered.stream_sequence > 0
        {
            drained_seen += 1;
        } else {
            drained_seen = 0;
        }
    }
    consumer.shutdown().await?;
    pool.close().await;
    emit(&json!({
        "calls": calls.calls.load(Ordering::Relaxed),
        "first_ns": calls.first.load(Ordering::Relaxed),
        "last_ns": calls.last.load(Ordering::Relaxed),
    }));
    Ok(())
}

/// One spread drain.
#[derive(Debug)]
struct SpreadRun {
    round: u32,
    workers: usize,
    secs: f64,
    calls: Vec<u64>,
}

/// Runs the `consumers` scenario.
pub(crate) async fn run(env: &Env, args: &ConsumersArgs) -> Result<()> {
    if args.events == 0 || args.rounds == 0 || args.workers.contains(&0) || args.concurrency == 0 {
        return Err(
            "--events, --rounds, --concurrency and every --workers value must be positive".into(),
        );
    }
    let events = args.events;
    let db = TempDb::create(env).await?;
    let database = db.name.clone();
    let client = env.nats().await?;
    let suffix = random_suffix();
    let stream = format!("BENCH_CONSUMERS_{suffix}");
    let prefix = format!("bench_consumers_{suffix}");
    let streams = [stream.clone()];

    let body = async {
        let pool = env.pool_for(&database, 2).await?;
        converge::migrate(&pool).await?;
        eprintln!("[consumers] filling the outbox of {database} with {events} events");
        crate::relay::fill(&pool, events).await?;
        crate::handlers::relay_all(env, &database, &pool, &stream, &prefix, events).await?;
        pool.close().await;
        let on_stream = stream_messages(&client, &stream).await?;
        if on_stream != events {
            return Err(format!("the stream holds {on_stream} messages, not {events}").into());
        }
        let mut baseline_secs = f64::INFINITY;
        let mut runs = Vec::new();
        for round in 1..=args.rounds {
            let secs =
                crate::handlers::drain_raw(&client, &stream, events, args.raw_batch, round).await?;
            println!(
                "round {round} raw JetStream consumer: {:>9.0} msgs/s",
                events as f64 / secs
            );
            baseline_secs = baseline_secs.min(secs);
            for &workers in &args.workers {
                let run = spread(&database, &stream, &prefix, workers, args, round).await?;
                let total: u64 = run.calls.iter().sum();
                println!(
                    "round {round} converge over {workers} workers: {:>9.0} events/s ({:.2} s), \
                     calls per worker {:?}",
                    events as f64 / run.secs,
                    run.secs,
                    run.calls
                );
                if total < events {
                    return Err(
                        format!("{workers} workers reconciled {total} of {events} events").into(),
                    );
                }
                runs.push(run);
            }
        }
        let baseline_rate = events as f64 / baseline_secs;
        let by_workers: Vec<serde_json::Value> = args
            .workers
            .iter()
            .map(|&w| {
                let best = runs
                    .iter()
                    .filter(|r| r.workers == w)
                    .min_by(|a, b| a.secs.total_cmp(&b.secs))
                    .expect("a run per worker count");
                let rate = events as f64 / best.secs;
                json!({
                    "workers": w,
                    "best_events_per_sec": round2(rate),
                    "ratio_to_raw": round3(rate / baseline_rate),
                    "calls_per_worker": best.calls,
                    "redeliveries": best.calls.iter().sum::<u64>() - events,
                })
            })
            .collect();
        println!("consumers {events} events: raw {baseline_rate:.0} msgs/s; {by_workers:?}");
        Ok(json!({
            "scenario": "consumers",
            "events": events,
            "unit": "events/s",
            "concurrency_per_worker": args.concurrency,
            "baseline_rate": round2(baseline_rate),
            "by_workers": by_workers,
            "runs": runs.iter().map(|r| json!({
                "round": r.round, "workers": r.workers, "secs": round3(r.secs),
                "events_per_sec": round2(events as f64 / r.secs), "calls": r.calls,
            })).collect::<Vec<_>>(),
            "rounds": args.rounds,
        }))
    };
    let cleanup = async {
        delete_streams(&client, &streams).await;
        db.drop_db().await
    };
    let result = with_cleanup(body, cleanup).await?;
    emit(&result);
    Ok(())
}

/// `workers` processes bind one new durable consumer at once.
async fn spread(
    database: &str,
    stream: &str,
    prefix: &str,
    workers: usize,
    args: &ConsumersArgs,
    round: u32,
) -> Result<SpreadRun> {
    eprintln!("[consumers] round {round}: {workers} workers");
    let durable = format!("spread_w{workers}_r{round}");
    let pool = (CONNECTIONS / workers as u32)
        .min(args.concurrency as u32 + 8)
        .max(2);
    let mut children = Vec::new();
    for _ in 0..workers {
        let mut command = tokio::process::Command::new(std::env::current_exe()?);
        command.arg("consumer-only").args([
            "--database",
            database,
            "--stream",
            stream,
            "--prefix",
            prefix,
            "--durable",
            &durable,
            "--concurrency",
            &args.concurrency.to_string(),
            "--pool",
            &pool.to_string(),
        ]);
        children.push(async move { child_json(&mut command, "consumer-only").await });
    }
    let results = futures::future::try_join_all(children).await?;
    let mut calls = Vec::new();
    let (mut first, mut last) = (u64::MAX, 0);
    for r in &results {
        let n = r["calls"].as_u64().unwrap_or(0);
        calls.push(n);
        if n > 0 {
            first = first.min(r["first_ns"].as_u64().unwrap_or(u64::MAX));
            last = last.max(r["last_ns"].as_u64().unwrap_or(0));
        }
    }
    if last <= first {
        return Err(format!("{workers} workers reconciled nothing").into());
    }
    Ok(SpreadRun {
        round,
        workers,
        secs: (last - first) as f64 / 1e9,
        calls,
    })
}
