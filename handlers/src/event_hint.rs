//! Building an [`EventHint`] by hand: for tests (the test kit replays an event
//! to a reconciler) and for applications that hand events to `run_key`
//! themselves. The consumer builds its hints from the stream's headers.

use bytes::Bytes;

use crate::reconciler::EventHint;

impl EventHint {
    /// A hint for the event `event_type` on the aggregate `aggregate_type` /
    /// `aggregate_id`, with `payload` as its JSON body: a new event id
    /// (UUID v7), version 0, schema version 1, subject `<aggregate_type>.<event_type>`, occurred
    /// now, no headers and no trace context. The fields are public: set the
    /// others as needed (e.g. `hint.version = 3`).
    pub fn new(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Self {
        let aggregate_type = aggregate_type.into();
        let event_type = event_type.into();
        EventHint {
            event_id: uuid::Uuid::now_v7(),
            subject: format!("{aggregate_type}.{event_type}"),
            aggregate_type,
            aggregate_id: aggregate_id.into(),
            version: 0,
            event_type,
            schema_version: 1,
            occurred_at: Some(chrono::Utc::now()),
            headers: Default::default(),
            payload: payload.into(),
            traceparent: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_built_hint_decodes_and_names_its_subject() {
        let hint = EventHint::new("order", "42", "OrderShipped", r#"{"order_id":42}"#);
        assert_eq!(hint.subject, "order.OrderShipped");
        assert_eq!(hint.aggregate_id, "42");
        let body: serde_json::Value = hint.decode().unwrap();
        assert_eq!(body["order_id"], 42);
        let again = EventHint::new("order", "42", "OrderShipped", Bytes::new());
        assert_ne!(hint.event_id, again.event_id);
    }
}
