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
use super::pending::Confirmed;
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
        })
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
            "{SELECT} WHERE {FILTER_SQL} ORDER BY id DESC LIMIT $6"
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
            @if state.power == Power::Operator && filter.is_empty() {
                p.muted id="choose-filter" { "Choose a filter to retry or discard the letters it matches, or open one letter." }
            } @else if state.power == Power::Operator {
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
    let nonce = (n > 0).then(|| {
        state.pending.keep(Confirmed {
            action: action.to_owned(),
            filter: filter.clone(),
            ids: matches.ids.clone(),
            total: matches.total,
        })
    });
    let body = html! {
        @if let Some(note) = note { div.notice { (note) } }
        @if let Some(nonce) = nonce {
            p id="confirm-count" data-count=(n) {
                (verb) " " strong { (n) } " open dead letters " (filter.describe()) "?"
                @if matches.total > n as i64 { " (" (matches.total) " match; one action takes the oldest " (ACT_LIMIT) ")" }
            }
            @if action == "retry" { p.muted { "Each key runs again through its reconciler on a worker (the manual path); each success resolves its letter." } }
            @else { p.muted { "The letters are marked resolved (discarded) without running anything." } }
            p.muted { "Exactly these letters are taken: none that matches later. The confirmation is valid for " (super::pending::VALID_FOR.as_secs() / 60) " minutes, once." }
            form method="post" action="/dead-letters/act" {
                input type="hidden" name="csrf" value=(state.csrf);
                input type="hidden" name="nonce" value=(nonce);
                div.actions {
                    button id="confirm" class=[(action == "discard").then_some("danger")] type="submit" { (verb) " " (n) " dead letters" }
                    a href=(format!("/dead-letters?{}", form.query())) { "Cancel" }
                }
            }
        } @else {
            p { "No open dead letter " (filter.describe()) "; nothing to do." }
        }
    };
    page(state, "/dead-letters", "Confirm", body)
}

/// `/dead-letters/confirm?action=…&filter…`: the count, and the form that
/// acts on exactly the letters counted.
pub(crate) async fn confirm(State(state): State<Shared>, Query(c): Query<Confirm>) -> Response {
    if let Some(refused) = refusal(&state, Some(&state.csrf)) {
        return refused;
    }
    let matched = async {
        let filter = c.filter.filter()?;
        verb(&c.action)?;
        if filter.is_empty() {
            return Err(bad_input(
                "choose a filter first (reconciler, error text, age) or one letter: the \
                 dashboard does not act on every open letter at once",
            ));
        }
        let matches = filter.matching(state.ctx.pool().await?, ACT_LIMIT).await?;
        Ok::<_, crate::error::CliError>((filter, matches))
    };
    match matched.await {
        Ok((filter, matches)) => {
            confirmation(&state, &c.action, &c.filter, &filter, &matches, None)
        }
        Err(e) => failure(&state, e),
    }
}

/// The confirmation form's fields.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct Act {
    csrf: Option<String>,
    nonce: Option<String>,
}

/// `POST /dead-letters/act`: acts on the letters the confirmation counted
/// that are still open. The work runs in a task of its own, so a client
/// that goes away (a closed tab, a proxy's timeout) does not stop it
/// halfway; shutting the dashboard down waits for it.
pub(crate) async fn act(State(state): State<Shared>, Form(a): Form<Act>) -> Response {
    if let Some(refused) = refusal(&state, a.csrf.as_deref()) {
        return refused;
    }
    let Some(confirmed) = a.nonce.as_deref().and_then(|n| state.pending.take(n)) else {
        let mut refused = page(
            &state,
            "/dead-letters",
            "Nothing done",
            html! {
                div.error { "This confirmation was already used, has expired, or is unknown (the dashboard restarted); nothing was done." }
                p { a href="/dead-letters" { "Back to the dead letters" } }
            },
        );
        *refused.status_mut() = axum::http::StatusCode::CONFLICT;
        return refused;
    };
    let work = state.tasks.spawn(run(state.clone(), confirmed));
    match work.await {
        Ok(Ok(result)) => page(
            &state,
            "/dead-letters",
            "Done",
            html! { (result) p { a href="/dead-letters" { "Back to the dead letters" } } },
        ),
        Ok(Err(e)) => failure(&state, e),
        Err(e) => failure(
            &state,
            crate::error::CliError::Failed(format!("the action's task failed: {e}")),
        ),
    }
}

/// Carries out a confirmed action on its letters still open.
async fn run(state: Shared, confirmed: Confirmed) -> CliResult<Markup> {
    let pool = state.ctx.pool().await?;
    let open: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM converge.dead_letters \
         WHERE id = ANY($1) AND resolved_at IS NULL ORDER BY id",
    )
    .bind(&confirmed.ids)
    .fetch_all(pool)
    .await?;
    let gone = confirmed.ids.len() - open.len();
    let meanwhile = html! {
        @if gone > 0 { " " (gone) " of the " (confirmed.ids.len()) " confirmed were resolved meanwhile." }
    };
    if open.is_empty() {
        return Ok(
            html! { div.notice id="result" data-resolved="0" { "Nothing to do:" (meanwhile) } },
        );
    }
    let selection = Selection {
        filter: confirmed.filter,
        matches: Matches {
            ids: open,
            total: confirmed.total,
        },
    };
    if confirmed.action == "discard" {
        let done =
            crate::dead_letters::discard_selected(pool, &state.actor, None, &selection).await?;
        return Ok(html! {
            div.done id="result" data-resolved=(done.discarded) {
                "Discarded " (done.discarded) " dead letters " (selection.filter.describe())
                @if done.already_resolved > 0 { "; " (done.already_resolved) " were resolved meanwhile" }
                " (audit #" (done.audit_id) ")." (meanwhile)
            }
        });
    }
    let groups = crate::dead_letter_retry::by_reconciler(pool, &selection.matches.ids).await?;
    let app = state.ctx.app().await?;
    let done = crate::dead_letter_retry::retry_groups(
        &state.ctx,
        &state.actor,
        &app,
        groups,
        Some(&selection),
        RETRY_TIMEOUT,
        false,
    )
    .await?;
    Ok(html! {
        div class=(if done.failed == 0 { "done" } else { "notice" }) id="result" data-resolved=(done.resolved) {
            "Retried " (done.retried) " dead letters " (selection.filter.describe()) ": "
            (done.resolved) " resolved, " (done.failed) " failed again (audit #" (done.audit_id) ")." (meanwhile)
        }
    })
}
