//! The audit log (`converge.audit`): every operator action is recorded before
//! it acts and its outcome after, and `converge audit` lists them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

use crate::context::Ctx;
use crate::error::CliResult;
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
}

impl AuditOutcome {
    /// The label stored in `converge.audit.outcome`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AuditOutcome::Ok => "ok",
            AuditOutcome::Partial => "partial",
            AuditOutcome::Failed => "failed",
        }
    }
}

/// An action recorded as started; [`AuditEntry::finish`] records its outcome.
#[derive(Debug)]
pub(crate) struct AuditEntry {
    /// `converge.audit.id`.
    pub(crate) id: i64,
}

/// Records that `ctx`'s actor starts `action` on `target`, before acting.
pub(crate) async fn begin(
    ctx: &Ctx,
    action: &str,
    target: &str,
    details: Value,
) -> CliResult<AuditEntry> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO converge.audit (actor, action, target, reason, details) \
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(ctx.actor())
    .bind(action)
    .bind(target)
    .bind(&ctx.global.reason)
    .bind(details)
    .fetch_one(ctx.pool().await?)
    .await?;
    Ok(AuditEntry { id })
}

impl AuditEntry {
    /// Records the outcome, merging `details` into the row's details.
    pub(crate) async fn finish(
        &self,
        pool: &PgPool,
        outcome: AuditOutcome,
        details: Value,
    ) -> CliResult<()> {
        sqlx::query(
            "UPDATE converge.audit SET outcome = $2, finished_at = now(), details = details || $3 \
             WHERE id = $1",
        )
        .bind(self.id)
        .bind(outcome.as_str())
        .bind(details)
        .execute(pool)
        .await?;
        Ok(())
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
    /// `ok`, `partial`, `failed`, or none while running.
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
