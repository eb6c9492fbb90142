//! The control plane's wire format: JSON requests from operators (the
//! `converge` CLI) to an application's running workers over NATS, and the
//! workers' replies.
//!
//! A request is published with a reply inbox on [`sweep_subject`] (sweep runs,
//! dry runs, replays) or [`reconciler_subject`] (dead-letter retries). Only the
//! workers that run that sweep or registered that reconciler subscribe there,
//! in one queue group, so exactly one able worker takes each request. It answers on the inbox with
//! [`ControlReply::Accepted`] at once (or an error), then — for work that takes
//! time — with the final reply on the same inbox.

use serde::{Deserialize, Serialize};

/// The root of `application`'s control-plane subjects.
pub fn control_subject(application: &str) -> String {
    format!("converge.control.{application}")
}

/// Where requests about `sweep` go (runs, dry runs, replays): only workers
/// that run that sweep listen there, one of them answers.
pub fn sweep_subject(application: &str, sweep: &str) -> String {
    format!("converge.control.{application}.sweep.{sweep}")
}

/// Where requests to run `reconciler`'s keys go (dead-letter retries): only
/// workers that registered that reconciler listen there.
pub fn reconciler_subject(application: &str, reconciler: &str) -> String {
    format!("converge.control.{application}.reconciler.{reconciler}")
}

/// The queue group workers join on their control subjects.
pub const CONTROL_QUEUE_GROUP: &str = "converge-workers";

/// What an operator asks a worker to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ControlRequest {
    /// Run a sweep now, under its lease: for all candidates (`keys: None`) or
    /// the given keys. With `dry_run`, only list the candidate keys.
    SweepRun {
        /// The sweep's name.
        sweep: String,
        /// Keys to run instead of the candidate query.
        #[serde(default)]
        keys: Option<Vec<String>>,
        /// List the candidates (at most `limit`) without reconciling.
        #[serde(default)]
        dry_run: bool,
        /// At most this many candidates in a dry run.
        #[serde(default)]
        limit: Option<u64>,
    },
    /// Run an earlier run's sweep again: for exactly its failed keys
    /// (`failed_only`) or for all candidates.
    SweepReplay {
        /// The run's id (`converge.sweep_runs.id`).
        run_id: i64,
        /// Only the keys that failed in that run.
        failed_only: bool,
    },
    /// Run dead letters' keys again through their reconcilers (manual path);
    /// each one that succeeds is marked resolved.
    DeadLetterRetry {
        /// Dead letter ids (`converge.dead_letters.id`).
        ids: Vec<i64>,
        /// Who asked, recorded as `resolved_by`.
        actor: String,
    },
}

/// A worker's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ControlReply {
    /// The worker took the request; the final reply follows on the same inbox.
    Accepted {
        /// The worker's instance name.
        instance: String,
    },
    /// A dry run's candidates.
    Candidates {
        /// The sweep.
        sweep: String,
        /// Candidate keys in key order.
        keys: Vec<String>,
        /// More candidates exist beyond `limit`.
        truncated: bool,
    },
    /// A sweep run ended.
    SweepRan {
        /// The instance that ran it.
        instance: String,
        /// `converge.sweep_runs.id`.
        run_id: i64,
        /// `completed`, `stopped_early`, `interrupted`, …
        status: String,
        /// Keys scanned.
        scanned: u64,
        /// Keys changed.
        reconciled: u64,
        /// Keys already converged.
        converged: u64,
        /// Keys that failed.
        failed: u64,
        /// Keys skipped because another path held them.
        busy: u64,
        /// The cap that stopped it, if one did.
        stopped_at_cap: Option<String>,
    },
    /// Another instance holds the sweep's lease; nothing ran.
    LeaseHeld {
        /// The sweep.
        sweep: String,
        /// Who holds the lease, if known.
        holder: Option<String>,
    },
    /// The sweep was running and its overlap policy dropped this request.
    Skipped {
        /// The sweep.
        sweep: String,
    },
    /// Dead letters retried, one result each.
    Retried {
        /// Per dead letter.
        results: Vec<KeyResult>,
    },
    /// The request could not be carried out.
    Error {
        /// What kind of failure.
        kind: ControlErrorKind,
        /// A message for the operator.
        message: String,
        /// For unknown names: the known ones.
        #[serde(default)]
        known: Vec<String>,
    },
}

/// The result of one key run by an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct KeyResult {
    /// The dead letter id, when retrying dead letters.
    pub dead_letter: Option<i64>,
    /// The reconciler.
    pub reconciler: String,
    /// The key.
    pub key: String,
    /// `changed`, `unchanged`, `busy`, `retryable`, `permanent` or `not_found`.
    pub outcome: String,
    /// The error, when it failed.
    pub error: Option<String>,
}

/// Why a control request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ControlErrorKind {
    /// The sweep is not registered by this application's workers.
    UnknownSweep,
    /// The reconciler is not registered by this application's workers.
    UnknownReconciler,
    /// No such run or dead letter.
    NotFound,
    /// The request is malformed.
    BadRequest,
    /// The work failed (database, shutdown, …).
    Failed,
    /// The worker that took the request runs as many control requests as it
    /// takes at once; send it again shortly (the CLI does not retry by itself).
    Busy,
}

impl ControlErrorKind {
    /// Its label.
    pub fn as_str(self) -> &'static str {
        match self {
            ControlErrorKind::UnknownSweep => "unknown_sweep",
            ControlErrorKind::UnknownReconciler => "unknown_reconciler",
            ControlErrorKind::NotFound => "not_found",
            ControlErrorKind::BadRequest => "bad_request",
            ControlErrorKind::Failed => "failed",
            ControlErrorKind::Busy => "busy",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_tagged_json() {
        let request = ControlRequest::SweepRun {
            sweep: "invoices".into(),
            keys: Some(vec!["1".into(), "2".into()]),
            dry_run: false,
            limit: None,
        };
        let json = serde_json::to_string(&request).unwrap();
        assert!(json.contains(r#""op":"sweep_run""#), "{json}");
        assert_eq!(
            serde_json::from_str::<ControlRequest>(&json).unwrap(),
            request
        );
        let minimal: ControlRequest =
            serde_json::from_str(r#"{"op":"sweep_run","sweep":"x"}"#).unwrap();
        assert_eq!(
            minimal,
            ControlRequest::SweepRun {
                sweep: "x".into(),
                keys: None,
                dry_run: false,
                limit: None
            }
        );
    }

    #[test]
    fn replies_round_trip_as_tagged_json() {
        let reply = ControlReply::Error {
            kind: ControlErrorKind::UnknownSweep,
            message: "no sweep named x".into(),
            known: vec!["invoices".into()],
        };
        let json = serde_json::to_string(&reply).unwrap();
        assert!(json.contains(r#""kind":"unknown_sweep""#), "{json}");
        assert_eq!(serde_json::from_str::<ControlReply>(&json).unwrap(), reply);
    }
}
