//! A projection's life across deploys, against real PostgreSQL: a new
//! `VERSION` rebuilds it while runners of the old one stop applying;
//! declarations changed without one, and tables shared by two projections,
//! are refused at start; registered anew over tables that hold rows, it is
//! rebuilt rather than applied onto them; retention holds only the types a
//! projection reads; a panicking `apply` is recorded on its event, and the
//! runner goes on.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use converge::eventsourcing::{
    forget_projection, ProjectedEvent, Projection, ProjectionError, ProjectionRunner, ProjectionTx,
    Repository,
};
use converge::{Relay, Retention};
use converge_tests::accounts::{
    self, assert_applied_once, wait_projected, Account, AccountCommand, Balances,
};
use converge_tests::projections::{rebuild_of, runner_config};
use converge_tests::TestEnv;
use sqlx::PgPool;

/// Deposits into `accounts` accounts, `each` times (opened first).
async fn deposit(repo: &Repository<Account>, from: usize, accounts: usize, each: usize) {
    for a in from..from + accounts {
        let id = format!("acc-{a:03}");
        repo.execute(&id, &AccountCommand::Open).await.unwrap();
        for _ in 0..each {
            repo.execute(&id, &AccountCommand::Deposit(1))
                .await
                .unwrap();
        }
    }
}

async fn row(pool: &PgPool) -> (i32, i32, Option<String>) {
    sqlx::query_as(
        "SELECT version, generation, rebuild_state FROM converge.projections \
         WHERE name = 'balances'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn wait_generation(pool: &PgPool, generation: i32, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (_, g, state) = row(pool).await;
        if g == generation && state.is_none() {
            return;
        }
        let error: Option<String> = sqlx::query_scalar(
            "SELECT rebuild_error FROM converge.projections WHERE name = 'balances'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reached generation {generation}: at {g}, {state:?}, {error:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `Balances` at version 2: the same code, as a deploy that changed it.
struct BalancesV2(Arc<Balances>);

impl Projection for BalancesV2 {
    const NAME: &'static str = "balances";
    const VERSION: u32 = 2;
    const TABLES: &'static [&'static str] = Balances::TABLES;
    const AGGREGATE_TYPES: &'static [&'static str] = Balances::AGGREGATE_TYPES;

    async fn apply(
        &self,
        tx: &mut ProjectionTx<'_>,
        event: &ProjectedEvent,
    ) -> Result<(), ProjectionError> {
        self.0.apply(tx, event).await
    }
}

/// The first runner of version 2 rebuilds the read model from history;
/// the runner of version 1 still running applies nothing from then on.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_version_rebuilds_and_fences_the_old_runners() {
    let env = TestEnv::new().await;
    accounts::create_tables(&env.pool).await;
    let repo = Repository::<Account>::builder(env.pool.clone())
        .start()
        .await
        .unwrap();
    deposit(&repo, 0, 5, 10).await;
    let v1 = Balances::shared();
    let old = ProjectionRunner::new(env.pool.clone(), runner_config("old"))
        .projection(v1.clone())
        .start()
        .await
        .unwrap();
    wait_projected(&env.pool, Duration::from_secs(20)).await;
    assert_eq!(row(&env.pool).await, (1, 1, None));

    let v2 = Balances::shared();
    let new = ProjectionRunner::new(env.pool.clone(), runner_config("new"))
        .projection(Arc::new(BalancesV2(v2.clone())))
        .start()
        .await
        .unwrap();
    let old_calls = v1.calls.load(Ordering::SeqCst);
    // Both runners poll while events keep coming; only version 2 applies.
    let writer = {
        let repo = repo.clone();
        tokio::spawn(async move { deposit(&repo, 5, 5, 10).await })
    };
    wait_generation(&env.pool, 2, Duration::from_secs(30)).await;
    writer.await.unwrap();
    wait_projected(&env.pool, Duration::from_secs(20)).await;
    assert_eq!(row(&env.pool).await.0, 2);
    assert_applied_once(&env.pool).await;
    assert_eq!(
        v1.calls.load(Ordering::SeqCst),
        old_calls,
        "the version-1 runner applied events after version 2 registered"
    );
    assert!(v2.calls.load(Ordering::SeqCst) > 0);
    old.shutdown().await;
    new.shutdown().await;

    // Version 1 deployed again (a rollback) is refused, naming why.
    let err = ProjectionRunner::new(env.pool.clone(), runner_config("rollback"))
        .projection(Balances::shared())
        .start()
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("registered at version 2, newer than this build's 1"),
        "{err}"
    );
}

