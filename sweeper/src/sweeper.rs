//! The sweeper: every registered sweep's schedule, triggers and overlap policy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use converge_handlers::{dead_letter_key, run_keys, NamedReconciler, RateLimits, Reconciler};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::candidates::{Candidates, CheckError};
use crate::config::{Overlap, SweepConfig};
use crate::error::SweepError;
use crate::history::{RunOutcome, SweepRun, TriggerKind};
use crate::run::{execute, GiveUpFn, RunManyFn, Stops, SweepShared};
use crate::schedule::{Due, Schedule};

/// Longest sleep before the plan is read again (other instances may move it).
const MAX_PLAN_SLEEP: Duration = Duration::from_secs(30);

type Reply = oneshot::Sender<Result<RunOutcome, SweepError>>;

struct Request {
    kind: TriggerKind,
    keys: Option<Vec<String>>,
    reply: Option<Reply>,
}

struct Registration {
    config: SweepConfig,
    candidates: Arc<dyn Candidates>,
    run: NamedReconciler,
    run_many: RunManyFn,
    give_up: GiveUpFn,
}

/// Runs sweeps on their schedules and on demand. Build it, register sweeps,
/// then [`start`](Sweeper::start) it.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use converge_handlers::{Context, Outcome, ReconcileError, Reconciler};
/// # struct Invoicing;
/// # impl Reconciler for Invoicing {
/// #     async fn reconcile(&self, _: &Context, _: &str) -> Result<Outcome, ReconcileError> { Ok(Outcome::Unchanged) }
/// # }
/// use converge_sweeper::{Schedule, SqlCandidates, SweepConfig, Sweeper, Timing};
///
/// # async fn run(pool: sqlx::PgPool) -> Result<(), converge_sweeper::SweepError> {
/// let timing = Timing::new(Schedule::FixedRate(std::time::Duration::from_secs(10)));
/// let sweeper = Sweeper::new(pool)
///     .sweep(
///         SweepConfig::new("invoices", "invoicing", timing),
///         SqlCandidates::new(
///             "SELECT id::text AS key FROM orders WHERE state = 'SHIPPED' \
///              AND ($1::text IS NULL OR id > $1::bigint) ORDER BY id LIMIT $2",
///         ),
///         Arc::new(Invoicing),
///     )
///     .start()
///     .await?;
/// sweeper.trigger("invoices", Some(vec!["42".into()])).await?; // some keys, now
/// sweeper.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct Sweeper {
    pool: PgPool,
    instance: String,
    limits: RateLimits,
    shutdown_timeout: Duration,
    sweeps: Vec<Registration>,
}

