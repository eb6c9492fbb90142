//! A bank worker: the relay, the transfer saga on the transfer events and on
//! a sweep over the event log, the transfers projection, and rebuilds of the
//! balances projection.

use std::sync::Arc;
use std::time::Duration;

use converge::eventsourcing::{Repository, RepositoryConfig};
use converge::sweeper::{EventCandidates, Schedule, Timing};
use converge::{RelayConfig, StreamConfig, Worker, WorkerHandle};
use sqlx::PgPool;

use crate::domain::{Account, Transfer};
use crate::error::BankError;
use crate::faults::{Faults, WithFaults};
use crate::projections::{Balances, TransferStates};
use crate::saga::{SagaStats, TransferSaga};

/// The saga's reconciler name: its consumer, sweep and leases.
pub const RECONCILER: &str = "transfers";

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The converge application.
    pub app: String,
    /// The stream (its subject prefix is its name in lower case).
    pub stream: String,
    /// This worker's instance name (default: host and process).
    pub instance: Option<String>,
    /// How often the sweep over the event log runs.
    pub sweep_every: Duration,
    /// Attempts of an event before its transfer is dead-lettered (the sweep
    /// still finishes it).
    pub max_attempts: u32,
    /// How long a relay partition's lease lasts: how soon a dead worker's
    /// partitions are taken over.
    pub relay_lease: Duration,
    /// How long a running transfer's key lease lasts: how long a dead
    /// worker's transfers stay busy.
    pub key_lease: Duration,
    /// Faults to inject.
    pub faults: Faults,
    /// What the saga did.
    pub stats: Arc<SagaStats>,
}

impl WorkerOptions {
    /// Defaults for `app` on `stream`.
    pub fn new(app: impl Into<String>, stream: impl Into<String>) -> Self {
        WorkerOptions {
            app: app.into(),
            stream: stream.into(),
            instance: None,
            sweep_every: Duration::from_secs(5),
            max_attempts: 5,
            relay_lease: Duration::from_secs(10),
            key_lease: converge::handlers::DEFAULT_KEY_LEASE,
            faults: Faults::default(),
            stats: Arc::default(),
        }
    }

    /// The stream's configuration.
    pub fn stream_config(&self) -> StreamConfig {
        StreamConfig::new(self.stream.as_str(), self.stream.to_lowercase())
    }
}

/// The account and transfer repositories every part of the bank uses:
/// accounts with the balances projection inline and a snapshot every 50
/// events.
pub async fn repositories(
    pool: &PgPool,
) -> Result<(Repository<Account>, Repository<Transfer>), BankError> {
    let mut config = RepositoryConfig::default();
    config.snapshot_every = Some(50);
    let accounts = Repository::<Account>::builder(pool.clone())
        .config(config)
        .inline(Arc::new(Balances))
        .start()
        .await?;
    let transfers = Repository::<Transfer>::builder(pool.clone())
        .start()
        .await?;
    Ok((accounts, transfers))
}

/// Transfers requested and not finished, quiet for two seconds (the event
/// path has them before that).
pub fn unfinished() -> EventCandidates {
    EventCandidates::of::<Transfer>()
        .having(["Requested"])
        .lacking(["Credited", "Refunded", "Rejected"])
        .quiet_for(Duration::from_secs(2))
        .with_backlog()
}

/// Starts a worker.
pub async fn start(
    pool: &PgPool,
    nats: &async_nats::Client,
    options: &WorkerOptions,
) -> Result<WorkerHandle, BankError> {
    let (accounts, transfers) = repositories(pool).await?;
    let saga = TransferSaga::new(accounts, transfers, options.stats.clone());
    let saga = Arc::new(WithFaults::new(saga, options.faults));
    let every = Timing::new(Schedule::fixed_rate(options.sweep_every)?);
    let mut worker = Worker::new(pool.clone(), nats.clone(), options.app.as_str());
    if let Some(instance) = &options.instance {
        worker = worker.instance_name(instance.as_str());
    }
    let mut relay = RelayConfig::new(options.stream_config());
    relay.lease_ttl = options.relay_lease;
    relay.heartbeat_interval = (options.relay_lease / 4).max(Duration::from_millis(100));
    let (max_attempts, key_lease) = (options.max_attempts.max(1), options.key_lease);
    let handle = worker
        .relay(relay)
        .projection(Arc::new(TransferStates))
        .projection_rebuilds(Arc::new(Balances))
        .reconciler(RECONCILER, saga)
        .on_aggregate::<Transfer>()
        .consumer_settings(move |c| {
            c.retry.max_attempts = max_attempts;
            c.key_lease = key_lease;
        })
        .sweep_with(every, unfinished(), |sweep| {
            // A worker dying mid-run frees the sweep within 10 s.
            sweep.lease.lock_at_most_for = Duration::from_secs(10);
            sweep.lease.heartbeat_interval = Duration::from_secs(3);
            sweep.key_lease = key_lease;
        })
        .start()
        .await?;
    Ok(handle)
}
