//! The runtime: one builder that wires an application's relay, consumers,
//! sweeps and control plane into a running worker with one shutdown handle.

pub(crate) mod audit;
pub(crate) mod control;
mod error;
mod handle;
mod liveness;
mod registration;
mod registry;
mod wiring;

pub use error::WorkerError;
pub use handle::{shutdown_signal, WorkerHandle};
pub use registration::Registration;

use registration::ConsumerSettings;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use converge_eventsourcing::{Projection, ProjectionRunner, RunnerConfig};
use converge_handlers::{
    Consumer, ConsumerConfig, ConsumerError, ConsumerHandle, Context, NamedReconciler, RateLimits,
    Reconciler, Trigger,
};
use converge_outbox::{Relay, RelayConfig, StreamConfig, Upcasters};
use converge_sweeper::{Candidates, SweepConfig, Sweeper};
use futures::future::BoxFuture;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Starts one consumer once its configuration is final.
type StartConsumer = Box<
    dyn FnOnce(
            PgPool,
            async_nats::Client,
            RateLimits,
            ConsumerConfig,
        ) -> BoxFuture<'static, Result<ConsumerHandle, ConsumerError>>
        + Send,
>;

/// A consumer to start: configured by the caller ([`Worker::consumer`]), or
/// derived at start from the worker's stream and a registration's events.
struct PlannedConsumer {
    name: String,
    config: Option<ConsumerConfig>,
    events: Vec<(&'static str, &'static str)>,
    settings: Option<ConsumerSettings>,
    start: StartConsumer,
}

/// Which reconciler value a name was registered with: one value under two
/// names means two lease namespaces for the same keys.
struct Identity {
    name: String,
    address: usize,
    type_name: &'static str,
    /// Keeps the value alive, so its address is not reused by another.
    _value: Arc<dyn std::any::Any + Send + Sync>,
}

/// Builds a worker: an application's relay, reconcilers' consumers, sweeps
/// and its control plane, started together and stopped together.
///
/// Register each reconciler once ([`Worker::reconciler`]): the events that
/// hint at its keys and its sweeps take its name, so they share each key's
/// lease. [`Worker::start`] checks the wiring against itself, the database
/// and NATS, and refuses what would fail silently, naming it.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use converge::handlers::{Context, Outcome, ReconcileError, Reconciler};
/// # struct Invoicing;
/// # impl Reconciler for Invoicing {
/// #     async fn reconcile(&self, _: &Context, _: &str) -> Result<Outcome, ReconcileError> { Ok(Outcome::Unchanged) }
/// # }
/// # #[derive(serde::Serialize)] struct OrderShipped { id: i64 }
/// # impl converge::Event for OrderShipped {
/// #     const AGGREGATE_TYPE: &'static str = "order";
/// #     const EVENT_TYPE: &'static str = "OrderShipped";
/// #     fn aggregate_id(&self) -> String { self.id.to_string() }
/// # }
/// use converge::sweeper::{KeyType, Schedule, SqlCandidates, Timing};
/// use converge::{RelayConfig, StreamConfig, Worker};
///
/// # async fn run(pool: sqlx::PgPool, nats: async_nats::Client) -> Result<(), Box<dyn std::error::Error>> {
/// let every_minute = Timing::new(Schedule::fixed_rate(std::time::Duration::from_secs(60))?);
/// let shipped = SqlCandidates::keyset("orders", "id", KeyType::BigInt, "state = 'SHIPPED'");
/// let worker = Worker::new(pool, nats, "invoicing")
///     .relay(RelayConfig::new(StreamConfig::new("ORDERS", "orders")))
///     .reconciler("invoicing", Arc::new(Invoicing))
///     .on::<OrderShipped>() // the consumer `invoicing` on orders.order.OrderShipped
///     .sweep(every_minute, shipped) // the sweep `invoicing`
///     .start()
///     .await?;
/// worker.run_until_signal().await?; // SIGTERM or ctrl-c, then a graceful drain
/// # Ok(()) }
/// ```
pub struct Worker {
    pool: PgPool,
    nats: async_nats::Client,
    application: String,
    instance: String,
    relay: Option<RelayConfig>,
    stream: Option<StreamConfig>,
    limits: RateLimits,
    consumers: Vec<PlannedConsumer>,
    sweeper: Option<Sweeper>,
    sweeps: Vec<String>,
    reconcilers: HashMap<String, NamedReconciler>,
    identities: Vec<Identity>,
    problems: Vec<String>,
    upcasters: Option<Upcasters>,
    projections: Option<ProjectionRunner>,
    control_plane: bool,
    measure_interval: Duration,
    shutdown_timeout: Duration,
    migrate_at_start: bool,
    nats_stall_timeout: Duration,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("application", &self.application)
            .field("instance", &self.instance)
            .field("sweeps", &self.sweeps)
            .finish_non_exhaustive()
    }
}

