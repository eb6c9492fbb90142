//! Per-key exclusion across paths and processes: leases in rows.
//!
//! A run of (reconciler, key) holds the key's row in `converge.key_leases`
//! until `expires_at` (database clock) and renews it while it runs; another
//! run may take the key only after the row expired, and gets a larger fencing
//! token. The holder stops trusting its lease at `sent + ttl - margin` on its
//! own monotonic clock, where `sent` is when it sent the statement that set
//! `expires_at` (so before the database read its clock): the run is stopped —
//! its future dropped, never polled again — before the row can expire, and
//! fenced writes ([`Context::check_fence`](crate::Context::check_fence)) fail
//! once the row is gone or taken. Nothing depends on one connection staying
//! up: a killed backend, a fail-over or a pooler cannot release a key behind
//! its holder's back; a crashed holder's keys come free at `expires_at`.
//!
//! A [`KeyLeases`] service does the bookkeeping of a process part (a
//! consumer, a sweep page, a manual run): grants and releases asked for during
//! one round trip go to the database together, and every held lease is
//! renewed in one statement.

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The default time a key lease lasts without renewal: how long a crashed
/// holder's keys stay busy.
pub const DEFAULT_KEY_LEASE: Duration = Duration::from_secs(20);

/// A small pool of its own for a long-lived lease service (a consumer's):
/// grants, renewals and releases never wait for a connection the
/// reconciles use, and give up on a row lock after 2 s instead of stalling.
pub(crate) fn dedicated_pool(pool: &PgPool) -> PgPool {
    use sqlx::Executor;
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .min_connections(0)
        .idle_timeout(Duration::from_secs(60))
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute("SET lock_timeout = '2s'").await?;
                Ok(())
            })
        })
        .connect_lazy_with((*pool.connect_options()).clone())
}

