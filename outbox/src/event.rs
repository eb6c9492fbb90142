//! Domain events and the envelope they travel in.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

/// A domain event that can be appended to the outbox.
///
/// The event itself is the payload (serialized with `serde_json`); the three
/// methods say which aggregate it belongs to and what happened. The aggregate
/// type and the event type become tokens of the NATS subject
/// (`<prefix>.<aggregate_type>.<event_type>`), so they may only hold ASCII
/// letters, digits, `_` and `-`.
///
/// ```
/// use converge_outbox::DomainEvent;
///
/// #[derive(serde::Serialize)]
/// struct OrderShipped { order_id: i64, carrier: String }
///
/// impl DomainEvent for OrderShipped {
///     fn aggregate_type(&self) -> &str { "order" }
///     fn aggregate_id(&self) -> String { self.order_id.to_string() }
///     fn event_type(&self) -> &str { "OrderShipped" }
/// }
/// ```
pub trait DomainEvent: Serialize {
    /// The kind of aggregate, e.g. `order`.
    fn aggregate_type(&self) -> &str;
    /// The aggregate's identity, unique within its type. Must not be empty.
    fn aggregate_id(&self) -> String;
    /// What happened, e.g. `OrderShipped`.
    fn event_type(&self) -> &str;
}

/// An event type whose aggregate type and event type are known without an
/// instance: the subject of its events is derived
/// ([`StreamConfig::subject_of`](crate::StreamConfig::subject_of)), so a
/// consumer's filter and the relay's subjects cannot disagree by a typo.
///
/// Every `Event` is a [`DomainEvent`]; implement this trait instead of that
/// one.
///
/// ```
/// use converge_outbox::{DomainEvent, Event, StreamConfig};
///
/// #[derive(serde::Serialize)]
/// struct PaymentCaptured { payment_id: i64 }
///
/// impl Event for PaymentCaptured {
///     const AGGREGATE_TYPE: &'static str = "payment";
///     const EVENT_TYPE: &'static str = "PaymentCaptured";
///     fn aggregate_id(&self) -> String { self.payment_id.to_string() }
/// }
///
/// let stream = StreamConfig::new("PAYMENTS", "payments");
/// assert_eq!(stream.subject_of::<PaymentCaptured>(), "payments.payment.PaymentCaptured");
/// assert_eq!(PaymentCaptured { payment_id: 7 }.event_type(), "PaymentCaptured");
/// ```
pub trait Event: Serialize {
    /// The kind of aggregate, e.g. `payment`: ASCII letters, digits, `_`, `-`.
    const AGGREGATE_TYPE: &'static str;
    /// What happened, e.g. `PaymentCaptured`: ASCII letters, digits, `_`, `-`.
    const EVENT_TYPE: &'static str;
    /// The aggregate's identity, unique within its type. Must not be empty.
    fn aggregate_id(&self) -> String;
}

impl<E: Event> DomainEvent for E {
    fn aggregate_type(&self) -> &str {
        E::AGGREGATE_TYPE
    }

    fn aggregate_id(&self) -> String {
        Event::aggregate_id(self)
    }

    fn event_type(&self) -> &str {
        E::EVENT_TYPE
    }
}

/// An event as the outbox stores it: read back by [`Outbox::history`](crate::Outbox::history).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StoredEvent {
    /// Position in the outbox (increases with insertion, not with commit).
    pub position: i64,
    /// The event's identity (UUIDv7); also its `Nats-Msg-Id` on the stream.
    pub event_id: Uuid,
    /// The aggregate type.
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// The aggregate's version after this event: 1, 2, 3, … per aggregate.
    pub version: i64,
    /// The event type.
    pub event_type: String,
    /// When the event was appended (database clock) or the time given at append.
    pub occurred_at: DateTime<Utc>,
    /// Application headers, sent as NATS headers.
    pub headers: BTreeMap<String, String>,
    /// The JSON payload.
    pub payload: serde_json::Value,
}

impl StoredEvent {
    /// Deserializes the payload into the event type.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.payload)
    }
}

/// What [`Outbox::append`](crate::Outbox::append) recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Appended {
    /// The new event's id.
    pub event_id: Uuid,
    /// The aggregate's version after this event.
    pub version: i64,
}
