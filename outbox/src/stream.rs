//! The JetStream stream the relay publishes to.

use std::time::Duration;

use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::stream::{Config, RetentionPolicy, StorageType};
use async_nats::jetstream::Context;
use async_nats::jetstream::ErrorCode;

use crate::error::RelayError;
use crate::validate::is_subject_token;

/// Header carrying the aggregate type.
pub const HEADER_AGGREGATE_TYPE: &str = "Converge-Aggregate-Type";
/// Header carrying the aggregate id.
pub const HEADER_AGGREGATE_ID: &str = "Converge-Aggregate-Id";
/// Header carrying the aggregate's version after the event.
pub const HEADER_AGGREGATE_VERSION: &str = "Converge-Aggregate-Version";
/// Header carrying the event type.
pub const HEADER_EVENT_TYPE: &str = "Converge-Event-Type";
/// Header carrying the version of the payload's shape; absent for version 1
/// (and on events published before converge stored versions).
pub const HEADER_SCHEMA_VERSION: &str = "Converge-Schema-Version";
/// Header carrying the event time (RFC 3339).
pub const HEADER_OCCURRED_AT: &str = "Converge-Occurred-At";
/// Header carrying the event id; JetStream's `Nats-Msg-Id` carries it too.
pub const HEADER_EVENT_ID: &str = "Converge-Event-Id";

/// Where events are published.
///
/// Subjects are `<subject_prefix>.<aggregate_type>.<event_type>`, so consumers
/// can filter by aggregate type (`orders.order.>`) or event type
/// (`orders.*.OrderShipped`).
///
/// # The duplicate window
///
/// Every message carries `Nats-Msg-Id` = event id, and JetStream drops a
/// message whose id it has seen within `duplicate_window`. The relay re-publishes
/// only what it published but had not yet recorded: after a crash between the
/// acknowledgement and the cursor update, or when a partition changes hands
/// mid-batch. Both happen within one lease period plus one publish timeout of
/// the first publish, so the window must be longer than that; the relay refuses
/// to start otherwise. The default, two minutes, covers the default lease (10 s)
/// many times over.
///
/// # One stream, several databases
///
/// Relays of several databases (one per tenant or shard) can share one
/// stream, each under a prefix of its own (`app.tenant_a`, `app.tenant_b`):
/// give each the same [`stream_subjects`](Self::stream_subjects) covering
/// every prefix (`app.>`), so whichever relay starts first creates a stream
/// the others accept.
///
/// ```
/// use converge_outbox::StreamConfig;
/// let a = StreamConfig::new("APP", "app.tenant_a").with_stream_subjects(["app.>"]);
/// assert_eq!(a.subject("account", "Opened"), "app.tenant_a.account.Opened");
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StreamConfig {
    /// The stream's name (no spaces, dots or wildcards).
    pub name: String,
    /// First token(s) of every subject; the stream captures `<prefix>.>`.
    pub subject_prefix: String,
    /// JetStream's de-duplication window.
    pub duplicate_window: Duration,
    /// Storage of a stream the relay creates.
    pub storage: StorageType,
    /// Replicas of a stream the relay creates (3 on a three-node cluster).
    /// An existing stream's replicas are not changed; a relay finding others
    /// logs a warning naming both.
    pub replicas: usize,
    /// Maximum age of messages in a stream the relay creates (zero: unlimited).
    pub max_age: Duration,
    /// Subjects of a stream the relay creates; empty (the default): only
    /// [`subject_filter`](Self::subject_filter), `<prefix>.>`. They must cover
    /// `<prefix>.>`. An existing stream is never changed: it must capture
    /// `<prefix>.>`, whatever these are.
    pub stream_subjects: Vec<String>,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            name: "CONVERGE_EVENTS".into(),
            subject_prefix: "converge".into(),
            duplicate_window: Duration::from_secs(120),
            storage: StorageType::File,
            replicas: 1,
            max_age: Duration::ZERO,
            stream_subjects: Vec::new(),
        }
    }
}

impl StreamConfig {
    /// A stream with this name and subject prefix, other settings default.
    pub fn new(name: impl Into<String>, subject_prefix: impl Into<String>) -> Self {
        StreamConfig {
            name: name.into(),
            subject_prefix: subject_prefix.into(),
            ..Default::default()
        }
    }

    /// The subject of an event.
    pub fn subject(&self, aggregate_type: &str, event_type: &str) -> String {
        format!("{}.{}.{}", self.subject_prefix, aggregate_type, event_type)
    }

    /// The subject of every `E` event: `<prefix>.<aggregate type>.<event type>`.
    pub fn subject_of<E: crate::Event>(&self) -> String {
        self.subject(E::AGGREGATE_TYPE, E::EVENT_TYPE)
    }

    /// The wildcard subject the stream captures.
    pub fn subject_filter(&self) -> String {
        format!("{}.>", self.subject_prefix)
    }

    /// The same, creating the stream (when absent) with `subjects`, e.g.
    /// `app.>` for relays of several databases under `app.<tenant>`.
    pub fn with_stream_subjects<S: Into<String>>(
        mut self,
        subjects: impl IntoIterator<Item = S>,
    ) -> Self {
        self.stream_subjects = subjects.into_iter().map(Into::into).collect();
        self
    }

