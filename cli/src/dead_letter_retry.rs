//! `converge dead-letters retry`: dead letters' keys run again by workers of
//! the application (the manual path); each success resolves its dead letter.
//!
//! The ids are grouped by their reconciler, and each group goes to that
//! reconciler's control subject (only workers that registered it listen
//! there), all groups at once.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use converge::control::{
    reconciler_subject, ControlReply, ControlRequest, KeyResult, MAX_RETRY_IDS,
};
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::args::BulkArgs;
use crate::audit::{self, AuditOutcome, Settled};
use crate::context::Ctx;
use crate::control;
use crate::dead_letter_filter::{select, Selection};
use crate::dead_letters::{check_open, id_list, unique_ids};
use crate::error::{CliError, CliResult};
use crate::output::outln;
use crate::output::{self, Table};

/// How one reconciler's group ended.
enum GroupEnd {
    /// The worker's results, one per dead letter.
    Retried(Vec<KeyResult>),
    /// Accepted by `instance`, no results within the timeout.
    TimedOut { instance: String },
    /// Not carried out (no worker answered, an error reply, …).
    Failed(CliError),
    /// The first batches' results, then how the next batch ended; `unsent`
    /// letters after it were not sent.
    Partial {
        results: Vec<KeyResult>,
        rest: Box<GroupEnd>,
        unsent: usize,
    },
}

/// `converge dead-letters retry ID... | --reconciler R --since AGE --error-like TEXT`
pub(crate) async fn retry(
    ctx: &Ctx,
    ids: Vec<i64>,
    bulk: BulkArgs,
    timeout: Duration,
) -> CliResult<ExitCode> {
    let pool = ctx.pool().await?;
    let selection = if ids.is_empty() {
        match select(pool, &bulk, "retry", ctx.json()).await? {
            Some(selection) => Some(selection),
            None => return Ok(ExitCode::SUCCESS),
        }
    } else {
        bulk.refuse_with_ids()?;
        None
    };
    let ids = match &selection {
        Some(s) => s.matches.ids.clone(),
        None => {
            let ids = unique_ids(ids);
            check_open(pool, &ids).await?;
            ids
        }
    };
    let groups = by_reconciler(pool, &ids).await?;
    let app = ctx.app().await?;
    let done = retry_groups(
        ctx,
        &ctx.actor(),
        &app,
        groups,
        selection.as_ref(),
        timeout,
        true,
    )
    .await?;
    if let Some(note) = selection.as_ref().and_then(Selection::more_note) {
        // Not into the JSON on stdout.
        if ctx.json() {
            eprintln!("converge: {note}");
        } else {
            outln!("{note}");
        }
    }
    Ok(done.code)
}

/// How a retry ended, as far as the workers said.
#[derive(Debug)]
pub(crate) struct RetryDone {
    /// The command's exit code: 0 when every key was reconciled.
    pub(crate) code: ExitCode,
    /// Keys the workers ran.
    pub(crate) retried: usize,
    /// Of them, reconciled (their letters resolved).
    pub(crate) resolved: usize,
    /// Of them, failed again (their letters stay open).
    pub(crate) failed: usize,
    /// The action's row in `converge.audit`.
    pub(crate) audit_id: i64,
}

