//! `converge projections list|status|rebuild|forget`: the read models of
//! `converge.projections` — their cursors, lag, errors and rebuilds.
//!
//! A rebuild is a request: the CLI records it (with an audit entry) and a
//! worker running the projection carries it out — copies of its tables
//! filled from history beside the live ones, then swapped in — recording
//! its own audit entry, settled when the swap commits. `--wait` follows it
//! to the end.

use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::audit::{self, AuditOutcome, Settled};
use crate::context::Ctx;
use crate::error::{bad_input, CliError, CliResult};
use crate::output::{self, outln, Table};

/// A projection as `converge.projections` has it, with its lag.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub(crate) struct ProjectionRow {
    name: String,
    mode: String,
    generation: i32,
    tables: Vec<String>,
    aggregate_types: Vec<String>,
    /// Events applied by the live generation.
    applied: i64,
    last_applied_at: Option<DateTime<Utc>>,
    /// How long the oldest event after the cursor has waited (asynchronous
    /// projections; `None`: caught up or inline).
    lag_seconds: Option<f64>,
    error: Option<String>,
    error_event_id: Option<uuid::Uuid>,
    error_at: Option<DateTime<Utc>>,
    rebuild_state: Option<String>,
    rebuild_requested_at: Option<DateTime<Utc>>,
    rebuild_requested_by: Option<String>,
    build_applied: Option<i64>,
    build_started_at: Option<DateTime<Utc>>,
    build_instance: Option<String>,
    rebuild_error: Option<String>,
    rebuilt_at: Option<DateTime<Utc>>,
    seen_at: DateTime<Utc>,
    seen_by: Option<String>,
}

const SELECT: &str = "\
    SELECT p.name, p.mode, p.generation, p.tables, p.aggregate_types, p.applied, \
           p.last_applied_at, \
           CASE WHEN p.mode = 'async' THEN ( \
               SELECT extract(epoch FROM now() - min(coalesce(f.recorded_at, f.occurred_at)))::float8 \
               FROM converge.relay_partitions rp \
               CROSS JOIN LATERAL ( \
                   SELECT o.recorded_at, o.occurred_at FROM converge.outbox o \
                   WHERE o.partition = rp.partition \
                     AND (o.tx_order, o.id) > (p.cursor_tx_order, p.cursor_id) \
                   ORDER BY o.tx_order, o.id LIMIT 1) f) END AS lag_seconds, \
           p.error, p.error_event_id, p.error_at, p.rebuild_state, p.rebuild_requested_at, \
           p.rebuild_requested_by, p.build_applied, p.build_started_at, p.build_instance, \
           p.rebuild_error, p.rebuilt_at, p.seen_at, p.seen_by \
    FROM converge.projections p";

pub(crate) async fn all(pool: &PgPool) -> CliResult<Vec<ProjectionRow>> {
    Ok(sqlx::query_as(&format!("{SELECT} ORDER BY p.name"))
        .fetch_all(pool)
        .await?)
}

/// The projection `name`, or bad input naming the known ones.
async fn one(pool: &PgPool, name: &str) -> CliResult<ProjectionRow> {
    let row: Option<ProjectionRow> = sqlx::query_as(&format!("{SELECT} WHERE p.name = $1"))
        .bind(name)
        .fetch_optional(pool)
        .await?;
    match row {
        Some(row) => Ok(row),
        None => {
            let known: Vec<String> = all(pool).await?.into_iter().map(|p| p.name).collect();
            Err(bad_input(format!(
                "no projection named {name:?}; known projections: {}",
                if known.is_empty() {
                    "none (a worker or repository registers its projections when it starts)"
                        .to_owned()
                } else {
                    known.join(", ")
                }
            )))
        }
    }
}

fn lag(p: &ProjectionRow) -> String {
    match (p.mode.as_str(), p.lag_seconds) {
        ("inline", _) => "-".into(),
        (_, None) => "caught up".into(),
        (_, Some(s)) => output::span(chrono::TimeDelta::milliseconds((s * 1000.0) as i64)),
    }
}

fn rebuild(p: &ProjectionRow, now: DateTime<Utc>) -> String {
    match p.rebuild_state.as_deref() {
        Some("requested") => format!(
            "requested {}",
            output::opt_relative(p.rebuild_requested_at, now)
        ),
        Some("building") => format!("building: {} events", p.build_applied.unwrap_or_default()),
        _ => match (&p.rebuild_error, p.rebuilt_at) {
            (Some(e), _) => format!("failed: {}", output::cut(e, 40)),
            (None, Some(at)) => format!("rebuilt {}", output::relative(at, now)),
            (None, None) => "-".into(),
        },
    }
}

