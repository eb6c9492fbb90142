//! The reconciler contract: one function for the event path, sweeps and operators.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use converge_outbox::{Event, TraceParent, Upcasters};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::ReconcileError;
use crate::limits::{RateLimitError, RateLimits};
use crate::step::StepHook;

/// What a reconcile did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// It took one or more steps toward the target state.
    Changed,
    /// The key was already where it should be (or not this reconciler's business):
    /// nothing was done. Redelivered and duplicate events end here.
    Unchanged,
}

/// Why a reconcile runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Trigger {
    /// An event on the stream hinted at the key.
    Event(EventHint),
    /// A sweep found the key in a state that needs work.
    Sweep {
        /// The sweep's name.
        sweep: String,
    },
    /// Application code or an operator asked for the key.
    Manual {
        /// Who or why, for the record.
        reason: Option<String>,
    },
}

impl Trigger {
    /// `event`, `sweep` or `manual`: the path label in spans and metrics.
    pub fn path(&self) -> &'static str {
        match self {
            Trigger::Event(_) => "event",
            Trigger::Sweep { .. } => "sweep",
            Trigger::Manual { .. } => "manual",
        }
    }

    /// The event, when the trigger is one.
    pub fn event(&self) -> Option<&EventHint> {
        match self {
            Trigger::Event(e) => Some(e),
            _ => None,
        }
    }
}

/// An event from the stream, as a reconciler sees it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EventHint {
    /// The event id (`Nats-Msg-Id`).
    pub event_id: Uuid,
    /// The aggregate type.
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// The aggregate's version after the event.
    pub version: i64,
    /// The event type (its logical name).
    pub event_type: String,
    /// The version of the payload's shape, as published
    /// (`Converge-Schema-Version`; 1 when absent).
    pub schema_version: u32,
    /// The subject it was published on.
    pub subject: String,
    /// When it happened.
    pub occurred_at: Option<DateTime<Utc>>,
    /// Every header, first value of each.
    pub headers: BTreeMap<String, String>,
    /// The JSON payload, as published.
    pub payload: Bytes,
    /// The W3C trace context the event was appended in (its
    /// [`traceparent`](converge_outbox::HEADER_TRACEPARENT) header); `None`
    /// when it has none or an invalid one. The reconcile runs in a child of
    /// it: [`TraceParent::current`] inside the reconcile continues this trace.
    pub traceparent: Option<TraceParent>,
}

impl EventHint {
    /// Deserializes the payload as published, whatever its schema version
    /// (see [`decode_event`](Self::decode_event)).
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }

    /// Decodes the event as `E`, brought by `upcasters` from the version it
    /// was published at to `E::SCHEMA_VERSION`. `Ok(None)` when the event is
    /// of another type; an event too new for this build, one no upcaster
    /// leads from or one that does not decode is an
    /// [`UpcastError`](converge_outbox::UpcastError) (a permanent
    /// [`ReconcileError`] with `?`).
    pub fn decode_event<E: Event + serde::de::DeserializeOwned>(
        &self,
        upcasters: &Upcasters,
    ) -> Result<Option<E>, converge_outbox::UpcastError> {
        if self.aggregate_type != E::AGGREGATE_TYPE || self.event_type != E::EVENT_TYPE {
            return Ok(None);
        }
        let payload: serde_json::Value =
            serde_json::from_slice(&self.payload).map_err(|source| {
                converge_outbox::UpcastError::Decode {
                    event: converge_outbox::TypeName {
                        aggregate_type: self.aggregate_type.clone(),
                        event_type: self.event_type.clone(),
                    },
                    version: self.schema_version,
                    source,
                }
            })?;
        upcasters
            .decode(
                &self.aggregate_type,
                &self.event_type,
                self.schema_version,
                payload,
            )
            .map(Some)
    }
}

