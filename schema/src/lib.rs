//! The PostgreSQL schema that converge owns.
//!
//! Every table converge uses lives in the `converge` schema, and the migrations
//! that create them are embedded in this crate: applications call [`migrate`] at
//! start-up and never copy SQL files.
//!
//! ```no_run
//! # async fn run() -> Result<(), converge_schema::MigrateError> {
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/app").await?;
//! converge_schema::migrate(&pool).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod pooling;
mod roles;

pub use roles::{grant_sql, InvalidRoleName, Role, UnknownRole};

use sqlx::migrate::Migrator;
use sqlx::{Connection, PgConnection, PgPool};

/// The schema that holds every converge table.
pub const SCHEMA: &str = "converge";

/// Number of relay partitions a new database starts with (`converge
/// partitions set N` changes it; see `converge_outbox::Partitions`).
pub const RELAY_PARTITIONS: i32 = 32;

/// The embedded migrations.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Key of the advisory lock that serialises converge migrations across processes.
const MIGRATION_LOCK_KEY: i64 = 0x636f_6e76_6572_6765; // "converge"

/// Why [`migrate`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// The database could not be reached or a statement failed.
    #[error("converge migrations: database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The connections go through a pooler that shares one server session
    /// between clients (PgBouncer's transaction or statement mode).
    #[error(
        "converge needs each connection to be a PostgreSQL session of its own, but two \
         connections reached the same server session: a pooler in transaction or statement \
         mode (PgBouncer pool_mode = transaction) is in front of the database. Set \
         pool_mode = session for this database in pgbouncer.ini (see the README's \
         \"PgBouncer\" section for the pool size a worker needs), or connect converge's \
         workers and CLI to PostgreSQL directly. Under transaction pooling, prepared \
         statements (PgBouncer before 1.21), LISTEN, the migration lock and session settings \
         would silently break"
    )]
    TransactionPooling,
    /// The schema is missing or older than this build: nothing migrates it
    /// implicitly.
    #[error(
        "the converge schema in this database is {}, but this build of converge needs migration \
         {required}: run `converge migrate` (or call `converge::migrate(&pool)`) as the schema's \
         owner before starting workers; a `Worker` can do it at start with \
         `migrate_at_start(true)` where its role owns the schema",
        match applied { Some(v) => format!("at migration {v}"), None => "missing".to_owned() }
    )]
    NotMigrated {
        /// The newest migration the database has, if any.
        applied: Option<i64>,
        /// The newest migration this build knows.
        required: i64,
    },
    /// The connected PostgreSQL role lacks privileges its converge role needs.
    #[error(
        "the PostgreSQL role {user:?} lacks privileges a converge {role} needs: {}. \
         Print the grants with `converge grants --role {role} --to {user}` and run them as the \
         schema's owner or a superuser",
        missing.join(", ")
    )]
    MissingPrivileges {
        /// The PostgreSQL role connected (`current_user`).
        user: String,
        /// The converge role it was checked for.
        role: Role,
        /// Each missing privilege, as `PRIVILEGE on object`.
        missing: Vec<String>,
    },
    /// Migrating needs the schema's owner (or a superuser).
    #[error(
        "`converge migrate` needs the converge schema's owner or a superuser, and PostgreSQL \
         refused the role {user:?}: {refusal}. Connect as the schema's owner \
         (`converge grants --role owner` prints what an owner needs)"
    )]
    NotOwner {
        /// The PostgreSQL role connected.
        user: String,
        /// PostgreSQL's refusal (SQLSTATE 42501).
        refusal: String,
    },
    /// A migration failed, or the database holds migrations this build does not know.
    #[error(
        "converge migrations failed: {source}. If the database was migrated by a newer \
         converge, upgrade this service; converge never rolls migrations back"
    )]
    Migration {
        /// The migrator's error.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
}

