//! `sweep`: how fast a sweep reconciles stale aggregates with a DB-only
//! reconciler, against the same conditional UPDATEs issued directly in
//! batches, and how much memory the sweep takes.
//!
//! One run on a fresh database: `orders(id bigint primary key, state text)`
//! filled with N rows in state `SHIPPED`. Then:
//!
//! - baseline: `UPDATE orders SET state = 'INVOICED' WHERE id = ANY($1) AND
//!   state = 'SHIPPED'` for batches of `--baseline-batch` (500) consecutive
//!   ids (keyset over the known ids, so without the key discovery the sweep
//!   has to do), one statement after the other on one connection; run before
//!   and after the sweeps, the faster of the two is the baseline;
//! - converge: for each `--batch-size` × `--concurrency`, a [`Sweeper`] with
//!   one sweep whose reconciler issues exactly one conditional UPDATE per key
//!   (`Outcome::Changed` when the row moved) over the keyset-paginated
//!   candidates `state = 'SHIPPED'`, run once with
//!   `handle.run("bench", None, TriggerKind::Operator)` in a child process
//!   (`sweep-only`) so that its peak RSS (`VmHWM`) is the sweep's alone. The
//!   run must report scanned = reconciled = N and leave no row `SHIPPED`;
//! - attribution, at the best setting: the candidate pages alone, the
//!   per-batch key leases alone (the lease grant and release statements,
//!   verbatim, a page per statement)
//!   and the N single-key UPDATEs alone at the same concurrency without the
//!   sweeper (the ceiling of any one-UPDATE-per-key reconciler); then those
//!   UPDATEs and the sweep again with `synchronous_commit = off` on their
//!   sessions (how much of a key's time is its commit's WAL flush; the
//!   baseline flushes once per 500 rows) and with `test_before_acquire(false)`
//!   (how much is the ping sqlx sends on every pool checkout).
//!
//! Between runs every row goes back to `SHIPPED` and `VACUUM ANALYZE orders`
//! runs (also once before the first baseline, after a full-table UPDATE, so
//! every run sees a table of the same shape).
//!
//! `--compare-rss` does this with 100k keys (every setting) and then 1M keys
//! (the best setting of the 100k run only) and compares the sweep's peak RSS.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use converge::handlers::{Context, Outcome, ReconcileError, Reconciler};
use converge::sweeper::{
    RunOutcome, Schedule, SqlCandidates, SweepConfig, Sweeper, Timing, TriggerKind,
};
use futures::stream::{self, StreamExt};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor, PgPool};

use crate::common::{
    current_rss_kib, emit, peak_rss_kib, round2, round3, with_cleanup, Env, Result, TempDb,
};

/// The ratio the issue asks for.
const TARGET_RATIO: f64 = 0.3;
/// The sweep's name (its lease and run history).
const SWEEP: &str = "bench";
/// The reconciler's name (its per-key leases).
const RECONCILER: &str = "bench-reconciler";
/// Connections beyond the concurrency in the sweep's pool.
const POOL_SLACK: u32 = 4;
/// Key counts of `--compare-rss`.
const RSS_SIZES: [u64; 2] = [100_000, 1_000_000];
/// The candidates: keyset pages of shipped orders, ordered by the bigint id
/// (the text column is aliased `key`, so `ORDER BY id` sorts numbers).
const CANDIDATES_SQL: &str = "SELECT id::text AS key FROM orders \
                              WHERE state = 'SHIPPED' AND ($1::text IS NULL OR id > $1::bigint) \
                              ORDER BY id LIMIT $2";
/// The reconciler's only statement.
const UPDATE_ONE_SQL: &str =
    "UPDATE orders SET state = 'INVOICED' WHERE id = $1::bigint AND state = 'SHIPPED'";
/// The baseline's statement.
const UPDATE_BATCH_SQL: &str =
    "UPDATE orders SET state = 'INVOICED' WHERE id = ANY($1) AND state = 'SHIPPED'";
/// The key-lease statements of `converge-handlers` (`lease.rs`), verbatim.
use converge::handlers::lease_sql::{ACQUIRE as LEASE_SQL, RELEASE as RELEASE_SQL};

