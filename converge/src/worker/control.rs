//! The worker's side of the control plane: takes operators' requests from the
//! application's queue group and answers on the request's inbox.

use std::collections::HashMap;
use std::sync::Arc;

use converge_handlers::{RateLimits, RunResult};
use converge_sweeper::{RunOutcome, SweepError, SweepRun, SweeperHandle, TriggerKind};
use futures::StreamExt;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{audit, manual_context};
use crate::control::{ControlErrorKind, ControlReply, ControlRequest, KeyResult};

/// Most candidate keys a dry run lists when the operator gives no limit.
const DEFAULT_DRY_RUN_LIMIT: u64 = 1000;

/// How long a reply may take to leave.
const SEND_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Longest error text in a reply (the dead letter keeps the whole error).
const MAX_ERROR_CHARS: usize = 500;

/// Most candidate keys a dry run lists (its `limit`).
pub const MAX_DRY_RUN_LIMIT: u64 = 10_000;
/// Most keys one sweep run request names.
pub const MAX_REQUEST_KEYS: usize = 10_000;
/// Longest key in a request, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Most dead letters one retry request names.
pub const MAX_RETRY_IDS: usize = 1_000;
/// Longest `actor` a request may claim, in characters.
pub const MAX_ACTOR_CHARS: usize = 200;
/// Control requests a worker runs at once; more are answered `busy`.
pub const MAX_CONTROL_TASKS: usize = 16;

/// Why `request` is out of bounds, if it is.
fn out_of_bounds(request: &ControlRequest) -> Option<String> {
    match request {
        ControlRequest::SweepRun { keys, limit, .. } => {
            if let Some(limit) = limit.filter(|l| *l > MAX_DRY_RUN_LIMIT) {
                return Some(format!(
                    "limit {limit} is above the most a dry run lists ({MAX_DRY_RUN_LIMIT}); \
                     ask for fewer"
                ));
            }
            let keys = keys.as_deref().unwrap_or_default();
            if keys.len() > MAX_REQUEST_KEYS {
                return Some(format!(
                    "{} keys in one request, at most {MAX_REQUEST_KEYS}: send them in parts",
                    keys.len()
                ));
            }
            if let Some(k) = keys.iter().find(|k| k.len() > MAX_KEY_BYTES) {
                return Some(format!(
                    "a key of {} bytes (at most {MAX_KEY_BYTES}) starting {:?}",
                    k.len(),
                    k.chars().take(40).collect::<String>()
                ));
            }
            // PostgreSQL text cannot hold NUL: one such key would fail every
            // key of its page's lease statement.
            keys.iter()
                .find(|k| k.contains('\0'))
                .map(|k| format!("key {k:?} contains a NUL character"))
        }
        ControlRequest::DeadLetterRetry { ids, actor } => {
            if ids.len() > MAX_RETRY_IDS {
                return Some(format!(
                    "{} dead letters in one retry, at most {MAX_RETRY_IDS}: send them in parts",
                    ids.len()
                ));
            }
            (actor.chars().count() > MAX_ACTOR_CHARS)
                .then(|| format!("an actor of more than {MAX_ACTOR_CHARS} characters"))
        }
        _ => None,
    }
}

/// What the control plane needs of the worker.
pub(crate) struct ControlPlane {
    pub(crate) pool: PgPool,
    pub(crate) nats: async_nats::Client,
    pub(crate) instance: String,
    pub(crate) sweeper: Option<Arc<SweeperHandle>>,
    pub(crate) reconcilers: Arc<HashMap<String, converge_handlers::NamedReconciler>>,
    pub(crate) limits: RateLimits,
}

