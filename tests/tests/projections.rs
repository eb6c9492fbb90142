//! Projections against real PostgreSQL: asynchronous ones applied once per
//! event through failures and competing runners, inline ones committed with
//! the events, rebuilds beside the live tables while writers go on, and
//! retention that waits for every projection.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use converge::eventsourcing::{
    ProjectedEvent, Projection, ProjectionError, ProjectionRunner, ProjectionTx, Repository,
    RepositoryConfig,
};
use converge::{Relay, Retention};
use converge_tests::accounts::{
    self, assert_applied_once, wait_projected, Account, AccountCommand, Balances,
};
use converge_tests::projections::{rebuild_of, runner_config};
use converge_tests::TestEnv;
use sqlx::PgPool;

async fn repository(pool: &PgPool, inline: Option<Arc<Balances>>) -> Repository<Account> {
    let mut config = RepositoryConfig::default();
    config.retry.max_attempts = 50;
    let mut builder = Repository::<Account>::builder(pool.clone()).config(config);
    if let Some(p) = inline {
        builder = builder.inline(p);
    }
    builder.start().await.expect("start the repository")
}

/// Runs `commands` commands over `accounts` accounts (opened first), mixed
/// deposits and withdrawals, from 4 tasks at once.
async fn write(repo: &Repository<Account>, accounts: usize, commands: usize) {
    for a in 0..accounts {
        repo.execute(&format!("acc-{a:03}"), &AccountCommand::Open)
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for t in 0..4 {
        let repo = repo.clone();
        tasks.push(tokio::spawn(async move {
            for i in (t..commands).step_by(4) {
                let id = format!("acc-{:03}", i % accounts);
                let command = if i % 3 == 2 {
                    AccountCommand::Withdraw(1)
                } else {
                    AccountCommand::Deposit(2)
                };
                match repo.execute(&id, &command).await {
                    Ok(_) | Err(converge::eventsourcing::CommandError::Rejected(_)) => {}
                    Err(e) => panic!("a command failed: {e}"),
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

async fn account_events(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM converge.outbox WHERE aggregate_type = 'account'")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Two runners (two workers) on one projection while commands are saved,
/// each failing some applications after writing: every event is applied
/// exactly once — the cursor commits with the batch, and a batch that fails
/// rolls back whole. One runner is stopped mid-way without waiting.
#[tokio::test(flavor = "multi_thread")]
async fn an_async_projection_applies_every_event_once_across_failures_and_runners() {
    let env = TestEnv::new().await;
    accounts::create_tables(&env.pool).await;
    let repo = repository(&env.pool, None).await;
    let first = Balances::shared();
    first.fail_every.store(7, Ordering::SeqCst);
    let second = Balances::shared();
    second.fail_every.store(5, Ordering::SeqCst);
    let mut quick_stop = runner_config("runner-a");
    quick_stop.shutdown_timeout = Duration::ZERO;
    let a = ProjectionRunner::new(env.pool.clone(), quick_stop)
        .projection(first.clone())
        .start()
        .await
        .unwrap();
    let b = ProjectionRunner::new(env.pool.clone(), runner_config("runner-b"))
        .projection(second.clone())
        .start()
        .await
        .unwrap();
    let writers = {
        let repo = repo.clone();
        tokio::spawn(async move { write(&repo, 12, 400).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.shutdown().await; // aborted mid-batch: rolled back
    writers.await.unwrap();
    wait_projected(&env.pool, Duration::from_secs(60)).await;
    b.shutdown().await;
    assert_applied_once(&env.pool).await;
    let failed = first.failed.lock().unwrap().len() + second.failed.lock().unwrap().len();
    assert!(failed > 10, "too few injected failures: {failed}");
    let (applied, error): (i64, Option<String>) =
        sqlx::query_as("SELECT applied, error FROM converge.projections WHERE name = 'balances'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(applied, account_events(&env.pool).await);
    assert_eq!(error, None);
}

/// An event the projection cannot apply stops it there, named on its row,
/// and is tried again until it can be applied — never skipped.
#[tokio::test(flavor = "multi_thread")]
async fn a_projection_stuck_on_an_event_names_it_and_goes_on_once_it_can() {
    let env = TestEnv::new().await;
    accounts::create_tables(&env.pool).await;
    let repo = repository(&env.pool, None).await;
    let opened = repo.execute("a", &AccountCommand::Open).await.unwrap();
    repo.execute("a", &AccountCommand::Deposit(5))
        .await
        .unwrap();
    let stuck = Balances::shared();
    stuck.stuck.store(true, Ordering::SeqCst);
    let runner = ProjectionRunner::new(env.pool.clone(), runner_config("r"))
        .projection(stuck.clone())
        .start()
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (error, event): (String, uuid::Uuid) = loop {
        let row: (Option<String>, Option<uuid::Uuid>) = sqlx::query_as(
            "SELECT error, error_event_id FROM converge.projections WHERE name = 'balances'",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        if let (Some(e), Some(id)) = row {
            break (e, id);
        }
        assert!(tokio::time::Instant::now() < deadline, "no error recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(event, opened.appended[0].event_id);
    assert!(error.contains("injected failure"), "{error}");
    assert!(accounts::projected(&env.pool).await.is_empty());
    stuck.stuck.store(false, Ordering::SeqCst);
    wait_projected(&env.pool, Duration::from_secs(20)).await;
    runner.shutdown().await;
    assert_applied_once(&env.pool).await;
    let error: Option<String> =
        sqlx::query_scalar("SELECT error FROM converge.projections WHERE name = 'balances'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(error, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_inline_projection_commits_and_rolls_back_with_the_events() {
    let env = TestEnv::new().await;
    accounts::create_tables(&env.pool).await;
    let balances = Balances::shared();
    // Default retries: the failing command below is retried 5 times.
    let repo = Repository::<Account>::builder(env.pool.clone())
        .inline(balances.clone())
        .start()
        .await
        .unwrap();
    repo.execute("a", &AccountCommand::Open).await.unwrap();
    let mut tx = env.pool.begin().await.unwrap();
    repo.execute_in(&mut tx, "a", &AccountCommand::Deposit(9))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(
        accounts::projected(&env.pool).await,
        [("a".to_owned(), 0, 1)]
    );
    repo.execute("a", &AccountCommand::Deposit(9))
        .await
        .unwrap();
    assert_eq!(
        accounts::projected(&env.pool).await,
        [("a".to_owned(), 9, 2)]
    );
    // An inline projection that fails fails the command: nothing is saved.
    balances.stuck.store(true, Ordering::SeqCst);
    let err = repo
        .execute("a", &AccountCommand::Deposit(9))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("balances"), "{err}");
    balances.stuck.store(false, Ordering::SeqCst);
    assert_eq!(repo.load(&env.pool, "a").await.unwrap().version, 2);
    assert_applied_once(&env.pool).await;

    // The same projection cannot also run asynchronously.
    let err = ProjectionRunner::new(env.pool.clone(), runner_config("r"))
        .projection(Balances::shared())
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("inline"), "{err}");
}

/// Requests a rebuild of `balances` as `converge projections rebuild` does,
/// and waits for its end; returns the worker's audit entry's outcome and
/// details.
async fn rebuild(pool: &PgPool, within: Duration) -> (String, serde_json::Value) {
    rebuild_of(pool, "balances", within).await
}

async fn assert_tables_swapped(pool: &PgPool, reader: &str) {
    let generation: i32 =
        sqlx::query_scalar("SELECT generation FROM converge.projections WHERE name = 'balances'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(generation, 2);
    let leftovers: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'proj' AND relname LIKE '%\\_\\_rebuild%'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The live tables kept their identity: indexes and grants.
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'proj' AND tablename = 'balances' \
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(indexes, ["balances_balance_idx", "balances_pkey"]);
    let granted: bool =
        sqlx::query_scalar("SELECT has_table_privilege($1, 'proj.balances', 'SELECT')")
            .bind(reader)
            .fetch_one(pool)
            .await
            .unwrap();
    assert!(granted, "the table's grants were kept");
}

async fn create_reader_role(env: &TestEnv) -> converge_tests::RoleGuard {
    let guard = converge_tests::RoleGuard::new(env, "proj_reader").await;
    for sql in [
        format!("GRANT USAGE ON SCHEMA proj TO {}", guard.name),
        format!("GRANT SELECT ON proj.balances TO {}", guard.name),
    ] {
        sqlx::query(&sql).execute(&env.pool).await.unwrap();
    }
    guard
}

/// A rebuild fills copies from history while commands keep being saved and
/// the live projection keeps running, then swaps them in: the rebuilt read
/// model equals the fold of every account, no event is applied twice, and
/// the tables keep their indexes' names and their grants.
#[tokio::test(flavor = "multi_thread")]
async fn an_async_projection_is_rebuilt_beside_the_live_one_while_writers_go_on() {
    let env = TestEnv::new().await;
    accounts::create_tables(&env.pool).await;
    let role = create_reader_role(&env).await;
    let repo = repository(&env.pool, None).await;
    write(&repo, 10, 200).await;
    let runner = ProjectionRunner::new(env.pool.clone(), runner_config("r"))
        .projection(Balances::shared())
        .start()
        .await
        .unwrap();
    wait_projected(&env.pool, Duration::from_secs(30)).await;
    let writers = {
        let repo = repo.clone();
        tokio::spawn(async move { write(&repo, 10, 400).await })
    };
    let (outcome, details) = rebuild(&env.pool, Duration::from_secs(60)).await;
    assert_eq!(outcome, "ok", "{details}");
    writers.await.unwrap();
    wait_projected(&env.pool, Duration::from_secs(30)).await;
    runner.shutdown().await;
    assert_applied_once(&env.pool).await;
    assert_tables_swapped(&env.pool, &role.name).await;
}

/// An inline projection rebuilt while the repository applies it in every
/// command's transaction: writers that applied an event to the old tables
/// commit before the swap, the others apply theirs to the new ones — none
/// lost, none applied twice.
#[tokio::test(flavor = "multi_thread")]
async fn an_inline_projection_is_rebuilt_while_commands_apply_it() {
    let env = TestEnv::new().await;
    accounts::create_tables(&env.pool).await;
    let role = create_reader_role(&env).await;
    let balances = Balances::shared();
    let repo = repository(&env.pool, Some(balances.clone())).await;
    write(&repo, 10, 200).await;
    let runner = ProjectionRunner::new(env.pool.clone(), runner_config("r"))
        .rebuilds_of(balances.clone())
        .start()
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = {
        let (repo, stop) = (repo.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                write(&repo, 10, 40).await;
            }
        })
    };
    // A reader in snapshots that span a swap: the projected balances always
    // equal the events in the same snapshot (a table renamed into place
    // would show an old snapshot the new table without the swap's last rows).
    let reader = {
        let (pool, stop) = (env.pool.clone(), stop.clone());
        tokio::spawn(async move {
            let mut reads = 0;
            while !stop.load(Ordering::SeqCst) {
                let mut tx = pool.begin().await.unwrap();
                sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                let events: i64 = sqlx::query_scalar(
                    "SELECT coalesce(sum(CASE event_type WHEN 'Deposited' \
                         THEN (payload->>'amount')::bigint \
                         ELSE -(payload->>'amount')::bigint END), 0)::bigint \
                     FROM converge.outbox WHERE aggregate_type = 'account' \
                       AND event_type IN ('Deposited', 'Withdrawn')",
                )
                .fetch_one(&mut *tx)
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(15)).await;
                let projected: i64 = sqlx::query_scalar(
                    "SELECT coalesce(sum(balance), 0)::bigint FROM proj.balances",
                )
                .fetch_one(&mut *tx)
                .await
                .unwrap();
                tx.commit().await.unwrap();
                assert_eq!(
                    events, projected,
                    "a snapshot saw the read model off its events"
                );
                reads += 1;
            }
            reads
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (outcome, details) = rebuild(&env.pool, Duration::from_secs(60)).await;
    assert_eq!(outcome, "ok", "{details}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    writers.await.unwrap();
    assert!(reader.await.unwrap() > 10, "the reader hardly read");
    runner.shutdown().await;
    assert_eq!(
        accounts::projected(&env.pool).await,
        accounts::folded(&env.pool).await
    );
    assert_applied_once(&env.pool).await;
    assert_tables_swapped(&env.pool, &role.name).await;
}

/// A projection of orders (not event-sourced: retention may delete them).
struct OrderCount;

impl Projection for OrderCount {
    const NAME: &'static str = "order-count";
    const TABLES: &'static [&'static str] = &["proj.order_count"];
    const AGGREGATE_TYPES: &'static [&'static str] = &["order"];

    async fn apply(
        &self,
        tx: &mut ProjectionTx<'_>,
        _event: &ProjectedEvent,
    ) -> Result<(), ProjectionError> {
        if STUCK.load(Ordering::SeqCst) {
            return Err(ProjectionError::retryable("stuck on purpose"));
        }
        // A projection's tables hold only what its events put there (a
        // rebuild starts them empty): the counter's row comes with the
        // first event.
        let sql = format!(
            "INSERT INTO {0} AS c (k, n) VALUES (1, 1) ON CONFLICT (k) DO UPDATE SET n = c.n + 1",
            tx.table("proj.order_count")?
        );
        sqlx::query(&sql).execute(tx.conn()).await?;
        Ok(())
    }
}

static STUCK: AtomicBool = AtomicBool::new(true);

/// Retention deletes published events past its period, but none an
/// asynchronous projection has not applied; a rebuild of a projection whose
/// history retention thinned is refused, naming why.
#[tokio::test(flavor = "multi_thread")]
async fn retention_waits_for_projections_and_a_thinned_history_is_not_rebuilt() {
    let env = TestEnv::new().await;
    for sql in [
        "CREATE SCHEMA proj",
        "CREATE TABLE proj.order_count (k int PRIMARY KEY, n bigint NOT NULL)",
    ] {
        sqlx::query(sql).execute(&env.pool).await.unwrap();
    }
    converge_tests::orders::create_table(&env.pool).await;
    let runner = ProjectionRunner::new(env.pool.clone(), runner_config("r"))
        .projection(Arc::new(OrderCount))
        .start()
        .await
        .unwrap();
    converge_tests::orders::ship(&env.pool, 1..=5).await;
    let mut config = env.relay_config();
    config.retention = Retention::For(Duration::from_millis(1));
    config.cleanup_interval = Duration::from_millis(50);
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), config)
        .start()
        .await
        .unwrap();
    env.read_stream(5, Duration::from_secs(20)).await;
    let orders = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM converge.outbox")
            .fetch_one(&env.pool)
            .await
            .unwrap()
    };
    // Published and past the period, but not projected: kept.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(orders().await, 5);
    STUCK.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while orders().await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention never deleted them"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n: i64 = sqlx::query_scalar("SELECT n FROM proj.order_count")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        n, 5,
        "every order event was projected before it was deleted"
    );
    relay.shutdown().await.unwrap();

    // Rebuilt from what is left, the count would drop to 0: refused.
    let (outcome, details) = rebuild_of(&env.pool, "order-count", Duration::from_secs(10)).await;
    runner.shutdown().await;
    assert_eq!(outcome, "failed");
    assert!(
        details["error"]
            .as_str()
            .unwrap()
            .contains("the history of order has events deleted"),
        "{details}"
    );
    let n: i64 = sqlx::query_scalar("SELECT n FROM proj.order_count")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(n, 5, "the refused rebuild changed nothing");
}

/// A table that happens to carry a copy's name is the application's: the
/// rebuild is refused naming it, and the table is left as it was.
#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_never_drops_a_table_that_is_not_its_copy() {
    let env = TestEnv::new().await;
    accounts::create_tables(&env.pool).await;
    for sql in [
        "CREATE TABLE proj.balances__rebuild (note text)",
        "INSERT INTO proj.balances__rebuild VALUES ('keep me')",
    ] {
        sqlx::query(sql).execute(&env.pool).await.unwrap();
    }
    let runner = ProjectionRunner::new(env.pool.clone(), runner_config("r"))
        .projection(Balances::shared())
        .start()
        .await
        .unwrap();
    let (outcome, details) = rebuild(&env.pool, Duration::from_secs(20)).await;
    runner.shutdown().await;
    assert_eq!(outcome, "failed");
    assert!(
        details["error"]
            .as_str()
            .unwrap()
            .contains("proj.balances__rebuild exists and is not a converge rebuild copy"),
        "{details}"
    );
    let kept: String = sqlx::query_scalar("SELECT note FROM proj.balances__rebuild")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(kept, "keep me");
}
