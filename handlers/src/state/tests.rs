//! Unit tests: quoting, declared transitions, type names.

use super::*;

fn orders() -> StateMachine {
    StateMachine::new("app.orders", "id", "state")
        .key_type("bigint")
        .transition("SHIPPED", "INVOICING")
        .transition("SHIPPED", "CANCELLED")
        .transition("INVOICING", "INVOICED")
        .intermediate("INVOICING", Duration::from_secs(30))
}

#[test]
fn identifiers_are_quoted() {
    let m = StateMachine::new("app.orders", "id", "we\"ird").claim_columns("by", "at");
    assert_eq!(m.table, "\"app\".\"orders\"");
    assert_eq!(m.key, "\"id\"");
    assert_eq!(m.state, "\"we\"\"ird\"");
    assert_eq!(m.claimed_by, "\"by\"");
    assert_eq!(m.claimed_at, "\"at\"");
}

#[test]
fn invalid_transition_names_allowed_targets() {
    let m = orders();
    let e = m.check_transition("SHIPPED", "INVOICED").unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid state transition SHIPPED -> INVOICED: allowed from SHIPPED: CANCELLED, INVOICING"
    );
    assert!(!e.is_retryable());
    let e = m.check_transition("INVOICED", "SHIPPED").unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid state transition INVOICED -> SHIPPED: no transition is declared from INVOICED"
    );
    assert!(m.check_transition("SHIPPED", "INVOICING").is_ok());
    assert_eq!(m.allowed_from("SHIPPED"), ["CANCELLED", "INVOICING"]);
    assert_eq!(m.lease("INVOICING"), Some(Duration::from_secs(30)));
    assert_eq!(m.lease("SHIPPED"), None);
    assert!(m.is_known("INVOICED") && !m.is_known("PAID"));
    let e: ReconcileError = StateError::NotIntermediate {
        state: "SHIPPED".into(),
    }
    .into();
    assert!(!e.is_retryable());
    let e: ReconcileError = StateError::Database(sqlx::Error::PoolTimedOut).into();
    assert!(e.is_retryable());
}

#[test]
fn type_names_are_checked() {
    assert_eq!(checked_type("bigint", "t"), "bigint");
    assert_eq!(checked_type("character varying", "t"), "character varying");
    assert_eq!(checked_type("app.order_id", "t"), "app.order_id");
    for bad in [
        "",
        " bigint",
        "bigint ",
        "int)",
        "text; drop",
        "int'",
        "int--",
        "1int",
    ] {
        let result = std::panic::catch_unwind(|| checked_type(bad, "t"));
        assert!(result.is_err(), "{bad:?} was accepted");
    }
}

#[test]
#[should_panic(expected = "more than two dot-separated parts")]
fn three_part_table_is_rejected() {
    let _ = StateMachine::new("db.app.orders", "id", "state");
}

#[test]
#[should_panic(expected = "is not a transition")]
fn self_transition_is_rejected() {
    let _ = orders().transition("SHIPPED", "SHIPPED");
}

#[test]
#[should_panic(expected = "longer than zero")]
fn zero_lease_is_rejected() {
    let _ = orders().intermediate("INVOICING", Duration::ZERO);
}