/// Serves requests until `shutdown`; requests in flight then get an error
/// reply (a sweep run they started is recorded as interrupted by the sweeper).
pub(crate) async fn serve(
    plane: ControlPlane,
    mut subscriber: futures::stream::SelectAll<async_nats::Subscriber>,
    shutdown: CancellationToken,
) {
    let plane = Arc::new(plane);
    let mut inflight = JoinSet::new();
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = inflight.join_next(), if !inflight.is_empty() => continue,
            m = subscriber.next() => m,
        };
        let Some(message) = message else { break };
        let Some(reply_to) = message.reply.clone() else {
            tracing::warn!(subject = %message.subject, "control request without a reply inbox ignored");
            continue;
        };
        // Finished tasks still count in `len()` until joined.
        while inflight.try_join_next().is_some() {}
        if inflight.len() >= MAX_CONTROL_TASKS {
            // Answered at once: a flood of requests cannot pile up tasks.
            let busy = error(
                ControlErrorKind::Busy,
                format!(
                    "worker {} is busy with {MAX_CONTROL_TASKS} control requests; try again shortly",
                    plane.instance
                ),
            );
            tracing::warn!(subject = %message.subject, "control request refused: busy");
            // Queued, not flushed: a flood cannot hold this loop up for a
            // round trip per refusal (the client flushes on its own).
            let body = serde_json::to_vec(&busy).expect("replies serialize");
            let _ = tokio::time::timeout(
                std::time::Duration::from_millis(100),
                plane.nats.publish(reply_to, body.into()),
            )
            .await;
            continue;
        }
        let (plane, stop) = (plane.clone(), shutdown.clone());
        inflight.spawn(async move {
            let request = serde_json::from_slice::<ControlRequest>(&message.payload);
            let entry = audit::Entry::new(&message, request.as_ref().ok(), &plane.instance);
            let refusal = match &request {
                Err(e) => Some(format!("malformed control request: {e}")),
                Ok(r) => out_of_bounds(r),
            };
            if let Some(why) = refusal {
                tracing::warn!(why, "control request refused");
                let reply = error(ControlErrorKind::BadRequest, why);
                audit::refused(&plane.pool, &entry, &reply).await;
                plane.send_final(&reply_to, reply).await;
                return;
            }
            let request = request.expect("checked above");
            // Nothing runs unrecorded: no audit row, no work.
            let audit_id = match entry.begin(&plane.pool).await {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!(error = %e, "control request refused: cannot write its audit row");
                    let reply = error(
                        ControlErrorKind::Failed,
                        format!(
                            "worker {} could not record the request in converge.audit ({e}); \
                             nothing was done",
                            plane.instance
                        ),
                    );
                    plane.send_final(&reply_to, reply).await;
                    return;
                }
            };
            let reply = match request {
                // A retry stops between keys at shutdown and reports what it did.
                ControlRequest::DeadLetterRetry { ids, actor } => {
                    tracing::info!(?ids, actor, audit_id, "control request: dead-letter retry");
                    plane.retry(ids, actor, &reply_to, &stop).await
                }
                request => {
                    tracing::info!(request = %summary(&request), audit_id, "control request");
                    tokio::select! {
                        reply = plane.handle(request, &reply_to) => reply,
                        _ = stop.cancelled() => error(
                            ControlErrorKind::Failed,
                            format!("worker {} is shutting down; a run it started is recorded as interrupted", plane.instance),
                        ),
                    }
                }
            };
            audit::settle(&plane.pool, audit_id, &reply).await;
            plane.send_final(&reply_to, reply).await;
        });
    }
    for s in subscriber.iter_mut() {
        let _ = s.unsubscribe().await;
    }
    while inflight.join_next().await.is_some() {}
}

/// A request for the log: its operation and sizes, not its whole key list.
fn summary(request: &ControlRequest) -> String {
    match request {
        ControlRequest::SweepRun {
            sweep,
            keys,
            dry_run,
            limit,
        } => format!(
            "sweep_run {sweep} keys={} dry_run={dry_run} limit={limit:?}",
            keys.as_ref()
                .map_or("all".to_owned(), |k| k.len().to_string())
        ),
        other => format!("{other:?}"),
    }
}