/// How long a worker's NATS server may answer nothing before the worker
/// reconnects elsewhere, unless [`Worker::nats_stall_timeout`] says otherwise.
pub const DEFAULT_NATS_STALL_TIMEOUT: Duration = Duration::from_secs(15);

fn default_instance() -> String {
    converge_handlers::instance_name("worker")
}

impl Worker {
    /// A worker of `application` (its control plane's name: operators reach
    /// every worker of one application on one subject).
    pub fn new(pool: PgPool, nats: async_nats::Client, application: impl Into<String>) -> Self {
        Worker {
            pool,
            nats,
            application: application.into(),
            instance: default_instance(),
            relay: None,
            stream: None,
            limits: RateLimits::default(),
            consumers: Vec::new(),
            sweeper: None,
            sweeps: Vec::new(),
            reconcilers: HashMap::new(),
            identities: Vec::new(),
            problems: Vec::new(),
            upcasters: None,
            projections: None,
            control_plane: true,
            measure_interval: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(30),
            migrate_at_start: false,
            nats_stall_timeout: DEFAULT_NATS_STALL_TIMEOUT,
        }
    }

    /// This worker's name in leases, claims, run history and `converge status`
    /// (default `<hostname>-<pid>`). Unique per running worker.
    pub fn instance_name(mut self, name: impl Into<String>) -> Self {
        self.instance = name.into();
        self
    }

    /// Runs a relay publishing the outbox to `config.stream`; the
    /// registrations' events ([`Registration::on`]) are read from that stream.
    pub fn relay(mut self, config: RelayConfig) -> Self {
        self.relay = Some(config);
        self
    }

    /// The stream the registrations' events are read from, for a worker that
    /// runs no relay (another process publishes). With a relay, its stream is
    /// used and this one must be the same.
    pub fn stream(mut self, stream: StreamConfig) -> Self {
        self.stream = Some(stream);
        self
    }