/// Tables declared in a projection of another name.
struct Thief;

impl Projection for Thief {
    const NAME: &'static str = "thief";
    const TABLES: &'static [&'static str] = &["proj.balances"];
    const AGGREGATE_TYPES: &'static [&'static str] = &["account"];

    async fn apply(
        &self,
        _: &mut ProjectionTx<'_>,
        _: &ProjectedEvent,
    ) -> Result<(), ProjectionError> {
        Ok(())
    }
}

/// `balances` declaring one table fewer, at the same version.
struct Narrower;

impl Projection for Narrower {
    const NAME: &'static str = "balances";
    const TABLES: &'static [&'static str] = &["proj.balances"];
    const AGGREGATE_TYPES: &'static [&'static str] = &["account"];

    async fn apply(
        &self,
        _: &mut ProjectionTx<'_>,
        _: &ProjectedEvent,
    ) -> Result<(), ProjectionError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shared_tables_and_changed_declarations_are_refused_at_start() {
    let env = TestEnv::new().await;
    accounts::create_tables(&env.pool).await;
    let runner = ProjectionRunner::new(env.pool.clone(), runner_config("r"))
        .projection(Balances::shared())
        .start()
        .await
        .unwrap();
    let err = ProjectionRunner::new(env.pool.clone(), runner_config("t"))
        .projection(Arc::new(Thief))
        .start()
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("projection thief declares a table projection balances declares too"),
        "{err}"
    );
    let err = ProjectionRunner::new(env.pool.clone(), runner_config("n"))
        .projection(Arc::new(Narrower))
        .start()
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("changed")
            && err.to_string().contains("raise Projection::VERSION to 2"),
        "{err}"
    );
    runner.shutdown().await;
    // Neither refused registration left a row.
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM converge.projections")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(names, ["balances"]);
}

/// Forgotten and registered again, the projection finds its tables full:
/// it is rebuilt, not applied onto them (every event would count twice).
#[tokio::test(flavor = "multi_thread")]
async fn registered_anew_over_filled_tables_it_is_rebuilt_not_applied_twice() {
    let env = TestEnv::new().await;
    accounts::create_tables(&env.pool).await;
    let repo = Repository::<Account>::builder(env.pool.clone())
        .start()
        .await
        .unwrap();
    deposit(&repo, 0, 4, 10).await;
    let runner = ProjectionRunner::new(env.pool.clone(), runner_config("first"))
        .projection(Balances::shared())
        .start()
        .await
        .unwrap();
    wait_projected(&env.pool, Duration::from_secs(20)).await;
    runner.shutdown().await;
    assert!(forget_projection(&env.pool, "balances").await.unwrap());

    deposit(&repo, 4, 2, 10).await;
    let runner = ProjectionRunner::new(env.pool.clone(), runner_config("again"))
        .projection(Balances::shared())
        .start()
        .await
        .unwrap();
    let requested_by: Option<String> = sqlx::query_scalar(
        "SELECT rebuild_requested_by FROM converge.projections WHERE name = 'balances'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        requested_by.as_deref(),
        Some("converge (first registration over tables with rows)")
    );
    wait_generation(&env.pool, 2, Duration::from_secs(30)).await;
    deposit(&repo, 6, 1, 5).await;
    wait_projected(&env.pool, Duration::from_secs(20)).await;
    assert_applied_once(&env.pool).await;
    runner.shutdown().await;
}

/// Counts `order` events, stuck (or slow) while told to be.
#[derive(Default)]
struct OrderCount {
    stuck: AtomicBool,
    slow: AtomicBool,
    calls: AtomicU64,
}

