//! Evolving event payloads: every stored event carries its logical type name
//! (`aggregate_type` / `event_type`) and the version of its payload's shape
//! (`schema_version`); upcasters turn an old payload into the current shape
//! on every read path — [`StoredEvent::upcast`](crate::StoredEvent::upcast)
//! (histories), aggregate loading, the consumer's hints and replays.
//!
//! ```
//! use converge_outbox::{Event, Upcasters};
//! use serde_json::json;
//!
//! /// Version 3: amounts in cents, with a currency.
//! #[derive(Debug, serde::Serialize, serde::Deserialize)]
//! struct Deposited { account: String, cents: i64, currency: String }
//!
//! impl Event for Deposited {
//!     const AGGREGATE_TYPE: &'static str = "account";
//!     const EVENT_TYPE: &'static str = "Deposited";
//!     const SCHEMA_VERSION: u32 = 3;
//!     fn aggregate_id(&self) -> String { self.account.clone() }
//! }
//!
//! let upcasters = Upcasters::new()
//!     // v1 → v2: `amount` was in whole euros.
//!     .add::<Deposited>(1, |mut v| {
//!         let euros = v["amount"].as_i64().ok_or("amount is not a number")?;
//!         v["cents"] = json!(euros * 100);
//!         v.as_object_mut().unwrap().remove("amount");
//!         Ok(v)
//!     })
//!     // v2 → v3: a currency, EUR until then.
//!     .add::<Deposited>(2, |mut v| {
//!         v["currency"] = json!("EUR");
//!         Ok(v)
//!     });
//! upcasters.check::<Deposited>().unwrap();
//!
//! let stored_v1 = json!({"account": "a-1", "amount": 5});
//! let now: Deposited = upcasters.decode("account", "Deposited", 1, stored_v1).unwrap();
//! assert_eq!((now.cents, now.currency.as_str()), (500, "EUR"));
//!
//! // A version this build does not know is an error, never a guess.
//! let newer = upcasters.decode::<Deposited>("account", "Deposited", 4, json!({}));
//! assert!(newer.unwrap_err().to_string().contains("newer"));
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::event::Event;

/// One step: the payload of version `from` → version `from + 1`.
type Step = dyn Fn(Value) -> Result<Value, String> + Send + Sync;

/// The upcasters of every event type, by logical type
/// (`aggregate_type`, `event_type`): for each, steps from one schema version
/// to the next. Cheap to clone; share one value among every reader.
///
/// A type without upcasters is read as it is stored. A type with upcasters
/// is read at the newest version they reach: an event stored at an older
/// version goes through each step in turn; one stored at a newer version, or
/// at a version no step leads from, is an [`UpcastError`].
#[derive(Clone, Default)]
pub struct Upcasters {
    chains: Arc<HashMap<(String, String), Chain>>,
    /// Types declared to have no stored event below a version.
    oldest: Arc<HashMap<(String, String), u32>>,
}

/// One type's steps, by the version each leads from.
type Chain = BTreeMap<u32, Arc<Step>>;

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut types: Vec<String> = self
            .chains
            .iter()
            .map(|((a, e), steps)| {
                let versions: Vec<String> =
                    steps.keys().map(|v| format!("{v}→{}", v + 1)).collect();
                format!("{a}.{e} {}", versions.join(","))
            })
            .collect();
        types.sort();
        f.debug_struct("Upcasters").field("types", &types).finish()
    }
}

impl Upcasters {
    /// No upcasters: every event is read as stored.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the step from schema version `from` to `from + 1` of the
    /// event type `E`.
    ///
    /// # Panics
    ///
    /// When a step from `from` is already registered for the type, or
    /// `from` is 0: both are mistakes in the program, found at its start.
    pub fn add<E: Event>(
        self,
        from: u32,
        step: impl Fn(Value) -> Result<Value, Box<dyn std::error::Error + Send + Sync>>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        self.add_named(E::AGGREGATE_TYPE, E::EVENT_TYPE, from, step)
    }

