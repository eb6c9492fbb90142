//! Per-key mutual exclusion across paths and processes.
//!
//! A session-level advisory lock on a 64-bit id of (reconciler, key), taken
//! with `pg_try_advisory_lock`: never a wait inside Postgres (no deadlock, no
//! other key blocked), no transaction held open (the relay's xmin is not held
//! back), and released by the database when the holder's connection ends,
//! crash included. Three ways to hold them, one id:
//!
//! * [`try_lock`] — one key on its own pooled connection (`run_key`);
//! * [`try_lock_all`] — a page of keys on one connection (the sweep path);
//! * [`Locker`] — the consumer's lock service: one connection, and the lock
//!   and unlock requests of every in-flight key grouped into one statement
//!   per round trip.

use std::collections::HashSet;

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};
use tokio::sync::{mpsc, oneshot};

/// The advisory lock id of `key` of `reconciler`: FNV-1a (64 bit) of
/// `reconciler`, a newline and `key`. Every path uses this one function; it
/// must never change, or two versions of a service would not exclude each other.
pub(crate) fn lock_id(reconciler: &str, key: &str) -> i64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for byte in reconciler
        .bytes()
        .chain(std::iter::once(b'\n'))
        .chain(key.bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    hash as i64
}

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
    let id = lock_id(reconciler, key);
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    Ok(locked.then_some(KeyLock {
        conn: Some(conn),
        lock_id: id,
    }))
}

