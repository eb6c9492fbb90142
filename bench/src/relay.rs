//! `relay`: how fast the relay drains a full outbox to JetStream, against raw
//! JetStream publishing of the same messages, and how much memory it takes.
//!
//! One run: fill `converge.outbox` with N events by SQL; publish the same N
//! messages (subjects, headers, payloads) straight to a fresh stream with 256
//! acknowledgements in flight (the baseline); then start the relay in a child
//! process (`relay-only`) so that its peak RSS is its own, and time it until
//! `relay_partitions.published` adds up to N.

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use converge::{
    Relay, RelayConfig, StreamConfig, HEADER_AGGREGATE_ID, HEADER_AGGREGATE_TYPE,
    HEADER_AGGREGATE_VERSION, HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_OCCURRED_AT,
};
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::json;
use sqlx::PgPool;

use crate::common::{
    current_rss_kib, delete_streams, emit, peak_rss_kib, random_suffix, round2, round3,
    stream_messages, with_cleanup, Env, Result, TempDb,
};

/// Aggregate type of the generated events.
const AGGREGATE_TYPE: &str = "order";
/// Event type of the generated events.
const EVENT_TYPE: &str = "OrderUpdated";
/// Padding that brings the JSON payload to about 200 bytes.
const PAD_LEN: usize = 160;
/// Rows per `INSERT ... SELECT generate_series` statement of the fill.
const FILL_CHUNK: u64 = 50_000;
/// Event counts of `--compare-rss`.
const RSS_SIZES: [u64; 2] = [200_000, 1_000_000];

/// Options of the `relay` scenario.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RelayArgs {
    /// Events to put in the outbox and relay.
    #[arg(long, default_value_t = 200_000)]
    pub(crate) events: u64,
    /// Acknowledgements in flight for the raw-publish baseline.
    #[arg(long, default_value_t = 256)]
    pub(crate) window: usize,
    /// `RelayConfig::batch_size` of the relay.
    #[arg(long, default_value_t = 2_000)]
    pub(crate) batch_size: usize,
    /// Run with 200k and then 1M events and compare the relay's peak RSS
    /// (ignores `--events`).
    #[arg(long)]
    compare_rss: bool,
    /// Relay processes sharing the outbox's partitions, one drain per count
    /// (`--instances 1,2,4`); each drain's stream is read back and checked
    /// for per-aggregate order (see `scale`).
    #[arg(long, value_delimiter = ',')]
    pub(crate) instances: Vec<usize>,
    /// With `--instances`: start the relays on the filled outbox and time
    /// process start and partition hand-out too (default: the relays settle
    /// their shares on an empty outbox first; the fill commits at once).
    #[arg(long)]
    pub(crate) include_handout: bool,
}

/// Options of the hidden `relay-only` subcommand (the relay's own process).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RelayOnlyArgs {
    /// Database (on `DATABASE_URL`'s server) whose outbox is already filled.
    #[arg(long)]
    database: String,
    /// Stream to publish to.
    #[arg(long)]
    stream: String,
    /// Subject prefix of that stream.
    #[arg(long)]
    prefix: String,
    /// Events to wait for.
    #[arg(long)]
    events: u64,
    /// `RelayConfig::batch_size`.
    #[arg(long, default_value_t = 2_000)]
    batch_size: usize,
    /// `StreamConfig::replicas` of the stream the relay creates.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

/// Number of aggregates the events are spread over.
pub(crate) fn aggregates(events: u64) -> u64 {
    (events / 4).max(1)
}

/// The payload of event `seq`: byte for byte what the SQL fill writes.
fn payload(seq: u64, aggregates: u64, pad: &str) -> String {
    format!(
        r#"{{"order_id":{},"seq":{},"pad":"{}"}}"#,
        seq % aggregates,
        seq,
        pad
    )
}

