//! From an outbox row to a JetStream message, and the rows that can never be one.

use std::collections::HashMap;

use async_nats::jetstream::message::PublishMessage;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::Shared;
use crate::stream::event_headers;
use crate::trace::{TraceParent, HEADER_TRACEPARENT, TRACEPARENT_HEADER_BYTES};
use crate::validate::{envelope_size, is_subject_token};

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
    pub(super) occurred_at: DateTime<Utc>,
    pub(super) headers: String,
    pub(super) payload: String,
    /// The W3C `traceparent` of the appending transaction; `None` for rows
    /// written without `Outbox::append` (raw SQL).
    pub(super) traceparent: Option<String>,
}

/// Why a row can never be published, if it cannot.
pub(super) fn reject_reason(
    shared: &Shared,
    row: &OutboxRow,
    headers: &HashMap<String, String>,
) -> Option<String> {
    if !is_subject_token(&row.aggregate_type) || !is_subject_token(&row.event_type) {
        return Some(format!(
            "aggregate_type {:?} or event_type {:?} is not a valid NATS subject token",
            row.aggregate_type, row.event_type
        ));
    }
    if headers.iter().any(|(k, v)| {
        k.is_empty() || k.contains([':', ' ', '\r', '\n']) || v.contains(['\r', '\n'])
    }) || row.aggregate_id.contains(['\r', '\n'])
    {
        return Some(
            "a header or the aggregate id contains characters NATS headers cannot carry".into(),
        );
    }
    let btree = headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let trace_bytes = row
        .traceparent
        .as_ref()
        .map_or(0, |_| TRACEPARENT_HEADER_BYTES);
    let size = envelope_size(&row.aggregate_id, &btree, row.payload.len()) + trace_bytes;
    if size > shared.max_payload {
        return Some(format!(
            "event is {size} bytes with headers, over the server's max_payload of {} bytes",
            shared.max_payload
        ));
    }
    None
}

pub(super) fn message(
    shared: &Shared,
    row: &OutboxRow,
    headers: HashMap<String, String>,
) -> (String, PublishMessage) {
    let event_id = row.event_id.to_string();
    let mut h = event_headers(
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        row.event_id,
        &row.aggregate_type,
        &row.aggregate_id,
        row.version,
        &row.event_type,
        row.occurred_at,
    );
    // Sent only when valid: a malformed value (raw SQL) must not make the
    // event unpublishable, and a receiver would discard it anyway.
    if let Some(tp) = row.traceparent.as_deref() {
        match TraceParent::parse(tp) {
            Ok(tp) => h.insert(HEADER_TRACEPARENT, tp.to_string().as_str()),
            Err(error) => {
                tracing::debug!(%error, event_id = %row.event_id, "traceparent not sent")
            }
        }
    }
    let subject = shared
        .config
        .stream
        .subject(&row.aggregate_type, &row.event_type);
    let publish = PublishMessage::build()
        .headers(h)
        .message_id(event_id)
        .payload(bytes::Bytes::from(row.payload.clone().into_bytes()));
    (subject, publish)
}
