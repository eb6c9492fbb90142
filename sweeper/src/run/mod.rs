//! One run of a sweep: under the lease, through the candidates in bounded
//! pages, every key through the same reconciler as the event path.

use std::sync::Arc;
use std::time::Duration;

use converge_handlers::{Context, NamedReconciler, RateLimits, ReconcileError, RunResult};
use futures::future::BoxFuture;
use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::candidates::Candidates;
use crate::config::SweepConfig;
use crate::error::SweepError;
use crate::history::{RunCounts, RunOutcome, RunStatus, RunSummary, TriggerKind};
use crate::lease::Lease;
use crate::metrics as metrics_names;

mod settle;
use settle::{context, settle, RunRef};

/// Runs a batch of keys (the handlers' `run_keys`, type-erased).
pub(crate) type RunManyFn = Arc<
    dyn Fn(
            Context,
            Vec<String>,
            usize,
            CancellationToken,
        ) -> BoxFuture<'static, Vec<(String, RunResult)>>
        + Send
        + Sync,
>;
/// Gives up on one key (the handlers' `dead_letter_key`, type-erased).
pub(crate) type GiveUpFn = Arc<
    dyn Fn(
            Context,
            String,
            ReconcileError,
            u32,
        ) -> BoxFuture<'static, Result<Option<i64>, sqlx::Error>>
        + Send
        + Sync,
>;

/// Everything a sweep's runs need.
pub(crate) struct SweepShared {
    pub(crate) pool: PgPool,
    pub(crate) instance: String,
    pub(crate) limits: RateLimits,
    pub(crate) config: SweepConfig,
    pub(crate) candidates: Arc<dyn Candidates>,
    pub(crate) run: NamedReconciler,
    pub(crate) run_many: RunManyFn,
    pub(crate) give_up: GiveUpFn,
}

/// Why a run should stop before its end.
pub(crate) struct Stops {
    /// The process shuts down.
    pub(crate) shutdown: CancellationToken,
    /// A newer trigger replaces this run.
    pub(crate) supersede: CancellationToken,
}

/// Where the keys of a run come from.
enum Source {
    Given(std::vec::IntoIter<String>),
    Pages {
        after: Option<String>,
        exhausted: bool,
    },
}

impl Source {
    /// The next batch of at most `limit` keys; empty at the end.
    async fn next_batch(
        &mut self,
        s: &SweepShared,
        limit: i64,
    ) -> Result<Vec<String>, sqlx::Error> {
        match self {
            Source::Given(keys) => Ok(keys.by_ref().take(limit as usize).collect()),
            Source::Pages { after, exhausted } => {
                if *exhausted {
                    return Ok(Vec::new());
                }
                let keys = s.candidates.page(&s.pool, after.as_deref(), limit).await?;
                *exhausted = (keys.len() as i64) < limit;
                if let Some(last) = keys.last() {
                    *after = Some(last.clone());
                }
                Ok(keys)
            }
        }
    }

    fn cursor(&self) -> Option<&str> {
        match self {
            Source::Given(_) => None,
            Source::Pages { after, .. } => after.as_deref(),
        }
    }
}

/// Executes one run. `keys`: `None` visits every candidate (continuing where a
/// capped run stopped), `Some` exactly those keys. Records the run metrics.
pub(crate) async fn execute(
    s: &SweepShared,
    kind: TriggerKind,
    keys: Option<Vec<String>>,
    stops: &Stops,
) -> Result<RunOutcome, SweepError> {
    let started = Instant::now();
    let outcome = execute_run(s, kind, keys, stops).await;
    let status = match &outcome {
        Ok(RunOutcome::Ran(summary)) => Some(summary.status.as_str()),
        Ok(_) => None,
        Err(_) => Some("error"),
    };
    if let Some(status) = status {
        let sweep = s.config.name.clone();
        metrics::counter!(metrics_names::SWEEP_RUNS, "sweep" => sweep.clone(), "status" => status)
            .increment(1);
        metrics::histogram!(metrics_names::SWEEP_RUN_DURATION, "sweep" => sweep)
            .record(started.elapsed().as_secs_f64());
    }
    outcome
}

