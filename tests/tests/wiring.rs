//! Wiring checked at start: one registration binds a reconciler to its
//! events and its sweep under one name, and every mistake a user can make
//! with names, subjects, instance names or candidate SQL is refused by
//! `Worker::start`, naming it — against real Postgres and NATS.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use converge::handlers::{ConsumerConfig, Context, Outcome, ReconcileError, Reconciler};
use converge::sweeper::{KeyType, Schedule, SqlCandidates, SweepConfig, Timing};
use converge::{Event, Outbox, Worker, WorkerError};
use converge_tests::TestEnv;

#[derive(serde::Serialize)]
struct Captured {
    id: i64,
}

impl Event for Captured {
    const AGGREGATE_TYPE: &'static str = "payment";
    const EVENT_TYPE: &'static str = "Captured";
    fn aggregate_id(&self) -> String {
        self.id.to_string()
    }
}

/// Sends each captured payment's receipt: counts every send per payment
/// (the mail provider's view), so a double run is seen, not masked by a
/// flag or a unique constraint. Slow enough that an event and a sweep overlap.
#[derive(Default)]
struct Mailer {
    sends: Mutex<HashMap<String, u32>>,
}

impl Mailer {
    fn sends(&self) -> HashMap<String, u32> {
        self.sends.lock().unwrap().clone()
    }
}

impl Reconciler for Mailer {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let sent: Option<bool> =
            sqlx::query_scalar("SELECT receipt_sent FROM payments WHERE id = $1::bigint")
                .bind(key)
                .fetch_optional(ctx.pool())
                .await?;
        if sent != Some(false) {
            return Ok(Outcome::Unchanged);
        }
        tokio::time::sleep(Duration::from_millis(300)).await; // the provider's call
        *self
            .sends
            .lock()
            .unwrap()
            .entry(key.to_owned())
            .or_default() += 1;
        sqlx::query("UPDATE payments SET receipt_sent = true WHERE id = $1::bigint")
            .bind(key)
            .execute(ctx.pool())
            .await?;
        Ok(Outcome::Changed)
    }
}

async fn payments(env: &TestEnv) {
    sqlx::query("CREATE TABLE payments (id bigint PRIMARY KEY, receipt_sent boolean NOT NULL DEFAULT false)")
        .execute(&env.pool)
        .await
        .unwrap();
}

fn unsent() -> SqlCandidates {
    SqlCandidates::keyset("payments", "id", KeyType::BigInt, "NOT receipt_sent")
}

fn every(ms: u64) -> Timing {
    Timing::new(Schedule::fixed_rate(Duration::from_millis(ms)).unwrap())
}

fn config_error(result: Result<converge::WorkerHandle, WorkerError>) -> String {
    match result {
        Ok(_) => panic!("the worker started; it should have been refused"),
        Err(e) => {
            assert!(!e.is_retryable(), "a wiring mistake is not retryable: {e}");
            e.to_string()
        }
    }
}

async fn capture(env: &TestEnv, ids: std::ops::RangeInclusive<i64>) {
    let outbox = Outbox::default();
    for id in ids {
        let mut tx = env.pool.begin().await.unwrap();
        sqlx::query("INSERT INTO payments (id) VALUES ($1)")
            .bind(id)
            .execute(&mut *tx)
            .await
            .unwrap();
        outbox.append(&mut tx, &Captured { id }).await.unwrap();
        tx.commit().await.unwrap();
    }
}

