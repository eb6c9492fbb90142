//! `latency`: how long after its commit an event reaches its reconciler, under
//! a steady load, against a raw JetStream publish → consume round trip.
//!
//! One run, everything in this process and timed with one monotonic clock
//! (`std::time::Instant`):
//!
//! - baseline: W publisher tasks, paced by tokio intervals to R messages/s in
//!   total, publish to a fresh stream (with `Nats-Msg-Id`, as the relay does)
//!   and await each acknowledgement; a durable pull consumer (explicit acks,
//!   16 messages per pull, as the converge consumer at concurrency 16)
//!   records when each message arrives. Latency: from just before the publish
//!   call to the arrival.
//! - converge: W writer tasks, paced the same way, each commit one transaction
//!   that appends one event (`Outbox::append`, default configuration) to a
//!   fresh aggregate and record the instant `commit` returned. A `Relay`
//!   (default `RelayConfig`) publishes to a fresh stream and a `Consumer`
//!   (concurrency 16, filter `<prefix>.>`) runs a no-op reconciler that
//!   records the instant its `reconcile` starts (the key lock is then held).
//!   Latency: commit → reconcile start. A plain NATS subscription on the
//!   stream's subjects also records when the relay's publish is seen, which
//!   splits the latency into the relay's part and the consumer's part.
//!
//! Events committed (or published) in the first second are warm-up and left
//! out of the figures.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::HeaderMap;
use converge::handlers::{Consumer, ConsumerConfig, Context, Outcome, ReconcileError, Reconciler};
use converge::{DomainEvent, Outbox, Relay, RelayConfig, StreamConfig, HEADER_AGGREGATE_ID};
use futures::StreamExt;
use serde_json::json;
use tokio::task::JoinSet;

use crate::common::{
    delete_streams, emit, peak_rss_kib, random_suffix, round2, round3, with_cleanup, Env, Result,
    TempDb,
};

/// Targets of the issue, on loopback.
const TARGET_P50_MS: f64 = 5.0;
/// See [`TARGET_P50_MS`].
const TARGET_P99_MS: f64 = 25.0;
/// Events (messages) of the first second are not measured.
const WARMUP: Duration = Duration::from_secs(1);
/// Concurrency of the converge consumer (and pull batch of both consumers).
const CONSUMER_CONCURRENCY: usize = 16;
/// How long to wait, after the load stops, for the last events to arrive.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of the `latency` scenario.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct LatencyArgs {
    /// Events (and baseline messages) per second, in total over the writers.
    #[arg(long, default_value_t = 1_000)]
    rate: u32,
    /// Seconds of load for each of the two measurements (the first is warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent writer (publisher) tasks sharing the rate.
    #[arg(long, default_value_t = 4)]
    writers: u32,
}

/// Instants keyed by sequence number; the first recorded instant wins.
#[derive(Debug, Default)]
struct Instants(Mutex<HashMap<u64, Instant>>);

impl Instants {
    fn record(&self, seq: u64, at: Instant) {
        self.0
            .lock()
            .expect("instants lock")
            .entry(seq)
            .or_insert(at);
    }

    fn len(&self) -> usize {
        self.0.lock().expect("instants lock").len()
    }

    fn snapshot(&self) -> HashMap<u64, Instant> {
        self.0.lock().expect("instants lock").clone()
    }
}

/// Latency figures of one measurement, in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Summary {
    count: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

impl Summary {
    /// Nearest-rank percentiles of `samples`; `None` when there are none.
    fn of(mut samples: Vec<Duration>) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let rank = |p: f64| {
            let index = ((p * samples.len() as f64).ceil() as usize).max(1) - 1;
            ms(samples[index.min(samples.len() - 1)])
        };
        let total: f64 = samples.iter().map(|d| ms(*d)).sum();
        Some(Summary {
            count: samples.len(),
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: ms(*samples.last().expect("not empty")),
            mean: total / samples.len() as f64,
        })
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "count": self.count,
            "p50_ms": round3(self.p50),
            "p90_ms": round3(self.p90),
            "p99_ms": round3(self.p99),
            "max_ms": round3(self.max),
            "mean_ms": round3(self.mean),
        })
    }

    fn line(&self) -> String {
        format!(
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} events)",
            self.p50, self.p90, self.p99, self.max, self.count
        )
    }
}

