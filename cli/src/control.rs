//! The control-plane client: a request to the workers that serve one
//! capability of an application (a sweep's subject, a reconciler's subject)
//! over NATS, and their replies on a private inbox.
//!
//! Only workers that run the sweep (registered the reconciler) listen on its
//! subject, so an unknown name is caught before sending, from the live
//! workers' registry rows ([`Registered`]). The inbox is subscribed before the
//! request is published, so no reply is missed. A worker answers `Accepted`
//! (or an error) at once, and the final reply on the same inbox when the work
//! is done.

use std::collections::BTreeSet;
use std::time::Duration;

use converge::control::{ControlErrorKind, ControlReply, ControlRequest};
use futures::StreamExt;
use sqlx::PgPool;

use crate::context::{Ctx, LIVE_WORKER_SQL};
use crate::error::{bad_input, nats_refused, CliError, CliResult};

/// How long sending a request and a worker's first answer may take together.
pub(crate) const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// How often the wait for a first answer looks for a permissions violation.
const REFUSAL_POLL: Duration = Duration::from_millis(50);

/// What an application's live workers registered (`converge.workers`).
#[derive(Debug)]
pub(crate) struct Registered {
    app: String,
    workers: usize,
    sweeps: BTreeSet<String>,
    reconcilers: BTreeSet<String>,
}

/// Reads what `app`'s live workers registered.
pub(crate) async fn registered(pool: &PgPool, app: &str) -> CliResult<Registered> {
    let rows: Vec<(Vec<String>, Vec<String>)> = sqlx::query_as(&format!(
        "SELECT sweeps, reconcilers FROM converge.workers \
         WHERE application = $1 AND control_subject IS NOT NULL AND {LIVE_WORKER_SQL}"
    ))
    .bind(app)
    .fetch_all(pool)
    .await?;
    Ok(Registered {
        app: app.to_owned(),
        workers: rows.len(),
        sweeps: rows.iter().flat_map(|r| r.0.iter().cloned()).collect(),
        reconcilers: rows.iter().flat_map(|r| r.1.iter().cloned()).collect(),
    })
}

impl Registered {
    /// Errors unless a live worker runs `sweep`.
    pub(crate) fn require_sweep(&self, sweep: &str) -> CliResult<()> {
        self.require("sweep", &self.sweeps, [sweep])
    }

    /// Errors unless every one of `reconcilers` is registered by a live worker.
    pub(crate) fn require_reconcilers<'a>(
        &self,
        reconcilers: impl IntoIterator<Item = &'a str>,
    ) -> CliResult<()> {
        self.require("reconciler", &self.reconcilers, reconcilers)
    }

    fn require<'a>(
        &self,
        what: &str,
        known: &BTreeSet<String>,
        names: impl IntoIterator<Item = &'a str>,
    ) -> CliResult<()> {
        if self.workers == 0 {
            return Err(CliError::Failed(format!(
                "no live worker of application {:?} in converge.workers (none with a \
                 heartbeat in the last 60 s); start the application's worker (`… serve`), \
                 or check --app",
                self.app
            )));
        }
        let unknown: Vec<&str> = names.into_iter().filter(|n| !known.contains(*n)).collect();
        if unknown.is_empty() {
            return Ok(());
        }
        Err(bad_input(format!(
            "no live worker of application {:?} runs {what} {}; nothing was sent\n\
             known {what}s: {}",
            self.app,
            unknown
                .iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            list_or_none(known.iter().map(String::as_str))
        )))
    }
}

fn list_or_none<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// A request sent, waiting for replies.
pub(crate) struct ControlCall {
    app: String,
    subject: String,
    replies: async_nats::Subscriber,
}

