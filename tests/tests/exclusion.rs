//! Key exclusion where production runs: a run whose lease is lost stops
//! before another run of the key starts; a killed backend releases nothing;
//! fenced writes fail after a takeover; a page releases each key when it is
//! done; waiting for a busy key neither lets JetStream redeliver nor uses up
//! attempts; idempotency keys stay put across retries.
//!
//! Every check counts effects (calls to a fake external service, with their
//! times), not rows a constraint would de-duplicate.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use converge::handlers::{
    run_key, run_keys, Consumer, ConsumerConfig, Context, DeadLetter, ExclusionLost, Outcome,
    RateLimits, ReconcileError, Reconciler, RunResult, Trigger,
};
use converge::{Outbox, Relay};
use converge_tests::{AccountChanged, ProxyMode, TcpProxy, TestEnv};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::time::Instant;
use uuid::Uuid;

const NAME: &str = "billing";

/// One call to the fake external service: who made it, when it started and ended.
#[derive(Debug, Clone)]
struct Call {
    who: &'static str,
    started: Instant,
    ended: Instant,
}

/// A reconciler that makes `calls` calls of `each` to an external service
/// that touches no database, and records them.
struct Caller {
    who: &'static str,
    calls: usize,
    each: Duration,
    log: Arc<Mutex<Vec<Call>>>,
}

impl Reconciler for Caller {
    async fn reconcile(&self, _ctx: &Context, _key: &str) -> Result<Outcome, ReconcileError> {
        for _ in 0..self.calls {
            let started = Instant::now();
            tokio::time::sleep(self.each).await;
            self.log.lock().unwrap().push(Call {
                who: self.who,
                started,
                ended: Instant::now(),
            });
        }
        Ok(Outcome::Changed)
    }
}

fn manual(pool: PgPool, claimant: &str, lease: Duration) -> Context {
    Context::new(
        pool,
        Trigger::Manual { reason: None },
        1,
        RateLimits::default(),
        claimant,
    )
    .with_key_lease(lease)
}

/// No call of `b` starts before the last call of `a` ended.
fn assert_no_overlap(log: &[Call]) {
    let last_a = log.iter().filter(|c| c.who == "a").map(|c| c.ended).max();
    let first_b = log.iter().filter(|c| c.who == "b").map(|c| c.started).min();
    if let (Some(last_a), Some(first_b)) = (last_a, first_b) {
        assert!(
            first_b >= last_a,
            "run b called the service {:?} before run a's last call ended: two runs of one key at once",
            last_a - first_b
        );
    }
}

