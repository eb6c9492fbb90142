//! Named rate limits that reconcilers acquire before they call a rate-limited
//! resource: in-process (governor), a per-instance share of a cluster rate, or
//! cluster-wide through Postgres. See [`RateLimits`] for the semantics.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sqlx::PgPool;

/// A rate: `count` calls per `per`, with up to `burst` calls at once after an
/// idle period.
///
/// The limiters use the GCRA ("leaky bucket as a meter"): one call per
/// [`interval`](Rate::interval) (`per / count`), and a caller that was idle may
/// spend up to `burst` calls at once. In any window of length `per`, at most
/// [`max_per_window`](Rate::max_per_window) = `count + burst − 1` calls are
/// allowed: with the default burst of 1, exactly `count`.
///
/// ```
/// use std::time::Duration;
/// use converge_handlers::Rate;
///
/// const IDENTITY_API: Rate = Rate::per_second(2);
/// assert_eq!(IDENTITY_API.interval(), Duration::from_millis(500));
/// assert_eq!(Rate::per_minute(100).with_burst(10).max_per_window(), 109);
/// assert_eq!(Rate::new(5, Duration::from_secs(10)).to_string(), "5 per 10s, burst 1");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    count: NonZeroU32,
    per: Duration,
    burst: NonZeroU32,
}

impl Rate {
    /// `count` calls per `per`, burst 1.
    ///
    /// # Panics
    ///
    /// If `count` is 0 or `per` is zero (also at compile time in a `const`).
    pub const fn new(count: u32, per: Duration) -> Rate {
        let count = match NonZeroU32::new(count) {
            Some(count) => count,
            None => panic!("a rate needs a count of at least 1"),
        };
        assert!(!per.is_zero(), "a rate needs a non-zero period");
        Rate {
            count,
            per,
            burst: NonZeroU32::MIN,
        }
    }

    /// `count` calls per second, burst 1. Panics if `count` is 0.
    pub const fn per_second(count: u32) -> Rate {
        Rate::new(count, Duration::from_secs(1))
    }

    /// `count` calls per minute, burst 1. Panics if `count` is 0.
    pub const fn per_minute(count: u32) -> Rate {
        Rate::new(count, Duration::from_secs(60))
    }

    /// `count` calls per hour, burst 1. Panics if `count` is 0.
    pub const fn per_hour(count: u32) -> Rate {
        Rate::new(count, Duration::from_secs(3600))
    }

    /// The same rate, allowing up to `burst` calls at once after an idle period.
    ///
    /// A burst above 1 lets more than `count` calls into a window of `per`
    /// (see [`max_per_window`](Rate::max_per_window)): keep it at 1 when the
    /// resource enforces its limit per window.
    ///
    /// # Panics
    ///
    /// If `burst` is 0.
    pub const fn with_burst(self, burst: u32) -> Rate {
        let burst = match NonZeroU32::new(burst) {
            Some(burst) => burst,
            None => panic!("a rate needs a burst of at least 1"),
        };
        Rate { burst, ..self }
    }

    /// Calls per period.
    pub const fn count(&self) -> u32 {
        self.count.get()
    }

    /// The period.
    pub const fn per(&self) -> Duration {
        self.per
    }

    /// Calls allowed at once after an idle period.
    pub const fn burst(&self) -> u32 {
        self.burst.get()
    }

    /// The emission interval `per / count`: the spacing of calls once the
    /// burst is spent. Rounded up to the nanosecond, so the limiters never run
    /// faster than the rate.
    pub const fn interval(&self) -> Duration {
        let per = self.per.as_nanos();
        let count = self.count.get() as u128;
        let nanos = per.div_ceil(count);
        let secs = nanos / 1_000_000_000;
        let secs = if secs > u64::MAX as u128 {
            u64::MAX
        } else {
            secs as u64
        };
        Duration::new(secs, (nanos % 1_000_000_000) as u32)
    }

    /// The most calls the rate allows in any window of length `per`:
    /// `count + burst − 1`.
    pub const fn max_per_window(&self) -> u32 {
        self.count.get().saturating_add(self.burst.get() - 1)
    }