/// `converge projections list`
pub(crate) async fn list(ctx: &Ctx) -> CliResult<()> {
    let pool = ctx.pool().await?;
    let rows = all(pool).await?;
    if ctx.json() {
        return output::print_json(&rows);
    }
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    let mut table = Table::new(&[
        "NAME", "MODE", "GEN", "APPLIED", "LAG", "ERROR", "REBUILD", "SEEN",
    ]);
    for p in &rows {
        table.row(vec![
            p.name.clone(),
            p.mode.clone(),
            p.generation.to_string(),
            p.applied.to_string(),
            lag(p),
            p.error
                .as_deref()
                .map_or("-".into(), |e| output::cut(e, 40)),
            rebuild(p, now),
            output::relative(p.seen_at, now),
        ]);
    }
    table.print_or(
        "no projections (a worker or repository registers its projections when it starts)",
    );
    Ok(())
}

/// Whether no worker has run the asynchronous projection for two minutes:
/// nothing applies its events, and retention keeps them for it.
fn unattended(p: &ProjectionRow, now: DateTime<Utc>) -> bool {
    p.mode == "async" && now - p.seen_at > chrono::TimeDelta::minutes(2)
}

/// Whether a rebuild has waited two minutes for a worker to take it (an
/// inline projection's needs one running `Worker::projection_rebuilds`);
/// retention keeps the projection's events meanwhile.
fn untaken(p: &ProjectionRow, now: DateTime<Utc>) -> bool {
    p.rebuild_state.as_deref() == Some("requested")
        && p.rebuild_requested_at
            .is_some_and(|at| now - at > chrono::TimeDelta::minutes(2))
}

/// The projections section of `converge status`: a `!` marks one stuck on
/// an event, behind by more than a minute, whose rebuild failed or has
/// waited two minutes for a worker, or that no worker has run for two
/// minutes (retention keeps its events meanwhile).
pub(crate) fn status_table(rows: &[ProjectionRow], now: DateTime<Utc>) -> Table {
    let mut table = Table::new(&["NAME", "MODE", "LAG", "ERROR", "REBUILD", "SEEN"]);
    for p in rows {
        let behind = p.lag_seconds.is_some_and(|s| s > 60.0);
        let error = match &p.error {
            Some(e) => format!("! {}", output::cut(e, 50)),
            None => "-".into(),
        };
        let rebuild = if p.rebuild_error.is_some() || untaken(p, now) {
            format!("! {}", rebuild(p, now))
        } else {
            rebuild(p, now)
        };
        table.row(vec![
            p.name.clone(),
            p.mode.clone(),
            if behind {
                format!("! {}", lag(p))
            } else {
                lag(p)
            },
            error,
            rebuild,
            if unattended(p, now) {
                format!("! {}", output::relative(p.seen_at, now))
            } else {
                output::relative(p.seen_at, now)
            },
        ]);
    }
    table
}

/// `converge projections status NAME`
pub(crate) async fn status(ctx: &Ctx, name: &str) -> CliResult<()> {
    let pool = ctx.pool().await?;
    let p = one(pool, name).await?;
    if ctx.json() {
        return output::print_json(&p);
    }
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    outln!(
        "projection {} ({}, generation {})",
        p.name,
        p.mode,
        p.generation
    );
    outln!("  tables:          {}", p.tables.join(", "));
    outln!(
        "  reads:           {}",
        if p.aggregate_types.is_empty() {
            "every aggregate type".to_owned()
        } else {
            p.aggregate_types.join(", ")
        }
    );
    outln!(
        "  applied:         {} events, the last {}",
        p.applied,
        output::opt_relative(p.last_applied_at, now)
    );
    outln!("  lag:             {}", lag(&p));
    if let Some(error) = &p.error {
        outln!(
            "  stuck:           on event {} since {}: {error}",
            output::opt(p.error_event_id),
            output::opt_relative(p.error_at, now)
        );
    }
    outln!("  rebuild:         {}", rebuild(&p, now));
    if p.rebuild_state.as_deref() == Some("building") {
        outln!(
            "                   by {} since {}",
            output::opt(p.build_instance.as_deref()),
            output::opt_relative(p.build_started_at, now)
        );
    }
    if let Some(e) = &p.rebuild_error {
        outln!("  rebuild error:   {e}");
    }
    if untaken(&p, now) {
        outln!(
            "  warning:         no worker has taken the rebuild for {}: {} (retention keeps \
             its events meanwhile)",
            output::opt_relative(p.rebuild_requested_at, now),
            if p.mode == "inline" {
                "an inline projection's rebuild needs a worker running Worker::projection_rebuilds"
            } else {
                "is a worker of this projection's version running?"
            }
        );
    }
    outln!(
        "  seen:            {} by {}",
        output::relative(p.seen_at, now),
        output::opt(p.seen_by.as_deref())
    );
    if unattended(&p, now) {
        outln!(
            "  warning:         no worker has run it for {}: nothing applies its events, and \
             retention keeps them for it (`converge projections forget {}` if it is gone for good)",
            output::span(now - p.seen_at),
            p.name
        );
    }
    Ok(())
}