/// Whether a database error is transient: a serialization failure or
/// deadlock (SQLSTATE 40001 / 40P01), a lost, refused or timed-out connection
/// (class 08, 57P01–03, 25P03), exhausted resources (class 53), a statement or
/// lock timeout (57014, 55P03), an I/O error, a protocol error (a connection
/// cut mid-handshake) or an exhausted pool.
pub fn is_retryable_sqlx(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_transient_sqlstate(&code)),
        // `Protocol`: what sqlx reports for a connection cut mid-handshake
        // (e.g. "unexpected response from SSLRequest" while a fail-over
        // moves the address): seen during a promotion, where calling it
        // permanent dead-lettered and FAILED orders for an outage.
        sqlx::Error::Io(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// SQLSTATEs that say "try again": serialization failures and deadlocks,
/// lost or refused connections (class 08, the server shutting down or
/// starting, a session ended by `idle_in_transaction_session_timeout`),
/// exhausted resources (class 53), and a statement or lock wait cut short by
/// `statement_timeout` / `lock_timeout`, and a write refused by a server that
/// is read-only (`25006`: a standby, or a primary being demoted, reached
/// before a fail-over's new primary is).
fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(
            code,
            "40001"
                | "40P01"
                | "40003"
                | "57P01"
                | "57P02"
                | "57P03"
                | "57014"
                | "55P03"
                | "25P03"
                | "25006"
        )
}

impl MigrateError {
    /// Whether trying again later can succeed (a connection problem, not a bad migration).
    pub fn is_retryable(&self) -> bool {
        match self {
            MigrateError::Database(e) => is_retryable_sqlx(e),
            MigrateError::Migration { .. }
            | MigrateError::TransactionPooling
            | MigrateError::NotMigrated { .. }
            | MigrateError::MissingPrivileges { .. }
            | MigrateError::NotOwner { .. } => false,
        }
    }
}

/// Creates or upgrades the `converge` schema.
///
/// Idempotent, and safe to call from several processes starting at once: the
/// work runs on a dedicated connection under an advisory lock, and the applied
/// migrations are tracked in `converge._sqlx_migrations`, apart from the
/// application's own `sqlx` migrations.
///
/// First it checks that connections are sessions of their own, and refuses a
/// pooler in transaction mode with [`MigrateError::TransactionPooling`]
/// ([`check`], which every relay, consumer and sweep runs at start, does the
/// same, so each refuses to start behind one).
///
/// Must run as the schema's owner (or a superuser): [`MigrateError::NotOwner`]
/// otherwise. Workers never migrate implicitly; see [`Role`] for the grants.
#[tracing::instrument(skip(pool), err)]
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    pooling::check_sessions(&pool.connect_options()).await?;
    let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
    let result = migrate_on(&mut conn).await;
    let result = match result {
        Err(e) => match permission_denied(&e) {
            Some(refusal) => {
                let user = sqlx::query_scalar::<_, String>("SELECT current_user::text")
                    .fetch_one(&mut conn)
                    .await
                    .unwrap_or_default();
                Err(MigrateError::NotOwner { user, refusal })
            }
            None => Err(e),
        },
        ok => ok,
    };
    // Closing the dedicated connection also releases the advisory lock.
    let _ = conn.close().await;
    result
}

/// The database error inside `e` when it is PostgreSQL's "insufficient
/// privilege" (42501).
fn permission_denied(e: &MigrateError) -> Option<String> {
    let db = match e {
        MigrateError::Database(sqlx::Error::Database(db)) => db,
        MigrateError::Migration {
            source: sqlx::migrate::MigrateError::Execute(sqlx::Error::Database(db)),
        } => db,
        MigrateError::Migration {
            source: sqlx::migrate::MigrateError::ExecuteMigration(sqlx::Error::Database(db), _),
        } => db,
        _ => return None,
    };
    (db.code().as_deref() == Some("42501")).then(|| db.message().to_owned())
}

