//! `converge sweep list` and `converge sweep history`: what the database
//! knows about sweeps. Running them is in [`crate::sweep_run`].

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;

use crate::audit;
use crate::context::Ctx;
use crate::error::CliResult;
use crate::output::outln;
use crate::output::{self, Table};

/// A sweep: its application, schedule, last run and convergence figure.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub(crate) struct SweepRow {
    /// The application whose workers registered it (none: only in `sweep_schedules`).
    pub(crate) application: Option<String>,
    /// The sweep's name.
    pub(crate) sweep: String,
    /// The next planned fire time.
    pub(crate) next_fire_at: Option<DateTime<Utc>>,
    /// Keys not converged, as last measured.
    pub(crate) unconverged_keys: Option<i64>,
    /// The oldest of them.
    pub(crate) oldest_unconverged_at: Option<DateTime<Utc>>,
    /// When that was measured.
    pub(crate) measured_at: Option<DateTime<Utc>>,
    /// The last run's id.
    pub(crate) last_run_id: Option<i64>,
    /// Its status.
    pub(crate) last_status: Option<String>,
    /// What triggered it.
    pub(crate) last_trigger: Option<String>,
    /// When it started.
    pub(crate) last_started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub(crate) last_finished_at: Option<DateTime<Utc>>,
    /// Keys scanned.
    pub(crate) last_scanned: Option<i32>,
    /// Keys changed.
    pub(crate) last_reconciled: Option<i32>,
    /// Keys already converged.
    pub(crate) last_converged: Option<i32>,
    /// Keys failed.
    pub(crate) last_failed: Option<i32>,
    /// Why the last run failed, if it did.
    pub(crate) last_error: Option<String>,
    /// Keys busy elsewhere.
    pub(crate) last_busy: Option<i32>,
}

/// Every sweep known from `converge.workers` and `converge.sweep_schedules`
/// (only `app`'s when given).
pub(crate) async fn sweeps(pool: &PgPool, app: Option<&str>) -> CliResult<Vec<SweepRow>> {
    Ok(sqlx::query_as(
        "WITH registered AS ( \
           SELECT DISTINCT ON (s) w.application, s AS sweep \
           FROM converge.workers w, unnest(w.sweeps) AS s \
           WHERE $1::text IS NULL OR w.application = $1 \
           ORDER BY s, w.heartbeat_at DESC), \
         known AS ( \
           SELECT application, sweep FROM registered \
           UNION ALL \
           SELECT NULL, sc.sweep FROM converge.sweep_schedules sc \
           WHERE $1::text IS NULL AND sc.sweep NOT IN (SELECT sweep FROM registered)) \
         SELECT k.application, k.sweep, sc.next_fire_at, sc.unconverged_keys, \
                sc.oldest_unconverged_at, sc.measured_at, r.id AS last_run_id, \
                r.status AS last_status, r.trigger AS last_trigger, \
                r.started_at AS last_started_at, r.finished_at AS last_finished_at, \
                r.scanned AS last_scanned, r.reconciled AS last_reconciled, \
                r.converged AS last_converged, r.failed AS last_failed, r.busy AS last_busy, \
                r.error AS last_error \
         FROM known k \
         LEFT JOIN converge.sweep_schedules sc ON sc.sweep = k.sweep \
         LEFT JOIN LATERAL ( \
           SELECT * FROM converge.sweep_runs r WHERE r.sweep = k.sweep ORDER BY r.id DESC LIMIT 1 \
         ) r ON true \
         ORDER BY k.application NULLS LAST, k.sweep",
    )
    .bind(app)
    .fetch_all(pool)
    .await?)
}

