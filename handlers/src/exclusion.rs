//! What a reconciler sees of its key's exclusion: the fencing token, fenced
//! writes, and idempotency keys for external side effects.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::ReconcileError;
use crate::reconciler::Context;

/// The run's key lease is gone: it expired before it could be renewed, or
/// another run (or an operator) took the key; or, for a sweep's run, the
/// sweep instance it runs for lost the sweep's lease. Retryable: the key is tried
/// again once it is free, by whoever holds it then.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the exclusion of key {key:?} of {reconciler} (token {token}) is lost: its lease (or, for \
     a sweep's run, the sweep's lease) is no longer held and another run may hold the key now, \
     so this run must not write; it is tried again later"
)]
#[non_exhaustive]
pub struct ExclusionLost {
    /// The reconciler.
    pub reconciler: String,
    /// The key.
    pub key: String,
    /// The fencing token the run held.
    pub token: i64,
}

impl ExclusionLost {
    /// The lost exclusion behind `error`, if that is what it is.
    pub fn in_error(error: &ReconcileError) -> Option<&ExclusionLost> {
        error.source_error().downcast_ref::<ExclusionLost>()
    }
}

impl From<ExclusionLost> for ReconcileError {
    fn from(lost: ExclusionLost) -> Self {
        ReconcileError::retryable(lost)
    }
}

/// A context used outside a run ([`run_key`](crate::run_key), the consumer, a
/// sweep) has no key lease, so it has no fence and no idempotency keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what} needs a run: call the reconciler through run_key, a Consumer or a Sweeper, \
     not directly"
)]
#[non_exhaustive]
pub struct NotInRun {
    /// What was asked for.
    pub what: &'static str,
}

impl Context {
    fn lost_error(&self, fence: &crate::lease::FenceState) -> ReconcileError {
        ReconcileError::from(ExclusionLost {
            reconciler: fence.reconciler.clone(),
            key: fence.key.clone(),
            token: fence.token,
        })
    }

    /// The fencing token of this run's key lease: larger for every later
    /// holder of any key. `None` outside a run. Pass it to a service that
    /// can refuse writes from older tokens, or use [`check_fence`](Self::check_fence)
    /// for writes to this database.
    pub fn fencing_token(&self) -> Option<i64> {
        self.fence.as_ref().map(|f| f.token)
    }

    /// Whether this run's key lease is lost (see [`ExclusionLost`]). The run
    /// is stopped at its next `.await` anyway; this is for loops that want to
    /// stop between steps without awaiting.
    pub fn exclusion_lost(&self) -> bool {
        self.fence.as_ref().is_some_and(|f| f.is_lost())
    }

    /// Fences the caller's transaction: succeeds only while this run still
    /// holds its key's lease, and keeps a takeover of the key waiting until
    /// the transaction ends (a `FOR KEY SHARE` lock on the lease's row). Call
    /// it in the transaction that records the run's effect, e.g. before
    /// [`StateMachine::transition_to`](crate::StateMachine::transition_to):
    /// if the lease was lost, the transaction writes nothing and the run
    /// fails with [`ExclusionLost`] (retryable). A sweep's runs are also
    /// fenced by the sweep's lease: the check fails if, when it runs, the
    /// sweep instance they run for no longer holds it at its token. Unlike
    /// the key's lease, a takeover of the sweep is not held back until the
    /// transaction ends (the key's lease is what keeps runs of a key apart).
    /// Under REPEATABLE READ, a change to either lease committed after the
    /// transaction's snapshot fails the check with a serialization error
    /// (retryable) instead of passing on the old row.
    ///
    /// ```no_run
    /// # use converge_handlers::{Context, ReconcileError};
    /// # async fn record(ctx: &Context, key: &str) -> Result<(), ReconcileError> {
    /// let mut tx = ctx.pool().begin().await?;
    /// ctx.check_fence(&mut tx).await?;
    /// sqlx::query("UPDATE orders SET state = 'INVOICED' WHERE id = $1::bigint")
    ///     .bind(key)
    ///     .execute(&mut *tx)
    ///     .await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// Outside a run (a context built by hand and passed to `reconcile`
    /// directly) there is no lease to check and this returns `Ok`; in
    /// [`reconcile_batch`](crate::Reconciler::reconcile_batch) it fails with
    /// [`NotInRun`] (a page holds one lease per key).
    pub async fn check_fence(&self, conn: &mut PgConnection) -> Result<(), ReconcileError> {
        let Some(fence) = &self.fence else {
            if self.batch {
                // A page holds a lease per key: nothing here could vouch
                // for all of them in one transaction.
                return Err(ReconcileError::permanent(NotInRun {
                    what: "check_fence in reconcile_batch (leases are per key: fence \
                           writes in reconcile, or return None from reconcile_batch)",
                }));
            }
            return Ok(());
        };
        let lost = || self.lost_error(fence);
        if fence.is_lost() {
            return Err(lost());
        }
        let sweep = self.sweep_lease.as_ref();
        let (sweep_name, sweep_holder, sweep_token) = (
            sweep.map(|l| &*l.name),
            sweep.map(|l| &*l.holder),
            sweep.map(|l| l.token),
        );
        let held: bool = sqlx::query_scalar(
            "WITH k AS ( \
                 SELECT 1 FROM converge.key_leases \
                 WHERE reconciler = $1 AND key = $2 AND token = $3 AND holder = $4 \
                   AND expires_at > clock_timestamp() \
                 FOR KEY SHARE), \
                  s AS ( \
                 SELECT 1 FROM converge.leases \
                 WHERE $5::text IS NOT NULL AND name = $5 AND holder = $6 AND token = $7 \
                   AND lock_until > clock_timestamp() \
                 FOR KEY SHARE) \
             SELECT EXISTS (SELECT 1 FROM k) \
                AND ($5::text IS NULL OR EXISTS (SELECT 1 FROM s))",
        )
        .bind(&fence.reconciler)
        .bind(&fence.key)
        .bind(fence.token)
        .bind(&*fence.holder)
        .bind(sweep_name)
        .bind(sweep_holder)
        .bind(sweep_token)
        .fetch_one(&mut *conn)
        .await?;
        // Checked again after the row lock: the local deadline may have
        // passed while the statement waited.
        if !held || fence.is_lost() {
            return Err(lost());
        }
        Ok(())
    }

