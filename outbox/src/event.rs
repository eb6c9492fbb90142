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
    /// What happened, e.g. `OrderShipped`: the event's logical type name,
    /// stored with it and sent on the stream, independent of the Rust type's
    /// name (rename the type freely; keep this).
    fn event_type(&self) -> &str;

    /// The version of the payload's shape (1, 2, 3, …), stored with the event
    /// and sent as the `Converge-Schema-Version` header. Raise it when the
    /// payload's fields change and register an upcaster from the previous
    /// version ([`Upcasters`](crate::Upcasters)), so events stored in the old
    /// shape are read in the new one. Default 1.
    fn schema_version(&self) -> u32 {
        1
    }
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
    /// The logical type name, stored and sent with every event: keep it when
    /// the Rust type is renamed.
    const EVENT_TYPE: &'static str;
    /// The version of the payload's shape; see [`DomainEvent::schema_version`].
    /// Default 1.
    const SCHEMA_VERSION: u32 = 1;
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

    fn schema_version(&self) -> u32 {
        E::SCHEMA_VERSION
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
    /// The event type (its logical name).
    pub event_type: String,
    /// The version of the payload's shape: as stored, or after
    /// [`upcast`](Self::upcast) the version the payload was brought to.
    pub schema_version: u32,
    /// When the event was appended (database clock) or the time given at append.
    pub occurred_at: DateTime<Utc>,
    /// Application headers, sent as NATS headers.
    pub headers: BTreeMap<String, String>,
    /// The JSON payload.
    pub payload: serde_json::Value,
}

impl StoredEvent {
    /// Deserializes the payload as it is, whatever its schema version (see
    /// [`decode_event`](Self::decode_event) for a checked, upcast decode).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.payload)
    }

    /// The event with its payload brought to the newest shape `upcasters`
    /// know for its type (unchanged for a type without upcasters).
    pub fn upcast(mut self, upcasters: &crate::Upcasters) -> Result<Self, crate::UpcastError> {
        let (version, payload) = upcasters.upcast(
            &self.aggregate_type,
            &self.event_type,
            self.schema_version,
            std::mem::take(&mut self.payload),
        )?;
        self.schema_version = version;
        self.payload = payload;
        Ok(self)
    }

    /// Decodes the event as `E`: upcast to `E::SCHEMA_VERSION` and
    /// deserialized. A stored event of another type, of a version newer than
    /// `E` or one no upcaster leads from is an [`UpcastError`](crate::UpcastError).
    pub fn decode_event<E: Event + DeserializeOwned>(
        &self,
        upcasters: &crate::Upcasters,
    ) -> Result<E, crate::UpcastError> {
        upcasters.decode::<E>(
            &self.aggregate_type,
            &self.event_type,
            self.schema_version,
            self.payload.clone(),
        )
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
    /// The event's time as stored (the transaction's time unless given).
    pub occurred_at: DateTime<Utc>,
}
