//! Metrics against real PostgreSQL and NATS: an append, the relay's publish,
//! event-driven reconciles (changed, retried, dead-lettered, rate-limited)
//! and a sweep run all show up in the `metrics` facade.
//!
//! The test binary is its own process: it installs a recorder globally once. Every label the assertions look at (stream, aggregate type,
//! reconciler, sweep, relay instance) is unique to the test.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use converge::handlers::metrics as handler_metrics;
use converge::handlers::{
    Consumer, ConsumerConfig, Context, Outcome, Rate, RateLimits, ReconcileError, Reconciler,
};
use converge::metrics::outbox as outbox_metrics;
use converge::sweeper::metrics as sweep_metrics;
use converge::sweeper::{RunOutcome, RunStatus, Schedule, SqlCandidates, SweepConfig, Sweeper};
use converge::sweeper::{Timing, TriggerKind};
use converge::{DomainEvent, Outbox, Relay};
use converge_tests::TestEnv;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};

/// A recorder that keeps every value where the code left it: counters and
/// gauges are read, never drained (metrics-util's debugging recorder resets
/// gauges to 0 on each snapshot, so a reading taken by one test would hide
/// another test's gauge).
struct Kept {
    registry: Registry<Key, AtomicStorage>,
}

impl Recorder for Kept {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.registry
            .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.registry
            .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.registry
            .get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
    }
}

fn recorder() -> &'static Kept {
    static KEPT: OnceLock<&'static Kept> = OnceLock::new();
    KEPT.get_or_init(|| {
        let kept: &'static Kept = Box::leak(Box::new(Kept {
            registry: Registry::atomic(),
        }));
        metrics::set_global_recorder(kept).expect("no other recorder in this test binary");
        converge::metrics::outbox::describe_metrics();
        handler_metrics::describe_metrics();
        sweep_metrics::describe_metrics();
        kept
    })
}

/// `name{k=v,...}` with the labels sorted.
fn series_of(key: &Key) -> String {
    let labels: Vec<(&str, &str)> = key.labels().map(|l| (l.key(), l.value())).collect();
    series(key.name(), &labels)
}

