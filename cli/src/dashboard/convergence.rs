//! `/convergence`: per sweep, the unconverged keys and the oldest one's age
//! over the last hours or days (`converge.convergence_history`), drawn as an
//! SVG line chart with the sweep's runs marked on the time axis.

use axum::extract::{Query, State};
use axum::response::Response;
use chrono::{DateTime, TimeDelta, Utc};
use maud::{html, Markup};

use super::pages::{failure, page};
use super::Shared;
use crate::error::CliResult;
use crate::output;

/// The ranges a chart can show.
const RANGES: &[(&str, i64)] = &[
    ("1h", 3_600),
    ("6h", 6 * 3_600),
    ("24h", 86_400),
    ("7d", 7 * 86_400),
    ("14d", 14 * 86_400),
];
/// Points per chart at most: the history is bucketed to this many.
const POINTS: i64 = 240;
const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 180.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 56.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 24.0;
/// Ages drawn at most (a century): a clock far off does not break the page.
const MAX_AGE_SECS: f64 = 100.0 * 365.0 * 86_400.0;

/// `?range=6h`
#[derive(Debug, serde::Deserialize)]
pub(crate) struct Range {
    range: Option<String>,
}

#[derive(Debug, sqlx::FromRow)]
struct Point {
    at: DateTime<Utc>,
    keys: i64,
    age_secs: Option<f64>,
}

#[derive(Debug, sqlx::FromRow)]
struct Run {
    id: i64,
    started_at: DateTime<Utc>,
    status: String,
}

struct Series {
    sweep: String,
    /// The latest measurement itself (the points are per-interval maxima).
    latest: Option<Point>,
    points: Vec<Point>,
    runs: Vec<Run>,
}

async fn load(state: &Shared, seconds: i64) -> CliResult<(Vec<Series>, DateTime<Utc>)> {
    let pool = state.ctx.pool().await?;
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    let sweeps: Vec<String> =
        sqlx::query_scalar("SELECT sweep FROM converge.sweep_schedules ORDER BY 1")
            .fetch_all(pool)
            .await?;
    let bucket = (seconds / POINTS).max(1) as f64;
    let mut out = Vec::new();
    for sweep in sweeps {
        // The largest figure of each bucket: a spike stays visible.
        let points = sqlx::query_as(
            "SELECT date_bin(make_interval(secs => $3), measured_at, 'epoch'::timestamptz) AS at, \
                    max(unconverged_keys)::bigint AS keys, \
                    max(CASE WHEN isfinite(oldest_unconverged_at) \
                        THEN extract(epoch FROM measured_at - oldest_unconverged_at) END)::float8 \
                      AS age_secs \
             FROM converge.convergence_history \
             WHERE sweep = $1 AND measured_at > now() - make_interval(secs => $2) \
             GROUP BY 1 ORDER BY 1",
        )
        .bind(&sweep)
        .bind(seconds as f64)
        .bind(bucket)
        .fetch_all(pool)
        .await?;
        let runs = sqlx::query_as(
            "SELECT id, started_at, status FROM converge.sweep_runs \
             WHERE sweep = $1 AND started_at > now() - make_interval(secs => $2) \
             ORDER BY id DESC LIMIT 500",
        )
        .bind(&sweep)
        .bind(seconds as f64)
        .fetch_all(pool)
        .await?;
        let latest = sqlx::query_as(
            "SELECT measured_at AS at, unconverged_keys AS keys, \
                    CASE WHEN isfinite(oldest_unconverged_at) \
                      THEN extract(epoch FROM measured_at - oldest_unconverged_at)::float8 END \
                      AS age_secs \
             FROM converge.convergence_history WHERE sweep = $1 \
             ORDER BY measured_at DESC LIMIT 1",
        )
        .bind(&sweep)
        .fetch_optional(pool)
        .await?;
        out.push(Series {
            sweep,
            latest,
            points,
            runs,
        });
    }
    Ok((out, now))
}

