//! The fast path: a durable JetStream pull consumer driving one reconciler.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::{self, AckKind, Message};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use rand::Rng;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::attempts;
use crate::dead_letter;
use crate::error::ReconcileError;
use crate::lease::{KeyLeases, LeaseTimes, DEFAULT_KEY_LEASE};
use crate::limits::RateLimits;
use crate::reconciler::{Context, EventHint, Reconciler, Trigger};
use crate::run::{run_key_leased, RunResult};
use converge_outbox::TraceParent;
use converge_outbox::{
    HEADER_AGGREGATE_ID, HEADER_AGGREGATE_TYPE, HEADER_AGGREGATE_VERSION, HEADER_EVENT_ID,
    HEADER_EVENT_TYPE, HEADER_OCCURRED_AT, HEADER_TRACEPARENT,
};

/// Retries of a failing key: exponential backoff with full jitter, bounded.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts before the key is dead-lettered (the first try included).
    pub max_attempts: u32,
    /// Delay before the first retry; doubles each attempt.
    pub initial_backoff: Duration,
    /// Longest delay between attempts.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The delay after failed attempt number `attempt` (1-based): between half
    /// and all of `initial_backoff * 2^(attempt-1)`, at most `max_backoff`; never
    /// shorter than a `retry_after` the error asked for.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let ceiling = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max_backoff);
        let nanos = ceiling.as_nanos() as u64;
        let jittered = Duration::from_nanos(rand::rng().random_range(nanos / 2..=nanos.max(1)));
        retry_after.map_or(jittered, |r| r.max(jittered))
    }
}

/// Settings of a [`Consumer`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerConfig {
    /// The reconciler's name: the durable consumer's name, the lock namespace
    /// and the dead letters' `reconciler` column.
    pub name: String,
    /// The stream the relay publishes to.
    pub stream: String,
    /// Subjects whose events hint at keys, e.g. `orders.order.OrderShipped`.
    /// One subject works with every NATS server; several need NATS 2.10.
    pub filter_subjects: Vec<String>,
    /// Keys reconciled at once.
    pub concurrency: usize,
    /// Retries and dead-lettering.
    pub retry: RetryPolicy,
    /// JetStream's ack wait; a running reconcile sends progress acks, so this
    /// bounds how fast a dead worker's messages are redelivered.
    pub ack_wait: Duration,
    /// How long an event waits for its key while a sweep or another worker
    /// holds it (sending progress acks, so `ack_wait` may be shorter), before
    /// it is put back with a short delay; rounds put back busy use no attempt.
    pub lock_wait: Duration,
    /// How long [`ConsumerHandle::shutdown`] waits for in-flight reconciles.
    pub shutdown_timeout: Duration,
    /// This worker's name, part of [`Context::claimant`]. The default,
    /// [`instance_name`](crate::instance_name)`("worker")`, is unique per
    /// process and host.
    pub instance_name: String,
    /// How long a running key's lease lasts between renewals (see
    /// [`Context::with_key_lease`]): a crashed worker's keys stay busy this long.
    pub key_lease: Duration,
}

impl ConsumerConfig {
    /// A consumer named `name` on `stream`, filtered by `subject`, with defaults.
    pub fn new(
        name: impl Into<String>,
        stream: impl Into<String>,
        subject: impl Into<String>,
    ) -> Self {
        ConsumerConfig {
            name: name.into(),
            stream: stream.into(),
            filter_subjects: vec![subject.into()],
            concurrency: 16,
            retry: RetryPolicy::default(),
            ack_wait: Duration::from_secs(30),
            lock_wait: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
            instance_name: crate::instance_name("worker"),
            key_lease: DEFAULT_KEY_LEASE,
        }
    }

    fn validate(&self) -> Result<(), ConsumerError> {
        let bad = |m: &str| Err(ConsumerError::Config(m.to_owned()));
        if self.name.is_empty() || self.name.contains(['.', '*', '>', ' ']) {
            return bad("name must be non-empty, without '.', '*', '>' or spaces (it names the durable consumer)");
        }
        if self.filter_subjects.is_empty() {
            return bad("filter_subjects must name at least one subject");
        }
        if self.concurrency == 0 || self.retry.max_attempts == 0 {
            return bad("concurrency and retry.max_attempts must be at least 1");
        }
        if self.ack_wait < Duration::from_secs(1) {
            return bad("ack_wait must be at least 1 s");
        }
        if self.key_lease < Duration::from_secs(1) {
            return bad("key_lease must be at least 1 s");
        }
        Ok(())
    }
}

