//! The relay: publishes committed outbox events to NATS JetStream.
//!
//! # How it stays correct
//!
//! * **Commit order, no skipped rows.** Rows are read per partition in
//!   `(tx_order, id)` order and only below the xmin of the reading snapshot, so
//!   a row whose transaction commits late is never jumped over (see the first
//!   migration). Progress is a cursor per partition, written once per batch.
//! * **One owner per partition.** The 32 partitions are leased to relay
//!   instances on the database clock and shared evenly among the live ones; a
//!   dead instance's partitions are taken over once its lease expires. Cursor
//!   writes are fenced by the lease epoch, and an instance stops publishing a
//!   partition as soon as its own monotonic clock says the lease may be gone.
//! * **Per-aggregate order.** Within a batch, an aggregate's next event is sent
//!   only after the previous one was acknowledged; other aggregates are
//!   pipelined. A failure stops the batch, and the cursor only moves over the
//!   acknowledged prefix of each partition.
//! * **Exactly once on the stream.** `Nats-Msg-Id` is the event id; what is
//!   re-sent after a crash or a hand-over falls inside the duplicate window.
//! * **No poison row.** An event the server can never accept (too large, an
//!   invalid subject token, an undecodable row written by SQL around the API)
//!   is recorded in `converge.relay_rejects` and stepped over; it stays in the
//!   outbox.
//! * **Nothing forgotten.** An acknowledged batch whose cursor write failed
//!   is remembered and written before the next read, however long the
//!   database is away.
//! * **Supervised.** A publisher that panics is restarted; a relay that
//!   cannot reach NATS for `handover_after` hands its partitions to the others.
//! * **One cluster, one timeline.** Reads and cursor writes check that the
//!   database is the cluster (and timeline) the cursors belong to; after a
//!   restore or cut-over to another cluster the relay re-bases the outbox
//!   before publishing (see `converge.outbox_clock`), after a fail-over it
//!   reads its cursors again.

mod cleanup;
mod fetch;
mod held_back;
mod lease;
mod listen;
mod message;
mod publish;
mod record;
mod supervise;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::append::DEFAULT_MAX_EVENT_BYTES;
use crate::clock::Clock;
use crate::error::RelayError;
use crate::stream::{ensure_stream, StreamConfig};

pub use held_back::{holding_transaction, HoldingTransaction};

/// How long published events stay in the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Retention {
    /// Keep every event: the outbox is the application's event store.
    #[default]
    Forever,
    /// Delete published events stored longer ago than this (by the time the
    /// appending transaction stored them, not their `occurred_at`). Every
    /// published event may go, an aggregate's latest included: versions live
    /// in the aggregate's head and never restart.
    For(Duration),
}

/// Settings of a [`Relay`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayConfig {
    /// The stream to publish to.
    pub stream: StreamConfig,
    /// A readable name for this instance in `converge.relay_instances`.
    /// Empty (the default): `<hostname>-<pid>`, chosen by [`Relay::new`]; a
    /// [`Worker`](https://docs.rs/converge) uses its own instance name, and
    /// refuses to start if this one is set to another.
    pub instance_name: String,
    /// Most events read and published in one round trip (spread over the
    /// owned partitions).
    pub batch_size: usize,
    /// Most payload bytes kept from one read (at least one event is kept
    /// whatever its size): bounds the relay's memory. Reads also ask for
    /// fewer events per partition as events grow, so large events are not
    /// read by the thousand to keep a budget's worth.
    pub max_batch_bytes: usize,
    /// Longest wait between two reads when no notification arrives.
    pub poll_interval: Duration,
    /// How long a partition lease lasts without renewal (database clock).
    pub lease_ttl: Duration,
    /// How often leases are renewed and partitions rebalanced.
    pub heartbeat_interval: Duration,
    /// How long to wait for a JetStream acknowledgement.
    pub publish_timeout: Duration,
    /// Largest delay between retries after NATS or Postgres errors.
    pub max_backoff: Duration,
    /// Largest event the relay expects; the server's `max_payload` must allow it.
    pub max_event_bytes: usize,
    /// How long published events are kept.
    pub retention: Retention,
    /// How often retention cleanup runs.
    pub cleanup_interval: Duration,
    /// Rows deleted per cleanup statement (short transactions, no long locks).
    pub cleanup_batch: usize,
    /// How long [`RelayHandle::shutdown`] waits for the in-flight batch.
    pub shutdown_timeout: Duration,
    /// How long publishing may keep failing (NATS unreachable from this
    /// instance, acknowledgements timing out) before the instance hands its
    /// partitions to the other relays and stops claiming until it can reach
    /// NATS again.
    pub handover_after: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            stream: StreamConfig::default(),
            instance_name: String::new(),
            batch_size: 2_000,
            max_batch_bytes: 16 * 1024 * 1024,
            poll_interval: Duration::from_millis(500),
            lease_ttl: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(2),
            publish_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(5),
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            retention: Retention::Forever,
            cleanup_interval: Duration::from_secs(60),
            cleanup_batch: 1_000,
            shutdown_timeout: Duration::from_secs(10),
            handover_after: Duration::from_secs(30),
        }
    }
}

