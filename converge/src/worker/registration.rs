//! One registration per reconciler: its name, the events that hint at its
//! keys and its sweeps, so the consumer, the sweeps and operators' runs share
//! one name (and so one lease per key) by construction.

use std::sync::Arc;

use converge_handlers::{ConsumerConfig, Reconciler};
use converge_outbox::{Event, RelayConfig, StreamConfig};
use converge_sweeper::{Candidates, SweepConfig, Timing};

use super::{Worker, WorkerError, WorkerHandle};

/// A consumer setting applied after converge derives the configuration.
pub(super) type ConsumerSettings = Box<dyn FnOnce(&mut ConsumerConfig) + Send>;

/// A reconciler being registered on a [`Worker`]: say which events hint at
/// its keys ([`on`](Registration::on)) and when it sweeps
/// ([`sweep`](Registration::sweep)); everything takes the registration's one
/// name. Finish with [`start`](Registration::start), another
/// [`reconciler`](Registration::reconciler), or [`done`](Registration::done).
///
/// ```no_run
/// # use std::sync::Arc;
/// # use converge::handlers::{Context, Outcome, ReconcileError, Reconciler};
/// # #[derive(serde::Serialize)] struct PaymentCaptured { id: i64 }
/// # impl converge::Event for PaymentCaptured {
/// #     const AGGREGATE_TYPE: &'static str = "payment";
/// #     const EVENT_TYPE: &'static str = "PaymentCaptured";
/// #     fn aggregate_id(&self) -> String { self.id.to_string() }
/// # }
/// # struct Mailer;
/// # impl Reconciler for Mailer {
/// #     async fn reconcile(&self, _: &Context, _: &str) -> Result<Outcome, ReconcileError> { Ok(Outcome::Unchanged) }
/// # }
/// use converge::sweeper::{Schedule, SqlCandidates, Timing};
/// use converge::{RelayConfig, StreamConfig, Worker};
///
/// # async fn run(pool: sqlx::PgPool, nats: async_nats::Client) -> Result<(), Box<dyn std::error::Error>> {
/// let every_minute = Timing::new(Schedule::fixed_rate(std::time::Duration::from_secs(60))?);
/// let unsent = SqlCandidates::keyset("payments", "id", converge::sweeper::KeyType::BigInt, "receipt_sent_at IS NULL");
/// let worker = Worker::new(pool, nats, "payments")
///     .relay(RelayConfig::new(StreamConfig::new("PAYMENTS", "payments")))
///     .reconciler("receipt-mailer", Arc::new(Mailer))
///     .on::<PaymentCaptured>() // consumer `receipt-mailer` on payments.payment.PaymentCaptured
///     .sweep(every_minute, unsent) // sweep `receipt-mailer`, same reconciler, same leases
///     .start()
///     .await?;
/// # Ok(()) }
/// ```
#[must_use = "a registration does nothing until it is done or the worker starts"]
pub struct Registration<R: Reconciler> {
    pub(super) worker: Worker,
    pub(super) name: String,
    pub(super) reconciler: Arc<R>,
    pub(super) events: Vec<(&'static str, &'static str)>,
    pub(super) consumer_settings: Option<ConsumerSettings>,
}

impl<R: Reconciler> std::fmt::Debug for Registration<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("name", &self.name)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl<R: Reconciler> Registration<R> {
    /// Events of type `E` hint at this reconciler's keys: a durable consumer
    /// named after the reconciler reads them from the worker's stream, on the
    /// subject derived from `E` ([`StreamConfig::subject_of`]). Call it once
    /// per event type; several event types need NATS 2.10 or later.
    pub fn on<E: Event>(mut self) -> Self {
        let pair = (E::AGGREGATE_TYPE, E::EVENT_TYPE);
        if !self.events.contains(&pair) {
            self.events.push(pair);
        }
        self
    }

    /// Every event of the event-sourced aggregate `A` hints at this
    /// reconciler's keys (the aggregate's id, by default): the consumer reads
    /// `<prefix>.<A::TYPE>.*`.
    pub fn on_aggregate<A: converge_eventsourcing::Aggregate>(mut self) -> Self {
        let pair = (A::TYPE, "*");
        if !self.events.contains(&pair) {
            self.events.push(pair);
        }
        self
    }

    /// Changes the consumer's settings converge derived (retries, ack wait,
    /// concurrency, key lease). Its name, stream and subjects are the
    /// registration's: changing them makes [`Worker::start`] refuse.
    pub fn consumer_settings(
        mut self,
        settings: impl FnOnce(&mut ConsumerConfig) + Send + 'static,
    ) -> Self {
        self.consumer_settings = Some(Box::new(settings));
        self
    }

    /// Sweeps `candidates` with this reconciler on `timing`; the sweep takes
    /// the registration's name (its schedule row, lease and run history).
    pub fn sweep(self, timing: Timing, candidates: impl Candidates) -> Self {
        self.sweep_with(timing, candidates, |_| {})
    }

    /// Like [`sweep`](Registration::sweep), then changes the sweep's settings
    /// (batch size, overlap, lease, or another sweep name for a second sweep
    /// of the same reconciler). Its reconciler is the registration's:
    /// changing it makes [`Worker::start`] refuse.
    pub fn sweep_with(
        mut self,
        timing: Timing,
        candidates: impl Candidates,
        settings: impl FnOnce(&mut SweepConfig),
    ) -> Self {
        let mut config = SweepConfig::new(self.name.as_str(), self.name.as_str(), timing);
        settings(&mut config);
        if config.reconciler != self.name {
            self.worker.problems.push(format!(
                "the sweep {:?} of reconciler {:?} names reconciler {:?}: a registration's sweeps \
                 take its name; register the other reconciler on its own",
                config.name, self.name, config.reconciler
            ));
            config.reconciler = self.name.clone();
        }
        self.worker = self
            .worker
            .sweep(config, candidates, self.reconciler.clone());
        self
    }

    /// Finishes this registration and returns the worker.
    pub fn done(self) -> Worker {
        let Registration {
            mut worker,
            name,
            reconciler,
            events,
            consumer_settings,
        } = self;
        if !events.is_empty() {
            worker.plan_consumer(name, reconciler, events, consumer_settings);
        } else if consumer_settings.is_some() {
            worker.problems.push(format!(
                "reconciler {name:?} has consumer settings but no events: add .on::<SomeEvent>()"
            ));
        }
        worker
    }

    /// Finishes this registration and starts registering another reconciler.
    pub fn reconciler<R2: Reconciler>(
        self,
        name: impl Into<String>,
        reconciler: Arc<R2>,
    ) -> Registration<R2> {
        self.done().reconciler(name, reconciler)
    }

    /// Finishes this registration; see [`Worker::relay`].
    pub fn relay(self, config: RelayConfig) -> Worker {
        self.done().relay(config)
    }

    /// Finishes this registration; see [`Worker::stream`].
    pub fn stream(self, stream: StreamConfig) -> Worker {
        self.done().stream(stream)
    }

    /// Finishes this registration and starts the worker ([`Worker::start`]).
    pub async fn start(self) -> Result<WorkerHandle, WorkerError> {
        self.done().start().await
    }
}

impl<R: Reconciler> From<Registration<R>> for Worker {
    fn from(registration: Registration<R>) -> Worker {
        registration.done()
    }
}