    /// The idempotency key of `step` of this run's key — what an API such as
    /// Stripe's takes in an `Idempotency-Key` header.
    ///
    /// The same for every run of the step until it is completed with
    /// [`complete_step`](Self::complete_step): retries, redeliveries, sweeps,
    /// operators' runs and a run resuming an expired claim all send the same
    /// key, so a target that honours it applies the step once however often
    /// it is called. After the step is completed, the next occurrence of the
    /// step (the key going through it again) gets a new key. The key is
    /// stored (committed) before it is returned, so a crash right after the
    /// call cannot lose it.
    ///
    /// At-least-once execution, exactly-once effect, on these conditions: the
    /// reconcile checks the key's state before the call (a completed step is
    /// not called again), completes the step in the transaction that records
    /// the effect, and the target keeps keys at least as long as a step can
    /// take to complete (including retries and dead letters retried later).
    pub async fn idempotency_key(&self, step: &str) -> Result<Uuid, ReconcileError> {
        let fence = self.fence.as_ref().ok_or_else(|| {
            ReconcileError::permanent(NotInRun {
                what: "an idempotency key",
            })
        })?;
        if fence.is_lost() {
            return Err(self.lost_error(fence));
        }
        // Only while this run holds the key: a stalled run whose step was
        // completed by another must not mint a new key and call again.
        let key: Option<Uuid> = sqlx::query_scalar(
            "WITH held AS ( \
                 SELECT 1 FROM converge.key_leases \
                 WHERE reconciler = $1 AND key = $2 AND token = $4 AND holder = $5 \
                   AND expires_at > clock_timestamp()) \
             INSERT INTO converge.step_keys AS s (reconciler, key, step, idempotency_key) \
             SELECT $1, $2, $3, gen_random_uuid() FROM held \
             ON CONFLICT (reconciler, key, step) DO UPDATE SET step = excluded.step \
             RETURNING idempotency_key",
        )
        .bind(&fence.reconciler)
        .bind(&fence.key)
        .bind(step)
        .bind(fence.token)
        .bind(&*fence.holder)
        .fetch_optional(self.pool())
        .await?;
        let key = key.ok_or_else(|| self.lost_error(fence))?;
        if fence.is_lost() {
            return Err(self.lost_error(fence));
        }
        Ok(key)
    }

    /// Completes `step` of this run's key in the caller's transaction (the
    /// one that records the step's effect): its next occurrence gets a new
    /// [`idempotency_key`](Self::idempotency_key). A no-op when the step has
    /// no open key.
    pub async fn complete_step(
        &self,
        conn: &mut PgConnection,
        step: &str,
    ) -> Result<(), ReconcileError> {
        let fence = self.fence.as_ref().ok_or_else(|| {
            ReconcileError::permanent(NotInRun {
                what: "completing a step",
            })
        })?;
        sqlx::query(
            "DELETE FROM converge.step_keys WHERE reconciler = $1 AND key = $2 AND step = $3",
        )
        .bind(&fence.reconciler)
        .bind(&fence.key)
        .bind(step)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}