/// Sends each reconciler's ids to its workers (all groups at once), waits
/// for the results and records the action in `converge.audit`, as one action
/// with its count when `selection` says it was a filtered one. Prints the
/// results when `print`.
pub(crate) async fn retry_groups(
    ctx: &Ctx,
    actor: &str,
    app: &str,
    groups: BTreeMap<String, Vec<i64>>,
    selection: Option<&Selection>,
    timeout: Duration,
    print: bool,
) -> CliResult<RetryDone> {
    let pool = ctx.pool().await?;
    control::registered(pool, app)
        .await?
        .require_reconcilers(groups.keys().map(String::as_str))?;
    let ids: Vec<i64> = unique_ids(groups.values().flatten().copied().collect());
    let mut details = json!({ "ids": ids, "application": app,
                              "reconcilers": groups.keys().collect::<Vec<_>>() });
    let target = match selection {
        Some(s) => {
            details["filter"] = s.filter.details();
            details["count"] = json!(ids.len());
            details["matched"] = json!(s.matches.total);
            s.target()
        }
        None => format!("dead letters {}", id_list(&ids)),
    };
    let entry = audit::begin_as(
        pool,
        actor,
        ctx.global.reason.as_deref(),
        "dead_letter.retry",
        &target,
        details,
    )
    .await?;
    let audit_id = entry.id;
    let accepted = Mutex::new(BTreeMap::<String, String>::new());
    let work = async {
        let sends = groups
            .iter()
            .map(|(r, ids)| retry_group(ctx, actor, app, r, ids, timeout, &accepted));
        let ends: Vec<(String, GroupEnd)> = futures::future::join_all(sends).await;
        Ok(report(ctx, ends, timeout, print, audit_id))
    };
    entry
        .settle_or_interrupt(work, || {
            let accepted = std::mem::take(&mut *accepted.lock().unwrap_or_else(|e| e.into_inner()));
            Settled::err(
                AuditOutcome::Interrupted,
                json!({ "accepted_by": accepted_by(&accepted) }),
                CliError::Interrupted(if accepted.is_empty() {
                    "interrupted before a worker took the retries; they may have been delivered \
                     all the same: see `converge dead-letters list`"
                        .into()
                } else {
                    "interrupted; the retries go on on the workers that took them \
                     (see `converge dead-letters list`)"
                        .into()
                }),
            )
        })
        .await
}

/// The ids grouped by their reconciler (`converge.dead_letters.reconciler`).
pub(crate) async fn by_reconciler(
    pool: &PgPool,
    ids: &[i64],
) -> CliResult<BTreeMap<String, Vec<i64>>> {
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT id, reconciler FROM converge.dead_letters WHERE id = ANY($1) ORDER BY id",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    let mut groups = BTreeMap::<String, Vec<i64>>::new();
    for (id, reconciler) in rows {
        groups.entry(reconciler).or_default().push(id);
    }
    Ok(groups)
}

/// `accepted_by` in the audit details: the instance when one reconciler's
/// retries were taken, else `{reconciler: instance}`.
fn accepted_by(accepted: &BTreeMap<String, String>) -> Value {
    match accepted.values().next() {
        Some(instance) if accepted.len() == 1 => json!(instance),
        _ => json!(accepted),
    }
}

/// Sends one reconciler's ids and waits for its results.
/// Sends one reconciler's ids in batches a worker takes (at most
/// [`MAX_RETRY_IDS`] each, one after the other) and gathers the results; a
/// batch that does not end with results stops the rest.
async fn retry_group(
    ctx: &Ctx,
    actor: &str,
    app: &str,
    reconciler: &str,
    ids: &[i64],
    timeout: Duration,
    accepted: &Mutex<BTreeMap<String, String>>,
) -> (String, GroupEnd) {
    let mut results = Vec::new();
    let mut sent = 0;
    for batch in ids.chunks(MAX_RETRY_IDS) {
        sent += batch.len();
        match retry_batch(ctx, actor, app, reconciler, batch, timeout, accepted).await {
            (_, GroupEnd::Retried(r)) => results.extend(r),
            // The only batch, or the last: its end as it is.
            (name, end) if results.is_empty() && sent == ids.len() => return (name, end),
            (name, end) => {
                let rest = Box::new(end);
                let unsent = ids.len() - sent;
                return (
                    name,
                    GroupEnd::Partial {
                        results,
                        rest,
                        unsent,
                    },
                );
            }
        }
    }
    (reconciler.to_owned(), GroupEnd::Retried(results))
}

async fn retry_batch(
    ctx: &Ctx,
    actor: &str,
    app: &str,
    reconciler: &str,
    ids: &[i64],
    timeout: Duration,
    accepted: &Mutex<BTreeMap<String, String>>,
) -> (String, GroupEnd) {
    let request = ControlRequest::DeadLetterRetry {
        ids: ids.to_vec(),
        actor: actor.to_owned(),
    };
    let end = async {
        let subject = reconciler_subject(app, reconciler);
        let (mut call, first) = control::send(ctx, app, subject, &request).await?;
        let reply = match first {
            ControlReply::Accepted { instance } => {
                accepted
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(reconciler.to_owned(), instance.clone());
                match call.final_reply(timeout).await? {
                    Some(reply) => reply,
                    None => return Ok(GroupEnd::TimedOut { instance }),
                }
            }
            other => other,
        };
        match reply {
            ControlReply::Retried { results } => Ok(GroupEnd::Retried(results)),
            other => Err(CliError::Failed(format!(
                "unexpected reply from the worker: {other:?}"
            ))),
        }
    }
    .await;
    (reconciler.to_owned(), end.unwrap_or_else(GroupEnd::Failed))
}