/// `name{k=v,...}` with the labels sorted.
fn series(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

/// Every counter's value, by series.
fn counters() -> HashMap<String, u64> {
    recorder()
        .registry
        .get_counter_handles()
        .into_iter()
        .map(|(k, c)| (series_of(&k), c.load(Ordering::SeqCst)))
        .collect()
}

fn counter(name: &str, labels: &[(&str, &str)]) -> u64 {
    counters().get(&series(name, labels)).copied().unwrap_or(0)
}

fn observations(name: &str, labels: &[(&str, &str)]) -> usize {
    let want = series(name, labels);
    recorder()
        .registry
        .get_histogram_handles()
        .into_iter()
        .find(|(k, _)| series_of(k) == want)
        .map_or(0, |(_, h)| h.data().len())
}

fn gauge(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want = series(name, labels);
    recorder()
        .registry
        .get_gauge_handles()
        .into_iter()
        .find(|(k, _)| series_of(k) == want)
        .map(|(_, g)| f64::from_bits(g.load(Ordering::SeqCst)))
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; counters seen: {:#?}",
            counters()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(serde::Serialize)]
struct Shipped {
    #[serde(skip)]
    aggregate_type: String,
    id: String,
}

impl DomainEvent for Shipped {
    fn aggregate_type(&self) -> &str {
        &self.aggregate_type
    }
    fn aggregate_id(&self) -> String {
        self.id.clone()
    }
    fn event_type(&self) -> &str {
        "Shipped"
    }
}

/// SHIPPED → INVOICED through a rate limiter. Key `bad` fails permanently;
/// key `flaky` fails retryably on its first attempt.
#[derive(Clone)]
struct Invoicer {
    limiter: String,
    flaky_failures: Arc<AtomicU32>,
}

impl Reconciler for Invoicer {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        if key == "bad" {
            return Err(ReconcileError::permanent("order bad has no customer"));
        }
        if key == "flaky" && ctx.attempt() == 1 {
            self.flaky_failures.fetch_add(1, Ordering::SeqCst);
            return Err(ReconcileError::retryable("billing API timed out"));
        }
        ctx.acquire(&self.limiter).await?;
        let moved =
            sqlx::query("UPDATE orders SET state = 'INVOICED' WHERE id = $1 AND state = 'SHIPPED'")
                .bind(key)
                .execute(ctx.pool())
                .await?
                .rows_affected();
        Ok(if moved == 1 {
            Outcome::Changed
        } else {
            Outcome::Unchanged
        })
    }
}

#[tokio::test]
async fn appends_publishes_reconciles_and_sweeps_are_counted() {
    recorder();
    let env = TestEnv::new().await;
    let tag = &env.prefix; // unique per test: t<hex>
    let aggregate_type = format!("order_{tag}");
    let reconciler = format!("invoicing_{tag}");
    let limiter = format!("billing_{tag}");
    let sweep = format!("invoices_{tag}");
    let instance = format!("relay_{tag}");
    sqlx::query("CREATE TABLE orders (id text PRIMARY KEY, state text NOT NULL)")
        .execute(&env.pool)
        .await
        .unwrap();
    let mut relay_config = env.relay_config();
    relay_config.instance_name = instance.clone();
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), relay_config)
        .start()
        .await
        .unwrap();
    let invoicer = Invoicer {
        limiter: limiter.clone(),
        flaky_failures: Arc::new(AtomicU32::new(0)),
    };
    let limits = RateLimits::new().local(&limiter, Rate::per_second(10_000));
    let mut config = ConsumerConfig::new(
        &reconciler,
        &env.stream,
        format!("{}.{aggregate_type}.>", env.prefix),
    );
    config.retry.initial_backoff = Duration::from_millis(20);
    config.retry.max_backoff = Duration::from_millis(100);
    config.ack_wait = Duration::from_secs(2);
    let consumer = Consumer::new(env.pool.clone(), env.nats.clone(), invoicer.clone(), config)
        .with_limits(limits.clone())
        .start()
        .await
        .unwrap();

    // Five events: three plain orders, one that fails for good, one flaky.
    let keys = ["1", "2", "3", "bad", "flaky"];
    let mut tx = env.pool.begin().await.unwrap();
    for id in keys {
        sqlx::query("INSERT INTO orders (id, state) VALUES ($1, 'SHIPPED')")
            .bind(id)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    let outbox = Outbox::default();
    outbox
        .append(
            &mut tx,
            &Shipped {
                aggregate_type: aggregate_type.clone(),
                id: "1".into(),
            },
        )
        .await
        .unwrap();
    let rest: Vec<Shipped> = keys[1..]
        .iter()
        .map(|id| Shipped {
            aggregate_type: aggregate_type.clone(),
            id: (*id).into(),
        })
        .collect();
    outbox.append_all(&mut tx, &rest).await.unwrap();
    tx.commit().await.unwrap();

    let appended = [
        ("aggregate_type", aggregate_type.as_str()),
        ("event_type", "Shipped"),
    ];
    assert_eq!(counter(outbox_metrics::EVENTS_APPENDED, &appended), 5);

    let stream = [("stream", env.stream.as_str())];
    eventually("5 events published", || {
        counter(outbox_metrics::EVENTS_PUBLISHED, &stream) >= 5
    })
    .await;
    assert_eq!(counter(outbox_metrics::RELAY_REJECTS, &stream), 0);
    assert!(
        gauge(outbox_metrics::RELAY_LAG, &stream).is_some(),
        "the relay reports its lag"
    );
    // A lone relay takes every partition; the heartbeat re-sets the gauge.
    eventually("the relay's partitions in the gauge", || {
        gauge(
            outbox_metrics::RELAY_PARTITIONS_OWNED,
            &[("instance", instance.as_str())],
        ) == Some(f64::from(converge::RELAY_PARTITIONS))
    })
    .await;

    let event = |outcome| {
        counter(
            handler_metrics::RECONCILES,
            &[
                ("reconciler", reconciler.as_str()),
                ("path", "event"),
                ("outcome", outcome),
            ],
        )
    };
    eventually("4 changed, 1 retried and 1 permanent reconcile", || {
        event("changed") >= 4 && event("permanent") >= 1 && event("retryable") >= 1
    })
    .await;
    assert_eq!(
        event("changed"),
        4,
        "orders 1, 2, 3 and flaky were invoiced once"
    );
    assert_eq!(event("permanent"), 1);
    assert_eq!(event("retryable"), 1);
    let by_reconciler = [("reconciler", reconciler.as_str())];
    assert_eq!(counter(handler_metrics::RETRIES, &by_reconciler), 1);
    eventually("the dead letter of order bad", || {
        counter(
            handler_metrics::DEAD_LETTERS,
            &[("reconciler", reconciler.as_str()), ("path", "event")],
        ) == 1
    })
    .await;
    assert!(
        observations(
            handler_metrics::RECONCILE_DURATION,
            &[("reconciler", reconciler.as_str()), ("path", "event")],
        ) >= 6,
        "every reconcile that ran is timed"
    );
    assert_eq!(
        observations(
            handler_metrics::RATE_LIMIT_WAIT,
            &[("limiter", limiter.as_str())]
        ),
        4,
        "one limiter wait per invoiced order"
    );
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();

    // A sweep over two orders shipped without an event, and order bad.
    sqlx::query("INSERT INTO orders (id, state) VALUES ('4', 'SHIPPED'), ('5', 'SHIPPED')")
        .execute(&env.pool)
        .await
        .unwrap();
    let mut c = SweepConfig::new(
        &sweep,
        &reconciler,
        Timing::new(Schedule::FixedRate(Duration::from_secs(3600))),
    );
    c.lease.lock_at_least_for = Duration::ZERO;
    let sweeper = Sweeper::new(env.pool.clone())
        .with_limits(limits)
        .sweep(
            c,
            SqlCandidates::new(
                "SELECT id AS key FROM orders WHERE state = 'SHIPPED' \
                 AND ($1::text IS NULL OR id > $1) ORDER BY id LIMIT $2",
            ),
            Arc::new(invoicer),
        )
        .start()
        .await
        .unwrap();
    let outcome = sweeper
        .run(&sweep, None, TriggerKind::Operator)
        .await
        .unwrap();
    let RunOutcome::Ran(summary) = outcome else {
        panic!("expected a run, got {outcome:?}");
    };
    assert_eq!(summary.status, RunStatus::Completed);
    sweeper.shutdown().await.unwrap();

    let swept = |result| {
        counter(
            sweep_metrics::SWEEP_KEYS,
            &[("sweep", sweep.as_str()), ("result", result)],
        )
    };
    assert_eq!(swept("reconciled"), 2, "orders 4 and 5");
    assert_eq!(swept("failed"), 1, "order bad");
    assert_eq!(swept("busy"), 0);
    assert_eq!(
        counter(
            sweep_metrics::SWEEP_RUNS,
            &[("sweep", sweep.as_str()), ("status", "completed")]
        ),
        1
    );
    assert_eq!(
        observations(
            sweep_metrics::SWEEP_RUN_DURATION,
            &[("sweep", sweep.as_str())]
        ),
        1
    );
    assert_eq!(
        counter(
            sweep_metrics::LEASE_ACQUISITIONS,
            &[("lease", sweep.as_str())]
        ),
        1
    );
    assert_eq!(
        counter(
            handler_metrics::RECONCILES,
            &[
                ("reconciler", reconciler.as_str()),
                ("path", "sweep"),
                ("outcome", "changed"),
            ],
        ),
        2
    );
    assert_eq!(
        counter(
            handler_metrics::DEAD_LETTERS,
            &[("reconciler", reconciler.as_str()), ("path", "sweep")],
        ),
        1
    );
}