/// Why a consumer could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// The configuration is not usable.
    #[error("consumer configuration: {0}")]
    Config(String),
    /// The stream does not exist.
    #[error("stream {stream} not found: start the relay (it creates the stream) or check ConsumerConfig::stream")]
    StreamMissing {
        /// The stream's name.
        stream: String,
    },
    /// A JetStream call failed.
    #[error("JetStream {operation} failed: {source}")]
    JetStream {
        /// What the consumer was doing.
        operation: &'static str,
        /// The client's error.
        #[source]
        source: async_nats::Error,
    },
    /// The schema could not be migrated.
    #[error(transparent)]
    Schema(#[from] converge_schema::MigrateError),
    /// The durable consumer exists with other settings and JetStream refused
    /// to update them.
    #[error(
        "durable consumer {consumer} on stream {stream} exists with other settings ({}) and \
         JetStream refused to update them: {reason}. Restore the old settings, or delete the \
         consumer (`nats consumer rm {stream} {consumer}`) to create it anew; its pending \
         events are then delivered again from the stream's start",
        differences.join("; ")
    )]
    SettingsMismatch {
        /// The consumer.
        consumer: String,
        /// The stream.
        stream: String,
        /// Each setting that differs, `name old → new`.
        differences: Vec<String>,
        /// JetStream's refusal.
        reason: String,
    },
    /// In-flight reconciles did not finish within the shutdown timeout.
    #[error("reconciles still running after {0:?} were stopped; their events will be redelivered")]
    ShutdownTimedOut(Duration),
}

impl ConsumerError {
    /// Whether starting again later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ConsumerError::JetStream { .. } | ConsumerError::StreamMissing { .. }
        )
    }
}

struct Shared<R> {
    pool: PgPool,
    leases: KeyLeases,
    reconciler: R,
    limits: RateLimits,
    config: ConsumerConfig,
    claimant: String,
}

/// Drives a [`Reconciler`] from a durable JetStream pull consumer.
pub struct Consumer<R> {
    pool: PgPool,
    nats: async_nats::Client,
    reconciler: R,
    config: ConsumerConfig,
    limits: RateLimits,
}

impl<R> std::fmt::Debug for Consumer<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<R: Reconciler> Consumer<R> {
    /// A consumer running `reconciler` with `config`.
    pub fn new(
        pool: PgPool,
        nats: async_nats::Client,
        reconciler: R,
        config: ConsumerConfig,
    ) -> Self {
        Consumer {
            pool,
            nats,
            reconciler,
            config,
            limits: RateLimits::default(),
        }
    }