/// What one run measured.
#[derive(Debug)]
struct RunResult {
    events: u64,
    fill_secs: f64,
    baseline_secs: f64,
    relay_secs: f64,
    relay_start_secs: f64,
    relay_peak_rss_kib: Option<u64>,
    relay_rss_before_kib: Option<u64>,
    payload_bytes: usize,
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.events as f64 / self.relay_secs
    }

    fn baseline_rate(&self) -> f64 {
        self.events as f64 / self.baseline_secs
    }

    fn json(&self, args: &RelayArgs) -> serde_json::Value {
        json!({
            "events": self.events,
            "unit": "events/s",
            "rate": round2(self.rate()),
            "baseline_rate": round2(self.baseline_rate()),
            "ratio": round3(self.rate() / self.baseline_rate()),
            "relay_events_per_sec": round2(self.rate()),
            "baseline_msgs_per_sec": round2(self.baseline_rate()),
            "relay_secs": round3(self.relay_secs),
            "relay_start_secs": round3(self.relay_start_secs),
            "baseline_secs": round3(self.baseline_secs),
            "fill_secs": round3(self.fill_secs),
            "fill_events_per_sec": round2(self.events as f64 / self.fill_secs),
            "peak_rss_kib": self.relay_peak_rss_kib,
            "rss_before_relay_kib": self.relay_rss_before_kib,
            "payload_bytes": self.payload_bytes,
            "aggregates": aggregates(self.events),
            "window": args.window,
            "batch_size": args.batch_size,
        })
    }
}

/// Runs the `relay` scenario.
pub(crate) async fn run(env: &Env, args: &RelayArgs) -> Result<()> {
    if !args.instances.is_empty() {
        return crate::scale::run_instances(env, args).await;
    }
    let sizes: Vec<u64> = if args.compare_rss {
        RSS_SIZES.to_vec()
    } else {
        vec![args.events]
    };
    let mut runs = Vec::new();
    for events in sizes {
        let run = run_one(env, args, events).await?;
        println!(
            "relay  {:>8} events: relay {:>10.0} events/s ({:.2} s), raw JetStream {:>10.0} msgs/s \
             ({:.2} s), ratio {:.3}; relay peak RSS {} KiB (before start {} KiB); fill {:.2} s",
            run.events,
            run.rate(),
            run.relay_secs,
            run.baseline_rate(),
            run.baseline_secs,
            run.rate() / run.baseline_rate(),
            fmt_kib(run.relay_peak_rss_kib),
            fmt_kib(run.relay_rss_before_kib),
            run.fill_secs,
        );
        runs.push(run);
    }
    let last = runs.last().expect("at least one run");
    let mut result = last.json(args);
    if args.compare_rss {
        let first = &runs[0];
        let growth = match (first.relay_peak_rss_kib, last.relay_peak_rss_kib) {
            (Some(a), Some(b)) if a > 0 => Some(round3(b as f64 / a as f64)),
            _ => None,
        };
        println!(
            "relay peak RSS: {} KiB at {} events, {} KiB at {} events (x{})",
            fmt_kib(first.relay_peak_rss_kib),
            first.events,
            fmt_kib(last.relay_peak_rss_kib),
            last.events,
            growth.map_or("?".into(), |g| g.to_string()),
        );
        let object = result.as_object_mut().expect("an object");
        object.insert("scenario".into(), json!("relay-rss"));
        object.insert("peak_rss_growth".into(), json!(growth));
        object.insert(
            "peak_rss_kib_by_events".into(),
            runs.iter()
                .map(|r| (r.events.to_string(), json!(r.relay_peak_rss_kib)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        );
        object.insert("runs".into(), runs.iter().map(|r| r.json(args)).collect());
    } else {
        result
            .as_object_mut()
            .expect("an object")
            .insert("scenario".into(), json!("relay"));
    }
    result
        .as_object_mut()
        .expect("an object")
        .insert("bench_process_peak_rss_kib".into(), json!(peak_rss_kib()));
    emit(&result);
    Ok(())
}

fn fmt_kib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "?".into(), |k| k.to_string())
}