/// The lease statements, shared with the benchmark harness.
#[doc(hidden)]
pub mod sql {
    /// Leases keys: `$1` reconcilers, `$2` keys (distinct pairs), `$3` the
    /// holder, `$4` the lease in milliseconds; returns the granted
    /// (reconciler, key, token). An expired row is taken over only if no
    /// one holds a lock on it (`FOR UPDATE SKIP LOCKED`): a fenced
    /// transaction of the previous holder (`FOR KEY SHARE`) keeps the key
    /// busy until it ends. Rows are locked in key order and never waited
    /// for, so concurrent grants cannot deadlock.
    pub const ACQUIRE: &str = "WITH asked AS ( \
             SELECT r, k FROM unnest($1::text[], $2::text[]) AS t(r, k)), \
         expired AS ( \
             SELECT l.reconciler, l.key FROM converge.key_leases AS l \
             JOIN asked AS a ON l.reconciler = a.r AND l.key = a.k \
             WHERE l.expires_at <= clock_timestamp() \
             ORDER BY l.reconciler, l.key \
             FOR UPDATE OF l SKIP LOCKED), \
         taken AS ( \
             UPDATE converge.key_leases AS l \
             SET token = nextval('converge.key_lease_tokens'), holder = $3, \
                 acquired_at = clock_timestamp(), \
                 expires_at = clock_timestamp() + $4 * interval '1 millisecond' \
             FROM expired AS e WHERE l.reconciler = e.reconciler AND l.key = e.key \
             RETURNING l.reconciler, l.key, l.token), \
         fresh AS ( \
             INSERT INTO converge.key_leases AS l \
                 (reconciler, key, token, holder, acquired_at, expires_at) \
             SELECT r, k, nextval('converge.key_lease_tokens'), $3, clock_timestamp(), \
                    clock_timestamp() + $4 * interval '1 millisecond' \
             FROM asked ORDER BY r, k \
             ON CONFLICT (reconciler, key) DO NOTHING \
             RETURNING reconciler, key, token) \
         SELECT reconciler, key, token FROM taken \
         UNION ALL SELECT reconciler, key, token FROM fresh";
    /// Renews leases: `$1` reconcilers, `$2` keys, `$3` tokens, `$4` the lease
    /// in milliseconds, `$5` the holder; returns the renewed tokens.
    pub const RENEW: &str = "UPDATE converge.key_leases AS l \
         SET expires_at = clock_timestamp() + $4 * interval '1 millisecond' \
         FROM unnest($1::text[], $2::text[], $3::bigint[]) AS t(r, k, tok) \
         WHERE l.reconciler = t.r AND l.key = t.k AND l.token = t.tok AND l.holder = $5 \
           AND l.expires_at > clock_timestamp() \
         RETURNING l.token";
    /// Releases leases: `$1` reconcilers, `$2` keys, `$3` tokens, `$4`
    /// whether each run converged its key (its open dead letter is
    /// resolved), `$5` the holder.
    pub const RELEASE: &str = "WITH released AS ( \
             DELETE FROM converge.key_leases AS l \
             USING unnest($1::text[], $2::text[], $3::bigint[], $4::bool[]) AS t(r, k, tok, conv) \
             WHERE l.reconciler = t.r AND l.key = t.k AND l.token = t.tok AND l.holder = $5 \
             RETURNING l.reconciler, l.key, t.conv), \
         resolved AS ( \
             UPDATE converge.dead_letters AS d \
             SET resolved_at = now(), resolution = 'converged', resolved_by = 'converge' \
             FROM released r \
             WHERE r.conv AND d.reconciler = r.reconciler AND d.aggregate_key = r.key \
               AND d.resolved_at IS NULL AND d.aggregate_key <> '' \
             RETURNING d.id, d.reconciler, d.aggregate_key) \
         INSERT INTO converge.audit (actor, action, target, reason, details, outcome, finished_at) \
         SELECT 'converge', 'dead_letter.resolve', 'dead letter ' || id, \
                'a later run converged the key', \
                jsonb_build_object('dead_letter', id, 'reconciler', reconciler, 'key', aggregate_key), \
                'ok', now() \
         FROM resolved";
    /// Deletes what crashes left behind: lease rows expired for an hour and
    /// consumer attempt counts untouched for a day, at most 1,000 each.
    pub const CLEANUP: &str = "WITH leases AS ( \
             DELETE FROM converge.key_leases WHERE ctid = ANY (ARRAY( \
                 SELECT ctid FROM converge.key_leases \
                 WHERE expires_at < clock_timestamp() - interval '1 hour' LIMIT 1000 \
                 FOR UPDATE SKIP LOCKED)) RETURNING 1), \
         attempts AS ( \
             DELETE FROM converge.event_attempts WHERE ctid = ANY (ARRAY( \
                 SELECT ctid FROM converge.event_attempts \
                 WHERE updated_at < now() - interval '1 day' LIMIT 1000 \
                 FOR UPDATE SKIP LOCKED)) RETURNING 1) \
         SELECT (SELECT count(*) FROM leases) + (SELECT count(*) FROM attempts)";
}

/// Why a lease request got no answer from the database.
pub(crate) type LeaseFailure = String;

/// What a run knows about its key's lease: the token, and until when its
/// holder may act.
#[derive(Debug)]
pub(crate) struct FenceState {
    pub(crate) reconciler: String,
    pub(crate) key: String,
    pub(crate) token: i64,
    /// Who holds it (tokens could repeat after an asynchronous fail-over).
    pub(crate) holder: Arc<str>,
    deadline: Mutex<Instant>,
    lost: CancellationToken,
}

impl FenceState {
    fn deadline(&self) -> Instant {
        *self.deadline.lock().expect("deadline lock")
    }

    fn extend(&self, to: Instant) {
        let mut d = self.deadline.lock().expect("deadline lock");
        if to > *d {
            *d = to;
        }
    }

    /// Whether the lease can no longer be vouched for (lost, or past the local deadline).
    pub(crate) fn is_lost(&self) -> bool {
        if self.lost.is_cancelled() {
            return true;
        }
        if Instant::now() >= self.deadline() {
            self.lost.cancel();
            return true;
        }
        false
    }
}

/// A held key lease; [`release`](HeldLease::release) it, or it is released
/// in the background when dropped.
#[derive(Debug)]
pub(crate) struct HeldLease {
    pub(crate) fence: Arc<FenceState>,
    ops: mpsc::UnboundedSender<Op>,
    released: bool,
}

