//! The audit log (`converge.audit`): every operator action is recorded before
//! it acts and its outcome after, and `converge audit` lists them.
//!
//! [`begin`] returns an [`AuditEntry`] whose only way out is
//! [`AuditEntry::settle`] (or [`AuditEntry::settle_or_interrupt`]): it runs the
//! action's work and records how it ended, `failed` with the error when the
//! work returns one, so no row is left without an outcome by an early return.

use std::future::Future;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::context::Ctx;
use crate::error::{CliError, CliResult};
use crate::output::{self, Table};

/// How an action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuditOutcome {
    /// Everything was done.
    Ok,
    /// Part of it was done.
    Partial,
    /// Nothing (or nothing useful) was done.
    Failed,
    /// A worker took the work, and the CLI stopped waiting for its end: the
    /// work goes on (details name the worker, `accepted_by`).
    TimedOut,
    /// The operator pressed ctrl-c while it ran.
    Interrupted,
}

impl AuditOutcome {
    /// The label stored in `converge.audit.outcome`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AuditOutcome::Ok => "ok",
            AuditOutcome::Partial => "partial",
            AuditOutcome::Failed => "failed",
            AuditOutcome::TimedOut => "timed_out",
            AuditOutcome::Interrupted => "interrupted",
        }
    }
}

/// How an action's work ended: the outcome to record, details merged into the
/// row's, and the command's result.
#[derive(Debug)]
pub(crate) struct Settled<T> {
    /// The outcome to record.
    pub(crate) outcome: AuditOutcome,
    /// Merged into `converge.audit.details`.
    pub(crate) details: Value,
    /// What the command returns.
    pub(crate) result: CliResult<T>,
}

impl<T> Settled<T> {
    /// Done: `ok` with `details`, returning `value`.
    pub(crate) fn ok(details: Value, value: T) -> Settled<T> {
        Settled {
            outcome: AuditOutcome::Ok,
            details,
            result: Ok(value),
        }
    }

    /// Ended with `outcome` and the error `error` (recorded with `details`).
    pub(crate) fn err(outcome: AuditOutcome, details: Value, error: CliError) -> Settled<T> {
        Settled {
            outcome,
            details,
            result: Err(error),
        }
    }

    /// Failed with `error`: recorded as `failed` with `{"error": …}`.
    pub(crate) fn failed(error: CliError) -> Settled<T> {
        Settled::err(
            AuditOutcome::Failed,
            json!({ "error": error.to_string() }),
            error,
        )
    }
}

/// An action recorded as started; settling it records its outcome.
#[derive(Debug)]
#[must_use = "settle the entry, or its audit row never gets an outcome"]
pub(crate) struct AuditEntry {
    /// `converge.audit.id`.
    pub(crate) id: i64,
    pool: PgPool,
}

/// Records that `ctx`'s actor starts `action` on `target`, before acting.
pub(crate) async fn begin(
    ctx: &Ctx,
    action: &str,
    target: &str,
    details: Value,
) -> CliResult<AuditEntry> {
    let actor = ctx.actor();
    begin_as(
        ctx.pool().await?,
        &actor,
        ctx.global.reason.as_deref(),
        action,
        target,
        details,
    )
    .await
}

/// Records that `actor` starts `action` on `target` (with the operator's
/// `reason`, if given), before acting.
pub(crate) async fn begin_as(
    pool: &PgPool,
    actor: &str,
    reason: Option<&str>,
    action: &str,
    target: &str,
    details: Value,
) -> CliResult<AuditEntry> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO converge.audit (actor, action, target, reason, details) \
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(actor)
    .bind(action)
    .bind(target)
    .bind(reason)
    .bind(details)
    .fetch_one(pool)
    .await?;
    Ok(AuditEntry {
        id,
        pool: pool.clone(),
    })
}

impl AuditEntry {
    /// Runs `work` and records how it ended: what it settled on, or `failed`
    /// with the error it returned.
    pub(crate) async fn settle<T>(
        self,
        work: impl Future<Output = CliResult<Settled<T>>>,
    ) -> CliResult<T> {
        let settled = work.await.unwrap_or_else(Settled::failed);
        self.record(settled).await
    }