async fn wait_all_sent(env: &TestEnv, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM payments WHERE NOT receipt_sent")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        if left == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} payments without a receipt"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The mistake the issue measured (20 payments, 21 receipts): a consumer and
/// a sweep of one reconciler under two names take two leases per key, so an
/// event and a sweep run it twice at once. It is refused at start.
#[tokio::test(flavor = "multi_thread")]
async fn one_reconciler_under_two_names_is_refused() {
    let env = TestEnv::new().await;
    payments(&env).await;
    let mailer = Arc::new(Mailer::default());
    let subject = format!("{}.payment.Captured", env.prefix);
    let e = config_error(
        Worker::new(env.pool.clone(), env.nats.clone(), "pay")
            .relay(env.relay_config())
            .consumer(
                ConsumerConfig::new("receipts", env.stream.as_str(), subject),
                mailer.clone(),
            )
            .sweep(
                SweepConfig::new("receipt-sweep", "receipt-mailer", every(200)),
                unsent(),
                mailer,
            )
            .start()
            .await,
    );
    assert!(
        e.contains("two names") && e.contains("\"receipts\"") && e.contains("\"receipt-mailer\""),
        "{e}"
    );
}

/// One registration: the consumer's subject is derived from the event type,
/// the consumer and the sweep share the name (so each key's lease), events
/// and sweeps overlap on every key, and every payment gets exactly one
/// receipt (counted at the provider, by idempotency key).
#[tokio::test(flavor = "multi_thread")]
async fn one_registration_converges_every_key_once_by_both_paths() {
    let env = TestEnv::new().await;
    payments(&env).await;
    let mailer = Arc::new(Mailer::default());
    let worker = Worker::new(env.pool.clone(), env.nats.clone(), "pay")
        .relay(env.relay_config())
        .reconciler("receipt-mailer", mailer.clone())
        .on::<Captured>()
        .sweep_with(every(100), unsent(), |s| {
            s.lease.lock_at_least_for = Duration::ZERO;
        })
        .start()
        .await
        .expect("worker starts");
    capture(&env, 1..=30).await;
    wait_all_sent(&env, Duration::from_secs(60)).await;
    let registered: (Vec<String>, Vec<String>) =
        sqlx::query_as("SELECT consumers, sweeps FROM converge.workers")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(registered.0, vec![format!("{}/receipt-mailer", env.stream)]);
    assert_eq!(registered.1, vec!["receipt-mailer".to_owned()]);
    // The consumer read every event on the derived subject.
    let info = env
        .js
        .get_stream(&env.stream)
        .await
        .unwrap()
        .consumer_info("receipt-mailer")
        .await
        .unwrap()
        .clone();
    assert_eq!(info.delivered.stream_sequence, 30, "{info:?}");
    worker.shutdown().await.unwrap();
    let sends = mailer.sends();
    assert_eq!(sends.len(), 30, "one receipt per payment: {sends:?}");
    let doubled: Vec<_> = sends.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "receipts sent twice: {doubled:?}");
}

/// A typo'd subject (or another stream's prefix) would silently disable the
/// fast path, and the sweep would hide it: refused at start, naming it —
/// against the relay's stream, and against a stream as the server has it.
#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_its_stream_cannot_feed_is_refused() {
    let env = TestEnv::new().await;
    payments(&env).await;
    let mailer = Arc::new(Mailer::default());
    let e = config_error(
        Worker::new(env.pool.clone(), env.nats.clone(), "pay")
            .relay(env.relay_config())
            .consumer(
                ConsumerConfig::new(
                    "receipt-mailer",
                    env.stream.as_str(),
                    "payments.payment.Captured",
                ),
                mailer.clone(),
            )
            .start()
            .await,
    );
    assert!(
        e.contains("payments.payment.Captured") && e.contains("never receive"),
        "{e}"
    );

    // A stream another process created, capturing other subjects.
    let other = format!("{}_OTHER", env.stream);
    env.js
        .create_stream(async_nats::jetstream::stream::Config {
            name: other.clone(),
            subjects: vec![format!("{}other.>", env.prefix)],
            ..Default::default()
        })
        .await
        .unwrap();
    let e = config_error(
        Worker::new(env.pool.clone(), env.nats.clone(), "pay")
            .consumer(
                ConsumerConfig::new(
                    "receipt-mailer",
                    other.as_str(),
                    format!("{}.payment.Captured", env.prefix),
                ),
                mailer.clone(),
            )
            .start()
            .await,
    );
    assert!(e.contains(&other) && e.contains("never receive"), "{e}");
    env.js.delete_stream(&other).await.unwrap();

    // Events without a stream to read them from.
    let e = config_error(
        Worker::new(env.pool.clone(), env.nats.clone(), "pay")
            .reconciler("receipt-mailer", mailer)
            .on::<Captured>()
            .start()
            .await,
    );
    assert!(e.contains("no stream") && e.contains(".relay("), "{e}");
}

/// An instance name set on a part is not silently replaced by the worker's.
#[tokio::test(flavor = "multi_thread")]
async fn an_instance_name_set_on_a_part_is_refused_not_replaced() {
    let env = TestEnv::new().await;
    let mailer = Arc::new(Mailer::default());
    let mut relay = env.relay_config();
    relay.instance_name = "relay-a".into();
    let e = config_error(
        Worker::new(env.pool.clone(), env.nats.clone(), "pay")
            .instance_name("worker-1")
            .relay(relay)
            .start()
            .await,
    );
    assert!(
        e.contains("\"relay-a\"") && e.contains("\"worker-1\""),
        "{e}"
    );

    let e = config_error(
        Worker::new(env.pool.clone(), env.nats.clone(), "pay")
            .instance_name("worker-1")
            .relay(env.relay_config())
            .reconciler("receipt-mailer", mailer)
            .on::<Captured>()
            .consumer_settings(|c| c.instance_name = "consumer-b".into())
            .start()
            .await,
    );
    assert!(
        e.contains("\"consumer-b\"") && e.contains("\"worker-1\""),
        "{e}"
    );
}

