//! `handlers`: how fast a no-op reconciler drains a stream, against a raw
//! JetStream consumer draining the same stream.
//!
//! One run: fill `converge.outbox` with N events by SQL (as `relay` does: N/4
//! aggregates of 4 events each, a key's events N/4 apart on the stream) and
//! run the relay until all are on a fresh stream; stop it. Then:
//!
//! - baseline: a raw durable pull consumer (explicit acks, every message
//!   acknowledged) drains the N messages;
//! - converge: for each `--concurrency` value, a new durable `Consumer` with a
//!   no-op reconciler (`Outcome::Unchanged`) drains the same N messages, timed
//!   until its N-th `reconcile` call; afterwards the consumer must show
//!   nothing pending and nothing awaiting an ack;
//! - attribution: at each concurrency, the per-key lease alone (the
//!   `converge.key_leases` grant and release statements the consumer runs
//!   for every event, one key each), N times: the ceiling Postgres puts on
//!   the consumer; and the same leases granted and released a batch of
//!   `concurrency` keys per statement (as a sweep page does, and as the
//!   consumer's lease service does when requests arrive together).
//!
//! Baseline and converge drains alternate, `--rounds` times, each with a new
//! durable consumer on the same stream; each variant keeps its best run (the
//! machine may be shared).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::consumer::{pull, AckPolicy};
use converge::handlers::{Consumer, ConsumerConfig, Context, Outcome, ReconcileError, Reconciler};
use converge::{Relay, RelayConfig, StreamConfig};
use futures::StreamExt;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::common::{
    delete_streams, emit, peak_rss_kib, random_suffix, round2, round3, stream_messages,
    with_cleanup, Env, Result, TempDb,
};
use crate::latency::warm;

/// The ratio the issue asks for.
const TARGET_RATIO: f64 = 0.5;
/// Connections beyond the concurrency in the consumer's pool.
const POOL_SLACK: u32 = 8;
/// The key-lease statements of `converge-handlers` (`lease.rs`), verbatim.
use converge::handlers::lease_sql::{ACQUIRE as LEASE_SQL, RELEASE as RELEASE_SQL};
/// Lease time of the attribution's leases, in milliseconds.
const LEASE_MS: i64 = 20_000;
/// Batches in flight at once in [`batch_lock`].
const LOCK_BATCHES_IN_FLIGHT: usize = 4;
/// Longest wait for a drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

/// Options of the `handlers` scenario.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct HandlersArgs {
    /// Events to put on the stream and drain.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// `ConsumerConfig::concurrency` values to try, comma-separated; the pool
    /// gets 8 connections more than each (mind the server's `max_connections`).
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    concurrency: Vec<usize>,
    /// Messages per pull request of the raw baseline consumer.
    #[arg(long, default_value_t = 500)]
    raw_batch: usize,
    /// Rounds of baseline and converge drains (each a new durable consumer on
    /// the same stream); the best of each is reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
}

/// What the converge consumer did at one concurrency.
#[derive(Debug)]
struct ConvergeRun {
    round: u32,
    concurrency: usize,
    secs: f64,
    reconciles: usize,
    num_pending: u64,
    num_ack_pending: usize,
    lock_only_secs: f64,
    batch_lock_secs: f64,
}

impl ConvergeRun {
    fn json(&self, events: u64) -> serde_json::Value {
        json!({
            "round": self.round,
            "concurrency": self.concurrency,
            "pool_size": self.concurrency as u32 + POOL_SLACK,
            "events_per_sec": round2(events as f64 / self.secs),
            "secs": round3(self.secs),
            "reconciles": self.reconciles,
            "num_pending_after": self.num_pending,
            "num_ack_pending_after": self.num_ack_pending,
            "lock_only_per_sec": round2(events as f64 / self.lock_only_secs),
            "lock_share": round3(self.lock_only_secs / self.secs),
            "batch_lock_per_sec": round2(events as f64 / self.batch_lock_secs),
        })
    }
}

