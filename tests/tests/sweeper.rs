//! Sweeps against a real PostgreSQL: convergence without events, batch caps,
//! the cluster lease (takeover, lock_at_least_for, heartbeat, fencing),
//! several instances, overlap policies, failures and replay, shutdown.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use converge::handlers::{Context, DeadLetter, Outcome, ReconcileError, Reconciler};
use converge::sweeper::{
    Lease, LeaseConfig, Overlap, RunOutcome, RunStatus, RunSummary, Schedule, SqlCandidates,
    SweepConfig, SweepRun, Sweeper, Timing, TriggerKind,
};
use converge_tests::TestEnv;

const SHIPPED: &str = "SELECT id::text AS key FROM orders WHERE state = 'SHIPPED' \
                       AND ($1::text IS NULL OR id > $1::bigint) ORDER BY id LIMIT $2";

async fn orders(env: &TestEnv, n: i64) {
    sqlx::query("CREATE TABLE orders (id bigint PRIMARY KEY, state text NOT NULL)")
        .execute(&env.pool)
        .await
        .unwrap();
    // Shipped by a "legacy path": no event was ever emitted for them.
    sqlx::query("INSERT INTO orders SELECT g, 'SHIPPED' FROM generate_series(1, $1) g")
        .bind(n)
        .execute(&env.pool)
        .await
        .unwrap();
}

async fn count(env: &TestEnv, state: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM orders WHERE state = $1")
        .bind(state)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// SHIPPED → INVOICED with one conditional UPDATE; slow per key if asked;
/// fails permanently for key "13".
struct Invoice {
    per_key: Duration,
    runs: Arc<AtomicUsize>,
}

impl Reconciler for Invoice {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.per_key).await;
        if key == "13" {
            return Err(ReconcileError::permanent("order 13 has no customer"));
        }
        converge_tests::orders::invoice(ctx, key).await
    }
}

fn invoice(per_key_ms: u64) -> (Arc<Invoice>, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    (
        Arc::new(Invoice {
            per_key: Duration::from_millis(per_key_ms),
            runs: runs.clone(),
        }),
        runs,
    )
}

fn manual_timing() -> Timing {
    // A schedule far away: runs in these tests are triggered explicitly.
    Timing::new(Schedule::FixedRate(Duration::from_secs(3600)))
}

fn config(timing: Timing) -> SweepConfig {
    let mut c = SweepConfig::new("invoices", "invoicing", timing);
    c.batch_size = 40;
    c.concurrency = 1; // timings below assume one key at a time
    c.lease.lock_at_most_for = Duration::from_secs(2);
    c.lease.lock_at_least_for = Duration::ZERO;
    c.lease.heartbeat_interval = Duration::from_millis(300);
    c.retry.initial_backoff = Duration::from_millis(10);
    c.retry.max_backoff = Duration::from_millis(50);
    c
}

fn ran(outcome: RunOutcome) -> RunSummary {
    match outcome {
        RunOutcome::Ran(summary) => summary,
        other => panic!("expected a run, got {other:?}"),
    }
}