impl Projection for OrderCount {
    const NAME: &'static str = "order-count";
    const TABLES: &'static [&'static str] = &["proj.order_count"];
    const AGGREGATE_TYPES: &'static [&'static str] = &["order"];

    async fn apply(
        &self,
        tx: &mut ProjectionTx<'_>,
        _: &ProjectedEvent,
    ) -> Result<(), ProjectionError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.slow.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.stuck.load(Ordering::SeqCst) {
            return Err(ProjectionError::retryable("stuck on purpose"));
        }
        let sql = format!(
            "INSERT INTO {0} AS c (k, n) VALUES (1, 1) ON CONFLICT (k) DO UPDATE SET n = c.n + 1",
            tx.table("proj.order_count")?
        );
        sqlx::query(&sql).execute(tx.conn()).await?;
        Ok(())
    }
}

/// A projection of `order` stuck on its first event keeps every `order`
/// event from retention, and not the events of other types stored before
/// it (the hold is per type up to the first held event of a partition;
/// from there on, every later event of that partition waits with it).
#[tokio::test(flavor = "multi_thread")]
async fn retention_holds_only_the_types_a_stuck_projection_reads() {
    let env = TestEnv::new().await;
    for sql in [
        "CREATE SCHEMA proj",
        "CREATE TABLE proj.order_count (k int PRIMARY KEY, n bigint NOT NULL)",
    ] {
        sqlx::query(sql).execute(&env.pool).await.unwrap();
    }
    converge_tests::orders::create_table(&env.pool).await;
    let count = Arc::new(OrderCount::default());
    count.stuck.store(true, Ordering::SeqCst);
    let runner = ProjectionRunner::new(env.pool.clone(), runner_config("r"))
        .projection(count.clone())
        .start()
        .await
        .unwrap();
    sqlx::query(
        "SELECT converge.append('invoice', 'i' || g, 'Issued', '{}') FROM generate_series(1, 5) g",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    converge_tests::orders::ship(&env.pool, 1..=3).await;
    let mut config = env.relay_config();
    config.retention = Retention::For(Duration::from_millis(1));
    config.cleanup_interval = Duration::from_millis(50);
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), config)
        .start()
        .await
        .unwrap();
    env.read_stream(8, Duration::from_secs(20)).await;
    let left = |t: &'static str| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM converge.outbox WHERE aggregate_type = $1",
            )
            .bind(t)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while left("invoice").await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the invoices were held back by a projection that does not read them"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        left("order").await,
        3,
        "the stuck projection's events are kept"
    );
    assert!(
        count.calls.load(Ordering::SeqCst) > 0,
        "the projection tried"
    );
    count.stuck.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while left("order").await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never deleted once projected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n: i64 = sqlx::query_scalar("SELECT n FROM proj.order_count")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(n, 3);
    relay.shutdown().await.unwrap();
    runner.shutdown().await;
}

/// Panics on account `acc-001` while told to.
#[derive(Default)]
struct Panicky {
    inner: Balances,
    panicking: AtomicBool,
}

impl Projection for Panicky {
    const NAME: &'static str = "balances";
    const TABLES: &'static [&'static str] = Balances::TABLES;
    const AGGREGATE_TYPES: &'static [&'static str] = Balances::AGGREGATE_TYPES;

    async fn apply(
        &self,
        tx: &mut ProjectionTx<'_>,
        event: &ProjectedEvent,
    ) -> Result<(), ProjectionError> {
        if event.aggregate_id == "acc-001" && self.panicking.load(Ordering::SeqCst) {
            panic!("a bug in apply");
        }
        self.inner.apply(tx, event).await
    }
}

