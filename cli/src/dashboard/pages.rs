//! The page frame, and the pages that show what `converge status`,
//! `converge leases list` and `converge audit` show: overview, leases, audit.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{html, Markup, DOCTYPE};

use super::{Power, Shared};
use crate::error::CliError;
use crate::output;

const NAV: &[(&str, &str)] = &[
    ("/", "Overview"),
    ("/convergence", "Convergence"),
    ("/sweeps", "Sweeps"),
    ("/dead-letters", "Dead letters"),
    ("/leases", "Leases"),
    ("/audit", "Audit"),
];

/// A whole page: the navigation, `here` marked, and `body`.
pub(crate) fn page(state: &Shared, here: &str, title: &str, body: Markup) -> Response {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                (head(title))
                body {
                    header {
                        span.brand { "converge" }
                        @for (href, name) in NAV {
                            a href=(href) class=[(*href == here).then_some("here")] { (name) }
                        }
                        span.role data-power=(match state.power { Power::Operator => "operator", Power::Viewer => "viewer" }) {
                            "role " (state.role) " · "
                            @match state.power {
                                Power::Operator => "operator",
                                Power::Viewer => "viewer (read-only)",
                            }
                        }
                    }
                    main {
                        h1 { (title) }
                        (body)
                    }
                }
            }
        }
        .into_string(),
    )
    .into_response()
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · converge" }
            link rel="stylesheet" href="/assets/style.css";
        }
    }
}

/// A page without navigation (the login form).
pub(crate) fn bare(title: &str, body: Markup) -> Response {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                (head(title))
                body { main { h1 { (title) } (body) } }
            }
        }
        .into_string(),
    )
    .into_response()
}

