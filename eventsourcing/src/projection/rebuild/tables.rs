//! A rebuild's tables: whether they can be rebuilt here, their copies, and
//! making a live table equal to its copy.

use sqlx::{PgConnection, PgPool};

use super::super::names::{parts, quoted, quoted_copy, REBUILD_SUFFIX};
use super::super::runner::Task;

/// Whether retention (or anything else) has deleted events of `types`
/// (every type when empty): some aggregate of them lacks its first event.
/// Retention deletes an aggregate's events oldest first, so a thinned
/// history always lacks version 1. One probe per aggregate of the types.
pub(crate) async fn history_thinned(pool: &PgPool, types: &[&str]) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM converge.outbox_heads h \
         WHERE (cardinality($1::text[]) = 0 OR h.aggregate_type = ANY ($1::text[])) \
           AND NOT EXISTS (SELECT 1 FROM converge.outbox o \
                           WHERE o.aggregate_type = h.aggregate_type \
                             AND o.aggregate_id = h.aggregate_id AND o.version = 1))",
    )
    .bind(types)
    .fetch_one(pool)
    .await
}

/// Why the projection cannot be rebuilt here, if it cannot: no tables; a
/// table missing, not a plain table (partitioned, inherited, a view), under
/// row-level security, referenced by a foreign key, or one the role may not
/// write or create beside; a history with events deleted.
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
        let (schema, _) = parts(table);
        let found: Option<(String, bool, bool, bool, bool, bool, String)> = sqlx::query_as(
            "SELECT c.relkind::text, \
                    c.relrowsecurity, \
                    EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = c.oid OR i.inhrelid = c.oid), \
                    EXISTS (SELECT 1 FROM pg_constraint f WHERE f.confrelid = c.oid AND f.contype = 'f'), \
                    has_table_privilege(c.oid, 'SELECT') AND has_table_privilege(c.oid, 'INSERT') \
                        AND has_table_privilege(c.oid, 'UPDATE') AND has_table_privilege(c.oid, 'DELETE'), \
                    has_schema_privilege(c.relnamespace, 'CREATE'), current_user::text \
             FROM pg_class c WHERE c.oid = to_regclass($1)",
        )
        .bind(quoted(table))
        .fetch_optional(&task.pool)
        .await?;
        let Some((kind, rls, inherited, referenced, writable, creatable, user)) = found else {
            return Ok(Some(format!(
                "table {table} of projection {name} does not exist"
            )));
        };
        let why = if kind != "r" {
            format!("{table} is not a plain table (relkind {kind}): a rebuild swaps rows of plain tables only")
        } else if inherited {
            format!("{table} has inheritance parents or children: a rebuild swaps rows of plain tables only")
        } else if rls {
            format!(
                "{table} has row-level security: the rebuild's comparison would see only the rows \
                 {user} may see; rebuild it as a role that bypasses it, or without it"
            )
        } else if referenced {
            format!(
                "a foreign key references {table}: the swap deletes and inserts rows the copy \
                 changed, which would cascade or fail; read models are not referenced"
            )
        } else if !writable {
            format!(
                "the role {user} may not SELECT, INSERT, UPDATE and DELETE on {table}: a rebuild \
                 writes the rows that differ into it; GRANT SELECT, INSERT, UPDATE, DELETE ON \
                 {table} TO {user}"
            )
        } else if !creatable {
            format!(
                "the role {user} may not create tables in schema {schema}, where the rebuild of \
                 {name} puts its copies: GRANT CREATE ON SCHEMA {schema} TO {user}"
            )
        } else {
            let unsettable: Option<String> = sqlx::query_scalar(
                "SELECT s FROM (SELECT pg_get_serial_sequence($1, a.attname) AS s \
                                FROM pg_attribute a \
                                WHERE a.attrelid = $1::regclass AND a.attnum > 0 \
                                  AND NOT a.attisdropped) q \
                 WHERE s IS NOT NULL AND NOT has_sequence_privilege(s, 'UPDATE') LIMIT 1",
            )
            .bind(quoted(table))
            .fetch_optional(&task.pool)
            .await?;
            match unsettable {
                None => continue,
                Some(sequence) => format!(
                    "the role {user} may not set {sequence}, the sequence of a column of {table}: \
                     a swap moves it past the ids the copy drew; GRANT UPDATE ON SEQUENCE \
                     {sequence} TO {user}"
                ),
            }
        };
        return Ok(Some(format!("projection {name} cannot be rebuilt: {why}")));
    }
    let types = task.projection.aggregate_types();
    if history_thinned(&task.pool, types).await? {
        return Ok(Some(format!(
            "the history of {} has events deleted (retention, before the types were kept for \
             ever): rebuilt from what is left, projection {name}'s read model would lose them",
            if types.is_empty() {
                "the outbox".to_owned()
            } else {
                types.join(", ")
            }
        )));
    }
    Ok(None)
}