impl std::fmt::Debug for Sweeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sweeper")
            .field("instance", &self.instance)
            .field(
                "sweeps",
                &self
                    .sweeps
                    .iter()
                    .map(|s| &s.config.name)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Sweeper {
    /// A sweeper on `pool` with no sweeps yet.
    pub fn new(pool: PgPool) -> Self {
        Sweeper {
            pool,
            instance: converge_handlers::instance_name("sweeper"),
            limits: RateLimits::default(),
            shutdown_timeout: Duration::from_secs(30),
            sweeps: Vec::new(),
        }
    }

    /// This instance's name in run history and leases.
    pub fn instance_name(mut self, name: impl Into<String>) -> Self {
        self.instance = name.into();
        self
    }

    /// The rate limiters (share the consumers' set so both paths respect one limit).
    pub fn with_limits(mut self, limits: RateLimits) -> Self {
        self.limits = limits;
        self
    }

    /// How long `shutdown` waits for a running sweep to stop after its current key.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Registers a sweep: its candidates go through `reconciler`, the same one
    /// the event path runs.
    pub fn sweep<R: Reconciler>(
        mut self,
        config: SweepConfig,
        candidates: impl Candidates,
        reconciler: Arc<R>,
    ) -> Self {
        let name = config.reconciler.clone();
        let lock_wait = config.lock_wait;
        let run = NamedReconciler::new(name.as_str(), reconciler.clone());
        let (r, n) = (reconciler.clone(), name.clone());
        let run_many: RunManyFn = Arc::new(move |ctx, keys, concurrency, stop| {
            let (r, n) = (r.clone(), n.clone());
            Box::pin(async move { run_keys(r.as_ref(), &n, &ctx, &keys, concurrency, &stop).await })
        });
        let give_up: GiveUpFn = Arc::new(move |ctx, key, error, attempts| {
            let (r, n) = (reconciler.clone(), name.clone());
            Box::pin(async move {
                dead_letter_key(
                    r.as_ref(),
                    &n,
                    &ctx,
                    &key,
                    &error,
                    attempts,
                    None,
                    lock_wait,
                )
                .await
            })
        });
        self.sweeps.push(Registration {
            config,
            candidates: Arc::new(candidates),
            run,
            run_many,
            give_up,
        });
        self
    }

    /// Checks the schema and this role's privileges ([`converge_schema::check`]; it
    /// never migrates), checks the sweeps and starts their schedules.
    #[tracing::instrument(skip(self), fields(instance = %self.instance), err)]
    pub async fn start(self) -> Result<SweeperHandle, SweepError> {
        converge_schema::check(&self.pool, converge_schema::Role::Worker).await?;
        let mut names = Vec::new();
        for r in &self.sweeps {
            r.config.validate().map_err(SweepError::Config)?;
            if names.contains(&r.config.name) {
                return Err(SweepError::Config(format!(
                    "two sweeps are named {:?}",
                    r.config.name
                )));
            }
            names.push(r.config.name.clone());
            r.candidates.check(&self.pool).await.map_err(|e| match e {
                CheckError::Database(e) => SweepError::Database(e),
                other => SweepError::Candidates {
                    sweep: r.config.name.clone(),
                    problem: other.to_string(),
                },
            })?;
            let declared = crate::schedule::Declared::of(&r.config.timing);
            sqlx::query(
                "INSERT INTO converge.sweep_schedules (sweep, schedule, cron, time_zone) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (sweep) DO UPDATE \
                 SET schedule = EXCLUDED.schedule, cron = EXCLUDED.cron, \
                     time_zone = EXCLUDED.time_zone",
            )
            .bind(&r.config.name)
            .bind(&declared.description)
            .bind(&declared.cron)
            .bind(&declared.time_zone)
            .execute(&self.pool)
            .await?;
        }
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut senders = HashMap::new();
        let mut candidates = HashMap::new();
        for r in self.sweeps {
            candidates.insert(r.config.name.clone(), r.candidates.clone());
            let shared = Arc::new(SweepShared {
                pool: self.pool.clone(),
                instance: self.instance.clone(),
                limits: self.limits.clone(),
                config: r.config,
                candidates: r.candidates,
                run: r.run,
                run_many: r.run_many,
                give_up: r.give_up,
            });
            let (tx, rx) = mpsc::channel(64);
            senders.insert(shared.config.name.clone(), tx);
            tasks.spawn(sweep_task(shared, rx, shutdown.clone()));
        }
        Ok(SweeperHandle {
            pool: self.pool,
            senders,
            candidates,
            shutdown,
            tasks: Some(tasks),
            timeout: self.shutdown_timeout,
        })
    }
}

/// A running sweeper: trigger sweeps, replay runs, shut down.
pub struct SweeperHandle {
    pub(crate) pool: PgPool,
    senders: HashMap<String, mpsc::Sender<Request>>,
    pub(crate) candidates: HashMap<String, Arc<dyn Candidates>>,
    shutdown: CancellationToken,
    tasks: Option<JoinSet<()>>,
    timeout: Duration,
}

impl std::fmt::Debug for SweeperHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SweeperHandle")
            .field("sweeps", &self.sweeps())
            .finish_non_exhaustive()
    }
}

impl SweeperHandle {
    /// The registered sweeps.
    pub fn sweeps(&self) -> Vec<String> {
        let mut names: Vec<String> = self.senders.keys().cloned().collect();
        names.sort();
        names
    }

    /// The SQL type of `sweep`'s keys, when its candidates declare it
    /// ([`Candidates::key_type`]).
    pub fn key_type(&self, sweep: &str) -> Option<crate::KeyType> {
        self.candidates.get(sweep).and_then(|c| c.key_type())
    }