    /// The rate limiters every path of this worker shares.
    pub fn limits(mut self, limits: RateLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Runs `reconciler` on the event path with a durable consumer configured
    /// by hand; it is also registered under `config.name` for operators'
    /// manual runs. Prefer [`Worker::reconciler`] with
    /// [`Registration::on`]: the subject is derived from the event type.
    pub fn consumer<R: Reconciler>(mut self, config: ConsumerConfig, reconciler: Arc<R>) -> Self {
        let name = config.name.clone();
        self.register(&name, reconciler.clone());
        self.consumers.push(PlannedConsumer {
            name,
            config: Some(config),
            events: Vec::new(),
            settings: None,
            start: start_consumer(reconciler),
        });
        self
    }

    fn plan_consumer<R: Reconciler>(
        &mut self,
        name: String,
        reconciler: Arc<R>,
        events: Vec<(&'static str, &'static str)>,
        settings: Option<ConsumerSettings>,
    ) {
        self.consumers.push(PlannedConsumer {
            name,
            config: None,
            events,
            settings,
            start: start_consumer(reconciler),
        });
    }

    /// Runs `reconciler` on a schedule over `candidates`; it is also
    /// registered under `config.reconciler` for operators' manual runs.
    pub fn sweep<R: Reconciler>(
        mut self,
        config: SweepConfig,
        candidates: impl Candidates,
        reconciler: Arc<R>,
    ) -> Self {
        self.register(&config.reconciler.clone(), reconciler.clone());
        self.sweeps.push(config.name.clone());
        let sweeper = self
            .sweeper
            .take()
            .unwrap_or_else(|| Sweeper::new(self.pool.clone()));
        self.sweeper = Some(sweeper.sweep(config, candidates, reconciler));
        self
    }

    /// Registers `reconciler` under `name`: operators' manual runs and
    /// dead-letter retries reach it by this name, and the returned
    /// [`Registration`] adds the events that hint at its keys and its sweeps,
    /// all under the same name.
    ///
    /// [`Worker::start`] refuses one reconciler value registered under two
    /// names (a consumer and a sweep would take different leases for the same
    /// key and run it twice at once) and two reconciler types under one name.
    pub fn reconciler<R: Reconciler>(
        mut self,
        name: impl Into<String>,
        reconciler: Arc<R>,
    ) -> Registration<R> {
        let name = name.into();
        self.register(&name, reconciler.clone());
        Registration {
            worker: self,
            name,
            reconciler,
            events: Vec::new(),
            consumer_settings: None,
        }
    }

    fn register<R: Reconciler>(&mut self, name: &str, reconciler: Arc<R>) {
        self.identities.push(Identity {
            name: name.to_owned(),
            address: Arc::as_ptr(&reconciler) as *const () as usize,
            type_name: std::any::type_name::<R>(),
            _value: reconciler.clone(),
        });
        self.reconcilers
            .insert(name.to_owned(), NamedReconciler::new(name, reconciler));
    }

    /// The upcasters every part of the worker reads events with: its
    /// consumers' [`Context::event`], its projections, operators' runs.
    pub fn upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = Some(upcasters);
        self
    }

    /// Runs the projection `projection` asynchronously: every event of its
    /// aggregate types, in the outbox's order from its first event, applied
    /// with its cursor in one transaction (see
    /// [`ProjectionRunner`](converge_eventsourcing::ProjectionRunner));
    /// several workers may run it, one batch at a time. Operators rebuild it
    /// with `converge projections rebuild NAME`.
    pub fn projection<P: Projection>(mut self, projection: Arc<P>) -> Self {
        let runner = self.projection_runner();
        self.projections = Some(runner.projection(projection));
        self
    }

    /// Carries out rebuilds of the inline projection `projection` (applied
    /// by a [`Repository`](converge_eventsourcing::Repository) where the
    /// events are saved); the worker never applies new events to it.
    pub fn projection_rebuilds<P: Projection>(mut self, projection: Arc<P>) -> Self {
        let runner = self.projection_runner();
        self.projections = Some(runner.rebuilds_of(projection));
        self
    }

    fn projection_runner(&mut self) -> ProjectionRunner {
        self.projections
            .take()
            .unwrap_or_else(|| ProjectionRunner::new(self.pool.clone(), RunnerConfig::default()))
    }

    /// Whether to answer operators on the control plane (default: yes).
    pub fn control_plane(mut self, enabled: bool) -> Self {
        self.control_plane = enabled;
        self
    }

    /// How often the sweeps' convergence figures are measured (default 10 s).
    pub fn measure_interval(mut self, interval: Duration) -> Self {
        self.measure_interval = interval;
        self
    }

    /// How long [`WorkerHandle::shutdown`] waits for each part to drain (default 30 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Whether [`Worker::start`] migrates the schema first (default `false`).
    ///
    /// Off by default: migrating needs the schema's owner, and a worker runs
    /// with a role that has no DDL rights (`converge grants --role worker`);
    /// run `converge migrate` (or [`crate::migrate`]) as the owner before
    /// deploying. Turn it on where one role does both (development, demos).
    pub fn migrate_at_start(mut self, migrate: bool) -> Self {
        self.migrate_at_start = migrate;
        self
    }

