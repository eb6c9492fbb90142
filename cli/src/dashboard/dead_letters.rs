//! `/dead-letters`: filter open letters (reconciler, error text, age), show
//! one, and retry or discard one or all matching: a confirmation naming the
//! count first, then the action, audited as the CLI's bulk actions are.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::Form;
use chrono::{DateTime, Utc};
use maud::{html, Markup};

use super::access::refusal;
use super::pages::{failure, page, when, when_opt};
use super::{Power, Shared};
use crate::dead_letter_filter::{DeadLetterFilter, Matches, Selection, FILTER_SQL};
use crate::dead_letters::{payload_value, DeadLetterRow, SELECT};
use crate::error::{bad_input, CliResult};
use crate::output;

/// Letters listed on a page at most.
const LISTED: i64 = 200;
/// Letters one action takes at most (as the CLI's default `--limit`).
const ACT_LIMIT: i64 = 10_000;
/// How long a retry waits for the workers' results.
const RETRY_TIMEOUT: Duration = Duration::from_secs(120);

/// The filter as the page's form sends it.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub(crate) struct FilterForm {
    #[serde(default)]
    reconciler: String,
    #[serde(default)]
    error_like: String,
    /// Failed within (`2h`).
    #[serde(default)]
    since: String,
    /// Failed longer ago than (`1d`).
    #[serde(default)]
    older_than: String,
    /// One letter's id. (Numbers travel as text: the forms flatten this
    /// struct into theirs, and a flattened form field is always a string.)
    #[serde(default)]
    id: String,
    /// The highest id the confirmation counted (the action takes no later letter).
    #[serde(default)]
    up_to: String,
}

impl FilterForm {
    fn filter(&self) -> CliResult<DeadLetterFilter> {
        let text = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
        let age = |name: &str, s: &str| -> CliResult<Option<Duration>> {
            match text(s) {
                None => Ok(None),
                Some(s) => humantime::parse_duration(&s).map(Some).map_err(|e| {
                    bad_input(format!(
                        "{name} {s:?}: {e}: write an age such as 30m, 2h or 7d"
                    ))
                }),
            }
        };
        let number = |name: &str, s: &str| -> CliResult<Option<i64>> {
            match text(s) {
                None => Ok(None),
                Some(s) => s
                    .parse()
                    .map(Some)
                    .map_err(|e| bad_input(format!("{name} {s:?}: {e}"))),
            }
        };
        Ok(DeadLetterFilter {
            reconciler: text(&self.reconciler),
            since: age("failed within", &self.since)?,
            older_than: age("failed more than", &self.older_than)?,
            error_like: text(&self.error_like),
            id: number("id", &self.id)?,
            up_to: number("up_to", &self.up_to)?,
        })
    }

    fn hidden(&self) -> Markup {
        html! {
            input type="hidden" name="reconciler" value=(self.reconciler);
            input type="hidden" name="error_like" value=(self.error_like);
            input type="hidden" name="since" value=(self.since);
            input type="hidden" name="older_than" value=(self.older_than);
            input type="hidden" name="id" value=(self.id);
            input type="hidden" name="up_to" value=(self.up_to);
        }
    }

    fn query(&self) -> String {
        let mut q = vec![
            format!("reconciler={}", super::pages::urlencode(&self.reconciler)),
            format!("error_like={}", super::pages::urlencode(&self.error_like)),
            format!("since={}", super::pages::urlencode(&self.since)),
            format!("older_than={}", super::pages::urlencode(&self.older_than)),
        ];
        if !self.id.is_empty() {
            q.push(format!("id={}", super::pages::urlencode(&self.id)));
        }
        q.join("&")
    }
}

