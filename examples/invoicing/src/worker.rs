//! Building the converge [`Worker`] that invoices orders: the relay (outbox →
//! JetStream), the `invoicing` consumer on `OrderShipped` events, the
//! `invoices` sweep, and the control plane — all driving one
//! [`InvoiceReconciler`].

use std::sync::Arc;
use std::time::Duration;

use converge::sweeper::{KeyType, LeaseConfig, Schedule, SqlCandidates, Timing};
use converge::{RelayConfig, StreamConfig, Worker, WorkerHandle};
use sqlx::PgPool;

use crate::domain::OrderShipped;
use crate::error::InvoicingError;
use crate::faults::{Faults, WithFaults};
use crate::reconciler::{InvoiceReconciler, ReconcileStats, RECONCILER_NAME};

/// The sweep's name: its schedule row, lease and run history.
pub const SWEEP_NAME: &str = "invoices";

/// The sweep's convergence figure: orders still to invoice, and since when.
pub const BACKLOG_SQL: &str = "SELECT count(*)::bigint, min(shipped_at) FROM invoicing.orders \
                               WHERE state IN ('SHIPPED', 'INVOICING')";

/// The stream and its subject prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamNames {
    /// The JetStream stream, e.g. `ORDERS`.
    pub stream: String,
    /// The subject prefix: the stream's name in lower case, e.g. `orders`.
    pub subject_prefix: String,
    /// Replicas of the stream when a worker creates it (1 unless
    /// [`StreamNames::with_replicas`] says otherwise).
    pub replicas: u8,
}

impl StreamNames {
    /// The names for `stream` (letters, digits, `_` and `-`); the subject
    /// prefix is its lower case.
    pub fn new(stream: &str) -> Result<Self, InvoicingError> {
        let ok = !stream.is_empty()
            && stream
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
        if !ok {
            return Err(InvoicingError::InvalidArgument {
                option: "--stream",
                message: format!(
                    "{stream:?} is not a stream name: use ASCII letters, digits, '_' and '-', e.g. ORDERS"
                ),
            });
        }
        Ok(StreamNames {
            stream: stream.to_owned(),
            subject_prefix: stream.to_ascii_lowercase(),
            replicas: 1,
        })
    }

    /// The same names, for a stream created with `replicas` replicas.
    pub fn with_replicas(mut self, replicas: u8) -> Self {
        self.replicas = replicas;
        self
    }

    /// The stream's configuration (other settings default).
    pub fn config(&self) -> StreamConfig {
        let mut config = StreamConfig::new(&self.stream, &self.subject_prefix);
        config.replicas = usize::from(self.replicas);
        config
    }

    /// The subject of `OrderShipped` events, e.g. `orders.order.OrderShipped`.
    pub fn order_shipped_subject(&self) -> String {
        self.config().subject_of::<OrderShipped>()
    }
}

/// When the sweep runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SweepTiming {
    /// At a fixed rate, and once at start-up (the demo: every few seconds).
    Every(Duration),
    /// On a cron schedule with seconds in an IANA time zone, e.g.
    /// `0 0 2 * * *` in `Europe/Berlin` (production: nightly).
    Cron {
        /// The expression (6 or 7 fields).
        expression: String,
        /// The IANA zone name.
        time_zone: String,
    },
}

impl SweepTiming {
    /// The sweeper's [`Timing`].
    pub fn timing(&self) -> Result<Timing, InvoicingError> {
        Ok(match self {
            SweepTiming::Every(period) => {
                Timing::new(Schedule::fixed_rate(*period)?).with_run_at_startup(true)
            }
            SweepTiming::Cron {
                expression,
                time_zone,
            } => {
                let tz = converge::sweeper::time_zone(time_zone)?;
                Timing::new(Schedule::cron(expression, tz)?)
            }
        })
    }
}

/// Everything a worker needs besides its connections.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The converge application name (control subject `converge.control.<app>`).
    pub app: String,
    /// This instance's name; `None`: converge's default (`<hostname>-<pid>`).
    pub instance: Option<String>,
    /// The stream.
    pub stream: StreamNames,
    /// Faults to inject.
    pub faults: Faults,
    /// When the sweep runs.
    pub sweep: SweepTiming,
    /// How old an `INVOICING` claim must be before it is resumed.
    pub claim_lease: Duration,
    /// Attempts of an event before it is dead-lettered (the sweep still
    /// converges the order later).
    pub max_attempts: u32,
    /// Where the reconciler counts what it did.
    pub stats: Arc<ReconcileStats>,
    /// How long a relay partition lease lasts (how soon a dead worker's
    /// partitions are taken over).
    pub relay_lease: Duration,
    /// The billing service each order is charged through before it is
    /// invoiced; `None`: no charge.
    pub billing: Option<crate::billing::BillingClient>,
    /// How long a running order's key lease lasts between renewals.
    pub key_lease: Duration,
}

impl WorkerOptions {
    /// Defaults: sweep every 10 s, claims expire after 60 s, 5 attempts, no faults.
    pub fn new(app: impl Into<String>, stream: StreamNames) -> Self {
        WorkerOptions {
            app: app.into(),
            instance: None,
            stream,
            faults: Faults::NONE,
            sweep: SweepTiming::Every(Duration::from_secs(10)),
            claim_lease: Duration::from_secs(60),
            max_attempts: 5,
            stats: Arc::default(),
            relay_lease: Duration::from_secs(10),
            billing: None,
            key_lease: converge::handlers::DEFAULT_KEY_LEASE,
        }
    }
}

