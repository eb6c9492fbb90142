//! The run history: every run of every sweep, and the keys that failed in it.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TriggerKind {
    /// The schedule fired.
    Schedule,
    /// The process started (`Timing::run_at_startup`).
    Startup,
    /// Application code or a domain-event handler called `trigger`.
    Programmatic,
    /// An operator, through the control plane.
    Operator,
    /// A replay of an earlier run's failed keys.
    Replay,
}

impl TriggerKind {
    /// The label stored in `converge.sweep_runs.trigger`.
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerKind::Schedule => "schedule",
            TriggerKind::Startup => "startup",
            TriggerKind::Programmatic => "programmatic",
            TriggerKind::Operator => "operator",
            TriggerKind::Replay => "replay",
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RunStatus {
    /// Every candidate was visited.
    Completed,
    /// A cap (keys or time) stopped it; the next run continues.
    StoppedEarly,
    /// Shutdown stopped it after its current key.
    Interrupted,
    /// A newer trigger replaced it (`Overlap::Replace`).
    Superseded,
    /// Its lease was lost; it stopped without recording further work.
    LeaseLost,
    /// The candidate query or the bookkeeping failed.
    Failed,
}

impl RunStatus {
    /// The label stored in `converge.sweep_runs.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Completed => "completed",
            RunStatus::StoppedEarly => "stopped_early",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Superseded => "superseded",
            RunStatus::LeaseLost => "lease_lost",
            RunStatus::Failed => "failed",
        }
    }
}

/// Counts of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunCounts {
    /// Keys read from the candidate query (or given).
    pub scanned: u64,
    /// Keys the reconciler changed.
    pub reconciled: u64,
    /// Keys already converged (the reconciler did nothing).
    pub converged: u64,
    /// Keys that failed every attempt (dead-lettered).
    pub failed: u64,
    /// Keys skipped because the event path held them at that moment.
    pub busy: u64,
}

/// The outcome of a run, as `trigger` and `run_now` return it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum RunOutcome {
    /// The run happened.
    Ran(RunSummary),
    /// Another instance holds the sweep's lease; nothing ran here.
    LeaseHeld,
    /// The sweep was running and the overlap policy dropped the trigger.
    Skipped,
}

/// One recorded run.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunSummary {
    /// Row id in `converge.sweep_runs`.
    pub run_id: i64,
    /// How it ended.
    pub status: RunStatus,
    /// Its counts.
    pub counts: RunCounts,
    /// Which cap stopped it (`max_keys` or `max_run_time`).
    pub stopped_at_cap: Option<&'static str>,
}

/// A row of `converge.sweep_runs`.
#[derive(Debug, Clone, sqlx::FromRow)]
#[non_exhaustive]
pub struct SweepRun {
    /// Row id.
    pub id: i64,
    /// The sweep.
    pub sweep: String,
    /// What started it.
    pub trigger: String,
    /// How many keys were given (a partial run), if any.
    pub requested_keys: Option<i32>,
    /// The instance that ran it.
    pub instance: String,
    /// The lease's fencing token.
    pub lease_token: i64,
    /// Start (database clock).
    pub started_at: DateTime<Utc>,
    /// End, when it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// `running`, `completed`, `stopped_early`, `interrupted`, `superseded`, `lease_lost`, `failed`.
    pub status: String,
    /// Keys scanned.
    pub scanned: i32,
    /// Keys changed.
    pub reconciled: i32,
    /// Keys already converged.
    pub converged: i32,
    /// Keys failed.
    pub failed: i32,
    /// Keys skipped while busy elsewhere.
    pub busy: i32,
    /// Which cap stopped it.
    pub stopped_at_cap: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

impl SweepRun {
    /// The latest runs, newest first, of one sweep or of all.
    pub async fn list<'e>(
        executor: impl PgExecutor<'e>,
        sweep: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SweepRun>, sqlx::Error> {
        sqlx::query_as(
            "SELECT id, sweep, trigger, requested_keys, instance, lease_token, started_at, \
                    finished_at, status, scanned, reconciled, converged, failed, busy, \
                    stopped_at_cap, error \
             FROM converge.sweep_runs WHERE ($1::text IS NULL OR sweep = $1) \
             ORDER BY id DESC LIMIT $2",
        )
        .bind(sweep)
        .bind(limit)
        .fetch_all(executor)
        .await
    }

    /// The keys that failed in run `run_id`, to replay exactly them.
    pub async fn failed_keys<'e>(
        executor: impl PgExecutor<'e>,
        run_id: i64,
    ) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT aggregate_key FROM converge.sweep_run_failures \
             WHERE run_id = $1 ORDER BY aggregate_key",
        )
        .bind(run_id)
        .fetch_all(executor)
        .await
    }
}
