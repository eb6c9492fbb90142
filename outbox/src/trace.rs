//! W3C trace context (`traceparent`) carried from an append to the reconciles
//! it causes.
//!
//! [`Outbox::append`](crate::Outbox::append) stamps every event with a
//! [`TraceParent`] (stored in `converge.outbox.traceparent`); the relay sends it
//! as the W3C [`traceparent`](HEADER_TRACEPARENT) NATS header; the handlers'
//! consumer reads it back and runs the reconcile inside
//! [`TraceParent::scope`], so the events that reconcile appends continue the
//! same trace. Logs correlate through the `trace_id` field of the `reconcile`
//! span; with the `opentelemetry` cargo feature, the spans themselves join the
//! trace in an OpenTelemetry backend.
//!
//! ```
//! use converge_outbox::trace::TraceParent;
//!
//! let tp: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?;
//! assert_eq!(tp.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
//! let child = tp.child();
//! assert_eq!(child.trace_id(), tp.trace_id());
//! assert_ne!(child.span_id(), tp.span_id());
//! # Ok::<(), converge_outbox::trace::TraceParentError>(())
//! ```

use std::fmt;
use std::future::Future;
use std::str::FromStr;

use rand::Rng;

/// The W3C header (and NATS header) name: `traceparent`.
pub const HEADER_TRACEPARENT: &str = "traceparent";

/// Length of a version-00 `traceparent` value.
const VERSION_00_LEN: usize = 55;

/// What a valid `traceparent` looks like, for error messages.
const EXPECTED: &str = "expected 00-<32 lowercase hex trace id>-<16 lowercase hex span id>-<2 lowercase hex flags>, ids not all zero";

tokio::task_local! {
    static CURRENT: TraceParent;
}

/// A W3C trace context: trace id, parent (span) id and trace flags.
///
/// The text form is the `traceparent` header value
/// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>` ([`Display`](fmt::Display)
/// formats it, [`parse`](TraceParent::parse) and [`FromStr`] read and check it).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    // Bytes (big-endian), not u128/u64: 25 bytes aligned to 1 keep the
    // structs that carry one (the handlers' EventHint) small.
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
}