    /// Registers a step for the event type named `aggregate_type` /
    /// `event_type` (an aggregate's event enum has no Rust type per event
    /// type). See [`add`](Self::add).
    ///
    /// # Panics
    ///
    /// As [`add`](Self::add).
    pub fn add_named(
        mut self,
        aggregate_type: &str,
        event_type: &str,
        from: u32,
        step: impl Fn(Value) -> Result<Value, Box<dyn std::error::Error + Send + Sync>>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        assert!(
            from > 0,
            "an upcaster of {aggregate_type}.{event_type} from schema version 0: versions start at 1"
        );
        let chains = Arc::make_mut(&mut self.chains);
        let chain = chains
            .entry((aggregate_type.to_owned(), event_type.to_owned()))
            .or_default();
        let step: Arc<Step> = Arc::new(move |v| step(v).map_err(|e| e.to_string()));
        assert!(
            chain.insert(from, step).is_none(),
            "two upcasters of {aggregate_type}.{event_type} from schema version {from}"
        );
        self
    }

    /// Declares that no event of `E` is stored below schema version
    /// `version` (the type was introduced at it, or its older events are
    /// gone): [`check`](Self::check) then needs no upcaster below it, and an
    /// event of an older version is [`UpcastError::NoUpcaster`].
    pub fn oldest<E: Event>(self, version: u32) -> Self {
        self.oldest_named(E::AGGREGATE_TYPE, E::EVENT_TYPE, version)
    }

    /// [`oldest`](Self::oldest) for a type named `aggregate_type` /
    /// `event_type`.
    pub fn oldest_named(mut self, aggregate_type: &str, event_type: &str, version: u32) -> Self {
        Arc::make_mut(&mut self.oldest).insert(
            (aggregate_type.to_owned(), event_type.to_owned()),
            version.max(1),
        );
        self
    }

    /// The event types of `aggregate_type` that have upcasters or a declared
    /// oldest version.
    pub fn event_types_of(&self, aggregate_type: &str) -> Vec<&str> {
        let mut types: Vec<&str> = self
            .chains
            .keys()
            .chain(self.oldest.keys())
            .filter(|(a, _)| a == aggregate_type)
            .map(|(_, e)| e.as_str())
            .collect();
        types.sort_unstable();
        types.dedup();
        types
    }

    /// The newest schema version the upcasters bring `aggregate_type` /
    /// `event_type` to, if it has any.
    pub fn newest(&self, aggregate_type: &str, event_type: &str) -> Option<u32> {
        self.chain(aggregate_type, event_type)
            .and_then(|c| c.keys().next_back())
            .map(|v| v + 1)
    }

    /// Whether the type has upcasters.
    pub fn has(&self, aggregate_type: &str, event_type: &str) -> bool {
        self.chain(aggregate_type, event_type).is_some()
    }

    fn chain(&self, aggregate_type: &str, event_type: &str) -> Option<&Chain> {
        self.chains
            .get(&(aggregate_type.to_owned(), event_type.to_owned()))
    }

    /// Checks, at start, that `E`'s upcasters lead without a gap to
    /// `E::SCHEMA_VERSION` and not beyond it.
    pub fn check<E: Event>(&self) -> Result<(), UpcastError> {
        self.check_named(E::AGGREGATE_TYPE, E::EVENT_TYPE, E::SCHEMA_VERSION)
    }

    /// Checks that the upcasters of `aggregate_type` / `event_type` lead
    /// without a gap from its oldest stored version (1, or as declared with
    /// [`oldest_named`](Self::oldest_named)) to `current` (the version the
    /// program writes and reads), and not beyond it. A type at version 1
    /// without upcasters passes; one at version 3 without upcasters fails:
    /// its events of versions 1 and 2 could not be read.
    pub fn check_named(
        &self,
        aggregate_type: &str,
        event_type: &str,
        current: u32,
    ) -> Result<(), UpcastError> {
        let name = || TypeName::new(aggregate_type, event_type);
        let key = (aggregate_type.to_owned(), event_type.to_owned());
        let oldest = self.oldest.get(&key).copied().unwrap_or(1);
        let empty = Chain::new();
        let chain = self.chains.get(&key).unwrap_or(&empty);
        let newest = chain.keys().next_back().map_or(oldest, |v| v + 1);
        if newest > current {
            return Err(UpcastError::BeyondCurrent {
                event: name(),
                newest,
                current,
            });
        }
        if let Some(missing) = (oldest..current).find(|v| !chain.contains_key(v)) {
            return Err(UpcastError::NoUpcaster {
                event: name(),
                from: missing,
                to: current,
            });
        }
        Ok(())
    }