/// Options of the `sweep` scenario.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SweepArgs {
    /// Stale aggregates (rows in state SHIPPED) to reconcile.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// `SweepConfig::batch_size` values to try, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "500,1000")]
    batch_size: Vec<i64>,
    /// `SweepConfig::concurrency` values to try, comma-separated; the sweep's
    /// pool gets 4 connections more than each.
    #[arg(long, value_delimiter = ',', default_value = "8,16,32")]
    concurrency: Vec<usize>,
    /// Ids per UPDATE of the baseline.
    #[arg(long, default_value_t = 500)]
    baseline_batch: usize,
    /// Run with 100k and then 1M keys and compare the sweep's peak RSS
    /// (ignores `--keys`; the 1M run uses the 100k run's best setting).
    #[arg(long)]
    compare_rss: bool,
    /// Let the reconciler take each page in one statement
    /// (`Reconciler::reconcile_batch`) instead of one UPDATE per key.
    #[arg(long)]
    batch_reconciler: bool,
}

/// Set by `--batch-reconciler`; handed to the child processes.
static BATCH_RECONCILER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// The variable that tells a `sweep-only` child to use the batch form.
const BATCH_ENV: &str = "CONVERGE_BENCH_BATCH_RECONCILER";

/// Options of the hidden `sweep-only` subcommand (the sweep's own process).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SweepOnlyArgs {
    /// Database (on `DATABASE_URL`'s server) whose `orders` are filled.
    #[arg(long)]
    database: String,
    /// Rows expected in state SHIPPED.
    #[arg(long)]
    keys: u64,
    /// `SweepConfig::batch_size`.
    #[arg(long, default_value_t = 500)]
    batch_size: i64,
    /// `SweepConfig::concurrency`.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// The sweep's pool: as configured, or an attribution variant.
    #[arg(long, value_enum, default_value_t = PoolVariant::Default)]
    pool: PoolVariant,
}

/// How the pool of an attribution run differs from the default one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PoolVariant {
    /// sqlx defaults (a connection is pinged when taken from the idle set).
    Default,
    /// Sessions with `synchronous_commit = off`: commits do not wait for the
    /// WAL flush (the baseline flushes once per batch).
    AsyncCommit,
    /// `test_before_acquire(false)`: no ping round trip per checkout.
    NoPing,
}

impl PoolVariant {
    /// The variants measured in the attribution, besides the default.
    const ATTRIBUTION: [PoolVariant; 2] = [PoolVariant::AsyncCommit, PoolVariant::NoPing];

    fn label(self) -> &'static str {
        match self {
            PoolVariant::Default => "default",
            PoolVariant::AsyncCommit => "async-commit",
            PoolVariant::NoPing => "no-ping",
        }
    }

    /// A pool of `size` connections to `database`, of this variant.
    async fn pool(self, env: &Env, database: &str, size: u32) -> Result<PgPool> {
        let mut options = env.options_for(database)?;
        if self == PoolVariant::AsyncCommit {
            options = options.options([("synchronous_commit", "off")]);
        }
        Ok(PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(Duration::from_secs(30))
            .test_before_acquire(self != PoolVariant::NoPing)
            .connect_with(options)
            .await?)
    }
}

/// The per-key UPDATEs alone and the sweep, with one pool variant.
#[derive(Debug, Clone)]
struct VariantRun {
    variant: PoolVariant,
    per_key_updates_secs: f64,
    sweep: SweepRun,
}

/// One sweep run, as the child reported it.
#[derive(Debug, Clone)]
struct SweepRun {
    batch_size: i64,
    concurrency: usize,
    secs: f64,
    child: serde_json::Value,
}

impl SweepRun {
    fn rate(&self, keys: u64) -> f64 {
        keys as f64 / self.secs
    }

    fn peak_rss_kib(&self) -> Option<u64> {
        self.child.get("peak_rss_kib").and_then(|v| v.as_u64())
    }

    fn child_f64(&self, key: &str) -> f64 {
        self.child
            .get(key)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or_default()
    }

    fn json(&self, keys: u64, baseline_rate: f64) -> serde_json::Value {
        let updates = self.child_f64("update_secs_total");
        let acquires = self.child_f64("acquire_secs_total");
        json!({
            "batch_size": self.batch_size,
            "concurrency": self.concurrency,
            "pool_size": self.concurrency as u32 + POOL_SLACK,
            "keys_per_sec": round2(self.rate(keys)),
            "ratio": round3(self.rate(keys) / baseline_rate),
            "secs": round3(self.secs),
            "us_per_key": round2(self.secs * 1e6 / keys as f64),
            "update_round_trip_us_mean": round2(updates * 1e6 / keys as f64),
            "checkout_us_mean": round2(acquires * 1e6 / keys as f64),
            "slots_busy_in_update": round3(updates / (self.secs * self.concurrency as f64)),
            "sweep_process_cpu_us_per_key": round2(self.child_f64("cpu_secs") * 1e6 / keys as f64),
            "peak_rss_kib": self.peak_rss_kib(),
            "rss_before_sweep_kib": self.child.get("rss_before_sweep_kib"),
            "start_secs": self.child.get("start_secs"),
            "status": self.child.get("status"),
            "scanned": self.child.get("scanned"),
            "reconciled": self.child.get("reconciled"),
        })
    }
}