    /// One instance's share of this cluster-wide rate when `instances` run:
    /// `count` per `instances × per`, burst `max(1, burst / instances)`.
    ///
    /// # Panics
    ///
    /// If `instances` is 0.
    pub fn share(self, instances: u32) -> Rate {
        assert!(instances > 0, "a rate cannot be shared among 0 instances");
        let per = self
            .per
            .checked_mul(instances)
            .expect("rate period × instances overflows a Duration");
        let burst = NonZeroU32::new(self.burst.get() / instances).unwrap_or(NonZeroU32::MIN);
        Rate {
            count: self.count,
            per,
            burst,
        }
    }

    /// The governor quota of this rate.
    fn quota(&self) -> Quota {
        Quota::with_period(self.interval())
            .expect("a rate's interval is never zero")
            .allow_burst(self.burst)
    }

    /// The interval in whole microseconds (Postgres' resolution), rounded up.
    fn interval_micros(&self) -> Option<i64> {
        i64::try_from(self.interval().as_nanos().div_ceil(1_000)).ok()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} per {:?}, burst {}", self.count, self.per, self.burst)
    }
}

/// Why [`RateLimits::acquire`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RateLimitError {
    /// No limiter has this name: a configuration error.
    #[error("unknown rate limiter `{name}` (known: {})", known_list(.known))]
    Unknown {
        /// The name asked for.
        name: String,
        /// The names configured, sorted.
        known: Vec<String>,
    },
    /// The Postgres limiter's statement failed.
    #[error("rate limiter `{name}`: database error: {source}")]
    Database {
        /// The limiter.
        name: String,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },
}

fn known_list(known: &[String]) -> String {
    if known.is_empty() {
        "none configured".to_owned()
    } else {
        known.join(", ")
    }
}

impl RateLimitError {
    /// Whether trying again later can succeed: a lost connection or a pool
    /// time-out can, an unknown limiter cannot.
    pub fn is_retryable(&self) -> bool {
        match self {
            RateLimitError::Unknown { .. } => false,
            RateLimitError::Database { source, .. } => converge_outbox::is_retryable_sqlx(source),
        }
    }
}

/// Named rate limiters that reconcilers acquire before they call a
/// rate-limited resource.
///
/// Build the set once at start-up and hand it to every path of the process
/// (the fast-path consumer, the sweeps, operator runs): they all acquire the
/// same limiter by name, so together they never exceed its rate. Clones are
/// cheap and share the limiters.
///
/// ```no_run
/// use converge_handlers::{Rate, RateLimits};
///
/// # async fn run(pool: sqlx::PgPool) -> Result<(), converge_handlers::RateLimitError> {
/// let limits = RateLimits::new()
///     // in this process only
///     .local("geocoder", Rate::per_second(10).with_burst(5))
///     // this instance's third of a cluster-wide 30 per minute
///     .local_share("mailer", Rate::per_minute(30), 3)
///     // cluster-wide, through Postgres
///     .postgres("identity-api", Rate::per_second(2), pool);
///
/// limits.acquire("identity-api").await?; // now call the identity API
/// # Ok(()) }
/// ```
///
/// # What a limiter limits
///
/// A limiter spaces the moments at which [`acquire`](RateLimits::acquire)
/// returns: one per [`Rate::interval`], up to [`Rate::burst`] at once after an
/// idle period, so at most [`Rate::max_per_window`] (`count + burst − 1`) in any
/// window of length `per`. Waiters are not served in a strict order. A caller
/// that is held up between `acquire` and its call (descheduled, a slow network)
/// can land closer to the next caller than the limiter spaced them: keep some
/// headroom under a limit the resource enforces strictly.
///
/// Acquire *before* opening a transaction: waiting inside one holds a
/// connection, and an open transaction holds the relay back.
///
/// # Several instances
///
/// A resource's limit is usually cluster-wide, and a deployment runs several
/// processes. With `N` processes running the same configuration:
///
/// | limiter | calls to the resource, cluster-wide | cost of an acquire |
/// |---|---|---|
/// | [`local`](RateLimits::local) | up to `N × rate` | none (memory) |
/// | [`local_share`](RateLimits::local_share) (configured for `n`) | `N/n × rate`: the rate only while exactly `n` run | none (memory) |
/// | [`postgres`](RateLimits::postgres) | `rate`, whatever `N` | one statement |
///
/// * `local` suits limits that are per client or per process (a connection
///   cap, a courtesy limit), or a deployment of one process.
/// * `local_share` divides a cluster rate statically. Fewer instances than
///   configured under-use the limit; more (a rolling deploy, a scale-out)
///   exceed it. It needs no coordination and keeps working when the database
///   is down.
/// * `postgres` is exact across any number of processes that use the same
///   database and limiter name, and follows scale-outs and crashes without
///   configuration. Each acquire costs one round trip (fine at the rates of
///   external APIs; not meant for thousands per second), and acquires fail
///   while the database is unreachable (a retryable error).
#[derive(Clone, Default)]
pub struct RateLimits {
    limiters: Arc<BTreeMap<String, Arc<Limiter>>>,
}