/// The newest migration this build embeds.
pub fn latest_migration() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Checks, without changing anything, that a process may start as `role`:
/// connections are sessions of their own (no transaction pooler), the schema
/// is migrated at least as far as this build needs ([`MigrateError::NotMigrated`]
/// names `converge migrate` otherwise; a newer schema is accepted, so workers
/// can be upgraded after migrating), and the connected PostgreSQL role holds
/// every privilege of `role` ([`MigrateError::MissingPrivileges`] names each
/// missing one). Every relay, consumer and sweep runs it at start.
#[tracing::instrument(skip(pool), err)]
pub async fn check(pool: &PgPool, role: Role) -> Result<(), MigrateError> {
    pooling::check_sessions(&pool.connect_options()).await?;
    let required = latest_migration();
    let (exists, usable): (bool, bool) = sqlx::query_as(
        "SELECT n.oid IS NOT NULL, n.oid IS NOT NULL AND has_schema_privilege(n.oid, 'USAGE') \
         FROM (SELECT to_regnamespace('converge')::oid AS oid) n",
    )
    .fetch_one(pool)
    .await?;
    if !exists {
        return Err(MigrateError::NotMigrated {
            applied: None,
            required,
        });
    }
    if !usable {
        let user: String = sqlx::query_scalar("SELECT current_user::text")
            .fetch_one(pool)
            .await?;
        return Err(MigrateError::MissingPrivileges {
            user,
            role,
            missing: vec!["USAGE on schema converge".into()],
        });
    }
    let applied: Result<Option<i64>, sqlx::Error> =
        sqlx::query_scalar("SELECT max(version) FROM converge._sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await;
    let applied = match applied {
        Ok(v) => v,
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P01") => None,
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42501") => {
            return Err(missing_privileges(pool, role).await?);
        }
        Err(e) => return Err(e.into()),
    };
    if applied.is_none_or(|v| v < required) {
        return Err(MigrateError::NotMigrated { applied, required });
    }
    let missing = missing_privileges(pool, role).await?;
    match &missing {
        MigrateError::MissingPrivileges { missing: m, .. } if m.is_empty() => Ok(()),
        _ => Err(missing),
    }
}