impl HeldLease {
    /// Releases the lease in the background (the consumer's path: the event
    /// is acknowledged without waiting for the release's round trip).
    pub(crate) fn release_later(mut self, converged: bool) {
        self.released = true;
        let _ = self.ops.send(Op::Release {
            token: self.fence.token,
            converged,
            done: None,
        });
    }

    /// Releases the lease and waits until the database took the release (or
    /// could not: the row then expires on its own), so the key is free for
    /// the next run when this returns.
    ///
    /// `converged`: the run changed the key (from the event or sweep path):
    /// the key's open dead letter, if any, is resolved in the same statement
    /// (resolution `converged`, with an audit row).
    pub(crate) async fn release(mut self, converged: bool) {
        self.released = true;
        let (done, wait) = oneshot::channel();
        if self
            .ops
            .send(Op::Release {
                token: self.fence.token,
                converged,
                done: Some(done),
            })
            .is_ok()
        {
            let _ = wait.await;
        }
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        if !self.released {
            let _ = self.ops.send(Op::Release {
                token: self.fence.token,
                converged: false,
                done: None,
            });
        }
    }
}

enum Op {
    Acquire {
        reconciler: String,
        keys: Vec<String>,
        reply: oneshot::Sender<Result<Vec<Option<HeldLease>>, LeaseFailure>>,
    },
    Release {
        token: i64,
        converged: bool,
        done: Option<oneshot::Sender<()>>,
    },
    /// Stop without releasing anything: what a crash leaves.
    Abandon,
}

/// The lease service of one part of a process.
#[derive(Clone, Debug)]
pub(crate) struct KeyLeases {
    ops: mpsc::UnboundedSender<Op>,
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Acquire { keys, .. } => write!(f, "Acquire({} keys)", keys.len()),
            Op::Release { token, .. } => write!(f, "Release({token})"),
            Op::Abandon => write!(f, "Abandon"),
        }
    }
}

/// How long a lease lasts and how early its holder stops trusting it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseTimes {
    pub(crate) ttl: Duration,
}

impl LeaseTimes {
    /// Renewals: four per lease time.
    fn renew_every(self) -> Duration {
        self.ttl / 4
    }

    /// The holder stops a quarter of the lease time before the row expires:
    /// room for a slow statement and for clocks that run at slightly
    /// different rates.
    fn trusted_for(self) -> Duration {
        self.ttl - self.ttl / 4
    }
}

impl KeyLeases {
    /// Starts the service for `holder` (who, for `converge.key_leases.holder`);
    /// it stops when the last clone and held lease are dropped, releasing
    /// what it still holds.
    pub(crate) fn start(pool: PgPool, holder: String, times: LeaseTimes) -> KeyLeases {
        let (ops, rx) = mpsc::unbounded_channel();
        tokio::spawn(serve(pool, holder, times, rx, ops.downgrade()));
        KeyLeases { ops }
    }

    /// Tries to lease each of `keys` (distinct) of `reconciler`: `None` for a
    /// key another run holds, in this process or another.
    pub(crate) async fn try_acquire(
        &self,
        reconciler: &str,
        keys: Vec<String>,
    ) -> Result<Vec<Option<HeldLease>>, LeaseFailure> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.ops
            .send(Op::Acquire {
                reconciler: reconciler.to_owned(),
                keys,
                reply,
            })
            .map_err(|_| "the key lease service stopped".to_owned())?;
        answer
            .await
            .map_err(|_| "the key lease service stopped".to_owned())?
    }

    /// Stops the service without releasing what it holds, as a crash would:
    /// the rows expire on their own. For fault tests.
    pub(crate) fn abandon(&self) {
        let _ = self.ops.send(Op::Abandon);
    }

    /// [`try_acquire`](Self::try_acquire) for one key.
    pub(crate) async fn try_acquire_one(
        &self,
        reconciler: &str,
        key: &str,
    ) -> Result<Option<HeldLease>, LeaseFailure> {
        let mut held = self.try_acquire(reconciler, vec![key.to_owned()]).await?;
        Ok(held.pop().flatten())
    }
}

struct Held {
    reconciler: String,
    key: String,
    fence: Arc<FenceState>,
}

// One grant and one release statement in flight at a time: what arrives
// meanwhile goes together into the next (batching under load), the two
// overlap each other, and renewals run apart, never waiting behind them.
/// How often the service deletes what crashes left behind.
const CLEANUP_EVERY: Duration = Duration::from_secs(300);

