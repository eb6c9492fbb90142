//! Checking a sweep's SQL at start: it prepares, and its columns and
//! parameters have the types the sweeper reads and binds. A candidate query
//! returning an integer key otherwise starts fine and fails every run.

use sqlx::{Column, Executor, PgPool, TypeInfo};

/// Column types the sweeper can read as a `String` key.
const TEXT_TYPES: [&str; 4] = ["TEXT", "VARCHAR", "BPCHAR", "NAME"];

fn type_names(types: &[sqlx::postgres::PgTypeInfo]) -> Vec<String> {
    types
        .iter()
        .map(|t| t.name().to_ascii_lowercase())
        .collect()
}

/// Checks a candidate query: `$1` text, `$2` bigint, one text column first.
pub(crate) async fn candidates(pool: &PgPool, sql: &str) -> Result<(), String> {
    let described = pool
        .describe(sql)
        .await
        .map_err(|e| format!("the candidate query does not prepare: {e}; query: {sql}"))?;
    if let Some(sqlx::Either::Left(params)) = described.parameters() {
        let names = type_names(params);
        let key_ok = |t: &str| ["text", "varchar", "bpchar", "name"].contains(&t);
        let limit_ok = |t: &str| ["int8", "int4", "int2", "numeric"].contains(&t);
        if names.len() != 2 || !key_ok(&names[0]) || !limit_ok(&names[1]) {
            return Err(format!(
                "the candidate query takes parameters ({}), not ($1 text, $2 bigint): compare \
                 keys as `$1::text IS NULL OR id > $1::bigint` and end with `LIMIT $2`; query: {sql}",
                names.join(", ")
            ));
        }
    }
    let Some(first) = described.columns().first() else {
        return Err(format!(
            "the candidate query returns no column: select the key as text, e.g. \
             `SELECT id::text AS key …`; query: {sql}"
        ));
    };
    let ty = first.type_info().name();
    if !TEXT_TYPES.contains(&ty) {
        return Err(format!(
            "the candidate query's first column {:?} is {}, not text: cast it, e.g. \
             `SELECT {}::text AS key …` (and keep ORDER BY on the typed column); query: {sql}",
            first.name(),
            ty.to_ascii_lowercase(),
            first.name()
        ));
    }
    Ok(())
}

/// Checks a backlog query: no parameters, `(bigint, timestamptz)`.
pub(crate) async fn backlog(pool: &PgPool, sql: &str) -> Result<(), String> {
    let described = pool
        .describe(sql)
        .await
        .map_err(|e| format!("the backlog query does not prepare: {e}; query: {sql}"))?;
    if let Some(sqlx::Either::Left(params)) = described.parameters() {
        if !params.is_empty() {
            return Err(format!(
                "the backlog query takes {} parameter(s); it takes none; query: {sql}",
                params.len()
            ));
        }
    }
    let columns: Vec<String> = described
        .columns()
        .iter()
        .map(|c| c.type_info().name().to_ascii_lowercase())
        .collect();
    if columns.len() != 2 || columns[0] != "int8" || columns[1] != "timestamptz" {
        return Err(format!(
            "the backlog query returns ({}), not (bigint, timestamptz): e.g. \
             `SELECT count(*), min(waiting_since) FROM …` with a timestamptz column \
             (cast a timestamp: `min(t) AT TIME ZONE 'UTC'`); query: {sql}",
            columns.join(", ")
        ));
    }
    Ok(())
}