impl RelayConfig {
    /// Default settings publishing to `stream`.
    pub fn new(stream: StreamConfig) -> Self {
        RelayConfig {
            stream,
            ..Default::default()
        }
    }

    fn validate(&self) -> Result<(), RelayError> {
        let bad = |what: &str| Err(RelayError::Config(what.to_owned()));
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1");
        }
        if self.max_batch_bytes == 0 {
            return bad("max_batch_bytes must be at least 1");
        }
        if self.handover_after < self.publish_timeout {
            return bad("handover_after must be at least publish_timeout: one unanswered publish must not hand partitions over");
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval * 2 > self.lease_ttl {
            return bad("heartbeat_interval must be non-zero and at most half of lease_ttl, so a lease is renewed at least twice before it expires");
        }
        if self.poll_interval.is_zero() || self.publish_timeout.is_zero() {
            return bad("poll_interval and publish_timeout must be non-zero");
        }
        if self.cleanup_batch == 0 || self.cleanup_interval.is_zero() {
            return bad("cleanup_batch and cleanup_interval must be non-zero");
        }
        if let Retention::For(d) = self.retention {
            if d.is_zero() {
                return bad(
                    "Retention::For needs a non-zero period; use Retention::Forever to keep events",
                );
            }
        }
        Ok(())
    }

    /// How long after a first publish a re-publish can still happen.
    fn republish_horizon(&self) -> Duration {
        self.lease_ttl + self.publish_timeout
    }
}

fn default_instance_name() -> String {
    let host = crate::host_name().unwrap_or_else(|| "relay".to_owned());
    format!("{host}-{}", std::process::id())
}

/// A partition this instance holds.
#[derive(Debug, Clone)]
pub(crate) struct Owned {
    pub(crate) epoch: i64,
    pub(crate) cursor: (i64, i64),
    /// After this instant the lease may have expired: publish nothing more.
    pub(crate) deadline: tokio::time::Instant,
    /// The heartbeat asked the publisher to hand this partition back.
    pub(crate) release: bool,
}

/// State shared by the relay's tasks.
pub(crate) struct Shared {
    pub(crate) pool: PgPool,
    pub(crate) js: jetstream::Context,
    pub(crate) config: RelayConfig,
    pub(crate) instance_id: Uuid,
    pub(crate) owned: Mutex<std::collections::BTreeMap<i32, Owned>>,
    pub(crate) wake: Notify,
    pub(crate) cancel: CancellationToken,
    /// The NATS client, for its connection state and the server's limits.
    pub(crate) client: async_nats::Client,
    /// The stream's `max_msg_size` (0: none), read when the stream is checked.
    pub(crate) stream_max_msg_size: std::sync::atomic::AtomicUsize,
    /// The cluster the outbox's order belongs to, as last checked.
    pub(crate) clock: Mutex<Clock>,
    /// Whether this instance can publish, and since when it cannot.
    pub(crate) health: Mutex<Health>,
    /// Fault injection for drills and tests: the publisher panics once.
    pub(crate) panic_once: AtomicBool,
    /// Published progress whose write failed, written before any new read
    /// (kept here so that a restarted publisher writes it too).
    pending: Mutex<Option<record::Progress>>,
    /// When the last heartbeat reached the database.
    pub(crate) last_heartbeat: Mutex<Option<tokio::time::Instant>>,
    /// Until then, claim only partitions nobody holds (after an outage).
    pub(crate) claim_others_after: Mutex<Option<tokio::time::Instant>>,
}

