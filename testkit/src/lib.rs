//! A test kit for converge handler authors: prove a reconciler idempotent and
//! crash-safe against your own PostgreSQL database, from your own tests.
//!
//! A reconciler must be safe to run any number of times, on every path, and
//! after a crash at any point. The [`Kit`] drives it the way production does —
//! through [`run_key`](converge::handlers::run_key) (and
//! [`run_keys`](converge::handlers::run_keys) for the sweep path), with
//! contexts built by [`Context::new`](converge::handlers::Context::new) — and
//! checks the rules:
//!
//! * [`run_twice`](Kit::run_twice) — a second run finds nothing to do;
//! * [`run_concurrently`](Kit::run_concurrently) — of N runs at once, at most one changes
//!   anything and one under the per-key lock really runs (optionally some without the lock:
//!   [`Kit::unlocked_concurrent_runs`]);
//! * [`duplicate_events`](Kit::duplicate_events) — a redelivered event changes nothing;
//! * [`every_path`](Kit::every_path) — event, sweep and manual runs agree;
//! * [`crash_after_each_step`](Kit::crash_after_each_step) — a run killed at any
//!   [`ctx.step`](converge::handlers::Context::step) is finished by the next runs,
//!   with every side effect applied once.
//!
//! After each check it runs your **invariant** (e.g. "exactly one invoice per
//! order and the order is INVOICED"); before each, your **setup** (re-create
//! the key's initial state, one with work to do: the first run after it must
//! report Changed). A broken rule is a [`KitError`] whose message
//! says what broke and how to fix it; a passed check returns a [`Report`] of
//! every run.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use converge::handlers::{
//!     Claim, Context, Outcome, ReconcileError, Reconciler, StateMachine, Transition,
//! };
//! use converge_testkit::{BoxError, Kit};
//!
//! /// SHIPPED → INVOICING (claimed) → invoice → INVOICED.
//! struct Invoicing {
//!     orders: StateMachine,
//! }
//!
//! impl Reconciler for Invoicing {
//!     async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
//!         let mut tx = ctx.pool().begin().await?;
//!         match self.orders.claim(&mut tx, key, "SHIPPED", "INVOICING", ctx.claimant()).await? {
//!             Claim::Claimed | Claim::Resumed { .. } => tx.commit().await?,
//!             Claim::NotClaimable { .. } => return Ok(Outcome::Unchanged),
//!         }
//!         ctx.step("claimed")?; // a crash point: the claim is committed, the invoice is not
//!
//!         let mut tx = ctx.pool().begin().await?;
//!         sqlx::query("INSERT INTO invoices (order_id) VALUES ($1::bigint) ON CONFLICT DO NOTHING")
//!             .bind(key)
//!             .execute(&mut *tx)
//!             .await?;
//!         match self.orders.transition_to(&mut tx, key, "INVOICING", "INVOICED", ctx.claimant()).await? {
//!             Transition::Applied => tx.commit().await?,
//!             Transition::Conflict { .. } => return Ok(Outcome::Unchanged),
//!         }
//!         ctx.step("invoiced")?;
//!         Ok(Outcome::Changed)
//!     }
//! }
//!
//! // In a test: #[tokio::test]
//! async fn invoicing_is_idempotent_and_crash_safe() -> Result<(), BoxError> {
//!     let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/invoicing_test").await?;
//!     let orders = StateMachine::new("orders", "id", "state")
//!         .key_type("bigint")
//!         .transition("SHIPPED", "INVOICING")
//!         .transition("INVOICING", "INVOICED")
//!         .intermediate("INVOICING", Duration::from_millis(200)); // short lease: fast recovery
//!     let kit = Kit::new(pool, "invoicing", Arc::new(Invoicing { orders }))
//!         .setup(|pool, key| async move {
//!             sqlx::query("DELETE FROM invoices WHERE order_id = $1::bigint")
//!                 .bind(&key)
//!                 .execute(&pool)
//!                 .await?;
//!             sqlx::query(
//!                 "INSERT INTO orders (id, state) VALUES ($1::bigint, 'SHIPPED') \
//!                  ON CONFLICT (id) DO UPDATE SET state = 'SHIPPED', claimed_by = NULL, claimed_at = NULL",
//!             )
//!             .bind(&key)
//!             .execute(&pool)
//!             .await?;
//!             Ok::<_, BoxError>(())
//!         })
//!         .invariant(|pool, key| async move {
//!             let (state, invoices): (String, i64) = sqlx::query_as(
//!                 "SELECT state, (SELECT count(*) FROM invoices WHERE order_id = o.id) \
//!                  FROM orders o WHERE id = $1::bigint",
//!             )
//!             .bind(&key)
//!             .fetch_one(&pool)
//!             .await?;
//!             if state != "INVOICED" || invoices != 1 {
//!                 return Err(format!("order {key} is {state} with {invoices} invoices").into());
//!             }
//!             Ok::<_, BoxError>(())
//!         });
//!
//!     kit.run_twice("42").await?;
//!     kit.run_concurrently("42", 8).await?;
//!     kit.duplicate_events("42", 3).await?;
//!     kit.every_path("42").await?;
//!     let reports = kit.crash_after_each_step("42").await?; // one per ctx.step
//!     assert_eq!(reports.len(), 2);
//!     Ok(())
//! }
//! ```
//!
//! The kit assumes one successful run takes a key all the way (the common
//! shape: claim, act, finish); a reconciler that takes one step per run
//! reports Changed on consecutive runs, which the kit flags.
//!
//! Run the kit against a database of its own (e.g. one per test): a consumer
//! or a sweeper of the same reconciler name on the same database would hold
//! the keys' locks and interfere.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod checks;
mod concurrent;
mod error;
mod report;
mod runner;

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use converge::handlers::{RateLimits, Reconciler};
use futures::future::BoxFuture;
use sqlx::PgPool;

