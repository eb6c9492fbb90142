//! Checking a sweep's SQL at start: it prepares, and its columns and
//! parameters have the types the sweeper reads and binds. A candidate query
//! returning an integer key otherwise starts fine and fails every run.
//!
//! The statements are described on a connection of their own, closed
//! afterwards: `describe` prepares without parameter types, and a statement
//! prepared so must not sit in a pooled connection's statement cache where
//! the sweep's own runs (which bind `text` and `bigint`) would reuse it.

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnection, PgTypeInfo};
use sqlx::{Column, Connection, Executor, PgPool, Postgres, Type, TypeInfo};

use crate::candidates::CheckError;

fn unusable(message: String) -> CheckError {
    CheckError::Unusable(message)
}

/// What `describe` said, or why it could not.
async fn describe(
    conn: &mut PgConnection,
    sql: &str,
    what: &str,
) -> Result<sqlx::Describe<Postgres>, CheckError> {
    conn.describe(sql).await.map_err(|e| {
        if converge_outbox::is_retryable_sqlx(&e) {
            CheckError::Database(e)
        } else {
            unusable(format!(
                "the {what} query does not prepare: {e}; query: {sql}"
            ))
        }
    })
}

/// A fresh connection for describing, out of the pool for good.
async fn connection(pool: &PgPool) -> Result<PgConnection, CheckError> {
    Ok(pool.acquire().await.map_err(CheckError::Database)?.detach())
}

fn name(t: &PgTypeInfo) -> String {
    t.name().to_ascii_lowercase()
}

/// Checks a candidate query and, if there is one, a backlog query, on one
/// connection of their own.
pub(crate) async fn check(
    pool: &PgPool,
    candidates: &str,
    backlog: Option<&str>,
) -> Result<(), CheckError> {
    let mut conn = connection(pool).await?;
    let mut checked = check_candidates(&mut conn, candidates).await;
    if let (Ok(()), Some(backlog)) = (&checked, backlog) {
        checked = check_backlog(&mut conn, backlog).await;
    }
    let _ = conn.close().await;
    checked
}

/// Checks a candidate query: `$1` text-like, `$2` an integer, and a first
/// column the sweeper can read as a `String` key.
async fn check_candidates(conn: &mut PgConnection, sql: &str) -> Result<(), CheckError> {
    let described = describe(conn, sql, "candidate").await?;
    if let Some(sqlx::Either::Left(params)) = described.parameters() {
        let key_ok = |t: &PgTypeInfo| <String as Type<Postgres>>::compatible(t);
        let limit_ok =
            |t: &PgTypeInfo| ["int8", "int4", "int2", "numeric"].contains(&name(t).as_str());
        if params.len() != 2 || !key_ok(&params[0]) || !limit_ok(&params[1]) {
            return Err(unusable(format!(
                "the candidate query takes parameters ({}), not ($1 text, $2 bigint): compare \
                 keys as `$1::text IS NULL OR id > $1::bigint` and end with `LIMIT $2`; query: {sql}",
                params.iter().map(name).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    let Some(first) = described.columns().first() else {
        return Err(unusable(format!(
            "the candidate query returns no column: select the key as text, e.g. \
             `SELECT id::text AS key …`; query: {sql}"
        )));
    };
    if !<String as Type<Postgres>>::compatible(first.type_info()) {
        return Err(unusable(format!(
            "the candidate query's first column {:?} is {}, not text: cast it, e.g. \
             `SELECT {}::text AS key …` (and keep ORDER BY on the typed column); query: {sql}",
            first.name(),
            name(first.type_info()),
            first.name()
        )));
    }
    Ok(())
}

/// Checks a backlog query: no parameters, `(bigint, timestamptz)`.
async fn check_backlog(conn: &mut PgConnection, sql: &str) -> Result<(), CheckError> {
    let described = describe(conn, sql, "backlog").await?;
    if let Some(sqlx::Either::Left(params)) = described.parameters() {
        if !params.is_empty() {
            return Err(unusable(format!(
                "the backlog query takes {} parameter(s); it takes none; query: {sql}",
                params.len()
            )));
        }
    }
    let columns = described.columns();
    let ok = columns.len() == 2
        && <i64 as Type<Postgres>>::compatible(columns[0].type_info())
        && <DateTime<Utc> as Type<Postgres>>::compatible(columns[1].type_info());
    if !ok {
        return Err(unusable(format!(
            "the backlog query returns ({}), not (bigint, timestamptz): e.g. \
             `SELECT count(*), min(waiting_since) FROM …` with a timestamptz column \
             (cast a timestamp: `min(t) AT TIME ZONE 'UTC'`); query: {sql}",
            columns
                .iter()
                .map(|c| name(c.type_info()))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(())
}
