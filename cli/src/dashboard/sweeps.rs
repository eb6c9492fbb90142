//! `/sweeps`: each sweep's schedule and the fire times ahead (daylight-saving
//! changes among them marked), its runs, and a run's failed keys.

use axum::extract::{Path, State};
use axum::response::Response;
use chrono::{DateTime, TimeDelta, Utc};
use converge::sweeper::{offset_changes, CronSchedule};
use maud::{html, Markup};

use super::pages::{failure, page, when, when_opt};
use super::Shared;
use crate::error::{CliError, CliResult};
use crate::output;
use crate::sweep::SweepRow;

/// How many fire times ahead a cron sweep shows.
const FIRES_AHEAD: usize = 6;
/// How far ahead clock changes are looked for: a year, so a zone that
/// observes daylight saving always shows its next change.
const CHANGES_AHEAD_DAYS: i64 = 370;

/// The sweeps table of the overview.
pub(crate) fn summary(rows: &[SweepRow], now: DateTime<Utc>) -> Markup {
    html! {
        @if rows.is_empty() { p.muted { "no sweep registered" } } @else {
            table {
                tr { th { "Sweep" } th { "Application" } th { "Next fire" } th { "Last run" } th.num { "Unconverged" } th { "Oldest waiting" } }
                @for s in rows {
                    tr {
                        td { a href="/sweeps" { (s.sweep) } } td { (s.application.as_deref().unwrap_or("-")) }
                        td { (when_opt(s.next_fire_at, now)) }
                        td {
                            @if let (Some(id), Some(status)) = (s.last_run_id, &s.last_status) {
                                a href=(format!("/sweeps/runs/{id}")) { "#" (id) } " "
                                span class=(status_class(status)) { (status) }
                            } @else { "-" }
                        }
                        td.num.unconverged data-sweep=(s.sweep) { (output::opt(s.unconverged_keys)) }
                        td { @if let Some(o) = s.oldest_unconverged_at { (output::span(now - o)) } @else { "-" } }
                    }
                }
            }
        }
    }
}

fn status_class(status: &str) -> &'static str {
    match status {
        "completed" => "ok",
        "running" => "warn",
        _ => "bad",
    }
}

/// A sweep's declared schedule (`converge.sweep_schedules`).
#[derive(Debug, sqlx::FromRow)]
struct Declared {
    sweep: String,
    schedule: Option<String>,
    cron: Option<String>,
    time_zone: Option<String>,
}

#[derive(Debug, sqlx::FromRow)]
struct RunRow {
    id: i64,
    sweep: String,
    trigger: String,
    instance: String,
    started_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    status: String,
    scanned: i32,
    reconciled: i32,
    converged: i32,
    failed: i32,
    busy: i32,
    error: Option<String>,
    failures: i64,
}

const RUNS: &str = "SELECT r.id, r.sweep, r.trigger, r.instance, r.started_at, r.finished_at, \
    r.status, r.scanned, r.reconciled, r.converged, r.failed, r.busy, r.error, \
    (SELECT count(*) FROM converge.sweep_run_failures f WHERE f.run_id = r.id) AS failures \
    FROM converge.sweep_runs r";

/// Fire times ahead of a cron sweep, and the clock changes among them.
struct Ahead {
    fires: Vec<DateTime<Utc>>,
    /// (instant, offset before, offset after), in seconds east of UTC.
    changes: Vec<(DateTime<Utc>, i32, i32)>,
}

fn ahead(d: &Declared, now: DateTime<Utc>) -> Option<Result<Ahead, String>> {
    let zone = d.time_zone.as_deref()?;
    let tz: converge::chrono_tz::Tz = match zone.parse() {
        Ok(tz) => tz,
        Err(e) => return Some(Err(format!("time zone {zone:?}: {e}"))),
    };
    let fires = match &d.cron {
        Some(expression) => match CronSchedule::parse(expression, tz) {
            Ok(c) => c.upcoming(now).take(FIRES_AHEAD).collect(),
            Err(e) => return Some(Err(e.to_string())),
        },
        None => Vec::new(),
    };
    let until = fires
        .last()
        .copied()
        .unwrap_or(now)
        .max(now + TimeDelta::days(CHANGES_AHEAD_DAYS));
    let offset = |t: DateTime<Utc>| {
        use chrono::{Offset, TimeZone};
        tz.offset_from_utc_datetime(&t.naive_utc())
            .fix()
            .local_minus_utc()
    };
    let changes = offset_changes(tz, now, until)
        .into_iter()
        .map(|t| (t, offset(t - TimeDelta::seconds(1)), offset(t)))
        .collect();
    Some(Ok(Ahead { fires, changes }))
}

fn utc_offset(seconds: i32) -> String {
    let sign = if seconds < 0 { '-' } else { '+' };
    let s = seconds.unsigned_abs();
    format!("UTC{sign}{:02}:{:02}", s / 3600, (s % 3600) / 60)
}

async fn load(
    state: &Shared,
) -> CliResult<(Vec<SweepRow>, Vec<Declared>, Vec<RunRow>, DateTime<Utc>)> {
    let pool = state.ctx.pool().await?;
    let rows = crate::sweep::sweeps(pool, None).await?;
    let declared = sqlx::query_as(
        "SELECT sweep, schedule, cron, time_zone FROM converge.sweep_schedules ORDER BY sweep",
    )
    .fetch_all(pool)
    .await?;
    let runs = sqlx::query_as(&format!("{RUNS} ORDER BY r.id DESC LIMIT 50"))
        .fetch_all(pool)
        .await?;
    let now = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    Ok((rows, declared, runs, now))
}