    /// Brings a payload stored at `version` to the newest version the type's
    /// upcasters know (as it is for a type without upcasters); returns that
    /// version and the payload.
    pub fn upcast(
        &self,
        aggregate_type: &str,
        event_type: &str,
        version: u32,
        payload: Value,
    ) -> Result<(u32, Value), UpcastError> {
        self.upcast_to(aggregate_type, event_type, version, payload, None)
    }

    /// Brings a payload stored at `version` to `target` (the newest version
    /// the upcasters know when `None`). A payload newer than the target is
    /// [`UpcastError::TooNew`]; one no step leads from,
    /// [`UpcastError::NoUpcaster`].
    pub fn upcast_to(
        &self,
        aggregate_type: &str,
        event_type: &str,
        version: u32,
        mut payload: Value,
        target: Option<u32>,
    ) -> Result<(u32, Value), UpcastError> {
        let name = || TypeName::new(aggregate_type, event_type);
        let chain = self.chain(aggregate_type, event_type);
        let newest = chain.and_then(|c| c.keys().next_back()).map(|v| v + 1);
        let target = match (target, newest) {
            (Some(t), _) => t,
            (None, Some(n)) => n,
            (None, None) => return Ok((version, payload)),
        };
        if version > target {
            return Err(UpcastError::TooNew {
                event: name(),
                version,
                newest: target,
            });
        }
        let mut at = version;
        while at < target {
            let Some(step) = chain.and_then(|c| c.get(&at)) else {
                return Err(UpcastError::NoUpcaster {
                    event: name(),
                    from: at,
                    to: target,
                });
            };
            // An upcaster is the application's code: a panic is this
            // event's failure, like an error it returns.
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| step(payload)))
                .unwrap_or_else(|_| Err("the upcaster panicked".to_owned()));
            payload = stepped.map_err(|reason| UpcastError::Failed {
                event: name(),
                from: at,
                reason,
            })?;
            at += 1;
        }
        Ok((at, payload))
    }

    /// Decodes a stored payload as `E`: the stored type must be `E`'s, and
    /// the payload is brought to `E::SCHEMA_VERSION`, then deserialized.
    pub fn decode<E: Event + DeserializeOwned>(
        &self,
        aggregate_type: &str,
        event_type: &str,
        version: u32,
        payload: Value,
    ) -> Result<E, UpcastError> {
        if aggregate_type != E::AGGREGATE_TYPE || event_type != E::EVENT_TYPE {
            return Err(UpcastError::WrongType {
                expected: TypeName::new(E::AGGREGATE_TYPE, E::EVENT_TYPE),
                found: TypeName::new(aggregate_type, event_type),
            });
        }
        let (version, payload) = self.upcast_to(
            aggregate_type,
            event_type,
            version,
            payload,
            Some(E::SCHEMA_VERSION),
        )?;
        serde_json::from_value(payload).map_err(|source| UpcastError::Decode {
            event: TypeName::new(aggregate_type, event_type),
            version,
            source,
        })
    }
}

/// An event type's logical name: `aggregate_type.event_type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeName {
    /// The aggregate type.
    pub aggregate_type: String,
    /// The event type.
    pub event_type: String,
}

impl TypeName {
    fn new(aggregate_type: &str, event_type: &str) -> Self {
        TypeName {
            aggregate_type: aggregate_type.to_owned(),
            event_type: event_type.to_owned(),
        }
    }
}

impl fmt::Display for TypeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.aggregate_type, self.event_type)
    }
}

