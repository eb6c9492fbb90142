//! An event-sourced account shared by the event-sourcing tests: the
//! aggregate (open, deposit, withdraw with a balance check), its events and a
//! balances projection that also counts every application of every event —
//! an effect a unique constraint cannot hide.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use converge::eventsourcing::{
    Aggregate, ProjectedEvent, Projection, ProjectionError, ProjectionTx, Repository,
};
use sqlx::PgPool;

/// An account's state.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Account {
    /// Opened.
    pub open: bool,
    /// Its balance in cents.
    pub balance: i64,
    /// Events folded (to check snapshots against folds).
    pub events: u64,
}

/// What happens to an account.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum AccountEvent {
    /// Opened.
    Opened,
    /// Money in.
    Deposited {
        /// Cents.
        amount: i64,
    },
    /// Money out.
    Withdrawn {
        /// Cents.
        amount: i64,
    },
}

/// What callers ask.
#[derive(Debug, Clone)]
pub enum AccountCommand {
    /// Open it (nothing when open).
    Open,
    /// Pay in.
    Deposit(i64),
    /// Take out, if the balance covers it.
    Withdraw(i64),
}

/// Why an account refuses.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AccountError {
    /// Not opened.
    #[error("the account is not open")]
    NotOpen,
    /// Not enough money.
    #[error("insufficient funds: balance {balance}, asked {asked}")]
    InsufficientFunds {
        /// The balance.
        balance: i64,
        /// The amount asked.
        asked: i64,
    },
}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Event = AccountEvent;
    type Command = AccountCommand;
    type Error = AccountError;

    fn apply(&mut self, event: &AccountEvent) {
        self.events += 1;
        match event {
            AccountEvent::Opened => self.open = true,
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrawn { amount } => self.balance -= amount,
        }
    }

    fn decide(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        match command {
            AccountCommand::Open if self.open => Ok(vec![]),
            AccountCommand::Open => Ok(vec![AccountEvent::Opened]),
            _ if !self.open => Err(AccountError::NotOpen),
            AccountCommand::Deposit(amount) => {
                Ok(vec![AccountEvent::Deposited { amount: *amount }])
            }
            AccountCommand::Withdraw(amount) if *amount > self.balance => {
                Err(AccountError::InsufficientFunds {
                    balance: self.balance,
                    asked: *amount,
                })
            }
            AccountCommand::Withdraw(amount) => {
                Ok(vec![AccountEvent::Withdrawn { amount: *amount }])
            }
        }
    }
}

/// Creates `proj.balances (account, balance)` and `proj.applied (event_id)`
/// — the latter without a unique constraint, so an event applied twice
/// shows as two rows.
pub async fn create_tables(pool: &PgPool) {
    for sql in [
        "CREATE SCHEMA IF NOT EXISTS proj",
        "CREATE TABLE proj.balances (account text PRIMARY KEY, balance bigint NOT NULL, \
         events bigint NOT NULL)",
        "CREATE INDEX balances_balance_idx ON proj.balances (balance)",
        "CREATE TABLE proj.applied (event_id uuid NOT NULL, version bigint NOT NULL)",
    ] {
        sqlx::query(sql).execute(pool).await.expect(sql);
    }
}

/// The balances projection: `proj.balances` and a row per application in
/// `proj.applied`. It can be made to fail on chosen events.
#[derive(Default)]
pub struct Balances {
    /// Applications (successful or rolled back) so far.
    pub calls: AtomicU64,
    /// When non-zero: the first application of each event whose version is
    /// a multiple of it fails (retryably), after writing.
    pub fail_every: AtomicU64,
    /// Every application fails while set.
    pub stuck: std::sync::atomic::AtomicBool,
    /// The events whose application failed once.
    pub failed: std::sync::Mutex<std::collections::HashSet<uuid::Uuid>>,
}

impl Balances {
    /// A shared projection.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }
}