/// An error page: what failed, with the status it deserves.
pub(crate) fn failure(state: &Shared, error: CliError) -> Response {
    let status = match &error {
        CliError::BadInput(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut response = page(
        state,
        "",
        "Error",
        html! { div.error { (error.to_string()) } },
    );
    *response.status_mut() = status;
    response
}

/// `3m05s ago`, and the exact time on hover.
pub(crate) fn when(t: DateTime<Utc>, now: DateTime<Utc>) -> Markup {
    html! { span title=(output::time(t)) { (output::relative(t, now)) } }
}

/// `when`, or `-`.
pub(crate) fn when_opt(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Markup {
    match t {
        Some(t) => when(t, now),
        None => html! { "-" },
    }
}

fn card(label: &str, figure: impl std::fmt::Display, id: &str, class: Option<&str>) -> Markup {
    html! {
        div.card {
            div.figure id=(id) class=[class] { (figure) }
            div.label { (label) }
        }
    }
}

/// `/`: the outbox, the relays, workers, consumers, dead letters, sweeps.
pub(crate) async fn overview(State(state): State<Shared>) -> Response {
    let r = match crate::status::report(&state.ctx).await {
        Ok(r) => r,
        Err(e) => return failure(&state, e),
    };
    let now = r.now;
    let o = &r.outbox;
    let open: i64 = r.dead_letters.iter().map(|d| d.open).sum();
    let oldest = o
        .oldest_unpublished_at
        .map(|t| output::span(now - t))
        .unwrap_or_else(|| "-".into());
    let body = html! {
        div.cards {
            (card("events not yet on the stream", o.backlog, "backlog", (o.backlog > 0).then_some("warn")))
            (card("oldest unpublished", &oldest, "oldest-unpublished", None))
            (card("open dead letters", open, "open-dead-letters", (open > 0).then_some("bad")))
            (card("live workers", r.workers.len(), "live-workers", None))
            (card("relays", r.relays.len(), "relays", None))
        }
        @if o.rejected > 0 {
            div.notice { (o.rejected) " events rejected by the relay (converge.relay_rejects)" }
        }
        @if let Some(x) = &r.holding_transaction {
            div.error id="holding-transaction" {
                strong { (x.to_string()) }
                " holds the relays back (user " (x.user_name.as_deref().unwrap_or("?")) "): "
                code { (x.query.as_deref().unwrap_or("")) }
                br;
                "End it (" (if x.prepared { "COMMIT PREPARED / ROLLBACK PREPARED" } else { "COMMIT, ROLLBACK or pg_terminate_backend" })
                ") or events committed after it stay unpublished."
            }
        }
        h2 { "Relays" }
        @if r.relays.is_empty() { p.muted { "no relay running" } } @else {
            table {
                tr { th { "Name" } th { "Instance" } th { "Heartbeat" } th { "Partitions" } th { "State" } }
                @for relay in &r.relays {
                    tr {
                        td { (relay.name) } td { code { (relay.instance_id) } }
                        td { (when(relay.heartbeat_at, now)) }
                        td { (output::ranges(&relay.partitions)) " (" (relay.partitions.len()) ")" }
                        td { (if relay.armed { "idle" } else { "busy" }) }
                    }
                }
            }
        }
        @if !r.unowned_partitions.is_empty() && (!r.relays.is_empty() || o.backlog > 0) {
            div.notice { "partitions without a live relay: " (output::ranges(&r.unowned_partitions)) }
        }
        h2 { "Workers (heartbeat in the last 60 s)" }
        @if r.workers.is_empty() { p.muted { "no live worker" } } @else {
            table {
                tr { th { "Instance" } th { "Application" } th { "Started" } th { "Heartbeat" } th { "Stream" } th { "Consumers" } th { "Sweeps" } th { "Reconcilers" } }
                @for w in &r.workers {
                    tr {
                        td { (w.instance) } td { (w.application) }
                        td { (when(w.started_at, now)) } td { (when(w.heartbeat_at, now)) }
                        td { (w.stream.as_deref().unwrap_or("-")) }
                        td { (w.consumers.join(", ")) } td { (w.sweeps.join(", ")) } td { (w.reconcilers.join(", ")) }
                    }
                }
            }
        }
        h2 { "Consumers" }
        @if r.consumers.is_empty() { p.muted { "no consumer registered by a live worker" } } @else {
            table {
                tr { th { "Consumer" } th { "Application" } th { "Stream" } th.num { "Pending" } th.num { "Ack pending" } th.num { "Redelivered" } }
                @for c in &r.consumers {
                    tr {
                        td { (c.consumer) } td { (c.application) } td { (c.stream.as_deref().unwrap_or("-")) }
                        @if let Some(e) = &c.error {
                            td.bad colspan="3" { (e) }
                        } @else {
                            td.num { (output::opt(c.pending)) } td.num { (output::opt(c.ack_pending)) } td.num { (output::opt(c.redelivered)) }
                        }
                    }
                }
            }
        }
        h2 { "Dead letters (open)" }
        @if r.dead_letters.is_empty() { p.muted { "none" } } @else {
            table {
                tr { th { "Reconciler" } th.num { "Open" } th { "Oldest" } }
                @for d in &r.dead_letters {
                    tr {
                        td { a href=(format!("/dead-letters?reconciler={}", urlencode(&d.reconciler))) { (d.reconciler) } }
                        td.num { (d.open) } td { (when(d.oldest_failed_at, now)) }
                    }
                }
            }
        }
        h2 { "Sweeps" }
        (super::sweeps::summary(&r.sweeps, now))
    };
    page(&state, "/", "Overview", body)
}

/// `/leases`: every lease, held or not.
pub(crate) async fn leases(State(state): State<Shared>) -> Response {
    let pool = match state.ctx.pool().await {
        Ok(p) => p,
        Err(e) => return failure(&state, e),
    };
    let (rows, now) = match tokio::try_join!(crate::locks::leases(pool, false), async {
        Ok::<DateTime<Utc>, CliError>(sqlx::query_scalar("SELECT now()").fetch_one(pool).await?)
    }) {
        Ok(x) => x,
        Err(e) => return failure(&state, e),
    };
    let body = html! {
        @if rows.is_empty() { p.muted { "no lease was ever taken" } } @else {
            table {
                tr { th { "Name" } th { "Holder" } th.num { "Token" } th { "Acquired" } th { "Heartbeat" } th { "Held until" } th { "Released" } th { "State" } }
                @for l in &rows {
                    tr {
                        td { (l.name) } td { (l.holder.as_deref().unwrap_or("-")) } td.num { (l.token) }
                        td { (when_opt(l.acquired_at, now)) } td { (when_opt(l.heartbeat_at, now)) }
                        td { (when_opt(l.lock_until, now)) } td { (when_opt(l.released_at, now)) }
                        td class=(if l.live { "ok" } else { "muted" }) { (if l.live { "held" } else { "free" }) }
                    }
                }
            }
        }
    };
    page(&state, "/leases", "Leases", body)
}

/// `/audit`: the latest 200 operator actions.
pub(crate) async fn audit(State(state): State<Shared>) -> Response {
    let pool = match state.ctx.pool().await {
        Ok(p) => p,
        Err(e) => return failure(&state, e),
    };
    let rows = match crate::audit::latest(pool, 200).await {
        Ok(r) => r,
        Err(e) => return failure(&state, e),
    };
    let now = Utc::now();
    let body = html! {
        @if rows.is_empty() { p.muted { "no action recorded" } } @else {
            table {
                tr { th.num { "#" } th { "At" } th { "Actor" } th { "Action" } th { "Target" } th { "Reason" } th { "Outcome" } th { "Details" } }
                @for a in &rows {
                    tr {
                        td.num { (a.id) } td { (when(a.at, now)) } td { (a.actor) } td { code { (a.action) } }
                        td { (output::cut(&a.target, 80)) } td { (a.reason.as_deref().unwrap_or("")) }
                        td class=(match a.outcome.as_deref() { Some("ok") => "ok", None => "warn", _ => "bad" }) { (a.outcome.as_deref().unwrap_or("running")) }
                        td { code { (output::cut(&a.details.to_string(), 160)) } }
                    }
                }
            }
        }
    };
    page(&state, "/audit", "Audit log", body)
}

/// `s` for a query string.
pub(crate) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