/// Why a stored payload could not be brought to the shape a reader expects.
/// Never retryable: the same event fails the same way until the program
/// changes (on the consumer path it becomes a dead letter at once).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpcastError {
    /// The event was stored at a schema version newer than this program reads.
    #[error(
        "event {event} is stored at schema version {version}, newer than this build reads \
         ({newest}): it was written by a newer version of the application; deploy that version \
         here too (or upcasters up to version {version}) before reading it"
    )]
    TooNew {
        /// The event type.
        event: TypeName,
        /// Its stored version.
        version: u32,
        /// The newest version this reader knows.
        newest: u32,
    },
    /// No upcaster leads from the stored version to the version read.
    #[error(
        "event {event} at schema version {from} cannot be read as version {to}: no upcaster \
         from version {from} is registered (Upcasters::add::<{event}>({from}, …))"
    )]
    NoUpcaster {
        /// The event type.
        event: TypeName,
        /// The version without a step.
        from: u32,
        /// The version read.
        to: u32,
    },
    /// The upcasters reach past the version the program writes and reads.
    #[error(
        "the upcasters of {event} reach schema version {newest}, but the program reads version \
         {current}: raise the event type's schema version to {newest} or remove the upcaster \
         from version {current}"
    )]
    BeyondCurrent {
        /// The event type.
        event: TypeName,
        /// The version the upcasters reach.
        newest: u32,
        /// The version the program reads.
        current: u32,
    },
    /// An upcaster refused the payload.
    #[error("the upcaster of {event} from schema version {from} failed: {reason}")]
    Failed {
        /// The event type.
        event: TypeName,
        /// The step's version.
        from: u32,
        /// The upcaster's error.
        reason: String,
    },
    /// The event is of another type than the one asked for.
    #[error("the event is a {found}, not a {expected}")]
    WrongType {
        /// The type asked for.
        expected: TypeName,
        /// The stored type.
        found: TypeName,
    },
    /// The upcast payload does not deserialize into the type.
    #[error("event {event} at schema version {version} does not decode: {source}")]
    Decode {
        /// The event type.
        event: TypeName,
        /// The version it was brought to.
        version: u32,
        /// The deserializer's error.
        #[source]
        source: serde_json::Error,
    },
}

impl UpcastError {
    /// Always `false`: the same event fails the same way until the program
    /// changes.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chain() -> Upcasters {
        Upcasters::new()
            .add_named("a", "E", 2, |mut v: Value| {
                v["v3"] = json!(true);
                Ok(v)
            })
            .add_named("a", "E", 1, |mut v: Value| {
                v["v2"] = json!(true);
                Ok(v)
            })
    }

    #[test]
    fn steps_apply_in_order_whatever_the_order_they_were_added_in() {
        let (v, p) = chain().upcast("a", "E", 1, json!({})).unwrap();
        assert_eq!(v, 3);
        assert_eq!(p, json!({"v2": true, "v3": true}));
        let (v, p) = chain().upcast("a", "E", 2, json!({})).unwrap();
        assert_eq!((v, p), (3, json!({"v3": true})));
        // Another type passes through.
        let (v, p) = chain().upcast("a", "F", 9, json!(1)).unwrap();
        assert_eq!((v, p), (9, json!(1)));
    }

    #[test]
    fn unknown_and_too_new_versions_are_errors() {
        let err = chain().upcast("a", "E", 4, json!({})).unwrap_err();
        assert!(
            matches!(
                err,
                UpcastError::TooNew {
                    version: 4,
                    newest: 3,
                    ..
                }
            ),
            "{err}"
        );
        let gap = Upcasters::new().add_named("a", "E", 2, |v: Value| Ok(v));
        let err = gap.upcast("a", "E", 1, json!({})).unwrap_err();
        assert!(
            matches!(err, UpcastError::NoUpcaster { from: 1, to: 3, .. }),
            "{err}"
        );
        assert!(gap.check_named("a", "E", 4).is_err());
        // v1 events would be unreadable: refused, unless declared absent.
        assert!(gap.check_named("a", "E", 3).is_err());
        assert!(gap
            .clone()
            .oldest_named("a", "E", 2)
            .check_named("a", "E", 3)
            .is_ok());
        // A type at version 2 with no upcaster at all.
        let none = Upcasters::new();
        assert!(matches!(
            none.check_named("a", "F", 2),
            Err(UpcastError::NoUpcaster { from: 1, to: 2, .. })
        ));
        assert!(none.check_named("a", "F", 1).is_ok());
        assert!(none
            .oldest_named("a", "F", 2)
            .check_named("a", "F", 2)
            .is_ok());
        let panics = Upcasters::new().add_named("a", "G", 1, |_| panic!("bug"));
        let err = panics.upcast("a", "G", 1, json!({})).unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        let err = chain().check_named("a", "E", 2).unwrap_err();
        assert!(
            matches!(
                err,
                UpcastError::BeyondCurrent {
                    newest: 3,
                    current: 2,
                    ..
                }
            ),
            "{err}"
        );
        let failing = Upcasters::new().add_named("a", "E", 1, |_| Err("no amount".into()));
        let err = failing.upcast("a", "E", 1, json!({})).unwrap_err();
        assert!(err.to_string().contains("no amount"), "{err}");
    }

    #[test]
    #[should_panic(expected = "two upcasters of a.E from schema version 1")]
    fn a_step_registered_twice_is_refused() {
        let _ = chain().add_named("a", "E", 1, |v: Value| Ok(v));
    }
}