/// The pieces of a sweep measured alone, at one setting. Its
/// `sweeper_overhead_us_per_key` is the sweep's time per key less those of
/// the pieces measured apart; on a busy machine it can come out negative.
#[derive(Debug, Clone)]
struct Attribution {
    batch_size: i64,
    concurrency: usize,
    pages_secs: f64,
    locks_secs: f64,
    per_key_updates_secs: f64,
    /// The same single-key UPDATEs and the same sweep with other pools.
    variants: Vec<VariantRun>,
}

impl Attribution {
    fn json(&self, keys: u64, sweep_secs: f64, baseline_rate: f64) -> serde_json::Value {
        let us = |secs: f64| round2(secs * 1e6 / keys as f64);
        json!({
            "batch_size": self.batch_size,
            "concurrency": self.concurrency,
            "sweep_us_per_key": us(sweep_secs),
            "candidate_pages_us_per_key": us(self.pages_secs),
            "batch_locks_us_per_key": us(self.locks_secs),
            "per_key_updates_alone_us_per_key": us(self.per_key_updates_secs),
            "per_key_updates_alone_per_sec": round2(keys as f64 / self.per_key_updates_secs),
            "pool_variants": self.variants.iter().map(|v| json!({
                "pool": v.variant.label(),
                "per_key_updates_alone_us_per_key": us(v.per_key_updates_secs),
                "per_key_updates_alone_per_sec": round2(keys as f64 / v.per_key_updates_secs),
                "sweep_us_per_key": us(v.sweep.secs),
                "sweep_keys_per_sec": round2(v.sweep.rate(keys)),
                "sweep_ratio": round3(v.sweep.rate(keys) / baseline_rate),
                "sweep_peak_rss_kib": v.sweep.peak_rss_kib(),
                "sweep_update_round_trip_us_mean":
                    round2(v.sweep.child_f64("update_secs_total") * 1e6 / keys as f64),
                "sweep_checkout_us_mean":
                    round2(v.sweep.child_f64("acquire_secs_total") * 1e6 / keys as f64),
                "sweep_process_cpu_us_per_key":
                    round2(v.sweep.child_f64("cpu_secs") * 1e6 / keys as f64),
            })).collect::<Vec<_>>(),
            "sweeper_overhead_us_per_key":
                us(sweep_secs - self.per_key_updates_secs - self.pages_secs - self.locks_secs),
        })
    }
}

/// What one size measured.
#[derive(Debug)]
struct SizeResult {
    keys: u64,
    fill_secs: f64,
    baseline_secs: Vec<f64>,
    sweeps: Vec<SweepRun>,
    attribution: Option<Attribution>,
}

impl SizeResult {
    fn baseline_rate(&self) -> f64 {
        let best = self
            .baseline_secs
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        self.keys as f64 / best
    }

    fn best(&self) -> &SweepRun {
        self.sweeps
            .iter()
            .min_by(|a, b| a.secs.total_cmp(&b.secs))
            .expect("at least one sweep run")
    }

    fn json(&self) -> serde_json::Value {
        let best = self.best();
        let baseline = self.baseline_rate();
        let rate = best.rate(self.keys);
        json!({
            "keys": self.keys,
            "unit": "keys/s",
            "rate": round2(rate),
            "baseline_rate": round2(baseline),
            "ratio": round3(rate / baseline),
            "target_ratio": TARGET_RATIO,
            "meets_target": rate / baseline >= TARGET_RATIO,
            "best_batch_size": best.batch_size,
            "best_concurrency": best.concurrency,
            "peak_rss_kib": best.peak_rss_kib(),
            "sweep_secs": round3(best.secs),
            "baseline_rows_per_sec_each":
                self.baseline_secs.iter().map(|s| round2(self.keys as f64 / s)).collect::<Vec<_>>(),
            "baseline_batch_secs_each":
                self.baseline_secs.iter().map(|s| round3(*s)).collect::<Vec<_>>(),
            "fill_secs": round3(self.fill_secs),
            "settings": self.sweeps.iter().map(|s| s.json(self.keys, baseline)).collect::<Vec<_>>(),
            "attribution": self.attribution.as_ref().map(|a| a.json(self.keys, best.secs, baseline)),
        })
    }
}

