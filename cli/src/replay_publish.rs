//! Publishing replayed events: the relay's envelope with a replay message id,
//! an aggregate's next event only after the previous one was acknowledged.

use std::cell::Cell;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::target::StreamTarget;

/// Header marking a replayed message, with the audit row's id.
pub(crate) const HEADER_REPLAY: &str = "Converge-Replay";

/// One event to send.
pub(crate) struct ReplayEvent {
    pub(crate) id: i64,
    pub(crate) tx_order: i64,
    pub(crate) event_id: Uuid,
    pub(crate) aggregate_type: String,
    pub(crate) aggregate_id: String,
    pub(crate) version: i64,
    pub(crate) event_type: String,
    pub(crate) schema_version: u32,
    pub(crate) occurred_at: DateTime<Utc>,
    pub(crate) headers: HashMap<String, String>,
    pub(crate) traceparent: Option<String>,
    pub(crate) payload: String,
}

impl ReplayEvent {
    pub(crate) fn describe(&self) -> String {
        format!(
            "outbox id {} (event {}, {}/{} version {}, {})",
            self.id,
            self.event_id,
            self.aggregate_type,
            self.aggregate_id,
            self.version,
            self.event_type
        )
    }
}

/// Publishes events and waits for their acknowledgements.
pub(crate) struct Sender<'a> {
    pub(crate) js: &'a async_nats::jetstream::Context,
    pub(crate) target: &'a StreamTarget,
    pub(crate) audit_id: i64,
    pub(crate) batch: usize,
    /// Counts every acknowledged event, as it is acknowledged.
    pub(crate) acked: &'a Cell<u64>,
}

impl Sender<'_> {
    /// The message, or why the server cannot take it (the replay headers
    /// make a message larger than the relay's).
    fn message(
        &self,
        e: &ReplayEvent,
    ) -> Result<async_nats::jetstream::message::PublishMessage, String> {
        // The relay's envelope (the trace context only when it is valid), with
        // a replay message id and the replay header.
        let envelope = converge::Envelope {
            event_id: e.event_id,
            aggregate_type: &e.aggregate_type,
            aggregate_id: &e.aggregate_id,
            version: e.version,
            event_type: &e.event_type,
            schema_version: e.schema_version,
            occurred_at: e.occurred_at,
            traceparent: e
                .traceparent
                .as_deref()
                .and_then(|t| converge::TraceParent::parse(t).ok()),
            headers: e
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
        };
        let mut headers = envelope.header_map(&format!("{}:replay:{}", e.event_id, self.audit_id));
        headers.insert(HEADER_REPLAY, self.audit_id.to_string().as_str());
        let size = converge::wire_size(&headers, e.payload.len());
        let limit = self.js.client().server_info().max_payload;
        if limit > 0 && size > limit {
            return Err(format!(
                "with the replay headers the event is {size} bytes, over the server's \
                 max_payload of {limit}: it cannot be replayed"
            ));
        }
        Ok(async_nats::jetstream::message::PublishMessage::build()
            .headers(headers)
            .payload(bytes::Bytes::from(e.payload.clone().into_bytes())))
    }

    /// Sends `events` in order: up to `batch` in flight, never two of one
    /// aggregate, counting acknowledgements in `acked`. Returns the first
    /// failure (its index and error); nothing is sent after a failure, but
    /// events of the same round after it may have been acknowledged.
    pub(crate) async fn send(&self, events: &[ReplayEvent]) -> Option<(usize, String)> {
        let mut start = 0;
        while start < events.len() {
            // A round: consecutive events of distinct aggregates, at most `batch`.
            let mut aggregates = std::collections::HashSet::new();
            let mut end = start;
            while end < events.len()
                && end - start < self.batch
                && aggregates.insert((&events[end].aggregate_type, &events[end].aggregate_id))
            {
                end += 1;
            }
            let mut pending = Vec::with_capacity(end - start);
            let mut failure = None;
            for (i, e) in events.iter().enumerate().take(end).skip(start) {
                let subject = self.target.subject(&e.aggregate_type, &e.event_type);
                let message = match self.message(e) {
                    Ok(m) => m,
                    Err(why) => {
                        failure = Some((i, why));
                        break;
                    }
                };
                match self.js.send_publish(subject, message).await {
                    Ok(ack) => pending.push((i, ack)),
                    Err(error) => {
                        failure = Some((i, error.to_string()));
                        break;
                    }
                }
            }
            for (i, ack) in pending {
                match ack.await {
                    Ok(_) => self.acked.set(self.acked.get() + 1),
                    Err(error) => {
                        if failure.as_ref().is_none_or(|(f, _)| i < *f) {
                            failure = Some((i, error.to_string()));
                        }
                    }
                }
            }
            if failure.is_some() {
                return failure;
            }
            start = end;
        }
        None
    }
}
