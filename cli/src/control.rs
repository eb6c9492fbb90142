//! The control-plane client: a request to an application's workers over NATS
//! and their replies on a private inbox.
//!
//! The inbox is subscribed before the request is published, so no reply is
//! missed. A worker answers `Accepted` (or an error) at once, and the final
//! reply on the same inbox when the work is done.

use std::time::Duration;

use converge::control::{control_subject, ControlErrorKind, ControlReply, ControlRequest};
use futures::StreamExt;

use crate::context::Ctx;
use crate::error::{bad_input, CliError, CliResult};

/// How long a worker has to take a request.
pub(crate) const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// A request sent, waiting for replies.
pub(crate) struct ControlCall {
    app: String,
    subject: String,
    replies: async_nats::Subscriber,
}

/// Sends `request` to `app`'s workers; returns the call and the first reply
/// (`Accepted`, or an immediate answer). Errors when no worker answers within
/// [`ANSWER_WITHIN`].
pub(crate) async fn send(
    ctx: &Ctx,
    app: &str,
    request: &ControlRequest,
) -> CliResult<(ControlCall, ControlReply)> {
    let nats = ctx.nats().await?;
    let subject = control_subject(app);
    let inbox = nats.new_inbox();
    let replies = nats
        .subscribe(inbox.clone())
        .await
        .map_err(|e| CliError::Failed(format!("cannot subscribe to a reply inbox: {e}")))?;
    let body = serde_json::to_vec(request)
        .map_err(|e| CliError::Failed(format!("cannot encode the request: {e}")))?;
    nats.publish_with_reply(subject.clone(), inbox, body.into())
        .await
        .map_err(|e| CliError::Failed(format!("cannot publish on {subject}: {e}")))?;
    nats.flush()
        .await
        .map_err(|e| CliError::Failed(format!("cannot publish on {subject}: {e}")))?;
    let mut call = ControlCall {
        app: app.to_owned(),
        subject,
        replies,
    };
    let first = call.next(ANSWER_WITHIN).await?;
    Ok((call, first))
}

impl ControlCall {
    /// The next reply within `timeout`; `Error` replies become errors, and
    /// silence says that no worker answered.
    pub(crate) async fn next(&mut self, timeout: Duration) -> CliResult<ControlReply> {
        match self.recv(timeout).await? {
            Some(reply) => Ok(reply),
            None => Err(self.no_answer(timeout)),
        }
    }

    /// The final reply within `timeout` (after `Accepted`); silence is `timed_out`.
    pub(crate) async fn final_reply(
        &mut self,
        timeout: Duration,
        timed_out: impl FnOnce() -> CliError,
    ) -> CliResult<ControlReply> {
        match self.recv(timeout).await? {
            Some(reply) => Ok(reply),
            None => Err(timed_out()),
        }
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
             is the application's worker (`… serve`) running and connected to this NATS?",
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
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        ));
    }
    match kind {
        ControlErrorKind::Failed => CliError::Failed(text),
        _ => bad_input(text),
    }
}

/// The instance named by an `Accepted` reply, or an error for an unexpected one.
pub(crate) fn accepted_by(reply: &ControlReply) -> Option<&str> {
    match reply {
        ControlReply::Accepted { instance } => Some(instance),
        _ => None,
    }
}
