//! `converge sweep run` and `converge sweep replay`: through the control plane,
//! optionally waiting for the run's end while showing its progress from
//! `converge.sweep_runs`.

use std::cell::RefCell;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use converge::control::{sweep_subject, ControlReply, ControlRequest};
use serde_json::json;
use sqlx::PgPool;

use crate::audit::{self, AuditEntry, AuditOutcome, Settled};
use crate::context::Ctx;
use crate::control::{self, ControlCall};
use crate::error::{bad_input, CliError, CliResult};
use crate::output;
use crate::output::outln;

/// Most candidates a dry run lists.
const DRY_RUN_LIMIT: u64 = 1000;

/// How long the CLI waits, and for what.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Waiting {
    /// Wait for the run's end (`--wait`).
    pub(crate) wait: bool,
    /// Ask again while the lease is held, up to this long (`--wait-for-lease`).
    pub(crate) for_lease: Option<Duration>,
    /// How long to wait for the run's end (`--timeout`).
    pub(crate) timeout: Duration,
}

/// `converge sweep run NAME`
pub(crate) async fn run(
    ctx: &Ctx,
    name: &str,
    keys: Vec<String>,
    dry_run: bool,
    waiting: Waiting,
) -> CliResult<ExitCode> {
    let timeout = waiting.timeout;
    if name.is_empty() {
        return Err(bad_input("the sweep's name must not be empty"));
    }
    if keys.iter().any(String::is_empty) {
        return Err(bad_input("--key must not be empty"));
    }
    let app = ctx.app().await?;
    control::registered(ctx.pool().await?, &app)
        .await?
        .require_sweep(name)?;
    let keys = (!keys.is_empty()).then_some(keys);
    let request = ControlRequest::SweepRun {
        sweep: name.to_owned(),
        keys: keys.clone(),
        dry_run,
        limit: dry_run.then_some(DRY_RUN_LIMIT),
    };
    if dry_run {
        return candidates(ctx, &app, name, &request, timeout).await;
    }
    let entry = audit::begin(
        ctx,
        "sweep.run",
        name,
        json!({ "sweep": name, "keys": keys, "application": app }),
    )
    .await?;
    execute(ctx, &app, name, &request, entry, waiting).await
}

/// `converge sweep replay RUN_ID`
pub(crate) async fn replay(
    ctx: &Ctx,
    run_id: i64,
    failed_only: bool,
    waiting: Waiting,
) -> CliResult<ExitCode> {
    let pool = ctx.pool().await?;
    let Some((sweep, failures)) = run_and_failures(pool, run_id).await? else {
        return Err(bad_input(format!(
            "no sweep run with id {run_id} (see `converge sweep history`)"
        )));
    };
    if failed_only && failures == 0 {
        outln!("run #{run_id} of sweep {sweep} recorded no failed keys; nothing to replay");
        return Ok(ExitCode::SUCCESS);
    }
    let app = ctx.app().await?;
    control::registered(pool, &app)
        .await?
        .require_sweep(&sweep)?;
    let entry = audit::begin(
        ctx,
        "sweep.replay",
        &run_id.to_string(),
        json!({ "sweep": sweep, "run_id": run_id, "failed_only": failed_only,
                "failed_keys": failures, "application": app }),
    )
    .await?;
    let request = ControlRequest::SweepReplay {
        run_id,
        failed_only,
    };
    execute(ctx, &app, &sweep, &request, entry, waiting).await
}

/// The sweep of run `run_id` and how many failed keys it recorded, if the
/// run exists.
pub(crate) async fn run_and_failures(
    pool: &PgPool,
    run_id: i64,
) -> CliResult<Option<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT r.sweep, (SELECT count(*) FROM converge.sweep_run_failures f WHERE f.run_id = r.id) \
         FROM converge.sweep_runs r WHERE r.id = $1",
    )
    .bind(run_id)
    .fetch_optional(pool)
    .await?)
}