/// What a reconcile gets besides its key: the pool, why it runs, which attempt
/// this is, the rate limiters, and who it is (the claimant for state claims).
#[derive(Debug, Clone)]
pub struct Context {
    pool: PgPool,
    trigger: Trigger,
    attempt: u32,
    limits: RateLimits,
    claimant: String,
    upcasters: Upcasters,
    step_hook: Option<InstalledStepHook>,
    /// How long a run's key lease lasts without renewal.
    pub(crate) key_lease: std::time::Duration,
    /// The lease of the key this context runs for (set by the run functions).
    pub(crate) fence: Option<Arc<crate::lease::FenceState>>,
    /// Whether this context runs a `reconcile_batch` page (many leases, none
    /// of its own).
    pub(crate) batch: bool,
    /// The sweep lease a sweep's runs are made under.
    pub(crate) sweep_lease: Option<SweepLease>,
}

/// The sweep lease a sweep's runs are made under: name, holder, token.
#[derive(Debug, Clone)]
pub(crate) struct SweepLease {
    pub(crate) name: Arc<str>,
    pub(crate) holder: Arc<str>,
    pub(crate) token: i64,
}

/// The hook [`Context::step`] calls, if one is installed.
#[derive(Clone)]
struct InstalledStepHook(Arc<dyn StepHook>);

impl std::fmt::Debug for InstalledStepHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepHook")
    }
}

impl Context {
    /// A context; the consumer and the sweeper build these for you.
    pub fn new(
        pool: PgPool,
        trigger: Trigger,
        attempt: u32,
        limits: RateLimits,
        claimant: impl Into<String>,
    ) -> Self {
        Context {
            pool,
            trigger,
            attempt,
            limits,
            claimant: claimant.into(),
            upcasters: Upcasters::default(),
            step_hook: None,
            key_lease: crate::lease::DEFAULT_KEY_LEASE,
            fence: None,
            batch: false,
            sweep_lease: None,
        }
    }

    /// This context's runs made on behalf of the sweep lease `name` held by
    /// `holder` at fencing `token`: [`check_fence`](Self::check_fence) then
    /// also fails once that lease is no longer held so (expired, taken over
    /// or released by an operator), and
    /// [`sweep_lease_token`](Self::sweep_lease_token) returns the token. The
    /// sweeper sets it on every context it builds.
    pub fn with_sweep_lease(mut self, name: &str, holder: &str, token: i64) -> Self {
        self.sweep_lease = Some(SweepLease {
            name: Arc::from(name),
            holder: Arc::from(holder),
            token,
        });
        self
    }

    /// The fencing token of the sweep lease this run is made under (sweep
    /// runs only): larger for every later holder of the sweep. Pass it to a
    /// service that can refuse writes from older tokens; writes to this
    /// database are fenced by [`check_fence`](Self::check_fence).
    pub fn sweep_lease_token(&self) -> Option<i64> {
        self.sweep_lease.as_ref().map(|l| l.token)
    }

    /// This context with runs holding their key's lease for `ttl` between
    /// renewals (default [`DEFAULT_KEY_LEASE`](crate::DEFAULT_KEY_LEASE), 20 s).
    /// A run whose lease cannot be renewed is stopped after three quarters of
    /// it; a crashed holder's key comes free after all of it. At least 1 s.
    pub fn with_key_lease(mut self, ttl: std::time::Duration) -> Self {
        self.key_lease = ttl.max(std::time::Duration::from_secs(1));
        self
    }

    /// The same context for a `reconcile_batch` page.
    pub(crate) fn for_batch(&self) -> Context {
        let mut ctx = self.clone();
        ctx.batch = true;
        ctx
    }

    /// The same context for one run holding `fence`.
    pub(crate) fn for_run(&self, fence: Arc<crate::lease::FenceState>) -> Context {
        let mut ctx = self.clone();
        ctx.fence = Some(fence);
        ctx
    }

    /// This context with `hook` called at every [`step`](Self::step): the test
    /// kit (`converge-testkit`) installs one to crash a run at a chosen step;
    /// an application may install its own for fault injection (the invoicing
    /// example's `--crash-after-claim` aborts the process at its `claimed`
    /// step). Contexts built by the consumer and the sweeper have none.
    pub fn with_step_hook(mut self, hook: Arc<dyn StepHook>) -> Self {
        self.step_hook = Some(InstalledStepHook(hook));
        self
    }

