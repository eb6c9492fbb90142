//! Event-sourced aggregates against real PostgreSQL: commands in the
//! caller's transaction, optimistic concurrency, snapshots and their shape
//! version, history gaps, bad declarations, and retention that never deletes
//! an event-sourced history.
use std::sync::Arc;
use std::time::Duration;

use converge::eventsourcing::{
    Aggregate, CommandError, Repository, RepositoryConfig, RepositoryError,
};
use converge::{Relay, Retention};
use converge_tests::accounts::{Account, AccountCommand, AccountError, AccountEvent};
use converge_tests::TestEnv;

async fn accounts(env: &TestEnv, snapshot_every: Option<u32>) -> Repository<Account> {
    let mut config = RepositoryConfig::default();
    config.snapshot_every = snapshot_every;
    Repository::<Account>::builder(env.pool.clone())
        .config(config)
        .start()
        .await
        .expect("start the repository")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_saves_its_events_in_the_callers_transaction() {
    let env = TestEnv::new().await;
    sqlx::query("CREATE TABLE notes (note text)")
        .execute(&env.pool)
        .await
        .unwrap();
    let repo = accounts(&env, None).await;
    repo.execute("a", &AccountCommand::Open).await.unwrap();

    // Rolled back: neither the event nor the other write.
    let mut tx = env.pool.begin().await.unwrap();
    let done = repo
        .execute_in(&mut tx, "a", &AccountCommand::Deposit(500))
        .await
        .unwrap();
    assert_eq!((done.state.balance, done.version), (500, 2));
    sqlx::query("INSERT INTO notes VALUES ('deposit')")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let a = repo.load(&env.pool, "a").await.unwrap();
    assert_eq!((a.state.balance, a.version), (0, 1));

    // Committed: both.
    let mut tx = env.pool.begin().await.unwrap();
    repo.execute_in(&mut tx, "a", &AccountCommand::Deposit(500))
        .await
        .unwrap();
    sqlx::query("INSERT INTO notes VALUES ('deposit')")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let a = repo.load(&env.pool, "a").await.unwrap();
    assert_eq!((a.state.balance, a.version), (500, 2));
    let notes: i64 = sqlx::query_scalar("SELECT count(*) FROM notes")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(notes, 1);

    // A domain refusal is typed, not retryable, and saves nothing.
    let err = repo
        .execute("a", &AccountCommand::Withdraw(900))
        .await
        .unwrap_err();
    assert_eq!(
        err.rejection(),
        Some(&AccountError::InsufficientFunds {
            balance: 500,
            asked: 900
        })
    );
    assert!(!err.is_retryable());
    // A command that decides nothing saves nothing.
    let again = repo.execute("a", &AccountCommand::Open).await.unwrap();
    assert!(again.events.is_empty());
    assert_eq!(repo.load(&env.pool, "a").await.unwrap().version, 2);

    // The stored events are the variants, by name, with their fields.
    let history = converge::Outbox::history(&env.pool, "account", "a", 0, 10)
        .await
        .unwrap();
    let types: Vec<&str> = history.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["Opened", "Deposited"]);
    assert_eq!(history[1].payload, serde_json::json!({"amount": 500}));
    assert_eq!(history[1].schema_version, 1);
}