type Ask = (
    String,
    Vec<String>,
    oneshot::Sender<Result<Vec<Option<HeldLease>>, LeaseFailure>>,
);

/// What a statement in flight reports back to the service.
enum Done {
    Granted {
        asks: Vec<Ask>,
        rows: Result<Vec<(String, String, i64)>, sqlx::Error>,
        sent: Instant,
    },
    Released {
        leases: Vec<Unreleased>,
        ok: bool,
    },
}

async fn serve(
    pool: PgPool,
    holder: String,
    times: LeaseTimes,
    mut rx: mpsc::UnboundedReceiver<Op>,
    me: mpsc::WeakUnboundedSender<Op>,
) {
    let holder_arc: Arc<str> = Arc::from(holder.as_str());
    let mut held: HashMap<i64, Held> = HashMap::new();
    // Releases the database did not take yet (it was unreachable).
    let mut unreleased: Vec<Unreleased> = Vec::new();
    let mut in_flight: JoinSet<Done> = JoinSet::new();
    let mut renewal: Option<tokio::task::JoinHandle<()>> = None;
    let mut next_renew = Instant::now() + times.renew_every();
    let mut next_cleanup = Instant::now() + CLEANUP_EVERY;
    let mut abandoned = false;
    let mut open = true;
    let mut asks: Vec<Ask> = Vec::new();
    let (mut granting, mut releasing) = (false, false);
    while open || !in_flight.is_empty() || !asks.is_empty() {
        let mut ops = Vec::new();
        tokio::select! {
            op = rx.recv(), if open => match op {
                Some(op) => ops.push(op),
                None => open = false,
            },
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                if let Ok(done) = done {
                    match &done {
                        Done::Granted { .. } => granting = false,
                        Done::Released { .. } => releasing = false,
                    }
                    settle(done, &holder_arc, &mut held, &mut unreleased, &me, times);
                }
            }
            _ = tokio::time::sleep_until(next_renew) => {}
        }
        while open && ops.len() < 4096 {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut released_done = Vec::new();
        for op in ops {
            match op {
                Op::Release {
                    token,
                    converged,
                    done,
                } => {
                    let queued = match held.remove(&token) {
                        Some(h) => {
                            unreleased.push(Unreleased {
                                reconciler: h.reconciler,
                                key: h.key,
                                token,
                                converged,
                                done: None,
                            });
                            true
                        }
                        None => false,
                    };
                    // Answered once the release is in the database.
                    match (done, queued) {
                        (Some(done), true) => {
                            if let Some(last) = unreleased.last_mut() {
                                last.done = Some(done);
                            }
                        }
                        (Some(done), false) => released_done.push(done),
                        (None, _) => {}
                    }
                }
                Op::Acquire {
                    reconciler,
                    keys,
                    reply,
                } => asks.push((reconciler, keys, reply)),
                Op::Abandon => {
                    // A crash, for tests: leave every row to expire.
                    abandoned = true;
                    open = false;
                }
            }
        }
        for done in released_done {
            let _ = done.send(());
        }
        if abandoned {
            break;
        }
        if !unreleased.is_empty() && !releasing {
            releasing = true;
            let leases = std::mem::take(&mut unreleased);
            let (pool, holder) = (pool.clone(), holder.clone());
            in_flight.spawn(async move {
                let ok = release(&pool, &holder, &leases).await.is_ok();
                Done::Released { leases, ok }
            });
        }
        if !asks.is_empty() && !granting {
            granting = true;
            let asks = std::mem::take(&mut asks);
            let (reconcilers, keys) = to_ask(&asks, &held);
            let (pool, holder) = (pool.clone(), holder.clone());
            in_flight.spawn(async move {
                let sent = Instant::now();
                let rows = sqlx::query_as(sql::ACQUIRE)
                    .bind(&reconcilers)
                    .bind(&keys)
                    .bind(&holder)
                    .bind(times.ttl.as_millis() as i64)
                    .fetch_all(&pool)
                    .await;
                Done::Granted { asks, rows, sent }
            });
        }
        if Instant::now() >= next_renew {
            // One renewal at a time, on its own: it never waits behind a
            // grant or a release.
            if renewal.as_ref().is_none_or(|r| r.is_finished()) && !held.is_empty() {
                let snapshot: Vec<(i64, String, String, Arc<FenceState>)> = held
                    .iter()
                    .map(|(t, h)| (*t, h.reconciler.clone(), h.key.clone(), h.fence.clone()))
                    .collect();
                let (pool, holder) = (pool.clone(), holder.clone());
                renewal = Some(tokio::spawn(renew_all(pool, holder, times, snapshot)));
            }
            if Instant::now() >= next_cleanup {
                let pool = pool.clone();
                tokio::spawn(async move {
                    if let Err(error) = sqlx::query_scalar::<_, i64>(sql::CLEANUP)
                        .fetch_one(&pool)
                        .await
                    {
                        tracing::debug!(%error, "cleanup of expired key leases failed");
                    }
                });
                next_cleanup = Instant::now() + CLEANUP_EVERY;
            }
            next_renew = Instant::now() + times.renew_every();
        }
    }
    if let Some(r) = renewal {
        r.abort();
    }
    if abandoned {
        in_flight.abort_all();
        return;
    }
    // Every handle is gone: give back what is still held.
    unreleased.extend(held.drain().map(|(token, h)| Unreleased {
        reconciler: h.reconciler,
        key: h.key,
        token,
        converged: false,
        done: None,
    }));
    if !unreleased.is_empty() {
        let _ = release(&pool, &holder, &unreleased).await;
    }
}