/// Sends `request` on `subject` to `app`'s workers; returns the call and the
/// first reply (`Accepted`, or an immediate answer). Publishing and that
/// first answer take at most [`ANSWER_WITHIN`] together (the NATS client
/// may otherwise wait for ever while it reconnects).
pub(crate) async fn send(
    ctx: &Ctx,
    app: &str,
    subject: String,
    request: &ControlRequest,
) -> CliResult<(ControlCall, ControlReply)> {
    let deadline = tokio::time::Instant::now() + ANSWER_WITHIN;
    let nats = ctx.nats().await?;
    // Only a refusal of this request counts (a retry sends one per group).
    ctx.forget_nats_refusal();
    let body = serde_json::to_vec(request)
        .map_err(|e| CliError::Failed(format!("cannot encode the request: {e}")))?;
    let publish = async {
        let inbox = nats.new_inbox();
        let replies = nats
            .subscribe(inbox.clone())
            .await
            .map_err(|e| CliError::Failed(format!("cannot subscribe to a reply inbox: {e}")))?;
        let mut headers = async_nats::HeaderMap::new();
        // A header value is one line of text.
        let line = |s: String| s.replace(|c: char| c.is_control(), " ");
        headers.insert(converge::control::ACTOR_HEADER, line(ctx.actor()).as_str());
        headers.insert(
            converge::control::CLIENT_HEADER,
            line(client_description()).as_str(),
        );
        nats.publish_with_reply_and_headers(subject.clone(), inbox, headers, body.into())
            .await
            .map_err(|e| CliError::Failed(format!("cannot publish on {subject}: {e}")))?;
        nats.flush()
            .await
            .map_err(|e| CliError::Failed(format!("cannot publish on {subject}: {e}")))?;
        Ok::<_, CliError>(replies)
    };
    let replies = tokio::time::timeout_at(deadline, publish)
        .await
        .map_err(|_| {
            CliError::Failed(format!(
                "could not publish the request on {subject} within {} s: the connection to \
                 NATS at {} is down or reconnecting; the request was most likely not delivered",
                ANSWER_WITHIN.as_secs(),
                ctx.global.nats_url
            ))
        })??;
    let mut call = ControlCall {
        app: app.to_owned(),
        subject,
        replies,
    };
    // NATS drops a publish or subscription its permissions refuse and says
    // so asynchronously: look for that while waiting for the first answer.
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Some(text) = ctx.nats_refusal() {
            return Err(nats_refused(&text));
        }
        if left.is_zero() {
            return Err(call.no_answer(ANSWER_WITHIN));
        }
        if let Some(reply) = call.recv(left.min(REFUSAL_POLL)).await? {
            return Ok((call, reply));
        }
    }
}

impl ControlCall {
    /// The final reply within `timeout` (after `Accepted`); `None` when none
    /// came (the worker may still be at work). `Error` replies become errors.
    pub(crate) async fn final_reply(
        &mut self,
        timeout: Duration,
    ) -> CliResult<Option<ControlReply>> {
        self.recv(timeout).await
    }

    async fn recv(&mut self, timeout: Duration) -> CliResult<Option<ControlReply>> {
        let message = match tokio::time::timeout(timeout, self.replies.next()).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(CliError::Failed(
                    "the NATS connection closed while waiting for a reply".into(),
                ))
            }
            Err(_) => return Ok(None),
        };
        if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            return Err(self.no_answer(Duration::ZERO));
        }
        let reply: ControlReply = serde_json::from_slice(&message.payload).map_err(|e| {
            CliError::Failed(format!(
                "a worker of {} sent a reply this CLI does not understand ({e}): {}",
                self.app,
                String::from_utf8_lossy(&message.payload)
            ))
        })?;
        match reply {
            ControlReply::Error {
                kind,
                message,
                known,
            } => Err(reply_error(kind, message, &known)),
            reply => Ok(Some(reply)),
        }
    }

    fn no_answer(&self, waited: Duration) -> CliError {
        let when = if waited.is_zero() {
            "nobody listens".to_owned()
        } else {
            format!("nothing within {} s", waited.as_secs())
        };
        CliError::Failed(format!(
            "no worker of application {:?} answered on subject {} ({when}); \
             is a worker that serves it (`… serve`) running and connected to this NATS?",
            self.app, self.subject
        ))
    }
}

/// The error for a worker's `Error` reply: unknown names and bad requests are
/// the operator's input (exit 2), the rest failures (exit 1).
fn reply_error(kind: ControlErrorKind, message: String, known: &[String]) -> CliError {
    let mut text = message;
    let what = match kind {
        ControlErrorKind::UnknownSweep => Some("sweeps"),
        ControlErrorKind::UnknownReconciler => Some("reconcilers"),
        _ => None,
    };
    if let Some(what) = what {
        text.push_str(&format!(
            "\nknown {what}: {}",
            list_or_none(known.iter().map(String::as_str))
        ));
    }
    match kind {
        ControlErrorKind::Failed | ControlErrorKind::Busy => CliError::Failed(text),
        _ => bad_input(text),
    }
}

/// The instance named by an `Accepted` reply; `None` for any other reply.
pub(crate) fn accepted_by(reply: &ControlReply) -> Option<&str> {
    match reply {
        ControlReply::Accepted { instance } => Some(instance),
        _ => None,
    }
}

/// How this CLI describes itself in a worker's audit row: `converge-cli
/// <version> on <host>`.
fn client_description() -> String {
    let host = converge::handlers::host_name().unwrap_or_else(|| "an unknown host".into());
    format!("converge-cli {} on {host}", env!("CARGO_PKG_VERSION"))
}
