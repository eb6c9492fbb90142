//! The worker's own audit rows: every control request it takes is recorded in
//! `converge.audit` before it acts and settled with its outcome after, whoever
//! sent it (the CLI records its own row too).
//!
//! The actor is what the request claims (the `Converge-Actor` header, or a
//! retry's `actor`): NATS permissions decide who may send requests, the audit
//! row records what was asked, by which client and subject, and how it ended.

use serde_json::{json, Value};
use sqlx::PgPool;

use crate::control::{ControlReply, ControlRequest, MAX_ACTOR_CHARS};

/// The header carrying who asks (the CLI sets it to `--actor` or the OS user).
pub const ACTOR_HEADER: &str = "Converge-Actor";
/// The header carrying the sending client's description (e.g. `converge-cli
/// on host`).
pub const CLIENT_HEADER: &str = "Converge-Client";

/// Longest header value or target kept in an audit row, in characters.
const MAX_FIELD_CHARS: usize = 200;

fn clip(text: &str) -> String {
    text.chars().take(MAX_FIELD_CHARS).collect()
}

fn header(message: &async_nats::Message, name: &str) -> Option<String> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| clip(v.as_str()))
}

/// What one request is recorded as.
pub(crate) struct Entry {
    action: &'static str,
    target: String,
    actor: String,
    details: Value,
}

impl Entry {
    /// The entry for `request` (or a request that could not be read) taken
    /// from `message` by worker `instance`.
    pub(crate) fn new(
        message: &async_nats::Message,
        request: Option<&ControlRequest>,
        instance: &str,
    ) -> Entry {
        let (action, target, extra) = match request {
            Some(ControlRequest::SweepRun {
                sweep,
                keys,
                dry_run,
                limit,
            }) => (
                if *dry_run {
                    "sweep.dry_run"
                } else {
                    "sweep.run"
                },
                sweep.clone(),
                json!({ "keys": keys.as_ref().map(Vec::len), "limit": limit }),
            ),
            Some(ControlRequest::SweepReplay {
                run_id,
                failed_only,
            }) => (
                "sweep.replay",
                run_id.to_string(),
                json!({ "failed_only": failed_only }),
            ),
            Some(ControlRequest::DeadLetterRetry { ids, .. }) => (
                "dead_letter.retry",
                ids.iter().map(i64::to_string).collect::<Vec<_>>().join(","),
                json!({ "dead_letters": ids.len() }),
            ),
            _ => ("control.refused", message.subject.to_string(), json!({})),
        };
        let claimed = match request {
            Some(ControlRequest::DeadLetterRetry { actor, .. }) => Some(actor.clone()),
            _ => header(message, ACTOR_HEADER),
        };
        let actor = claimed
            .filter(|a| !a.trim().is_empty())
            .map(|a| a.chars().take(MAX_ACTOR_CHARS).collect())
            .unwrap_or_else(|| "unknown (no actor claimed)".to_owned());
        let mut details = json!({
            "recorded_by": "worker",
            "instance": instance,
            "subject": message.subject.to_string(),
            "client": header(message, CLIENT_HEADER),
        });
        merge(&mut details, extra);
        Entry {
            action,
            target: clip(&target),
            actor,
            details,
        }
    }

    /// Records the entry before the work; its id, or why it could not be
    /// written (the worker then refuses the request: nothing runs unrecorded).
    pub(crate) async fn begin(&self, pool: &PgPool) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "INSERT INTO converge.audit (actor, action, target, details) \
             VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(&self.actor)
        .bind(self.action)
        .bind(&self.target)
        .bind(&self.details)
        .fetch_one(pool)
        .await
    }
}

/// Settles the row `id` with the outcome of `reply` (a failure is logged:
/// the work is done either way).
pub(crate) async fn settle(pool: &PgPool, id: i64, reply: &ControlReply) {
    let (outcome, details) = outcome(reply);
    let settled = sqlx::query(
        "UPDATE converge.audit SET outcome = $2, finished_at = now(), details = details || $3 \
         WHERE id = $1",
    )
    .bind(id)
    .bind(outcome)
    .bind(details)
    .execute(pool)
    .await;
    if let Err(e) = settled {
        tracing::warn!(audit_id = id, error = %e, "could not record a control request's outcome");
    }
}

/// Records a request refused before it ran (malformed, out of bounds).
pub(crate) async fn refused(pool: &PgPool, entry: &Entry, reply: &ControlReply) {
    match entry.begin(pool).await {
        Ok(id) => settle(pool, id, reply).await,
        Err(e) => tracing::warn!(error = %e, "could not record a refused control request"),
    }
}

/// The audit outcome of a final reply, and what to add to the details.
fn outcome(reply: &ControlReply) -> (&'static str, Value) {
    match reply {
        ControlReply::SweepRan {
            run_id,
            status,
            failed,
            reconciled,
            ..
        } => {
            let outcome = if status == "interrupted" || status == "failed" {
                "failed"
            } else if *failed > 0 {
                "partial"
            } else {
                "ok"
            };
            (
                outcome,
                json!({ "run_id": run_id, "status": status, "reconciled": reconciled, "failed": failed }),
            )
        }
        ControlReply::Candidates {
            keys, truncated, ..
        } => (
            "ok",
            json!({ "candidates": keys.len(), "truncated": truncated }),
        ),
        ControlReply::Retried { results } => {
            let resolved = results.iter().filter(|r| r.error.is_none()).count();
            let outcome = match resolved {
                0 => "failed",
                n if n == results.len() => "ok",
                _ => "partial",
            };
            (
                outcome,
                json!({ "retried": results.len(), "resolved": resolved }),
            )
        }
        ControlReply::LeaseHeld { holder, .. } => {
            ("failed", json!({ "error": "lease_held", "holder": holder }))
        }
        ControlReply::Skipped { .. } => ("failed", json!({ "error": "skipped_by_overlap" })),
        ControlReply::Error { kind, message, .. } => (
            "failed",
            json!({ "error": kind.as_str(), "message": message.chars().take(500).collect::<String>() }),
        ),
        _ => ("ok", json!({})),
    }
}

fn merge(into: &mut Value, extra: Value) {
    if let (Value::Object(into), Value::Object(extra)) = (into, extra) {
        into.extend(extra);
    }
}