/// The panic is the event's failure, named in the projection's row; the
/// runner lives on and applies it once the bug is gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_apply_is_recorded_on_its_event_and_the_runner_goes_on() {
    let env = TestEnv::new().await;
    accounts::create_tables(&env.pool).await;
    let repo = Repository::<Account>::builder(env.pool.clone())
        .start()
        .await
        .unwrap();
    deposit(&repo, 0, 3, 2).await;
    let panicky = Arc::new(Panicky::default());
    panicky.panicking.store(true, Ordering::SeqCst);
    let runner = ProjectionRunner::new(env.pool.clone(), runner_config("r"))
        .projection(panicky.clone())
        .start()
        .await
        .unwrap();
    let first_of_001: uuid::Uuid = sqlx::query_scalar(
        "SELECT event_id FROM converge.outbox WHERE aggregate_id = 'acc-001' AND version = 1",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (error, event): (Option<String>, Option<uuid::Uuid>) = sqlx::query_as(
            "SELECT error, error_event_id FROM converge.projections WHERE name = 'balances'",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        if let Some(error) = error {
            assert!(error.contains("apply panicked: a bug in apply"), "{error}");
            assert_eq!(event, Some(first_of_001));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no error recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panicky.panicking.store(false, Ordering::SeqCst);
    wait_projected(&env.pool, Duration::from_secs(30)).await;
    assert_applied_once(&env.pool).await;
    runner.shutdown().await;
}

/// Once a worker of version 2 registered an inline projection (to rebuild
/// it), a repository still on version 1 may not apply its old effects to the
/// read model: its commands fail naming the versions, and nothing is saved.
#[tokio::test(flavor = "multi_thread")]
async fn an_old_build_may_not_apply_an_inline_projection_a_newer_one_registered() {
    let env = TestEnv::new().await;
    accounts::create_tables(&env.pool).await;
    let old = Repository::<Account>::builder(env.pool.clone())
        .inline(Balances::shared())
        .start()
        .await
        .unwrap();
    deposit(&old, 0, 2, 3).await;
    let runner = ProjectionRunner::new(env.pool.clone(), runner_config("v2"))
        .rebuilds_of(Arc::new(BalancesV2(Balances::shared())))
        .start()
        .await
        .unwrap();
    wait_generation(&env.pool, 2, Duration::from_secs(30)).await;
    let before = accounts::folded(&env.pool).await;
    let err = old
        .execute("acc-000", &AccountCommand::Deposit(1))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("projection balances is registered at version 2, newer than this build's 1"),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert_eq!(accounts::folded(&env.pool).await, before, "nothing saved");
    let new = Repository::<Account>::builder(env.pool.clone())
        .inline(Arc::new(BalancesV2(Balances::shared())))
        .start()
        .await
        .unwrap();
    new.execute("acc-000", &AccountCommand::Deposit(1))
        .await
        .unwrap();
    assert_eq!(
        accounts::projected(&env.pool).await,
        accounts::folded(&env.pool).await
    );
    assert_applied_once(&env.pool).await;
    runner.shutdown().await;
}

/// An inline projection added to an application whose aggregates already
/// have events sees only what is saved from then on: it is registered with
/// a rebuild requested, which a worker running its rebuilds carries out.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_inline_projection_over_an_existing_history_is_rebuilt() {
    let env = TestEnv::new().await;
    accounts::create_tables(&env.pool).await;
    let plain = Repository::<Account>::builder(env.pool.clone())
        .start()
        .await
        .unwrap();
    deposit(&plain, 0, 3, 4).await;
    let repo = Repository::<Account>::builder(env.pool.clone())
        .inline(Balances::shared())
        .start()
        .await
        .unwrap();
    let requested_by: Option<String> = sqlx::query_scalar(
        "SELECT rebuild_requested_by FROM converge.projections WHERE name = 'balances'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        requested_by.as_deref(),
        Some("converge (first registration over an existing history)")
    );
    repo.execute("acc-003", &AccountCommand::Open)
        .await
        .unwrap();
    let runner = ProjectionRunner::new(env.pool.clone(), runner_config("rebuilds"))
        .rebuilds_of(Balances::shared())
        .start()
        .await
        .unwrap();
    wait_generation(&env.pool, 2, Duration::from_secs(30)).await;
    assert_eq!(
        accounts::projected(&env.pool).await,
        accounts::folded(&env.pool).await
    );
    assert_applied_once(&env.pool).await;
    runner.shutdown().await;
}

/// A ledger keyed by an identity, unique per account.
struct Ledger;

impl Projection for Ledger {
    const NAME: &'static str = "ledger";
    const TABLES: &'static [&'static str] = &["proj.ledger"];
    const AGGREGATE_TYPES: &'static [&'static str] = &["account"];

    async fn apply(
        &self,
        tx: &mut ProjectionTx<'_>,
        event: &ProjectedEvent,
    ) -> Result<(), ProjectionError> {
        let sql = format!(
            "INSERT INTO {0} AS l (account, events) VALUES ($1, 1) \
             ON CONFLICT (account) DO UPDATE SET events = l.events + 1",
            tx.table("proj.ledger")?
        );
        sqlx::query(&sql)
            .bind(&event.aggregate_id)
            .execute(tx.conn())
            .await?;
        Ok(())
    }
}