/// Runs the `sweep` scenario.
pub(crate) async fn run(env: &Env, args: &SweepArgs) -> Result<()> {
    BATCH_RECONCILER.store(args.batch_reconciler, Ordering::Relaxed);
    if args.batch_size.iter().any(|b| *b < 1)
        || args.concurrency.contains(&0)
        || args.batch_size.is_empty()
        || args.concurrency.is_empty()
        || args.baseline_batch == 0
    {
        return Err("batch sizes, concurrencies and --baseline-batch must be positive".into());
    }
    let settings: Vec<(i64, usize)> = args
        .batch_size
        .iter()
        .flat_map(|b| args.concurrency.iter().map(move |c| (*b, *c)))
        .collect();
    let mut results: Vec<SizeResult> = Vec::new();
    if args.compare_rss {
        let first = run_size(env, args, RSS_SIZES[0], &settings, true).await?;
        report_size(&first);
        let best = (first.best().batch_size, first.best().concurrency);
        results.push(first);
        let second = run_size(env, args, RSS_SIZES[1], &[best], false).await?;
        report_size(&second);
        results.push(second);
    } else if args.keys == 0 {
        return Err("--keys must be positive".into());
    } else {
        let only = run_size(env, args, args.keys, &settings, true).await?;
        report_size(&only);
        results.push(only);
    }

    let last = results.last().expect("at least one size");
    let mut result = last.json();
    let object = result.as_object_mut().expect("an object");
    if args.compare_rss {
        let first = &results[0];
        // The same setting at both sizes.
        let same = first
            .sweeps
            .iter()
            .find(|s| {
                s.batch_size == last.best().batch_size && s.concurrency == last.best().concurrency
            })
            .expect("the 1M setting was run at 100k");
        let (a, b) = (same.peak_rss_kib(), last.best().peak_rss_kib());
        let growth = match (a, b) {
            (Some(a), Some(b)) if a > 0 => Some(round3(b as f64 / a as f64)),
            _ => None,
        };
        println!(
            "sweep peak RSS (batch {}, concurrency {}): {} KiB at {} keys, {} KiB at {} keys (x{})",
            same.batch_size,
            same.concurrency,
            fmt_kib(a),
            first.keys,
            fmt_kib(b),
            last.keys,
            growth.map_or("?".into(), |g| g.to_string()),
        );
        object.insert("scenario".into(), json!("sweep-rss"));
        object.insert("reconciler".into(), json!(reconciler_label()));
        object.insert("peak_rss_growth".into(), json!(growth));
        object.insert(
            "peak_rss_kib_by_keys".into(),
            json!({ first.keys.to_string(): a, last.keys.to_string(): b }),
        );
        object.insert(
            "runs".into(),
            results.iter().map(SizeResult::json).collect(),
        );
    } else {
        object.insert("scenario".into(), json!("sweep"));
        object.insert("reconciler".into(), json!(reconciler_label()));
    }
    object.insert("baseline_batch".into(), json!(args.baseline_batch));
    object.insert("bench_process_peak_rss_kib".into(), json!(peak_rss_kib()));
    emit(&result);
    Ok(())
}