/// `converge projections rebuild NAME [--wait]`
pub(crate) async fn request_rebuild(
    ctx: &Ctx,
    name: &str,
    wait: bool,
    timeout: Duration,
) -> CliResult<ExitCode> {
    let pool = ctx.pool().await?;
    let p = one(pool, name).await?;
    if let Some(state) = &p.rebuild_state {
        return Err(CliError::Failed(format!(
            "projection {name} is already being rebuilt ({state}, requested {} by {}): follow \
             it with `converge projections status {name}`",
            output::opt_time(p.rebuild_requested_at),
            output::opt(p.rebuild_requested_by.as_deref())
        )));
    }
    if p.tables.is_empty() {
        return Err(CliError::Failed(format!(
            "projection {name} declares no tables, so it cannot be rebuilt (its Projection::TABLES \
             is empty)"
        )));
    }
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    let stale = now - p.seen_at > chrono::TimeDelta::minutes(2);
    let entry = audit::begin(
        ctx,
        "projection.rebuild",
        name,
        json!({ "mode": p.mode, "generation": p.generation, "wait": wait }),
    )
    .await?;
    let id = entry.id;
    let machine = ctx.json();
    let work = async move {
        let requested =
            converge::eventsourcing::request_rebuild(pool, name, &ctx.actor(), Some(id)).await?;
        if !requested {
            return Ok(Settled::err(
                AuditOutcome::Failed,
                json!({ "error": "a rebuild was requested meanwhile" }),
                CliError::Failed(format!(
                    "a rebuild of {name} was requested meanwhile: follow it with `converge \
                     projections status {name}`"
                )),
            ));
        }
        if !wait {
            if machine {
                output::print_json(&json!({ "requested": name, "audit_id": id }))?;
            } else {
                outln!(
                    "rebuild of projection {name} requested (audit #{id}); a worker running it \
                     fills copies of {} from history and swaps them in: follow it with \
                     `converge projections status {name}`",
                    p.tables.join(", ")
                );
                if stale {
                    outln!(
                        "warning: no worker has run {name} since {}: the rebuild starts when \
                         one does",
                        output::time(p.seen_at)
                    );
                }
            }
            return Ok(Settled::ok(json!({ "requested": true }), ExitCode::SUCCESS));
        }
        follow(pool, name, id, timeout, machine).await
    };
    entry
        .settle_or_interrupt(work, || {
            Settled::err(
                AuditOutcome::Interrupted,
                json!({ "requested": true }),
                CliError::Interrupted(format!(
                    "stopped waiting; the rebuild of {name} stays requested and a worker carries \
                     it out: follow it with `converge projections status {name}`"
                )),
            )
        })
        .await
}

