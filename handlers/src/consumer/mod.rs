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
    HEADER_EVENT_TYPE, HEADER_OCCURRED_AT, HEADER_SCHEMA_VERSION, HEADER_TRACEPARENT,
};

mod config;
mod message;
mod settings;

pub use config::{ConsumerConfig, ConsumerError, RetryPolicy};
use message::handle;
use settings::bind_consumer;

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
        mut config: ConsumerConfig,
    ) -> Self {
        if config.instance_name.is_empty() {
            config.instance_name = crate::instance_name("worker");
        }
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

    /// Checks the schema and this role's privileges ([`converge_schema::check`]; it
    /// never migrates), creates or binds the durable consumer and starts pulling.
    #[tracing::instrument(skip(self), fields(reconciler = %self.config.name, stream = %self.config.stream), err)]
    pub async fn start(self) -> Result<ConsumerHandle, ConsumerError> {
        let config = self.config;
        config.validate()?;
        // The schema must be migrated (by its owner) and this role granted.
        converge_schema::check(&self.pool, converge_schema::Role::Worker).await?;
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