/// Prints the human summary of one size.
fn report_size(r: &SizeResult) {
    let baseline = r.baseline_rate();
    println!(
        "sweep  {:>8} keys: baseline (batched UPDATEs of the same rows) {:>9.0} rows/s \
         (runs: {})",
        r.keys,
        baseline,
        r.baseline_secs
            .iter()
            .map(|s| format!("{:.0}", r.keys as f64 / s))
            .collect::<Vec<_>>()
            .join(", "),
    );
    for s in &r.sweeps {
        println!(
            "  batch {:>5} concurrency {:>3}: {:>9.0} keys/s ({:.2} s, {:.1} µs/key), ratio {:.3}, \
             checkout {:.0} µs + UPDATE {:.0} µs mean, sweep process CPU {:.1} µs/key, \
             peak RSS {} KiB",
            s.batch_size,
            s.concurrency,
            s.rate(r.keys),
            s.secs,
            s.secs * 1e6 / r.keys as f64,
            s.rate(r.keys) / baseline,
            s.child_f64("acquire_secs_total") * 1e6 / r.keys as f64,
            s.child_f64("update_secs_total") * 1e6 / r.keys as f64,
            s.child_f64("cpu_secs") * 1e6 / r.keys as f64,
            fmt_kib(s.peak_rss_kib()),
        );
    }
    let best = r.best();
    let ratio = best.rate(r.keys) / baseline;
    let verdict = if ratio >= TARGET_RATIO {
        "met"
    } else {
        "missed"
    };
    println!(
        "  best: batch {} concurrency {}: {:.0} keys/s, ratio {:.3} (target >= {TARGET_RATIO}: {})",
        best.batch_size,
        best.concurrency,
        best.rate(r.keys),
        ratio,
        verdict,
    );
    if let Some(a) = &r.attribution {
        let us = |secs: f64| secs * 1e6 / r.keys as f64;
        println!(
            "  per key at that setting: sweep {:.1} µs; alone: the {} single-key UPDATEs at \
             concurrency {} {:.1} µs ({:.0}/s), candidate pages {:.2} µs, batch locks {:.2} µs",
            us(best.secs),
            r.keys,
            a.concurrency,
            us(a.per_key_updates_secs),
            r.keys as f64 / a.per_key_updates_secs,
            us(a.pages_secs),
            us(a.locks_secs),
        );
        for v in &a.variants {
            println!(
                "  pool {}: the single-key UPDATEs alone {:.1} µs ({:.0}/s); the sweep {:.1} µs \
                 ({:.0} keys/s, ratio {:.3}; checkout {:.0} µs + UPDATE {:.0} µs mean)",
                v.variant.label(),
                us(v.per_key_updates_secs),
                r.keys as f64 / v.per_key_updates_secs,
                us(v.sweep.secs),
                v.sweep.rate(r.keys),
                v.sweep.rate(r.keys) / baseline,
                v.sweep.child_f64("acquire_secs_total") * 1e6 / r.keys as f64,
                v.sweep.child_f64("update_secs_total") * 1e6 / r.keys as f64,
            );
        }
    }
}

fn fmt_kib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "?".into(), |k| k.to_string())
}

/// Fill, baselines, sweeps at every setting and (optionally) attribution, on
/// one fresh database.
async fn run_size(
    env: &Env,
    args: &SweepArgs,
    keys: u64,
    settings: &[(i64, usize)],
    attribute: bool,
) -> Result<SizeResult> {
    let db = TempDb::create(env).await?;
    let database = db.name.clone();
    let body = async {
        let max_concurrency = settings.iter().map(|s| s.1).max().unwrap_or(1);
        let pool = env
            .pool_for(&database, (max_concurrency as u32).max(2))
            .await?;
        converge::migrate(&pool).await?;

        eprintln!("[sweep {keys}] filling orders of {database}");
        let fill_secs = fill(&pool, keys).await?.as_secs_f64();

        let mut baseline_secs = Vec::new();
        eprintln!(
            "[sweep {keys}] baseline: batched UPDATEs of {} ids",
            args.baseline_batch
        );
        baseline_secs.push(baseline(&pool, keys, args.baseline_batch).await?);
        reset(&pool, keys).await?;

        let mut sweeps = Vec::new();
        for &(batch_size, concurrency) in settings {
            eprintln!(
                "[sweep {keys}] sweep in a child process: batch {batch_size}, concurrency {concurrency}"
            );
            wait_for_lease(&pool).await?;
            let child = run_child(
                &database,
                keys,
                batch_size,
                concurrency,
                PoolVariant::Default,
            )
            .await?;
            expect_none_shipped(&pool).await?;
            sweeps.push(SweepRun {
                batch_size,
                concurrency,
                secs: child_secs(&child)?,
                child,
            });
            reset(&pool, keys).await?;
        }

        eprintln!("[sweep {keys}] baseline again");
        baseline_secs.push(baseline(&pool, keys, args.baseline_batch).await?);
        reset(&pool, keys).await?;

        let mut result = SizeResult {
            keys,
            fill_secs,
            baseline_secs,
            sweeps,
            attribution: None,
        };
        if attribute {
            let (batch_size, concurrency) = {
                let best = result.best();
                (best.batch_size, best.concurrency)
            };
            eprintln!(
                "[sweep {keys}] attribution at batch {batch_size}, concurrency {concurrency}"
            );
            let pages_secs = candidate_pages(&pool, keys, batch_size).await?;
            let locks_secs = batch_locks(&pool, keys, batch_size).await?;
            let per_key_updates_secs = per_key_updates(&pool, keys, concurrency).await?;
            reset(&pool, keys).await?;
            let mut variants = Vec::new();
            for variant in PoolVariant::ATTRIBUTION {
                eprintln!(
                    "[sweep {keys}] pool {}: updates alone, sweep",
                    variant.label()
                );
                let other = variant.pool(env, &database, concurrency as u32).await?;
                let per_key_updates_secs = per_key_updates(&other, keys, concurrency).await?;
                other.close().await;
                reset(&pool, keys).await?;
                wait_for_lease(&pool).await?;
                let child = run_child(&database, keys, batch_size, concurrency, variant).await?;
                expect_none_shipped(&pool).await?;
                reset(&pool, keys).await?;
                variants.push(VariantRun {
                    variant,
                    per_key_updates_secs,
                    sweep: SweepRun {
                        batch_size,
                        concurrency,
                        secs: child_secs(&child)?,
                        child,
                    },
                });
            }
            result.attribution = Some(Attribution {
                batch_size,
                concurrency,
                pages_secs,
                locks_secs,
                per_key_updates_secs,
                variants,
            });
        }
        pool.close().await;
        Ok(result)
    };
    with_cleanup(body, db.drop_db()).await
}