/// Prints the results and settles the audit row.
fn report(
    ctx: &Ctx,
    ends: Vec<(String, GroupEnd)>,
    timeout: Duration,
    print: bool,
    audit_id: i64,
) -> Settled<RetryDone> {
    let only_group = ends.len() == 1;
    let mut results = Vec::new();
    let mut timed_out = BTreeMap::new();
    let mut errors = Vec::new();
    for (reconciler, mut end) in ends {
        if let GroupEnd::Partial {
            results: first,
            rest,
            unsent,
        } = end
        {
            results.extend(first);
            if unsent > 0 {
                errors.push((
                    reconciler.clone(),
                    CliError::Failed(format!(
                        "{unsent} more of its dead letters were not sent, as the batch before \
                         them did not end; run the command again for them"
                    )),
                ));
            }
            end = *rest;
        }
        match end {
            GroupEnd::Retried(r) => results.extend(r),
            GroupEnd::TimedOut { instance } => {
                timed_out.insert(reconciler, instance);
            }
            GroupEnd::Failed(e) => errors.push((reconciler, e)),
            GroupEnd::Partial { .. } => {} // not nested: `retry_group` makes one level
        }
    }
    let ok = |outcome: &str| matches!(outcome, "changed" | "unchanged");
    let failed = results.iter().filter(|r| !ok(&r.outcome)).count();
    let resolved = results.len() - failed;
    let summary: Vec<Value> = results
        .iter()
        .map(|r| {
            json!({ "dead_letter": r.dead_letter, "reconciler": r.reconciler, "key": r.key,
                    "outcome": r.outcome, "error": r.error })
        })
        .collect();
    if print && (!results.is_empty() || (errors.is_empty() && timed_out.is_empty())) {
        print_results(ctx, &results, &summary, failed);
    }
    let mut details = json!({ "results": summary, "failed": failed });
    if !timed_out.is_empty() {
        details["accepted_by"] = accepted_by(&timed_out);
    }
    if !errors.is_empty() {
        details["errors"] = errors
            .iter()
            .map(|(r, e)| (r.clone(), json!(e.to_string())))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    let outcome = if failed == 0 && errors.is_empty() && timed_out.is_empty() {
        AuditOutcome::Ok
    } else if failed == 0 && errors.is_empty() && resolved == 0 {
        AuditOutcome::TimedOut
    } else if resolved == 0 && timed_out.is_empty() {
        AuditOutcome::Failed
    } else {
        AuditOutcome::Partial
    };
    let mut messages: Vec<String> = Vec::new();
    for (reconciler, instance) in &timed_out {
        messages.push(format!(
            "no results for reconciler {reconciler} within {} s; its retries were accepted by \
             worker {instance} and go on there: follow them with `converge dead-letters list`",
            timeout.as_secs()
        ));
    }
    if only_group && timed_out.is_empty() && errors.len() == 1 {
        // One reconciler: its error as is (an unknown name stays exit 2).
        if let Some((_, e)) = errors.pop() {
            return Settled::err(outcome, details, e);
        }
    }
    for (reconciler, e) in &errors {
        messages.push(format!("reconciler {reconciler}: {e}"));
    }
    let result = if messages.is_empty() {
        Ok(RetryDone {
            code: if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            },
            retried: results.len(),
            resolved,
            failed,
            audit_id,
        })
    } else {
        Err(CliError::Failed(messages.join("\n")))
    };
    Settled {
        outcome,
        details,
        result,
    }
}

fn print_results(ctx: &Ctx, results: &[KeyResult], summary: &[Value], failed: usize) {
    if ctx.json() {
        if let Err(e) = output::print_json(&summary) {
            eprintln!("converge: {e}");
        }
        return;
    }
    let mut table = Table::new(&["DEAD LETTER", "RECONCILER", "KEY", "OUTCOME", "ERROR"]);
    for r in results {
        table.row(vec![
            output::opt(r.dead_letter),
            r.reconciler.clone(),
            output::cut(&r.key, 30),
            r.outcome.clone(),
            output::cut(r.error.as_deref().unwrap_or("-"), 60),
        ]);
    }
    table.print_or("the worker retried nothing");
    outln!(
        "{} retried, {} resolved, {failed} failed",
        results.len(),
        results.len() - failed
    );
}