#[tracing::instrument(skip_all, fields(sweep = %s.config.name, trigger = kind.as_str(), run_id = tracing::field::Empty), err)]
async fn execute_run(
    s: &SweepShared,
    kind: TriggerKind,
    keys: Option<Vec<String>>,
    stops: &Stops,
) -> Result<RunOutcome, SweepError> {
    let cfg = &s.config;
    let Some(lease) = Lease::try_acquire(&s.pool, &cfg.name, &s.instance, &cfg.lease).await? else {
        tracing::debug!("sweep lease held by another instance");
        return Ok(RunOutcome::LeaseHeld);
    };
    let token = lease.token();
    let requested = keys.as_ref().map(|k| k.len() as i32);
    let mut source = match keys {
        Some(mut keys) => {
            // The same key twice in one batch would run concurrently with itself.
            let mut seen = std::collections::HashSet::new();
            keys.retain(|k| seen.insert(k.clone()));
            Source::Given(keys.into_iter())
        }
        None => {
            let resume: Option<String> = sqlx::query_scalar(
                "SELECT resume_after FROM converge.sweep_schedules WHERE sweep = $1",
            )
            .bind(&cfg.name)
            .fetch_optional(&s.pool)
            .await?
            .flatten();
            Source::Pages {
                after: resume,
                exhausted: false,
            }
        }
    };
    let run_id: i64 = sqlx::query_scalar(
        "INSERT INTO converge.sweep_runs (sweep, trigger, requested_keys, instance, lease_token) \
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(&cfg.name)
    .bind(kind.as_str())
    .bind(requested)
    .bind(&s.instance)
    .bind(token)
    .fetch_one(&s.pool)
    .await?;
    tracing::Span::current().record("run_id", run_id);

    // Heartbeats keep the lease while the run works; a lost lease stops it.
    let lease = Arc::new(Mutex::new(lease));
    let lost = CancellationToken::new();
    let mut heartbeat = AbortOnDrop(Some(tokio::spawn(heartbeat_loop(
        s.pool.clone(),
        lease.clone(),
        lost.clone(),
        cfg.lease.heartbeat_interval,
    ))));

    let started = Instant::now();
    let mut counts = RunCounts::default();
    let mut reported = RunCounts::default();
    let mut cap: Option<&'static str> = None;
    let mut error: Option<String> = None;
    // The cursor after the last page whose every key was run: what a run cut
    // short (superseded, shut down, capped) saves, so that repeated runs make
    // progress without skipping a key a cut page never started.
    let mut done_through: Option<String> = source.cursor().map(str::to_owned);
    // Set once a page leaves a key for the next run: the cursor stays before
    // that page for the rest of the run.
    let mut pinned = false;
    let status = loop {
        if stops.shutdown.is_cancelled() {
            break RunStatus::Interrupted;
        }
        if stops.supersede.is_cancelled() {
            break RunStatus::Superseded;
        }
        if lost.is_cancelled() || !lease.lock().await.locally_valid() {
            break RunStatus::LeaseLost;
        }
        if cfg
            .max_keys_per_run
            .is_some_and(|max| counts.scanned >= max)
        {
            cap = Some("max_keys");
            break RunStatus::StoppedEarly;
        }
        if cfg.max_run_time.is_some_and(|max| started.elapsed() >= max) {
            cap = Some("max_run_time");
            break RunStatus::StoppedEarly;
        }
        let room = cfg.max_keys_per_run.map_or(cfg.batch_size, |max| {
            cfg.batch_size.min((max - counts.scanned) as i64)
        });
        let batch = match source.next_batch(s, room).await {
            Ok(batch) if batch.is_empty() => break RunStatus::Completed,
            Ok(batch) => batch,
            Err(e) => {
                error = Some(format!("candidate query failed: {e}"));
                break RunStatus::Failed;
            }
        };
        // Stop starting keys on shutdown, replacement or a lost lease — the
        // moment the lease's local deadline passes, not at the next
        // heartbeat; keys already started finish (each under its key lease).
        let stop = stops.shutdown.child_token();
        let watch = {
            let (stop, supersede, lost, lease) = (
                stop.clone(),
                stops.supersede.clone(),
                lost.clone(),
                lease.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let deadline = lease.lock().await.deadline();
                    tokio::select! {
                        _ = supersede.cancelled() => return stop.cancel(),
                        _ = lost.cancelled() => return stop.cancel(),
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep_until(deadline) => {
                            if !lease.lock().await.locally_valid() {
                                // Lost for every purpose: no new key, no retry.
                                lost.cancel();
                                return stop.cancel();
                            }
                        }
                    }
                }
            })
        };
        let ctx = context(s, token, 1);
        let asked = batch.len();
        let results = (s.run_many)(ctx, batch, cfg.concurrency, stop.clone()).await;
        stop.cancel();
        let _ = watch.await;
        let whole_page = results.len() == asked;
        // The page's failing keys are retried side by side: one key's backoff
        // never holds up the others.
        counts.scanned += results.len() as u64;
        let run = &RunRef {
            id: run_id,
            token,
            lease_lost: &lost,
        };
        let settled: Vec<(RunCounts, bool)> = futures::stream::iter(results)
            .map(|(key, result)| async move {
                let mut mine = RunCounts::default();
                let left = settle(s, run, &key, result, &mut mine, stops).await;
                (mine, left)
            })
            .buffer_unordered(cfg.concurrency.max(1))
            .collect()
            .await;
        pinned |= !whole_page || settled.iter().any(|(_, left)| *left);
        if !pinned {
            done_through = source.cursor().map(str::to_owned);
        }
        for (c, _) in settled {
            counts.reconciled += c.reconciled;
            counts.converged += c.converged;
            counts.failed += c.failed;
            counts.busy += c.busy;
        }
        metrics_names::count_keys(&cfg.name, &mut reported, &counts);
        record_progress(&s.pool, run_id, &counts).await;
    };
    heartbeat.stop().await; // drops its handle on the lease
    let lease = Arc::try_unwrap(lease).map(Mutex::into_inner).ok();

    // Writes that matter are fenced by the token: a holder that lost its lease
    // moves no cursor. A completed pass starts the next from the beginning;
    // any other end (capped, superseded, interrupted, failed) keeps what was
    // done.
    if status != RunStatus::LeaseLost {
        if let Source::Pages { .. } = source {
            let resume = if status == RunStatus::Completed {
                None
            } else {
                done_through.as_deref()
            };
            sqlx::query(
                "UPDATE converge.sweep_schedules SET resume_after = $2, updated_at = now() \
                 WHERE sweep = $1 AND EXISTS (SELECT 1 FROM converge.leases \
                     WHERE name = $1 AND token = $3 AND lock_until > now())",
            )
            .bind(&cfg.name)
            .bind(resume)
            .bind(token)
            .execute(&s.pool)
            .await?;
        }
    }
    sqlx::query(
        "UPDATE converge.sweep_runs SET finished_at = now(), status = $2, scanned = $3, \
             reconciled = $4, converged = $5, failed = $6, busy = $7, stopped_at_cap = $8, error = $9 \
         WHERE id = $1",
    )
    .bind(run_id)
    .bind(status.as_str())
    .bind(counts.scanned as i32)
    .bind(counts.reconciled as i32)
    .bind(counts.converged as i32)
    .bind(counts.failed as i32)
    .bind(counts.busy as i32)
    .bind(cap)
    .bind(&error)
    .execute(&s.pool)
    .await?;
    if status != RunStatus::LeaseLost {
        if let Some(lease) = lease {
            lease.release(&s.pool).await?;
        }
    }
    match &error {
        Some(error) => tracing::warn!(
            run_id,
            status = status.as_str(),
            %error,
            scanned = counts.scanned,
            reconciled = counts.reconciled,
            failed = counts.failed,
            "sweep run failed"
        ),
        None => tracing::info!(
            run_id,
            status = status.as_str(),
            scanned = counts.scanned,
            reconciled = counts.reconciled,
            converged = counts.converged,
            failed = counts.failed,
            busy = counts.busy,
            "sweep run finished"
        ),
    }
    Ok(RunOutcome::Ran(RunSummary {
        run_id,
        status,
        counts,
        stopped_at_cap: cap,
    }))
}

