//! The sweep measured in a child process of its own (`sweep-only`): its
//! reconciler and its CPU time.

use super::*;

pub(super) fn reconciler_label() -> &'static str {
    if BATCH_RECONCILER.load(Ordering::Relaxed) {
        "batch: one conditional UPDATE per page"
    } else {
        "per key: one conditional UPDATE per key"
    }
}

/// The DB-only reconciler: one conditional UPDATE per key, timed; with
/// `batch`, one conditional UPDATE per page through `reconcile_batch`.
#[derive(Debug, Default)]
pub(super) struct Invoicing {
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
pub(super) const CLOCK_TICKS: f64 = 100.0;

/// CPU seconds (user + system) this process has used so far.
pub(super) fn cpu_secs() -> Option<f64> {
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