/// How a rebuild copy's comment starts; the projection's name follows.
const COPY_COMMENT: &str = "converge: rebuild copy for projection";

/// Why a copy could not be created.
#[derive(Debug)]
pub(super) enum CopyError {
    /// A table of the copy's name exists and is not this projection's copy.
    Taken(String),
    /// The database failed.
    Database(sqlx::Error),
}

impl From<sqlx::Error> for CopyError {
    fn from(e: sqlx::Error) -> Self {
        CopyError::Database(e)
    }
}

/// `schema.table__rebuild`, empty, with the table's columns, defaults,
/// constraints and indexes (the projection's upserts need its unique
/// indexes); only the rebuilding runner uses it. A copy this projection's
/// earlier rebuild left is replaced; any other table of that name is an
/// error, never dropped.
pub(super) async fn create_copy(
    conn: &mut PgConnection,
    projection: &str,
    table: &str,
) -> Result<(), CopyError> {
    let copy = quoted_copy(table);
    let comment = format!("{COPY_COMMENT} {projection}");
    let existing: Option<Option<String>> = sqlx::query_scalar(
        "SELECT obj_description(c.oid, 'pg_class') FROM pg_class c WHERE c.oid = to_regclass($1)",
    )
    .bind(&copy)
    .fetch_optional(&mut *conn)
    .await?;
    match existing {
        None => {}
        Some(Some(found)) if found == comment => {
            sqlx::query(&format!("DROP TABLE {copy}"))
                .execute(&mut *conn)
                .await?;
        }
        Some(_) => return Err(CopyError::Taken(format!("{table}{REBUILD_SUFFIX}"))),
    }
    sqlx::query(&format!(
        "CREATE TABLE {copy} (LIKE {} INCLUDING ALL)",
        quoted(table)
    ))
    .execute(&mut *conn)
    .await?;
    // Both parts are validated identifiers.
    sqlx::query(&format!("COMMENT ON TABLE {copy} IS '{comment}'"))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Drops the copies of `tables` (after a swap; a failure leaves them for the
/// next rebuild to replace).
pub(super) async fn drop_copies(pool: &PgPool, tables: &[&str]) {
    for table in tables {
        let dropped = sqlx::query(&format!("DROP TABLE IF EXISTS {}", quoted_copy(table)))
            .execute(pool)
            .await;
        if let Err(error) = dropped {
            tracing::warn!(%error, table, "a rebuild copy was left; the next rebuild replaces it");
        }
    }
}

/// The rows of a table, compared whole as text.
fn numbered(t: &str) -> String {
    format!(
        "SELECT r.ctid AS at, r::text AS line, \
                row_number() OVER (PARTITION BY r::text) AS nth FROM {t} r"
    )
}

/// Makes `table` equal to its copy, writing only what differs, and moves
/// its identity and serial sequences past the values the copy brought. With
/// a primary key: rows the copy lacks or has otherwise (the key matched, the
/// row compared whole as text) are deleted, then the copy's rows the table
/// lacks inserted; without one, whole rows are compared (the n-th of
/// identical rows matches the n-th) and the difference deleted and
/// inserted. Generated columns are left to compute themselves; identity
/// columns take the copy's values. The caller holds the table's lock.
/// Returns how many rows were deleted plus how many inserted.
pub(super) async fn make_equal_to_copy(
    conn: &mut PgConnection,
    table: &str,
) -> Result<i64, sqlx::Error> {
    let (live, copy) = (quoted(table), quoted_copy(table));
    let columns: Vec<(String, bool, Option<String>)> = sqlx::query_as(
        "SELECT quote_ident(a.attname), \
                coalesce(a.attnum = ANY (i.indkey), false), \
                pg_get_serial_sequence($1, a.attname) \
         FROM pg_attribute a \
         LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
         WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped \
           AND a.attgenerated = '' \
         ORDER BY a.attnum",
    )
    .bind(&live)
    .fetch_all(&mut *conn)
    .await?;
    let all: Vec<&str> = columns.iter().map(|c| c.0.as_str()).collect();
    let key: Vec<&str> = columns
        .iter()
        .filter(|c| c.1)
        .map(|c| c.0.as_str())
        .collect();
    let list = all.join(", ");
    let changed = if key.is_empty() {
        let deleted = sqlx::query(&format!(
            "DELETE FROM {live} t USING ( \
                 SELECT l.at FROM ({l}) l \
                 WHERE NOT EXISTS (SELECT 1 FROM ({c}) c WHERE c.line = l.line AND c.nth = l.nth)) gone \
             WHERE t.ctid = gone.at",
            l = numbered(&live),
            c = numbered(&copy),
        ))
        .execute(&mut *conn)
        .await?
        .rows_affected();
        let inserted = sqlx::query(&format!(
            "INSERT INTO {live} ({list}) OVERRIDING SYSTEM VALUE \
             SELECT {list} FROM {copy} r WHERE r.ctid IN ( \
                 SELECT c.at FROM ({c}) c \
                 WHERE NOT EXISTS (SELECT 1 FROM ({l}) l WHERE l.line = c.line AND l.nth = c.nth))",
            l = numbered(&live),
            c = numbered(&copy),
        ))
        .execute(&mut *conn)
        .await?
        .rows_affected();
        deleted + inserted
    } else {
        let on: Vec<String> = key.iter().map(|k| format!("t.{k} = c.{k}")).collect();
        let on = on.join(" AND ");
        // A row that differs is deleted and inserted again, not updated in
        // place: unique constraints are checked row by row, and an update
        // could collide with a row not yet changed. After the delete the
        // table holds only rows of the copy, so no insert collides either.
        let deleted = sqlx::query(&format!(
            "DELETE FROM {live} t \
             WHERE NOT EXISTS (SELECT 1 FROM {copy} c WHERE {on} AND c::text = t::text)"
        ))
        .execute(&mut *conn)
        .await?
        .rows_affected();
        let inserted = sqlx::query(&format!(
            "INSERT INTO {live} ({list}) OVERRIDING SYSTEM VALUE \
             SELECT {list} FROM {copy} c WHERE NOT EXISTS (SELECT 1 FROM {live} t WHERE {on})"
        ))
        .execute(&mut *conn)
        .await?
        .rows_affected();
        deleted + inserted
    };
    // The copy drew its own identity values: the live sequences must not
    // hand them out again.
    for (column, _, sequence) in &columns {
        if let Some(sequence) = sequence {
            sqlx::query(&format!(
                "SELECT setval($1::regclass, greatest(coalesce((SELECT max({column}) FROM {live}), 0), \
                                                     nextval($1::regclass)))"
            ))
            .bind(sequence)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(changed as i64)
}
