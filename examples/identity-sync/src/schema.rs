//! The example's own Postgres schema `identity_sync`: the business table, the
//! changed-records table and the trigger that fills it.
//!
//! The DDL is idempotent (`IF NOT EXISTS`, `CREATE OR REPLACE`) and runs in one
//! transaction under an advisory lock, so any number of processes may call
//! [`migrate`] at once. It keeps no migration history of its own and touches
//! neither the application's `_sqlx_migrations` nor converge's.

use sqlx::PgPool;

/// The schema this example owns.
pub const SCHEMA: &str = "identity_sync";

/// Advisory-lock key serialising concurrent [`migrate`] calls.
const MIGRATE_LOCK: &str = "identity_sync.migrate";

const DDL: &str = r#"
CREATE SCHEMA IF NOT EXISTS identity_sync;

CREATE TABLE IF NOT EXISTS identity_sync.users (
    id           bigserial PRIMARY KEY,
    email        text NOT NULL,
    display_name text NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS identity_sync.changed_records (
    user_id     bigint PRIMARY KEY REFERENCES identity_sync.users (id) ON DELETE CASCADE,
    state       text NOT NULL DEFAULT 'PENDING'
                CHECK (state IN ('PENDING', 'SYNCED', 'FAILED')),
    version     bigint NOT NULL DEFAULT 1,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    attempts    integer NOT NULL DEFAULT 0,
    last_error  text,
    synced_at   timestamptz
);

CREATE INDEX IF NOT EXISTS changed_records_pending
    ON identity_sync.changed_records (user_id) WHERE state = 'PENDING';

CREATE OR REPLACE FUNCTION identity_sync.record_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND OLD.email IS NOT DISTINCT FROM NEW.email
       AND OLD.display_name IS NOT DISTINCT FROM NEW.display_name THEN
        RETURN NEW;
    END IF;
    INSERT INTO identity_sync.changed_records AS c (user_id) VALUES (NEW.id)
    ON CONFLICT (user_id) DO UPDATE
        SET state = 'PENDING', version = c.version + 1, changed_at = now(),
            attempts = 0, last_error = NULL;
    RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER users_changed
    AFTER INSERT OR UPDATE ON identity_sync.users
    FOR EACH ROW EXECUTE FUNCTION identity_sync.record_change();
"#;

/// Creates or completes the `identity_sync` schema (idempotent, safe from many
/// processes at once).
#[tracing::instrument(skip(pool), err)]
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(MIGRATE_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(DDL).execute(&mut *tx).await?;
    tx.commit().await
}

/// Empties the example's tables (the demo starts from fresh data).
pub async fn reset(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("TRUNCATE identity_sync.changed_records, identity_sync.users")
        .execute(pool)
        .await?;
    Ok(())
}

/// Inserts `count` users (`user<n>@example.com`); the trigger records each as
/// a PENDING changed record. Returns their ids in ascending order.
pub async fn seed_users(pool: &PgPool, count: u32) -> Result<Vec<i64>, sqlx::Error> {
    let mut ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO identity_sync.users (email, display_name) \
         SELECT 'user' || g || '@example.com', 'User ' || g FROM generate_series(1, $1) g \
         RETURNING id",
    )
    .bind(i64::from(count))
    .fetch_all(pool)
    .await?;
    ids.sort_unstable();
    Ok(ids)
}

/// Inserts one user with the given email and name; returns its id.
pub async fn insert_user(
    pool: &PgPool,
    email: &str,
    display_name: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO identity_sync.users (email, display_name) VALUES ($1, $2) RETURNING id",
    )
    .bind(email)
    .bind(display_name)
    .fetch_one(pool)
    .await
}

/// How many changed records are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateCounts {
    /// Waiting for a sync.
    pub pending: i64,
    /// Synced to the identity API since their last change.
    pub synced: i64,
    /// Given up on (the recover hook ran).
    pub failed: i64,
}

impl StateCounts {
    /// All changed records.
    pub fn total(&self) -> i64 {
        self.pending + self.synced + self.failed
    }
}

/// Counts the changed records by state.
pub async fn state_counts(pool: &PgPool) -> Result<StateCounts, sqlx::Error> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM identity_sync.changed_records GROUP BY state")
            .fetch_all(pool)
            .await?;
    let mut counts = StateCounts::default();
    for (state, n) in rows {
        match state.as_str() {
            "PENDING" => counts.pending = n,
            "SYNCED" => counts.synced = n,
            _ => counts.failed = n,
        }
    }
    Ok(counts)
}

/// One row of `identity_sync.changed_records`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ChangedRecord {
    /// The user's id (the reconciler's key).
    pub user_id: i64,
    /// `PENDING`, `SYNCED` or `FAILED`.
    pub state: String,
    /// Bumped by every change of the user; the sync's compare-and-set checks it.
    pub version: i64,
    /// Sync attempts since the last change.
    pub attempts: i32,
    /// The last failed attempt's error.
    pub last_error: Option<String>,
}

/// The changed record of `user_id`, if any.
pub async fn changed_record(
    pool: &PgPool,
    user_id: i64,
) -> Result<Option<ChangedRecord>, sqlx::Error> {
    sqlx::query_as(
        "SELECT user_id, state, version, attempts, last_error \
         FROM identity_sync.changed_records WHERE user_id = $1",
    )
    .bind(user_id)
    .fetch_optional(pool)
    .await
}