pub use error::KitError;
pub use report::{CrashPoint, Report, RunOutcome, RunRecord};

/// The error type of setups and invariants: anything `?` converts, or a message
/// (`Err("2 invoices".into())`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A user closure on one key: the setup or the invariant.
type KeyFn = Arc<dyn Fn(PgPool, String) -> BoxFuture<'static, Result<(), BoxError>> + Send + Sync>;

/// The event the kit delivers on the event path.
#[derive(Debug, Clone)]
struct EventTemplate {
    aggregate_type: String,
    event_type: String,
    payload: Bytes,
}

/// The checks, for one reconciler on one database. See the [crate docs](crate).
pub struct Kit<R> {
    pool: PgPool,
    name: String,
    reconciler: Arc<R>,
    setup: Option<KeyFn>,
    invariant: Option<KeyFn>,
    event: EventTemplate,
    limits: RateLimits,
    recovery_runs: usize,
    retry_delay: Duration,
    unlocked_runs: bool,
    instances: AtomicU64,
}

impl<R> std::fmt::Debug for Kit<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kit")
            .field("name", &self.name)
            .field("setup", &self.setup.is_some())
            .field("invariant", &self.invariant.is_some())
            .field("event", &self.event)
            .field("recovery_runs", &self.recovery_runs)
            .field("retry_delay", &self.retry_delay)
            .field("unlocked_runs", &self.unlocked_runs)
            .finish_non_exhaustive()
    }
}

impl<R: Reconciler> Kit<R> {
    /// A kit for `reconciler`, registered as `name` (the name its consumer and
    /// sweeps use: the per-key lock is taken by name), on `pool`.
    ///
    /// Defaults: no setup, no invariant, the event `testkit.KitEvent` with the
    /// payload `{}`, no rate limits, up to 100 recovery runs 50 ms apart
    /// after a crash, and every run under the per-key lock.
    pub fn new(pool: PgPool, name: impl Into<String>, reconciler: Arc<R>) -> Self {
        Kit {
            pool,
            name: name.into(),
            reconciler,
            setup: None,
            invariant: None,
            event: EventTemplate {
                aggregate_type: "testkit".to_owned(),
                event_type: "KitEvent".to_owned(),
                payload: Bytes::from_static(b"{}"),
            },
            limits: RateLimits::new(),
            recovery_runs: 100,
            retry_delay: Duration::from_millis(50),
            unlocked_runs: false,
            instances: AtomicU64::new(1),
        }
    }

    /// Re-creates the initial state of a key (e.g. an order `SHIPPED` with no
    /// invoice): a state the reconciler has work to do in. Runs before every
    /// check, and before every crash of
    /// [`crash_after_each_step`](Self::crash_after_each_step). The first run
    /// after it must report Changed ([`KitError::NothingChanged`] otherwise).
    /// [`duplicate_events`](Self::duplicate_events),
    /// [`every_path`](Self::every_path), `crash_after_each_step` and
    /// [`all_checks`](Self::all_checks) need it; without one,
    /// [`run_twice`](Self::run_twice) and
    /// [`run_concurrently`](Self::run_concurrently) start from the key's
    /// state as it is.
    pub fn setup<F, Fut>(mut self, setup: F) -> Self
    where
        F: Fn(PgPool, String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.setup = Some(Arc::new(move |pool, key| Box::pin(setup(pool, key))));
        self
    }

    /// What must hold for a key once it converged, e.g. "the order is
    /// INVOICED with exactly one invoice"; return an error saying what is
    /// wrong. Checked after every check's runs.
    /// [`crash_after_each_step`](Self::crash_after_each_step) needs it: it is
    /// how the kit tells a settled key from one whose claim is still live.
    pub fn invariant<F, Fut>(mut self, invariant: F) -> Self
    where
        F: Fn(PgPool, String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.invariant = Some(Arc::new(move |pool, key| Box::pin(invariant(pool, key))));
        self
    }

    /// The event delivered on the event path: its aggregate type, event type
    /// and JSON payload (the aggregate id is the key; each check's event gets
    /// a new event id, redeliveries keep it).
    pub fn event(
        mut self,
        aggregate_type: impl Into<String>,
        event_type: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Self {
        self.event = EventTemplate {
            aggregate_type: aggregate_type.into(),
            event_type: event_type.into(),
            payload: payload.into(),
        };
        self
    }

    /// Lets [`run_concurrently`](Self::run_concurrently) run every second
    /// run without the per-key lock, calling [`Reconciler::reconcile`]
    /// directly, so several runs execute the reconciler at once. Use it for a
    /// reconciler that must be safe on its own — its changes compare-and-set
    /// (e.g. [`StateMachine`](converge::handlers::StateMachine) claims) —
    /// not one that relies on the lock to keep runs apart. The other checks
    /// always run under the lock.
    pub fn unlocked_concurrent_runs(mut self) -> Self {
        self.unlocked_runs = true;
        self
    }

    /// The rate limiters the contexts carry (default: none).
    pub fn limits(mut self, limits: RateLimits) -> Self {
        self.limits = limits;
        self
    }

    /// After a crash, run at most `max_runs` times, waiting `retry_delay`
    /// after a run that found nothing to do (a claim not yet expired). Keep
    /// `max_runs × retry_delay` well above your claim leases; use short leases
    /// in tests.
    pub fn recovery(mut self, max_runs: usize, retry_delay: Duration) -> Self {
        self.recovery_runs = max_runs.max(1);
        self.retry_delay = retry_delay;
        self
    }

    /// The pool the kit runs on.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The reconciler's registered name.
    pub fn name(&self) -> &str {
        &self.name
    }
}