/// Creates and fills `orders` with ids 1..=`keys`, all SHIPPED; then updates
/// every row once and vacuums, so the table has the shape it has after a reset.
async fn fill(pool: &PgPool, keys: u64) -> Result<Duration> {
    let started = Instant::now();
    pool.execute("CREATE TABLE orders (id bigint PRIMARY KEY, state text NOT NULL)")
        .await?;
    sqlx::query(
        "INSERT INTO orders (id, state) SELECT g, 'SHIPPED' FROM generate_series(1, $1::bigint) AS g",
    )
    .bind(keys as i64)
    .execute(pool)
    .await?;
    let elapsed = started.elapsed();
    pool.execute("UPDATE orders SET state = 'SHIPPED'").await?;
    pool.execute("VACUUM ANALYZE orders").await?;
    Ok(elapsed)
}

/// Puts every row back to SHIPPED and vacuums.
async fn reset(pool: &PgPool, keys: u64) -> Result<()> {
    pool.execute("UPDATE orders SET state = 'SHIPPED' WHERE state <> 'SHIPPED'")
        .await?;
    pool.execute("VACUUM ANALYZE orders").await?;
    let shipped: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE state = 'SHIPPED'")
        .fetch_one(pool)
        .await?;
    if shipped != keys as i64 {
        return Err(format!("reset left {shipped} rows SHIPPED, not {keys}").into());
    }
    Ok(())
}

/// Fails unless every row has left SHIPPED.
async fn expect_none_shipped(pool: &PgPool) -> Result<()> {
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE state = 'SHIPPED'")
        .fetch_one(pool)
        .await?;
    if left != 0 {
        return Err(format!("{left} rows are still SHIPPED").into());
    }
    Ok(())
}

/// The baseline: the conditional UPDATE for `batch` consecutive ids at a
/// time, on one connection; returns seconds.
async fn baseline(pool: &PgPool, keys: u64, batch: usize) -> Result<f64> {
    let mut conn = pool.acquire().await?;
    let started = Instant::now();
    let mut moved = 0;
    let mut after = 0_i64;
    while after < keys as i64 {
        let last = (after + batch as i64).min(keys as i64);
        let ids: Vec<i64> = (after + 1..=last).collect();
        moved += sqlx::query(UPDATE_BATCH_SQL)
            .bind(&ids)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        after = last;
    }
    let secs = started.elapsed().as_secs_f64();
    if moved != keys {
        return Err(format!("baseline moved {moved} rows, not {keys}").into());
    }
    drop(conn);
    expect_none_shipped(pool).await?;
    Ok(secs)
}