    /// Marks a point between two side effects of the reconcile, e.g. after the
    /// claim's transaction committed and before the invoice is written:
    ///
    /// ```no_run
    /// # use converge_handlers::{Context, ReconcileError};
    /// # async fn reconcile(ctx: &Context) -> Result<(), ReconcileError> {
    /// // ... claim SHIPPED → INVOICING, commit ...
    /// ctx.step("claimed")?;
    /// // ... insert the invoice, INVOICING → INVOICED, commit ...
    /// ctx.step("invoiced")?;
    /// # Ok(()) }
    /// ```
    ///
    /// In production this only emits a `debug` event. Under a
    /// [`StepHook`] (see [`with_step_hook`](Self::with_step_hook)) the hook
    /// may stop the run here with an error — a [`SimulatedCrash`](crate::SimulatedCrash) under the
    /// test kit — which `?` propagates, so the rest of the run is abandoned as
    /// if the process had died: an open transaction rolls back on drop and no
    /// later statement runs. Always propagate it; never call `step` while a
    /// transaction you mean to commit is open, or the crash rolls it back
    /// (which a real crash would, too).
    pub fn step(&self, name: &str) -> Result<(), ReconcileError> {
        tracing::debug!(step = name, "reconcile step");
        match &self.step_hook {
            Some(InstalledStepHook(hook)) => hook.on_step(name),
            None => Ok(()),
        }
    }

    /// This context with `upcasters` for [`event`](Self::event) (the
    /// consumer installs its configuration's).
    pub fn with_upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// The upcasters of this run's events.
    pub fn upcasters(&self) -> &Upcasters {
        &self.upcasters
    }

    /// The triggering event decoded as `E`, in its current shape: `None` on
    /// the sweep and manual paths and for an event of another type. An
    /// event this build cannot read fails the run permanently (the key is
    /// dead-lettered once, never redelivered in a loop). See
    /// [`EventHint::decode_event`].
    ///
    /// ```no_run
    /// # use converge_handlers::{Context, ReconcileError};
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct Deposited { account: String }
    /// # impl converge_outbox::Event for Deposited {
    /// #     const AGGREGATE_TYPE: &'static str = "account";
    /// #     const EVENT_TYPE: &'static str = "Deposited";
    /// #     const SCHEMA_VERSION: u32 = 3;
    /// #     fn aggregate_id(&self) -> String { self.account.clone() }
    /// # }
    /// # fn f(ctx: &Context) -> Result<(), ReconcileError> {
    /// if let Some(deposit) = ctx.event::<Deposited>()? {
    ///     // a v3 `Deposited`, whatever version it was stored at
    /// #   let _ = deposit;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn event<E: Event + serde::de::DeserializeOwned>(
        &self,
    ) -> Result<Option<E>, ReconcileError> {
        match self.trigger.event() {
            Some(hint) => Ok(hint.decode_event::<E>(&self.upcasters)?),
            None => Ok(None),
        }
    }

    /// The application's pool. Keep transactions short: an open transaction
    /// holds the relay back (see the outbox docs), so never hold one across an
    /// external call.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Why this reconcile runs.
    pub fn trigger(&self) -> &Trigger {
        &self.trigger
    }

    /// 1 for the first try, 2 for the first retry, …
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Who runs this reconcile: `<instance>/<reconciler>`. Use it as the
    /// claimant of intermediate states.
    pub fn claimant(&self) -> &str {
        &self.claimant
    }

    /// The limiters.
    pub fn limits(&self) -> &RateLimits {
        &self.limits
    }

    /// Waits until the named limiter allows one call.
    pub async fn acquire(&self, limiter: &str) -> Result<(), ReconcileError> {
        self.limits
            .acquire(limiter)
            .await
            .map_err(|e: RateLimitError| {
                if e.is_retryable() {
                    ReconcileError::retryable(e)
                } else {
                    ReconcileError::permanent(e)
                }
            })
    }
}