struct Limiter {
    rate: Rate,
    kind: Kind,
}

enum Kind {
    Local(DefaultDirectRateLimiter),
    Share {
        cluster: Rate,
        instances: u32,
        limiter: DefaultDirectRateLimiter,
    },
    Postgres {
        pool: PgPool,
        interval_us: i64,
        burst_us: i64,
    },
}

/// One acquire of a Postgres limiter: reserve the next slot and return how
/// many microseconds remain until it.
///
/// GCRA with emission interval `T` ($2) and burst `b` (`$3 = b × T`), on the
/// database clock: `tat' = max(tat, now) + T`, the caller's slot is
/// `tat' − b × T`, and it waits `max(0, slot − now)`. The upsert locks the row,
/// so concurrent callers on any instance get distinct slots. `clock_timestamp()`
/// (not `now()`, the statement's start) is read after the row lock, so time
/// spent waiting for the lock is not counted twice.
const POSTGRES_ACQUIRE: &str = "\
INSERT INTO converge.rate_limits AS r (name, tat, updated_at)
VALUES ($1, clock_timestamp() + $2::bigint * interval '1 microsecond', clock_timestamp())
ON CONFLICT (name) DO UPDATE
SET tat = greatest(r.tat, clock_timestamp()) + $2::bigint * interval '1 microsecond',
    updated_at = clock_timestamp()
RETURNING greatest(0, ceil(extract(epoch FROM r.tat - clock_timestamp()) * 1000000)::bigint - $3::bigint)";

impl RateLimits {
    /// No limiters yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// An in-process limiter (governor's GCRA): every path in this process
    /// shares it, other processes do not see it — `N` processes together call
    /// up to `N × rate`.
    ///
    /// # Panics
    ///
    /// If `name` is already configured.
    pub fn local(self, name: &str, rate: Rate) -> Self {
        let limiter = RateLimiter::direct(rate.quota());
        self.insert(
            name,
            Limiter {
                rate,
                kind: Kind::Local(limiter),
            },
        )
    }

    /// An in-process limiter at this instance's share of a cluster-wide rate:
    /// [`cluster_rate.share(instances)`](Rate::share), i.e. `count` per
    /// `instances × per`, burst `max(1, burst / instances)`.
    ///
    /// The cluster stays within `cluster_rate` only while exactly `instances`
    /// processes run it; `M` processes together call `M / instances ×
    /// cluster_rate`. Even then, when `count` is not a multiple of `instances`
    /// (or `burst` is below `instances`), the instances' slots can line up so
    /// that a window of `per` sees up to `instances − 1` calls more than
    /// `cluster_rate` allows; the sustained rate is exact. Use
    /// [`postgres`](RateLimits::postgres) for an exact cluster-wide limit.
    ///
    /// # Panics
    ///
    /// If `instances` is 0 or `name` is already configured.
    pub fn local_share(self, name: &str, cluster_rate: Rate, instances: u32) -> Self {
        let rate = cluster_rate.share(instances);
        let limiter = RateLimiter::direct(rate.quota());
        let kind = Kind::Share {
            cluster: cluster_rate,
            instances,
            limiter,
        };
        self.insert(name, Limiter { rate, kind })
    }

    /// A cluster-wide limiter kept in Postgres: exact across any number of
    /// processes that use `pool`'s database.
    ///
    /// The limiter is the row `name` of `converge.rate_limits`, holding the
    /// GCRA's "theoretical arrival time" on the database clock. Each acquire is
    /// one atomic upsert that reserves the caller's slot and returns the time
    /// left until it; the caller then sleeps without holding a connection.
    /// Concurrent callers, in this process or any other, get distinct slots.
    ///
    /// * Every process that uses the same database and `name` shares the
    ///   limit; configure the same `rate` everywhere (each acquire spaces the
    ///   next slot by its own caller's interval).
    /// * Time is the database's clock; the caller's clock only measures the
    ///   wait, so clock skew between hosts does not matter.
    /// * A caller that gives up while waiting (its future dropped) leaves its
    ///   slot unused: the limit errs on the safe side.
    /// * Resolution is one microsecond (the interval is rounded up).
    ///
    /// # Panics
    ///
    /// If `name` is already configured, or `burst × interval` does not fit in
    /// microseconds of an `i64`.
    pub fn postgres(self, name: &str, rate: Rate, pool: PgPool) -> Self {
        let interval_us = rate
            .interval_micros()
            .expect("rate interval too long for the Postgres limiter");
        let burst_us = interval_us
            .checked_mul(i64::from(rate.burst()))
            .expect("rate burst × interval too long for the Postgres limiter");
        let kind = Kind::Postgres {
            pool,
            interval_us,
            burst_us,
        };
        self.insert(name, Limiter { rate, kind })
    }