/// One fill, baseline and relay run on a fresh database and fresh streams.
async fn run_one(env: &Env, args: &RelayArgs, events: u64) -> Result<RunResult> {
    let db = TempDb::create(env).await?;
    let database = db.name.clone();
    let client = env.nats().await?;
    let suffix = random_suffix();
    let relay_stream = format!("BENCH_RELAY_{suffix}");
    let relay_prefix = format!("bench_relay_{suffix}");
    let raw_stream = format!("BENCH_RAW_{suffix}");
    let raw_prefix = format!("bench_raw_{suffix}");
    let streams = [relay_stream.clone(), raw_stream.clone()];

    let body = async {
        let pool = env.pool_for(&database, 2).await?;
        converge::migrate(&pool).await?;

        eprintln!("[relay {events}] filling the outbox of {database}");
        let fill_secs = fill(&pool, events).await?.as_secs_f64();

        eprintln!(
            "[relay {events}] baseline: raw JetStream publish, window {}",
            args.window
        );
        let baseline_secs = publish_raw(&client, &raw_stream, &raw_prefix, events, args.window)
            .await?
            .as_secs_f64();
        let raw_count = stream_messages(&client, &raw_stream).await?;
        if raw_count != events {
            return Err(format!("baseline stream holds {raw_count} messages, not {events}").into());
        }

        eprintln!("[relay {events}] relay in a child process");
        let child = run_child(&database, &relay_stream, &relay_prefix, events, args).await?;

        let on_stream = stream_messages(&client, &relay_stream).await?;
        if on_stream != events {
            return Err(format!("relay stream holds {on_stream} messages, not {events}").into());
        }
        let published: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(published), 0)::bigint FROM converge.relay_partitions",
        )
        .fetch_one(&pool)
        .await?;
        let rejects: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.relay_rejects")
            .fetch_one(&pool)
            .await?;
        if published != events as i64 || rejects != 0 {
            return Err(
                format!("relay recorded {published} published and {rejects} rejects").into(),
            );
        }
        pool.close().await;

        let get_f64 = |key: &str| child.get(key).and_then(serde_json::Value::as_f64);
        let get_u64 = |key: &str| child.get(key).and_then(serde_json::Value::as_u64);
        let relay_secs = get_f64("elapsed_secs").ok_or("child result lacks elapsed_secs")?;
        Ok(RunResult {
            events,
            fill_secs,
            baseline_secs,
            relay_secs,
            relay_start_secs: get_f64("start_secs").unwrap_or_default(),
            relay_peak_rss_kib: get_u64("peak_rss_kib"),
            relay_rss_before_kib: get_u64("rss_before_relay_kib"),
            payload_bytes: payload(events / 2, aggregates(events), &"x".repeat(PAD_LEN)).len(),
        })
    };
    let cleanup = async {
        delete_streams(&client, &streams).await;
        db.drop_db().await
    };
    with_cleanup(body, cleanup).await
}

/// Fills the outbox with `events` events, in version order per aggregate.
pub(crate) async fn fill(pool: &PgPool, events: u64) -> Result<Duration> {
    let started = Instant::now();
    fill_range(pool, 0..events, aggregates(events), Duration::ZERO).await?;
    let elapsed = started.elapsed();
    sqlx::query("ANALYZE converge.outbox").execute(pool).await?;
    Ok(elapsed)
}

/// Writes events `seqs` of a fill over `aggregates` aggregates (event `g` is
/// version `g / aggregates + 1` of aggregate `g % aggregates`), that occurred
/// `age` ago, by SQL.
pub(crate) async fn fill_range(
    pool: &PgPool,
    seqs: std::ops::Range<u64>,
    aggregates: u64,
    age: Duration,
) -> Result<()> {
    let mut from = seqs.start;
    while from < seqs.end {
        let to = (from + FILL_CHUNK).min(seqs.end) - 1;
        // One statement, one transaction: its tx_order is every row's, and
        // ids follow `g`, so (tx_order, id) follows each aggregate's versions.
        sqlx::query(
            "INSERT INTO converge.outbox \
               (partition, tx_order, event_id, aggregate_type, aggregate_id, version, \
                event_type, occurred_at, recorded_at, payload) \
             SELECT converge.partition_of($3, (g % $5)::text), converge.tx_order(), \
                    gen_random_uuid(), $3, (g % $5)::text, \
                    g / $5 + 1, $4, now() - make_interval(secs => $7), \
                    now() - make_interval(secs => $7), \
                    format('{\"order_id\":%s,\"seq\":%s,\"pad\":\"%s\"}', g % $5, g, repeat('x', $6))::json \
             FROM generate_series($1::bigint, $2::bigint) AS g ORDER BY g",
        )
        .bind(from as i64)
        .bind(to as i64)
        .bind(AGGREGATE_TYPE)
        .bind(EVENT_TYPE)
        .bind(aggregates as i64)
        .bind(PAD_LEN as i32)
        .bind(age.as_secs_f64())
        .execute(pool)
        .await?;
        from = to + 1;
    }
    Ok(())
}

/// Publishes the same messages the relay will, straight to a fresh stream,
/// with up to `window` acknowledgements outstanding; every one is awaited.
pub(crate) async fn publish_raw(
    client: &async_nats::Client,
    stream: &str,
    prefix: &str,
    events: u64,
    window: usize,
) -> Result<Duration> {
    publish_raw_replicated(client, stream, prefix, events, window, 1).await
}

