//! Reconcilers on the fast path against real PostgreSQL and NATS JetStream:
//! redelivery after a dead worker, retries, dead letters and the recover hook,
//! panic isolation, one transition under concurrent runs, shared rate limits.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use converge::handlers::{
    run_key, Consumer, ConsumerConfig, Context, DeadLetter, Outcome, Rate, RateLimits,
    ReconcileError, Reconciler, RunResult, Trigger,
};
use converge::{DomainEvent, Outbox, Relay, RelayHandle};
use converge_tests::TestEnv;
use serde::Serialize;

#[derive(Serialize)]
struct Shipped {
    id: String,
}

impl DomainEvent for Shipped {
    fn aggregate_type(&self) -> &str {
        "order"
    }
    fn aggregate_id(&self) -> String {
        self.id.clone()
    }
    fn event_type(&self) -> &str {
        "Shipped"
    }
}

async fn setup() -> (TestEnv, RelayHandle) {
    let env = TestEnv::new().await;
    sqlx::query("CREATE TABLE orders (id text PRIMARY KEY, state text NOT NULL, note text)")
        .execute(&env.pool)
        .await
        .unwrap();
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    (env, relay)
}

async fn ship(env: &TestEnv, id: &str) {
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders (id, state) VALUES ($1, 'SHIPPED')")
        .bind(id)
        .execute(&mut *tx)
        .await
        .unwrap();
    Outbox::default()
        .append(&mut tx, &Shipped { id: id.into() })
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

fn config(env: &TestEnv, name: &str) -> ConsumerConfig {
    let mut c = ConsumerConfig::new(name, &env.stream, format!("{}.order.>", env.prefix));
    c.retry.initial_backoff = Duration::from_millis(50);
    c.retry.max_backoff = Duration::from_millis(200);
    c.retry.max_attempts = 3;
    c.ack_wait = Duration::from_secs(2);
    c.lock_wait = Duration::from_secs(2);
    c.shutdown_timeout = Duration::from_secs(3);
    // A killed worker's keys come free after this.
    c.key_lease = Duration::from_secs(3);
    c
}

async fn state(env: &TestEnv, id: &str) -> String {
    sqlx::query_scalar("SELECT state FROM orders WHERE id = $1")
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

async fn wait_until<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SHIPPED → INVOICED with a CAS; counts the side effects; behaviour per key
/// is scripted by `script(key, attempt)`.
struct Invoicer {
    calls: Arc<AtomicUsize>,
    script: fn(&str, u32) -> Result<(), ReconcileError>,
}

impl Reconciler for Invoicer {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        (self.script)(key, ctx.attempt())?;
        let moved =
            sqlx::query("UPDATE orders SET state = 'INVOICED' WHERE id = $1 AND state = 'SHIPPED'")
                .bind(key)
                .execute(ctx.pool())
                .await?
                .rows_affected();
        if moved == 1 {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(Outcome::Changed)
        } else {
            Ok(Outcome::Unchanged)
        }
    }

    async fn recover(
        &self,
        ctx: &Context,
        key: &str,
        error: &ReconcileError,
    ) -> Result<(), ReconcileError> {
        sqlx::query("UPDATE orders SET state = 'FAILED', note = $2 WHERE id = $1")
            .bind(key)
            .bind(error.to_string())
            .execute(ctx.pool())
            .await?;
        Ok(())
    }
}

fn invoicer(script: fn(&str, u32) -> Result<(), ReconcileError>) -> (Invoicer, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    (
        Invoicer {
            calls: calls.clone(),
            script,
        },
        calls,
    )
}

#[tokio::test]
async fn events_drive_the_reconciler_and_duplicates_cost_nothing() {
    let (env, relay) = setup().await;
    let (r, calls) = invoicer(|_, _| Ok(()));
    let consumer = Consumer::new(
        env.pool.clone(),
        env.nats.clone(),
        r,
        config(&env, "invoicing"),
    )
    .start()
    .await
    .unwrap();
    for i in 0..20 {
        ship(&env, &format!("o{i}")).await;
    }
    wait_until("20 invoices", Duration::from_secs(15), || async {
        calls.load(Ordering::SeqCst) == 20
    })
    .await;
    // Replaying the stream's events (a redelivery storm) changes nothing.
    let mut replay = env.js.get_stream(&env.stream).await.unwrap();
    let seq = replay.info().await.unwrap().state.last_sequence;
    for s in 1..=seq {
        let m = replay.get_raw_message(s).await.unwrap();
        let mut headers = m.headers.clone();
        headers.insert("Nats-Msg-Id", format!("replay-{s}").as_str());
        env.js
            .publish_with_headers(m.subject.to_string(), headers, m.payload.clone())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        20,
        "a duplicate event ran a side effect again"
    );
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn transient_failures_are_retried_until_success() {
    let (env, relay) = setup().await;
    let (r, calls) = invoicer(|_, attempt| {
        if attempt < 3 {
            Err(ReconcileError::retryable("identity API returned 503"))
        } else {
            Ok(())
        }
    });
    let consumer = Consumer::new(
        env.pool.clone(),
        env.nats.clone(),
        r,
        config(&env, "invoicing"),
    )
    .start()
    .await
    .unwrap();
    ship(&env, "o1").await;
    wait_until("the third attempt", Duration::from_secs(15), || async {
        state(&env, "o1").await == "INVOICED"
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(DeadLetter::list(&env.pool, None, 10)
        .await
        .unwrap()
        .is_empty());
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn permanent_failures_and_exhausted_retries_land_in_dead_letters_and_recover() {
    let (env, relay) = setup().await;
    let (r, calls) = invoicer(|key, _| match key {
        "bad" => Err(ReconcileError::permanent("customer has no billing address")),
        "flaky" => Err(ReconcileError::retryable("timeout")),
        _ => Ok(()),
    });
    let consumer = Consumer::new(
        env.pool.clone(),
        env.nats.clone(),
        r,
        config(&env, "invoicing"),
    )
    .start()
    .await
    .unwrap();
    ship(&env, "bad").await;
    ship(&env, "flaky").await;
    ship(&env, "good").await;
    wait_until("two dead letters", Duration::from_secs(20), || async {
        DeadLetter::list(&env.pool, Some("invoicing"), 10)
            .await
            .unwrap()
            .len()
            == 2
    })
    .await;
    // The hook sets FAILED; its letter records the recovery just after.
    wait_until(
        "recover hooks, recorded",
        Duration::from_secs(10),
        || async {
            state(&env, "bad").await == "FAILED"
                && state(&env, "flaky").await == "FAILED"
                && DeadLetter::list(&env.pool, Some("invoicing"), 10)
                    .await
                    .unwrap()
                    .iter()
                    .all(|d| d.recovered_at.is_some())
        },
    )
    .await;
    let letters = DeadLetter::list(&env.pool, Some("invoicing"), 10)
        .await
        .unwrap();
    let bad = letters.iter().find(|d| d.aggregate_key == "bad").unwrap();
    assert!(bad.permanent);
    assert_eq!(bad.attempts, 1, "a permanent error is not retried");
    assert!(bad.error.contains("billing address"), "{}", bad.error);
    assert!(bad.event_id.is_some() && bad.subject.is_some() && bad.first_attempt_at.is_some());
    let flaky = letters.iter().find(|d| d.aggregate_key == "flaky").unwrap();
    assert!(!flaky.permanent);
    assert_eq!(flaky.attempts, 3);
    assert!(flaky.recovered_at.is_some());
    // Its event may be published in a later pass than theirs (the relay's
    // visibility gate waits for other tests' transactions), so wait for it:
    // a key blocked behind the failing ones would never get there.
    wait_until(
        "other keys are not blocked",
        Duration::from_secs(20),
        || async { state(&env, "good").await == "INVOICED" },
    )
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_panicking_reconciler_fails_its_key_and_the_worker_keeps_going() {
    let (env, relay) = setup().await;
    let (r, calls) = invoicer(|key, _| {
        if key == "boom" {
            panic!("index out of bounds in the invoice template");
        }
        Ok(())
    });
    let consumer = Consumer::new(
        env.pool.clone(),
        env.nats.clone(),
        r,
        config(&env, "invoicing"),
    )
    .start()
    .await
    .unwrap();
    ship(&env, "boom").await;
    for i in 0..5 {
        ship(&env, &format!("o{i}")).await;
    }
    wait_until("the other keys", Duration::from_secs(15), || async {
        calls.load(Ordering::SeqCst) == 5
    })
    .await;
    wait_until(
        "the panicking key's dead letter",
        Duration::from_secs(15),
        || async {
            !DeadLetter::list(&env.pool, None, 10)
                .await
                .unwrap()
                .is_empty()
        },
    )
    .await;
    let letter = &DeadLetter::list(&env.pool, None, 10).await.unwrap()[0];
    assert_eq!(letter.aggregate_key, "boom");
    assert!(letter.error.contains("panicked"), "{}", letter.error);
    // Still alive: a new event is handled.
    ship(&env, "after").await;
    wait_until("a key after the panic", Duration::from_secs(10), || async {
        state(&env, "after").await == "INVOICED"
    })
    .await;
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

/// Blocks forever on its first delivery, as a worker that hangs and is killed.
struct Hangs {
    calls: Arc<AtomicUsize>,
}

impl Reconciler for Hangs {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        if ctx.attempt() == 1 {
            std::future::pending::<()>().await;
        }
        sqlx::query("UPDATE orders SET state = 'INVOICED' WHERE id = $1 AND state = 'SHIPPED'")
            .bind(key)
            .execute(ctx.pool())
            .await?;
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Outcome::Changed)
    }
}

#[tokio::test]
async fn an_event_is_redelivered_when_its_worker_dies_before_ack() {
    let (env, relay) = setup().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let first = Consumer::new(
        env.pool.clone(),
        env.nats.clone(),
        Hangs {
            calls: calls.clone(),
        },
        config(&env, "invoicing"),
    )
    .start()
    .await
    .unwrap();
    ship(&env, "o1").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(state(&env, "o1").await, "SHIPPED");
    first.kill().await; // dies holding the event, unacked
    let second = Consumer::new(
        env.pool.clone(),
        env.nats.clone(),
        Hangs {
            calls: calls.clone(),
        },
        config(&env, "invoicing"),
    )
    .start()
    .await
    .unwrap();
    wait_until("the redelivery", Duration::from_secs(15), || async {
        state(&env, "o1").await == "INVOICED"
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    second.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

/// Claims with a CAS, makes one "external call", finishes: the shape of a real step.
struct ClaimOnce {
    external_calls: Arc<AtomicUsize>,
}

impl Reconciler for ClaimOnce {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let state: String = sqlx::query_scalar("SELECT state FROM orders WHERE id = $1")
            .bind(key)
            .fetch_one(ctx.pool())
            .await?;
        if state != "SHIPPED" {
            return Ok(Outcome::Unchanged);
        }
        // Between the read and the write a second run would double the call,
        // were it not for the key lock.
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.external_calls.fetch_add(1, Ordering::SeqCst);
        sqlx::query("UPDATE orders SET state = 'INVOICED' WHERE id = $1")
            .bind(key)
            .execute(ctx.pool())
            .await?;
        Ok(Outcome::Changed)
    }
}

#[tokio::test]
async fn concurrent_runs_of_one_key_from_every_path_apply_one_transition() {
    let (env, relay) = setup().await;
    sqlx::query("INSERT INTO orders (id, state) VALUES ('k', 'SHIPPED')")
        .execute(&env.pool)
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let reconciler = Arc::new(ClaimOnce {
        external_calls: calls.clone(),
    });
    let runs = (0..10).map(|i| {
        let pool = env.pool.clone();
        let reconciler = reconciler.clone();
        tokio::spawn(async move {
            let trigger = if i % 2 == 0 {
                Trigger::Sweep {
                    sweep: "invoices".into(),
                }
            } else {
                Trigger::Manual {
                    reason: Some("operator".into()),
                }
            };
            let ctx = Context::new(pool, trigger, 1, RateLimits::default(), format!("w{i}"));
            loop {
                match run_key(reconciler.as_ref(), "invoicing", &ctx, "k").await {
                    RunResult::Busy => tokio::time::sleep(Duration::from_millis(10)).await,
                    other => return other,
                }
            }
        })
    });
    let results = futures::future::join_all(runs).await;
    let changed = results
        .iter()
        .filter(|r| matches!(r.as_ref().unwrap(), RunResult::Done(Outcome::Changed)))
        .count();
    assert_eq!(changed, 1);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the external call was doubled"
    );
    relay.shutdown().await.unwrap();
}

/// Calls a 2-per-second "API" through the shared limiter and records when.
struct Limited {
    stamps: Arc<Mutex<Vec<tokio::time::Instant>>>,
}

impl Reconciler for Limited {
    async fn reconcile(&self, ctx: &Context, _key: &str) -> Result<Outcome, ReconcileError> {
        ctx.acquire("identity-api").await?;
        self.stamps
            .lock()
            .unwrap()
            .push(tokio::time::Instant::now());
        Ok(Outcome::Changed)
    }
}

#[tokio::test]
async fn a_rate_limit_holds_across_the_event_path_and_manual_runs() {
    let (env, relay) = setup().await;
    let limits = RateLimits::new().local("identity-api", Rate::per_second(2));
    let stamps = Arc::new(Mutex::new(Vec::new()));
    let mut c = config(&env, "sync");
    c.concurrency = 8;
    let consumer = Consumer::new(
        env.pool.clone(),
        env.nats.clone(),
        Limited {
            stamps: stamps.clone(),
        },
        c,
    )
    .with_limits(limits.clone())
    .start()
    .await
    .unwrap();
    for i in 0..4 {
        ship(&env, &format!("e{i}")).await;
    }
    // Meanwhile, a "sweep" runs four other keys through the same reconciler.
    let manual = Limited {
        stamps: stamps.clone(),
    };
    for i in 0..4 {
        let ctx = Context::new(
            env.pool.clone(),
            Trigger::Sweep {
                sweep: "sync".into(),
            },
            1,
            limits.clone(),
            "sweeper",
        );
        assert!(matches!(
            run_key(&manual, "sync", &ctx, &format!("s{i}")).await,
            RunResult::Done(_)
        ));
    }
    wait_until("eight calls", Duration::from_secs(20), || async {
        stamps.lock().unwrap().len() == 8
    })
    .await;
    let mut t = stamps.lock().unwrap().clone();
    t.sort();
    for (i, start) in t.iter().enumerate() {
        let in_window = t[i..]
            .iter()
            .filter(|x| x.duration_since(*start) < Duration::from_secs(1))
            .count();
        assert!(in_window <= 2, "{in_window} calls within one second");
    }
    assert!(
        t[7].duration_since(t[0]) >= Duration::from_millis(3400),
        "8 calls at 2/s take 3.5 s"
    );
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn events_of_one_key_in_flight_at_once_run_it_once() {
    let (env, relay) = setup().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let mut c = config(&env, "invoicing");
    c.concurrency = 8;
    let consumer = Consumer::new(
        env.pool.clone(),
        env.nats.clone(),
        ClaimOnce {
            external_calls: calls.clone(),
        },
        c,
    )
    .start()
    .await
    .unwrap();
    // One order, six events in one transaction: all six reach the consumer together.
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders (id, state) VALUES ('k', 'SHIPPED')")
        .execute(&mut *tx)
        .await
        .unwrap();
    let events: Vec<Shipped> = (0..6).map(|_| Shipped { id: "k".into() }).collect();
    Outbox::default()
        .append_all(&mut tx, &events)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    wait_until("the order invoiced", Duration::from_secs(15), || async {
        state(&env, "k").await == "INVOICED"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one key ran twice at once");
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}