    /// The rate limiters the reconciler may acquire (share one set between the
    /// consumers and sweeps of a process).
    pub fn with_limits(mut self, limits: RateLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Migrates the schema, creates or binds the durable consumer and starts pulling.
    #[tracing::instrument(skip(self), fields(reconciler = %self.config.name, stream = %self.config.stream), err)]
    pub async fn start(self) -> Result<ConsumerHandle, ConsumerError> {
        let config = self.config;
        config.validate()?;
        // Dead letters need their table before the first failure.
        converge_schema::migrate(&self.pool).await?;
        let js = jetstream::new(self.nats);
        let stream = js.get_stream(&config.stream).await.map_err(|e| {
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
            {
                ConsumerError::StreamMissing {
                    stream: config.stream.clone(),
                }
            } else {
                ConsumerError::JetStream {
                    operation: "get stream",
                    source: e.into(),
                }
            }
        })?;
        let mut pull_config = pull::Config {
            durable_name: Some(config.name.clone()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            // Few messages wait unacknowledged beyond those running, so none
            // sits in the buffer long enough to be redelivered unrun.
            max_ack_pending: (pull_batch(config.concurrency) + config.concurrency) as i64,
            ..Default::default()
        };
        if config.filter_subjects.len() == 1 {
            pull_config.filter_subject = config.filter_subjects[0].clone();
        } else {
            pull_config.filter_subjects = config.filter_subjects.clone();
        }
        let consumer = bind_consumer(&stream, &config, pull_config).await?;
        if let Ok(max) = u32::try_from(config.concurrency) {
            let pool_size = self.pool.options().get_max_connections();
            if pool_size < max {
                tracing::warn!(
                    reconciler = %config.name,
                    pool_size,
                    concurrency = config.concurrency,
                    "the pool has fewer connections than the consumer runs keys at once: \
                     reconciles will wait for connections; raise max_connections or lower concurrency"
                );
            }
        }
        let claimant = format!("{}/{}", config.instance_name, config.name);
        let leases = KeyLeases::start(
            crate::lease::dedicated_pool(&self.pool),
            claimant.clone(),
            LeaseTimes {
                ttl: config.key_lease,
            },
        );
        let shared = Arc::new(Shared {
            leases: leases.clone(),
            pool: self.pool,
            reconciler: self.reconciler,
            limits: self.limits,
            config,
            claimant,
        });
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        tasks.spawn(pull_loop(shared.clone(), consumer, cancel.clone()));
        tasks.spawn(recover_loop(shared.clone(), cancel.clone()));
        Ok(ConsumerHandle {
            cancel,
            leases,
            tasks: Some(tasks),
            timeout: shared.config.shutdown_timeout,
        })
    }
}

/// Creates the durable consumer, or binds the existing one: an existing one
/// with other settings (after a configuration change) is updated where
/// JetStream allows it; otherwise starting fails naming each setting.
async fn bind_consumer(
    stream: &jetstream::stream::Stream,
    config: &ConsumerConfig,
    wanted: pull::Config,
) -> Result<jetstream::consumer::Consumer<pull::Config>, ConsumerError> {
    let js_error = |operation: &'static str| {
        move |e: async_nats::Error| ConsumerError::JetStream {
            operation,
            source: e,
        }
    };
    let existing = match stream.consumer_info(&config.name).await {
        Ok(info) => Some(info.config),
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => None,
        Err(e) => return Err(js_error("read the consumer")(e.into())),
    };
    let differences = existing
        .as_ref()
        .map(|have| settings_differences(have, &wanted))
        .unwrap_or_default();
    if existing.is_some() && differences.is_empty() {
        return stream
            .get_consumer(&config.name)
            .await
            .map_err(|e| js_error("bind the consumer")(e));
    }
    match stream.create_consumer(wanted).await {
        Ok(consumer) => {
            if !differences.is_empty() {
                tracing::warn!(
                    consumer = %config.name,
                    changed = %differences.join("; "),
                    "updated the existing durable consumer's settings"
                );
            }
            Ok(consumer)
        }
        Err(e) if !differences.is_empty() => Err(ConsumerError::SettingsMismatch {
            consumer: config.name.clone(),
            stream: config.stream.clone(),
            differences,
            reason: e.to_string(),
        }),
        Err(e) => Err(js_error("create consumer")(e.into())),
    }
}

/// The settings converge sets that differ between the existing durable
/// consumer and the one configured, e.g. `ack_wait 30s → 2s`.
fn settings_differences(have: &jetstream::consumer::Config, want: &pull::Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut differ = |name: &str, have: String, want: String| {
        if have != want {
            out.push(format!("{name} {have} → {want}"));
        }
    };
    differ(
        "ack_policy",
        format!("{:?}", have.ack_policy),
        format!("{:?}", want.ack_policy),
    );
    differ(
        "ack_wait",
        format!("{:?}", have.ack_wait),
        format!("{:?}", want.ack_wait),
    );
    differ(
        "max_ack_pending",
        have.max_ack_pending.to_string(),
        want.max_ack_pending.to_string(),
    );
    let subjects = |one: &str, many: &[String]| {
        let mut all: Vec<String> = many.to_vec();
        if !one.is_empty() {
            all.push(one.to_owned());
        }
        all.sort();
        all.join(",")
    };
    differ(
        "filter subjects",
        subjects(&have.filter_subject, &have.filter_subjects),
        subjects(&want.filter_subject, &want.filter_subjects),
    );
    out
}

/// A running consumer; [`shutdown`](ConsumerHandle::shutdown) drains it.
#[derive(Debug)]
pub struct ConsumerHandle {
    cancel: CancellationToken,
    leases: KeyLeases,
    tasks: Option<JoinSet<()>>,
    timeout: Duration,
}

impl ConsumerHandle {
    /// Stops fetching, lets in-flight reconciles finish within the shutdown
    /// timeout; what does not finish is stopped and redelivered later.
    pub async fn shutdown(mut self) -> Result<(), ConsumerError> {
        self.cancel.cancel();
        let mut tasks = self.tasks.take().expect("present until shutdown");
        // The pull loop itself waits for its reconciles up to the timeout.
        let drained = tokio::time::timeout(self.timeout + Duration::from_secs(1), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        match drained {
            Ok(()) => Ok(()),
            Err(_) => {
                tasks.abort_all();
                Err(ConsumerError::ShutdownTimedOut(self.timeout))
            }
        }
    }

    /// Stops every task at once, acknowledging nothing and releasing no key
    /// lease: what a crash looks like. The events in flight are redelivered
    /// after `ack_wait`; their keys come free when their leases expire. For
    /// fault tests.
    pub async fn kill(mut self) {
        self.leases.abandon();
        if let Some(mut tasks) = self.tasks.take() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }
}

impl Drop for ConsumerHandle {
    fn drop(&mut self) {
        if let Some(mut tasks) = self.tasks.take() {
            self.cancel.cancel();
            tasks.detach_all();
        }
    }
}

async fn pull_loop<R: Reconciler>(
    shared: Arc<Shared<R>>,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    cancel: CancellationToken,
) {
    let concurrency = shared.config.concurrency;
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut inflight: JoinSet<()> = JoinSet::new();
    let mut failures = 0u32;
    'outer: while !cancel.is_cancelled() {
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(pull_batch(concurrency))
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
        {
            Ok(m) => m,
            Err(error) => {
                failures += 1;
                tracing::warn!(%error, "consumer cannot pull; retrying");
                let delay = Duration::from_millis(200 * u64::from(failures.min(25)));
                tokio::select! { _ = cancel.cancelled() => break, _ = tokio::time::sleep(delay) => continue }
            }
        };
        loop {
            while inflight.try_join_next().is_some() {}
            let permit = tokio::select! {
                _ = cancel.cancelled() => break 'outer,
                p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            };
            let next = tokio::select! {
                _ = cancel.cancelled() => break 'outer,
                m = messages.next() => m,
            };
            match next {
                Some(Ok(message)) => {
                    failures = 0;
                    let shared = shared.clone();
                    inflight.spawn(async move {
                        handle(&shared, message).await;
                        drop(permit);
                    });
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "consumer pull error; re-subscribing");
                    break;
                }
                None => break,
            }
        }
    }
    // Stop fetching (the pull subscription is dropped), then drain.
    let drained = tokio::time::timeout(shared.config.shutdown_timeout, async {
        while inflight.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "reconciles still running at shutdown were stopped; they will be redelivered"
        );
        inflight.abort_all();
    }
}