/// One privilege to check: (kind, object, privilege, column).
type Needed = (&'static str, String, String, String);

/// What `role` needs, one privilege (or column) at a time.
fn needed(role: Role) -> Vec<Needed> {
    let mut needed = Vec::new();
    if role == Role::Owner {
        needed.push(("owner", "converge".into(), "USAGE".into(), String::new()));
        return needed;
    }
    for table in roles::TABLES {
        let object = format!("converge.{}", roles::quote_ident_if_needed(table));
        for p in roles::table_privileges(role, table) {
            match p.split_once(" (") {
                // `UPDATE (a, b)`: each column.
                Some((privilege, list)) => {
                    for column in list.trim_end_matches(')').split(',') {
                        needed.push((
                            "column",
                            object.clone(),
                            privilege.into(),
                            column.trim().into(),
                        ));
                    }
                }
                None => needed.push(("table", object.clone(), (*p).into(), String::new())),
            }
        }
    }
    for s in roles::sequence_privileges(role) {
        needed.push((
            "sequence",
            format!("converge.{s}"),
            "USAGE".into(),
            String::new(),
        ));
    }
    for f in roles::function_privileges(role) {
        needed.push((
            "function",
            format!("converge.{f}"),
            "EXECUTE".into(),
            String::new(),
        ));
    }
    needed
}

/// [`MigrateError::MissingPrivileges`] listing what the connected role lacks
/// (an empty list when nothing is missing), grouped per object.
async fn missing_privileges(pool: &PgPool, role: Role) -> Result<MigrateError, MigrateError> {
    let needed = needed(role);
    let column = |f: fn(&Needed) -> String| needed.iter().map(f).collect::<Vec<String>>();
    let (user, missing): (String, Vec<String>) = sqlx::query_as(
        "SELECT current_user::text, coalesce(array_agg( \
                   t.privilege || CASE WHEN t.col = '' THEN '' ELSE ' (' || t.col || ')' END \
                   || ' on ' || t.object ORDER BY t.n) \
               FILTER (WHERE NOT CASE t.kind \
             WHEN 'owner' THEN pg_has_role((SELECT nspowner FROM pg_namespace \
                                            WHERE nspname = t.object), 'USAGE') \
             WHEN 'table' THEN has_table_privilege(t.object, t.privilege) \
             WHEN 'column' THEN has_column_privilege(t.object, t.col, t.privilege) \
             WHEN 'sequence' THEN has_sequence_privilege(t.object, t.privilege) \
             ELSE has_function_privilege(t.object, t.privilege) END), '{}') \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY \
             AS t(kind, object, privilege, col, n)",
    )
    .bind(column(|n| n.0.to_owned()))
    .bind(column(|n| n.1.clone()))
    .bind(column(|n| n.2.clone()))
    .bind(column(|n| n.3.clone()))
    .fetch_one(pool)
    .await?;
    // "SELECT on t", "INSERT on t" → "SELECT, INSERT on t".
    let mut grouped: Vec<(String, Vec<String>)> = Vec::new();
    for entry in missing {
        let (privilege, object) = entry.split_once(" on ").unwrap_or(("", &entry));
        match grouped.last_mut() {
            Some((o, privileges)) if o == object => privileges.push(privilege.to_owned()),
            _ => grouped.push((object.to_owned(), vec![privilege.to_owned()])),
        }
    }
    Ok(MigrateError::MissingPrivileges {
        user,
        role,
        missing: grouped
            .into_iter()
            .map(|(object, privileges)| format!("{} on {object}", privileges.join(", ")))
            .collect(),
    })
}

async fn migrate_on(conn: &mut PgConnection) -> Result<(), MigrateError> {
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut *conn)
        .await?;
    // Only when missing: CREATE SCHEMA checks the database's CREATE
    // privilege before IF NOT EXISTS, which the schema's owner need not hold.
    let exists: bool = sqlx::query_scalar("SELECT to_regnamespace('converge') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        sqlx::query("CREATE SCHEMA IF NOT EXISTS converge")
            .execute(&mut *conn)
            .await?;
    }
    // sqlx records applied migrations in an unqualified `_sqlx_migrations`
    // table: point it at our schema so the application's own table is untouched.
    sqlx::query("SET search_path TO converge")
        .execute(&mut *conn)
        .await?;
    MIGRATOR
        .run_direct(&mut *conn)
        .await
        .map_err(|source| MigrateError::Migration { source })?;
    sqlx::query("RESET search_path").execute(&mut *conn).await?;
    // A database restored, moved or upgraded into another cluster: the
    // outbox's order is re-based on this one before anything is appended.
    let rebased: bool = sqlx::query_scalar("SELECT converge.rebase()")
        .fetch_one(&mut *conn)
        .await?;
    if rebased {
        tracing::warn!(
            "the outbox was re-based on this PostgreSQL cluster (restored, moved or upgraded): \
             events appended from now on sort after every stored one"
        );
    }
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod sqlstate_tests {
    use super::is_transient_sqlstate;

    #[test]
    fn transient_sqlstates_are_retryable_and_others_not() {
        for code in [
            "40001", "40P01", "08006", "08003", "57P01", "25P03", "53300", "57014", "55P03",
        ] {
            assert!(is_transient_sqlstate(code), "{code} should be retryable");
        }
        // Constraint violations, bad input and missing objects will not heal by retrying.
        for code in ["23505", "23514", "22P02", "42P01", "42703"] {
            assert!(!is_transient_sqlstate(code), "{code} should be permanent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_cut_mid_handshake_is_retryable() {
        // What sqlx said while a fail-over moved the primary's address.
        let cut = sqlx::Error::Protocol("unexpected response from SSLRequest: 0x00".into());
        assert!(is_retryable_sqlx(&cut));
        assert!(!is_retryable_sqlx(&sqlx::Error::RowNotFound));
    }
}