/// [`publish_raw`] into a stream of `replicas` replicas.
pub(crate) async fn publish_raw_replicated(
    client: &async_nats::Client,
    stream: &str,
    prefix: &str,
    events: u64,
    window: usize,
    replicas: usize,
) -> Result<Duration> {
    let js = jetstream::new(client.clone());
    crate::common::create_raw_stream_replicated(&js, stream, prefix, replicas).await?;
    let aggs = aggregates(events);
    let pad = "x".repeat(PAD_LEN);
    let subject = format!("{prefix}.{AGGREGATE_TYPE}.{EVENT_TYPE}");
    let occurred_at = "2026-01-01T00:00:00.000000Z";
    let window = window.max(1);

    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for seq in 0..events {
        if in_flight.len() >= window {
            if let Some(ack) = in_flight.next().await {
                ack?;
            }
        }
        let event_id = uuid::Uuid::new_v4().to_string();
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", event_id.as_str());
        headers.insert(HEADER_EVENT_ID, event_id.as_str());
        headers.insert(HEADER_AGGREGATE_TYPE, AGGREGATE_TYPE);
        headers.insert(HEADER_AGGREGATE_ID, (seq % aggs).to_string().as_str());
        headers.insert(
            HEADER_AGGREGATE_VERSION,
            (seq / aggs + 1).to_string().as_str(),
        );
        headers.insert(HEADER_EVENT_TYPE, EVENT_TYPE);
        headers.insert(HEADER_OCCURRED_AT, occurred_at);
        let body = Bytes::from(payload(seq, aggs, &pad));
        let ack = js
            .publish_with_headers(subject.clone(), headers, body)
            .await?;
        in_flight.push(ack.into_future());
    }
    while let Some(ack) = in_flight.next().await {
        ack?;
    }
    Ok(started.elapsed())
}

/// Runs `relay-only` in a child process and returns its result line.
async fn run_child(
    database: &str,
    stream: &str,
    prefix: &str,
    events: u64,
    args: &RelayArgs,
) -> Result<serde_json::Value> {
    let mut command = child_command(database, stream, prefix, events, args.batch_size, 1)?;
    crate::common::child_json(&mut command, "relay-only").await
}

/// The `relay-only` command line: relay `events` from `database` to a stream
/// of `replicas` replicas.
pub(crate) fn child_command(
    database: &str,
    stream: &str,
    prefix: &str,
    events: u64,
    batch_size: usize,
    replicas: usize,
) -> Result<tokio::process::Command> {
    let timeout = 120 + events / 1_000;
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command
        .arg("relay-only")
        .args([
            "--database",
            database,
            "--stream",
            stream,
            "--prefix",
            prefix,
        ])
        .args(["--events", &events.to_string()])
        .args(["--batch-size", &batch_size.to_string()])
        .args(["--replicas", &replicas.to_string()])
        .args(["--timeout-secs", &timeout.to_string()]);
    Ok(command)
}

/// The hidden `relay-only` subcommand: run the relay until `events` are
/// published, then print elapsed time and peak RSS as one JSON line.
pub(crate) async fn relay_only(env: &Env, args: &RelayOnlyArgs) -> Result<()> {
    let pool = env.pool_for(&args.database, 6).await?;
    let client = env.nats().await?;
    let mut config = RelayConfig::new(StreamConfig::new(&args.stream, &args.prefix));
    config.batch_size = args.batch_size;
    config.stream.replicas = args.replicas;
    let rss_before = current_rss_kib();

    let started = Instant::now();
    let relay = Relay::new(pool.clone(), client, config).start().await?;
    let start_secs = started.elapsed().as_secs_f64();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut published = 0_i64;
    while published < args.events as i64 {
        if Instant::now() > deadline {
            let _ = relay.shutdown().await;
            return Err(format!(
                "relay published {published} of {} events in time",
                args.events
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        published = sqlx::query_scalar(
            "SELECT coalesce(sum(published), 0)::bigint FROM converge.relay_partitions",
        )
        .fetch_one(&pool)
        .await?;
    }
    let elapsed_secs = started.elapsed().as_secs_f64();
    relay.shutdown().await?;
    pool.close().await;
    emit(&json!({
        "elapsed_secs": elapsed_secs,
        "start_secs": start_secs,
        "published": published,
        "peak_rss_kib": peak_rss_kib(),
        "rss_before_relay_kib": rss_before,
    }));
    Ok(())
}
