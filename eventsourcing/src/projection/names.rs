//! A projection's table names: the declared (live) ones and a rebuild's
//! copies beside them.

/// What a rebuild's copy of `schema.table` is called: `schema.table__rebuild`.
pub(crate) const REBUILD_SUFFIX: &str = "__rebuild";

/// The table names a projection writes to in one transaction.
#[derive(Debug, Clone)]
pub(crate) struct Tables {
    /// (declared, written to)
    names: Vec<(String, String)>,
    rebuilding: bool,
}

/// `schema.table` as `("schema", "table")`.
pub(crate) fn parts(name: &str) -> (&str, &str) {
    name.split_once('.').unwrap_or(("public", name))
}

/// A declared `schema.table` quoted for SQL: `"schema"."table"` (declared
/// names are lower-case ASCII letters, digits and `_`; quoting keeps
/// keywords such as `order` usable).
pub(crate) fn quoted(name: &str) -> String {
    let (schema, table) = parts(name);
    format!("\"{schema}\".\"{table}\"")
}

/// The rebuild copy of a declared `schema.table`, quoted.
pub(crate) fn quoted_copy(name: &str) -> String {
    let (schema, table) = parts(name);
    format!("\"{schema}\".\"{table}{REBUILD_SUFFIX}\"")
}

impl Tables {
    /// The live tables.
    pub(crate) fn live(declared: &[&str]) -> Self {
        Tables {
            names: declared
                .iter()
                .map(|t| ((*t).to_owned(), quoted(t)))
                .collect(),
            rebuilding: false,
        }
    }

    /// A rebuild's copies.
    pub(crate) fn copies(declared: &[&str]) -> Self {
        Tables {
            names: declared
                .iter()
                .map(|t| ((*t).to_owned(), quoted_copy(t)))
                .collect(),
            rebuilding: true,
        }
    }

    pub(crate) fn target(&self, declared: &str) -> Option<&str> {
        self.names
            .iter()
            .find(|(d, _)| d == declared)
            .map(|(_, t)| t.as_str())
    }

    pub(crate) fn declared(&self) -> Vec<&str> {
        self.names.iter().map(|(d, _)| d.as_str()).collect()
    }

    pub(crate) fn rebuilding(&self) -> bool {
        self.rebuilding
    }
}

/// Checks a declared table name: `schema.table` of lower-case ASCII letters,
/// digits and `_` (no quoting needed), short enough for its copy's name.
pub(crate) fn check_table_name(projection: &str, name: &str) -> Result<(), String> {
    let ident = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !s.as_bytes()[0].is_ascii_digit()
    };
    let Some((schema, table)) = name.split_once('.') else {
        return Err(format!(
            "projection {projection}: table {name:?} must be schema-qualified (e.g. \
             \"app.balances\"), so a rebuild's copy lands beside it"
        ));
    };
    if !ident(schema) || !ident(table) {
        return Err(format!(
            "projection {projection}: table {name:?} must be `schema.table` in lower-case ASCII \
             letters, digits and _"
        ));
    }
    // PostgreSQL's identifiers are at most 63 bytes: the copy's must fit.
    if table.len() + REBUILD_SUFFIX.len() > 63 {
        return Err(format!(
            "projection {projection}: table name {table:?} is too long for its rebuild copy \
             ({table}{REBUILD_SUFFIX} must fit in 63 bytes)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_copies_and_bad_names_are_refused() {
        let copies = Tables::copies(&["bank.balances"]);
        assert_eq!(
            copies.target("bank.balances"),
            Some("\"bank\".\"balances__rebuild\"")
        );
        assert_eq!(copies.target("bank.other"), None);
        assert_eq!(
            Tables::live(&["order.balances"]).target("order.balances"),
            Some("\"order\".\"balances\"")
        );
        assert!(check_table_name("p", "bank.balances").is_ok());
        for bad in ["balances", "Bank.x", "bank.\"x\"", "a.b.c", "bank.1x"] {
            assert!(check_table_name("p", bad).is_err(), "{bad}");
        }
        assert!(check_table_name("p", &format!("s.{}", "x".repeat(60))).is_err());
    }
}