fn error(kind: ControlErrorKind, message: String) -> ControlReply {
    ControlReply::Error {
        kind,
        message,
        known: Vec::new(),
    }
}

impl ControlPlane {
    /// Publishes `reply` on `inbox`, giving up after [`SEND_WITHIN`] (a
    /// reconnecting client would otherwise block for ever).
    async fn send(&self, inbox: &async_nats::Subject, reply: &ControlReply) -> Result<(), String> {
        let body = serde_json::to_vec(reply).expect("replies serialize");
        let size = body.len();
        let sent = tokio::time::timeout(SEND_WITHIN, async {
            self.nats
                .publish(inbox.clone(), body.into())
                .await
                .map_err(|e| e.to_string())?;
            self.nats.flush().await.map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|_| Err(format!("not sent within {SEND_WITHIN:?}")));
        sent.map_err(|e| {
            tracing::warn!(error = %e, size, "could not answer a control request");
            format!("{e} (reply of {size} bytes)")
        })
    }

    /// Sends the final reply; when it cannot be sent (e.g. larger than the
    /// server's max_payload), sends a short error that says what happened.
    async fn send_final(&self, inbox: &async_nats::Subject, reply: ControlReply) {
        if let Err(e) = self.send(inbox, &reply).await {
            let summary = match &reply {
                ControlReply::Retried { results } => format!(
                    "{} dead letters retried ({} resolved); see `converge dead-letters list`",
                    results.len(),
                    results.iter().filter(|r| r.error.is_none()).count()
                ),
                ControlReply::Candidates { keys, .. } => {
                    format!(
                        "{} candidates; ask for fewer with a lower limit",
                        keys.len()
                    )
                }
                _ => "see `converge sweep history`".to_owned(),
            };
            let _ = self
                .send(
                    inbox,
                    &error(
                        ControlErrorKind::Failed,
                        format!(
                            "the work is done but its reply could not be sent ({e}): {summary}"
                        ),
                    ),
                )
                .await;
        }
    }

    fn accepted(&self) -> ControlReply {
        ControlReply::Accepted {
            instance: self.instance.clone(),
        }
    }

    /// Answers one request; sends `Accepted` first for work that takes time
    /// and returns the final reply.
    async fn handle(&self, request: ControlRequest, inbox: &async_nats::Subject) -> ControlReply {
        match request {
            ControlRequest::SweepRun {
                sweep,
                keys,
                dry_run,
                limit,
            } => self.sweep_run(sweep, keys, dry_run, limit, inbox).await,
            ControlRequest::SweepReplay {
                run_id,
                failed_only,
            } => self.sweep_replay(run_id, failed_only, inbox).await,
            ControlRequest::DeadLetterRetry { ids, actor } => {
                self.retry(ids, actor, inbox, &CancellationToken::new())
                    .await
            }
        }
    }

    fn sweeper(&self, sweep: &str) -> Result<&SweeperHandle, ControlReply> {
        match &self.sweeper {
            Some(s) if s.sweeps().iter().any(|n| n == sweep) => Ok(s),
            other => Err(ControlReply::Error {
                kind: ControlErrorKind::UnknownSweep,
                message: format!("no sweep named {sweep:?} in this application"),
                known: other.as_ref().map(|s| s.sweeps()).unwrap_or_default(),
            }),
        }
    }

    async fn sweep_run(
        &self,
        sweep: String,
        keys: Option<Vec<String>>,
        dry_run: bool,
        limit: Option<u64>,
        inbox: &async_nats::Subject,
    ) -> ControlReply {
        let sweeper = match self.sweeper(&sweep) {
            Ok(s) => s,
            Err(reply) => return reply,
        };
        if let Some(keys) = &keys {
            if keys.is_empty() || keys.iter().any(|k| k.is_empty()) {
                return error(
                    ControlErrorKind::BadRequest,
                    "keys must be non-empty strings".into(),
                );
            }
            if let Err(e) = sweeper.check_keys(&sweep, Some(keys)) {
                return error(ControlErrorKind::BadRequest, e.to_string());
            }
        }
        if dry_run {
            let _ = self.send(inbox, &self.accepted()).await;
            if let Some(keys) = keys {
                return ControlReply::Candidates {
                    sweep,
                    keys,
                    truncated: false,
                };
            }
            return match sweeper
                .candidates(&sweep, limit.unwrap_or(DEFAULT_DRY_RUN_LIMIT))
                .await
            {
                Ok((keys, truncated)) => ControlReply::Candidates {
                    sweep,
                    keys,
                    truncated,
                },
                Err(e) => failed(e),
            };
        }
        if let Some(reply) = self.lease_elsewhere(sweeper, &sweep).await {
            return reply;
        }
        let _ = self.send(inbox, &self.accepted()).await;
        let result = sweeper.run(&sweep, keys, TriggerKind::Operator).await;
        self.outcome(&sweep, result, sweeper).await
    }

    /// `LeaseHeld` when another instance holds the sweep's lease now.
    async fn lease_elsewhere(&self, sweeper: &SweeperHandle, sweep: &str) -> Option<ControlReply> {
        match sweeper.lease_holder(sweep).await {
            Ok(Some(holder)) if holder != self.instance => Some(ControlReply::LeaseHeld {
                sweep: sweep.to_owned(),
                holder: Some(holder),
            }),
            Ok(_) => None,
            Err(e) => Some(failed(e)),
        }
    }

    async fn sweep_replay(
        &self,
        run_id: i64,
        failed_only: bool,
        inbox: &async_nats::Subject,
    ) -> ControlReply {
        let sweep: Option<String> =
            match sqlx::query_scalar("SELECT sweep FROM converge.sweep_runs WHERE id = $1")
                .bind(run_id)
                .fetch_optional(&self.pool)
                .await
            {
                Ok(s) => s,
                Err(e) => return failed(e.into()),
            };
        let Some(sweep) = sweep else {
            return error(
                ControlErrorKind::NotFound,
                format!("no sweep run with id {run_id}"),
            );
        };
        let sweeper = match self.sweeper(&sweep) {
            Ok(s) => s,
            Err(reply) => return reply,
        };
        let keys = if failed_only {
            match SweepRun::failed_keys(&self.pool, run_id).await {
                Ok(keys) if keys.is_empty() => {
                    return error(
                        ControlErrorKind::BadRequest,
                        format!("run {run_id} of {sweep} has no failed keys; nothing to replay"),
                    )
                }
                Ok(keys) => Some(keys),
                Err(e) => return failed(e.into()),
            }
        } else {
            None
        };
        if let Some(reply) = self.lease_elsewhere(sweeper, &sweep).await {
            return reply;
        }
        let _ = self.send(inbox, &self.accepted()).await;
        let result = sweeper.run(&sweep, keys, TriggerKind::Replay).await;
        self.outcome(&sweep, result, sweeper).await
    }

    async fn retry(
        &self,
        ids: Vec<i64>,
        actor: String,
        inbox: &async_nats::Subject,
        stop: &CancellationToken,
    ) -> ControlReply {
        // An id named twice runs once.
        let mut seen = std::collections::HashSet::new();
        let ids: Vec<i64> = ids.into_iter().filter(|id| seen.insert(*id)).collect();
        if ids.is_empty() {
            return error(
                ControlErrorKind::BadRequest,
                "no dead letter ids given".into(),
            );
        }
        let rows: Vec<(i64, String, String, bool)> = match sqlx::query_as(
            "SELECT id, reconciler, aggregate_key, resolved_at IS NOT NULL \
             FROM converge.dead_letters WHERE id = ANY($1) ORDER BY id",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await
        {
            Ok(rows) => rows,
            Err(e) => return failed(e.into()),
        };
        let _ = self.send(inbox, &self.accepted()).await;
        let mut results = Vec::new();
        for id in &ids {
            if stop.is_cancelled() {
                results.push(key_result(
                    *id,
                    "",
                    "",
                    "not_run",
                    Some(format!(
                        "worker {} shut down before this one; retry it again",
                        self.instance
                    )),
                ));
                continue;
            }
            let Some((_, reconciler, key, resolved)) = rows.iter().find(|r| r.0 == *id) else {
                results.push(key_result(
                    *id,
                    "",
                    "",
                    "not_found",
                    Some(format!("no dead letter {id}")),
                ));
                continue;
            };
            if *resolved {
                results.push(key_result(*id, reconciler, key, "already_resolved", None));
                continue;
            }
            let Some(run) = self.reconcilers.get(reconciler) else {
                let mut known: Vec<&String> = self.reconcilers.keys().collect();
                known.sort();
                results.push(key_result(
                    *id,
                    reconciler,
                    key,
                    "unknown_reconciler",
                    Some(format!("this application's workers register {known:?}")),
                ));
                continue;
            };
            let ctx = manual_context(
                &self.pool,
                &self.limits,
                &self.instance,
                &format!("dead letter {id} retried by {actor}"),
            );
            let result = run.run_key(ctx, key.clone()).await;
            let outcome = result.label();
            let err = match &result {
                RunResult::Failed(e) => Some(e.to_string().chars().take(MAX_ERROR_CHARS).collect()),
                _ => None,
            };
            if matches!(result, RunResult::Done(_)) {
                let resolved = sqlx::query(
                    "UPDATE converge.dead_letters \
                     SET resolved_at = now(), resolution = 'retried', resolved_by = $2 \
                     WHERE id = $1 AND resolved_at IS NULL",
                )
                .bind(id)
                .bind(&actor)
                .execute(&self.pool)
                .await;
                if let Err(e) = resolved {
                    results.push(key_result(
                        *id,
                        reconciler,
                        key,
                        "failed",
                        Some(format!(
                            "reconciled, but marking the dead letter resolved failed: {e}"
                        )),
                    ));
                    continue;
                }
            }
            results.push(key_result(*id, reconciler, key, outcome, err));
        }
        ControlReply::Retried { results }
    }
}

fn key_result(
    id: i64,
    reconciler: &str,
    key: &str,
    outcome: &str,
    error: Option<String>,
) -> KeyResult {
    KeyResult {
        dead_letter: Some(id),
        reconciler: reconciler.to_owned(),
        key: key.to_owned(),
        outcome: outcome.to_owned(),
        error,
    }
}

fn failed(e: SweepError) -> ControlReply {
    let kind = match &e {
        SweepError::UnknownSweep { .. } => ControlErrorKind::UnknownSweep,
        _ => ControlErrorKind::Failed,
    };
    error(kind, e.to_string())
}

impl ControlPlane {
    async fn outcome(
        &self,
        sweep: &str,
        result: Result<RunOutcome, SweepError>,
        sweeper: &SweeperHandle,
    ) -> ControlReply {
        match result {
            Ok(RunOutcome::Ran(summary)) => ControlReply::SweepRan {
                instance: self.instance.clone(),
                run_id: summary.run_id,
                status: summary.status.as_str().to_owned(),
                scanned: summary.counts.scanned,
                reconciled: summary.counts.reconciled,
                converged: summary.counts.converged,
                failed: summary.counts.failed,
                busy: summary.counts.busy,
                stopped_at_cap: summary.stopped_at_cap.map(str::to_owned),
            },
            Ok(RunOutcome::LeaseHeld) => ControlReply::LeaseHeld {
                sweep: sweep.to_owned(),
                holder: sweeper.lease_holder(sweep).await.ok().flatten(),
            },
            Ok(RunOutcome::Skipped) => ControlReply::Skipped {
                sweep: sweep.to_owned(),
            },
            Ok(_) => error(
                ControlErrorKind::Failed,
                "the sweep ended in an unknown way".into(),
            ),
            Err(e) => failed(e),
        }
    }
}