/// Whether an instance can publish.
#[derive(Debug, Default)]
pub(crate) struct Health {
    /// Publishing has failed continuously since then.
    pub(crate) failing_since: Option<tokio::time::Instant>,
    /// The instance handed its partitions over (then) and claims none until
    /// NATS answers again, and not before `handover_after` has passed.
    pub(crate) handed_over: Option<tokio::time::Instant>,
}

impl Shared {
    /// The largest message the server and the stream accept now.
    pub(crate) fn message_limit(&self) -> usize {
        let server = self.client.server_info().max_payload;
        let stream = self
            .stream_max_msg_size
            .load(std::sync::atomic::Ordering::Relaxed);
        match (server, stream) {
            (0, 0) => self.config.max_event_bytes,
            (0, s) => s,
            (m, 0) => m,
            (m, s) => m.min(s),
        }
    }

    /// Publishing failed: remembers since when.
    pub(crate) fn publish_failed(&self) {
        let mut h = self.health.lock().expect("relay health lock");
        h.failing_since
            .get_or_insert_with(tokio::time::Instant::now);
    }

    /// Publishing worked.
    pub(crate) fn publish_succeeded(&self) {
        self.health.lock().expect("relay health lock").failing_since = None;
    }
}

/// Publishes outbox events to JetStream; start it with [`Relay::start`].
///
/// Run one per process (or several: they share the partitions). It needs its
/// own connections: size the pool for two or three beyond the application's.
pub struct Relay {
    pool: PgPool,
    client: async_nats::Client,
    config: RelayConfig,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay reading `pool`'s outbox and publishing through `client`.
    pub fn new(pool: PgPool, client: async_nats::Client, mut config: RelayConfig) -> Self {
        if config.instance_name.is_empty() {
            config.instance_name = default_instance_name();
        }
        Relay {
            pool,
            client,
            config,
        }
    }

    /// Checks the configuration, the schema and this role's privileges
    /// ([`converge_schema::check`]; it never migrates), creates or checks the
    /// stream, registers this instance and starts publishing.
    #[tracing::instrument(skip(self), fields(stream = %self.config.stream.name, instance = %self.config.instance_name), err)]
    pub async fn start(self) -> Result<RelayHandle, RelayError> {
        let config = self.config;
        config.validate()?;
        converge_schema::check(&self.pool, converge_schema::Role::Worker).await?;
        let mut max_payload = self.client.server_info().max_payload;
        if max_payload == 0 {
            // Not connected yet (a client built with retry_on_initial_connect):
            // a flush waits for the server, whose INFO carries max_payload.
            let connected = tokio::time::timeout(config.publish_timeout, self.client.flush()).await;
            max_payload = self.client.server_info().max_payload;
            if max_payload == 0 {
                let reason = match connected {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {:?}", config.publish_timeout),
                };
                return Err(RelayError::JetStream {
                    operation: "connect",
                    source: format!("the NATS client is not connected ({reason}): check NATS_URL and that nats-server runs with -js").into(),
                });
            }
        }
        if max_payload < config.max_event_bytes {
            return Err(RelayError::Config(format!(
                "the NATS server accepts messages up to {max_payload} bytes (max_payload) but \
                 RelayConfig::max_event_bytes is {}: raise max_payload on the server or lower \
                 max_event_bytes (and OutboxConfig::max_event_bytes)",
                config.max_event_bytes
            )));
        }
        let js = jetstream::ContextBuilder::new()
            .timeout(config.publish_timeout)
            .max_ack_inflight(config.batch_size.max(256) * 2)
            .build(self.client.clone());
        let stream_max_msg_size = ensure_stream(
            &js,
            &config.stream,
            config.republish_horizon(),
            config.max_event_bytes,
        )
        .await?;
        let clock = crate::clock::check(&self.pool).await?;

        let instance_id = Uuid::now_v7();
        let first_lease_ends = tokio::time::Instant::now() + config.lease_ttl;
        let shared = Arc::new(Shared {
            pool: self.pool,
            js,
            config,
            instance_id,
            owned: Mutex::new(Default::default()),
            wake: Notify::new(),
            cancel: CancellationToken::new(),
            client: self.client,
            stream_max_msg_size: stream_max_msg_size.into(),
            clock: Mutex::new(clock),
            health: Mutex::default(),
            panic_once: AtomicBool::new(false),
            pending: Mutex::new(None),
            last_heartbeat: Mutex::new(None),
            // For its first lease a relay takes only partitions nobody holds:
            // an owner cut off with everyone (PostgreSQL down) gets to write
            // what it published before anyone sends it again.
            claim_others_after: Mutex::new(Some(first_lease_ends)),
        });
        lease::register(&shared).await?;
        // Take a first share before publishing, so a lone relay starts at once.
        if let Err(error) = lease::tick(&shared).await {
            tracing::warn!(%error, "first partition claim failed; retrying on the next heartbeat");
        }
        let supervisor = tokio::spawn(supervise::supervise(shared.clone()));
        tracing::info!(instance_id = %instance_id, "relay started");
        Ok(RelayHandle {
            shared,
            supervisor: Some(supervisor),
        })
    }
}