/// The swap of a table with a unique column besides its key (and an
/// identity generated always): rows that differ are deleted and inserted,
/// never updated in place into a collision with a row not yet changed.
#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_swaps_a_table_whose_rows_are_unique_besides_their_key() {
    let env = TestEnv::new().await;
    for sql in [
        "CREATE SCHEMA proj",
        "CREATE TABLE proj.ledger (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
         account text NOT NULL UNIQUE, events bigint NOT NULL)",
    ] {
        sqlx::query(sql).execute(&env.pool).await.unwrap();
    }
    let repo = Repository::<Account>::builder(env.pool.clone())
        .start()
        .await
        .unwrap();
    let ledger = || async {
        sqlx::query_as::<_, (i64, String, i64)>(
            "SELECT id, account, events FROM proj.ledger ORDER BY account",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap()
    };
    let mut config = runner_config("r");
    config.batch_size = 1;
    let runner = ProjectionRunner::new(env.pool.clone(), config)
        .projection(Arc::new(Ledger))
        .start()
        .await
        .unwrap();
    deposit(&repo, 0, 6, 1).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while ledger().await.iter().map(|r| r.2).sum::<i64>() < 12 {
        assert!(tokio::time::Instant::now() < deadline, "never projected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The live rows numbered otherwise than a rebuild numbers them (as
    // concurrent or rolled-back batches leave them): two accounts' ids
    // exchanged, so making the table equal to its copy changes the
    // account of each of the two ids into the other's.
    sqlx::raw_sql(
        "BEGIN; \
         CREATE TEMP TABLE swapped AS SELECT id, account, events FROM proj.ledger \
             WHERE account IN ('acc-000', 'acc-001'); \
         DELETE FROM proj.ledger WHERE account IN ('acc-000', 'acc-001'); \
         INSERT INTO proj.ledger (id, account, events) OVERRIDING SYSTEM VALUE \
             SELECT (SELECT id FROM swapped o WHERE o.account <> s.account), s.account, s.events \
             FROM swapped s; \
         DROP TABLE swapped; \
         COMMIT",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let live = ledger().await;
    let (outcome, details) = rebuild_of(&env.pool, "ledger", Duration::from_secs(30)).await;
    assert_eq!(outcome, "ok", "{details}");
    let rebuilt = ledger().await;
    assert_ne!(
        live.iter().map(|r| r.0).collect::<Vec<_>>(),
        rebuilt.iter().map(|r| r.0).collect::<Vec<_>>(),
        "the copy numbered the rows otherwise (else this test shows nothing)"
    );
    assert_eq!(
        live.iter().map(|r| (&r.1, r.2)).collect::<Vec<_>>(),
        rebuilt.iter().map(|r| (&r.1, r.2)).collect::<Vec<_>>()
    );
    runner.shutdown().await;
}

/// A rebuild cancelled while its copies are filled: the worker's audit
/// entry is settled saying who cancelled, the live tables are untouched,
/// and the runner goes on applying events.
#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_cancelled_while_building_settles_the_workers_entry() {
    let env = TestEnv::new().await;
    accounts::create_tables(&env.pool).await;
    let repo = Repository::<Account>::builder(env.pool.clone())
        .start()
        .await
        .unwrap();
    deposit(&repo, 0, 2, 30).await;
    let balances = Balances::shared();
    let runner = ProjectionRunner::new(env.pool.clone(), runner_config("r"))
        .projection(balances.clone())
        .start()
        .await
        .unwrap();
    wait_projected(&env.pool, Duration::from_secs(20)).await;
    balances.stuck.store(true, Ordering::SeqCst);
    assert!(
        converge::eventsourcing::request_rebuild(&env.pool, "balances", "test", None)
            .await
            .unwrap()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while row(&env.pool).await.2.as_deref() != Some("building") {
        assert!(tokio::time::Instant::now() < deadline, "never building");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        converge::eventsourcing::cancel_rebuild(&env.pool, "balances", "alice")
            .await
            .unwrap()
    );
    let (outcome, error): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT outcome, details->>'error' FROM converge.audit \
         WHERE action = 'projection.rebuild' AND details->>'recorded_by' = 'worker'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        (outcome.as_deref(), error.as_deref()),
        (Some("failed"), Some("cancelled by alice"))
    );
    assert!(
        !converge::eventsourcing::cancel_rebuild(&env.pool, "balances", "alice")
            .await
            .unwrap()
    );
    balances.stuck.store(false, Ordering::SeqCst);
    deposit(&repo, 2, 1, 3).await;
    wait_projected(&env.pool, Duration::from_secs(20)).await;
    assert_eq!(row(&env.pool).await, (1, 1, None));
    assert_applied_once(&env.pool).await;
    runner.shutdown().await;
}

/// Retention that starts while a rebuild fills its copies deletes none of
/// the projection's events, not even those the copies already hold: the
/// swap, which checks that the history kept them all, goes through.
#[tokio::test(flavor = "multi_thread")]
async fn retention_during_a_rebuild_keeps_what_the_copies_read() {
    let env = TestEnv::new().await;
    for sql in [
        "CREATE SCHEMA proj",
        "CREATE TABLE proj.order_count (k int PRIMARY KEY, n bigint NOT NULL)",
    ] {
        sqlx::query(sql).execute(&env.pool).await.unwrap();
    }
    converge_tests::orders::create_table(&env.pool).await;
    let count = Arc::new(OrderCount::default());
    let mut config = runner_config("r");
    config.batch_size = 2;
    let runner = ProjectionRunner::new(env.pool.clone(), config)
        .projection(count.clone())
        .start()
        .await
        .unwrap();
    converge_tests::orders::ship(&env.pool, 1..=40).await;
    let projected = || async {
        sqlx::query_scalar::<_, i64>("SELECT coalesce(max(n), 0) FROM proj.order_count")
            .fetch_one(&env.pool)
            .await
            .unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while projected().await < 40 {
        assert!(tokio::time::Instant::now() < deadline, "never projected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    count.slow.store(true, Ordering::SeqCst);
    assert!(
        converge::eventsourcing::request_rebuild(&env.pool, "order-count", "test", None)
            .await
            .unwrap()
    );
    let state = || async {
        sqlx::query_as::<_, (Option<String>, i32, Option<String>, Option<i64>)>(
            "SELECT rebuild_state, generation, rebuild_error, build_applied \
             FROM converge.projections WHERE name = 'order-count'",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while state().await.3.unwrap_or(0) < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the copies never filled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut relay_config = env.relay_config();
    relay_config.retention = Retention::For(Duration::from_millis(1));
    relay_config.cleanup_interval = Duration::from_millis(20);
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), relay_config)
        .start()
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (rebuild, generation, error, _) = state().await;
        if rebuild.is_none() {
            assert_eq!((generation, error), (2, None), "the rebuild went through");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rebuild never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(projected().await, 40);
    // Then retention goes on.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.outbox")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention never deleted them"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.shutdown().await.unwrap();
    runner.shutdown().await;
}
