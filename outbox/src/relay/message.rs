//! From an outbox row to a JetStream message, and the rows that can never be one.

use std::collections::BTreeMap;

use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::envelope::Envelope;
use crate::trace::TraceParent;
use crate::validate::{is_header_name, is_header_value, is_reserved_header, is_subject_token};

/// A row read from the outbox.
pub(super) struct OutboxRow {
    pub(super) partition: i32,
    pub(super) tx_order: i64,
    pub(super) id: i64,
    pub(super) event_id: Uuid,
    pub(super) aggregate_type: String,
    pub(super) aggregate_id: String,
    pub(super) version: i64,
    pub(super) event_type: String,
    /// The payload's schema version (positive in every row converge writes).
    pub(super) schema_version: i32,
    /// `None`: not a time between the years 1 and 9999 (written by SQL around
    /// the API).
    pub(super) occurred_at: Option<DateTime<Utc>>,
    pub(super) headers: String,
    pub(super) payload: Bytes,
    /// The W3C `traceparent` of the appending transaction; `None` for rows
    /// written without `Outbox::append`.
    pub(super) traceparent: Option<String>,
}

/// A row made into a message, or the reason it never can be.
pub(super) enum Prepared {
    /// Subject and message, and the message's size on the wire.
    Message {
        subject: String,
        message: PublishMessage,
        size: usize,
    },
    /// Can never be published: recorded in `converge.relay_rejects`.
    Reject(String),
}

/// Builds the message for `row` — the envelope every event travels in, its
/// size computed by the same code — or says why the server can never take it.
/// `limit` is the largest message the server and the stream accept.
pub(super) fn prepare(row: &OutboxRow, subject_prefix: &str, limit: usize) -> Prepared {
    let reject = Prepared::Reject;
    if !is_subject_token(&row.aggregate_type) || !is_subject_token(&row.event_type) {
        return reject(format!(
            "aggregate_type {:?} or event_type {:?} is not a valid NATS subject token",
            row.aggregate_type, row.event_type
        ));
    }
    if !is_header_value(&row.aggregate_id) {
        return reject(
            "the aggregate id contains CR, LF or NUL, which NATS headers cannot carry".into(),
        );
    }
    let Ok(schema_version) = u32::try_from(row.schema_version) else {
        return reject(format!(
            "schema_version {} is not positive",
            row.schema_version
        ));
    };
    if schema_version == 0 {
        return reject("schema_version 0 is not positive".into());
    }
    let Some(occurred_at) = row.occurred_at else {
        return reject("occurred_at is not a time between the years 1 and 9999".into());
    };
    let headers: BTreeMap<String, String> = if row.headers == "{}" {
        BTreeMap::new()
    } else {
        match serde_json::from_str(&row.headers) {
            Ok(h) => h,
            Err(e) => {
                let bad = serde_json::from_str::<BTreeMap<String, serde_json::Value>>(&row.headers)
                    .ok()
                    .and_then(|m| m.into_iter().find(|(_, v)| !v.is_string()).map(|(k, _)| k));
                return reject(match bad {
                    Some(name) => format!("header {name:?} is not a string"),
                    None => format!("headers are not a JSON object of strings: {e}"),
                });
            }
        }
    };
    for (name, value) in &headers {
        if !is_header_name(name) || !is_header_value(value) {
            return reject(format!(
                "header {name:?} has a name or value NATS headers cannot carry"
            ));
        }
        if is_reserved_header(name) {
            return reject(format!(
                "header {name:?} uses a reserved prefix (Nats-, Converge-): the server or \
                 converge would act on it"
            ));
        }
    }
    // Sent only when valid: a malformed value (raw SQL) must not make the
    // event unpublishable, and a receiver would discard it anyway.
    let traceparent = row
        .traceparent
        .as_deref()
        .and_then(|tp| match TraceParent::parse(tp) {
            Ok(tp) => Some(tp),
            Err(error) => {
                tracing::debug!(%error, event_id = %row.event_id, "traceparent not sent");
                None
            }
        });
    let envelope = Envelope {
        event_id: row.event_id,
        aggregate_type: &row.aggregate_type,
        aggregate_id: &row.aggregate_id,
        version: row.version,
        event_type: &row.event_type,
        schema_version,
        occurred_at,
        traceparent,
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
    };
    let message_id = row.event_id.to_string();
    let (header_map, size) = envelope.header_map_and_size(&message_id, row.payload.len());
    if size > limit {
        return reject(format!(
            "event is {size} bytes on the wire (headers and payload), over the {limit} bytes \
             the server's max_payload and the stream's max_msg_size allow"
        ));
    }
    let subject = format!("{subject_prefix}.{}.{}", row.aggregate_type, row.event_type);
    let message = PublishMessage::build()
        .headers(header_map)
        .payload(row.payload.clone());
    Prepared::Message {
        subject,
        message,
        size,
    }
}
