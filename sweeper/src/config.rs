//! A sweep's definition: name, schedule and policies.

use std::time::Duration;

use converge_handlers::RetryPolicy;

use crate::lease::LeaseConfig;
use crate::schedule::Timing;

/// What happens when a trigger arrives while the sweep runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Overlap {
    /// Ignore the trigger (the seed's AtomicBoolean).
    #[default]
    Skip,
    /// Run once more after the current run; further triggers coalesce into it.
    Queue,
    /// Cancel the current run (it records itself as superseded) and start anew.
    Replace,
}

/// Settings of one sweep.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SweepConfig {
    /// The sweep's name: its lease, schedule row and run history.
    pub name: String,
    /// The reconciler's name. Use the name its [`Consumer`](converge_handlers::Consumer)
    /// runs under: the per-key lock is shared by that name, so a sweep and the
    /// event path never run a key at the same moment.
    pub reconciler: String,
    /// When the sweep fires.
    pub timing: Timing,
    /// Keys read per candidate page (leased together; each key's lease is
    /// released as soon as its key is done). At most [`MAX_BATCH_SIZE`].
    pub batch_size: i64,
    /// Keys of a page reconciled at once.
    pub concurrency: usize,
    /// Most keys visited in one run; the next run continues where it stopped.
    pub max_keys_per_run: Option<u64>,
    /// Longest a run may take; the next run continues where it stopped.
    pub max_run_time: Option<Duration>,
    /// What a trigger does while the sweep runs.
    pub overlap: Overlap,
    /// The cluster-wide lease.
    pub lease: LeaseConfig,
    /// Retries of a failing key within a run, then its dead letter.
    pub retry: RetryPolicy,
    /// How long the recover hook waits for a key's lease.
    pub lock_wait: Duration,
    /// How long a running key's lease lasts between renewals (see
    /// [`Context::with_key_lease`](converge_handlers::Context::with_key_lease)).
    pub key_lease: Duration,
}

/// The largest `batch_size`: a page's keys are leased in one statement.
pub const MAX_BATCH_SIZE: i64 = 10_000;

impl SweepConfig {
    /// A sweep `name` running reconciler `reconciler` on `timing`, other settings default.
    pub fn new(name: impl Into<String>, reconciler: impl Into<String>, timing: Timing) -> Self {
        let mut retry = RetryPolicy::default();
        retry.max_attempts = 3;
        retry.max_backoff = Duration::from_secs(5);
        SweepConfig {
            name: name.into(),
            reconciler: reconciler.into(),
            timing,
            batch_size: 500,
            concurrency: 8,
            max_keys_per_run: None,
            max_run_time: None,
            overlap: Overlap::Skip,
            lease: LeaseConfig::default(),
            retry,
            lock_wait: Duration::from_secs(5),
            key_lease: converge_handlers::DEFAULT_KEY_LEASE,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.reconciler.is_empty() {
            return Err("a sweep needs a name and a reconciler name".into());
        }
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            return Err(format!(
                "sweep {}: batch_size is {}; it must be between 1 and {MAX_BATCH_SIZE} \
                 (a page's keys are leased in one statement; use max_keys_per_run to \
                 bound a run instead)",
                self.name, self.batch_size
            ));
        }
        if self.key_lease < Duration::from_secs(1) {
            return Err(format!(
                "sweep {}: key_lease must be at least 1 s",
                self.name
            ));
        }
        if self.concurrency == 0 {
            return Err(format!(
                "sweep {}: concurrency must be at least 1",
                self.name
            ));
        }
        if self.retry.max_attempts == 0 {
            return Err(format!(
                "sweep {}: retry.max_attempts must be at least 1",
                self.name
            ));
        }
        self.lease
            .validate()
            .map_err(|e| format!("sweep {}: {e}", self.name))
    }
}