async fn candidates(
    ctx: &Ctx,
    app: &str,
    sweep: &str,
    request: &ControlRequest,
    timeout: Duration,
) -> CliResult<ExitCode> {
    let (mut call, first) = control::send(ctx, app, sweep_subject(app, sweep), request).await?;
    let reply = match first {
        ControlReply::Accepted { instance } => {
            call.final_reply(timeout).await?.ok_or_else(|| {
                CliError::Failed(format!(
                    "no candidates from worker {instance} within {} s",
                    timeout.as_secs()
                ))
            })?
        }
        other => other,
    };
    match reply {
        ControlReply::Candidates {
            sweep,
            keys,
            truncated,
        } => {
            if ctx.json() {
                output::print_json(
                    &json!({ "sweep": sweep, "keys": keys, "truncated": truncated }),
                )?;
            } else {
                for k in &keys {
                    outln!("{k}");
                }
                outln!(
                    "dry run: {}{} candidate keys of sweep {sweep}; nothing was run",
                    if truncated { "the first " } else { "" },
                    keys.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        other => Err(CliError::Failed(format!(
            "unexpected reply to a dry run: {other:?}"
        ))),
    }
}

/// How the exchange with the workers ended.
enum Ending {
    /// The reply that ends it: `Accepted` (without `--wait`) or the final one.
    Reply(ControlReply),
    /// Accepted by `instance`, but no final reply within `waited`.
    TimedOut { instance: String, waited: Duration },
}

/// Sends the request, reports, records the outcome in the audit row (ctrl-c
/// included).
async fn execute(
    ctx: &Ctx,
    app: &str,
    sweep: &str,
    request: &ControlRequest,
    entry: AuditEntry,
    waiting: Waiting,
) -> CliResult<ExitCode> {
    let Waiting {
        wait,
        for_lease,
        timeout,
    } = waiting;
    let accepted_by = RefCell::new(None::<String>);
    let work = async {
        let pool = ctx.pool().await?;
        let deadline = for_lease.map(|d| tokio::time::Instant::now() + d);
        let mut pause = Duration::from_millis(250);
        loop {
            let ending = talk(ctx, pool, app, sweep, request, wait, timeout, &accepted_by).await?;
            let busy = match &ending {
                Ending::Reply(ControlReply::LeaseHeld { holder, .. }) => Some(format!(
                    "the lease is held by {}",
                    holder.as_deref().unwrap_or("another instance")
                )),
                Ending::Reply(ControlReply::Skipped { .. }) => {
                    Some("the sweep is running and its overlap policy dropped the request".into())
                }
                _ => None,
            };
            if let (Some(busy), Some(deadline)) = (busy, deadline) {
                if tokio::time::Instant::now() + pause < deadline {
                    eprintln!(
                        "converge: {busy}; asking again in {} ms (--wait-for-lease)",
                        pause.as_millis()
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
            let instance = accepted_by.borrow().clone();
            return Ok(judge(&ending, instance.as_deref(), sweep, wait, ctx.json()));
        }
    };
    entry
        .settle_or_interrupt(work, || interrupted(sweep, accepted_by.take()))
        .await
}

/// What ctrl-c records and says: the worker's run goes on.
fn interrupted(sweep: &str, accepted_by: Option<String>) -> Settled<ExitCode> {
    let message = match &accepted_by {
        Some(instance) => format!(
            "interrupted; the run goes on on worker {instance}: follow it with \
             `converge sweep history {sweep}`"
        ),
        None => format!(
            "interrupted before a worker took the request; it may have been delivered all \
             the same: see `converge sweep history {sweep}`"
        ),
    };
    Settled::err(
        AuditOutcome::Interrupted,
        json!({ "accepted_by": accepted_by }),
        CliError::Interrupted(message),
    )
}

/// Talks to the sweep's workers until the exchange ends; the instance that
/// took the request goes into `accepted_by` as soon as it is known.
#[allow(clippy::too_many_arguments)]
async fn talk(
    ctx: &Ctx,
    pool: &PgPool,
    app: &str,
    sweep: &str,
    request: &ControlRequest,
    wait: bool,
    timeout: Duration,
    accepted_by: &RefCell<Option<String>>,
) -> CliResult<Ending> {
    let before: i64 =
        sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM converge.sweep_runs WHERE sweep = $1")
            .bind(sweep)
            .fetch_one(pool)
            .await?;
    let (mut call, first) = control::send(ctx, app, sweep_subject(app, sweep), request).await?;
    let Some(instance) = control::accepted_by(&first).map(str::to_owned) else {
        return Ok(Ending::Reply(first));
    };
    accepted_by.replace(Some(instance.clone()));
    if !wait {
        return Ok(Ending::Reply(first));
    }
    Ok(
        match follow(&mut call, pool, sweep, before, timeout).await? {
            Some(reply) => Ending::Reply(reply),
            None => Ending::TimedOut {
                instance,
                waited: timeout,
            },
        },
    )
}

/// Waits for the final reply, showing the run's progress meanwhile.
async fn follow(
    call: &mut ControlCall,
    pool: &PgPool,
    sweep: &str,
    before: i64,
    timeout: Duration,
) -> CliResult<Option<ControlReply>> {
    let terminal = std::io::stderr().is_terminal();
    let spinner = if terminal {
        indicatif::ProgressBar::new_spinner()
    } else {
        indicatif::ProgressBar::hidden()
    };
    spinner.enable_steady_tick(Duration::from_millis(200));
    spinner.set_message(format!("waiting for sweep {sweep} to start"));
    let final_reply = call.final_reply(timeout);
    tokio::pin!(final_reply);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last_line = String::new();
    let mut last_print = tokio::time::Instant::now();
    let reply = loop {
        tokio::select! {
            reply = &mut final_reply => break reply,
            _ = tick.tick() => {
                let run: Option<(i64, String, i32, i32, i32, i32, i32)> = sqlx::query_as(
                    "SELECT id, status, scanned, reconciled, converged, failed, busy \
                     FROM converge.sweep_runs WHERE sweep = $1 AND id > $2 ORDER BY id DESC LIMIT 1",
                )
                .bind(sweep)
                .bind(before)
                .fetch_optional(pool)
                .await?;
                if let Some((id, status, scanned, reconciled, converged, failed, busy)) = run {
                    let line = format!(
                        "run #{id} {status}: scanned {scanned}, changed {reconciled}, \
                         converged {converged}, failed {failed}, busy {busy}"
                    );
                    if terminal {
                        spinner.set_message(line);
                    } else if line != last_line && last_print.elapsed() >= Duration::from_secs(5) {
                        eprintln!("{line}");
                        last_line = line;
                        last_print = tokio::time::Instant::now();
                    }
                }
            }
        }
    };
    spinner.finish_and_clear();
    reply
}

/// The audit outcome, its details and the result for how the exchange
/// ended, printing the report.
fn judge(
    ending: &Ending,
    instance: Option<&str>,
    sweep: &str,
    wait: bool,
    machine: bool,
) -> Settled<ExitCode> {
    let json = |v: &serde_json::Value| {
        if let Err(e) = output::print_json(v) {
            eprintln!("{e}");
        }
    };
    let reply = match ending {
        Ending::Reply(reply) => reply,
        Ending::TimedOut { instance, waited } => {
            if machine {
                json(&json!({ "accepted_by": instance, "timed_out": true }));
            }
            return Settled::err(
                AuditOutcome::TimedOut,
                json!({ "accepted_by": instance }),
                CliError::Failed(format!(
                    "no final reply within {} s; the run was accepted by worker {instance} \
                     and goes on there: follow it with `converge sweep history {sweep}`",
                    waited.as_secs()
                )),
            );
        }
    };
    let as_json = serde_json::to_value(reply).unwrap_or_default();
    match reply {
        ControlReply::Accepted { instance } if !wait => {
            if machine {
                json(&json!({ "accepted_by": instance }));
            } else {
                outln!(
                    "accepted by instance {instance}; follow it with \
                     `converge sweep history {sweep}`"
                );
            }
            Settled::ok(json!({ "accepted_by": instance }), ExitCode::SUCCESS)
        }
        ControlReply::SweepRan {
            instance,
            run_id,
            status,
            scanned,
            reconciled,
            converged,
            failed,
            busy,
            stopped_at_cap,
        } => {
            if machine {
                json(&as_json);
            } else {
                outln!(
                    "run #{run_id} on {instance}: {status}; scanned {scanned}, changed {reconciled}, \
                     already converged {converged}, failed {failed}, busy {busy}{}",
                    stopped_at_cap
                        .as_ref()
                        .map(|c| format!(" (stopped at {c})"))
                        .unwrap_or_default()
                );
            }
            let clean = status == "completed" && *failed == 0;
            let outcome = match (clean, status.as_str()) {
                (true, _) => AuditOutcome::Ok,
                (false, "completed" | "stopped_early") => AuditOutcome::Partial,
                _ => AuditOutcome::Failed,
            };
            let code = if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            };
            Settled {
                outcome,
                details: as_json,
                result: Ok(code),
            }
        }
        ControlReply::LeaseHeld { sweep, holder } => {
            let msg = format!(
                "sweep {sweep}'s lease is held by {} (a run in progress, or a run that just \
                 ended within its lock_at_least_for); nothing ran — see `converge leases list`, \
                 or wait for it with --wait-for-lease SECS",
                holder.as_deref().unwrap_or("another instance")
            );
            Settled::err(AuditOutcome::Failed, as_json, CliError::Failed(msg))
        }
        ControlReply::Skipped { sweep } => {
            let msg = format!(
                "sweep {sweep} is running and its overlap policy (skip) dropped this request; \
                 nothing ran — wait for the run with --wait-for-lease SECS, or set the sweep's \
                 overlap to queue"
            );
            Settled::err(AuditOutcome::Failed, as_json, CliError::Failed(msg))
        }
        other => Settled::err(
            AuditOutcome::Failed,
            as_json,
            CliError::Failed(format!(
                "unexpected reply from {}: {other:?}",
                instance.unwrap_or("the worker")
            )),
        ),
    }
}