/// The sweep's candidates: `SHIPPED` orders and `INVOICING` orders whose claim
/// is older than `claim_lease`, in keyset pages by id.
pub fn sweep_candidates(claim_lease: Duration) -> SqlCandidates {
    SqlCandidates::new(format!(
        "SELECT id::text AS key FROM invoicing.orders \
         WHERE (state = 'SHIPPED' \
                OR (state = 'INVOICING' AND (claimed_at IS NULL \
                    OR claimed_at < statement_timestamp() - make_interval(secs => {lease})))) \
           AND ($1::text IS NULL OR id > $1::bigint) \
         ORDER BY id LIMIT $2",
        lease = claim_lease.as_secs_f64()
    ))
    .with_key_type(KeyType::BigInt)
    .with_backlog(BACKLOG_SQL)
}

/// Starts a worker (the schemas must be migrated: [`crate::schema::migrate`]).
#[tracing::instrument(skip(pool, nats, options), fields(app = %options.app), err)]
pub async fn start(
    pool: &PgPool,
    nats: &async_nats::Client,
    options: &WorkerOptions,
) -> Result<WorkerHandle, InvoicingError> {
    if options.claim_lease.is_zero() {
        return Err(InvoicingError::InvalidArgument {
            option: "--claim-lease",
            message: "must be longer than zero seconds".into(),
        });
    }
    let mut reconciler =
        InvoiceReconciler::new(options.claim_lease).with_stats(options.stats.clone());
    if let Some(billing) = &options.billing {
        reconciler = reconciler.with_billing(billing.clone());
    }
    // The faults are injected around the reconciler, not in it.
    let reconciler = Arc::new(WithFaults::new(
        reconciler,
        options.faults,
        options.stats.clone(),
    ));
    let mut relay = RelayConfig::new(options.stream.config());
    relay.lease_ttl = options.relay_lease;
    relay.heartbeat_interval = (options.relay_lease / 4).max(Duration::from_millis(100));
    let (max_attempts, key_lease) = (options.max_attempts.max(1), options.key_lease);

    let mut worker = Worker::new(pool.clone(), nats.clone(), options.app.as_str());
    if let Some(instance) = &options.instance {
        worker = worker.instance_name(instance.as_str());
    }
    // One registration: the `invoicing` consumer on `OrderShipped` events and
    // the `invoices` sweep drive one reconciler under one name.
    let handle = worker
        .relay(relay)
        .shutdown_timeout(Duration::from_secs(10))
        .reconciler(RECONCILER_NAME, reconciler)
        .on::<OrderShipped>()
        .consumer_settings(move |consumer| {
            consumer.retry.max_attempts = max_attempts;
            consumer.key_lease = key_lease;
        })
        .sweep_with(
            options.sweep.timing()?,
            sweep_candidates(options.claim_lease),
            |sweep| {
                sweep.name = SWEEP_NAME.to_owned();
                // A worker that dies mid-run frees the sweep within 10 s;
                // heartbeats keep a long run exclusive.
                let mut lease = LeaseConfig::default();
                lease.lock_at_most_for = Duration::from_secs(10);
                lease.heartbeat_interval = Duration::from_secs(3);
                sweep.lease = lease;
                sweep.key_lease = key_lease;
            },
        )
        .start()
        .await?;
    Ok(handle)
}

/// Starts a worker ([`start`]), trying again for up to `within` while the
/// failure is transient ([`converge::WorkerError::is_retryable`]: the
/// database restarting, connections cut, NATS unreachable): a worker started
/// during a fail-over should not exit. Configuration errors fail at once.
pub async fn start_retrying(
    pool: &PgPool,
    nats: &async_nats::Client,
    options: &WorkerOptions,
    within: Duration,
) -> Result<WorkerHandle, InvoicingError> {
    let deadline = tokio::time::Instant::now() + within;
    let mut pause = Duration::from_millis(200);
    loop {
        match start(pool, nats, options).await {
            Err(InvoicingError::Worker(e))
                if e.is_retryable() && tokio::time::Instant::now() + pause < deadline =>
            {
                tracing::warn!(error = %e, retry_in = ?pause, "the worker did not start; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_derive_the_prefix() {
        let names = StreamNames::new("ORDERS").unwrap();
        assert_eq!(names.subject_prefix, "orders");
        assert_eq!(names.order_shipped_subject(), "orders.order.OrderShipped");
        for bad in ["", "OR.DERS", "OR DERS", "ORDERS>", "*"] {
            let e = StreamNames::new(bad).unwrap_err();
            assert!(e.to_string().contains("--stream"), "{e}");
        }
    }

    #[test]
    fn timings_are_checked() {
        assert!(SweepTiming::Every(Duration::from_secs(10)).timing().is_ok());
        let nightly = SweepTiming::Cron {
            expression: "0 0 2 * * *".into(),
            time_zone: "Europe/Berlin".into(),
        };
        assert!(nightly.timing().is_ok());
        let bad_zone = SweepTiming::Cron {
            expression: "0 0 2 * * *".into(),
            time_zone: "Europe/Nowhere".into(),
        };
        assert!(bad_zone.timing().is_err());
        assert!(SweepTiming::Every(Duration::ZERO).timing().is_err());
    }
}