/// Ten withdrawals of 20 race for a balance of 100: the version each loaded
/// is expected at save, so exactly five succeed and the balance never goes
/// below zero. Without the expected version, several would decide on the
/// same balance and all of them would be saved.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_commands_decide_on_the_state_they_save_over() {
    let env = TestEnv::new().await;
    let repo = accounts(&env, None).await;
    repo.execute("a", &AccountCommand::Open).await.unwrap();
    repo.execute("a", &AccountCommand::Deposit(100))
        .await
        .unwrap();
    let mut config = RepositoryConfig::default();
    config.snapshot_every = None;
    config.retry.max_attempts = 50;
    let racing = Repository::<Account>::builder(env.pool.clone())
        .config(config)
        .start()
        .await
        .unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(10));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (repo, barrier) = (racing.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            repo.execute("a", &AccountCommand::Withdraw(20)).await
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(CommandError::Rejected(AccountError::InsufficientFunds { .. })) => refused += 1,
            Err(e) => panic!("unexpected failure: {e}"),
        }
    }
    assert_eq!((ok, refused), (5, 5));
    let a = repo.load(&env.pool, "a").await.unwrap();
    assert_eq!((a.state.balance, a.version), (0, 7));
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_shorten_loads_and_a_new_shape_ignores_them() {
    let env = TestEnv::new().await;
    let repo = accounts(&env, Some(10)).await;
    repo.execute("a", &AccountCommand::Open).await.unwrap();
    for _ in 0..24 {
        repo.execute("a", &AccountCommand::Deposit(1))
            .await
            .unwrap();
    }
    // Snapshots at versions 10 and 20: a load folds the last 5 events.
    let a = repo.load(&env.pool, "a").await.unwrap();
    assert_eq!((a.version, a.snapshot_version, a.folded), (25, 20, 5));
    let full = accounts(&env, None)
        .await
        .load(&env.pool, "a")
        .await
        .unwrap();
    assert_eq!(full.folded, 25);
    assert_eq!(a.state, full.state, "a snapshot load must equal the fold");

    // The same aggregate with a new state shape ignores the old snapshot.
    #[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
    struct AccountV2 {
        cents: i64,
    }
    impl Aggregate for AccountV2 {
        const TYPE: &'static str = "account";
        const SHAPE_VERSION: u32 = 2;
        type Event = AccountEvent;
        type Command = ();
        type Error = AccountError;
        fn apply(&mut self, event: &AccountEvent) {
            if let AccountEvent::Deposited { amount } = event {
                self.cents += amount;
            }
        }
        fn decide(&self, _: &()) -> Result<Vec<AccountEvent>, AccountError> {
            Ok(vec![AccountEvent::Deposited { amount: 1 }])
        }
    }
    let v2 = Repository::<AccountV2>::builder(env.pool.clone())
        .config({
            let mut c = RepositoryConfig::default();
            c.snapshot_every = Some(10);
            c
        })
        .start()
        .await
        .unwrap();
    let b = v2.load(&env.pool, "a").await.unwrap();
    assert_eq!((b.snapshot_version, b.folded, b.state.cents), (0, 25, 24));
    // Its next command takes a snapshot of its own shape (25 events to fold).
    v2.execute("a", &()).await.unwrap();
    let b = v2.load(&env.pool, "a").await.unwrap();
    assert_eq!((b.snapshot_version, b.folded, b.state.cents), (26, 0, 25));

    // A snapshot of the current shape that does not deserialize is ignored.
    sqlx::query(
        "UPDATE converge.snapshots SET state = '{\"cents\": \"not a number\"}', shape_version = 2 \
         WHERE aggregate_id = 'a'",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let b = v2.load(&env.pool, "a").await.unwrap();
    assert_eq!((b.snapshot_version, b.folded, b.state.cents), (0, 26, 25));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hole_in_the_history_is_a_clear_error() {
    let env = TestEnv::new().await;
    let repo = accounts(&env, None).await;
    repo.execute("a", &AccountCommand::Open).await.unwrap();
    repo.execute("a", &AccountCommand::Deposit(5))
        .await
        .unwrap();
    repo.execute("a", &AccountCommand::Deposit(5))
        .await
        .unwrap();
    sqlx::query("DELETE FROM converge.outbox WHERE aggregate_id = 'a' AND version = 2")
        .execute(&env.pool)
        .await
        .unwrap();
    let err = repo.load(&env.pool, "a").await.unwrap_err();
    assert!(
        matches!(
            err,
            RepositoryError::HistoryGap {
                expected: 2,
                found: 3,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("account/a"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn declarations_that_cannot_work_are_refused_at_start() {
    let env = TestEnv::new().await;

    #[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
    struct Tagged;
    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    #[serde(tag = "kind")]
    enum TaggedEvent {
        Happened { x: i64 },
    }
    impl Aggregate for Tagged {
        const TYPE: &'static str = "tagged";
        type Event = TaggedEvent;
        type Command = ();
        type Error = AccountError;
        fn apply(&mut self, _: &TaggedEvent) {}
        fn decide(&self, _: &()) -> Result<Vec<TaggedEvent>, AccountError> {
            Ok(vec![])
        }
    }
    let err = Repository::<Tagged>::builder(env.pool.clone())
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("externally tagged"), "{err}");

    #[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
    struct Dotted;
    impl Aggregate for Dotted {
        const TYPE: &'static str = "my.account";
        type Event = AccountEvent;
        type Command = ();
        type Error = AccountError;
        fn apply(&mut self, _: &AccountEvent) {}
        fn decide(&self, _: &()) -> Result<Vec<AccountEvent>, AccountError> {
            Ok(vec![])
        }
    }
    let err = Repository::<Dotted>::builder(env.pool.clone())
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("my.account"), "{err}");

    // Upcasters reaching past the version the aggregate reads.
    let upcasters = converge::Upcasters::new().add_named("account", "Deposited", 1, Ok);
    let err = Repository::<Account>::builder(env.pool.clone())
        .upcasters(upcasters)
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("account.Deposited"), "{err}");
    // Upcasters for an event type the aggregate has not (misspelt).
    let upcasters = converge::Upcasters::new().add_named("account", "Deposted", 1, Ok);
    let err = Repository::<Account>::builder(env.pool.clone())
        .upcasters(upcasters)
        .start()
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("upcasters are registered for account.Deposted"),
        "{err}"
    );
    // An inline projection of other types: a rebuild would read events the
    // repository never applies it to, and the other way round.
    struct OfOrders;
    impl converge::eventsourcing::Projection for OfOrders {
        const NAME: &'static str = "of-orders";
        const TABLES: &'static [&'static str] = &["proj.of_orders"];
        const AGGREGATE_TYPES: &'static [&'static str] = &["order"];
        async fn apply(
            &self,
            _: &mut converge::eventsourcing::ProjectionTx<'_>,
            _: &converge::eventsourcing::ProjectedEvent,
        ) -> Result<(), converge::eventsourcing::ProjectionError> {
            Ok(())
        }
    }
    let err = Repository::<Account>::builder(env.pool.clone())
        .inline(std::sync::Arc::new(OfOrders))
        .start()
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(
            "inline projection of-orders must name account among its AGGREGATE_TYPES (order)"
        ),
        "{err}"
    );
    // Nothing was kept from retention for the refused types.
    let kept: Vec<String> =
        sqlx::query_scalar("SELECT aggregate_type FROM converge.retention_policies")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert!(kept.is_empty(), "{kept:?}");
}

