//! `retention`: what retention costs at 1M and at 10M stored events, and the
//! relay's throughput while it runs. Both must stay flat as the table grows.
//!
//! One run per size N, on a fresh database: N published events (their
//! partitions' cursors at the end), of which the first `--expired` are older
//! than the retention period and the rest recent; then `--fresh` unpublished
//! events. The raw baseline publishes `--fresh` messages of the same shape to a
//! fresh stream. Then a relay with `Retention::For(1 h)` starts: it publishes
//! the fresh events while its cleanup deletes the expired ones. Measured: the
//! relay's events/s (against the baseline), the cleanup's deleted rows/s
//! (`converge.retention_positions.deleted`, sampled), and afterwards one idle
//! retention pass — nothing left to delete — over the N rows that remain.

use std::time::{Duration, Instant};

use converge::{Relay, RelayConfig, Retention, StreamConfig};
use serde_json::json;
use sqlx::PgPool;

use crate::common::{
    delete_streams, emit, random_suffix, round2, round3, stream_messages, with_cleanup, Env,
    Result, TempDb,
};
use crate::relay::{aggregates, fill_range, publish_raw};

/// The retention period of the run.
const PERIOD: Duration = Duration::from_secs(3600);
/// The expired events' age.
const EXPIRED_AGE: Duration = Duration::from_secs(86_400);

/// Options of the `retention` scenario.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RetentionArgs {
    /// Stored (published) events per run, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000_000_u64, 10_000_000])]
    sizes: Vec<u64>,
    /// How many of them are older than the retention period.
    #[arg(long, default_value_t = 500_000)]
    expired: u64,
    /// Unpublished events the relay publishes while the cleanup runs.
    #[arg(long, default_value_t = 200_000)]
    fresh: u64,
    /// `RelayConfig::cleanup_batch`.
    #[arg(long, default_value_t = 1_000)]
    cleanup_batch: usize,
    /// Acknowledgements in flight for the raw-publish baseline.
    #[arg(long, default_value_t = 256)]
    window: usize,
}

#[derive(Debug)]
struct RunResult {
    stored: u64,
    expired: u64,
    fresh: u64,
    fill_secs: f64,
    baseline_secs: f64,
    relay_secs: f64,
    cleanup_secs: f64,
    idle_pass_ms: f64,
    table_mib: f64,
}

impl RunResult {
    fn relay_rate(&self) -> f64 {
        self.fresh as f64 / self.relay_secs
    }
    fn baseline_rate(&self) -> f64 {
        self.fresh as f64 / self.baseline_secs
    }
    fn delete_rate(&self) -> f64 {
        self.expired as f64 / self.cleanup_secs
    }
    fn json(&self) -> serde_json::Value {
        json!({
            "stored": self.stored,
            "expired": self.expired,
            "fresh": self.fresh,
            "relay_events_per_sec": round2(self.relay_rate()),
            "baseline_msgs_per_sec": round2(self.baseline_rate()),
            "relay_ratio": round3(self.relay_rate() / self.baseline_rate()),
            "deleted_rows_per_sec": round2(self.delete_rate()),
            "cleanup_secs": round3(self.cleanup_secs),
            "idle_pass_ms": round3(self.idle_pass_ms),
            "fill_secs": round3(self.fill_secs),
            "table_mib": round2(self.table_mib),
        })
    }
}

/// Runs the `retention` scenario.
pub(crate) async fn run(env: &Env, args: &RetentionArgs) -> Result<()> {
    if args.sizes.is_empty() || args.sizes.iter().any(|n| *n < args.expired) {
        return Err("--sizes must each be at least --expired".into());
    }
    let mut runs = Vec::new();
    for &stored in &args.sizes {
        let run = run_one(env, args, stored).await?;
        println!(
            "retention {:>9} stored: relay {:>8.0} events/s (raw {:>8.0}, ratio {:.3}) while \
             cleanup deleted {} rows at {:>8.0} rows/s; idle pass {:.1} ms; table {:.0} MiB",
            run.stored,
            run.relay_rate(),
            run.baseline_rate(),
            run.relay_rate() / run.baseline_rate(),
            run.expired,
            run.delete_rate(),
            run.idle_pass_ms,
            run.table_mib,
        );
        runs.push(run);
    }
    let first = &runs[0];
    let last = runs.last().expect("a run");
    let flat = |a: f64, b: f64| round3(b / a);
    emit(&json!({
        "scenario": "retention",
        "unit": "rows/s",
        "rate": round2(last.delete_rate()),
        "delete_rate_growth": flat(first.delete_rate(), last.delete_rate()),
        "relay_ratio_growth": flat(
            first.relay_rate() / first.baseline_rate(),
            last.relay_rate() / last.baseline_rate()
        ),
        "idle_pass_growth": flat(first.idle_pass_ms, last.idle_pass_ms),
        "cleanup_batch": args.cleanup_batch,
        "runs": runs.iter().map(RunResult::json).collect::<Vec<_>>(),
    }));
    Ok(())
}