    /// How long the worker's NATS server may take its bytes and answer
    /// nothing before the worker reconnects to another of its servers
    /// (default [`DEFAULT_NATS_STALL_TIMEOUT`]; zero turns the watch off).
    ///
    /// A server that is stopped or cut off keeps its sockets open, and the
    /// client's own pings only run while it is idle: without this watch a
    /// busy worker stays on such a server, its publishes and pulls timing
    /// out, until the server comes back. Shorter than the time a healthy
    /// server may take to answer at all is too short: JetStream answers a
    /// publish within its own timeout, pull consumers send heartbeats every
    /// few seconds. A JetStream that answers nothing for this long while its
    /// server is up (a long election) also makes the worker reconnect, once
    /// per timeout. Workers sharing one client each watch it: set the
    /// timeout on one of them and zero on the others.
    pub fn nats_stall_timeout(mut self, timeout: Duration) -> Self {
        self.nats_stall_timeout = timeout;
        self
    }

    /// Starts every part: relay, consumers, sweeps, the registry heartbeat and
    /// the control plane. Migrates only when [`Worker::migrate_at_start`] is
    /// on; otherwise the schema must be migrated already, and the start fails
    /// naming `converge migrate` (or each missing privilege) if it is not.
    /// A part that fails to start stops the ones already started.
    #[tracing::instrument(skip(self), fields(application = %self.application, instance = %self.instance), err)]
    pub async fn start(mut self) -> Result<WorkerHandle, WorkerError> {
        self.validate()?;
        let consumers = self.resolve_consumers()?;
        if self.migrate_at_start {
            crate::migrate(&self.pool).await?;
        }
        converge_schema::check(&self.pool, converge_schema::Role::Worker).await?;
        wiring::warn_about_session_settings(&self.pool).await;
        crate::metrics::describe();
        let mut handle = WorkerHandle {
            instance: self.instance.clone(),
            application: self.application.clone(),
            pool: self.pool.clone(),
            relay: None,
            consumers: Vec::new(),
            sweeper: None,
            projections: None,
            shutdown: CancellationToken::new(),
            tasks: JoinSet::new(),
            timeout: self.shutdown_timeout,
        };
        match self.start_parts(consumers, &mut handle).await {
            Ok(()) => Ok(handle),
            Err(e) => {
                if let Err(stop) = handle.stop_parts().await {
                    tracing::warn!(error = %stop, "stopping a worker that failed to start");
                }
                if let Err(dereg) = registry::deregister(&handle.pool, &handle.instance).await {
                    tracing::warn!(error = %dereg, "removing a worker that failed to start");
                }
                Err(e)
            }
        }
    }