impl KeyLock {
    /// Releases the lock and returns the connection to the pool.
    pub(crate) async fn release(mut self) {
        if let Some(conn) = self.conn.as_mut() {
            let unlocked = sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock($1)")
                .bind(self.lock_id)
                .fetch_one(&mut **conn)
                .await;
            if matches!(unlocked, Ok(true)) {
                // Released: the connection goes back to the pool. Otherwise
                // `Drop` closes it, so no pooled connection keeps the lock.
                drop(self.conn.take());
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
/// A key given twice is held once (the second is reported not held).
pub(crate) async fn try_lock_all(
    pool: &PgPool,
    reconciler: &str,
    keys: &[String],
) -> Result<BatchLocks, sqlx::Error> {
    let mut seen = HashSet::new();
    let ids: Vec<i64> = keys.iter().map(|k| lock_id(reconciler, k)).collect();
    let unique: Vec<i64> = ids.iter().copied().filter(|id| seen.insert(*id)).collect();
    // Guarded before the locks are asked for (see `try_lock`).
    let mut locks = BatchLocks {
        conn: Some(pool.acquire().await?),
        ids: Vec::new(),
        held: Vec::new(),
    };
    let conn = locks.conn.as_mut().expect("just set");
    let locked: Vec<(i64, bool)> = sqlx::query_as(
        "SELECT id, pg_try_advisory_lock(id) FROM unnest($1::bigint[]) WITH ORDINALITY AS t(id, n) \
         ORDER BY n",
    )
    .bind(&unique)
    .fetch_all(&mut **conn)
    .await?;
    let mut granted: HashSet<i64> = locked.into_iter().filter(|l| l.1).map(|l| l.0).collect();
    // Each granted id goes to the first occurrence of its key only.
    locks.held = ids.iter().map(|id| granted.remove(id)).collect();
    locks.ids = ids;
    Ok(locks)
}

impl BatchLocks {
    /// Whether each key (in the order given) is held.
    pub(crate) fn held(&self) -> Vec<bool> {
        self.held.clone()
    }

    /// Releases the held locks in one statement.
    pub(crate) async fn release(mut self) {
        if let Some(conn) = self.conn.as_mut() {
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
                    .execute(&mut **conn)
                    .await;
            if unlocked.is_ok() {
                drop(self.conn.take());
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

enum Op {
    Lock {
        id: i64,
        reply: oneshot::Sender<Result<bool, String>>,
    },
    Unlock {
        id: i64,
    },
}

/// The consumer's lock service: every in-flight key's lock on one connection,
/// the requests that arrive during a round trip grouped into the next one.
#[derive(Clone)]
pub(crate) struct Locker {
    ops: mpsc::UnboundedSender<Op>,
}

/// A key held through a [`Locker`]; released when dropped.
pub(crate) struct HeldKey {
    id: i64,
    ops: mpsc::UnboundedSender<Op>,
}

impl Drop for HeldKey {
    fn drop(&mut self) {
        let _ = self.ops.send(Op::Unlock { id: self.id });
    }
}

impl Locker {
    /// Starts the service; it stops (and its connection closes, releasing
    /// everything) when the last `Locker` clone and `HeldKey` are gone.
    pub(crate) fn start(pool: PgPool) -> Locker {
        let (ops, rx) = mpsc::unbounded_channel();
        tokio::spawn(serve(pool, rx));
        Locker { ops }
    }

    /// Tries to lock `key` of `reconciler`: `None` when another run holds it,
    /// in this process or another.
    pub(crate) async fn try_lock(
        &self,
        reconciler: &str,
        key: &str,
    ) -> Result<Option<HeldKey>, String> {
        let id = lock_id(reconciler, key);
        let (reply, answer) = oneshot::channel();
        self.ops
            .send(Op::Lock { id, reply })
            .map_err(|_| "the lock service stopped".to_owned())?;
        let held = answer
            .await
            .map_err(|_| "the lock service stopped".to_owned())??;
        Ok(held.then(|| HeldKey {
            id,
            ops: self.ops.clone(),
        }))
    }
}

async fn serve(pool: PgPool, mut rx: mpsc::UnboundedReceiver<Op>) {
    let mut conn: Option<PoolConnection<Postgres>> = None;
    // Advisory locks are re-entrant within a session: a key this session
    // holds is busy for everyone else in the process too.
    let mut held: HashSet<i64> = HashSet::new();
    // Keys whose lock went with a lost connection while their reconcile still
    // runs: busy for new requests until that run's `HeldKey` is dropped.
    let mut stale: HashSet<i64> = HashSet::new();
    while let Some(first) = rx.recv().await {
        let mut ops = vec![first];
        while ops.len() < 4096 {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut unlocks = Vec::new();
        let mut locks = Vec::new();
        for op in ops {
            match op {
                Op::Unlock { id } if stale.remove(&id) => {}
                Op::Unlock { id } => unlocks.push(id),
                Op::Lock { id, reply } => locks.push((id, reply)),
            }
        }
        if conn.is_none() {
            match pool.acquire().await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    for (_, reply) in locks {
                        let _ = reply.send(Err(format!("lock connection: {e}")));
                    }
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connection just ensured");
        if !unlocks.is_empty() {
            unlocks.retain(|id| held.remove(id));
            let r = sqlx::query("SELECT pg_advisory_unlock(id) FROM unnest($1::bigint[]) AS t(id)")
                .bind(&unlocks)
                .execute(&mut **c)
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, "lock service lost its connection; its locks are released");
                drop_connection(&mut conn, &mut held, &mut stale);
                for (_, reply) in locks {
                    let _ = reply.send(Err(format!("lock connection: {e}")));
                }
                continue;
            }
        }
        if locks.is_empty() {
            continue;
        }
        let c = conn.as_mut().expect("connection present");
        // Ids held here already, or asked twice in this round, are busy.
        let mut asked = HashSet::new();
        let ids: Vec<i64> = locks
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !held.contains(id) && !stale.contains(id) && asked.insert(*id))
            .collect();
        let result: Result<Vec<(i64, bool)>, sqlx::Error> = sqlx::query_as(
            "SELECT id, pg_try_advisory_lock(id) FROM unnest($1::bigint[]) AS t(id)",
        )
        .bind(&ids)
        .fetch_all(&mut **c)
        .await;
        match result {
            Ok(rows) => {
                let mut granted: HashSet<i64> =
                    rows.into_iter().filter(|r| r.1).map(|r| r.0).collect();
                for (id, reply) in locks {
                    let got = granted.remove(&id);
                    if got {
                        held.insert(id);
                    }
                    if reply.send(Ok(got)).is_err() && got {
                        // The asker is gone: give the lock back at once.
                        held.remove(&id);
                        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                            .bind(id)
                            .execute(&mut **c)
                            .await;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "lock service lost its connection; its locks are released");
                drop_connection(&mut conn, &mut held, &mut stale);
                for (_, reply) in locks {
                    let _ = reply.send(Err(format!("lock connection: {e}")));
                }
            }
        }
    }
}

/// Closes the lock connection: the session ends and Postgres releases its
/// locks. The keys still running stay busy here (`stale`) until they finish.
fn drop_connection(
    conn: &mut Option<PoolConnection<Postgres>>,
    held: &mut HashSet<i64>,
    stale: &mut HashSet<i64>,
) {
    if let Some(mut c) = conn.take() {
        c.close_on_drop();
    }
    stale.extend(held.drain());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_ids_are_stable_and_separate_reconcilers() {
        // Fixed forever: two versions of a service must compute the same id.
        assert_eq!(lock_id("invoicing", "42"), lock_id("invoicing", "42"));
        assert_ne!(lock_id("invoicing", "42"), lock_id("shipping", "42"));
        assert_ne!(lock_id("a", "b\nc"), lock_id("a\nb", "c2"));
        // FNV-1a 64 of "invoicing\n42", computed independently.
        assert_eq!(lock_id("invoicing", "42"), 0x4590_daf0_a9aa_c675_u64 as i64);
    }
}