#[tokio::test]
async fn a_sweep_converges_orders_whose_events_were_never_emitted_in_bounded_batches() {
    let env = TestEnv::new().await;
    orders(&env, 250).await;
    let (r, _) = invoice(0);
    let mut c = config(manual_timing());
    c.max_keys_per_run = Some(100);
    let sweeper = Sweeper::new(env.pool.clone())
        .sweep(c, SqlCandidates::new(SHIPPED), r)
        .start()
        .await
        .unwrap();

    let first = ran(sweeper
        .run("invoices", None, TriggerKind::Operator)
        .await
        .unwrap());
    assert_eq!(first.status, RunStatus::StoppedEarly);
    assert_eq!(first.stopped_at_cap, Some("max_keys"));
    assert_eq!(first.counts.scanned, 100);
    assert_eq!(first.counts.failed, 1, "key 13 fails, the run goes on");
    let second = ran(sweeper
        .run("invoices", None, TriggerKind::Operator)
        .await
        .unwrap());
    assert_eq!(second.status, RunStatus::StoppedEarly, "{second:?}");
    assert_eq!(
        second.counts.scanned, 100,
        "the next run continues where the first stopped"
    );
    let third = ran(sweeper
        .run("invoices", None, TriggerKind::Operator)
        .await
        .unwrap());
    assert_eq!(third.status, RunStatus::Completed);
    assert_eq!(third.counts.scanned, 50);
    assert_eq!(count(&env, "INVOICED").await, 249);
    assert_eq!(count(&env, "SHIPPED").await, 1);

    // History says what happened; the failed key is recorded and dead-lettered.
    let history = SweepRun::list(&env.pool, Some("invoices"), 10)
        .await
        .unwrap();
    assert_eq!(history.len(), 3);
    assert_eq!(history[2].status, "stopped_early");
    assert_eq!(history[2].reconciled, 99);
    assert_eq!(
        SweepRun::failed_keys(&env.pool, first.run_id)
            .await
            .unwrap(),
        vec!["13"]
    );
    let letters = DeadLetter::list(&env.pool, Some("invoicing"), 10)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].path, "sweep");

    // Replay exactly the failed keys of the first run.
    let replay = ran(sweeper.replay_failed(first.run_id).await.unwrap());
    assert_eq!(replay.counts.scanned, 1);
    assert_eq!(replay.counts.failed, 1);
    sweeper.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_run_for_given_keys_touches_exactly_those() {
    let env = TestEnv::new().await;
    orders(&env, 20).await;
    let (r, runs) = invoice(0);
    let sweeper = Sweeper::new(env.pool.clone())
        .sweep(config(manual_timing()), SqlCandidates::new(SHIPPED), r)
        .start()
        .await
        .unwrap();
    let s = ran(sweeper
        .run(
            "invoices",
            Some(vec!["3".into(), "7".into()]),
            TriggerKind::Operator,
        )
        .await
        .unwrap());
    assert_eq!((s.counts.scanned, s.counts.reconciled), (2, 2));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let invoiced: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM orders WHERE state = 'INVOICED' ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(invoiced, vec![3, 7]);
    let err = sweeper
        .run("nope", None, TriggerKind::Operator)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("invoices"),
        "an unknown sweep lists the known ones: {err}"
    );
    sweeper.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_crashed_holder_is_taken_over_and_a_short_run_still_blocks_for_lock_at_least_for() {
    let env = TestEnv::new().await;
    let mut cfg = LeaseConfig::default();
    cfg.lock_at_most_for = Duration::from_millis(1500);
    cfg.lock_at_least_for = Duration::from_millis(1200);
    cfg.heartbeat_interval = Duration::from_millis(500);

    // A holder that crashes never releases.
    let crashed = Lease::try_acquire(&env.pool, "L", "a", &cfg)
        .await
        .unwrap()
        .unwrap();
    assert!(Lease::try_acquire(&env.pool, "L", "b", &cfg)
        .await
        .unwrap()
        .is_none());
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let b = Lease::try_acquire(&env.pool, "L", "b", &cfg)
        .await
        .unwrap()
        .expect("taken over after lock_at_most_for");
    assert!(b.token() > crashed.token(), "fencing token grows");
    // The stalled holder wakes: its heartbeat fails, its writes are fenced.
    let mut stale = crashed;
    assert!(!stale.heartbeat(&env.pool).await.unwrap());
    assert!(!stale.is_held(&env.pool).await.unwrap());
    assert!(!stale.locally_valid());

    // A very short run released at once still blocks others for lock_at_least_for.
    b.release(&env.pool).await.unwrap();
    let started = tokio::time::Instant::now();
    assert!(Lease::try_acquire(&env.pool, "L", "c", &cfg)
        .await
        .unwrap()
        .is_none());
    loop {
        if Lease::try_acquire(&env.pool, "L", "c", &cfg)
            .await
            .unwrap()
            .is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "released too early: {waited:?}"
    );
}

