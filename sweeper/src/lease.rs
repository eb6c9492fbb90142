//! A cluster-wide lease per name, on the database clock.
//!
//! * `lock_at_most_for`: a holder that dies stops blocking others after this.
//! * `lock_at_least_for`: a release never frees the lease before
//!   `acquired_at + lock_at_least_for`, so a very short run still blocks other
//!   instances whose clocks or schedules lag.
//! * Heartbeats push `lock_until` forward while a long run works, so
//!   `lock_at_most_for` can stay short.
//! * Fencing: every acquisition increments `token`; writes made on behalf of
//!   a lease check it, so a holder that stalled past its lease and was taken
//!   over records nothing.

use std::time::Duration;

use sqlx::{PgExecutor, PgPool};
use tokio::time::Instant;

use crate::metrics as metrics_names;

/// Timings of a lease.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LeaseConfig {
    /// Longest a lease lasts without a heartbeat.
    pub lock_at_most_for: Duration,
    /// Shortest a lease lasts, even when released at once.
    pub lock_at_least_for: Duration,
    /// How often a running holder extends its lease.
    pub heartbeat_interval: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            lock_at_most_for: Duration::from_secs(60),
            lock_at_least_for: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(15),
        }
    }
}

impl LeaseConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval * 2 > self.lock_at_most_for
        {
            return Err(
                "lease heartbeat_interval must be non-zero and at most half of lock_at_most_for"
                    .into(),
            );
        }
        if self.lock_at_least_for > self.lock_at_most_for {
            return Err("lock_at_least_for must not exceed lock_at_most_for".into());
        }
        Ok(())
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// A held lease.
#[derive(Debug, Clone)]
pub struct Lease {
    name: String,
    holder: String,
    token: i64,
    config: LeaseConfig,
    /// After this instant (local monotonic clock) the lease may be gone.
    deadline: Instant,
}

impl Lease {
    /// Takes the lease `name` for `holder` if it is free or expired.
    pub async fn try_acquire(
        pool: &PgPool,
        name: &str,
        holder: &str,
        config: &LeaseConfig,
    ) -> Result<Option<Lease>, sqlx::Error> {
        let sent = Instant::now();
        let token: Option<i64> = sqlx::query_scalar(
            "INSERT INTO converge.leases AS l \
               (name, holder, token, acquired_at, heartbeat_at, lock_until) \
             VALUES ($1, $2, 1, now(), now(), now() + make_interval(secs => $3)) \
             ON CONFLICT (name) DO UPDATE SET \
               holder = EXCLUDED.holder, token = l.token + 1, acquired_at = now(), \
               heartbeat_at = now(), lock_until = EXCLUDED.lock_until, released_at = NULL \
             WHERE l.lock_until <= now() \
             RETURNING token",
        )
        .bind(name)
        .bind(holder)
        .bind(secs(config.lock_at_most_for))
        .fetch_optional(pool)
        .await?;
        if token.is_some() {
            metrics::counter!(metrics_names::LEASE_ACQUISITIONS, "lease" => name.to_owned())
                .increment(1);
        }
        Ok(token.map(|token| Lease {
            name: name.to_owned(),
            holder: holder.to_owned(),
            token,
            config: config.clone(),
            deadline: sent + config.lock_at_most_for,
        }))
    }

    /// Extends the lease; `false` when it was lost (expired and taken over).
    pub async fn heartbeat(&mut self, pool: &PgPool) -> Result<bool, sqlx::Error> {
        let sent = Instant::now();
        let kept = sqlx::query(
            "UPDATE converge.leases \
             SET heartbeat_at = now(), \
                 lock_until = greatest(lock_until, now() + make_interval(secs => $3)) \
             WHERE name = $1 AND token = $2",
        )
        .bind(&self.name)
        .bind(self.token)
        .bind(secs(self.config.lock_at_most_for))
        .execute(pool)
        .await?
        .rows_affected()
            == 1;
        if kept {
            self.deadline = sent + self.config.lock_at_most_for;
        } else {
            metrics_names::count_lease_loss(&self.name);
        }
        Ok(kept)
    }

    /// Releases the lease, but never before `acquired_at + lock_at_least_for`.
    pub async fn release(self, pool: &PgPool) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE converge.leases \
             SET lock_until = greatest(now(), acquired_at + make_interval(secs => $3)), \
                 released_at = now() \
             WHERE name = $1 AND token = $2",
        )
        .bind(&self.name)
        .bind(self.token)
        .bind(secs(self.config.lock_at_least_for))
        .execute(pool)
        .await?;
        Ok(())
    }

    /// Whether the lease is still this holder's, on the database clock.
    pub async fn is_held<'e>(&self, executor: impl PgExecutor<'e>) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM converge.leases \
                            WHERE name = $1 AND token = $2 AND lock_until > now())",
        )
        .bind(&self.name)
        .bind(self.token)
        .fetch_one(executor)
        .await
    }

    /// Whether the local monotonic clock still vouches for the lease: false
    /// once `lock_at_most_for` has passed since the last successful renewal
    /// (a stalled process that wakes up must stop before doing anything).
    pub fn locally_valid(&self) -> bool {
        Instant::now() < self.deadline
    }

    /// When this holder stops vouching for the lease (its own clock), unless
    /// a heartbeat moves it.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The fencing token.
    pub fn token(&self) -> i64 {
        self.token
    }

    /// The lease's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The holder.
    pub fn holder(&self) -> &str {
        &self.holder
    }
}