async fn rows(
    state: &Shared,
    filter: &DeadLetterFilter,
) -> CliResult<(Vec<DeadLetterRow>, i64, Vec<String>, DateTime<Utc>)> {
    let pool = state.ctx.pool().await?;
    let rows = filter
        .bind(sqlx::query_as(&format!(
            "{SELECT} WHERE {FILTER_SQL} ORDER BY id DESC LIMIT $7"
        )))
        .bind(LISTED)
        .fetch_all(pool)
        .await?;
    let total = filter.matching(pool, 1).await?.total;
    let reconcilers = sqlx::query_scalar(
        "SELECT DISTINCT reconciler FROM converge.dead_letters WHERE resolved_at IS NULL ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    let now = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    Ok((rows, total, reconcilers, now))
}

/// `/dead-letters?reconciler=&error_like=&since=&older_than=`
pub(crate) async fn list(State(state): State<Shared>, Query(form): Query<FilterForm>) -> Response {
    let filter = match form.filter() {
        Ok(f) => f,
        Err(e) => return failure(&state, e),
    };
    let (rows, total, reconcilers, now) = match rows(&state, &filter).await {
        Ok(x) => x,
        Err(e) => return failure(&state, e),
    };
    let body = html! {
        form.filter method="get" action="/dead-letters" {
            label { "Reconciler"
                select name="reconciler" {
                    option value="" { "any" }
                    @for r in &reconcilers { option value=(r) selected[*r == form.reconciler] { (r) } }
                }
            }
            label { "Error contains" input type="text" name="error_like" value=(form.error_like) placeholder="timeout"; }
            label { "Failed within" input type="text" name="since" value=(form.since) placeholder="2h" size="6"; }
            label { "Failed more than … ago" input type="text" name="older_than" value=(form.older_than) placeholder="1d" size="6"; }
            button.plain type="submit" { "Filter" }
        }
        p id="matching" data-count=(total) {
            strong { (total) } " open dead letters " (filter.describe())
            @if total > LISTED { " (the newest " (LISTED) " listed)" }
        }
        @if total > 0 {
            @if state.power == Power::Operator {
                div.actions {
                    a href=(format!("/dead-letters/confirm?action=retry&{}", form.query())) { button type="button" id="retry-all" { "Retry all " (total) " matching…" } }
                    a href=(format!("/dead-letters/confirm?action=discard&{}", form.query())) { button.danger type="button" id="discard-all" { "Discard all " (total) " matching…" } }
                }
            } @else {
                p.muted id="read-only" { "Read-only: " (state.read_only_because.as_deref().unwrap_or("viewer")) }
            }
            table {
                tr { th.num { "#" } th { "Reconciler" } th { "Key" } th { "Path" } th.num { "Attempts" } th { "Failed" } th { "Error" } }
                @for d in &rows {
                    tr {
                        td.num { a href=(format!("/dead-letters/{}", d.id)) { (d.id) } }
                        td { (d.reconciler) } td { code { (output::cut(&d.aggregate_key, 40)) } } td { (d.path) }
                        td.num { (d.attempts) @if d.permanent { " (permanent)" } }
                        td { (when(d.failed_at, now)) }
                        td { (output::cut(&d.error, 120)) }
                    }
                }
            }
        }
    };
    page(&state, "/dead-letters", "Dead letters", body)
}

/// `/dead-letters/{id}`: everything about one letter.
pub(crate) async fn show(State(state): State<Shared>, Path(id): Path<i64>) -> Response {
    let loaded = async {
        let pool = state.ctx.pool().await?;
        let row: Option<DeadLetterRow> = sqlx::query_as(&format!("{SELECT} WHERE id = $1"))
            .bind(id)
            .fetch_optional(pool)
            .await?;
        let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
        Ok::<_, crate::error::CliError>((row, now))
    };
    let (d, now) = match loaded.await {
        Ok((Some(d), now)) => (d, now),
        Ok((None, _)) => return failure(&state, bad_input(format!("no dead letter with id {id}"))),
        Err(e) => return failure(&state, e),
    };
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let one = FilterForm {
        id: d.id.to_string(),
        ..FilterForm::default()
    };
    let body = html! {
        table {
            tr { th { "Reconciler" } td { (d.reconciler) } }
            tr { th { "Key" } td { code { (d.aggregate_key) } } }
            tr { th { "Path" } td { (d.path) } }
            tr { th { "Event" } td { (output::opt(d.event_id)) " " (d.subject.as_deref().unwrap_or("")) } }
            tr { th { "Error" } td.bad { (d.error) } }
            tr { th { "Attempts" } td { (d.attempts) @if d.permanent { " (permanent)" } } }
            tr { th { "First attempt" } td { (when_opt(d.first_attempt_at, now)) } }
            tr { th { "Failed" } td { (when(d.failed_at, now)) } }
            tr { th { "Recovered" } td { (when_opt(d.recovered_at, now)) " " (d.recover_error.as_deref().unwrap_or("")) } }
            tr { th { "Resolved" } td { (when_opt(d.resolved_at, now)) " " (d.resolution.as_deref().unwrap_or("")) " " (d.resolved_by.as_deref().map(|b| format!("by {b}")).unwrap_or_default()) } }
        }
        h2 { "Headers" } pre { (d.headers.as_ref().map(pretty).unwrap_or_else(|| "-".into())) }
        h2 { "Payload" } pre { (d.payload.as_deref().map_or_else(|| "-".into(), |p| pretty(&payload_value(p)))) }
        @if d.resolved_at.is_none() && state.power == Power::Operator {
            div.actions {
                a href=(format!("/dead-letters/confirm?action=retry&{}", one.query())) { button type="button" id="retry-one" { "Retry…" } }
                a href=(format!("/dead-letters/confirm?action=discard&{}", one.query())) { button.danger type="button" id="discard-one" { "Discard…" } }
            }
        }
    };
    page(&state, "/dead-letters", &format!("Dead letter #{id}"), body)
}

/// `?action=retry|discard` and the filter.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct Confirm {
    action: String,
    #[serde(flatten)]
    filter: FilterForm,
}