/// The distinct (reconciler, key) pairs of `asks` not held here already.
fn to_ask(asks: &[Ask], held: &HashMap<i64, Held>) -> (Vec<String>, Vec<String>) {
    let mine: std::collections::HashSet<(&str, &str)> = held
        .values()
        .map(|h| (h.reconciler.as_str(), h.key.as_str()))
        .collect();
    let mut asked = std::collections::HashSet::new();
    let (mut reconcilers, mut keys) = (Vec::new(), Vec::new());
    for (reconciler, ks, _) in asks {
        for k in ks {
            if !mine.contains(&(reconciler.as_str(), k.as_str()))
                && asked.insert((reconciler.as_str(), k.as_str()))
            {
                reconcilers.push(reconciler.clone());
                keys.push(k.clone());
            }
        }
    }
    (reconcilers, keys)
}

/// Applies a finished statement: grants become held leases (answered to
/// their askers), failed releases are tried again.
fn settle(
    done: Done,
    holder: &Arc<str>,
    held: &mut HashMap<i64, Held>,
    unreleased: &mut Vec<Unreleased>,
    me: &mpsc::WeakUnboundedSender<Op>,
    times: LeaseTimes,
) {
    match done {
        Done::Released { mut leases, ok } => {
            // Either way the askers are answered: a failed release is tried
            // again with the next round, and expires on its own anyway.
            for lease in &mut leases {
                if let Some(done) = lease.done.take() {
                    let _ = done.send(());
                }
            }
            if !ok {
                unreleased.extend(leases);
            }
        }
        Done::Granted { asks, rows, sent } => {
            let mut granted: HashMap<(String, String), i64> = match rows {
                Ok(rows) => rows.into_iter().map(|(r, k, t)| ((r, k), t)).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot lease keys");
                    for (_, _, reply) in asks {
                        let _ = reply.send(Err(format!("key leases: {e}")));
                    }
                    return;
                }
            };
            let Some(ops) = me.upgrade() else { return };
            let deadline = sent + times.trusted_for();
            for (reconciler, ks, reply) in asks {
                let leases: Vec<Option<HeldLease>> = ks
                    .into_iter()
                    .map(|key| {
                        let token = granted.remove(&(reconciler.clone(), key.clone()))?;
                        let fence = Arc::new(FenceState {
                            reconciler: reconciler.clone(),
                            key: key.clone(),
                            token,
                            holder: holder.clone(),
                            deadline: Mutex::new(deadline),
                            lost: CancellationToken::new(),
                        });
                        held.insert(
                            token,
                            Held {
                                reconciler: reconciler.clone(),
                                key,
                                fence: fence.clone(),
                            },
                        );
                        Some(HeldLease {
                            fence,
                            ops: ops.clone(),
                            released: false,
                        })
                    })
                    .collect();
                // An asker that went away drops the leases here: they come
                // back as releases.
                let _ = reply.send(Ok(leases));
            }
        }
    }
}