    /// The subjects a stream the relay creates captures.
    fn subjects_to_create(&self) -> Vec<String> {
        if self.stream_subjects.is_empty() {
            vec![self.subject_filter()]
        } else {
            self.stream_subjects.clone()
        }
    }

    pub(crate) fn validate(&self) -> Result<(), RelayError> {
        if self.name.is_empty()
            || self
                .name
                .chars()
                .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>'))
        {
            return Err(RelayError::Config(format!(
                "stream name {:?} must be non-empty without spaces, '.', '*' or '>'",
                self.name
            )));
        }
        if self.subject_prefix.is_empty() || !self.subject_prefix.split('.').all(is_subject_token) {
            return Err(RelayError::Config(format!(
                "subject prefix {:?} must be one or more dot-separated tokens of ASCII \
                 letters, digits, '_' or '-'",
                self.subject_prefix
            )));
        }
        if let Some(bad) = self.stream_subjects.iter().find(|s| !is_subject(s)) {
            return Err(RelayError::Config(format!(
                "stream subject {bad:?} must be dot-separated tokens of ASCII letters, digits, \
                 '_' or '-', or the wildcards '*' and a final '>'"
            )));
        }
        if !self.stream_subjects.is_empty()
            && !subjects_cover(&self.stream_subjects, &self.subject_filter())
        {
            return Err(RelayError::Config(format!(
                "stream_subjects {:?} do not capture this relay's events {:?}: include a \
                 wildcard covering the subject prefix",
                self.stream_subjects,
                self.subject_filter()
            )));
        }
        Ok(())
    }
}