    fn insert(mut self, name: &str, limiter: Limiter) -> Self {
        let limiters = Arc::make_mut(&mut self.limiters);
        assert!(
            !limiters.contains_key(name),
            "rate limiter `{name}` is configured twice"
        );
        limiters.insert(name.to_owned(), Arc::new(limiter));
        self
    }

    /// Waits until the limiter `name` allows one call.
    ///
    /// Cancel-safe: dropping the future gives up the wait (a Postgres
    /// limiter's reserved slot then goes unused).
    ///
    /// # Errors
    ///
    /// [`RateLimitError::Unknown`] (naming the configured limiters) if there is
    /// no limiter `name`; [`RateLimitError::Database`] if a Postgres limiter's
    /// statement fails (see [`RateLimitError::is_retryable`]).
    pub async fn acquire(&self, name: &str) -> Result<(), RateLimitError> {
        let limiter = self
            .limiters
            .get(name)
            .ok_or_else(|| RateLimitError::Unknown {
                name: name.to_owned(),
                known: self.names(),
            })?;
        let started = tokio::time::Instant::now();
        match &limiter.kind {
            Kind::Local(limiter) | Kind::Share { limiter, .. } => limiter.until_ready().await,
            Kind::Postgres {
                pool,
                interval_us,
                burst_us,
            } => {
                let wait_us: i64 = sqlx::query_scalar(POSTGRES_ACQUIRE)
                    .bind(name)
                    .bind(interval_us)
                    .bind(burst_us)
                    .fetch_one(pool)
                    .await
                    .map_err(|source| RateLimitError::Database {
                        name: name.to_owned(),
                        source,
                    })?;
                if let Ok(wait_us @ 1..) = u64::try_from(wait_us) {
                    let wait = Duration::from_micros(wait_us);
                    tracing::trace!(limiter = name, ?wait, "rate limit: waiting for the slot");
                    tokio::time::sleep(wait).await;
                }
            }
        }
        metrics::histogram!(crate::metrics::RATE_LIMIT_WAIT, "limiter" => name.to_owned())
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The configured limiter names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.limiters.keys().cloned().collect()
    }

    /// The rate of limiter `name` in this process (for
    /// [`local_share`](RateLimits::local_share), this instance's share).
    pub fn rate(&self, name: &str) -> Option<Rate> {
        self.limiters.get(name).map(|l| l.rate)
    }
}