    /// As [`settle`](Self::settle), and ctrl-c stops the work: `on_interrupt`
    /// says what to record and return (an [`CliError::Interrupted`], exit 130).
    pub(crate) async fn settle_or_interrupt<T>(
        self,
        work: impl Future<Output = CliResult<Settled<T>>>,
        on_interrupt: impl FnOnce() -> Settled<T>,
    ) -> CliResult<T> {
        let settled = tokio::select! {
            done = work => done.unwrap_or_else(Settled::failed),
            // An error installing the handler disables this branch.
            Ok(()) = tokio::signal::ctrl_c() => on_interrupt(),
        };
        self.record(settled).await
    }

    async fn record<T>(self, settled: Settled<T>) -> CliResult<T> {
        let written = sqlx::query(
            "UPDATE converge.audit SET outcome = $2, finished_at = now(), details = details || $3 \
             WHERE id = $1",
        )
        .bind(self.id)
        .bind(settled.outcome.as_str())
        .bind(&settled.details)
        .execute(&self.pool)
        .await;
        match (written, settled.result) {
            (Ok(_), result) => result,
            (Err(e), Err(work)) => {
                eprintln!(
                    "converge: recording the outcome in converge.audit #{} failed: {e}",
                    self.id
                );
                Err(work)
            }
            (Err(e), Ok(_)) => Err(CliError::Failed(format!(
                "the action was carried out ({}), but recording that in converge.audit #{} \
                 failed: {e}",
                settled.outcome.as_str(),
                self.id
            ))),
        }
    }
}

/// A row of `converge.audit`.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub(crate) struct AuditRow {
    /// Id.
    pub(crate) id: i64,
    /// When it started.
    pub(crate) at: DateTime<Utc>,
    /// Who.
    pub(crate) actor: String,
    /// What.
    pub(crate) action: String,
    /// On what.
    pub(crate) target: String,
    /// Why.
    pub(crate) reason: Option<String>,
    /// Parameters and results.
    pub(crate) details: Value,
    /// `ok`, `partial`, `failed`, `timed_out`, `interrupted`, or none while running.
    pub(crate) outcome: Option<String>,
    /// When it ended.
    pub(crate) finished_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, at, actor, action, target, reason, details, outcome, finished_at";

/// The latest rows, newest first.
pub(crate) async fn latest(pool: &PgPool, limit: i64) -> CliResult<Vec<AuditRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM converge.audit ORDER BY id DESC LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// The latest operator actions on sweeps (on `sweep` only, when given), newest first.
pub(crate) async fn sweep_actions(
    pool: &PgPool,
    sweep: Option<&str>,
    limit: i64,
) -> CliResult<Vec<AuditRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM converge.audit \
         WHERE action LIKE 'sweep.%' \
           AND details->>'recorded_by' IS DISTINCT FROM 'worker' \
           AND ($1::text IS NULL OR target = $1 OR details->>'sweep' = $1) \
         ORDER BY id DESC LIMIT $2"
    ))
    .bind(sweep)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Prints rows as a table.
pub(crate) fn print_rows(rows: &[AuditRow], empty: &str) {
    let mut table = Table::new(&["ID", "AT", "ACTOR", "ACTION", "TARGET", "OUTCOME", "REASON"]);
    for r in rows {
        table.row(vec![
            r.id.to_string(),
            output::time(r.at),
            r.actor.clone(),
            r.action.clone(),
            output::cut(&r.target, 40),
            r.outcome.clone().unwrap_or_else(|| "running".into()),
            output::cut(r.reason.as_deref().unwrap_or("-"), 40),
        ]);
    }
    table.print_or(empty);
}

/// `converge audit`
pub(crate) async fn list(ctx: &Ctx, limit: i64) -> CliResult<()> {
    let rows = latest(ctx.pool().await?, limit).await?;
    if ctx.json() {
        return output::print_json(&rows);
    }
    print_rows(&rows, "no operator actions recorded");
    Ok(())
}
