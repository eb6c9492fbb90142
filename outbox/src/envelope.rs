//! The message an event travels in: its NATS headers, and its size exactly as
//! the server counts it against `max_payload`.
//!
//! One function lists the headers ([`Envelope::visit`]); the relay builds its
//! messages from it, `Outbox::append` sizes events with it, and tools that
//! re-publish stored events (`converge outbox replay`) use it too, so the size
//! checked at append time is the size sent.

use async_nats::HeaderMap;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::stream::{
    HEADER_AGGREGATE_ID, HEADER_AGGREGATE_TYPE, HEADER_AGGREGATE_VERSION, HEADER_EVENT_ID,
    HEADER_EVENT_TYPE, HEADER_OCCURRED_AT, HEADER_SCHEMA_VERSION,
};
use crate::trace::{TraceParent, HEADER_TRACEPARENT};

/// JetStream's de-duplication header.
pub const HEADER_MESSAGE_ID: &str = "Nats-Msg-Id";

/// Bytes of a header block around its lines: `NATS/1.0\r\n` and the closing `\r\n`.
const HEADER_BLOCK_FRAMING: usize = "NATS/1.0\r\n".len() + "\r\n".len();

/// A stored event's envelope: everything the relay puts in the message's
/// headers.
///
/// ```
/// use converge_outbox::{Envelope, HEADER_MESSAGE_ID};
///
/// let event_id = uuid::Uuid::now_v7();
/// let envelope = Envelope {
///     event_id,
///     aggregate_type: "order",
///     aggregate_id: "42",
///     version: 3,
///     event_type: "OrderShipped",
///     schema_version: 1,
///     occurred_at: chrono::Utc::now(),
///     traceparent: None,
///     headers: vec![("tenant", "t1")],
/// };
/// let headers = envelope.header_map(&event_id.to_string());
/// assert_eq!(headers.get(HEADER_MESSAGE_ID).unwrap().as_str(), event_id.to_string());
/// let payload = br#"{"order_id":42}"#;
/// assert_eq!(
///     envelope.wire_size(&event_id.to_string(), payload.len()),
///     converge_outbox::wire_size(&headers, payload.len()),
/// );
/// ```
#[derive(Debug, Clone)]
pub struct Envelope<'a> {
    /// The event id (`Converge-Event-Id`).
    pub event_id: Uuid,
    /// The aggregate type.
    pub aggregate_type: &'a str,
    /// The aggregate id.
    pub aggregate_id: &'a str,
    /// The aggregate's version after the event.
    pub version: i64,
    /// The event type (its logical name).
    pub event_type: &'a str,
    /// The version of the payload's shape (`Converge-Schema-Version`, sent
    /// when it is not 1).
    pub schema_version: u32,
    /// When the event happened.
    pub occurred_at: DateTime<Utc>,
    /// The W3C trace context, sent as `traceparent` when present.
    pub traceparent: Option<TraceParent>,
    /// The application's headers.
    pub headers: Vec<(&'a str, &'a str)>,
}

