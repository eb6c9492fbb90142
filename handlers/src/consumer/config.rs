//! A consumer's settings, its retry policy and its errors.

use super::*;

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
    /// This worker's name, part of [`Context::claimant`]. Empty (the
    /// default): [`instance_name`](crate::instance_name)`("worker")`, unique
    /// per process and host, chosen by [`Consumer::new`]. A converge `Worker`
    /// uses its own instance name, and refuses to start if this one is set
    /// to another.
    pub instance_name: String,
    /// How long a running key's lease lasts between renewals (see
    /// [`Context::with_key_lease`]): a crashed worker's keys stay busy this long.
    pub key_lease: Duration,
    /// The upcasters [`Context::event`] decodes events with (none by default).
    pub upcasters: converge_outbox::Upcasters,
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
            instance_name: String::new(),
            key_lease: DEFAULT_KEY_LEASE,
            upcasters: converge_outbox::Upcasters::default(),
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConsumerError> {
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
    /// The schema is not migrated, the role lacks privileges, or a pooler shares sessions.
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
        match self {
            ConsumerError::JetStream { .. } | ConsumerError::StreamMissing { .. } => true,
            ConsumerError::Schema(e) => e.is_retryable(),
            _ => false,
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