/// `/sweeps`
async fn page_handler(state: &Shared) -> Response {
    let (rows, declared, runs, now) = match load(state).await {
        Ok(x) => x,
        Err(e) => return failure(state, e),
    };
    let body = html! {
        (summary(&rows, now))
        @for d in &declared {
            h2 { "Sweep " (d.sweep) }
            p { "Schedule: " (d.schedule.as_deref().unwrap_or("not declared (a worker of an earlier converge registered it)")) }
            @match ahead(d, now) {
                None => {}
                Some(Err(e)) => { div.error { "cannot compute the fire times ahead: " (e) } }
                Some(Ok(a)) => {
                    @if !a.fires.is_empty() {
                        table.fires data-sweep=(d.sweep) {
                            tr { th { "Fires at (UTC)" } th { "Local time" } th { "In" } }
                            @for (i, f) in a.fires.iter().enumerate() {
                                @let previous = if i == 0 { now } else { a.fires[i - 1] };
                                @for c in a.changes.iter().filter(|c| c.0 > previous && c.0 <= *f) {
                                    tr.dst {
                                        td.warn colspan="3" {
                                            "clocks change at " (output::time(c.0)) ": "
                                            (utc_offset(c.1)) " → " (utc_offset(c.2))
                                            " (" (d.time_zone.as_deref().unwrap_or("")) ")"
                                        }
                                    }
                                }
                                tr {
                                    td { (output::time(*f)) }
                                    td { (local(*f, d.time_zone.as_deref())) }
                                    td { (output::relative(*f, now)) }
                                }
                            }
                        }
                    }
                    @let later: Vec<_> = a.changes.iter().filter(|c| a.fires.last().is_none_or(|l| c.0 > *l)).take(2).collect();
                    @for c in later {
                        p.warn.dst { "clock change ahead at " (output::time(c.0)) ": " (utc_offset(c.1)) " → " (utc_offset(c.2)) " (" (d.time_zone.as_deref().unwrap_or("")) "): local fire times move against UTC" }
                    }
                }
            }
        }
        h2 { "Runs (latest 50)" }
        (runs_table(&runs, now))
    };
    page(state, "/sweeps", "Sweeps", body)
}

/// `/sweeps` (axum).
pub(crate) async fn page_route(State(state): State<Shared>) -> Response {
    page_handler(&state).await
}

fn local(t: DateTime<Utc>, zone: Option<&str>) -> String {
    match zone.and_then(|z| z.parse::<converge::chrono_tz::Tz>().ok()) {
        Some(tz) => t
            .with_timezone(&tz)
            .format("%Y-%m-%d %H:%M:%S %Z")
            .to_string(),
        None => "-".into(),
    }
}

fn runs_table(runs: &[RunRow], now: DateTime<Utc>) -> Markup {
    html! {
        @if runs.is_empty() { p.muted { "no run yet" } } @else {
            table {
                tr { th.num { "Run" } th { "Sweep" } th { "Trigger" } th { "Instance" } th { "Started" } th { "Took" } th { "Status" } th.num { "Scanned" } th.num { "Changed" } th.num { "Converged" } th.num { "Failed" } th.num { "Busy" } th { "Error" } }
                @for r in runs {
                    tr {
                        td.num { a href=(format!("/sweeps/runs/{}", r.id)) { "#" (r.id) } }
                        td { (r.sweep) } td { (r.trigger) } td { (r.instance) }
                        td { (when(r.started_at, now)) }
                        td { @if let Some(f) = r.finished_at { (output::span(f - r.started_at)) } @else { "-" } }
                        td class=(status_class(&r.status)) { (r.status) }
                        td.num { (r.scanned) } td.num { (r.reconciled) } td.num { (r.converged) }
                        td.num class=[(r.failed > 0).then_some("bad")] { (r.failed) } td.num { (r.busy) }
                        td { (output::cut(r.error.as_deref().unwrap_or(""), 100)) }
                    }
                }
            }
        }
    }
}

/// `/sweeps/runs/{id}`: a run and its failed keys.
pub(crate) async fn run(State(state): State<Shared>, Path(id): Path<i64>) -> Response {
    let loaded = async {
        let pool = state.ctx.pool().await?;
        let run: Option<RunRow> = sqlx::query_as(&format!("{RUNS} WHERE r.id = $1"))
            .bind(id)
            .fetch_optional(pool)
            .await?;
        let failures: Vec<(String, String, i32)> = sqlx::query_as(
            "SELECT aggregate_key, error, attempts FROM converge.sweep_run_failures \
             WHERE run_id = $1 ORDER BY aggregate_key LIMIT 1000",
        )
        .bind(id)
        .fetch_all(pool)
        .await?;
        let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
        Ok::<_, CliError>((run, failures, now))
    };
    let (run, failures, now) = match loaded.await {
        Ok((Some(run), failures, now)) => (run, failures, now),
        Ok((None, ..)) => {
            return failure(
                &state,
                crate::error::bad_input(format!("no sweep run with id {id}")),
            )
        }
        Err(e) => return failure(&state, e),
    };
    let body = html! {
        (runs_table(std::slice::from_ref(&run), now))
        h2 { "Failed keys (" (run.failures) ")" }
        @if failures.is_empty() { p.muted { "none recorded" } } @else {
            table {
                tr { th { "Key" } th.num { "Attempts" } th { "Error" } }
                @for (key, error, attempts) in &failures {
                    tr { td { (key) } td.num { (attempts) } td { (error) } }
                }
            }
        }
        @if state.power == super::Power::Operator {
            (super::replay::form(&state, run.id, run.failures))
        }
    };
    page(&state, "/sweeps", &format!("Sweep run #{id}"), body)
}