/// Aborts the heartbeat however the run ends (an error return, a panic):
/// a heartbeat left behind would hold the lease for ever.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl AbortOnDrop {
    async fn stop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.abort();
            let _ = handle.await;
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.abort();
        }
    }
}

async fn record_progress(pool: &PgPool, run_id: i64, c: &RunCounts) {
    let result = sqlx::query(
        "UPDATE converge.sweep_runs SET scanned = $2, reconciled = $3, converged = $4, \
             failed = $5, busy = $6 WHERE id = $1",
    )
    .bind(run_id)
    .bind(c.scanned as i32)
    .bind(c.reconciled as i32)
    .bind(c.converged as i32)
    .bind(c.failed as i32)
    .bind(c.busy as i32)
    .execute(pool)
    .await;
    if let Err(error) = result {
        tracing::warn!(%error, "cannot record sweep progress");
    }
}

async fn heartbeat_loop(
    pool: PgPool,
    lease: Arc<Mutex<Lease>>,
    lost: CancellationToken,
    every: Duration,
) {
    let mut interval = tokio::time::interval(every);
    interval.tick().await;
    loop {
        interval.tick().await;
        let mut held = lease.lock().await;
        match held.heartbeat(&pool).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(lease = held.name(), "sweep lease lost: stopping the run");
                lost.cancel();
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "sweep lease heartbeat failed");
                if !held.locally_valid() {
                    tracing::error!(
                        lease = held.name(),
                        "sweep lease no longer vouched for: stopping the run"
                    );
                    metrics_names::count_lease_loss(held.name());
                    lost.cancel();
                    return;
                }
            }
        }
    }
}