/// Keeps trying the key as run `b` until it runs; returns its result.
async fn run_b_when_free(
    ctx: &Context,
    log: &Arc<Mutex<Vec<Call>>>,
    within: Duration,
) -> RunResult {
    let b = Caller {
        who: "b",
        calls: 1,
        each: Duration::from_millis(10),
        log: log.clone(),
    };
    let deadline = Instant::now() + within;
    loop {
        match run_key(&b, NAME, ctx, "k1").await {
            RunResult::Busy if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_cut_off_from_postgres_stops_before_another_run_of_its_key_starts() {
    let env = TestEnv::new().await;
    let opts = env.connect_options();
    let proxy = TcpProxy::start(&format!("{}:{}", opts.get_host(), opts.get_port())).await;
    let pool_a = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(1))
        .connect_with(opts.clone().host("127.0.0.1").port(proxy.port()))
        .await
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let a = Caller {
        who: "a",
        calls: 60,
        each: Duration::from_millis(100),
        log: log.clone(),
    };
    let ctx_a = manual(pool_a, "worker-a", Duration::from_secs(2));
    let run_a = tokio::spawn(async move { run_key(&a, NAME, &ctx_a, "k1").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Run a's database goes away while it calls the service.
    proxy.set(ProxyMode::Cut);
    let ctx_b = manual(env.pool.clone(), "worker-b", Duration::from_secs(2));
    let b = run_b_when_free(&ctx_b, &log, Duration::from_secs(15)).await;
    assert!(matches!(b, RunResult::Done(_)), "run b: {b:?}");
    let a = run_a.await.unwrap();
    let RunResult::Failed(e) = &a else {
        panic!("run a should have been stopped, got {a:?}")
    };
    assert!(ExclusionLost::in_error(e).is_some(), "{e}");
    let log = log.lock().unwrap().clone();
    assert!(
        log.iter().filter(|c| c.who == "a").count() < 60,
        "run a was never stopped"
    );
    assert_no_overlap(&log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_backend_releases_no_running_key() {
    let env = TestEnv::new().await;
    let pool_a = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(env.connect_options().application_name("exclusion-run-a"))
        .await
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let a = Caller {
        who: "a",
        calls: 20,
        each: Duration::from_millis(100),
        log: log.clone(),
    };
    let ctx_a = manual(pool_a, "worker-a", Duration::from_secs(2));
    let run_a = tokio::spawn(async move { run_key(&a, NAME, &ctx_a, "k1").await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    // What a fail-over, `idle_session_timeout` or an operator does to run a's sessions.
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'exclusion-run-a'",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert!(!killed.is_empty(), "run a had no session to kill");
    let ctx_b = manual(env.pool.clone(), "worker-b", Duration::from_secs(2));
    let b = run_b_when_free(&ctx_b, &log, Duration::from_secs(15)).await;
    assert!(matches!(b, RunResult::Done(_)), "run b: {b:?}");
    let a = run_a.await.unwrap();
    assert!(
        matches!(a, RunResult::Done(_)),
        "run a keeps its lease through a reconnect: {a:?}"
    );
    let log = log.lock().unwrap().clone();
    assert_eq!(log.iter().filter(|c| c.who == "a").count(), 20);
    assert_no_overlap(&log);
}

/// Writes its claimant into `notes` under the fence, after waiting for `go`.
struct FencedWriter {
    go: Arc<tokio::sync::Notify>,
    wait: bool,
}

impl Reconciler for FencedWriter {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        if self.wait {
            self.go.notified().await;
        }
        let mut tx = ctx.pool().begin().await?;
        ctx.check_fence(&mut tx).await?;
        sqlx::query("INSERT INTO notes (key, writer) VALUES ($1, $2)")
            .bind(key)
            .bind(ctx.claimant())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Outcome::Changed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fenced_write_fails_once_the_key_was_taken_over() {
    let env = TestEnv::new().await;
    sqlx::query("CREATE TABLE notes (key text, writer text)")
        .execute(&env.pool)
        .await
        .unwrap();
    let go = Arc::new(tokio::sync::Notify::new());
    let a = FencedWriter {
        go: go.clone(),
        wait: true,
    };
    let ctx_a = manual(env.pool.clone(), "worker-a", Duration::from_secs(60));
    let run_a = tokio::spawn(async move { run_key(&a, NAME, &ctx_a, "k1").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // An operator forces the key free (or its clock ran out); b takes it.
    let freed = sqlx::query(
        "UPDATE converge.key_leases SET expires_at = clock_timestamp() - interval '1 s' \
         WHERE reconciler = $1 AND key = 'k1'",
    )
    .bind(NAME)
    .execute(&env.pool)
    .await
    .unwrap();
    assert_eq!(freed.rows_affected(), 1, "run a holds a lease row");
    let b = FencedWriter {
        go: go.clone(),
        wait: false,
    };
    let ctx_b = manual(env.pool.clone(), "worker-b", Duration::from_secs(60));
    let rb = run_key(&b, NAME, &ctx_b, "k1").await;
    assert!(matches!(rb, RunResult::Done(_)), "{rb:?}");
    go.notify_one();
    let ra = run_a.await.unwrap();
    let RunResult::Failed(e) = &ra else {
        panic!("run a wrote after losing its key: {ra:?}")
    };
    assert!(ExclusionLost::in_error(e).is_some(), "{e}");
    let writers: Vec<String> = sqlx::query_scalar("SELECT writer FROM notes")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(writers, vec!["worker-b".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_page_releases_each_key_as_soon_as_it_is_done() {
    let env = TestEnv::new().await;
    let log = Arc::new(Mutex::new(Vec::new()));
    /// `fast` is done at once, `slow` takes 3 s.
    struct Page(Arc<Mutex<Vec<Call>>>);
    impl Reconciler for Page {
        async fn reconcile(&self, _ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
            if key == "slow" {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            let now = Instant::now();
            self.0.lock().unwrap().push(Call {
                who: "a",
                started: now,
                ended: now,
            });
            Ok(Outcome::Changed)
        }
    }
    let ctx = manual(env.pool.clone(), "sweeper-a", Duration::from_secs(10));
    let stop = tokio_util::sync::CancellationToken::new();
    let page = {
        let (ctx, stop, log) = (ctx.clone(), stop.clone(), log.clone());
        tokio::spawn(async move {
            let keys = vec!["fast".to_owned(), "slow".to_owned()];
            run_keys(&Page(log), NAME, &ctx, &keys, 2, &stop).await
        })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // The event path wants `fast` while the page still runs `slow`.
    let event_ctx = manual(env.pool.clone(), "worker-b", Duration::from_secs(10));
    let r = run_key(&Page(log.clone()), NAME, &event_ctx, "fast").await;
    assert!(
        matches!(r, RunResult::Done(_)),
        "a key the page finished stays busy until the page ends: {r:?}"
    );
    let results = page.await.unwrap();
    assert!(results.iter().all(|(_, r)| matches!(r, RunResult::Done(_))));
}

/// Counts runs and the attempt each saw; fails the first `fail_first` runs.
struct Counted {
    runs: AtomicUsize,
    attempts: Mutex<Vec<u32>>,
    fail_first: usize,
}

impl Reconciler for Counted {
    async fn reconcile(&self, ctx: &Context, _key: &str) -> Result<Outcome, ReconcileError> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst);
        self.attempts.lock().unwrap().push(ctx.attempt());
        if n < self.fail_first {
            return Err(ReconcileError::retryable(
                "the service is down for a moment",
            ));
        }
        Ok(Outcome::Changed)
    }
}

/// Holds key `k1` of `NAME` (as a sweep page would) for `hold`.
fn hold_key(env: &TestEnv, hold: Duration) -> tokio::task::JoinHandle<RunResult> {
    struct Hold(Duration);
    impl Reconciler for Hold {
        async fn reconcile(&self, _: &Context, _: &str) -> Result<Outcome, ReconcileError> {
            tokio::time::sleep(self.0).await;
            Ok(Outcome::Unchanged)
        }
    }
    let ctx = Context::new(
        env.pool.clone(),
        Trigger::Sweep {
            sweep: "holder".into(),
        },
        1,
        RateLimits::default(),
        "sweeper-x",
    );
    tokio::spawn(async move { run_key(&Hold(hold), NAME, &ctx, "k1").await })
}

async fn consumer_for(
    env: &TestEnv,
    reconciler: Arc<Counted>,
    ack_wait: Duration,
    lock_wait: Duration,
    max_attempts: u32,
) -> converge::handlers::ConsumerHandle {
    let mut c = ConsumerConfig::new(NAME, &env.stream, format!("{}.>", env.prefix));
    c.ack_wait = ack_wait;
    c.lock_wait = lock_wait;
    c.retry.max_attempts = max_attempts;
    c.retry.initial_backoff = Duration::from_millis(100);
    c.retry.max_backoff = Duration::from_millis(200);
    c.shutdown_timeout = Duration::from_secs(2);
    Consumer::new(env.pool.clone(), env.nats.clone(), reconciler, c)
        .start()
        .await
        .unwrap()
}

async fn append_for_k1(env: &TestEnv) {
    let mut tx = env.pool.begin().await.unwrap();
    Outbox::default()
        .append(&mut tx, &AccountChanged::new("k1"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_waiting_for_a_busy_key_is_not_redelivered_meanwhile() {
    let env = TestEnv::new().await;
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    let counted = Arc::new(Counted {
        runs: AtomicUsize::new(0),
        attempts: Mutex::new(Vec::new()),
        fail_first: 0,
    });
    // ack_wait (2 s) shorter than the wait for the key (6 s).
    let holder = hold_key(&env, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let consumer = consumer_for(
        &env,
        counted.clone(),
        Duration::from_secs(2),
        Duration::from_secs(8),
        5,
    )
    .await;
    append_for_k1(&env).await;
    holder.await.unwrap();
    wait_for("the event's run", Duration::from_secs(15), || {
        counted.runs.load(Ordering::SeqCst) >= 1
    })
    .await;
    // Long enough for a redelivery of an event that went unacknowledged.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        counted.runs.load(Ordering::SeqCst),
        1,
        "JetStream redelivered the event while it waited for its key"
    );
    assert_eq!(*counted.attempts.lock().unwrap(), vec![1]);
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn busy_rounds_use_no_attempts() {
    let env = TestEnv::new().await;
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    // Two attempts: the one transient failure must be retried, however many
    // times the event was put back because its key was busy.
    let counted = Arc::new(Counted {
        runs: AtomicUsize::new(0),
        attempts: Mutex::new(Vec::new()),
        fail_first: 1,
    });
    let holder = hold_key(&env, Duration::from_secs(4));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let consumer = consumer_for(
        &env,
        counted.clone(),
        Duration::from_secs(2),
        Duration::from_millis(500),
        2,
    )
    .await;
    append_for_k1(&env).await;
    holder.await.unwrap();
    wait_for("the retried run", Duration::from_secs(20), || {
        counted.runs.load(Ordering::SeqCst) >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let letters = DeadLetter::list(&env.pool, Some(NAME), 10).await.unwrap();
    assert!(
        letters.is_empty(),
        "dead-lettered after one failed run: {letters:?}"
    );
    assert_eq!(*counted.attempts.lock().unwrap(), vec![1, 2]);
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

/// Asks for the idempotency key of step `charge` and fails the first run
/// after asking; completes the step on the others.
struct Charger {
    keys: Mutex<Vec<Uuid>>,
    runs: AtomicU32,
}

impl Reconciler for Charger {
    async fn reconcile(&self, ctx: &Context, _key: &str) -> Result<Outcome, ReconcileError> {
        let key = ctx.idempotency_key("charge").await?;
        self.keys.lock().unwrap().push(key);
        if self.runs.fetch_add(1, Ordering::SeqCst) == 0 {
            // The call went out, the answer was lost: a retry must reuse the key.
            return Err(ReconcileError::retryable("timeout after sending"));
        }
        let mut tx = ctx.pool().begin().await?;
        ctx.check_fence(&mut tx).await?;
        ctx.complete_step(&mut tx, "charge").await?;
        tx.commit().await?;
        Ok(Outcome::Changed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_keys_hold_across_retries_and_change_for_the_next_step() {
    let env = TestEnv::new().await;
    let charger = Charger {
        keys: Mutex::new(Vec::new()),
        runs: AtomicU32::new(0),
    };
    let worker = manual(env.pool.clone(), "worker-a", Duration::from_secs(10));
    let sweep = Context::new(
        env.pool.clone(),
        Trigger::Sweep { sweep: "s".into() },
        1,
        RateLimits::default(),
        "sweeper-b",
    );
    assert!(matches!(
        run_key(&charger, NAME, &worker, "k1").await,
        RunResult::Failed(_)
    ));
    // Another path, another process: the same step, the same key.
    assert!(matches!(
        run_key(&charger, NAME, &sweep, "k1").await,
        RunResult::Done(_)
    ));
    // The step completed: its next occurrence is a new step.
    assert!(matches!(
        run_key(&charger, NAME, &worker, "k1").await,
        RunResult::Done(_)
    ));
    // Another key has keys of its own.
    assert!(matches!(
        run_key(&charger, NAME, &worker, "k2").await,
        RunResult::Done(_)
    ));
    let keys = charger.keys.lock().unwrap().clone();
    assert_eq!(keys.len(), 4);
    assert_eq!(keys[0], keys[1], "a retry got a new idempotency key");
    assert_ne!(keys[1], keys[2], "a completed step's key was reused");
    assert_ne!(keys[2], keys[3]);
    // Outside a run there is none: a clear error, not a made-up key.
    let outside = manual(env.pool.clone(), "x", Duration::from_secs(5));
    let e = outside.idempotency_key("charge").await.unwrap_err();
    assert!(e.to_string().contains("needs a run"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_existing_consumer_with_other_settings_is_updated_or_refused_by_name() {
    let env = TestEnv::new().await;
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    let counted = || {
        Arc::new(Counted {
            runs: AtomicUsize::new(0),
            attempts: Mutex::new(Vec::new()),
            fail_first: 0,
        })
    };
    let first = consumer_for(
        &env,
        counted(),
        Duration::from_secs(30),
        Duration::from_secs(1),
        3,
    )
    .await;
    first.shutdown().await.unwrap();
    // A new release shortens ack_wait: the durable consumer follows.
    let second = consumer_for(
        &env,
        counted(),
        Duration::from_secs(2),
        Duration::from_secs(1),
        3,
    )
    .await;
    second.shutdown().await.unwrap();
    let stream = env.js.get_stream(&env.stream).await.unwrap();
    let info = stream.consumer_info(NAME).await.unwrap();
    assert_eq!(
        info.config.ack_wait,
        Duration::from_secs(2),
        "the consumer kept its old ack_wait"
    );
    // Another filter: updated where the server allows it (2.10+), otherwise
    // refused naming the setting.
    let mut c = ConsumerConfig::new(NAME, &env.stream, format!("{}.account.>", env.prefix));
    c.ack_wait = Duration::from_secs(2);
    c.lock_wait = Duration::from_secs(1);
    c.retry.max_attempts = 3;
    match Consumer::new(env.pool.clone(), env.nats.clone(), counted(), c)
        .start()
        .await
    {
        Ok(handle) => {
            handle.shutdown().await.unwrap();
            let info = stream.consumer_info(NAME).await.unwrap();
            assert_eq!(
                info.config.filter_subject,
                format!("{}.account.>", env.prefix)
            );
        }
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains("filter subjects") && message.contains("nats consumer rm"),
                "{message}"
            );
        }
    }
    relay.shutdown().await.unwrap();
}

/// Opens a fenced transaction, reports it, waits for `go`, then writes.
struct HoldsFence {
    fenced: Arc<tokio::sync::Notify>,
    go: Arc<tokio::sync::Notify>,
}

impl Reconciler for HoldsFence {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let mut tx = ctx.pool().begin().await?;
        ctx.check_fence(&mut tx).await?;
        self.fenced.notify_one();
        self.go.notified().await;
        sqlx::query("INSERT INTO notes (key, writer) VALUES ($1, $2)")
            .bind(key)
            .bind(ctx.claimant())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Outcome::Changed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_fenced_transaction_keeps_an_expired_key_busy() {
    let env = TestEnv::new().await;
    sqlx::query("CREATE TABLE notes (key text, writer text)")
        .execute(&env.pool)
        .await
        .unwrap();
    let (fenced, go) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let a = HoldsFence {
        fenced: fenced.clone(),
        go: go.clone(),
    };
    let ctx_a = manual(env.pool.clone(), "worker-a", Duration::from_secs(60));
    let run_a = tokio::spawn(async move { run_key(&a, NAME, &ctx_a, "k1").await });
    fenced.notified().await;
    // The row expires while A's fenced transaction is still open (A stalled
    // between its check and its commit).
    sqlx::query(
        "UPDATE converge.key_leases SET expires_at = clock_timestamp() - interval '1 s' \
         WHERE reconciler = $1 AND key = 'k1'",
    )
    .bind(NAME)
    .execute(&env.pool)
    .await
    .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let b = Caller {
        who: "b",
        calls: 1,
        each: Duration::from_millis(1),
        log: log.clone(),
    };
    let ctx_b = manual(env.pool.clone(), "worker-b", Duration::from_secs(60));
    let rb = run_key(&b, NAME, &ctx_b, "k1").await;
    assert!(
        matches!(rb, RunResult::Busy),
        "the key was taken over under an open fenced transaction: {rb:?}"
    );
    go.notify_one();
    let ra = run_a.await.unwrap();
    assert!(matches!(ra, RunResult::Done(_)), "{ra:?}");
    // Now the expired row is free to take.
    let rb = run_key(&b, NAME, &ctx_b, "k1").await;
    assert!(
        matches!(rb, RunResult::Done(_)) || matches!(rb, RunResult::Busy),
        "{rb:?}"
    );
}