    /// Refuses keys that are not values of the sweep's key type, written as
    /// its candidates write them: run, a key like `abc` for a `bigint` column
    /// fails every attempt and ends a dead letter. [`run`](Self::run) and
    /// [`trigger`](Self::trigger) check it; call it to refuse keys before
    /// anything else (a dry run).
    pub fn check_keys(&self, sweep: &str, keys: Option<&[String]>) -> Result<(), SweepError> {
        if let (Some(key_type), Some(keys)) = (self.key_type(sweep), keys) {
            for key in keys {
                key_type
                    .check_key(key)
                    .map_err(|problem| SweepError::BadKey {
                        sweep: sweep.to_owned(),
                        problem,
                    })?;
            }
        }
        Ok(())
    }

    pub(crate) fn unknown(&self, sweep: &str) -> SweepError {
        SweepError::UnknownSweep {
            name: sweep.to_owned(),
            known: self.sweeps(),
        }
    }

    fn sender(&self, sweep: &str) -> Result<&mpsc::Sender<Request>, SweepError> {
        self.senders
            .get(sweep)
            .ok_or_else(|| SweepError::UnknownSweep {
                name: sweep.to_owned(),
                known: self.sweeps(),
            })
    }

    /// Asks for a run of `sweep` now, for every candidate (`None`) or the given
    /// keys, without waiting for it (from application code or a handler).
    pub async fn trigger(&self, sweep: &str, keys: Option<Vec<String>>) -> Result<(), SweepError> {
        self.check_keys(sweep, keys.as_deref())?;
        let request = Request {
            kind: TriggerKind::Programmatic,
            keys,
            reply: None,
        };
        self.sender(sweep)?
            .send(request)
            .await
            .map_err(|_| SweepError::Stopped)
    }

    /// Runs `sweep` now and waits for the outcome (under the lease and the
    /// overlap policy, as any trigger).
    pub async fn run(
        &self,
        sweep: &str,
        keys: Option<Vec<String>>,
        kind: TriggerKind,
    ) -> Result<RunOutcome, SweepError> {
        self.check_keys(sweep, keys.as_deref())?;
        let (tx, rx) = oneshot::channel();
        let request = Request {
            kind,
            keys,
            reply: Some(tx),
        };
        self.sender(sweep)?
            .send(request)
            .await
            .map_err(|_| SweepError::Stopped)?;
        rx.await.map_err(|_| SweepError::Stopped)?
    }

    /// Runs run `run_id`'s sweep again for exactly the keys that failed in it.
    pub async fn replay_failed(&self, run_id: i64) -> Result<RunOutcome, SweepError> {
        let sweep: Option<String> =
            sqlx::query_scalar("SELECT sweep FROM converge.sweep_runs WHERE id = $1")
                .bind(run_id)
                .fetch_optional(&self.pool)
                .await?;
        let sweep =
            sweep.ok_or_else(|| SweepError::Config(format!("no sweep run with id {run_id}")))?;
        let keys = SweepRun::failed_keys(&self.pool, run_id).await?;
        self.run(&sweep, Some(keys), TriggerKind::Replay).await
    }

    /// Stops the schedules; a running sweep finishes its current key, records
    /// its run as interrupted and releases its lease, within the timeout.
    pub async fn shutdown(mut self) -> Result<(), SweepError> {
        self.shutdown.cancel();
        let mut tasks = self.tasks.take().expect("present until shutdown");
        let drained = tokio::time::timeout(self.timeout, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tasks.abort_all();
            return Err(SweepError::Config(format!(
                "sweeps still running after {:?} were stopped; their leases expire on their own",
                self.timeout
            )));
        }
        Ok(())
    }
}

impl Drop for SweeperHandle {
    fn drop(&mut self) {
        if let Some(mut tasks) = self.tasks.take() {
            self.shutdown.cancel();
            tasks.detach_all();
        }
    }
}

struct Running {
    handle: JoinHandle<Result<RunOutcome, SweepError>>,
    supersede: CancellationToken,
    replies: Vec<Reply>,
    scheduled: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        // A run outlives its task only if shutdown timed out: stop it then.
        self.handle.abort();
    }
}

struct Pending {
    kind: TriggerKind,
    keys: Option<Vec<String>>,
    replies: Vec<Reply>,
}

