//! Per-key mutual exclusion across paths and processes.
//!
//! A session-level advisory lock on a hash of (reconciler, key), taken with
//! `pg_try_advisory_lock` on a connection held for the reconcile: never a wait
//! inside Postgres (no deadlock, no other key blocked), no transaction held
//! open (the relay's xmin is not held back), and released by the database when
//! the holder's connection ends, crash included.

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};

/// A held key lock. Release it with [`KeyLock::release`]; if it is dropped
/// instead (a cancelled task), its connection is closed, which releases it.
pub(crate) struct KeyLock {
    conn: Option<PoolConnection<Postgres>>,
    lock_id: i64,
}

/// Tries to lock `key` of `reconciler`; `None` when another run holds it.
pub(crate) async fn try_lock(
    pool: &PgPool,
    reconciler: &str,
    key: &str,
) -> Result<Option<KeyLock>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let (lock_id, locked): (i64, bool) = sqlx::query_as(
        "SELECT k, pg_try_advisory_lock(k) \
         FROM (SELECT hashtextextended($1 || chr(10) || $2, 7253) AS k) AS s",
    )
    .bind(reconciler)
    .bind(key)
    .fetch_one(&mut *conn)
    .await?;
    Ok(locked.then_some(KeyLock {
        conn: Some(conn),
        lock_id,
    }))
}

impl KeyLock {
    /// Releases the lock and returns the connection to the pool.
    pub(crate) async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            let unlocked = sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock($1)")
                .bind(self.lock_id)
                .fetch_one(&mut *conn)
                .await;
            if !matches!(unlocked, Ok(true)) {
                // Never hand a connection that may still hold the lock back to the pool.
                conn.close_on_drop();
            }
        }
    }
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
    }
}

/// Locks taken for a batch of keys on one connection.
pub(crate) struct BatchLocks {
    conn: Option<PoolConnection<Postgres>>,
    ids: Vec<i64>,
    held: Vec<bool>,
}

/// Tries to lock every key of a batch in one statement; each is held or not.
pub(crate) async fn try_lock_all(
    pool: &PgPool,
    reconciler: &str,
    keys: &[String],
) -> Result<BatchLocks, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let rows: Vec<(i64, bool)> = sqlx::query_as(
        "SELECT id, pg_try_advisory_lock(id) FROM ( \
             SELECT hashtextextended($1 || chr(10) || k, 7253) AS id, n \
             FROM unnest($2::text[]) WITH ORDINALITY AS t(k, n)) AS s \
         ORDER BY n",
    )
    .bind(reconciler)
    .bind(keys)
    .fetch_all(&mut *conn)
    .await?;
    let (ids, held) = rows.into_iter().unzip();
    Ok(BatchLocks {
        conn: Some(conn),
        ids,
        held,
    })
}

impl BatchLocks {
    /// Whether each key (in the order given) is held.
    pub(crate) fn held(&self) -> Vec<bool> {
        self.held.clone()
    }

    /// Releases the held locks in one statement.
    pub(crate) async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            let ids: Vec<i64> = self
                .ids
                .iter()
                .zip(&self.held)
                .filter(|(_, h)| **h)
                .map(|(id, _)| *id)
                .collect();
            let unlocked =
                sqlx::query("SELECT pg_advisory_unlock(id) FROM unnest($1::bigint[]) AS t(id)")
                    .bind(&ids)
                    .execute(&mut *conn)
                    .await;
            if unlocked.is_err() {
                conn.close_on_drop();
            }
        }
    }
}

impl Drop for BatchLocks {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
    }
}