    async fn start_parts(
        self,
        consumers: Vec<(ConsumerConfig, StartConsumer)>,
        handle: &mut WorkerHandle,
    ) -> Result<(), WorkerError> {
        let stream = self
            .relay
            .as_ref()
            .map(|c| (c.stream.name.clone(), c.stream.subject_prefix.clone()));
        if let Some(mut config) = self.relay {
            config.instance_name.clone_from(&self.instance);
            handle.relay = Some(
                Relay::new(self.pool.clone(), self.nats.clone(), config)
                    .start()
                    .await?,
            );
        }
        // As `STREAM/name`: a consumer's stream need not be the relay's.
        let consumer_names: Vec<String> = consumers
            .iter()
            .map(|(c, _)| format!("{}/{}", c.stream, c.name))
            .collect();
        wiring::check_streams_carry(&self.nats, &consumers).await?;
        for (config, start) in consumers {
            let started = start(
                self.pool.clone(),
                self.nats.clone(),
                self.limits.clone(),
                config,
            )
            .await?;
            handle.consumers.push(started);
        }
        if let Some(sweeper) = self.sweeper {
            let started = sweeper
                .instance_name(self.instance.clone())
                .with_limits(self.limits.clone())
                .shutdown_timeout(self.shutdown_timeout)
                .start()
                .await?;
            handle.sweeper = Some(Arc::new(started));
        }
        if let Some(runner) = self.projections {
            let mut config = RunnerConfig::default();
            config.instance_name.clone_from(&self.instance);
            config.shutdown_timeout = self.shutdown_timeout;
            let mut runner = runner.with_config(config);
            if let Some(upcasters) = &self.upcasters {
                runner = runner.upcasters(upcasters.clone());
            }
            handle.projections = Some(runner.start().await?);
        }
        let mut reconcilers: Vec<String> = self.reconcilers.keys().cloned().collect();
        reconcilers.sort();
        let control_subject = self
            .control_plane
            .then(|| crate::control::control_subject(&self.application));
        let entry = registry::Entry {
            instance: self.instance.clone(),
            application: self.application.clone(),
            stream,
            consumers: consumer_names,
            sweeps: self.sweeps.clone(),
            reconcilers,
            control_subject: control_subject.clone(),
        };
        registry::register(&self.pool, &entry).await?;
        handle.tasks.spawn(liveness::watch(
            self.nats.clone(),
            self.nats_stall_timeout,
            handle.shutdown.clone(),
        ));
        handle.tasks.spawn(registry::heartbeat(
            self.pool.clone(),
            entry.clone(),
            handle.shutdown.clone(),
        ));
        handle.tasks.spawn(registry::measurements(
            self.pool.clone(),
            entry.clone(),
            handle.sweeper.clone(),
            self.measure_interval,
            handle.shutdown.clone(),
        ));
        if control_subject.is_some() {
            // One subject per sweep and per reconciler: a request reaches only
            // workers that can carry it out, and one of them takes it.
            let subjects: Vec<String> = self
                .sweeps
                .iter()
                .map(|s| crate::control::sweep_subject(&self.application, s))
                .chain(
                    entry
                        .reconcilers
                        .iter()
                        .map(|r| crate::control::reconciler_subject(&self.application, r)),
                )
                .collect();
            let mut subscribers = Vec::new();
            for subject in subjects {
                let subscriber = self
                    .nats
                    .queue_subscribe(
                        subject.clone(),
                        crate::control::CONTROL_QUEUE_GROUP.to_owned(),
                    )
                    .await
                    .map_err(|source| WorkerError::Control {
                        subject: subject.clone(),
                        source,
                    })?;
                subscribers.push(subscriber);
            }
            let subscriber = futures::stream::select_all(subscribers);
            let plane = control::ControlPlane {
                pool: self.pool.clone(),
                nats: self.nats.clone(),
                instance: self.instance.clone(),
                sweeper: handle.sweeper.clone(),
                reconcilers: Arc::new(self.reconcilers),
                limits: self.limits.clone(),
            };
            handle
                .tasks
                .spawn(control::serve(plane, subscriber, handle.shutdown.clone()));
        }
        tracing::info!(
            application = %self.application,
            instance = %self.instance,
            consumers = handle.consumers.len(),
            sweeps = self.sweeps.len(),
            relay = handle.relay.is_some(),
            "worker started"
        );
        Ok(())
    }
}

/// Starts `reconciler`'s consumer with the configuration resolved at start.
fn start_consumer<R: Reconciler>(reconciler: Arc<R>) -> StartConsumer {
    Box::new(move |pool, nats, limits, config| {
        Box::pin(async move {
            Consumer::new(pool, nats, reconciler, config)
                .with_limits(limits)
                .start()
                .await
        })
    })
}

/// The manual-path context for an operator's run of one key.
pub(crate) fn manual_context(
    pool: &PgPool,
    limits: &RateLimits,
    instance: &str,
    reason: &str,
) -> Context {
    Context::new(
        pool.clone(),
        Trigger::Manual {
            reason: Some(reason.to_owned()),
        },
        1,
        limits.clone(),
        instance,
    )
}
