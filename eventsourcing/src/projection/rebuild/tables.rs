//! A rebuild's tables: whether they can be rebuilt here, their copies, and
//! making a live table equal to its copy.

use sqlx::PgConnection;

use super::super::names::REBUILD_SUFFIX;
use super::super::runner::Task;

/// Why the projection cannot be rebuilt here, if it cannot.
pub(super) async fn refusal(task: &Task) -> Result<Option<String>, sqlx::Error> {
    let name = task.projection.name();
    let tables = task.projection.tables();
    if tables.is_empty() {
        return Ok(Some(format!(
            "projection {name} declares no TABLES, so it cannot be rebuilt: declare the tables \
             it writes (Projection::TABLES)"
        )));
    }
    for table in tables {
        let (schema, _) = table.split_once('.').unwrap_or(("", table));
        let found: Option<(bool, bool, String)> = sqlx::query_as(
            "SELECT has_table_privilege(c.oid, 'SELECT') \
                        AND has_table_privilege(c.oid, 'INSERT') \
                        AND has_table_privilege(c.oid, 'DELETE'), \
                    has_schema_privilege(c.relnamespace, 'CREATE'), current_user::text \
             FROM pg_class c WHERE c.oid = to_regclass($1)",
        )
        .bind(table)
        .fetch_optional(&task.pool)
        .await?;
        match found {
            None => {
                return Ok(Some(format!(
                    "table {table} of projection {name} does not exist"
                )))
            }
            Some((false, _, user)) => {
                return Ok(Some(format!(
                    "the role {user} may not SELECT, INSERT and DELETE on {table}: a rebuild \
                     writes the rows that differ into it; GRANT SELECT, INSERT, DELETE ON \
                     {table} TO {user}"
                )))
            }
            Some((true, false, user)) => {
                return Ok(Some(format!(
                    "the role {user} may not create tables in schema {schema}, where the \
                     rebuild of {name} puts its copies: GRANT CREATE ON SCHEMA {schema} TO {user}"
                )))
            }
            Some(_) => {}
        }
    }
    let deleted: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(deleted), 0)::bigint FROM converge.outbox_retention",
    )
    .fetch_one(&task.pool)
    .await?;
    if deleted > 0 {
        let types = task.projection.aggregate_types();
        if types.is_empty() {
            return Ok(Some(format!(
                "retention has deleted {deleted} events and projection {name} reads every \
                 aggregate type: rebuilt from what is left, it would lose them. Declare the \
                 aggregate types it reads (Projection::AGGREGATE_TYPES) and keep their history \
                 (event-source them)"
            )));
        }
        let unkept: Vec<String> = sqlx::query_scalar(
            "SELECT t FROM unnest($1::text[]) AS t \
             WHERE NOT EXISTS (SELECT 1 FROM converge.retention_policies k WHERE k.aggregate_type = t)",
        )
        .bind(types)
        .fetch_all(&task.pool)
        .await?;
        if !unkept.is_empty() {
            return Ok(Some(format!(
                "retention deletes events of {} (only event-sourced types are kept for ever), so \
                 the history of projection {name} is incomplete: rebuilt from it, the read model \
                 would lose what was deleted",
                unkept.join(", ")
            )));
        }
    }
    Ok(None)
}

/// `schema.table__rebuild`, empty, with the table's columns, defaults,
/// constraints and indexes (the projection's upserts need its unique
/// indexes). Only the rebuilding runner uses it: no grants.
/// A copy left by an earlier rebuild is replaced; a table of that name that
/// is not a copy (no converge comment) is an error, never dropped.
pub(super) async fn create_copy(conn: &mut PgConnection, table: &str) -> Result<(), CopyError> {
    let copy = format!("{table}{REBUILD_SUFFIX}");
    let existing: Option<Option<String>> = sqlx::query_scalar(
        "SELECT obj_description(c.oid, 'pg_class') FROM pg_class c WHERE c.oid = to_regclass($1)",
    )
    .bind(&copy)
    .fetch_optional(&mut *conn)
    .await?;
    match existing {
        None => {}
        Some(Some(comment)) if comment.starts_with(COPY_COMMENT) => {
            sqlx::query(&format!("DROP TABLE {copy}"))
                .execute(&mut *conn)
                .await?;
        }
        Some(_) => return Err(CopyError::Taken(copy)),
    }
    sqlx::query(&format!("CREATE TABLE {copy} (LIKE {table} INCLUDING ALL)"))
        .execute(&mut *conn)
        .await?;
    sqlx::query(&format!(
        "COMMENT ON TABLE {copy} IS '{COPY_COMMENT} {table}: dropped when the rebuild swaps'"
    ))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// How a rebuild copy's comment starts.
const COPY_COMMENT: &str = "converge: rebuild copy of";

/// Why a copy could not be created.
#[derive(Debug)]
pub(super) enum CopyError {
    /// A table of the copy's name exists and is not a copy.
    Taken(String),
    /// The database failed.
    Database(sqlx::Error),
}

impl From<sqlx::Error> for CopyError {
    fn from(e: sqlx::Error) -> Self {
        CopyError::Database(e)
    }
}

/// Makes `table` equal to its copy — as multisets of whole rows, compared
/// as text, so no key is needed and duplicates count — by deleting the rows
/// the copy lacks and inserting those it adds, then drops the copy. The
/// caller holds the table's lock. Returns how many rows changed.
pub(super) async fn make_equal_to_copy(
    conn: &mut PgConnection,
    table: &str,
) -> Result<i64, sqlx::Error> {
    let copy = format!("{table}{REBUILD_SUFFIX}");
    // Every column a row carries but the generated ones, which follow.
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(attname) FROM pg_attribute \
         WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped AND attgenerated = '' \
         ORDER BY attnum",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    let columns = columns.join(", ");
    // The n-th of identical rows on one side matches the n-th on the other.
    let numbered = |t: &str| {
        format!(
            "SELECT r.ctid AS at, r::text AS line, \
                    row_number() OVER (PARTITION BY r::text) AS nth FROM {t} r"
        )
    };
    let deleted = sqlx::query(&format!(
        "DELETE FROM {table} t USING ( \
             SELECT l.at FROM ({live}) l \
             WHERE NOT EXISTS (SELECT 1 FROM ({copied}) c \
                               WHERE c.line = l.line AND c.nth = l.nth)) gone \
         WHERE t.ctid = gone.at",
        live = numbered(table),
        copied = numbered(&copy),
    ))
    .execute(&mut *conn)
    .await?
    .rows_affected();
    let inserted = sqlx::query(&format!(
        "INSERT INTO {table} ({columns}) OVERRIDING SYSTEM VALUE \
         SELECT {columns} FROM {copy} r WHERE r.ctid IN ( \
             SELECT c.at FROM ({copied}) c \
             WHERE NOT EXISTS (SELECT 1 FROM ({live}) l \
                               WHERE l.line = c.line AND l.nth = c.nth))",
        live = numbered(table),
        copied = numbered(&copy),
    ))
    .execute(&mut *conn)
    .await?
    .rows_affected();
    sqlx::query(&format!("DROP TABLE {copy}"))
        .execute(&mut *conn)
        .await?;
    Ok((deleted + inserted) as i64)
}