/// An idempotent reconciler, keyed by aggregate.
///
/// `reconcile` reads the key's current state and takes the next step toward
/// the target; it must be safe to run any number of times, concurrently with
/// itself on other keys, and after a crash at any point (use
/// [`StateMachine`](crate::StateMachine) for intermediate states). It never runs
/// twice at once for the same key: [`run_key`](crate::run_key) holds a per-key
/// lock across every path and process.
///
/// ```no_run
/// use converge_handlers::{Context, Outcome, ReconcileError, Reconciler};
///
/// struct Invoicing;
///
/// impl Reconciler for Invoicing {
///     async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
///         let state: Option<String> = sqlx::query_scalar("SELECT state FROM orders WHERE id = $1::bigint")
///             .bind(key)
///             .fetch_optional(ctx.pool())
///             .await?;
///         match state.as_deref() {
///             Some("SHIPPED") => { /* claim, invoice, mark INVOICED */ Ok(Outcome::Changed) }
///             _ => Ok(Outcome::Unchanged),
///         }
///     }
/// }
/// ```
pub trait Reconciler: Send + Sync + 'static {
    /// Takes the next step for `key`, whatever triggered it.
    fn reconcile(
        &self,
        ctx: &Context,
        key: &str,
    ) -> impl Future<Output = Result<Outcome, ReconcileError>> + Send;

    /// Which key an event hints at; `None` ignores the event. Default: the
    /// event's aggregate id.
    fn key_for(&self, event: &EventHint) -> Option<String> {
        Some(event.aggregate_id.clone())
    }

    /// Reconciles a page of keys at once, for the sweep path — the seed's job
    /// that accepts "some inputs" (`createInvoiceForOrders(OrderId...)`).
    ///
    /// Return `None` (the default) and each key goes through
    /// [`reconcile`](Reconciler::reconcile). Return one result per key, in the
    /// order given, to take the page in a few statements (e.g. one conditional
    /// `UPDATE … WHERE id = ANY($1) AND state = 'SHIPPED' RETURNING id`). It
    /// must take the same step `reconcile` would take for each key; the keys'
    /// locks are held throughout. Retryable failures are retried key by key
    /// through `reconcile`.
    fn reconcile_batch(
        &self,
        ctx: &Context,
        keys: &[String],
    ) -> impl Future<Output = Option<Vec<Result<Outcome, ReconcileError>>>> + Send {
        let _ = (ctx, keys);
        async { None }
    }

    /// Runs once a key is given up on (the seed's `@Recover`), after the dead
    /// letter is recorded: e.g. set the record's state to FAILED. Runs under
    /// the key's lock. Default: nothing.
    fn recover(
        &self,
        ctx: &Context,
        key: &str,
        error: &ReconcileError,
    ) -> impl Future<Output = Result<(), ReconcileError>> + Send {
        let _ = (ctx, key, error);
        async { Ok(()) }
    }
}

/// A shared reconciler is a reconciler: the same `Arc` can drive a consumer,
/// a sweep and operators' manual runs.
impl<R: Reconciler> Reconciler for std::sync::Arc<R> {
    fn reconcile(
        &self,
        ctx: &Context,
        key: &str,
    ) -> impl Future<Output = Result<Outcome, ReconcileError>> + Send {
        R::reconcile(self, ctx, key)
    }

    fn key_for(&self, event: &EventHint) -> Option<String> {
        R::key_for(self, event)
    }

    fn reconcile_batch(
        &self,
        ctx: &Context,
        keys: &[String],
    ) -> impl Future<Output = Option<Vec<Result<Outcome, ReconcileError>>>> + Send {
        R::reconcile_batch(self, ctx, keys)
    }

    fn recover(
        &self,
        ctx: &Context,
        key: &str,
        error: &ReconcileError,
    ) -> impl Future<Output = Result<(), ReconcileError>> + Send {
        R::recover(self, ctx, key, error)
    }
}