/// Every minute, runs the recover hooks a crash left undone (a dead letter
/// recorded, its hook never finished): the letter's promise holds across
/// crashes.
async fn recover_loop<R: Reconciler>(shared: Arc<Shared<R>>, cancel: CancellationToken) {
    let mut every = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(5),
        Duration::from_secs(60),
    );
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        let ctx = Context::new(
            shared.pool.clone(),
            Trigger::Manual {
                reason: Some("a recover hook a crash left undone".into()),
            },
            1,
            shared.limits.clone(),
            shared.claimant.clone(),
        )
        .with_key_lease(shared.config.key_lease);
        let cfg = &shared.config;
        let pass = dead_letter::recover_pending(
            &shared.reconciler,
            &cfg.name,
            &ctx,
            Duration::from_secs(60),
            100,
            cfg.lock_wait,
        );
        tokio::select! {
            _ = cancel.cancelled() => return,
            ran = pass => if let Err(error) = ran {
                tracing::warn!(%error, "cannot run pending recover hooks");
            }
        }
    }
}

/// Messages fetched per pull: enough to keep `concurrency` keys busy without
/// a round trip per message, few enough that none waits near its ack wait.
fn pull_batch(concurrency: usize) -> usize {
    (concurrency * 2).clamp(2, 1000)
}

