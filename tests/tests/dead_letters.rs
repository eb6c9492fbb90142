//! Dead letters keep their promise: one open letter per reconciler and key;
//! a replayed event that fails again is recorded and recovered again; a sweep
//! failing again on a recovered key does not re-run the hook unless the
//! failure turned permanent; a crash between
//! recording and the hook runs the hook later; a letter whose key a later run
//! changed is resolved, and audited.
//!
//! The checks count recover-hook calls (effects), not rows.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use converge::handlers::{
    dead_letter_key, run_key, Consumer, ConsumerConfig, Context, Outcome, RateLimits,
    ReconcileError, Reconciler, RunResult, Trigger,
};
use converge::{Outbox, Relay};
use converge_tests::{AccountChanged, TestEnv};
use tokio::time::Instant;

const NAME: &str = "ledger";

/// Fails every run permanently while `failing`; counts recover calls.
#[derive(Default)]
struct Flaky {
    failing: std::sync::atomic::AtomicBool,
    recovered: AtomicUsize,
}

impl Reconciler for Flaky {
    async fn reconcile(&self, _ctx: &Context, _key: &str) -> Result<Outcome, ReconcileError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(ReconcileError::permanent("the ledger refuses this account"));
        }
        Ok(Outcome::Changed)
    }

    async fn recover(
        &self,
        _ctx: &Context,
        _key: &str,
        _error: &ReconcileError,
    ) -> Result<(), ReconcileError> {
        self.recovered.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn flaky(failing: bool) -> Arc<Flaky> {
    let f = Flaky::default();
    f.failing.store(failing, Ordering::SeqCst);
    Arc::new(f)
}

/// (open letters, all letters) of key `k`.
async fn letters(env: &TestEnv, key: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE resolved_at IS NULL), count(*) \
         FROM converge.dead_letters WHERE reconciler = $1 AND aggregate_key = $2",
    )
    .bind(NAME)
    .bind(key)
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

async fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sweep_ctx(env: &TestEnv) -> Context {
    Context::new(
        env.pool.clone(),
        Trigger::Sweep {
            sweep: "nightly".into(),
        },
        3,
        RateLimits::default(),
        "sweeper-1/ledger",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replayed_event_that_fails_again_is_recorded_and_recovered() {
    let env = TestEnv::new().await;
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    let reconciler = flaky(true);
    let mut config = ConsumerConfig::new(NAME, &env.stream, format!("{}.>", env.prefix));
    config.shutdown_timeout = Duration::from_secs(2);
    let consumer = Consumer::new(
        env.pool.clone(),
        env.nats.clone(),
        reconciler.clone(),
        config,
    )
    .start()
    .await
    .unwrap();
    let mut tx = env.pool.begin().await.unwrap();
    Outbox::default()
        .append(&mut tx, &AccountChanged::new("acct-1"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    wait_for("the first recover", Duration::from_secs(15), || {
        reconciler.recovered.load(Ordering::SeqCst) == 1
    })
    .await;

    // The same event again (as `outbox replay` sends it: same event id, the
    // duplicate window long past — so without Nats-Msg-Id here).
    let original = env.read_stream(1, Duration::from_secs(5)).await;
    let replay = |_: usize| {
        let mut headers = async_nats::HeaderMap::new();
        for (name, value) in &original[0].headers {
            if !name.eq_ignore_ascii_case("Nats-Msg-Id") {
                headers.insert(name.as_str(), value.as_str());
            }
        }
        headers
    };
    env.js
        .publish_with_headers(
            original[0].subject.clone(),
            replay(0),
            serde_json::to_vec(&original[0].payload).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    wait_for("the replay's recover", Duration::from_secs(15), || {
        reconciler.recovered.load(Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(
        letters(&env, "acct-1").await,
        (1, 1),
        "one open letter per key"
    );

    // Resolved by an operator, then replayed and failing again: a new letter.
    sqlx::query("UPDATE converge.dead_letters SET resolved_at = now(), resolution = 'discarded'")
        .execute(&env.pool)
        .await
        .unwrap();
    env.js
        .publish_with_headers(
            original[0].subject.clone(),
            replay(1),
            serde_json::to_vec(&original[0].payload).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    wait_for("the third recover", Duration::from_secs(15), || {
        reconciler.recovered.load(Ordering::SeqCst) == 3
    })
    .await;
    assert_eq!(letters(&env, "acct-1").await, (1, 2));
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sweep_failing_again_keeps_one_letter_and_does_not_recover_twice() {
    let env = TestEnv::new().await;
    let reconciler = flaky(true);
    let ctx = sweep_ctx(&env);
    let error = ReconcileError::retryable("the ledger times out");
    for _ in 0..3 {
        let id = dead_letter_key(
            reconciler.as_ref(),
            NAME,
            &ctx,
            "acct-7",
            &error,
            3,
            None,
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert!(id.is_some());
    }
    assert_eq!(
        letters(&env, "acct-7").await,
        (1, 1),
        "one open letter per key"
    );
    assert_eq!(
        reconciler.recovered.load(Ordering::SeqCst),
        1,
        "the hook ran again for a key whose letter was open and recovered"
    );
    let attempts: i32 = sqlx::query_scalar(
        "SELECT attempts FROM converge.dead_letters WHERE aggregate_key = 'acct-7'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 9, "the letter counts every given-up attempt");
}

/// Records whether each error its recover hook was given was permanent.
#[derive(Default)]
struct Escalating {
    hooks: std::sync::Mutex<Vec<bool>>,
}

impl Reconciler for Escalating {
    async fn reconcile(&self, _ctx: &Context, _key: &str) -> Result<Outcome, ReconcileError> {
        Ok(Outcome::Unchanged)
    }

    async fn recover(
        &self,
        _ctx: &Context,
        _key: &str,
        error: &ReconcileError,
    ) -> Result<(), ReconcileError> {
        self.hooks.lock().unwrap().push(!error.is_retryable());
        Ok(())
    }
}

/// A sweep used up a key's attempts on a transient failure (the hook ran and,
/// as the invoicing example's does, left the key to the next sweep); a later
/// sweep fails the key permanently. The hook must run again with the
/// permanent error, or the key is never given up on (the invoicing order
/// never becomes FAILED and every sweep visits it again). Seen in CI: the
/// fault suite behind PgBouncer timed out on such an order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sweep_failing_permanently_after_attempts_ran_out_recovers_again() {
    let env = TestEnv::new().await;
    let reconciler = Escalating::default();
    let ctx = sweep_ctx(&env);
    let transient = ReconcileError::retryable("the ledger times out");
    let permanent = ReconcileError::permanent("the ledger refuses this account");
    for error in [&transient, &permanent, &permanent, &transient] {
        dead_letter_key(
            &reconciler,
            NAME,
            &ctx,
            "acct-9",
            error,
            3,
            None,
            Duration::from_secs(1),
        )
        .await
        .unwrap()
        .expect("a keyed letter");
    }
    assert_eq!(
        letters(&env, "acct-9").await,
        (1, 1),
        "one open letter per key"
    );
    assert_eq!(
        *reconciler.hooks.lock().unwrap(),
        vec![false, true],
        "the hook runs once for the exhausted attempts and once more when the \
         failure became permanent, never again for the same kind of failure"
    );
    let (permanent_letter, error): (bool, String) = sqlx::query_as(
        "SELECT permanent, error FROM converge.dead_letters WHERE aggregate_key = 'acct-9'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(
        permanent_letter,
        "the letter is permanent once a failure was"
    );
    assert!(
        error.contains("refuses"),
        "the permanent error stays: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_letter_whose_key_a_later_run_changed_is_resolved_and_audited() {
    let env = TestEnv::new().await;
    let reconciler = flaky(true);
    let ctx = sweep_ctx(&env);
    dead_letter_key(
        reconciler.as_ref(),
        NAME,
        &ctx,
        "acct-9",
        &ReconcileError::retryable("the ledger times out"),
        3,
        None,
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    assert_eq!(letters(&env, "acct-9").await, (1, 1));
    // The ledger is back; the next sweep converges the key.
    reconciler.failing.store(false, Ordering::SeqCst);
    let result = run_key(reconciler.as_ref(), NAME, &ctx, "acct-9").await;
    assert!(
        matches!(result, RunResult::Done(Outcome::Changed)),
        "{result:?}"
    );
    assert_eq!(
        letters(&env, "acct-9").await,
        (0, 1),
        "the letter stayed open"
    );
    let (resolution, by): (String, String) = sqlx::query_as(
        "SELECT resolution, resolved_by FROM converge.dead_letters WHERE aggregate_key = 'acct-9'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        (resolution.as_str(), by.as_str()),
        ("converged", "converge")
    );
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM converge.audit WHERE action = 'dead_letter.resolve' \
         AND details->>'key' = 'acct-9'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(audited, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_between_the_letter_and_its_hook_runs_the_hook_later() {
    let env = TestEnv::new().await;
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    // What a worker that died right after recording the letter leaves.
    sqlx::query(
        "INSERT INTO converge.dead_letters \
           (reconciler, aggregate_key, path, error, permanent, attempts, failed_at) \
         VALUES ($1, 'acct-3', 'event', 'permanent: refused', true, 1, now() - interval '5 min')",
    )
    .bind(NAME)
    .execute(&env.pool)
    .await
    .unwrap();
    let reconciler = flaky(false);
    let mut config = ConsumerConfig::new(NAME, &env.stream, format!("{}.>", env.prefix));
    config.shutdown_timeout = Duration::from_secs(2);
    let consumer = Consumer::new(
        env.pool.clone(),
        env.nats.clone(),
        reconciler.clone(),
        config,
    )
    .start()
    .await
    .unwrap();
    wait_for("the left-over hook", Duration::from_secs(20), || {
        reconciler.recovered.load(Ordering::SeqCst) == 1
    })
    .await;
    // The hook's result is recorded right after it returns.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let recovered: bool = sqlx::query_scalar(
            "SELECT recovered_at IS NOT NULL FROM converge.dead_letters \
             WHERE aggregate_key = 'acct-3'",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        if recovered {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hook ran but is not recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(reconciler.recovered.load(Ordering::SeqCst), 1);
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}
