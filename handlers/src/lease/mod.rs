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

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The default time a key lease lasts without renewal: how long a crashed
/// holder's keys stay busy.
pub const DEFAULT_KEY_LEASE: Duration = Duration::from_secs(20);

/// A small pool of its own for a long-lived lease service (a consumer's):
/// grants, renewals and releases never wait for a connection the
/// reconciles use, and give up on a row lock after 2 s instead of stalling.
///
/// Its grants, renewals and releases look keys up one by one in the primary
/// key: the lease table holds few live rows and, between vacuums, many dead
/// ones, so the planner's estimates favour hash joins over sequential scans
/// that read every dead row of the table on each grant (seen in the handlers
/// benchmark: a fifth of PostgreSQL's time). The session settings below
/// (cost penalties, which the cleanup lifts for its own scan) apply to these
/// connections only.
pub(crate) fn dedicated_pool(pool: &PgPool) -> LeasePool {
    // Read once: the options the pool is made on are the ones it compares.
    let options = pool.connect_options();
    LeasePool {
        pool: dedicated_on(&options),
        parent: Some((pool.clone(), options)),
    }
}

/// The dedicated pool itself, on `options`.
fn dedicated_on(options: &sqlx::postgres::PgConnectOptions) -> PgPool {
    use sqlx::Executor;
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .min_connections(0)
        .idle_timeout(Duration::from_secs(60))
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute(
                    "SET lock_timeout = '2s'; SET enable_seqscan = off; \
                     SET enable_hashjoin = off; SET enable_mergejoin = off",
                )
                .await?;
                Ok(())
            })
        })
        .connect_lazy_with(options.clone())
}

/// The pool a lease service runs its statements on: the caller's, or a
/// [`dedicated_pool`] that follows the caller's pool to another host when
/// that one's connect options change (a fail-over followed by
/// `converge::postgres::PgConnect`).
pub(crate) struct LeasePool {
    pool: PgPool,
    parent: Option<(PgPool, Arc<sqlx::postgres::PgConnectOptions>)>,
}

impl LeasePool {
    /// Statements on `pool` itself.
    pub(crate) fn shared(pool: PgPool) -> LeasePool {
        LeasePool { pool, parent: None }
    }

    /// The pool to use now. When its parent's connect options changed since
    /// it last looked, a dedicated pool is replaced by one on the new
    /// options: its idle connections may be on a server that no longer takes
    /// writes (a switchover leaves the old primary up, read-only). The old
    /// pool closes once its statements in flight return.
    pub(crate) fn current(&mut self) -> &PgPool {
        if let Some((parent, seen)) = &mut self.parent {
            let now = parent.connect_options();
            if !Arc::ptr_eq(&now, seen) {
                let old = std::mem::replace(&mut self.pool, dedicated_on(&now));
                *seen = now;
                tokio::spawn(async move { old.close().await });
            }
        }
        &self.pool
    }
}

mod service;
/// The lease statements, shared with the benchmark harness.
#[doc(hidden)]
pub mod sql;

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
    pub(crate) fn start(pool: LeasePool, holder: String, times: LeaseTimes) -> KeyLeases {
        let (ops, rx) = mpsc::unbounded_channel();
        tokio::spawn(service::serve(pool, holder, times, rx, ops.downgrade()));
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