/// Candidate SQL returning a non-text key, comparing the key without a
/// cast, or a backlog of the wrong types used to start fine and fail every
/// run (logged at INFO): refused at start, naming the fix.
#[tokio::test(flavor = "multi_thread")]
async fn candidate_sql_the_sweep_cannot_read_is_refused_at_start() {
    let env = TestEnv::new().await;
    sqlx::query("CREATE TABLE payments (id bigint PRIMARY KEY, receipt_sent boolean NOT NULL DEFAULT false, captured_at timestamp NOT NULL DEFAULT now())")
        .execute(&env.pool)
        .await
        .unwrap();
    let start = |candidates: SqlCandidates| {
        let mailer = Arc::new(Mailer::default());
        Worker::new(env.pool.clone(), env.nats.clone(), "pay")
            .reconciler("receipt-mailer", mailer)
            .sweep(every(60_000), candidates)
            .start()
    };
    let e = config_error(
        start(SqlCandidates::new(
            "SELECT id AS key FROM payments WHERE NOT receipt_sent \
             AND ($1::text IS NULL OR id > $1::bigint) ORDER BY id LIMIT $2",
        ))
        .await,
    );
    assert!(
        e.contains("\"receipt-mailer\"") && e.contains("int8") && e.contains("::text"),
        "{e}"
    );

    let e = config_error(
        start(SqlCandidates::new(
            "SELECT id::text AS key FROM payments WHERE ($1::bigint IS NULL OR id > $1) ORDER BY id LIMIT $2",
        ))
        .await,
    );
    assert!(e.contains("parameters") && e.contains("$1::text"), "{e}");

    let e = config_error(start(SqlCandidates::new("SELECT id::text FROM paymentz LIMIT $2")).await);
    assert!(
        e.contains("does not prepare") && e.contains("paymentz"),
        "{e}"
    );

    let e = config_error(
        start(unsent().with_backlog("SELECT count(*), min(captured_at) FROM payments")).await,
    );
    assert!(e.contains("backlog") && e.contains("timestamptz"), "{e}");

    // The keyset builder's SQL passes.
    let ok = start(unsent().with_backlog(
        "SELECT count(*), min(captured_at) AT TIME ZONE 'UTC' FROM payments WHERE NOT receipt_sent",
    ))
    .await
    .expect("a well-formed sweep starts");
    ok.shutdown().await.unwrap();
}

#[derive(serde::Serialize)]
struct Refunded {
    id: i64,
}

impl Event for Refunded {
    const AGGREGATE_TYPE: &'static str = "payment";
    const EVENT_TYPE: &'static str = "Refunded";
    fn aggregate_id(&self) -> String {
        self.id.to_string()
    }
}

/// Two event types for one reconciler need several filter subjects, which
/// NATS 2.10 added; an older server silently makes an unfiltered consumer
/// (every event would reach the reconciler): refused there, naming 2.10.
#[tokio::test(flavor = "multi_thread")]
async fn several_event_types_need_nats_2_10_and_say_so_on_older_servers() {
    let env = TestEnv::new().await;
    payments(&env).await;
    let version = env.nats.server_info().version;
    let old = version.starts_with("2.9.") || version.starts_with("2.8.");
    let started = Worker::new(env.pool.clone(), env.nats.clone(), "pay")
        .relay(env.relay_config())
        .reconciler("receipt-mailer", Arc::new(Mailer::default()))
        .on::<Captured>()
        .on::<Refunded>()
        .start()
        .await;
    match started {
        Ok(worker) => {
            assert!(!old, "nats-server {version} made an unfiltered consumer");
            let info = env
                .js
                .get_stream(&env.stream)
                .await
                .unwrap()
                .consumer_info("receipt-mailer")
                .await
                .unwrap()
                .clone();
            let mut filters = info.config.filter_subjects.clone();
            filters.sort();
            assert_eq!(
                filters,
                vec![
                    format!("{}.payment.Captured", env.prefix),
                    format!("{}.payment.Refunded", env.prefix)
                ]
            );
            worker.shutdown().await.unwrap();
        }
        Err(e) => {
            assert!(old, "nats-server {version} refused: {e}");
            assert!(e.to_string().contains("2.10"), "{e}");
        }
    }
}