/// How the relay writes `Converge-Occurred-At`: RFC 3339, microseconds, UTC.
pub(crate) fn format_occurred_at(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

impl Envelope<'_> {
    /// Calls `line` with every header (name, value) the message carries, in
    /// order: the application's headers, the `Converge-*` headers
    /// (`Converge-Schema-Version` only for a version other than 1),
    /// `traceparent` (when present; it replaces an application header of that
    /// name) and `Nats-Msg-Id` = `message_id`.
    pub fn visit(&self, message_id: &str, mut line: impl FnMut(&str, &str)) {
        for (k, v) in &self.headers {
            if self.traceparent.is_some() && *k == HEADER_TRACEPARENT {
                continue;
            }
            line(k, v);
        }
        line(HEADER_EVENT_ID, &self.event_id.to_string());
        line(HEADER_AGGREGATE_TYPE, self.aggregate_type);
        line(HEADER_AGGREGATE_ID, self.aggregate_id);
        line(HEADER_AGGREGATE_VERSION, &self.version.to_string());
        line(HEADER_EVENT_TYPE, self.event_type);
        // Version 1 goes without: an absent header means 1, and events that
        // never evolve keep the size they had before versions existed.
        if self.schema_version != 1 {
            line(HEADER_SCHEMA_VERSION, &self.schema_version.to_string());
        }
        line(HEADER_OCCURRED_AT, &format_occurred_at(self.occurred_at));
        if let Some(tp) = self.traceparent {
            line(HEADER_TRACEPARENT, &tp.to_string());
        }
        line(HEADER_MESSAGE_ID, message_id);
    }

    /// The headers as a NATS header map.
    pub fn header_map(&self, message_id: &str) -> HeaderMap {
        self.header_map_and_size(message_id, 0).0
    }

    /// The headers as a NATS header map, and the message's
    /// [`wire_size`](Self::wire_size) with a payload of `payload_len` bytes,
    /// in one pass.
    pub fn header_map_and_size(&self, message_id: &str, payload_len: usize) -> (HeaderMap, usize) {
        let mut h = HeaderMap::new();
        let mut size = HEADER_BLOCK_FRAMING + payload_len;
        self.visit(message_id, |k, v| {
            size += header_line_len(k, v);
            h.insert(k, v);
        });
        (h, size)
    }

    /// The message's size as NATS counts it against `max_payload` (and
    /// JetStream against a stream's `max_msg_size`): the header block plus the
    /// payload.
    pub fn wire_size(&self, message_id: &str, payload_len: usize) -> usize {
        let mut size = HEADER_BLOCK_FRAMING + payload_len;
        self.visit(message_id, |k, v| size += header_line_len(k, v));
        size
    }
}

/// `Name: value\r\n`.
fn header_line_len(name: &str, value: &str) -> usize {
    name.len() + 2 + value.len() + 2
}

/// The size NATS counts against `max_payload` for a message with these
/// headers and a payload of `payload_len` bytes: the header block
/// (`NATS/1.0\r\n`, a `Name: value\r\n` line per value, `\r\n`) plus the
/// payload; a message without headers is just its payload.
pub fn wire_size(headers: &HeaderMap, payload_len: usize) -> usize {
    if headers.is_empty() {
        return payload_len;
    }
    let mut size = HEADER_BLOCK_FRAMING + payload_len;
    for (name, values) in headers.iter() {
        for value in values {
            size += header_line_len(name.as_ref(), value.as_str());
        }
    }
    size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_is_the_header_block_plus_the_payload() {
        let envelope = Envelope {
            event_id: Uuid::nil(),
            aggregate_type: "o",
            aggregate_id: "1",
            version: 12,
            event_type: "E",
            schema_version: 2,
            occurred_at: DateTime::from_timestamp(0, 0).unwrap(),
            traceparent: None,
            headers: vec![("k", "v")],
        };
        let block = format!(
            "NATS/1.0\r\nk: v\r\n{HEADER_EVENT_ID}: {}\r\n{HEADER_AGGREGATE_TYPE}: o\r\n\
             {HEADER_AGGREGATE_ID}: 1\r\n{HEADER_AGGREGATE_VERSION}: 12\r\n\
             {HEADER_EVENT_TYPE}: E\r\n{HEADER_SCHEMA_VERSION}: 2\r\n{HEADER_OCCURRED_AT}: 1970-01-01T00:00:00.000000Z\r\n\
             {HEADER_MESSAGE_ID}: m\r\n\r\n",
            Uuid::nil()
        );
        assert_eq!(envelope.wire_size("m", 7), block.len() + 7);
        assert_eq!(wire_size(&envelope.header_map("m"), 7), block.len() + 7);
        assert_eq!(envelope.header_map_and_size("m", 7).1, block.len() + 7);

        // An application `traceparent` is replaced by the envelope's, not sent twice.
        let tp: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap();
        let traced = Envelope {
            traceparent: Some(tp),
            headers: vec![(
                HEADER_TRACEPARENT,
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            )],
            ..envelope
        };
        let (map, size) = traced.header_map_and_size("m", 7);
        assert_eq!(size, wire_size(&map, 7));

        // Version 1 has no header: the message is as large as before
        // versions existed.
        let first = Envelope {
            schema_version: 1,
            ..traced.clone()
        };
        let map = first.header_map("m");
        assert!(map.get(HEADER_SCHEMA_VERSION).is_none());
        assert_eq!(
            first.wire_size("m", 7),
            size - (HEADER_SCHEMA_VERSION.len() + 2 + 1 + 2)
        );
    }
}