#[test]
fn the_metric_names_follow_prometheus_conventions() {
    let counters = [
        outbox_metrics::EVENTS_APPENDED,
        outbox_metrics::EVENTS_PUBLISHED,
        outbox_metrics::PUBLISH_ERRORS,
        outbox_metrics::RELAY_REJECTS,
        outbox_metrics::RELAY_PARTITION_LOSSES,
        handler_metrics::RECONCILES,
        handler_metrics::RETRIES,
        handler_metrics::DEAD_LETTERS,
        sweep_metrics::SWEEP_RUNS,
        sweep_metrics::SWEEP_KEYS,
        sweep_metrics::LEASE_ACQUISITIONS,
        sweep_metrics::LEASE_LOSSES,
    ];
    let seconds = [
        outbox_metrics::RELAY_LAG,
        outbox_metrics::RELAY_HELD_BACK,
        outbox_metrics::RELAY_HOLDING_TRANSACTION,
        handler_metrics::RECONCILE_DURATION,
        handler_metrics::RATE_LIMIT_WAIT,
        sweep_metrics::SWEEP_RUN_DURATION,
    ];
    let all = counters
        .iter()
        .chain(&seconds)
        .chain(&[outbox_metrics::RELAY_PARTITIONS_OWNED]);
    for name in all {
        assert!(name.starts_with("converge_"), "{name}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{name} is not snake_case"
        );
    }
    assert!(counters.iter().all(|n| n.ends_with("_total")));
    assert!(seconds.iter().all(|n| n.ends_with("_seconds")));
}

