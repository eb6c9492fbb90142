//! The aggregate contract, and how its events are stored: an enum whose
//! variants are the aggregate's event types.

use serde::de::{DeserializeOwned, Visitor};
use serde::Serialize;
use serde_json::Value;

/// An event-sourced aggregate: its state is the fold of its events.
///
/// `apply` folds one event into the state; `decide` turns a command into the
/// events it causes (none when there is nothing to do: commands are
/// idempotent by the state they read) or refuses it with a domain error. The
/// state is `Serialize` + `Deserialize` so snapshots can store it.
///
/// The events are one enum (`Self::Event`) in serde's default, externally
/// tagged form: each variant's name — after `#[serde(rename)]` — is the
/// event's logical type name in the outbox and on the stream
/// (`<prefix>.<TYPE>.<variant>`), independent of the Rust names, and its
/// fields are the payload.
///
/// ```
/// use converge_eventsourcing::Aggregate;
///
/// #[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
/// struct Account { open: bool, balance: i64 }
///
/// #[derive(Debug, serde::Serialize, serde::Deserialize)]
/// enum AccountEvent {
///     Opened,
///     Deposited { amount: i64 },
/// }
///
/// enum AccountCommand { Open, Deposit(i64) }
///
/// #[derive(Debug, thiserror::Error)]
/// enum AccountError {
///     #[error("the account is not open")]
///     NotOpen,
/// }
///
/// impl Aggregate for Account {
///     const TYPE: &'static str = "account";
///     type Event = AccountEvent;
///     type Command = AccountCommand;
///     type Error = AccountError;
///
///     fn apply(&mut self, event: &AccountEvent) {
///         match event {
///             AccountEvent::Opened => self.open = true,
///             AccountEvent::Deposited { amount } => self.balance += amount,
///         }
///     }
///
///     fn decide(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
///         match command {
///             AccountCommand::Open if self.open => Ok(vec![]), // already done
///             AccountCommand::Open => Ok(vec![AccountEvent::Opened]),
///             AccountCommand::Deposit(_) if !self.open => Err(AccountError::NotOpen),
///             AccountCommand::Deposit(amount) => Ok(vec![AccountEvent::Deposited { amount: *amount }]),
///         }
///     }
/// }
///
/// assert_eq!(converge_eventsourcing::event_types::<AccountEvent>().unwrap(), ["Opened", "Deposited"]);
/// ```
pub trait Aggregate: Default + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The aggregate type: a subject token (ASCII letters, digits, `_`, `-`).
    const TYPE: &'static str;

    /// The shape of the state as snapshots store it. Raise it whenever the
    /// state's fields or their meaning change: snapshots of another shape are
    /// ignored (the aggregate is folded from its events) and replaced by the
    /// next one taken. Default 1.
    const SHAPE_VERSION: u32 = 1;

    /// The aggregate's events: an externally tagged enum, one variant per
    /// event type.
    type Event: Serialize + DeserializeOwned + Send + Sync + 'static;

    /// What callers ask of the aggregate.
    type Command: Send + Sync;

    /// Why a command is refused.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Folds one event into the state. Must not fail: the event happened.
    fn apply(&mut self, event: &Self::Event);

    /// The events `command` causes given the current state, or why it is
    /// refused. Decide from the state only (no I/O): the repository retries
    /// it against a fresher state when another writer got there first.
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// The current schema version of the event type `event_type` (the shape
    /// of that variant's fields): stored with each new event, and the version
    /// older events are upcast to when loaded. Default 1; raise it with an
    /// upcaster from the previous version
    /// ([`Upcasters::add_named`](converge_outbox::Upcasters::add_named)).
    fn schema_version(event_type: &str) -> u32 {
        let _ = event_type;
        1
    }
}