/// Creates the stream if it is absent; checks an existing one without changing it.
/// Returns the stream's `max_msg_size` (0: no limit of its own).
///
/// `min_duplicate_window` is the shortest window the relay can live with.
pub(crate) async fn ensure_stream(
    js: &Context,
    config: &StreamConfig,
    min_duplicate_window: Duration,
    min_message_size: usize,
) -> Result<usize, RelayError> {
    config.validate()?;
    if config.duplicate_window < min_duplicate_window {
        return Err(RelayError::Config(format!(
            "StreamConfig::duplicate_window {:?} is shorter than the relay's re-publish horizon \
             {:?} (lease_ttl + publish_timeout): raise it",
            config.duplicate_window, min_duplicate_window
        )));
    }
    match js.get_stream(&config.name).await {
        Ok(mut stream) => {
            let info = stream.info().await.map_err(|e| RelayError::JetStream {
                operation: "stream info",
                source: e.into(),
            })?;
            let problems =
                incompatibilities(&info.config, config, min_duplicate_window, min_message_size);
            if info.config.num_replicas != config.replicas {
                // Not refused: replicas change live (`nats stream edit
                // --replicas N`), and workers may be configured before or
                // after the stream is edited.
                tracing::warn!(
                    stream = %config.name,
                    found = info.config.num_replicas,
                    configured = config.replicas,
                    "the stream's replicas differ from StreamConfig::replicas; it is used as it is \
                     (change it with `nats stream edit {} --replicas {}`)",
                    config.name,
                    config.replicas
                );
            }
            if problems.is_empty() {
                Ok(usize::try_from(info.config.max_message_size).unwrap_or(0))
            } else {
                Err(RelayError::IncompatibleStream {
                    stream: config.name.clone(),
                    problems,
                })
            }
        }
        Err(e)
            if matches!(
                e.kind(),
                GetStreamErrorKind::JetStream(ref j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            let create = Config {
                name: config.name.clone(),
                subjects: config.subjects_to_create(),
                duplicate_window: config.duplicate_window,
                storage: config.storage,
                num_replicas: config.replicas,
                max_age: config.max_age,
                retention: RetentionPolicy::Limits,
                ..Default::default()
            };
            match js.create_stream(create).await {
                Ok(_) => {
                    tracing::info!(stream = %config.name, subjects = ?config.subjects_to_create(), "created JetStream stream");
                    Ok(0)
                }
                // Another relay created it at the same moment: check it
                // instead. Otherwise the server refused it (subjects that
                // overlap another stream's, more replicas than servers):
                // say so rather than try again at once, forever.
                Err(create_error) => match js.get_stream(&config.name).await {
                    Ok(_) => {
                        Box::pin(ensure_stream(
                            js,
                            config,
                            min_duplicate_window,
                            min_message_size,
                        ))
                        .await
                    }
                    Err(_) => Err(RelayError::StreamNotCreated {
                        stream: config.name.clone(),
                        subjects: config.subjects_to_create(),
                        replicas: config.replicas,
                        source: create_error.into(),
                    }),
                },
            }
        }
        Err(e) => Err(RelayError::JetStream {
            operation: "get stream",
            source: e.into(),
        }),
    }
}

/// A subject a stream may capture: tokens, `*` tokens, a final `>`.
fn is_subject(s: &str) -> bool {
    let tokens: Vec<&str> = s.split('.').collect();
    tokens
        .iter()
        .enumerate()
        .all(|(i, t)| is_subject_token(t) || *t == "*" || (*t == ">" && i + 1 == tokens.len()))
}

fn subjects_cover(subjects: &[String], filter: &str) -> bool {
    // The stream must capture every subject under the prefix: either `<prefix>.>`
    // itself or a broader wildcard.
    subjects.iter().any(|s| {
        s == ">" || s == filter || {
            s.strip_suffix(".>")
                .is_some_and(|head| filter.starts_with(&format!("{head}.")))
        }
    })
}

fn incompatibilities(
    found: &Config,
    wanted: &StreamConfig,
    min_duplicate_window: Duration,
    min_message_size: usize,
) -> Vec<String> {
    let mut problems = Vec::new();
    let filter = wanted.subject_filter();
    if !subjects_cover(&found.subjects, &filter) {
        problems.push(format!(
            "subjects are {:?} but must include {filter:?}",
            found.subjects
        ));
    }
    if found.duplicate_window < min_duplicate_window {
        problems.push(format!(
            "duplicate_window is {:?} but must be at least {:?} (lease_ttl + publish_timeout)",
            found.duplicate_window, min_duplicate_window
        ));
    }
    if found.retention == RetentionPolicy::WorkQueue {
        problems.push(
            "retention is WorkQueue, which deletes an event once one consumer acks it; \
             use Limits or Interest so every reconciler sees every event"
                .into(),
        );
    }
    if found.max_message_size > 0 && (found.max_message_size as usize) < min_message_size {
        problems.push(format!(
            "max_message_size is {} bytes but events may be up to {min_message_size} bytes \
             (RelayConfig::max_event_bytes)",
            found.max_message_size
        ));
    }
    if found.sealed {
        problems.push("the stream is sealed and accepts no messages".into());
    }
    problems
}

/// Whether some subject matches both `a` and `b` (NATS wildcards: `*` one
/// token, `>` one or more trailing tokens): a consumer filtered by one on a
/// stream capturing the other can receive events; otherwise never.
///
/// ```
/// use converge_outbox::subjects_overlap;
/// assert!(subjects_overlap("orders.>", "orders.order.OrderShipped"));
/// assert!(subjects_overlap("orders.*.*", "orders.order.*"));
/// assert!(subjects_overlap("orders.order.>", "orders.>"));
/// assert!(!subjects_overlap("orders.*.*", "orders.OrderShipped"));
/// assert!(!subjects_overlap("orders.>", "order.order.OrderShipped"));
/// ```
pub fn subjects_overlap(a: &str, b: &str) -> bool {
    fn tokens(a: &[&str], b: &[&str]) -> bool {
        match (a.split_first(), b.split_first()) {
            (None, None) => true,
            (Some((&">", _)), Some(_)) | (Some(_), Some((&">", _))) => true,
            (Some((x, a)), Some((y, b))) => (*x == "*" || *y == "*" || x == y) && tokens(a, b),
            _ => false,
        }
    }
    let a: Vec<&str> = a.split('.').collect();
    let b: Vec<&str> = b.split('.').collect();
    tokens(&a, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_coverage() {
        assert!(subjects_cover(&["app.>".into()], "app.>"));
        assert!(subjects_cover(&[">".into()], "app.>"));
        assert!(subjects_cover(&["app.>".into()], "app.events.>"));
        assert!(!subjects_cover(&["app.order.*".into()], "app.>"));
        assert!(!subjects_cover(&["other.>".into()], "app.>"));
        assert!(!subjects_cover(&["ap.>".into()], "app.>"));
    }

    #[test]
    fn stream_subjects_must_be_subjects_covering_the_prefix() {
        let ok = StreamConfig::new("S", "app.tenant_a").with_stream_subjects(["app.>"]);
        assert!(ok.validate().is_ok());
        assert_eq!(ok.subjects_to_create(), vec!["app.>".to_owned()]);
        let default = StreamConfig::new("S", "app.tenant_a");
        assert_eq!(
            default.subjects_to_create(),
            vec!["app.tenant_a.>".to_owned()]
        );
        let narrow =
            StreamConfig::new("S", "app.tenant_a").with_stream_subjects(["app.tenant_b.>"]);
        let err = narrow.validate().unwrap_err().to_string();
        assert!(err.contains("do not capture"), "{err}");
        let bad = StreamConfig::new("S", "app.tenant_a").with_stream_subjects(["app.>.x"]);
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("stream subject"));
    }

    #[test]
    fn incompatible_settings_are_each_named() {
        let wanted = StreamConfig::new("S", "app");
        let found = Config {
            name: "S".into(),
            subjects: vec!["other.>".into()],
            duplicate_window: Duration::from_secs(1),
            retention: RetentionPolicy::WorkQueue,
            max_message_size: 10,
            ..Default::default()
        };
        let problems = incompatibilities(&found, &wanted, Duration::from_secs(15), 1024);
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].contains("app.>"));
        assert!(problems[1].contains("duplicate_window"));
    }
}