/// Waits for the worker's audit entry of the rebuild requested in entry
/// `requested_in`.
async fn follow(
    pool: &PgPool,
    name: &str,
    requested_in: i64,
    timeout: Duration,
    machine: bool,
) -> CliResult<Settled<ExitCode>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let settled: Option<(i64, String, Value)> = sqlx::query_as(
            "SELECT id, outcome, details FROM converge.audit \
             WHERE action = 'projection.rebuild' AND (details->>'requested_in')::bigint = $1 \
               AND finished_at IS NOT NULL",
        )
        .bind(requested_in)
        .fetch_optional(pool)
        .await?;
        if let Some((worker_entry, outcome, details)) = settled {
            let summary = json!({ "worker_entry": worker_entry, "worker": details });
            if machine {
                output::print_json(&json!({
                    "projection": name, "outcome": outcome, "details": details,
                }))?;
            }
            return Ok(if outcome == "ok" {
                if !machine {
                    outln!(
                        "projection {name} rebuilt: {} events applied to its new tables, now \
                         generation {}",
                        details["events"],
                        details["generation"]
                    );
                }
                Settled::ok(summary, ExitCode::SUCCESS)
            } else {
                Settled::err(
                    AuditOutcome::Failed,
                    summary,
                    CliError::Failed(format!(
                        "the rebuild of {name} was refused: {}",
                        details["error"].as_str().unwrap_or("see converge audit")
                    )),
                )
            });
        }
        // In one snapshot with the audit read above being empty: a rebuild
        // that ended without a worker's settled entry (cancelled before a
        // worker took it, or the projection forgotten) will never get one.
        let ended: Option<Option<String>> = sqlx::query_scalar(
            "SELECT (SELECT CASE \
                        WHEN p.name IS NULL THEN 'the projection was forgotten' \
                        WHEN p.rebuild_state IS NULL THEN coalesce(p.rebuild_error, 'it ended') \
                     END \
                     FROM (SELECT 1) one \
                     LEFT JOIN converge.projections p ON p.name = $1) \
             WHERE NOT EXISTS (SELECT 1 FROM converge.audit \
                               WHERE action = 'projection.rebuild' \
                                 AND (details->>'requested_in')::bigint = $2 \
                                 AND finished_at IS NOT NULL)",
        )
        .bind(name)
        .bind(requested_in)
        .fetch_optional(pool)
        .await?;
        if let Some(Some(why)) = ended {
            if machine {
                output::print_json(&json!({
                    "projection": name, "outcome": "failed", "details": { "error": why },
                }))?;
            }
            return Ok(Settled::err(
                AuditOutcome::Failed,
                json!({ "error": why }),
                CliError::Failed(format!(
                    "the rebuild of {name} ended without a worker finishing it: {why}"
                )),
            ));
        }
        if tokio::time::Instant::now() >= deadline {
            if machine {
                output::print_json(&json!({
                    "projection": name, "outcome": "timed_out",
                    "details": { "timeout_seconds": timeout.as_secs() },
                }))?;
            }
            return Ok(Settled::err(
                AuditOutcome::TimedOut,
                json!({ "requested": true }),
                CliError::Failed(format!(
                    "the rebuild of {name} did not finish within {} s; it stays requested or \
                     under way: follow it with `converge projections status {name}`",
                    timeout.as_secs()
                )),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `converge projections rebuild NAME --cancel`
pub(crate) async fn cancel_rebuild(ctx: &Ctx, name: &str) -> CliResult<()> {
    let pool = ctx.pool().await?;
    let p = one(pool, name).await?;
    let Some(state) = p.rebuild_state.clone() else {
        return Err(CliError::Failed(format!(
            "no rebuild of {name} is requested or under way{}",
            match &p.rebuild_error {
                Some(e) => format!(" (the last one ended: {e})"),
                None => String::new(),
            }
        )));
    };
    let entry = audit::begin(
        ctx,
        "projection.rebuild.cancel",
        name,
        json!({ "state": state, "build_applied": p.build_applied }),
    )
    .await?;
    let cancelled = entry
        .settle(async {
            let cancelled =
                converge::eventsourcing::cancel_rebuild(pool, name, &ctx.actor()).await?;
            if cancelled {
                Ok(Settled::ok(json!({ "cancelled": true }), true))
            } else {
                Ok(Settled::err(
                    AuditOutcome::Failed,
                    json!({ "cancelled": false }),
                    CliError::Failed(format!(
                        "the rebuild of {name} ended meanwhile: see `converge projections \
                         status {name}`"
                    )),
                ))
            }
        })
        .await?;
    if ctx.json() {
        return output::print_json(&json!({ "cancelled": name, "was": state }));
    }
    debug_assert!(cancelled);
    outln!(
        "rebuild of projection {name} cancelled ({state}); its live tables are as they were, and \
         its copies (if any) stay until the next rebuild replaces them"
    );
    Ok(())
}

/// `converge projections forget NAME --yes`
pub(crate) async fn forget(ctx: &Ctx, name: &str, yes: bool) -> CliResult<()> {
    let pool = ctx.pool().await?;
    let p = one(pool, name).await?;
    if !yes {
        return Err(bad_input(format!(
            "forgetting {name} deletes its cursor and rebuild state, not its tables ({}), and \
             releases the events retention keeps for it; a worker or repository registering it \
             again starts it over (an asynchronous one over tables holding rows starts at the \
             outbox's head and rebuilds them; over empty ones it applies every event from the \
             first). Stop what runs it, then pass --yes",
            p.tables.join(", ")
        )));
    }
    let entry = audit::begin(
        ctx,
        "projection.forget",
        name,
        json!({ "mode": p.mode, "generation": p.generation, "applied": p.applied }),
    )
    .await?;
    entry
        .settle(async {
            let forgotten = converge::eventsourcing::forget_projection(pool, name).await?;
            Ok(Settled::ok(json!({ "forgotten": forgotten }), ()))
        })
        .await?;
    if ctx.json() {
        return output::print_json(&json!({ "forgotten": name }));
    }
    outln!("projection {name} forgotten; its tables are left as they are");
    Ok(())
}