/// Reads converge's headers; `Err` names what is missing.
fn parse(message: &Message) -> Result<EventHint, String> {
    let headers = message
        .headers
        .as_ref()
        .ok_or("no headers: not a converge event")?;
    let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
    let need = |name: &str| {
        get(name).ok_or_else(|| format!("missing header {name}: not a converge event"))
    };
    let event_id = need(HEADER_EVENT_ID)?
        .parse()
        .map_err(|e| format!("header {HEADER_EVENT_ID} is not a UUID: {e}"))?;
    let version = need(HEADER_AGGREGATE_VERSION)?
        .parse()
        .map_err(|e| format!("header {HEADER_AGGREGATE_VERSION} is not a number: {e}"))?;
    let mut all = BTreeMap::new();
    for (k, v) in headers.iter() {
        if let Some(first) = v.first() {
            all.insert(k.to_string(), first.as_str().to_owned());
        }
    }
    Ok(EventHint {
        event_id,
        aggregate_type: need(HEADER_AGGREGATE_TYPE)?,
        aggregate_id: need(HEADER_AGGREGATE_ID)?,
        version,
        event_type: need(HEADER_EVENT_TYPE)?,
        subject: message.subject.to_string(),
        occurred_at: get(HEADER_OCCURRED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc)),
        traceparent: get(HEADER_TRACEPARENT).and_then(|t| TraceParent::parse(&t).ok()),
        headers: all,
        payload: message.payload.clone(),
    })
}

async fn ack(message: &Message, kind: AckKind) {
    if let Err(error) = message.ack_with(kind).await {
        // A lost ack means a redelivery, which the reconciler absorbs.
        tracing::warn!(%error, "ack failed; the event will be redelivered");
    }
}

