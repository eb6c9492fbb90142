//! Identifiers and type names, checked and quoted before they reach SQL.

use super::*;

/// Quotes one SQL identifier: double quotes around it, embedded quotes doubled.
pub(super) fn quote_ident(name: &str, what: &str) -> String {
    assert!(!name.is_empty(), "state machine: the {what} name is empty");
    assert!(
        name.len() <= MAX_IDENTIFIER_BYTES,
        "state machine: the {what} name {name:?} is longer than {MAX_IDENTIFIER_BYTES} bytes \
         (PostgreSQL would truncate it)"
    );
    assert!(
        !name.contains('\0'),
        "state machine: the {what} name {name:?} contains a NUL character"
    );
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a table name, `table` or `schema.table`.
pub(super) fn quote_table(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    assert!(
        parts.len() <= 2,
        "state machine: the table {name:?} has more than two dot-separated parts \
         (expected `table` or `schema.table`)"
    );
    parts
        .iter()
        .map(|part| quote_ident(part, "table"))
        .collect::<Vec<_>>()
        .join(".")
}

/// A type name safe to splice into `CAST($n AS <type>)`.
pub(super) fn checked_type(sql_type: &str, what: &str) -> String {
    let ok = sql_type.len() <= 2 * MAX_IDENTIFIER_BYTES + 1
        && sql_type
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && !sql_type.ends_with(' ')
        && sql_type
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ' ' | '.'));
    assert!(
        ok,
        "state machine: the {what} {sql_type:?} is not a plain SQL type name \
         (ASCII letters, digits, `_`, spaces and `.`, e.g. `bigint`, `uuid`)"
    );
    sql_type.to_owned()
}
