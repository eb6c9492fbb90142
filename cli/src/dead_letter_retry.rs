//! `converge dead-letters retry`: dead letters' keys run again by a worker of
//! the application (the manual path); each success resolves its dead letter.

use std::process::ExitCode;

use converge::control::{ControlReply, ControlRequest};
use serde_json::{json, Value};

use crate::audit::{self, AuditOutcome};
use crate::context::Ctx;
use crate::control;
use crate::dead_letters::{check_open, id_list};
use crate::error::{CliError, CliResult};
use crate::output::{self, Table};

/// `converge dead-letters retry ID... | --reconciler R --all`
pub(crate) async fn retry(
    ctx: &Ctx,
    ids: Vec<i64>,
    reconciler: Option<&str>,
    timeout: std::time::Duration,
) -> CliResult<ExitCode> {
    let pool = ctx.pool().await?;
    let ids = match reconciler {
        Some(r) => {
            let ids: Vec<i64> = sqlx::query_scalar(
                "SELECT id FROM converge.dead_letters \
                 WHERE reconciler = $1 AND resolved_at IS NULL ORDER BY id",
            )
            .bind(r)
            .fetch_all(pool)
            .await?;
            if ids.is_empty() {
                println!("no open dead letters of reconciler {r}");
                return Ok(ExitCode::SUCCESS);
            }
            ids
        }
        None => {
            check_open(pool, &ids).await?;
            ids
        }
    };
    let app = ctx.app().await?;
    let entry = audit::begin(
        ctx,
        "dead_letter.retry",
        &format!("dead letters {}", id_list(&ids)),
        json!({ "ids": ids, "application": app, "reconciler": reconciler }),
    )
    .await?;
    let request = ControlRequest::DeadLetterRetry {
        ids: ids.clone(),
        actor: ctx.actor(),
    };
    let results = async {
        let (mut call, first) = control::send(ctx, &app, &request).await?;
        let reply = match first {
            ControlReply::Accepted { .. } => {
                call.final_reply(timeout, || {
                    CliError::Failed(format!(
                        "no results within {} s; the retries may still be going \
                         (see `converge dead-letters list`)",
                        timeout.as_secs()
                    ))
                })
                .await?
            }
            other => other,
        };
        match reply {
            ControlReply::Retried { results } => Ok(results),
            other => Err(CliError::Failed(format!(
                "unexpected reply from the worker: {other:?}"
            ))),
        }
    }
    .await;
    let results = match results {
        Ok(r) => r,
        Err(e) => {
            entry
                .finish(
                    pool,
                    AuditOutcome::Failed,
                    json!({ "error": e.to_string() }),
                )
                .await?;
            return Err(e);
        }
    };
    let ok = |outcome: &str| matches!(outcome, "changed" | "unchanged");
    let failed = results.iter().filter(|r| !ok(&r.outcome)).count();
    let outcome = match failed {
        0 => AuditOutcome::Ok,
        n if n == results.len() => AuditOutcome::Failed,
        _ => AuditOutcome::Partial,
    };
    let summary: Vec<Value> = results
        .iter()
        .map(|r| {
            json!({ "dead_letter": r.dead_letter, "reconciler": r.reconciler, "key": r.key,
                         "outcome": r.outcome, "error": r.error })
        })
        .collect();
    entry
        .finish(
            pool,
            outcome,
            json!({ "results": summary, "failed": failed }),
        )
        .await?;
    if ctx.json() {
        output::print_json(&summary)?;
    } else {
        let mut table = Table::new(&["DEAD LETTER", "RECONCILER", "KEY", "OUTCOME", "ERROR"]);
        for r in &results {
            table.row(vec![
                output::opt(r.dead_letter),
                r.reconciler.clone(),
                output::cut(&r.key, 30),
                r.outcome.clone(),
                output::cut(r.error.as_deref().unwrap_or("-"), 60),
            ]);
        }
        table.print_or("the worker retried nothing");
        println!(
            "{} retried, {} resolved, {failed} failed",
            results.len(),
            results.len() - failed
        );
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