/// Sweeps as a table.
pub(crate) fn sweeps_table(rows: &[SweepRow], now: DateTime<Utc>) -> Table {
    let mut table = Table::new(&[
        "SWEEP",
        "APP",
        "NEXT FIRE",
        "LAST RUN",
        "SCANNED/CHANGED/FAILED",
        "UNCONVERGED",
    ]);
    for s in rows {
        let last = match (s.last_run_id, &s.last_status) {
            (Some(id), Some(status)) => format!(
                "#{id} {status} {}{}",
                output::opt_relative(s.last_finished_at.or(s.last_started_at), now),
                s.last_error
                    .as_deref()
                    .map(|e| format!(
                        ": {}",
                        output::cut(&e.replace("error returned from database: ", ""), 160)
                    ))
                    .unwrap_or_default()
            ),
            _ => "never".into(),
        };
        let counts = match s.last_run_id {
            Some(_) => format!(
                "{}/{}/{}",
                s.last_scanned.unwrap_or(0),
                s.last_reconciled.unwrap_or(0),
                s.last_failed.unwrap_or(0)
            ),
            None => "-".into(),
        };
        let unconverged = match (s.unconverged_keys, s.measured_at) {
            (Some(n), Some(at)) => format!(
                "{n} keys{} (measured {})",
                s.oldest_unconverged_at
                    .map(|o| format!(", oldest {}", output::span(now - o)))
                    .unwrap_or_default(),
                output::relative(at, now)
            ),
            _ => "not measured".into(),
        };
        table.row(vec![
            s.sweep.clone(),
            output::opt(s.application.as_deref()),
            output::opt_relative(s.next_fire_at, now),
            last,
            counts,
            unconverged,
        ]);
    }
    table
}

/// `converge sweep list`
pub(crate) async fn list(ctx: &Ctx) -> CliResult<()> {
    let pool = ctx.pool().await?;
    let rows = sweeps(pool, ctx.known_app().await?).await?;
    if ctx.json() {
        return output::print_json(&rows);
    }
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    sweeps_table(&rows, now).print_or("no sweeps registered");
    Ok(())
}

/// A row of `converge.sweep_runs`.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub(crate) struct RunRow {
    id: i64,
    sweep: String,
    trigger: String,
    requested_keys: Option<i32>,
    instance: String,
    started_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    status: String,
    scanned: i32,
    reconciled: i32,
    converged: i32,
    failed: i32,
    busy: i32,
    stopped_at_cap: Option<String>,
    error: Option<String>,
}

/// `converge sweep history [NAME]`
pub(crate) async fn history(ctx: &Ctx, name: Option<&str>, limit: i64) -> CliResult<()> {
    let pool = ctx.pool().await?;
    let runs: Vec<RunRow> = sqlx::query_as(
        "SELECT id, sweep, trigger, requested_keys, instance, started_at, finished_at, status, \
                scanned, reconciled, converged, failed, busy, stopped_at_cap, error \
         FROM converge.sweep_runs WHERE $1::text IS NULL OR sweep = $1 ORDER BY id DESC LIMIT $2",
    )
    .bind(name)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let actions = audit::sweep_actions(pool, name, limit).await?;
    if ctx.json() {
        return output::print_json(&json!({ "runs": runs, "operator_actions": actions }));
    }
    let mut table = Table::new(&[
        "RUN",
        "SWEEP",
        "TRIGGER",
        "INSTANCE",
        "STARTED",
        "TOOK",
        "STATUS",
        "SCANNED",
        "CHANGED",
        "CONVERGED",
        "FAILED",
        "BUSY",
        "NOTE",
    ]);
    for r in &runs {
        let note = r
            .error
            .clone()
            .or_else(|| r.stopped_at_cap.as_ref().map(|c| format!("stopped at {c}")))
            .unwrap_or_default();
        table.row(vec![
            r.id.to_string(),
            r.sweep.clone(),
            r.trigger.clone(),
            r.instance.clone(),
            output::time(r.started_at),
            r.finished_at
                .map(|f| output::span(f - r.started_at))
                .unwrap_or_else(|| "running".into()),
            r.status.clone(),
            r.scanned.to_string(),
            r.reconciled.to_string(),
            r.converged.to_string(),
            r.failed.to_string(),
            r.busy.to_string(),
            output::cut(&note, 40),
        ]);
    }
    table.print_or(&match name {
        Some(n) => format!("no runs of sweep {n}"),
        None => "no sweep runs".into(),
    });
    if !actions.is_empty() {
        outln!("\noperator actions:");
        audit::print_rows(&actions, "");
    }
    Ok(())
}