/// Runs the `handlers` scenario.
pub(crate) async fn run(env: &Env, args: &HandlersArgs) -> Result<()> {
    if args.events == 0
        || args.rounds == 0
        || args.concurrency.is_empty()
        || args.concurrency.contains(&0)
    {
        return Err("--events, --rounds and every --concurrency value must be positive".into());
    }
    let events = args.events;
    let db = TempDb::create(env).await?;
    let database = db.name.clone();
    let client = env.nats().await?;
    let suffix = random_suffix();
    let stream = format!("BENCH_HANDLERS_{suffix}");
    let prefix = format!("bench_handlers_{suffix}");
    let streams = [stream.clone()];

    let body = async {
        let pool = env.pool_for(&database, 2).await?;
        converge::migrate(&pool).await?;
        eprintln!("[handlers] filling the outbox of {database} with {events} events");
        let fill_secs = crate::relay::fill(&pool, events).await?.as_secs_f64();
        eprintln!("[handlers] relaying them to {stream}");
        let relay_secs = relay_all(env, &database, &pool, &stream, &prefix, events).await?;
        pool.close().await;
        let on_stream = stream_messages(&client, &stream).await?;
        if on_stream != events {
            return Err(format!("the stream holds {on_stream} messages, not {events}").into());
        }

        let on = Drain {
            env,
            database: &database,
            client: &client,
            stream: &stream,
            prefix: &prefix,
            events,
        };
        let mut baseline_secs = f64::INFINITY;
        let mut runs = Vec::new();
        for round in 1..=args.rounds {
            eprintln!(
                "[handlers] round {round}: baseline, raw pull consumer, batch {}",
                args.raw_batch
            );
            let secs = drain_raw(&client, &stream, events, args.raw_batch, round).await?;
            println!(
                "round {round} raw JetStream consumer: {:>9.0} msgs/s ({secs:.2} s)",
                events as f64 / secs
            );
            baseline_secs = baseline_secs.min(secs);
            for &concurrency in &args.concurrency {
                eprintln!("[handlers] round {round}: converge consumer, concurrency {concurrency}");
                let run = drain_converge(&on, concurrency, round).await?;
                println!(
                    "round {round} converge concurrency {:>3}: {:>9.0} events/s ({:.2} s, {} \
                     reconciles); key lease alone {:>9.0} /s, batched {:>9.0} /s",
                    run.concurrency,
                    events as f64 / run.secs,
                    run.secs,
                    run.reconciles,
                    events as f64 / run.lock_only_secs,
                    events as f64 / run.batch_lock_secs,
                );
                if run.num_pending != 0
                    || run.num_ack_pending != 0
                    || run.reconciles < events as usize
                {
                    return Err(format!(
                        "consumer at concurrency {concurrency} left {} pending and {} \
                         unacknowledged after {} reconciles",
                        run.num_pending, run.num_ack_pending, run.reconciles
                    )
                    .into());
                }
                runs.push(run);
            }
        }
        let baseline_rate = events as f64 / baseline_secs;
        let by_concurrency: Vec<serde_json::Value> = args
            .concurrency
            .iter()
            .map(|&c| {
                let of_c = || runs.iter().filter(move |r| r.concurrency == c);
                let secs = of_c().map(|r| r.secs).fold(f64::INFINITY, f64::min);
                let lock = of_c()
                    .map(|r| r.lock_only_secs)
                    .fold(f64::INFINITY, f64::min);
                let batch = of_c()
                    .map(|r| r.batch_lock_secs)
                    .fold(f64::INFINITY, f64::min);
                json!({
                    "concurrency": c,
                    "best_events_per_sec": round2(events as f64 / secs),
                    "best_lock_only_per_sec": round2(events as f64 / lock),
                    "best_batch_lock_per_sec": round2(events as f64 / batch),
                    "lock_share": round3(lock / secs),
                })
            })
            .collect();
        let best = runs
            .iter()
            .min_by(|a, b| a.secs.total_cmp(&b.secs))
            .expect("at least one run");
        let rate = events as f64 / best.secs;
        let ratio = rate / baseline_rate;
        println!(
            "handlers {events} events: converge {rate:.0} events/s (concurrency {}), raw \
             JetStream {baseline_rate:.0} msgs/s ({baseline_secs:.2} s), ratio {ratio:.3} \
             (target >= {TARGET_RATIO}); fill {fill_secs:.2} s, relay {relay_secs:.2} s",
            best.concurrency
        );
        Ok(json!({
            "scenario": "handlers",
            "events": events,
            "unit": "events/s",
            "rate": round2(rate),
            "baseline_rate": round2(baseline_rate),
            "ratio": round3(ratio),
            "target_ratio": TARGET_RATIO,
            "meets_target": ratio >= TARGET_RATIO,
            "concurrency": best.concurrency,
            "concurrency_tried": args.concurrency,
            "converge_events_per_sec": round2(rate),
            "converge_secs": round3(best.secs),
            "baseline_msgs_per_sec": round2(baseline_rate),
            "baseline_secs": round3(baseline_secs),
            "baseline_batch": args.raw_batch,
            "lock_only_per_sec": round2(events as f64 / best.lock_only_secs),
            "best_by_concurrency": by_concurrency,
            "lock_share": round3(best.lock_only_secs / best.secs),
            "rounds": args.rounds,
            "runs": runs.iter().map(|r| r.json(events)).collect::<Vec<_>>(),
            "fill_secs": round3(fill_secs),
            "relay_secs": round3(relay_secs),
            "bench_process_peak_rss_kib": peak_rss_kib(),
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

/// Runs a relay until `events` are published, stops it, returns the seconds.
pub(crate) async fn relay_all(
    env: &Env,
    database: &str,
    pool: &PgPool,
    stream: &str,
    prefix: &str,
    events: u64,
) -> Result<f64> {
    let relay_pool = env.pool_for(database, 6).await?;
    let started = Instant::now();
    let relay = Relay::new(
        relay_pool.clone(),
        env.nats().await?,
        RelayConfig::new(StreamConfig::new(stream, prefix)),
    )
    .start()
    .await?;
    let deadline = started + Duration::from_secs(120 + events / 1_000);
    loop {
        let published: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(published), 0)::bigint FROM converge.relay_partitions",
        )
        .fetch_one(pool)
        .await?;
        if published >= events as i64 {
            break;
        }
        if Instant::now() > deadline {
            let _ = relay.shutdown().await;
            return Err(format!("the relay published {published} of {events} events").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    relay.shutdown().await?;
    relay_pool.close().await;
    Ok(secs)
}

/// The consumer's state as the server reports it: (pending, awaiting ack).
/// Waits up to a few seconds for the last acknowledgements to land.
async fn settled(client: &async_nats::Client, stream: &str, name: &str) -> Result<(u64, usize)> {
    client.flush().await?;
    let js = jetstream::new(client.clone());
    let mut consumer: jetstream::consumer::PullConsumer =
        js.get_stream(stream).await?.get_consumer(name).await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let info = consumer.info().await?;
        let state = (info.num_pending, info.num_ack_pending);
        if state == (0, 0) || Instant::now() > deadline {
            return Ok(state);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The baseline: a raw durable pull consumer acknowledging every message.
pub(crate) async fn drain_raw(
    client: &async_nats::Client,
    stream: &str,
    events: u64,
    batch: usize,
    round: u32,
) -> Result<f64> {
    let name = format!("raw_r{round}");
    let js = jetstream::new(client.clone());
    let consumer = js
        .get_stream(stream)
        .await?
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                ack_policy: AckPolicy::Explicit,
                max_ack_pending: (batch * 4) as i64,
                ..Default::default()
            },
        )
        .await?;
    let started = Instant::now();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(batch)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await?;
    let mut received = 0;
    while received < events {
        let next = tokio::time::timeout(Duration::from_secs(30), messages.next()).await;
        let message = match next {
            Ok(Some(message)) => message?,
            Ok(None) | Err(_) => {
                return Err(format!("raw consumer stalled at {received} of {events}").into())
            }
        };
        message.ack().await?;
        received += 1;
    }
    client.flush().await?;
    let secs = started.elapsed().as_secs_f64();
    drop(messages);
    let (pending, ack_pending) = settled(client, stream, &name).await?;
    if (pending, ack_pending) != (0, 0) {
        return Err(format!("raw consumer left {pending} pending, {ack_pending} unacked").into());
    }
    Ok(secs)
}

/// The filled stream a converge consumer drains, and where things are.
#[derive(Clone, Copy)]
struct Drain<'a> {
    env: &'a Env,
    database: &'a str,
    client: &'a async_nats::Client,
    stream: &'a str,
    prefix: &'a str,
    events: u64,
}

/// A reconciler that only counts, and says when it has seen `target` calls.
struct Counter {
    calls: AtomicUsize,
    target: usize,
    done: Notify,
}

/// The reconciler the consumer owns: a handle on a shared [`Counter`].
struct Counting(Arc<Counter>);

impl Reconciler for Counting {
    async fn reconcile(&self, _ctx: &Context, _key: &str) -> Result<Outcome, ReconcileError> {
        let counter = &self.0;
        if counter.calls.fetch_add(1, Ordering::Relaxed) + 1 == counter.target {
            counter.done.notify_one();
        }
        Ok(Outcome::Unchanged)
    }
}

/// Drains the stream with a new converge consumer at `concurrency`, then
/// measures the key lease alone at the same concurrency.
async fn drain_converge(on: &Drain<'_>, concurrency: usize, round: u32) -> Result<ConvergeRun> {
    let Drain {
        env,
        database,
        client,
        stream,
        prefix,
        events,
    } = *on;
    // The consumer needs one connection for its locks; the lock-alone
    // comparison uses up to one per key in flight, within max_connections.
    let size = (concurrency as u32 + POOL_SLACK).min(72);
    let pool = env.pool_for(database, size).await?;
    warm(&pool, size).await?;
    let name = format!("bench_c{concurrency}_r{round}");
    let counter = Arc::new(Counter {
        calls: AtomicUsize::new(0),
        target: events as usize,
        done: Notify::new(),
    });
    let mut config = ConsumerConfig::new(&name, stream, format!("{prefix}.>"));
    config.concurrency = concurrency;

    let started = Instant::now();
    let consumer = Consumer::new(
        pool.clone(),
        client.clone(),
        Counting(counter.clone()),
        config,
    )
    .start()
    .await?;
    let finished = tokio::time::timeout(DRAIN_TIMEOUT, counter.done.notified()).await;
    let secs = started.elapsed().as_secs_f64();
    consumer.shutdown().await?;
    if finished.is_err() {
        return Err(format!(
            "converge consumer reconciled {} of {events} in {DRAIN_TIMEOUT:?}",
            counter.calls.load(Ordering::Relaxed)
        )
        .into());
    }
    let (num_pending, num_ack_pending) = settled(client, stream, &name).await?;

    let lock_only_secs = lock_only(&pool, &name, events, concurrency).await?;
    let batch_lock_secs = batch_lock(&pool, &name, events, concurrency).await?;
    pool.close().await;
    Ok(ConvergeRun {
        round,
        concurrency,
        secs,
        reconciles: counter.calls.load(Ordering::Relaxed),
        num_pending,
        num_ack_pending,
        lock_only_secs,
        batch_lock_secs,
    })
}

/// Grants and releases the key lease `events` times from `concurrency` tasks,
/// exactly as `converge-handlers` does around each reconcile; returns seconds.
async fn lock_only(pool: &PgPool, name: &str, events: u64, concurrency: usize) -> Result<f64> {
    let keys = (events / 4).max(1);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let (pool, next, name) = (pool.clone(), next.clone(), name.to_owned());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= events {
                    return Ok::<_, sqlx::Error>(());
                }
                let key = (i % keys).to_string();
                let granted: Vec<(String, String, i64)> = sqlx::query_as(LEASE_SQL)
                    .bind([name.as_str()])
                    .bind([key.as_str()])
                    .bind("bench")
                    .bind(LEASE_MS)
                    .fetch_all(&pool)
                    .await?;
                if let Some((_, _, token)) = granted.first() {
                    sqlx::query(RELEASE_SQL)
                        .bind([name.as_str()])
                        .bind([key.as_str()])
                        .bind([*token])
                        .bind([false])
                        .bind("bench")
                        .execute(&pool)
                        .await?;
                }
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Grants and releases the key lease `events` times in batches of
/// `concurrency` keys, one statement to lock a batch and one to release it (as
/// the sweep path's `run_keys` does), [`LOCK_BATCHES_IN_FLIGHT`] batches at
/// once: what the event path could reach if it locked the keys of each pull
/// batch together. Returns seconds.
async fn batch_lock(pool: &PgPool, name: &str, events: u64, concurrency: usize) -> Result<f64> {
    let keys = (events / 4).max(1);
    let batch = concurrency as u64;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..LOCK_BATCHES_IN_FLIGHT {
        let (pool, next, name) = (pool.clone(), next.clone(), name.to_owned());
        tasks.spawn(async move {
            loop {
                let from = next.fetch_add(batch, Ordering::Relaxed);
                if from >= events {
                    return Ok::<_, sqlx::Error>(());
                }
                let mut batch_keys: Vec<String> = (from..(from + batch).min(events))
                    .map(|i| (i % keys).to_string())
                    .collect();
                batch_keys.sort();
                batch_keys.dedup();
                let names = vec![name.clone(); batch_keys.len()];
                let granted: Vec<(String, String, i64)> = sqlx::query_as(LEASE_SQL)
                    .bind(&names)
                    .bind(&batch_keys)
                    .bind("bench")
                    .bind(LEASE_MS)
                    .fetch_all(&pool)
                    .await?;
                let n = granted.len();
                let (r, (k, t)): (Vec<String>, (Vec<String>, Vec<i64>)) =
                    granted.into_iter().map(|(r, k, t)| (r, (k, t))).unzip();
                sqlx::query(RELEASE_SQL)
                    .bind(&r)
                    .bind(&k)
                    .bind(&t)
                    .bind(vec![false; n])
                    .bind("bench")
                    .execute(&pool)
                    .await?;
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    Ok(started.elapsed().as_secs_f64())
}