/// Why a `traceparent` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TraceParentError {
    /// The value is not a valid W3C `traceparent`.
    #[error("invalid traceparent {value:?}: {reason}; {EXPECTED}")]
    Invalid {
        /// The value given (cut to 80 characters).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl TraceParent {
    /// The sampled flag (`01`).
    pub const FLAG_SAMPLED: u8 = 0x01;

    /// A trace context from its parts; `None` if the trace id or the span id is
    /// zero (W3C: invalid).
    pub fn from_parts(trace_id: u128, span_id: u64, flags: u8) -> Option<TraceParent> {
        (trace_id != 0 && span_id != 0).then_some(TraceParent {
            trace_id: trace_id.to_be_bytes(),
            span_id: span_id.to_be_bytes(),
            flags,
        })
    }

    /// Reads and checks a `traceparent` header value.
    ///
    /// Version `00` must be exactly 55 characters; a later version may carry
    /// more fields after a `-`, which are ignored (as W3C asks). Hex digits
    /// must be lowercase, the version must not be `ff`, and neither id may be
    /// all zeros.
    pub fn parse(value: &str) -> Result<TraceParent, TraceParentError> {
        let invalid = |reason: &'static str| TraceParentError::Invalid {
            value: value.chars().take(80).collect(),
            reason,
        };
        let b = value.as_bytes();
        if b.len() < VERSION_00_LEN {
            return Err(invalid("too short"));
        }
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return Err(invalid("fields must be separated by '-'"));
        }
        let version = hex(&b[0..2]).ok_or(invalid("the version is not 2 lowercase hex digits"))?;
        if version == 0xff {
            return Err(invalid("version ff is forbidden"));
        }
        if version == 0 && b.len() != VERSION_00_LEN {
            return Err(invalid("a version-00 value is exactly 55 characters"));
        }
        if b.len() > VERSION_00_LEN && b[VERSION_00_LEN] != b'-' {
            return Err(invalid("fields must be separated by '-'"));
        }
        let trace_id =
            hex(&b[3..35]).ok_or(invalid("the trace id is not 32 lowercase hex digits"))?;
        let span_id =
            hex(&b[36..52]).ok_or(invalid("the span id is not 16 lowercase hex digits"))?;
        let flags = hex(&b[53..55]).ok_or(invalid("the flags are not 2 lowercase hex digits"))?;
        if trace_id == 0 {
            return Err(invalid("the trace id is all zeros"));
        }
        if span_id == 0 {
            return Err(invalid("the span id is all zeros"));
        }
        Ok(TraceParent {
            trace_id: trace_id.to_be_bytes(),
            span_id: (span_id as u64).to_be_bytes(),
            flags: flags as u8,
        })
    }

    /// A new trace: random trace and span ids, flagged sampled (so that a
    /// parent-based sampler downstream keeps it).
    pub fn new_root() -> TraceParent {
        let mut rng = rand::rng();
        TraceParent {
            trace_id: rng.random_range(1..=u128::MAX).to_be_bytes(),
            span_id: rng.random_range(1..=u64::MAX).to_be_bytes(),
            flags: Self::FLAG_SAMPLED,
        }
    }

    /// The same trace and flags with a new random span id: the context of a
    /// step caused by this one.
    pub fn child(&self) -> TraceParent {
        TraceParent {
            span_id: rand::rng().random_range(1..=u64::MAX).to_be_bytes(),
            ..*self
        }
    }

    /// The trace id as 32 lowercase hex digits (what log search and tracing
    /// backends show).
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id_u128())
    }

    /// The span (parent) id as 16 lowercase hex digits.
    pub fn span_id(&self) -> String {
        format!("{:016x}", self.span_id_u64())
    }

    /// The trace id as a number.
    pub fn trace_id_u128(&self) -> u128 {
        u128::from_be_bytes(self.trace_id)
    }

    /// The span id as a number.
    pub fn span_id_u64(&self) -> u64 {
        u64::from_be_bytes(self.span_id)
    }

    /// The trace flags (bit 0: sampled).
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Whether the sampled flag is set.
    pub fn is_sampled(&self) -> bool {
        self.flags & Self::FLAG_SAMPLED != 0
    }

    /// Runs `future` with `traceparent` as the task's trace context: inside it,
    /// [`TraceParent::current`] continues this trace. The handlers' consumer
    /// runs every event-driven reconcile this way.
    pub fn scope<F: Future>(
        traceparent: TraceParent,
        future: F,
    ) -> impl Future<Output = F::Output> {
        CURRENT.scope(traceparent, future)
    }

    /// The context set by an enclosing [`TraceParent::scope`], if any.
    pub fn scoped() -> Option<TraceParent> {
        CURRENT.try_with(|tp| *tp).ok()
    }

    /// The context to stamp on an event appended now:
    ///
    /// 1. with the `opentelemetry` feature, the current tracing span's
    ///    OpenTelemetry context when it is valid and belongs to the same trace
    ///    as the enclosing [`scope`](TraceParent::scope) (or there is none) —
    ///    the real span, so the backend shows who appended;
    /// 2. a child of the enclosing [`scope`](TraceParent::scope)'s context;
    /// 3. otherwise a new trace ([`new_root`](TraceParent::new_root)).
    ///
    /// No I/O: a task-local read and a few random bytes.
    pub fn current() -> TraceParent {
        let scoped = Self::scoped();
        #[cfg(feature = "opentelemetry")]
        if let Some(span) = Self::from_span(&tracing::Span::current()) {
            if scoped.is_none_or(|s| s.trace_id == span.trace_id) {
                return span;
            }
        }
        match scoped {
            Some(scoped) => scoped.child(),
            None => Self::new_root(),
        }
    }
}

/// Parses lowercase hex (at most 32 digits).
fn hex(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |acc, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some(acc << 4 | u128::from(v))
    })
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id_u128(),
            self.span_id_u64(),
            self.flags
        )
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

