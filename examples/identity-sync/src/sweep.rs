//! The sweep: PENDING changed records, every five minutes from 22:00 to 05:55
//! Melbourne time, under the cluster lease.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Australia::Melbourne;
use chrono_tz::Tz;
use converge::handlers::RetryPolicy;
use converge::sweeper::{
    CronSchedule, Schedule, SqlCandidates, SweepConfig, SweepError, Sweeper, SweeperHandle, Timing,
};
use sqlx::PgPool;

use crate::reconciler::{limits, IdentitySync};

/// The sweep's name (its lease, schedule row and run history).
pub const SWEEP: &str = "identity-sync";

/// The reconciler's name (its per-key locks and dead letters).
pub const RECONCILER: &str = "identity-sync";

/// Every five minutes from 22:00 to 05:55, the seed's out-of-hours window.
pub const CRON: &str = "0 */5 22-23,0-5 * * *";

/// The zone whose wall clock [`CRON`] is read on.
pub const ZONE: Tz = Melbourne;

/// The convergence figure: records still to sync, and since when the oldest waits.
pub const BACKLOG: &str = "SELECT count(*), min(changed_at) FROM identity_sync.changed_records \
                           WHERE state = 'PENDING'";

/// The PENDING changed records, keyset-paginated by user id.
pub const CANDIDATES: &str = "SELECT user_id::text AS key FROM identity_sync.changed_records \
     WHERE state = 'PENDING' AND ($1::text IS NULL OR user_id > $1::bigint) \
     ORDER BY user_id LIMIT $2";

/// The production schedule: [`CRON`] in [`ZONE`].
pub fn schedule() -> CronSchedule {
    CronSchedule::parse(CRON, ZONE).expect("the identity-sync cron expression is valid")
}

/// The next `count` fire times strictly after `after`.
pub fn next_runs(after: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
    schedule().upcoming(after).take(count).collect()
}

/// `<Melbourne time> <UTC>`, both RFC 3339 to the second, e.g.
/// `2026-11-23T22:00:00+11:00 2026-11-23T11:00:00Z`.
pub fn format_fire_time(at: DateTime<Utc>) -> String {
    format!(
        "{} {}",
        at.with_timezone(&ZONE)
            .to_rfc3339_opts(SecondsFormat::Secs, true),
        at.to_rfc3339_opts(SecondsFormat::Secs, true)
    )
}

/// The retries of a failing record within a run (exponential backoff with
/// jitter, never sooner than a `Retry-After`), then the recover hook.
pub fn retry_policy() -> RetryPolicy {
    let mut retry = RetryPolicy::default();
    retry.max_attempts = 4;
    retry.initial_backoff = Duration::from_millis(500);
    retry.max_backoff = Duration::from_secs(10);
    retry
}

/// The sweep's settings: the production schedule, pages of 100, 4 calls
/// waiting on the limiter at once, [`retry_policy`].
pub fn sweep_config() -> SweepConfig {
    let mut config = SweepConfig::new(SWEEP, RECONCILER, Timing::new(Schedule::Cron(schedule())));
    config.batch_size = 100;
    config.concurrency = 4;
    config.retry = retry_policy();
    config
}

/// Starts a sweeper running `config` with the [`IdentitySync`] reconciler and
/// the example's [`limits`].
pub async fn start_sweeper(
    pool: PgPool,
    config: SweepConfig,
    reconciler: IdentitySync,
) -> Result<SweeperHandle, SweepError> {
    Sweeper::new(pool)
        .instance_name(format!("identity-sync-{}", std::process::id()))
        .with_limits(limits())
        .shutdown_timeout(Duration::from_secs(10))
        .sweep(config, SqlCandidates::new(CANDIDATES), Arc::new(reconciler))
        .start()
        .await
}