/// A running relay. Call [`shutdown`](RelayHandle::shutdown) to stop it; dropping
/// the handle also asks the tasks to stop, without waiting for them.
#[derive(Debug)]
pub struct RelayHandle {
    shared: Arc<Shared>,
    supervisor: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// One retention pass as the relay's cleanup runs it: deletes published
    /// events older than `period`, `batch` rows per transaction. Returns the
    /// rows deleted. For benchmarks and operators' drills; a relay with
    /// [`Retention::For`] runs it every `cleanup_interval`.
    #[doc(hidden)]
    pub async fn retention_pass(
        pool: &PgPool,
        period: Duration,
        batch: usize,
    ) -> Result<u64, RelayError> {
        Ok(cleanup::delete_expired(pool, period, batch, || false).await?)
    }
}

impl RelayHandle {
    /// This instance's id in `converge.relay_instances`.
    pub fn instance_id(&self) -> Uuid {
        self.shared.instance_id
    }

    /// Partitions this instance holds right now.
    pub fn partitions(&self) -> Vec<i32> {
        self.shared
            .owned
            .lock()
            .expect("relay state lock")
            .keys()
            .copied()
            .collect()
    }

    /// Stops reading, lets the in-flight batch finish (acknowledged events are
    /// recorded, the rest stay unpublished), hands the partitions back and
    /// deregisters the instance, all within `shutdown_timeout`.
    #[tracing::instrument(skip(self), fields(instance_id = %self.shared.instance_id), err)]
    pub async fn shutdown(mut self) -> Result<(), RelayError> {
        self.shared.cancel.cancel();
        let mut supervisor = self
            .supervisor
            .take()
            .expect("the supervisor is present until shutdown");
        let timeout = self.shared.config.shutdown_timeout;
        let drained = tokio::time::timeout(timeout, &mut supervisor).await;
        if drained.is_err() {
            // Aborting the supervisor drops its task set, which aborts the tasks.
            supervisor.abort();
            let _ = supervisor.await;
        }
        lease::deregister(&self.shared).await?;
        match drained {
            Ok(_) => Ok(()),
            Err(_) => Err(RelayError::ShutdownTimedOut(timeout)),
        }
    }

    /// Stops every task at once without handing anything back: what a crash
    /// (SIGKILL, a lost node) looks like to the other instances, which take the
    /// partitions over once the leases expire. For fault tests and drills.
    pub async fn kill(mut self) {
        if let Some(supervisor) = self.supervisor.take() {
            supervisor.abort();
            let _ = supervisor.await;
        }
    }

    /// Makes the publisher panic once, at its next loop: what a bug in it
    /// looks like. The relay restarts it. For fault tests and drills.
    #[doc(hidden)]
    pub fn inject_publisher_panic(&self) {
        self.shared
            .panic_once
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        if self.supervisor.take().is_some() {
            // Not shut down: ask the tasks to stop and let them finish on their own.
            self.shared.cancel.cancel();
        }
    }
}