impl fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.limiters.iter().map(|(n, l)| (n, &**l)))
            .finish()
    }
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Local(_) => write!(f, "local({})", self.rate),
            Kind::Share {
                cluster, instances, ..
            } => {
                write!(f, "local_share({}; 1/{instances} of {cluster})", self.rate)
            }
            Kind::Postgres { .. } => write!(f, "postgres({})", self.rate),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn rate_arithmetic() {
        let r = Rate::per_second(2);
        assert_eq!(
            (r.count(), r.per(), r.burst()),
            (2, Duration::from_secs(1), 1)
        );
        assert_eq!(r.interval(), Duration::from_millis(500));
        assert_eq!(r.max_per_window(), 2);
        assert_eq!(Rate::per_minute(100).interval(), Duration::from_millis(600));
        assert_eq!(Rate::per_hour(1).interval(), Duration::from_secs(3600));
        // Rounded up, never faster than the rate.
        assert_eq!(
            Rate::per_second(3).interval(),
            Duration::from_nanos(333_333_334)
        );
        assert_eq!(
            Rate::new(3, Duration::from_nanos(1)).interval(),
            Duration::from_nanos(1)
        );
        let big = Rate::new(1, Duration::MAX);
        assert_eq!(big.interval(), Duration::MAX);
        assert_eq!(big.interval_micros(), None);
        // Burst.
        let b = Rate::per_minute(100).with_burst(10);
        assert_eq!((b.burst(), b.max_per_window()), (10, 109));
        assert_eq!(b.interval(), Duration::from_millis(600));
        assert_eq!(
            Rate::new(u32::MAX, Duration::from_secs(1))
                .with_burst(2)
                .max_per_window(),
            u32::MAX
        );
        // Postgres resolution: microseconds, rounded up.
        assert_eq!(Rate::per_second(2).interval_micros(), Some(500_000));
        assert_eq!(Rate::per_second(3).interval_micros(), Some(333_334));
        assert_eq!(Rate::per_second(10_000_000).interval_micros(), Some(1));
        // Governor quota.
        let q = Rate::per_second(4).with_burst(3).quota();
        assert_eq!(q.replenish_interval(), Duration::from_millis(250));
        assert_eq!(q.burst_size().get(), 3);
        assert_eq!(Rate::per_second(2).to_string(), "2 per 1s, burst 1");
    }

    #[test]
    fn shares() {
        let s = Rate::per_second(4).share(2);
        assert_eq!(
            (s.count(), s.per(), s.burst()),
            (4, Duration::from_secs(2), 1)
        );
        assert_eq!(s.interval(), Duration::from_millis(500));
        assert_eq!(Rate::per_second(6).with_burst(4).share(2).burst(), 2);
        assert_eq!(Rate::per_second(6).with_burst(2).share(3).burst(), 1);
        assert_eq!(
            Rate::per_second(2).share(3).interval(),
            Duration::from_millis(1500)
        );
        assert_eq!(Rate::per_second(2).share(1), Rate::per_second(2));
    }

    #[test]
    #[should_panic(expected = "count of at least 1")]
    fn zero_count_panics() {
        let _ = Rate::per_second(0);
    }

    #[test]
    #[should_panic(expected = "non-zero period")]
    fn zero_period_panics() {
        let _ = Rate::new(1, Duration::ZERO);
    }

    #[test]
    #[should_panic(expected = "burst of at least 1")]
    fn zero_burst_panics() {
        let _ = Rate::per_second(1).with_burst(0);
    }

    #[test]
    #[should_panic(expected = "0 instances")]
    fn zero_instances_panics() {
        let _ = RateLimits::new().local_share("x", Rate::per_second(1), 0);
    }

    #[test]
    #[should_panic(expected = "configured twice")]
    fn duplicate_name_panics() {
        let _ = RateLimits::new()
            .local("x", Rate::per_second(1))
            .local("x", Rate::per_second(2));
    }

    #[test]
    fn names_rates_and_debug() {
        let limits = RateLimits::new()
            .local("b", Rate::per_second(2))
            .local_share("a", Rate::per_second(6), 3);
        assert_eq!(limits.names(), ["a", "b"]);
        assert_eq!(limits.rate("a"), Some(Rate::new(6, Duration::from_secs(3))));
        assert_eq!(limits.rate("c"), None);
        assert_eq!(
            format!("{limits:?}"),
            "{\"a\": local_share(6 per 3s, burst 1; 1/3 of 6 per 1s, burst 1), \
             \"b\": local(2 per 1s, burst 1)}"
        );
    }

    #[tokio::test]
    async fn unknown_limiter() {
        let err = RateLimits::new().acquire("x").await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown rate limiter `x` (known: none configured)"
        );
        let limits = RateLimits::new()
            .local("b", Rate::per_second(1))
            .local("a", Rate::per_second(1));
        let err = limits.acquire("c").await.unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(err.to_string(), "unknown rate limiter `c` (known: a, b)");
        assert!(
            matches!(err, RateLimitError::Unknown { name, known } if name == "c" && known == ["a", "b"])
        );
    }

    #[tokio::test]
    async fn clones_share_the_local_limiter() {
        let limits = RateLimits::new().local("x", Rate::per_second(50).with_burst(2));
        let other = limits.clone().local("y", Rate::per_second(1)); // adding keeps "x" shared
        let start = Instant::now();
        for i in 0..6 {
            let l = if i % 2 == 0 { &limits } else { &other };
            l.acquire("x").await.unwrap();
        }
        // 2 at once, then 4 more 20 ms apart.
        assert!(
            start.elapsed() >= Duration::from_millis(79),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(limits.names(), ["x"]);
    }
}
