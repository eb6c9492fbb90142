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

mod baselines;
mod child;
mod results;

use baselines::*;
pub(crate) use child::sweep_only;
use child::*;
use results::*;

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