/// What one measurement saw: send (commit) and arrival instants.
#[derive(Debug)]
struct Trace {
    /// When the load started.
    started: Instant,
    /// How long the load ran.
    load: Duration,
    /// Commit (or publish) instants.
    sent: HashMap<u64, Instant>,
    /// Arrival (reconcile start, or receipt) instants.
    arrived: HashMap<u64, Instant>,
}

impl Trace {
    /// Sequence numbers sent after the warm-up, in order.
    fn measured(&self) -> Vec<u64> {
        let from = self.started + WARMUP;
        let mut seqs: Vec<u64> = self
            .sent
            .iter()
            .filter(|(_, at)| **at >= from)
            .map(|(seq, _)| *seq)
            .collect();
        seqs.sort_unstable();
        seqs
    }

    /// Latencies from `from` to `to` of the measured events found in both;
    /// also how many were missing and how many `to` preceded `from`.
    fn latencies(
        &self,
        from: &HashMap<u64, Instant>,
        to: &HashMap<u64, Instant>,
    ) -> (Vec<Duration>, usize, usize) {
        let mut samples = Vec::new();
        let (mut missing, mut early) = (0, 0);
        for seq in self.measured() {
            match (from.get(&seq), to.get(&seq)) {
                (Some(a), Some(b)) => {
                    if b < a {
                        early += 1;
                    }
                    samples.push(b.saturating_duration_since(*a));
                }
                _ => missing += 1,
            }
        }
        (samples, missing, early)
    }

    /// Latency (sent → arrived) per second of load, warm-up included, to
    /// show transients.
    fn by_second(&self) -> Vec<serde_json::Value> {
        let mut buckets: Vec<Vec<Duration>> = Vec::new();
        for (seq, sent) in &self.sent {
            let Some(arrived) = self.arrived.get(seq) else {
                continue;
            };
            let second = sent.saturating_duration_since(self.started).as_secs() as usize;
            if buckets.len() <= second {
                buckets.resize_with(second + 1, Vec::new);
            }
            buckets[second].push(arrived.saturating_duration_since(*sent));
        }
        buckets
            .into_iter()
            .enumerate()
            .filter_map(|(second, samples)| {
                let s = Summary::of(samples)?;
                Some(json!({
                    "second": second,
                    "count": s.count,
                    "p50_ms": round3(s.p50),
                    "p99_ms": round3(s.p99),
                    "max_ms": round3(s.max),
                }))
            })
            .collect()
    }

    /// Achieved send rate over the whole load.
    fn rate(&self) -> f64 {
        self.sent.len() as f64 / self.load.as_secs_f64()
    }
}