fn verb(action: &str) -> CliResult<&'static str> {
    match action {
        "retry" => Ok("Retry"),
        "discard" => Ok("Discard"),
        other => Err(bad_input(format!("action {other:?}: retry or discard"))),
    }
}

fn confirmation(
    state: &Shared,
    action: &str,
    form: &FilterForm,
    filter: &DeadLetterFilter,
    matches: &Matches,
    note: Option<&str>,
) -> Response {
    let Ok(verb) = verb(action) else {
        return failure(state, bad_input("action: retry or discard"));
    };
    let n = matches.ids.len();
    let body = html! {
        @if let Some(note) = note { div.notice { (note) } }
        @if n == 0 {
            p { "No open dead letter " (filter.describe()) "; nothing to do." }
        } @else {
            p id="confirm-count" data-count=(n) {
                (verb) " " strong { (n) } " open dead letters " (filter.describe()) "?"
                @if matches.total > n as i64 { " (" (matches.total) " match; one action takes at most " (ACT_LIMIT) ")" }
            }
            @if action == "retry" { p.muted { "Each key runs again through its reconciler on a worker (the manual path); each success resolves its letter." } }
            @else { p.muted { "The letters are marked resolved (discarded) without running anything." } }
            form method="post" action="/dead-letters/act" {
                input type="hidden" name="csrf" value=(state.csrf);
                input type="hidden" name="action" value=(action);
                input type="hidden" name="expected" value=(n);
                (form.hidden())
                div.actions {
                    button id="confirm" class=[(action == "discard").then_some("danger")] type="submit" { (verb) " " (n) " dead letters" }
                    a href=(format!("/dead-letters?{}", form.query())) { "Cancel" }
                }
            }
        }
    };
    page(state, "/dead-letters", "Confirm", body)
}

/// `/dead-letters/confirm?action=…&filter…`: the count, and the form that acts.
pub(crate) async fn confirm(State(state): State<Shared>, Query(c): Query<Confirm>) -> Response {
    if let Some(refused) = refusal(&state, Some(&state.csrf)) {
        return refused;
    }
    fresh_confirmation(&state, &c.action, &c.filter, None).await
}