impl Projection for Balances {
    const NAME: &'static str = "balances";
    const TABLES: &'static [&'static str] = &["proj.balances", "proj.applied"];
    const AGGREGATE_TYPES: &'static [&'static str] = &["account"];

    async fn apply(
        &self,
        tx: &mut ProjectionTx<'_>,
        event: &ProjectedEvent,
    ) -> Result<(), ProjectionError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let Some(e) = event.decode::<Account>()? else {
            return Ok(());
        };
        let delta = match e {
            AccountEvent::Opened => 0,
            AccountEvent::Deposited { amount } => amount,
            AccountEvent::Withdrawn { amount } => -amount,
        };
        let applied = format!(
            "INSERT INTO {} (event_id, version) VALUES ($1, $2)",
            tx.table("proj.applied")?
        );
        sqlx::query(&applied)
            .bind(event.event_id)
            .bind(event.version)
            .execute(tx.conn())
            .await?;
        let every = self.fail_every.load(Ordering::SeqCst);
        let fail_once = every > 0
            && event.version as u64 % every == 0
            && self.failed.lock().unwrap().insert(event.event_id);
        if fail_once || self.stuck.load(Ordering::SeqCst) {
            // After a write: the batch's transaction must roll it back.
            return Err(ProjectionError::retryable(format!(
                "injected failure {call}"
            )));
        }
        let balances = format!(
            "INSERT INTO {t} (account, balance, events) VALUES ($1, $2, 1) \
             ON CONFLICT (account) DO UPDATE SET balance = {t}.balance + $2, \
                 events = {t}.events + 1",
            t = tx.table("proj.balances")?
        );
        sqlx::query(&balances)
            .bind(&event.aggregate_id)
            .bind(delta)
            .execute(tx.conn())
            .await?;
        Ok(())
    }
}

/// Every account's balance and event count as the projection has them.
pub async fn projected(pool: &PgPool) -> Vec<(String, i64, i64)> {
    sqlx::query_as("SELECT account, balance, events FROM proj.balances ORDER BY account")
        .fetch_all(pool)
        .await
        .expect("read the projection")
}

/// Event ids applied more than once, and how many events were applied.
pub async fn applications(pool: &PgPool) -> (Vec<uuid::Uuid>, i64) {
    let twice: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT event_id FROM proj.applied GROUP BY event_id HAVING count(*) > 1",
    )
    .fetch_all(pool)
    .await
    .expect("read applications");
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM proj.applied")
        .fetch_one(pool)
        .await
        .expect("count applications");
    (twice, total)
}

/// A repository of accounts without snapshots: it folds every event.
pub async fn folding_repository(pool: &PgPool) -> Repository<Account> {
    Repository::<Account>::builder(pool.clone())
        .config({
            let mut c = converge::eventsourcing::RepositoryConfig::default();
            c.snapshot_every = None;
            c
        })
        .start()
        .await
        .expect("start a repository")
}

/// Every account's balance and event count folded from the event log.
pub async fn folded(pool: &PgPool) -> Vec<(String, i64, i64)> {
    folded_with(&folding_repository(pool).await, pool).await
}

/// [`folded`], with a repository already started.
pub async fn folded_with(repo: &Repository<Account>, pool: &PgPool) -> Vec<(String, i64, i64)> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT aggregate_id FROM converge.outbox_heads WHERE aggregate_type = 'account' \
         ORDER BY aggregate_id",
    )
    .fetch_all(pool)
    .await
    .expect("list accounts");
    let mut out = Vec::new();
    for id in ids {
        let a = repo.load(pool, &id).await.expect("load");
        out.push((id, a.state.balance, a.state.events as i64));
    }
    out
}

/// Waits until `proj.balances` equals the accounts folded from their
/// events; panics after `within`, naming the projection's error.
pub async fn wait_projected(pool: &PgPool, within: std::time::Duration) {
    let deadline = tokio::time::Instant::now() + within;
    let repo = folding_repository(pool).await;
    loop {
        let (projected, folded) = (projected(pool).await, folded_with(&repo, pool).await);
        if projected == folded {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let error: Option<String> = sqlx::query_scalar(
                "SELECT error FROM converge.projections WHERE name = 'balances'",
            )
            .fetch_optional(pool)
            .await
            .unwrap()
            .flatten();
            panic!(
                "the projection did not catch up (error: {error:?}):\nprojected {projected:?}\nfolded    {folded:?}"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// No event applied twice to `proj.applied`, and one application per
/// account event.
pub async fn assert_applied_once(pool: &PgPool) {
    let (twice, total) = applications(pool).await;
    assert!(twice.is_empty(), "events applied more than once: {twice:?}");
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM converge.outbox WHERE aggregate_type = 'account'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(total, events, "every event applied");
}