/// `/convergence?range=6h`
pub(crate) async fn page_route(State(state): State<Shared>, Query(q): Query<Range>) -> Response {
    let wanted = q.range.as_deref().unwrap_or("6h");
    let Some(&(label, seconds)) = RANGES.iter().find(|(l, _)| *l == wanted) else {
        return failure(
            &state,
            crate::error::bad_input(format!(
                "range {wanted:?}: one of {}",
                RANGES.iter().map(|r| r.0).collect::<Vec<_>>().join(", ")
            )),
        );
    };
    let (series, now) = match load(&state, seconds).await {
        Ok(x) => x,
        Err(e) => return failure(&state, e),
    };
    let body = html! {
        p {
            "Range: "
            @for (l, _) in RANGES {
                @if *l == label { strong { (l) } " " } @else { a href=(format!("/convergence?range={l}")) { (l) } " " }
            }
            span.muted { "· each measurement is kept 14 days · the largest figure of each interval is drawn" }
        }
        p.legend { span.k { "━ unconverged keys (left axis)" } span.a { "┅ oldest one's age (right axis)" } span.r { "│ sweep runs (red: failed)" } }
        @if series.is_empty() { p.muted { "no sweep registered" } }
        @for s in &series {
            h2 { "Sweep " (s.sweep) }
            @match &s.latest {
                Some(p) => p.figures {
                    "Latest (" (output::relative(p.at, now)) "): " strong.keys data-sweep=(s.sweep) { (p.keys) } " unconverged keys, oldest waiting "
                    strong { (p.age_secs.filter(|a| a.is_finite()).map(|a| output::span(TimeDelta::milliseconds((a.clamp(-MAX_AGE_SECS, MAX_AGE_SECS) * 1000.0) as i64))).unwrap_or_else(|| "-".into())) }
                    " · " (s.points.len()) " points · " (s.runs.len()) " runs in range"
                },
                None => p.muted { "no measurement yet (workers measure every 10 s by default, for sweeps whose candidates can say)" },
            }
            (chart(s, now, seconds))
        }
    };
    page(&state, "/convergence", "Convergence", body)
}

fn chart(s: &Series, now: DateTime<Utc>, seconds: i64) -> Markup {
    let start = now - TimeDelta::seconds(seconds);
    let x = |t: DateTime<Utc>| {
        let f = (t - start).num_milliseconds() as f64 / (seconds as f64 * 1000.0);
        LEFT + f.clamp(0.0, 1.0) * (WIDTH - LEFT - RIGHT)
    };
    let max_keys = s
        .points
        .iter()
        .chain(s.latest.as_ref())
        .map(|p| p.keys)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let max_age = s
        .points
        .iter()
        .filter_map(|p| p.age_secs)
        .filter(|a| a.is_finite())
        .fold(0.0_f64, f64::max)
        .clamp(1.0, MAX_AGE_SECS);
    let plot = HEIGHT - TOP - BOTTOM;
    let y_keys = |k: i64| TOP + plot - (k as f64 / max_keys) * plot;
    let y_age = |a: f64| TOP + plot - (a / max_age) * plot;
    let keys: String = s
        .points
        .iter()
        .map(|p| format!("{:.1},{:.1}", x(p.at), y_keys(p.keys)))
        .collect::<Vec<_>>()
        .join(" ");
    let ages: String = s
        .points
        .iter()
        .map(|p| {
            let age = p.age_secs.filter(|a| a.is_finite()).unwrap_or(0.0);
            format!("{:.1},{:.1}", x(p.at), y_age(age.clamp(0.0, max_age)))
        })
        .collect::<Vec<_>>()
        .join(" ");
    let ticks: Vec<(f64, String)> = (0..=4)
        .map(|i| {
            let t = start + TimeDelta::seconds(seconds * i / 4);
            let label = if seconds > 86_400 {
                t.format("%m-%d %H:%M").to_string()
            } else {
                t.format("%H:%M").to_string()
            };
            (x(t), label)
        })
        .collect();
    let age_label = output::span(TimeDelta::seconds(max_age as i64));
    html! {
        svg.chart width=(WIDTH) height=(HEIGHT) viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img"
            aria-label=(format!("convergence of sweep {}", s.sweep)) {
            @for (tx, label) in &ticks {
                line.grid x1=(tx) x2=(tx) y1=(TOP) y2=(HEIGHT - BOTTOM) {}
                text x=(tx) y=(HEIGHT - 6.0) text-anchor="middle" { (label) " UTC" }
            }
            text x=(LEFT - 6.0) y=(TOP + 10.0) text-anchor="end" { (max_keys as i64) }
            text x=(LEFT - 6.0) y=(HEIGHT - BOTTOM) text-anchor="end" { "0" }
            text x=(WIDTH - RIGHT + 6.0) y=(TOP + 10.0) { (age_label) }
            @for r in &s.runs {
                line class=(if r.status == "completed" || r.status == "running" { "run" } else { "run failed" })
                    x1=(format!("{:.1}", x(r.started_at))) x2=(format!("{:.1}", x(r.started_at)))
                    y1=(TOP) y2=(HEIGHT - BOTTOM) {
                    title { "run #" (r.id) " " (r.status) " at " (output::time(r.started_at)) }
                }
            }
            @if !s.points.is_empty() {
                polyline.age points=(ages) {}
                polyline.keys points=(keys) {}
            }
            @if let Some(p) = s.latest.as_ref().filter(|p| p.at > start) {
                circle.latest cx=(format!("{:.1}", x(p.at))) cy=(format!("{:.1}", y_keys(p.keys))) r="3" {
                    title { (p.keys) " unconverged keys at " (output::time(p.at)) }
                }
            }
        }
    }
}