/// Counts the letters `form` matches now and asks to confirm them: the
/// form carries the highest id counted, so the action takes no letter
/// written after the confirmation was shown.
async fn fresh_confirmation(
    state: &Shared,
    action: &str,
    form: &FilterForm,
    note: Option<&str>,
) -> Response {
    let form = FilterForm {
        up_to: String::new(),
        ..form.clone()
    };
    let matched = async {
        let filter = form.filter()?;
        verb(action)?;
        let pool = state.ctx.pool().await?;
        let matches = filter.matching(pool, ACT_LIMIT).await?;
        let highest = match matches.ids.last() {
            Some(last) if matches.total as usize == matches.ids.len() => *last,
            _ => filter.highest_id(pool).await?,
        };
        Ok::<_, crate::error::CliError>((filter, matches, highest))
    };
    match matched.await {
        Ok((filter, matches, highest)) => {
            let form = FilterForm {
                up_to: highest.to_string(),
                ..form
            };
            confirmation(state, action, &form, &filter, &matches, note)
        }
        Err(e) => failure(state, e),
    }
}

/// The confirmation form's fields.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct Act {
    csrf: Option<String>,
    action: String,
    expected: usize,
    #[serde(flatten)]
    filter: FilterForm,
}

/// `POST /dead-letters/act`: acts on the letters matching now, if they are
/// as many as confirmed; otherwise asks again with the new count.
pub(crate) async fn act(State(state): State<Shared>, Form(a): Form<Act>) -> Response {
    if let Some(refused) = refusal(&state, a.csrf.as_deref()) {
        return refused;
    }
    let result = async {
        let filter = a.filter.filter()?;
        verb(&a.action)?;
        let pool = state.ctx.pool().await?;
        let matches = filter.matching(pool, ACT_LIMIT).await?;
        Ok::<_, crate::error::CliError>((filter, matches, pool))
    };
    let (filter, matches, pool) = match result.await {
        Ok(x) => x,
        Err(e) => return failure(&state, e),
    };
    if matches.ids.len() != a.expected {
        let note = format!(
            "The letters changed since you confirmed {}: {} of them are still open. Nothing \
             was done; confirm again.",
            a.expected,
            matches.ids.len()
        );
        return fresh_confirmation(&state, &a.action, &a.filter, Some(&note)).await;
    }
    let selection = Selection { filter, matches };
    let outcome: CliResult<Markup> = async {
        if a.action == "discard" {
            let done = crate::dead_letters::discard_selected(pool, &state.actor, None, &selection).await?;
            Ok(html! {
                div.done id="result" data-resolved=(done.discarded) {
                    "Discarded " (done.discarded) " dead letters " (selection.filter.describe())
                    @if done.already_resolved > 0 { "; " (done.already_resolved) " were resolved meanwhile" }
                    " (audit #" (done.audit_id) ")."
                }
            })
        } else {
            let groups = crate::dead_letter_retry::by_reconciler(pool, &selection.matches.ids).await?;
            let app = state.ctx.app().await?;
            let done = crate::dead_letter_retry::retry_groups(
                &state.ctx, &state.actor, &app, groups, Some(&selection), RETRY_TIMEOUT, false,
            )
            .await?;
            Ok(html! {
                div class=(if done.failed == 0 { "done" } else { "notice" }) id="result" data-resolved=(done.resolved) {
                    "Retried " (done.retried) " dead letters " (selection.filter.describe()) ": "
                    (done.resolved) " resolved, " (done.failed) " failed again (audit #" (done.audit_id) ")."
                }
            })
        }
    }
    .await;
    match outcome {
        Ok(result) => page(
            &state,
            "/dead-letters",
            "Done",
            html! { (result) p { a href="/dead-letters" { "Back to the dead letters" } } },
        ),
        Err(e) => failure(&state, e),
    }
}