/// A transaction holding an xid in another database of the same server keeps
/// the relay from publishing committed events: the lag gauge must grow while
/// they wait, not read 0 because the relay's read came back empty.
#[tokio::test]
async fn committed_events_held_back_by_another_databases_transaction_show_as_lag() {
    recorder();
    let env = TestEnv::new().await;
    let other = format!("{}_other", env.db_name);
    sqlx::query(&format!("CREATE DATABASE {other}"))
        .execute(&env.pool)
        .await
        .unwrap();
    let other_pool = sqlx::PgPool::connect_with(env.connect_options().database(&other))
        .await
        .unwrap();
    let mut holder = other_pool.begin().await.unwrap();
    let (pid, xid): (i32, String) =
        sqlx::query_as("SELECT pg_backend_pid(), pg_current_xact_id()::text")
            .fetch_one(&mut *holder)
            .await
            .unwrap();
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    for i in 0..3 {
        let mut tx = env.pool.begin().await.unwrap();
        Outbox::default()
            .append(
                &mut tx,
                &Shipped {
                    aggregate_type: "order".into(),
                    id: format!("o{i}"),
                },
            )
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let stream = env.stream.as_str();
    let lag = || gauge(outbox_metrics::RELAY_LAG, &[("stream", stream)]).unwrap_or(0.0);
    eventually(
        "the lag to grow past 2 s while three committed events wait",
        || lag() >= 2.0,
    )
    .await;
    assert!(env.read_stream(1, Duration::ZERO).await.is_empty());
    // Set by the relay's next pass (the lag is measured apart): on a loaded
    // machine it may come a moment after the lag.
    let held_back = || gauge(outbox_metrics::RELAY_HELD_BACK, &[("stream", stream)]).unwrap_or(0.0);
    eventually("the held-back gauge to pass 2 s", || held_back() >= 2.0).await;
    let pid = pid.to_string();
    let holding = [
        ("stream", stream),
        ("pid", pid.as_str()),
        ("database", other.as_str()),
        ("xid", xid.as_str()),
        ("state", "idle in transaction"),
        ("prepared", "false"),
    ];
    let named = gauge(outbox_metrics::RELAY_HOLDING_TRANSACTION, &holding).unwrap_or(0.0);
    assert!(
        named >= 2.0,
        "the holding transaction's series reads {named}"
    );

    holder.rollback().await.unwrap();
    env.read_stream(3, Duration::from_secs(10)).await;
    eventually("the lag to fall", || lag() < 1.0).await;
    eventually("the holding transaction's series to fall to 0", || {
        gauge(outbox_metrics::RELAY_HOLDING_TRANSACTION, &holding) == Some(0.0)
            && gauge(outbox_metrics::RELAY_HELD_BACK, &[("stream", stream)]) == Some(0.0)
    })
    .await;
    relay.shutdown().await.unwrap();
    other_pool.close().await;
    sqlx::query(&format!("DROP DATABASE {other} WITH (FORCE)"))
        .execute(&env.pool)
        .await
        .unwrap();
}