async fn renew_all(
    pool: PgPool,
    holder: String,
    times: LeaseTimes,
    held: Vec<(i64, String, String, Arc<FenceState>)>,
) {
    let tokens: Vec<i64> = held.iter().map(|h| h.0).collect();
    let reconcilers: Vec<&str> = held.iter().map(|h| h.1.as_str()).collect();
    let keys: Vec<&str> = held.iter().map(|h| h.2.as_str()).collect();
    // Taken before waiting for a connection: the deadline errs early.
    let sent = Instant::now();
    let renewed: Result<Vec<i64>, sqlx::Error> = sqlx::query_scalar(sql::RENEW)
        .bind(&reconcilers)
        .bind(&keys)
        .bind(&tokens)
        .bind(times.ttl.as_millis() as i64)
        .bind(&holder)
        .fetch_all(&pool)
        .await;
    match renewed {
        Ok(tokens) => {
            let deadline = sent + times.trusted_for();
            let renewed: std::collections::HashSet<i64> = tokens.into_iter().collect();
            for (token, reconciler, key, fence) in held {
                if renewed.contains(&token) {
                    fence.extend(deadline);
                } else if !fence.lost.is_cancelled() {
                    // Expired in the database, taken over, or released by an
                    // operator (or just released here): stop the run now.
                    tracing::debug!(%reconciler, %key, token, "key lease not renewed");
                    fence.lost.cancel();
                }
            }
        }
        Err(e) => {
            // Nothing renewed: each run stops at its own deadline unless a
            // later renewal gets through first.
            tracing::warn!(error = %e, held = held.len(), "cannot renew key leases");
        }
    }
}

/// A lease to give back, and whether its run converged the key.
struct Unreleased {
    reconciler: String,
    key: String,
    token: i64,
    converged: bool,
    /// Answered once the database took the release.
    done: Option<oneshot::Sender<()>>,
}

/// Deletes the leases' rows; for the keys whose run converged them, resolves
/// the open dead letter and audits it, in the same statement.
async fn release(pool: &PgPool, holder: &str, leases: &[Unreleased]) -> Result<(), sqlx::Error> {
    let reconcilers: Vec<&str> = leases.iter().map(|l| l.reconciler.as_str()).collect();
    let keys: Vec<&str> = leases.iter().map(|l| l.key.as_str()).collect();
    let tokens: Vec<i64> = leases.iter().map(|l| l.token).collect();
    let converged: Vec<bool> = leases.iter().map(|l| l.converged).collect();
    let result = sqlx::query(sql::RELEASE)
        .bind(&reconcilers)
        .bind(&keys)
        .bind(&tokens)
        .bind(&converged)
        .bind(holder)
        .execute(pool)
        .await
        .map(|_| ());
    if let Err(e) = &result {
        tracing::warn!(error = %e, "cannot release key leases; tried again, or they expire");
    }
    result
}

/// Runs `run` while every one of `fences` holds: `None` if a lease was lost
/// (or its local deadline passed) before `run` finished, in which case `run`
/// is dropped without being polled again. The deadlines are checked before
/// every poll, so a process that was stopped (SIGSTOP, a frozen VM) past its
/// lease cannot take one more step when it resumes.
pub(crate) async fn guarded<F: Future>(fences: &[&FenceState], run: F) -> Option<F::Output> {
    let first = |fences: &[&FenceState]| fences.iter().map(|f| f.deadline()).min();
    let mut run = pin!(run);
    let start = first(fences).unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
    let mut timer = pin!(tokio::time::sleep_until(start));
    let mut lost: Vec<_> = fences
        .iter()
        .map(|f| Box::pin(f.lost.cancelled()))
        .collect();
    std::future::poll_fn(|cx| {
        if fences.iter().any(|f| f.is_lost()) {
            return Poll::Ready(None);
        }
        if let Some(deadline) = first(fences) {
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
        }
        if lost.iter_mut().any(|l| l.as_mut().poll(cx).is_ready()) {
            return Poll::Ready(None);
        }
        run.as_mut().poll(cx).map(Some)
    })
    .await
}