/// Why an event could not be turned into its type name and payload, or back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The event type is not a serde enum in the externally tagged form.
    #[error(
        "{0}: an aggregate's events must be an enum in serde's default (externally tagged) \
         representation, one variant per event type; remove #[serde(tag = ..)] / \
         #[serde(untagged)]"
    )]
    NotAnEnum(String),
    /// The payload does not deserialize into the variant.
    #[error("event {event_type} does not decode: {source}")]
    Decode {
        /// The event type.
        event_type: String,
        /// The deserializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// The event does not serialize.
    #[error("an event does not serialize: {0}")]
    Encode(#[source] serde_json::Error),
}

/// An event as its type name and payload: the variant's name and its fields
/// (`null` for a variant without fields).
pub(crate) fn encode<E: Serialize>(event: &E) -> Result<(String, Value), CodecError> {
    match serde_json::to_value(event).map_err(CodecError::Encode)? {
        Value::String(name) => Ok((name, Value::Null)),
        Value::Object(map) if map.len() == 1 => {
            let (name, payload) = map.into_iter().next().expect("one entry");
            Ok((name, payload))
        }
        other => Err(CodecError::NotAnEnum(format!(
            "an event serialized as {}",
            match other {
                Value::Object(_) => "an object of several fields",
                Value::Array(_) => "an array",
                _ => "a plain value",
            }
        ))),
    }
}

/// The event of type `event_type` with `payload` (as [`encode`] made them).
pub(crate) fn decode<E: DeserializeOwned>(
    event_type: &str,
    payload: Value,
) -> Result<E, CodecError> {
    let decode_error = |source| CodecError::Decode {
        event_type: event_type.to_owned(),
        source,
    };
    if payload.is_null() {
        // A variant without fields is its name; a newtype of `()` / `None`
        // is `{name: null}`.
        if let Ok(event) = serde_json::from_value(Value::String(event_type.to_owned())) {
            return Ok(event);
        }
    }
    let mut map = serde_json::Map::with_capacity(1);
    map.insert(event_type.to_owned(), payload);
    serde_json::from_value(Value::Object(map)).map_err(decode_error)
}

/// [`decode`] from the payload's JSON text, without building a value first
/// (loading's path for events already in their current shape).
pub(crate) fn decode_str<E: DeserializeOwned>(
    event_type: &str,
    payload: &str,
) -> Result<E, CodecError> {
    let decode_error = |source| CodecError::Decode {
        event_type: event_type.to_owned(),
        source,
    };
    if payload.trim() == "null" {
        return decode(event_type, Value::Null);
    }
    let name = serde_json::to_string(event_type).map_err(decode_error)?;
    let mut json = String::with_capacity(name.len() + payload.len() + 3);
    json.push('{');
    json.push_str(&name);
    json.push(':');
    json.push_str(payload);
    json.push('}');
    serde_json::from_str(&json).map_err(decode_error)
}

/// The event type names of an aggregate's event enum `E` — its variants'
/// names as serde writes them — read from its `Deserialize` implementation.
/// `None` for a type that does not deserialize as an enum.
///
/// ```
/// #[derive(serde::Deserialize)]
/// enum TransferEvent {
///     Requested { amount: i64 },
///     #[serde(rename = "Debited")]
///     SourceDebited,
/// }
/// assert_eq!(converge_eventsourcing::event_types::<TransferEvent>().unwrap(), ["Requested", "Debited"]);
/// ```
pub fn event_types<E: DeserializeOwned>() -> Option<&'static [&'static str]> {
    let mut found = None;
    let _ = E::deserialize(Introspect(&mut found));
    found
}

/// A deserializer that only records the variant list an enum asks for.
struct Introspect<'a>(&'a mut Option<&'static [&'static str]>);

impl<'de> serde::Deserializer<'de> for Introspect<'_> {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("not an enum"))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = Some(variants);
        Err(serde::de::Error::custom("variants recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    enum Ev {
        Unit,
        Struct {
            a: i64,
        },
        Newtype(String),
        #[serde(rename = "renamed")]
        Other {
            b: bool,
        },
    }

    #[test]
    fn every_variant_form_goes_there_and_back() {
        for event in [
            Ev::Unit,
            Ev::Struct { a: 7 },
            Ev::Newtype("x".into()),
            Ev::Other { b: true },
        ] {
            let (name, payload) = encode(&event).unwrap();
            let text = payload.to_string();
            assert_eq!(decode::<Ev>(&name, payload).unwrap(), event);
            assert_eq!(decode_str::<Ev>(&name, &text).unwrap(), event);
        }
        assert_eq!(encode(&Ev::Other { b: false }).unwrap().0, "renamed");
        assert_eq!(
            event_types::<Ev>().unwrap(),
            ["Unit", "Struct", "Newtype", "renamed"]
        );
    }

    #[test]
    fn what_is_not_an_enum_is_named() {
        #[derive(Serialize, serde::Deserialize)]
        #[serde(tag = "type")]
        enum Tagged {
            A { x: i64 },
        }
        assert!(event_types::<Tagged>().is_none());
        assert!(matches!(
            encode(&Tagged::A { x: 1 }),
            Err(CodecError::NotAnEnum(_))
        ));
        let err = decode::<Ev>("Struct", serde_json::json!({"a": "no"})).unwrap_err();
        assert!(err.to_string().contains("Struct"), "{err}");
    }
}