/// Waits until the sweep's lease is free (`lock_at_least_for` keeps it for a
/// second after the previous run).
async fn wait_for_lease(pool: &PgPool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let held: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM converge.leases WHERE name = $1 AND lock_until > now())",
        )
        .bind(SWEEP)
        .fetch_one(pool)
        .await?;
        if !held {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the sweep's lease stayed held".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Attribution: every candidate page of the sweep, read alone; returns seconds.
async fn candidate_pages(pool: &PgPool, keys: u64, batch_size: i64) -> Result<f64> {
    let started = Instant::now();
    let mut after: Option<String> = None;
    let mut seen = 0_u64;
    loop {
        let page: Vec<String> = sqlx::query_scalar(CANDIDATES_SQL)
            .bind(after.as_deref())
            .bind(batch_size)
            .fetch_all(pool)
            .await?;
        seen += page.len() as u64;
        let full = page.len() as i64 == batch_size;
        after = page.last().cloned();
        if !full {
            break;
        }
    }
    if seen != keys {
        return Err(format!("candidate pages listed {seen} keys, not {keys}").into());
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Attribution: the sweep's per-page key leases granted and released alone,
/// one page after the other on one connection; returns seconds.
async fn batch_locks(pool: &PgPool, keys: u64, batch_size: i64) -> Result<f64> {
    let mut conn = pool.acquire().await?;
    let started = Instant::now();
    let mut from = 1_u64;
    while from <= keys {
        let to = (from + batch_size as u64 - 1).min(keys);
        let batch: Vec<String> = (from..=to).map(|k| k.to_string()).collect();
        let names = vec![RECONCILER; batch.len()];
        let granted: Vec<(String, String, i64)> = sqlx::query_as(LEASE_SQL)
            .bind(&names)
            .bind(&batch)
            .bind("bench")
            .bind(20_000_i64)
            .fetch_all(&mut *conn)
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
            .execute(&mut *conn)
            .await?;
        from = to + 1;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Attribution: the reconciler's N single-key UPDATEs alone, `concurrency` at
/// a time, without the sweeper; returns seconds.
async fn per_key_updates(pool: &PgPool, keys: u64, concurrency: usize) -> Result<f64> {
    warm(pool, concurrency as u32).await?;
    let started = Instant::now();
    let mut moved = 0;
    let mut results = stream::iter(1..=keys)
        .map(|k| async move {
            sqlx::query(UPDATE_ONE_SQL)
                .bind(k.to_string())
                .execute(pool)
                .await
        })
        .buffer_unordered(concurrency);
    while let Some(done) = results.next().await {
        moved += done?.rows_affected();
    }
    let secs = started.elapsed().as_secs_f64();
    if moved != keys {
        return Err(format!("per-key updates moved {moved} rows, not {keys}").into());
    }
    Ok(secs)
}

/// Opens `size` connections of `pool` so none is opened while timing.
async fn warm(pool: &PgPool, size: u32) -> Result<()> {
    let mut held = Vec::with_capacity(size as usize);
    for _ in 0..size {
        held.push(pool.acquire().await?);
    }
    Ok(())
}

/// The sweep's time from a child's result line.
fn child_secs(child: &serde_json::Value) -> Result<f64> {
    Ok(child
        .get("elapsed_secs")
        .and_then(serde_json::Value::as_f64)
        .ok_or("child result lacks elapsed_secs")?)
}

/// Runs `sweep-only` in a child process and returns its result line.
async fn run_child(
    database: &str,
    keys: u64,
    batch_size: i64,
    concurrency: usize,
    pool: PoolVariant,
) -> Result<serde_json::Value> {
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command
        .arg("sweep-only")
        .args(["--database", database])
        .args(["--keys", &keys.to_string()])
        .args(["--batch-size", &batch_size.to_string()])
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--pool", pool.label()]);
    if BATCH_RECONCILER.load(Ordering::Relaxed) {
        command.env(BATCH_ENV, "1");
    }
    crate::common::child_json(&mut command, "sweep-only").await
}

fn reconciler_label() -> &'static str {
    if BATCH_RECONCILER.load(Ordering::Relaxed) {
        "batch: one conditional UPDATE per page"
    } else {
        "per key: one conditional UPDATE per key"
    }
}

/// The DB-only reconciler: one conditional UPDATE per key, timed; with
/// `batch`, one conditional UPDATE per page through `reconcile_batch`.
#[derive(Debug, Default)]
struct Invoicing {
    /// Take pages in one statement.
    batch: bool,
    /// Nanoseconds spent checking a connection out of the pool (a wait for a
    /// free one, then sqlx's ping unless disabled), summed over keys.
    acquire_nanos: AtomicU64,
    /// Nanoseconds spent in the UPDATE round trip, summed over keys.
    update_nanos: AtomicU64,
}

impl Reconciler for Invoicing {
    async fn reconcile_batch(
        &self,
        ctx: &Context,
        keys: &[String],
    ) -> Option<Vec<Result<Outcome, ReconcileError>>> {
        if !self.batch {
            return None;
        }
        let moved: Result<Vec<String>, sqlx::Error> = sqlx::query_scalar(
            "UPDATE orders SET state = 'INVOICED' \
             WHERE id = ANY($1::text[]::bigint[]) AND state = 'SHIPPED' RETURNING id::text",
        )
        .bind(keys)
        .fetch_all(ctx.pool())
        .await;
        Some(match moved {
            Ok(moved) => {
                let moved: std::collections::HashSet<String> = moved.into_iter().collect();
                keys.iter()
                    .map(|k| {
                        Ok(if moved.contains(k) {
                            Outcome::Changed
                        } else {
                            Outcome::Unchanged
                        })
                    })
                    .collect()
            }
            Err(e) => {
                let e = ReconcileError::from(e);
                keys.iter()
                    .map(|_| Err(ReconcileError::retryable(e.to_string())))
                    .collect()
            }
        })
    }

    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let asked = Instant::now();
        let mut conn = ctx.pool().acquire().await?;
        let got = Instant::now();
        let moved = sqlx::query(UPDATE_ONE_SQL)
            .bind(key)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        let done = Instant::now();
        self.acquire_nanos
            .fetch_add((got - asked).as_nanos() as u64, Ordering::Relaxed);
        self.update_nanos
            .fetch_add((done - got).as_nanos() as u64, Ordering::Relaxed);
        Ok(if moved == 1 {
            Outcome::Changed
        } else {
            Outcome::Unchanged
        })
    }
}

/// Clock ticks per second of `/proc/self/stat` (`CLK_TCK`, 100 on Linux).
const CLOCK_TICKS: f64 = 100.0;

/// CPU seconds (user + system) this process has used so far.
fn cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) and its `)`:
    // state is the 3rd field of the line, utime the 14th, stime the 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / CLOCK_TICKS)
}

/// The hidden `sweep-only` subcommand: one operator-triggered run of the
/// sweep over `orders`, then elapsed time, counts and peak RSS as one JSON line.
pub(crate) async fn sweep_only(env: &Env, args: &SweepOnlyArgs) -> Result<()> {
    let size = args.concurrency as u32 + POOL_SLACK;
    let pool = args.pool.pool(env, &args.database, size).await?;
    warm(&pool, size).await?;
    let reconciler = Arc::new(Invoicing {
        batch: std::env::var_os(BATCH_ENV).is_some(),
        ..Default::default()
    });
    let mut config = SweepConfig::new(
        SWEEP,
        RECONCILER,
        Timing::new(Schedule::FixedRate(Duration::from_secs(3600))),
    );
    config.batch_size = args.batch_size;
    config.concurrency = args.concurrency;
    let rss_before = current_rss_kib();

    let started = Instant::now();
    let handle = Sweeper::new(pool.clone())
        .instance_name(format!("bench-{}", std::process::id()))
        .sweep(
            config,
            SqlCandidates::new(CANDIDATES_SQL),
            reconciler.clone(),
        )
        .start()
        .await?;
    let start_secs = started.elapsed().as_secs_f64();

    let cpu_before = cpu_secs();
    let started = Instant::now();
    let outcome = handle.run(SWEEP, None, TriggerKind::Operator).await?;
    let elapsed_secs = started.elapsed().as_secs_f64();
    let cpu_run = cpu_secs()
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    handle.shutdown().await?;

    let summary = match outcome {
        RunOutcome::Ran(summary) => summary,
        other => return Err(format!("the sweep did not run: {other:?}").into()),
    };
    let c = &summary.counts;
    if c.scanned != args.keys || c.reconciled != args.keys || c.failed != 0 || c.busy != 0 {
        return Err(format!(
            "run {} ({}): scanned {}, reconciled {}, converged {}, failed {}, busy {}; \
             expected {} scanned and reconciled",
            summary.run_id,
            summary.status.as_str(),
            c.scanned,
            c.reconciled,
            c.converged,
            c.failed,
            c.busy,
            args.keys
        )
        .into());
    }
    expect_none_shipped(&pool).await?;
    pool.close().await;
    emit(&json!({
        "elapsed_secs": elapsed_secs,
        "start_secs": start_secs,
        "run_id": summary.run_id,
        "status": summary.status.as_str(),
        "pool": args.pool.label(),
        "scanned": c.scanned,
        "reconciled": c.reconciled,
        "converged": c.converged,
        "acquire_secs_total": reconciler.acquire_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        "update_secs_total": reconciler.update_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        "cpu_secs": cpu_run,
        "peak_rss_kib": peak_rss_kib(),
        "rss_before_sweep_kib": rss_before,
    }));
    Ok(())
}