impl FromStr for TraceParent {
    type Err = TraceParentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TraceParent::parse(s)
    }
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::TraceParent;

    impl TraceParent {
        /// This context as a remote OpenTelemetry span context (a parent
        /// received from elsewhere).
        pub fn to_span_context(&self) -> SpanContext {
            SpanContext::new(
                TraceId::from_bytes(self.trace_id),
                SpanId::from_bytes(self.span_id),
                TraceFlags::new(self.flags),
                true,
                TraceState::default(),
            )
        }

        /// An OpenTelemetry span context's ids and flags; `None` if it is invalid.
        pub fn from_span_context(context: &SpanContext) -> Option<TraceParent> {
            if !context.is_valid() {
                return None;
            }
            TraceParent::from_parts(
                u128::from_be_bytes(context.trace_id().to_bytes()),
                u64::from_be_bytes(context.span_id().to_bytes()),
                context.trace_flags().to_u8(),
            )
        }

        /// The OpenTelemetry context of a tracing span; `None` without an
        /// OpenTelemetry layer (or for a disabled span).
        pub fn from_span(span: &tracing::Span) -> Option<TraceParent> {
            if span.is_disabled() {
                return None;
            }
            let context = span.context();
            Self::from_span_context(context.span().span_context())
        }

        /// Makes this context the OpenTelemetry parent of `span` (call it before
        /// the span is first entered). Without an OpenTelemetry layer this does
        /// nothing.
        pub fn set_parent_of(&self, span: &tracing::Span) {
            let parent =
                opentelemetry::Context::new().with_remote_span_context(self.to_span_context());
            if let Err(error) = span.set_parent(parent) {
                tracing::debug!(%error, "cannot set the OpenTelemetry parent of a span");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_the_w3c_example() {
        let tp = TraceParent::parse(EXAMPLE).unwrap();
        assert_eq!(tp.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.span_id(), "00f067aa0ba902b7");
        assert_eq!(tp.flags(), 1);
        assert!(tp.is_sampled());
        assert_eq!(tp.to_string(), EXAMPLE);
        assert_eq!(EXAMPLE.parse::<TraceParent>().unwrap(), tp);
    }

    #[test]
    fn refuses_invalid_values_saying_why() {
        let cases = [
            ("", "too short"),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                "too short",
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "separated",
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "ff",
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "trace id",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                "trace id",
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "all zeros",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "all zeros",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
                "flags",
            ),
            (
                "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "version",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                "55",
            ),
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
                "separated",
            ),
        ];
        for (value, why) in cases {
            let err = TraceParent::parse(value).unwrap_err().to_string();
            assert!(err.contains(why), "{value:?}: {err}");
            assert!(err.contains("expected 00-"), "{err}");
        }
    }

    #[test]
    fn a_later_version_with_more_fields_is_read_as_far_as_known() {
        let tp =
            TraceParent::parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever")
                .unwrap();
        assert_eq!(tp.to_string(), EXAMPLE);
    }

    #[test]
    fn roots_are_new_traces_and_children_keep_the_trace() {
        let a = TraceParent::new_root();
        let b = TraceParent::new_root();
        assert_ne!(a.trace_id(), b.trace_id());
        assert!(a.is_sampled());
        let c = a.child();
        assert_eq!(c.trace_id(), a.trace_id());
        assert_ne!(c.span_id(), a.span_id());
        assert_eq!(c.flags(), a.flags());
        assert_eq!(TraceParent::parse(&c.to_string()).unwrap(), c);
        assert!(TraceParent::from_parts(0, 1, 0).is_none());
        assert!(TraceParent::from_parts(1, 0, 0).is_none());
    }

    #[tokio::test]
    async fn current_continues_the_scoped_trace_and_starts_one_outside() {
        assert!(TraceParent::scoped().is_none());
        let outside = TraceParent::current();
        let tp = TraceParent::new_root();
        assert_ne!(outside.trace_id(), tp.trace_id());
        let (scoped, current) = TraceParent::scope(tp, async {
            (TraceParent::scoped(), TraceParent::current())
        })
        .await;
        assert_eq!(scoped, Some(tp));
        assert_eq!(current.trace_id(), tp.trace_id());
        assert_ne!(current.span_id(), tp.span_id());
    }

    #[cfg(feature = "opentelemetry")]
    #[test]
    fn converts_to_and_from_opentelemetry() {
        let tp = TraceParent::parse(EXAMPLE).unwrap();
        let sc = tp.to_span_context();
        assert!(sc.is_valid() && sc.is_remote());
        assert_eq!(sc.trace_id().to_string(), tp.trace_id());
        assert_eq!(TraceParent::from_span_context(&sc), Some(tp));
        // No OpenTelemetry layer: the span has no valid context.
        assert_eq!(TraceParent::from_span(&tracing::info_span!("x")), None);
    }
}