impl Pending {
    /// Coalesces another trigger into this one: a full run absorbs key lists.
    fn absorb(&mut self, other: Request) {
        match (&mut self.keys, other.keys) {
            (Some(mine), Some(theirs)) => {
                for k in theirs {
                    if !mine.contains(&k) {
                        mine.push(k);
                    }
                }
            }
            (mine, None) => *mine = None,
            (None, Some(_)) => {}
        }
        self.replies.extend(other.reply);
    }
}

fn spawn_run(s: &Arc<SweepShared>, p: Pending, shutdown: &CancellationToken) -> Running {
    let supersede = CancellationToken::new();
    let stops = Stops {
        shutdown: shutdown.clone(),
        supersede: supersede.clone(),
    };
    let shared = s.clone();
    let scheduled = p.kind == TriggerKind::Schedule;
    let handle = tokio::spawn(async move { execute(&shared, p.kind, p.keys, &stops).await });
    Running {
        handle,
        supersede,
        replies: p.replies,
        scheduled,
    }
}

/// What the schedule says now.
enum Plan {
    Due(DateTime<Utc>),
    Sleep(Duration),
}

async fn plan(s: &SweepShared) -> Result<Plan, sqlx::Error> {
    let timing = &s.config.timing;
    let (planned, now): (Option<DateTime<Utc>>, DateTime<Utc>) =
        sqlx::query_as("SELECT next_fire_at, now() FROM converge.sweep_schedules WHERE sweep = $1")
            .bind(&s.config.name)
            .fetch_one(&s.pool)
            .await?;
    let Some(planned) = planned else {
        // A new sweep: plan its first fire (start-up runs are triggered apart).
        let mut first = timing.clone();
        first.run_at_startup = false;
        if let Some(at) = first.first_planned(now) {
            sqlx::query(
                "UPDATE converge.sweep_schedules SET next_fire_at = $2, updated_at = now() \
                 WHERE sweep = $1 AND next_fire_at IS NULL",
            )
            .bind(&s.config.name)
            .bind(at)
            .execute(&s.pool)
            .await?;
            return Ok(Plan::Sleep(Duration::ZERO));
        }
        return Ok(Plan::Sleep(MAX_PLAN_SLEEP));
    };
    match timing.due(planned, now) {
        Due::Now => Ok(Plan::Due(planned)),
        Due::At(at) => {
            if at != planned {
                // Misfire skipped: move the plan to the next fire time.
                move_plan(s, planned, Some(at)).await?;
            }
            let wait = (at - now).to_std().unwrap_or(Duration::ZERO);
            Ok(Plan::Sleep(wait.min(MAX_PLAN_SLEEP)))
        }
    }
}

/// Claims fire time `planned` for this instance: exactly one instance wins it.
async fn claim(s: &SweepShared, planned: DateTime<Utc>) -> Result<bool, sqlx::Error> {
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&s.pool)
        .await?;
    let next = s.config.timing.next_planned(Some(planned), now, now);
    move_plan(s, planned, next).await
}

/// Moves the stored plan from `from` to `to` with a compare-and-set: true when
/// this instance moved it (so it owns fire time `from`).
async fn move_plan(
    s: &SweepShared,
    from: DateTime<Utc>,
    to: Option<DateTime<Utc>>,
) -> Result<bool, sqlx::Error> {
    let moved = sqlx::query(
        "UPDATE converge.sweep_schedules SET next_fire_at = $3, updated_at = now() \
         WHERE sweep = $1 AND next_fire_at = $2",
    )
    .bind(&s.config.name)
    .bind(from)
    .bind(to)
    .execute(&s.pool)
    .await?
    .rows_affected();
    Ok(moved == 1)
}

/// After a scheduled run under a fixed delay, the next fire counts from its end.
async fn replan_after_run(s: &SweepShared) -> Result<(), sqlx::Error> {
    if !matches!(s.config.timing.schedule, Schedule::FixedDelay(_)) {
        return Ok(());
    }
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&s.pool)
        .await?;
    let next = s.config.timing.next_planned(None, now, now);
    sqlx::query("UPDATE converge.sweep_schedules SET next_fire_at = $2, updated_at = now() WHERE sweep = $1")
        .bind(&s.config.name)
        .bind(next)
        .execute(&s.pool)
        .await?;
    Ok(())
}