async fn handle<R: Reconciler>(shared: &Shared<R>, message: Message) {
    let cfg = &shared.config;
    let (delivered, first_attempt_at) = match message.info() {
        Ok(info) => (
            info.delivered.max(1),
            DateTime::<Utc>::from_timestamp(
                info.published.unix_timestamp(),
                info.published.nanosecond(),
            ),
        ),
        Err(_) => (1, None),
    };
    let attempt = delivered as u32;
    let hint = match parse(&message) {
        Ok(hint) => hint,
        Err(reason) => {
            // Not ours to run, never will be: record it and let the rest flow.
            let error = ReconcileError::permanent(reason);
            let trigger = Trigger::Manual {
                reason: Some(format!("malformed message on {}", message.subject)),
            };
            match dead_letter::record(
                &shared.pool,
                &cfg.name,
                "",
                &trigger,
                &error,
                attempt,
                first_attempt_at,
            )
            .await
            {
                Ok(_) => ack(&message, AckKind::Term).await,
                Err(db) => {
                    tracing::warn!(error = %db, "cannot record a malformed event; retrying later");
                    ack(&message, AckKind::Nak(Some(Duration::from_secs(5)))).await;
                }
            }
            return;
        }
    };
    let event_id = hint.event_id;
    let key = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        shared.reconciler.key_for(&hint)
    })) {
        Ok(Some(key)) => key,
        Ok(None) => {
            ack(&message, AckKind::Ack).await;
            return;
        }
        Err(_) => {
            // A panicking `key_for` panics again on every delivery: a dead
            // letter, not a loop.
            let error = ReconcileError::permanent("key_for panicked on this event");
            let trigger = Trigger::Event(hint);
            match dead_letter::record(
                &shared.pool,
                &cfg.name,
                "",
                &trigger,
                &error,
                1,
                first_attempt_at,
            )
            .await
            {
                Ok(_) => ack(&message, AckKind::Term).await,
                Err(_) => ack(&message, AckKind::Nak(Some(Duration::from_secs(5)))).await,
            }
            return;
        }
    };
    // Attempts are deliveries that could run: the rounds this event was put
    // back because its key was busy do not count. The first delivery has
    // nothing to read.
    let busy_rounds = if delivered > 1 {
        match attempts::busy_rounds(&shared.pool, &cfg.name, event_id).await {
            Ok(n) => n,
            Err(db) => {
                tracing::warn!(error = %db, "cannot read the event's attempts; trying again later");
                ack(&message, AckKind::Nak(Some(Duration::from_secs(1)))).await;
                return;
            }
        }
    } else {
        0
    };
    let attempt = (delivered as u32).saturating_sub(busy_rounds).max(1);
    let ctx = Context::new(
        shared.pool.clone(),
        Trigger::Event(hint),
        attempt,
        shared.limits.clone(),
        shared.claimant.clone(),
    )
    .with_key_lease(cfg.key_lease);
    let lock_deadline = tokio::time::Instant::now() + cfg.lock_wait;
    // Progress acks every third of `ack_wait`, while the reconcile runs and
    // while the event waits for its key.
    let mut progress = tokio::time::interval_at(
        tokio::time::Instant::now() + cfg.ack_wait / 3,
        cfg.ack_wait / 3,
    );
    let result = loop {
        let run = run_key_leased(
            &shared.reconciler,
            &cfg.name,
            &ctx,
            &key,
            &shared.leases,
            false,
        );
        tokio::pin!(run);
        let result = loop {
            tokio::select! {
                r = &mut run => break r,
                _ = progress.tick() => ack(&message, AckKind::Progress).await,
            }
        };
        match result {
            RunResult::Busy if tokio::time::Instant::now() < lock_deadline => {
                let pause =
                    tokio::time::sleep(Duration::from_millis(rand::rng().random_range(20..80)));
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        _ = &mut pause => break,
                        _ = progress.tick() => ack(&message, AckKind::Progress).await,
                    }
                }
            }
            other => break other,
        }
    };
    match result {
        RunResult::Done(_) => {
            ack(&message, AckKind::Ack).await;
            if busy_rounds > 0 {
                attempts::forget(&shared.pool, &cfg.name, event_id).await;
            }
        }
        // Still busy after `lock_wait`: back in a moment, no attempt used.
        RunResult::Busy => {
            if let Err(db) = attempts::count_busy(&shared.pool, &cfg.name, event_id).await {
                // Uncounted, the round costs an attempt: never one more.
                tracing::warn!(error = %db, "cannot count a busy round");
            }
            ack(&message, AckKind::Nak(Some(Duration::from_millis(500)))).await
        }
        RunResult::Failed(error) if error.is_retryable() && attempt < cfg.retry.max_attempts => {
            let delay = cfg.retry.delay(attempt, error.retry_after_hint());
            crate::metrics::count_retry(&cfg.name);
            ack(&message, AckKind::Nak(Some(delay))).await;
        }
        RunResult::Failed(error) => {
            let given_up = dead_letter::dead_letter_key(
                &shared.reconciler,
                &cfg.name,
                &ctx,
                &key,
                &error,
                attempt,
                first_attempt_at,
                cfg.lock_wait,
            )
            .await;
            match given_up {
                Ok(_) => {
                    ack(&message, AckKind::Term).await;
                    if busy_rounds > 0 {
                        attempts::forget(&shared.pool, &cfg.name, event_id).await;
                    }
                }
                Err(db) => {
                    // Never acknowledge what is not recorded: try again later.
                    tracing::warn!(error = %db, "cannot record a dead letter; the event stays pending");
                    ack(&message, AckKind::Nak(Some(cfg.retry.max_backoff))).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_with_jitter_and_honour_retry_after() {
        let p = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        for _ in 0..50 {
            let d1 = p.delay(1, None);
            assert!(
                d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100),
                "{d1:?}"
            );
            let d3 = p.delay(3, None);
            assert!(
                d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400),
                "{d3:?}"
            );
            let d9 = p.delay(9, None);
            assert!(
                d9 >= Duration::from_millis(500) && d9 <= Duration::from_secs(1),
                "{d9:?}"
            );
            assert!(p.delay(1, Some(Duration::from_secs(7))) == Duration::from_secs(7));
        }
    }

    #[test]
    fn configuration_errors_say_what_to_fix() {
        let mut c = ConsumerConfig::new("invoicing", "S", "app.order.>");
        assert!(c.validate().is_ok());
        c.name = "has.dot".into();
        assert!(c.validate().unwrap_err().to_string().contains("name"));
        let mut c = ConsumerConfig::new("invoicing", "S", "app.order.>");
        c.filter_subjects.clear();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("filter_subjects"));
    }
}