/// Retention deletes published events older than its period — but never an
/// event-sourced aggregate's: its history is its state. Without the per-type
/// policy the account's events go too, and loading it fails.
#[tokio::test(flavor = "multi_thread")]
async fn retention_never_deletes_an_event_sourced_history() {
    let env = TestEnv::new().await;
    let repo = accounts(&env, None).await;
    repo.execute("a", &AccountCommand::Open).await.unwrap();
    repo.execute("a", &AccountCommand::Deposit(7))
        .await
        .unwrap();
    converge_tests::orders::create_table(&env.pool).await;
    converge_tests::orders::ship(&env.pool, 1..=3).await;
    repo.execute("a", &AccountCommand::Deposit(7))
        .await
        .unwrap();

    let mut config = env.relay_config();
    config.retention = Retention::For(Duration::from_millis(1));
    config.cleanup_interval = Duration::from_millis(100);
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), config)
        .start()
        .await
        .unwrap();
    env.read_stream(6, Duration::from_secs(20)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let orders: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM converge.outbox WHERE aggregate_type = 'order'",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        if orders == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention did not delete the orders' events"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.shutdown().await.unwrap();
    let kept: i64 =
        sqlx::query_scalar("SELECT count(*) FROM converge.outbox WHERE aggregate_type = 'account'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(kept, 3);
    let a = repo.load(&env.pool, "a").await.unwrap();
    assert_eq!((a.state.balance, a.version), (14, 3));
}
