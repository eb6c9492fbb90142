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

use sqlx::migrate::Migrator;
use sqlx::{Connection, PgConnection, PgPool};

/// The schema that holds every converge table.
pub const SCHEMA: &str = "converge";

/// Number of relay partitions in `converge.outbox` (see the first migration).
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

impl MigrateError {
    /// Whether trying again later can succeed (a connection problem, not a bad migration).
    pub fn is_retryable(&self) -> bool {
        match self {
            MigrateError::Database(e) => matches!(
                e,
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
            ),
            MigrateError::Migration { .. } | MigrateError::TransactionPooling => false,
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
/// (every relay, consumer and sweep migrates at start, so each refuses to
/// start behind one).
#[tracing::instrument(skip(pool), err)]
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    pooling::check_sessions(&pool.connect_options()).await?;
    let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
    let result = migrate_on(&mut conn).await;
    // Closing the dedicated connection also releases the advisory lock.
    let _ = conn.close().await;
    result
}

async fn migrate_on(conn: &mut PgConnection) -> Result<(), MigrateError> {
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut *conn)
        .await?;
    sqlx::query("CREATE SCHEMA IF NOT EXISTS converge")
        .execute(&mut *conn)
        .await?;
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
