//! `POST /sweeps/runs/{id}/replay`: a sweep run replayed from its page
//! (all its sweep's candidates again, or exactly its failed keys), sent to
//! the sweep's workers as `converge sweep replay` sends it, and audited.

use axum::extract::{Path, State};
use axum::response::Response;
use axum::Form;
use converge::control::{sweep_subject, ControlReply, ControlRequest};
use maud::{html, Markup};
use serde_json::json;

use super::access::refusal;
use super::pages::{failure, page};
use super::Shared;
use crate::audit::{self, AuditOutcome, Settled};
use crate::error::{bad_input, CliError, CliResult};

/// The replay form's fields.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct ReplayForm {
    csrf: Option<String>,
    /// `on` when only the run's failed keys are replayed.
    #[serde(default)]
    failed_only: Option<String>,
}

/// The replay button of a run's page.
pub(crate) fn form(state: &Shared, run_id: i64, failures: i64) -> Markup {
    html! {
        form method="post" action=(format!("/sweeps/runs/{run_id}/replay")) {
            input type="hidden" name="csrf" value=(state.csrf);
            div.actions {
                @if failures > 0 {
                    label { input type="checkbox" name="failed_only" checked; " only its " (failures) " failed keys" }
                }
                button id="replay" type="submit" { "Replay run #" (run_id) }
            }
        }
    }
}

/// `POST /sweeps/runs/{id}/replay`
pub(crate) async fn replay(
    State(state): State<Shared>,
    Path(run_id): Path<i64>,
    Form(f): Form<ReplayForm>,
) -> Response {
    if let Some(refused) = refusal(&state, f.csrf.as_deref()) {
        return refused;
    }
    let failed_only = f.failed_only.is_some();
    let work = state.tasks.spawn(send(state.clone(), run_id, failed_only));
    match work.await {
        Ok(Ok(body)) => page(&state, "/sweeps", &format!("Replay of run #{run_id}"), body),
        Ok(Err(e)) => failure(&state, e),
        Err(e) => failure(
            &state,
            CliError::Failed(format!("the replay's task failed: {e}")),
        ),
    }
}

async fn send(state: Shared, run_id: i64, failed_only: bool) -> CliResult<Markup> {
    let pool = state.ctx.pool().await?;
    let Some((sweep, failures)) = crate::sweep_run::run_and_failures(pool, run_id).await? else {
        return Err(bad_input(format!("no sweep run with id {run_id}")));
    };
    if failed_only && failures == 0 {
        return Err(bad_input(format!(
            "run #{run_id} recorded no failed keys; nothing to replay"
        )));
    }
    let app = state.ctx.app().await?;
    crate::control::registered(pool, &app)
        .await?
        .require_sweep(&sweep)?;
    let entry = audit::begin_as(
        pool,
        &state.actor,
        None,
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
    let ctx = &state.ctx;
    let (sweep_name, app_name) = (sweep.clone(), app.clone());
    entry
        .settle(async move {
            let subject = sweep_subject(&app_name, &sweep_name);
            let (_call, first) = crate::control::send(ctx, &app_name, subject, &request).await?;
            Ok(match first {
                ControlReply::Accepted { instance } => Settled::ok(
                    json!({ "accepted_by": instance }),
                    html! {
                        div.done id="result" {
                            "Replay of run #" (run_id) " of sweep " (sweep_name)
                            (if failed_only { " (its failed keys)" } else { "" })
                            " accepted by worker " (instance) "; its run appears on "
                            a href="/sweeps" { "the sweeps page" } "."
                        }
                    },
                ),
                ControlReply::LeaseHeld { holder, .. } => Settled::err(
                    AuditOutcome::Failed,
                    json!({ "lease_held_by": holder }),
                    CliError::Failed(format!(
                        "sweep {sweep_name}'s lease is held by {}; nothing ran: try again \
                         when its run has ended",
                        holder.as_deref().unwrap_or("another instance")
                    )),
                ),
                other => Settled::err(
                    AuditOutcome::Failed,
                    json!({ "reply": format!("{other:?}") }),
                    CliError::Failed(format!("the worker did not take the replay: {other:?}")),
                ),
            })
        })
        .await
}