#[tokio::test]
async fn heartbeats_keep_a_long_run_exclusive() {
    let env = TestEnv::new().await;
    orders(&env, 10).await;
    let (r, _) = invoice(300); // ~3 s run with a 2 s lock_at_most_for
    let a = Sweeper::new(env.pool.clone())
        .instance_name("a")
        .sweep(
            config(manual_timing()),
            SqlCandidates::new(SHIPPED),
            r.clone(),
        )
        .start()
        .await
        .unwrap();
    let b = Sweeper::new(env.pool.clone())
        .instance_name("b")
        .sweep(config(manual_timing()), SqlCandidates::new(SHIPPED), r)
        .start()
        .await
        .unwrap();
    a.trigger("invoices", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await; // past lock_at_most_for
    let second = b
        .run("invoices", None, TriggerKind::Operator)
        .await
        .unwrap();
    assert!(matches!(second, RunOutcome::LeaseHeld), "{second:?}");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn three_instances_run_each_fire_time_once_and_never_overlap() {
    let env = TestEnv::new().await;
    orders(&env, 5).await;
    let (r, _) = invoice(50);
    let mut handles = Vec::new();
    for name in ["a", "b", "c"] {
        let c = config(Timing::new(Schedule::FixedRate(Duration::from_secs(1))));
        handles.push(
            Sweeper::new(env.pool.clone())
                .instance_name(name)
                .sweep(c, SqlCandidates::new(SHIPPED), r.clone())
                .start()
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(4500)).await;
    for h in handles {
        h.shutdown().await.unwrap();
    }
    let runs = SweepRun::list(&env.pool, Some("invoices"), 100)
        .await
        .unwrap();
    let scheduled: Vec<&SweepRun> = runs.iter().filter(|r| r.trigger == "schedule").collect();
    assert!(
        (3..=6).contains(&scheduled.len()),
        "{} scheduled runs in 4.5 s at 1/s",
        scheduled.len()
    );
    let mut spans: Vec<_> = runs
        .iter()
        .map(|r| (r.started_at, r.finished_at.unwrap()))
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "two runs overlapped: {w:?}");
    }
}

#[tokio::test]
async fn overlap_policies_skip_queue_or_replace() {
    let env = TestEnv::new().await;
    orders(&env, 6).await;
    for (policy, expect) in [
        (Overlap::Skip, "skip"),
        (Overlap::Queue, "queue"),
        (Overlap::Replace, "replace"),
    ] {
        sqlx::query("UPDATE orders SET state = 'SHIPPED'")
            .execute(&env.pool)
            .await
            .unwrap();
        let (r, _) = invoice(150); // ~0.9 s per full run
        let mut c = config(manual_timing());
        c.name = format!("invoices-{expect}");
        c.overlap = policy;
        let sweeper = Sweeper::new(env.pool.clone())
            .sweep(c, SqlCandidates::new(SHIPPED), r)
            .start()
            .await
            .unwrap();
        let name = format!("invoices-{expect}");
        sweeper.trigger(&name, None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let during = sweeper
            .run(&name, Some(vec!["1".into()]), TriggerKind::Operator)
            .await
            .unwrap();
        let history = SweepRun::list(&env.pool, Some(&name), 10).await.unwrap();
        match policy {
            Overlap::Skip => {
                assert!(matches!(during, RunOutcome::Skipped), "{during:?}");
            }
            Overlap::Queue => {
                let s = ran(during);
                assert_eq!(s.status, RunStatus::Completed);
                assert_eq!(history.len(), 2);
                assert_eq!(
                    history[1].status, "completed",
                    "the first run finished undisturbed"
                );
            }
            _ => {
                ran(during);
                assert_eq!(history.len(), 2);
                assert_eq!(
                    history[1].status, "superseded",
                    "the first run was replaced"
                );
            }
        }
        sweeper.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn shutdown_interrupts_a_run_after_its_current_key_and_releases_the_lease() {
    let env = TestEnv::new().await;
    orders(&env, 30).await;
    let (r, _) = invoice(100);
    let sweeper = Sweeper::new(env.pool.clone())
        .sweep(config(manual_timing()), SqlCandidates::new(SHIPPED), r)
        .start()
        .await
        .unwrap();
    sweeper.trigger("invoices", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(550)).await;
    sweeper.shutdown().await.unwrap();
    let run = &SweepRun::list(&env.pool, Some("invoices"), 1)
        .await
        .unwrap()[0];
    assert_eq!(run.status, "interrupted");
    assert!(run.finished_at.is_some());
    assert!(run.scanned >= 3 && run.scanned < 30, "{}", run.scanned);
    let free = Lease::try_acquire(&env.pool, "invoices", "next", &LeaseConfig::default())
        .await
        .unwrap();
    assert!(free.is_some(), "the lease was not released");
}

#[tokio::test]
async fn the_plan_lives_in_the_database() {
    let env = TestEnv::new().await;
    orders(&env, 1).await;
    let (r, _) = invoice(0);
    let sweeper = Sweeper::new(env.pool.clone())
        .sweep(config(manual_timing()), SqlCandidates::new(SHIPPED), r)
        .start()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let planned: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT next_fire_at FROM converge.sweep_schedules WHERE sweep = 'invoices'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let planned = planned.expect("a plan is stored");
    let in_secs = (planned - chrono::Utc::now()).num_seconds();
    assert!(
        (3500..=3600).contains(&in_secs),
        "planned {in_secs} s ahead"
    );
    sweeper.shutdown().await.unwrap();
}

/// Reads, "calls out", then writes: a second concurrent run would double the call.
struct CallsOnce {
    calls: Arc<AtomicUsize>,
}

impl Reconciler for CallsOnce {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let state: String = sqlx::query_scalar("SELECT state FROM orders WHERE id = $1::bigint")
            .bind(key)
            .fetch_one(ctx.pool())
            .await?;
        if state != "SHIPPED" {
            return Ok(Outcome::Unchanged);
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        self.calls.fetch_add(1, Ordering::SeqCst);
        sqlx::query("UPDATE orders SET state = 'INVOICED' WHERE id = $1::bigint")
            .bind(key)
            .execute(ctx.pool())
            .await?;
        Ok(Outcome::Changed)
    }
}

#[tokio::test]
async fn a_concurrent_sweep_and_the_event_path_never_run_a_key_twice() {
    let env = TestEnv::new().await;
    orders(&env, 40).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let r = Arc::new(CallsOnce {
        calls: calls.clone(),
    });
    let mut c = config(manual_timing());
    c.concurrency = 8;
    let sweeper = Sweeper::new(env.pool.clone())
        .sweep(c, SqlCandidates::new(SHIPPED), r.clone())
        .start()
        .await
        .unwrap();
    // The "event path": every key, run by run_key under the reconciler's name.
    let events = {
        let (pool, r) = (env.pool.clone(), r.clone());
        tokio::spawn(async move {
            let ctx = Context::new(
                pool,
                converge::handlers::Trigger::Manual { reason: None },
                1,
                Default::default(),
                "events",
            );
            for key in (1..=40).rev() {
                let key = key.to_string();
                while let converge::handlers::RunResult::Busy =
                    converge::handlers::run_key(r.as_ref(), "invoicing", &ctx, &key).await
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    let summary = ran(sweeper
        .run("invoices", None, TriggerKind::Operator)
        .await
        .unwrap());
    events.await.unwrap();
    assert_eq!(count(&env, "INVOICED").await, 40);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        40,
        "a key's external call was doubled"
    );
    assert_eq!(summary.counts.failed, 0);
    sweeper.shutdown().await.unwrap();
}

/// Takes a whole page in one UPDATE; `reconcile` is the per-key fallback.
struct Batched {
    per_key: Arc<AtomicUsize>,
    batches: Arc<AtomicUsize>,
}

impl Reconciler for Batched {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        self.per_key.fetch_add(1, Ordering::SeqCst);
        converge_tests::orders::invoice(ctx, key).await
    }

    async fn reconcile_batch(
        &self,
        ctx: &Context,
        keys: &[String],
    ) -> Option<Vec<Result<Outcome, ReconcileError>>> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        // Key 13 is "not ready" in batch form: retried through reconcile.
        let ids: Vec<String> = keys.iter().filter(|k| *k != "13").cloned().collect();
        let moved: Vec<String> = sqlx::query_scalar(
            "UPDATE orders SET state = 'INVOICED' \
             WHERE id = ANY($1::text[]::bigint[]) AND state = 'SHIPPED' RETURNING id::text",
        )
        .bind(&ids)
        .fetch_all(ctx.pool())
        .await
        .ok()?;
        Some(
            keys.iter()
                .map(|k| {
                    if k == "13" {
                        Err(ReconcileError::retryable("not in batch"))
                    } else if moved.contains(k) {
                        Ok(Outcome::Changed)
                    } else {
                        Ok(Outcome::Unchanged)
                    }
                })
                .collect(),
        )
    }
}

#[tokio::test]
async fn a_batch_reconciler_takes_a_page_in_one_statement() {
    let env = TestEnv::new().await;
    orders(&env, 250).await;
    let (per_key, batches) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let r = Arc::new(Batched {
        per_key: per_key.clone(),
        batches: batches.clone(),
    });
    let sweeper = Sweeper::new(env.pool.clone())
        .sweep(config(manual_timing()), SqlCandidates::new(SHIPPED), r)
        .start()
        .await
        .unwrap();
    let s = ran(sweeper
        .run("invoices", None, TriggerKind::Operator)
        .await
        .unwrap());
    assert_eq!(s.status, RunStatus::Completed);
    assert_eq!(
        (s.counts.scanned, s.counts.reconciled, s.counts.failed),
        (250, 250, 0)
    );
    assert_eq!(count(&env, "INVOICED").await, 250);
    assert_eq!(batches.load(Ordering::SeqCst), 7, "250 keys in pages of 40");
    assert_eq!(
        per_key.load(Ordering::SeqCst),
        1,
        "only the retried key went through reconcile"
    );
    sweeper.shutdown().await.unwrap();
}

/// Keys 1 and 2 fail once asking to be retried after 800 ms; key 3 always
/// asks for an hour; the rest succeed. Records when each attempt started.
struct Backoffs {
    started: std::sync::Mutex<Vec<(String, tokio::time::Instant)>>,
}

impl Reconciler for Backoffs {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        self.started
            .lock()
            .unwrap()
            .push((key.to_owned(), tokio::time::Instant::now()));
        match (key, ctx.attempt()) {
            ("1" | "2", 1) => {
                Err(ReconcileError::retryable("busy upstream")
                    .retry_after(Duration::from_millis(800)))
            }
            ("3", _) => Err(ReconcileError::retryable("down for maintenance")
                .retry_after(Duration::from_secs(3600))),
            _ => Ok(Outcome::Changed),
        }
    }
}

#[tokio::test]
async fn failing_keys_back_off_side_by_side_and_a_long_retry_after_holds_nothing_up() {
    let env = TestEnv::new().await;
    orders(&env, 5).await;
    let r = Arc::new(Backoffs {
        started: std::sync::Mutex::new(Vec::new()),
    });
    let mut c = config(manual_timing());
    c.concurrency = 4;
    c.retry.max_backoff = Duration::from_secs(1);
    let sweeper = Sweeper::new(env.pool.clone())
        .sweep(c, SqlCandidates::new(SHIPPED), r.clone())
        .start()
        .await
        .unwrap();
    let run = tokio::time::timeout(
        Duration::from_secs(30),
        sweeper.run("invoices", None, TriggerKind::Operator),
    )
    .await
    .expect("the run waited for an hour-long Retry-After");
    let summary = ran(run.unwrap());
    assert_eq!(summary.status, RunStatus::Completed);
    assert_eq!(summary.counts.reconciled, 4, "{summary:?}");
    assert_eq!(summary.counts.failed, 1, "{summary:?}");
    let started = r.started.lock().unwrap().clone();
    let second = |k: &str| {
        started
            .iter()
            .filter(|(key, _)| key == k)
            .nth(1)
            .map(|(_, at)| *at)
            .unwrap_or_else(|| panic!("key {k} was not retried: {started:?}"))
    };
    let (a, b) = (second("1"), second("2"));
    let apart = if a > b { a - b } else { b - a };
    assert!(
        apart < Duration::from_millis(500),
        "the second key's backoff waited for the first's: {apart:?} apart"
    );
    // Key 3 is left to the next run: recorded, not dead-lettered.
    assert!(DeadLetter::list(&env.pool, Some("invoicing"), 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        SweepRun::failed_keys(&env.pool, summary.run_id)
            .await
            .unwrap(),
        vec!["3"]
    );
    sweeper.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_batch_size_above_one_statement_is_refused_at_start() {
    let env = TestEnv::new().await;
    let (r, _) = invoice(0);
    let mut c = config(manual_timing());
    c.batch_size = 50_000;
    let e = Sweeper::new(env.pool.clone())
        .sweep(c, SqlCandidates::new(SHIPPED), r)
        .start()
        .await
        .map(|_| ())
        .expect_err("a batch of 50,000 keys");
    assert!(e.to_string().contains("batch_size is 50000"), "{e}");
}

/// Records `ctx.sweep_lease_token()`, waits for `go`, then writes a note in a
/// transaction fenced by `check_fence`, recording whether the fence held.
struct SweepFenced {
    token: std::sync::Mutex<Option<Option<i64>>>,
    fence: std::sync::Mutex<Vec<Result<(), String>>>,
    started: tokio::sync::Notify,
    go: tokio::sync::Notify,
}

impl Reconciler for SweepFenced {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        *self.token.lock().unwrap() = Some(ctx.sweep_lease_token());
        self.started.notify_one();
        self.go.notified().await;
        let mut tx = ctx.pool().begin().await?;
        let fenced = ctx.check_fence(&mut tx).await;
        self.fence
            .lock()
            .unwrap()
            .push(fenced.as_ref().map(|_| ()).map_err(|e| {
                match converge::handlers::ExclusionLost::in_error(e) {
                    Some(_) => "ExclusionLost".to_owned(),
                    None => e.to_string(),
                }
            }));
        fenced?;
        sqlx::query("INSERT INTO notes VALUES ($1)")
            .bind(key)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Outcome::Changed)
    }
}

#[tokio::test]
async fn a_sweep_run_cannot_write_once_its_sweep_lease_is_taken_over() {
    let env = TestEnv::new().await;
    orders(&env, 1).await;
    sqlx::query("CREATE TABLE notes (key text)")
        .execute(&env.pool)
        .await
        .unwrap();
    let r = Arc::new(SweepFenced {
        token: std::sync::Mutex::new(None),
        fence: std::sync::Mutex::new(Vec::new()),
        started: tokio::sync::Notify::new(),
        go: tokio::sync::Notify::new(),
    });
    let mut c = config(manual_timing());
    c.lease.lock_at_most_for = Duration::from_secs(30);
    // Retries allowed: none may follow a fence the lost sweep lease failed
    // (it would wait for `go` again and the run would not end).
    c.retry.max_attempts = 3;
    let sweeper = Arc::new(
        Sweeper::new(env.pool.clone())
            .sweep(c, SqlCandidates::new(SHIPPED), r.clone())
            .start()
            .await
            .unwrap(),
    );
    let notes = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM notes")
            .fetch_one(&env.pool)
            .await
            .unwrap()
    };
    // A run whose lease stays put writes (the control).
    let run = {
        let sweeper = sweeper.clone();
        tokio::spawn(async move { sweeper.run("invoices", None, TriggerKind::Operator).await })
    };
    tokio::time::timeout(Duration::from_secs(20), r.started.notified())
        .await
        .expect("the first run reached its key within 20 s");
    r.go.notify_one();
    let first = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the first run ended within 20 s")
        .unwrap()
        .unwrap();
    assert_eq!(ran(first).counts.reconciled, 1);
    assert_eq!(notes().await, 1, "the control run wrote its note");

    // The second run: another instance takes the sweep over meanwhile (the
    // lease ran out while this one stalled, or an operator released it).
    let run = {
        let sweeper = sweeper.clone();
        tokio::spawn(async move { sweeper.run("invoices", None, TriggerKind::Operator).await })
    };
    tokio::time::timeout(Duration::from_secs(20), r.started.notified())
        .await
        .expect("the second run reached its key within 20 s");
    let token: i64 =
        sqlx::query_scalar("SELECT token FROM converge.leases WHERE name = 'invoices'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        *r.token.lock().unwrap(),
        Some(Some(token)),
        "the sweep's runs see its lease token"
    );
    sqlx::query(
        "UPDATE converge.leases SET token = token + 1, holder = 'elsewhere' \
         WHERE name = 'invoices'",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    r.go.notify_one();
    let second = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the second run ended within 20 s")
        .unwrap()
        .unwrap();
    assert_eq!(
        *r.fence.lock().unwrap(),
        vec![Ok(()), Err("ExclusionLost".to_owned())],
        "the control run's fence held, the second run's failed"
    );
    if let RunOutcome::Ran(summary) = second {
        assert_eq!(summary.counts.reconciled, 0, "{summary:?}");
    }
    assert_eq!(
        notes().await,
        1,
        "a run of a sweep whose lease was taken over wrote"
    );
}

/// Records every key it runs; converges nothing (the candidates stay).
struct Visits(std::sync::Mutex<std::collections::BTreeSet<i64>>);

impl Reconciler for Visits {
    async fn reconcile(&self, _ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        tokio::time::sleep(Duration::from_millis(30)).await;
        self.0.lock().unwrap().insert(key.parse().unwrap());
        Ok(Outcome::Unchanged)
    }
}

#[tokio::test]
async fn runs_replaced_again_and_again_still_make_progress() {
    let env = TestEnv::new().await;
    orders(&env, 30).await;
    let visits = Arc::new(Visits(Default::default()));
    let mut c = config(manual_timing());
    c.batch_size = 5; // a page takes ~150 ms
    c.overlap = Overlap::Replace;
    let sweeper = Sweeper::new(env.pool.clone())
        .sweep(c, SqlCandidates::new(SHIPPED), visits.clone())
        .start()
        .await
        .unwrap();
    // Every run is replaced after about two and a half pages (fewer on a
    // slow machine: up to 20 runs), until every key was reached.
    for i in 0..20 {
        sweeper.trigger("invoices", None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        if i >= 3 && visits.0.lock().unwrap().len() == 30 {
            break;
        }
    }
    sweeper.shutdown().await.unwrap();
    let history = SweepRun::list(&env.pool, Some("invoices"), 10)
        .await
        .unwrap();
    assert!(
        history.iter().filter(|r| r.status == "superseded").count() >= 2,
        "{history:?}"
    );
    let seen = visits.0.lock().unwrap().clone();
    let missed: Vec<i64> = (1..=30).filter(|k| !seen.contains(k)).collect();
    assert!(
        missed.is_empty(),
        "keys never reached while every run was replaced: {missed:?}"
    );
}

/// Counts runs per key; key 3 fails (retryably) on its first run.
struct FlakyThree(std::sync::Mutex<std::collections::BTreeMap<String, u32>>);

impl Reconciler for FlakyThree {
    async fn reconcile(&self, _ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let n = {
            let mut runs = self.0.lock().unwrap();
            let n = runs.entry(key.to_owned()).or_default();
            *n += 1;
            *n
        };
        if key == "3" && n == 1 {
            return Err(ReconcileError::retryable(
                "the service is down for a moment",
            ));
        }
        Ok(Outcome::Unchanged)
    }
}

#[tokio::test]
async fn a_key_whose_retry_a_replacement_cut_short_is_run_by_the_next_run() {
    let env = TestEnv::new().await;
    orders(&env, 10).await;
    let r = Arc::new(FlakyThree(Default::default()));
    let mut c = config(manual_timing());
    c.batch_size = 5;
    c.overlap = Overlap::Replace;
    c.retry.initial_backoff = Duration::from_secs(3);
    c.retry.max_backoff = Duration::from_secs(3);
    let sweeper = Sweeper::new(env.pool.clone())
        .sweep(c, SqlCandidates::new(SHIPPED), r.clone())
        .start()
        .await
        .unwrap();
    sweeper.trigger("invoices", None).await.unwrap();
    // The first page ran; key 3 waits 3 s for its retry when the run is
    // replaced.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let second = sweeper
        .run("invoices", None, TriggerKind::Operator)
        .await
        .unwrap();
    let history = SweepRun::list(&env.pool, Some("invoices"), 10)
        .await
        .unwrap();
    assert_eq!(history.last().unwrap().status, "superseded", "{history:?}");
    ran(second);
    let runs = r.0.lock().unwrap().clone();
    assert_eq!(
        runs.get("3"),
        Some(&2),
        "the next run did not try key 3 again: {runs:?}"
    );
    sweeper.shutdown().await.unwrap();
}