async fn sweep_task(
    s: Arc<SweepShared>,
    mut rx: mpsc::Receiver<Request>,
    shutdown: CancellationToken,
) {
    let mut running: Option<Running> = None;
    let mut queued: Option<Pending> = None;
    if s.config.timing.run_at_startup {
        let p = Pending {
            kind: TriggerKind::Startup,
            keys: None,
            replies: Vec::new(),
        };
        running = Some(spawn_run(&s, p, &shutdown));
    }
    loop {
        let next = match plan(&s).await {
            Ok(p) => p,
            Err(error) => {
                tracing::warn!(%error, sweep = %s.config.name, "cannot read the sweep's schedule");
                Plan::Sleep(Duration::from_secs(5))
            }
        };
        let (due, wait) = match next {
            Plan::Due(at) => (Some(at), Duration::ZERO),
            Plan::Sleep(d) => (None, d),
        };
        let incoming: Option<Request> = tokio::select! {
            _ = shutdown.cancelled() => break,
            request = rx.recv() => match request {
                Some(r) => Some(r),
                None => break,
            },
            finished = async {
                match running.as_mut() {
                    Some(r) => (&mut r.handle).await,
                    None => std::future::pending().await,
                }
            } => {
                let mut done = running.take().expect("a run was running");
                let outcome = finished.unwrap_or_else(|e| {
                    Err(SweepError::Config(format!("sweep run task failed: {e}")))
                });
                if let Err(error) = &outcome {
                    tracing::error!(%error, sweep = %s.config.name, "sweep run failed");
                }
                if done.scheduled {
                    if let Err(error) = replan_after_run(&s).await {
                        tracing::warn!(%error, "cannot plan the next fixed-delay run");
                    }
                }
                for reply in std::mem::take(&mut done.replies) {
                    let _ = reply.send(clone_outcome(&outcome));
                }
                if let Some(p) = queued.take() {
                    running = Some(spawn_run(&s, p, &shutdown));
                }
                None
            }
            _ = tokio::time::sleep(wait) => {
                match due {
                    Some(planned) => match claim(&s, planned).await {
                        Ok(true) => Some(Request { kind: TriggerKind::Schedule, keys: None, reply: None }),
                        Ok(false) => None, // another instance took this fire time
                        Err(error) => {
                            tracing::warn!(%error, "cannot claim the sweep's fire time");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            None
                        }
                    },
                    None => None,
                }
            }
        };
        let Some(request) = incoming else { continue };
        match (&running, s.config.overlap) {
            (None, _) => {
                let p = Pending {
                    kind: request.kind,
                    keys: request.keys,
                    replies: request.reply.into_iter().collect(),
                };
                running = Some(spawn_run(&s, p, &shutdown));
            }
            (Some(_), Overlap::Skip) => {
                tracing::info!(sweep = %s.config.name, trigger = request.kind.as_str(), "sweep already running: trigger skipped");
                if let Some(reply) = request.reply {
                    let _ = reply.send(Ok(RunOutcome::Skipped));
                }
            }
            (Some(current), policy) => {
                if policy == Overlap::Replace {
                    current.supersede.cancel();
                }
                match queued.as_mut() {
                    Some(p) => p.absorb(request),
                    None => {
                        queued = Some(Pending {
                            kind: request.kind,
                            keys: request.keys,
                            replies: request.reply.into_iter().collect(),
                        })
                    }
                }
            }
        }
    }
    // Shutdown: a running sweep stops after its current key and records itself.
    if let Some(mut r) = running {
        let outcome = (&mut r.handle)
            .await
            .unwrap_or_else(|e| Err(SweepError::Config(e.to_string())));
        for reply in std::mem::take(&mut r.replies) {
            let _ = reply.send(clone_outcome(&outcome));
        }
    }
    if let Some(p) = queued {
        for reply in p.replies {
            let _ = reply.send(Err(SweepError::Stopped));
        }
    }
}

fn clone_outcome(outcome: &Result<RunOutcome, SweepError>) -> Result<RunOutcome, SweepError> {
    match outcome {
        Ok(o) => Ok(o.clone()),
        Err(e) => Err(SweepError::Config(format!("sweep run failed: {e}"))),
    }
}