async fn run_one(env: &Env, args: &RetentionArgs, stored: u64) -> Result<RunResult> {
    let db = TempDb::create(env).await?;
    let database = db.name.clone();
    let client = env.nats().await?;
    let suffix = random_suffix();
    let relay_stream = format!("BENCH_RET_{suffix}");
    let relay_prefix = format!("bench_ret_{suffix}");
    let raw_stream = format!("BENCH_RETRAW_{suffix}");
    let raw_prefix = format!("bench_retraw_{suffix}");
    let streams = [relay_stream.clone(), raw_stream.clone()];
    let body = async {
        let pool = env.pool_for(&database, 8).await?;
        converge::migrate(&pool).await?;
        let aggs = aggregates(stored + args.fresh);
        eprintln!("[retention {stored}] filling {stored} published events");
        let started = Instant::now();
        fill_range(&pool, 0..args.expired, aggs, EXPIRED_AGE).await?;
        fill_range(&pool, args.expired..stored, aggs, Duration::ZERO).await?;
        mark_published(&pool).await?;
        fill_range(&pool, stored..stored + args.fresh, aggs, Duration::ZERO).await?;
        sqlx::query("VACUUM ANALYZE converge.outbox")
            .execute(&pool)
            .await?;
        let fill_secs = started.elapsed().as_secs_f64();

        eprintln!(
            "[retention {stored}] baseline: raw publish of {}",
            args.fresh
        );
        let baseline_secs = publish_raw(&client, &raw_stream, &raw_prefix, args.fresh, args.window)
            .await?
            .as_secs_f64();

        eprintln!("[retention {stored}] relay with retention");
        let mut config = RelayConfig::new(StreamConfig::new(&relay_stream, &relay_prefix));
        config.retention = Retention::For(PERIOD);
        config.cleanup_interval = Duration::from_millis(100);
        config.cleanup_batch = args.cleanup_batch;
        let started = Instant::now();
        let relay = Relay::new(pool.clone(), client.clone(), config)
            .start()
            .await?;
        let (mut relay_secs, mut cleanup_secs) = (None, None);
        let deadline = started + Duration::from_secs(1800);
        while relay_secs.is_none() || cleanup_secs.is_none() {
            if Instant::now() > deadline {
                let _ = relay.shutdown().await;
                return Err("the relay or the cleanup did not finish within 30 minutes".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            let (published, deleted): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT coalesce(sum(published), 0)::bigint FROM converge.relay_partitions), \
                        (SELECT coalesce(sum(deleted), 0)::bigint FROM converge.retention_positions)",
            )
            .fetch_one(&pool)
            .await?;
            let elapsed = started.elapsed().as_secs_f64();
            if relay_secs.is_none() && published >= args.fresh as i64 {
                relay_secs = Some(elapsed);
            }
            if cleanup_secs.is_none() && deleted >= args.expired as i64 {
                cleanup_secs = Some(elapsed);
            }
        }
        relay.shutdown().await?;
        let on_stream = stream_messages(&client, &relay_stream).await?;
        if on_stream != args.fresh {
            return Err(format!("relay stream holds {on_stream}, not {}", args.fresh).into());
        }

        // An idle pass: nothing expired is left, the table still holds the rest.
        let started = Instant::now();
        let deleted = Relay::retention_pass(&pool, PERIOD, args.cleanup_batch).await?;
        let idle_pass_ms = started.elapsed().as_secs_f64() * 1000.0;
        if deleted != 0 {
            return Err(format!("the idle pass deleted {deleted} rows").into());
        }
        let table_mib: f64 = sqlx::query_scalar(
            "SELECT pg_total_relation_size('converge.outbox')::float8 / 1048576",
        )
        .fetch_one(&pool)
        .await?;
        pool.close().await;
        Ok(RunResult {
            stored,
            expired: args.expired,
            fresh: args.fresh,
            fill_secs,
            baseline_secs,
            relay_secs: relay_secs.unwrap_or(f64::NAN),
            cleanup_secs: cleanup_secs.unwrap_or(f64::NAN),
            idle_pass_ms,
            table_mib,
        })
    };
    let cleanup = async {
        delete_streams(&client, &streams).await;
        db.drop_db().await
    };
    with_cleanup(body, cleanup).await
}

/// Moves every partition's cursor to its last event, as a relay that
/// published them all would have.
async fn mark_published(pool: &PgPool) -> Result<()> {
    sqlx::query(
        "UPDATE converge.relay_partitions p \
         SET cursor_tx_order = l.tx_order, cursor_id = l.id \
         FROM converge.relay_partitions q \
         CROSS JOIN LATERAL ( \
             SELECT tx_order, id FROM converge.outbox o WHERE o.partition = q.partition \
             ORDER BY tx_order DESC, id DESC LIMIT 1) l \
         WHERE p.partition = q.partition",
    )
    .execute(pool)
    .await?;
    Ok(())
}