/// Runs the `latency` scenario.
pub(crate) async fn run(env: &Env, args: &LatencyArgs) -> Result<()> {
    if args.rate == 0 || args.writers == 0 || args.seconds <= WARMUP.as_secs() {
        return Err("--rate and --writers must be positive and --seconds more than 1".into());
    }
    let db = TempDb::create(env).await?;
    let database = db.name.clone();
    let client = env.nats().await?;
    let suffix = random_suffix();
    let stream = format!("BENCH_LAT_{suffix}");
    let prefix = format!("bench_lat_{suffix}");
    let raw_stream = format!("BENCH_LATRAW_{suffix}");
    let raw_prefix = format!("bench_latraw_{suffix}");
    let streams = [stream.clone(), raw_stream.clone()];

    let body = async {
        eprintln!(
            "[latency] baseline: raw JetStream publish -> pull consume, {} msgs/s for {} s",
            args.rate, args.seconds
        );
        let raw = raw_round_trip(env, &raw_stream, &raw_prefix, args).await?;
        let (raw_samples, raw_missing, _) = raw.latencies(&raw.sent, &raw.arrived);
        let baseline = Summary::of(raw_samples).ok_or("the baseline measured no message")?;

        eprintln!(
            "[latency] converge: append -> relay -> consumer -> no-op reconciler, {} events/s \
             for {} s",
            args.rate, args.seconds
        );
        let (trace, published) =
            converge_round_trip(env, &database, &stream, &prefix, args).await?;
        let (samples, missing, early) = trace.latencies(&trace.sent, &trace.arrived);
        let converge = Summary::of(samples).ok_or("converge measured no event")?;
        let relay_stage = Summary::of(trace.latencies(&trace.sent, &published).0);
        let consumer_stage = Summary::of(trace.latencies(&published, &trace.arrived).0);

        let ratio_p50 = converge.p50 / baseline.p50;
        let ratio_p99 = converge.p99 / baseline.p99;
        let meets = converge.p50 <= TARGET_P50_MS && converge.p99 <= TARGET_P99_MS;
        println!(
            "latency {} events/s x {} s, {} writers (first {} s excluded)",
            args.rate,
            args.seconds,
            args.writers,
            WARMUP.as_secs()
        );
        println!(
            "  converge commit -> reconcile start: {} at {:.0} events/s; {missing} not reconciled",
            converge.line(),
            trace.rate()
        );
        if let Some(s) = &relay_stage {
            println!("    commit -> relay publish seen:     {}", s.line());
        }
        if let Some(s) = &consumer_stage {
            println!("    publish seen -> reconcile start:  {}", s.line());
        }
        println!(
            "  raw JetStream publish -> receive:   {} at {:.0} msgs/s; {raw_missing} not received",
            baseline.line(),
            raw.rate()
        );
        println!(
            "  ratio p50 {ratio_p50:.2}, p99 {ratio_p99:.2}; targets p50 <= {TARGET_P50_MS} ms, \
             p99 <= {TARGET_P99_MS} ms: {}",
            if meets { "met" } else { "missed" }
        );

        Ok(json!({
            "scenario": "latency",
            "unit": "ms",
            "rate": args.rate,
            "seconds": args.seconds,
            "warmup_secs": WARMUP.as_secs(),
            "writers": args.writers,
            "consumer_concurrency": CONSUMER_CONCURRENCY,
            "events_measured": converge.count,
            "events_committed": trace.sent.len(),
            "events_not_reconciled": missing,
            "reconciled_before_commit_recorded": early,
            "achieved_events_per_sec": round2(trace.rate()),
            "p50_ms": round3(converge.p50),
            "p90_ms": round3(converge.p90),
            "p99_ms": round3(converge.p99),
            "max_ms": round3(converge.max),
            "mean_ms": round3(converge.mean),
            "baseline_p50_ms": round3(baseline.p50),
            "baseline_p90_ms": round3(baseline.p90),
            "baseline_p99_ms": round3(baseline.p99),
            "baseline_max_ms": round3(baseline.max),
            "baseline_mean_ms": round3(baseline.mean),
            "baseline_msgs_measured": baseline.count,
            "baseline_msgs_not_received": raw_missing,
            "baseline_achieved_msgs_per_sec": round2(raw.rate()),
            "ratio": round3(ratio_p50),
            "ratio_p50": round3(ratio_p50),
            "ratio_p99": round3(ratio_p99),
            "ratio_definition": "ratio_p50 = p50_ms / baseline_p50_ms, ratio_p99 = p99_ms / baseline_p99_ms",
            "commit_to_publish": relay_stage.map(|s| s.json()),
            "publish_to_reconcile": consumer_stage.map(|s| s.json()),
            "by_second": trace.by_second(),
            "target_p50_ms": TARGET_P50_MS,
            "target_p99_ms": TARGET_P99_MS,
            "meets_targets": meets,
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

/// Runs `send(seq)` from `writers` tasks paced to `rate` calls per second in
/// total for `load`, numbering calls from 0; returns when every task stopped.
async fn paced<F, Fut>(rate: u32, writers: u32, load: Duration, send: F) -> Result<()>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let period = Duration::from_secs_f64(f64::from(writers) / f64::from(rate));
    let next = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let end = start + load;
    let mut tasks = JoinSet::new();
    for w in 0..writers {
        let (send, next) = (send.clone(), next.clone());
        // Staggered, so that the writers' ticks interleave evenly.
        let first = start + period * w / writers;
        tasks.spawn(async move {
            let mut ticker = tokio::time::interval_at(first, period);
            loop {
                let tick = ticker.tick().await;
                if tick >= end {
                    return Ok::<_, crate::common::BoxError>(());
                }
                send(next.fetch_add(1, Ordering::Relaxed)).await?;
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    Ok(())
}

/// Waits until `arrived` holds `expected` entries, or [`DRAIN_TIMEOUT`].
async fn drain(arrived: &Instants, expected: usize) {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while arrived.len() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The baseline: raw JetStream publishes, paced, to a pull consumer.
async fn raw_round_trip(
    env: &Env,
    stream: &str,
    prefix: &str,
    args: &LatencyArgs,
) -> Result<Trace> {
    let publisher = env.nats().await?;
    let subscriber = env.nats().await?;
    let js = jetstream::new(publisher.clone());
    crate::common::create_raw_stream(&js, stream, prefix).await?;
    let consumer = jetstream::new(subscriber)
        .get_stream(stream)
        .await?
        .get_or_create_consumer(
            "raw",
            pull::Config {
                durable_name: Some("raw".into()),
                ack_policy: AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(CONSUMER_CONCURRENCY)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await?;
    let sent = Arc::new(Instants::default());
    let arrived = Arc::new(Instants::default());
    let receiver = {
        let arrived = arrived.clone();
        tokio::spawn(async move {
            while let Some(message) = messages.next().await {
                let message = message?;
                let at = Instant::now();
                let seq: u64 = std::str::from_utf8(&message.payload)?.parse()?;
                arrived.record(seq, at);
                message.ack().await?;
            }
            Ok::<_, crate::common::BoxError>(())
        })
    };

    let subject = format!("{prefix}.order.OrderPlaced");
    let load = Duration::from_secs(args.seconds);
    let started = Instant::now();
    let send = {
        let sent = sent.clone();
        move |seq: u64| {
            let (js, sent, subject) = (js.clone(), sent.clone(), subject.clone());
            async move {
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", uuid::Uuid::now_v7().to_string().as_str());
                headers.insert(HEADER_AGGREGATE_ID, seq.to_string().as_str());
                sent.record(seq, Instant::now());
                js.publish_with_headers(subject, headers, seq.to_string().into())
                    .await?
                    .into_future()
                    .await?;
                Ok(())
            }
        }
    };
    paced(args.rate, args.writers, load, send).await?;
    let load = started.elapsed();
    drain(&arrived, sent.len()).await;
    receiver.abort();
    if let Ok(Ok(Err(error))) = tokio::time::timeout(Duration::from_secs(1), receiver).await {
        return Err(format!("baseline consumer failed: {error}").into());
    }
    Ok(Trace {
        started,
        load,
        sent: sent.snapshot(),
        arrived: arrived.snapshot(),
    })
}

/// The event of the converge measurement: one per aggregate.
#[derive(Debug, serde::Serialize)]
struct OrderPlaced {
    seq: u64,
}

impl DomainEvent for OrderPlaced {
    fn aggregate_type(&self) -> &str {
        "order"
    }
    fn aggregate_id(&self) -> String {
        self.seq.to_string()
    }
    fn event_type(&self) -> &str {
        "OrderPlaced"
    }
}

/// A reconciler that does nothing but note when it started, per key.
struct Probe {
    started: Arc<Instants>,
}

impl Reconciler for Probe {
    async fn reconcile(&self, _ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let at = Instant::now();
        let seq: u64 = key.parse().map_err(ReconcileError::permanent)?;
        self.started.record(seq, at);
        Ok(Outcome::Unchanged)
    }
}

/// The converge path: paced appends, the relay, a consumer and [`Probe`].
/// Returns the trace and when each event's publish was seen on the wire.
async fn converge_round_trip(
    env: &Env,
    database: &str,
    stream: &str,
    prefix: &str,
    args: &LatencyArgs,
) -> Result<(Trace, HashMap<u64, Instant>)> {
    let setup = env.pool_for(database, 1).await?;
    converge::migrate(&setup).await?;
    setup.close().await;
    let writer_pool = env.pool_for(database, args.writers).await?;
    let relay_pool = env.pool_for(database, 6).await?;
    let consumer_pool = env
        .pool_for(database, CONSUMER_CONCURRENCY as u32 + 4)
        .await?;
    warm(&writer_pool, args.writers).await?;
    warm(&consumer_pool, CONSUMER_CONCURRENCY as u32 + 4).await?;

    let relay = Relay::new(
        relay_pool.clone(),
        env.nats().await?,
        RelayConfig::new(StreamConfig::new(stream, prefix)),
    )
    .start()
    .await?;

    // The relay's publishes, as any NATS subscriber sees them.
    let tap = env.nats().await?;
    let mut wire = tap.subscribe(format!("{prefix}.>")).await?;
    tap.flush().await?;
    let published = Arc::new(Instants::default());
    let watcher = {
        let published = published.clone();
        tokio::spawn(async move {
            while let Some(message) = wire.next().await {
                let at = Instant::now();
                let seq = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(HEADER_AGGREGATE_ID))
                    .and_then(|v| v.as_str().parse().ok());
                if let Some(seq) = seq {
                    published.record(seq, at);
                }
            }
        })
    };

    let started_at = Arc::new(Instants::default());
    let mut config = ConsumerConfig::new("latency", stream, format!("{prefix}.>"));
    config.concurrency = CONSUMER_CONCURRENCY;
    let consumer = Consumer::new(
        consumer_pool.clone(),
        env.nats().await?,
        Probe {
            started: started_at.clone(),
        },
        config,
    )
    .start()
    .await?;

    let committed = Arc::new(Instants::default());
    let load = Duration::from_secs(args.seconds);
    let started = Instant::now();
    let send = {
        let (pool, committed) = (writer_pool.clone(), committed.clone());
        let outbox = Outbox::default();
        move |seq: u64| {
            let (pool, committed, outbox) = (pool.clone(), committed.clone(), outbox.clone());
            async move {
                let mut tx = pool.begin().await?;
                outbox.append(&mut tx, &OrderPlaced { seq }).await?;
                tx.commit().await?;
                committed.record(seq, Instant::now());
                Ok(())
            }
        }
    };
    let loaded = paced(args.rate, args.writers, load, send).await;
    let load = started.elapsed();
    if loaded.is_ok() {
        drain(&started_at, committed.len()).await;
    }
    let stopped = consumer.shutdown().await;
    let relay_stopped = relay.shutdown().await;
    watcher.abort();
    for pool in [writer_pool, relay_pool, consumer_pool] {
        pool.close().await;
    }
    loaded?;
    stopped?;
    relay_stopped?;
    let published = published.snapshot();
    Ok((
        Trace {
            started,
            load,
            sent: committed.snapshot(),
            arrived: started_at.snapshot(),
        },
        published,
    ))
}

/// Opens `size` connections of `pool` now, so that no measured request pays
/// for a connection set-up.
pub(crate) async fn warm(pool: &sqlx::PgPool, size: u32) -> Result<()> {
    let mut held = Vec::with_capacity(size as usize);
    for _ in 0..size {
        held.push(pool.acquire().await?);
    }
    Ok(())
}
