//! From an outbox row to a JetStream message, and the rows that can never be one.

use std::collections::HashMap;

use async_nats::jetstream::message::PublishMessage;
use async_nats::HeaderMap;
use chrono::{DateTime, SecondsFormat, Utc};
use uuid::Uuid;

use super::Shared;
use crate::stream::{
    HEADER_AGGREGATE_ID, HEADER_AGGREGATE_TYPE, HEADER_AGGREGATE_VERSION, HEADER_EVENT_ID,
    HEADER_EVENT_TYPE, HEADER_OCCURRED_AT,
};
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
    let size = envelope_size(&row.aggregate_id, &btree, row.payload.len());
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
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(k.as_str(), v.as_str());
    }
    let event_id = row.event_id.to_string();
    h.insert(HEADER_EVENT_ID, event_id.as_str());
    h.insert(HEADER_AGGREGATE_TYPE, row.aggregate_type.as_str());
    h.insert(HEADER_AGGREGATE_ID, row.aggregate_id.as_str());
    h.insert(HEADER_AGGREGATE_VERSION, row.version.to_string().as_str());
    h.insert(HEADER_EVENT_TYPE, row.event_type.as_str());
    h.insert(
        HEADER_OCCURRED_AT,
        row.occurred_at
            .to_rfc3339_opts(SecondsFormat::Micros, true)
            .as_str(),
    );
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
