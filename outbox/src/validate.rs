//! Input checks done at append time, so that no row the relay cannot publish is
//! ever committed through the API.

use std::collections::BTreeMap;

use crate::error::OutboxError;

/// Longest aggregate type or event type accepted (it is a subject token).
pub(crate) const MAX_TOKEN_LEN: usize = 128;
/// Longest aggregate id accepted (it is a header value).
pub(crate) const MAX_AGGREGATE_ID_LEN: usize = 512;
/// Header names converge writes itself; applications may not set them.
pub(crate) const RESERVED_HEADER_PREFIXES: [&str; 2] = ["converge-", "nats-"];

/// Whether `token` can stand as one token of a NATS subject.
pub(crate) fn is_subject_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `value` can be a NATS header value (no CR, LF or NUL).
pub(crate) fn is_header_value(value: &str) -> bool {
    !value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0)
}

/// Whether `name` can be a NATS header name (printable ASCII, no ':').
pub(crate) fn is_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// Whether `name` starts with a prefix converge or the server act on
/// (`Converge-`, `Nats-`, in any case).
pub(crate) fn is_reserved_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    RESERVED_HEADER_PREFIXES
        .iter()
        .any(|p| lower.starts_with(p))
}

fn invalid(field: &'static str, reason: String) -> OutboxError {
    OutboxError::InvalidEvent { field, reason }
}

/// Checks the parts of an event that become subject tokens and headers.
pub(crate) fn check_event(
    aggregate_type: &str,
    aggregate_id: &str,
    event_type: &str,
    headers: &BTreeMap<String, String>,
) -> Result<(), OutboxError> {
    if !is_subject_token(aggregate_type) {
        return Err(invalid(
            "aggregate_type",
            format!(
                "{aggregate_type:?} is not a valid subject token: use 1 to {MAX_TOKEN_LEN} ASCII \
                 letters, digits, '_' or '-' (no dots, spaces or wildcards)"
            ),
        ));
    }
    if !is_subject_token(event_type) {
        return Err(invalid(
            "event_type",
            format!(
                "{event_type:?} is not a valid subject token: use 1 to {MAX_TOKEN_LEN} ASCII \
                 letters, digits, '_' or '-' (no dots, spaces or wildcards)"
            ),
        ));
    }
    if aggregate_id.is_empty() {
        return Err(invalid(
            "aggregate_id",
            "is empty: every event must name the aggregate it belongs to".into(),
        ));
    }
    if aggregate_id.len() > MAX_AGGREGATE_ID_LEN || !is_header_value(aggregate_id) {
        return Err(invalid(
            "aggregate_id",
            format!(
                "must be at most {MAX_AGGREGATE_ID_LEN} bytes without CR, LF or NUL \
                 (got {} bytes)",
                aggregate_id.len()
            ),
        ));
    }
    for (name, value) in headers {
        if !is_header_name(name) {
            return Err(invalid(
                "headers",
                format!("header name {name:?} must be printable ASCII without ':' or spaces"),
            ));
        }
        if is_reserved_header(name) {
            return Err(invalid(
                "headers",
                format!("header {name:?} uses a reserved prefix (Converge-, Nats-): rename it"),
            ));
        }
        if !is_header_value(value) {
            return Err(invalid(
                "headers",
                format!("the value of header {name:?} contains CR, LF or NUL"),
            ));
        }
    }
    Ok(())
}

/// Checks that an event time can be stored and sent: RFC 3339 (the
/// `Converge-Occurred-At` header) writes the years 1 to 9999.
pub(crate) fn check_time(at: chrono::DateTime<chrono::Utc>) -> Result<(), OutboxError> {
    use chrono::Datelike;
    if (1..=9999).contains(&at.year()) {
        Ok(())
    } else {
        Err(invalid(
            "occurred_at",
            format!("{at} is not a time between the years 1 and 9999"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_tokens() {
        assert!(is_subject_token("order"));
        assert!(is_subject_token("Order_Shipped-v2"));
        assert!(!is_subject_token(""));
        assert!(!is_subject_token("a.b"));
        assert!(!is_subject_token("a b"));
        assert!(!is_subject_token("*"));
        assert!(!is_subject_token(">"));
        assert!(!is_subject_token(&"x".repeat(MAX_TOKEN_LEN + 1)));
    }

    #[test]
    fn rejects_bad_events_naming_the_field() {
        let none = BTreeMap::new();
        let err = check_event("order", "", "Shipped", &none).unwrap_err();
        assert!(matches!(
            err,
            OutboxError::InvalidEvent {
                field: "aggregate_id",
                ..
            }
        ));
        let err = check_event("or.der", "1", "Shipped", &none).unwrap_err();
        assert!(matches!(
            err,
            OutboxError::InvalidEvent {
                field: "aggregate_type",
                ..
            }
        ));
        let err = check_event("order", "1", "Ship ped", &none).unwrap_err();
        assert!(matches!(
            err,
            OutboxError::InvalidEvent {
                field: "event_type",
                ..
            }
        ));
        let err = check_event("order", "1\n2", "Shipped", &none).unwrap_err();
        assert!(matches!(
            err,
            OutboxError::InvalidEvent {
                field: "aggregate_id",
                ..
            }
        ));
        let mut h = BTreeMap::new();
        h.insert("Nats-Msg-Id".to_string(), "x".to_string());
        let err = check_event("order", "1", "Shipped", &h).unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
        assert!(check_event("order", "1", "Shipped", &none).is_ok());
    }
}
