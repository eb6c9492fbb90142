//! The lease service's loop: grants, releases and renewals against the
//! database, for the [`KeyLeases`](super::KeyLeases) handles of one part.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{sql, FenceState, HeldLease, LeaseFailure, LeasePool, LeaseTimes, Op};

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

pub(super) async fn serve(
    mut pools: LeasePool,
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
        let pool = pools.current().clone();
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
                    if let Err(error) = cleanup(&pool).await {
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
        let _ = release(pools.current(), &holder, &unreleased).await;
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

/// Deletes what crashes left behind. A scan by expiry, not a lookup by key:
/// the plan settings of a dedicated lease pool are lifted for it.
async fn cleanup(pool: &PgPool) -> Result<i64, sqlx::Error> {
    use sqlx::Executor;
    let mut tx = pool.begin().await?;
    tx.execute(
        "SET LOCAL enable_seqscan = on; SET LOCAL enable_hashjoin = on; \
         SET LOCAL enable_mergejoin = on",
    )
    .await?;
    let deleted = sqlx::query_scalar(sql::CLEANUP).fetch_one(&mut *tx).await?;
    tx.commit().await?;
    Ok(deleted)
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
