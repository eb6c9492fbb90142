//! The asynchronous projection runner: one task per projection, applying the
//! outbox's events in order from the projection's cursor, and carrying out
//! rebuilds operators request.
//!
//! Several runners (workers) may run the same projection: a batch is applied
//! only by the one that locks the projection's row with the cursor it read
//! (`FOR UPDATE SKIP LOCKED`, in the batch's transaction), and the cursor is
//! written in that transaction. Whatever crashes, an event is applied once.
//! The row lock is the only exclusion: nothing depends on clocks, sessions or
//! leases, so poolers and fail-overs cannot make two batches overlap.

use std::sync::Arc;
use std::time::Duration;

use converge_outbox::Upcasters;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::apply::Failed;
use super::batch::{apply_batch, Cursor};
use super::fetch::{rows_after, Bound, Position};
use super::rebuild::{self, RebuildStep};
use super::register::{register, ProjectionMode, Registrar};
use super::{Projection, SharedProjection};
use crate::error::RepositoryError;

/// How a [`ProjectionRunner`] works.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunnerConfig {
    /// Events read per batch (one transaction each), at most 10,000.
    pub batch_size: i64,
    /// How often an idle projection looks for new events.
    pub poll_interval: Duration,
    /// The longest wait before trying again an event that failed.
    pub max_backoff: Duration,
    /// A batch reads at most about this many bytes of payloads (at least
    /// one event): memory is one budget whatever the events' sizes.
    pub max_batch_bytes: usize,
    /// A batch stops taking events after this long and commits what it
    /// applied (at least one event). While a batch runs, its transaction
    /// holds a transaction id: relays and other projections read only below
    /// it (as below any open write transaction), so batches are kept short.
    pub max_batch_duration: Duration,
    /// This runner's name in `converge.projections.seen_by` (empty: the
    /// host name and process id).
    pub instance_name: String,
    /// How long [`ProjectionsHandle::shutdown`] waits for a batch to finish.
    pub shutdown_timeout: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            batch_size: 500,
            poll_interval: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            max_batch_bytes: 16 * 1024 * 1024,
            max_batch_duration: Duration::from_millis(25),
            instance_name: String::new(),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// Runs asynchronous projections, and the rebuilds of inline ones.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use converge_eventsourcing::{Projection, ProjectionError, ProjectionTx, ProjectedEvent};
/// # struct Balances;
/// # impl Projection for Balances {
/// #     const NAME: &'static str = "balances";
/// #     async fn apply(&self, _: &mut ProjectionTx<'_>, _: &ProjectedEvent) -> Result<(), ProjectionError> { Ok(()) }
/// # }
/// use converge_eventsourcing::{ProjectionRunner, RunnerConfig};
///
/// # async fn run(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// let projections = ProjectionRunner::new(pool, RunnerConfig::default())
///     .projection(Arc::new(Balances))
///     .start()
///     .await?;
/// // ... on SIGTERM:
/// projections.shutdown().await;
/// # Ok(()) }
/// ```
pub struct ProjectionRunner {
    pool: PgPool,
    config: RunnerConfig,
    upcasters: Upcasters,
    projections: Vec<(SharedProjection, ProjectionMode)>,
}

impl std::fmt::Debug for ProjectionRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.projections.iter().map(|(p, _)| p.name()).collect();
        f.debug_struct("ProjectionRunner")
            .field("projections", &names)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ProjectionRunner {
    /// A runner with no projections yet.
    pub fn new(pool: PgPool, config: RunnerConfig) -> Self {
        ProjectionRunner {
            pool,
            config,
            upcasters: Upcasters::default(),
            projections: Vec::new(),
        }
    }

    /// Replaces the configuration.
    pub fn with_config(mut self, config: RunnerConfig) -> Self {
        self.config = config;
        self
    }

    /// The upcasters events are brought to their current shape with.
    pub fn upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// Runs `projection` asynchronously: every event of its aggregate types
    /// in the outbox, from the first, in the outbox's order.
    pub fn projection<P: Projection>(mut self, projection: Arc<P>) -> Self {
        self.projections.push((projection, ProjectionMode::Async));
        self
    }

    /// Carries out rebuilds of the inline projection `projection` (applied
    /// by a [`Repository`](crate::Repository) in the transactions that save
    /// its events): the runner fills its copies from history and swaps them
    /// in; it never applies new events to the live tables.
    pub fn rebuilds_of<P: Projection>(mut self, projection: Arc<P>) -> Self {
        self.projections.push((projection, ProjectionMode::Inline));
        self
    }

    /// The names of the projections it runs.
    pub fn names(&self) -> Vec<&'static str> {
        self.projections.iter().map(|(p, _)| p.name()).collect()
    }

    /// Checks the schema, registers every projection (refusing one
    /// registered in the other mode, two of one name, or bad declarations)
    /// and starts one task per projection.
    pub async fn start(self) -> Result<ProjectionsHandle, RepositoryError> {
        if !(1..=10_000).contains(&self.config.batch_size) {
            return Err(RepositoryError::Config(format!(
                "RunnerConfig::batch_size {} must be from 1 to 10,000",
                self.config.batch_size
            )));
        }
        let mut names: Vec<&str> = self.names();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(RepositoryError::Config(format!(
                "projection {} is registered twice on one runner",
                w[0]
            )));
        }
        converge_schema::check(&self.pool, converge_schema::Role::Worker).await?;
        let instance = if self.config.instance_name.is_empty() {
            converge_handlers::instance_name("projections")
        } else {
            self.config.instance_name.clone()
        };
        for (projection, mode) in &self.projections {
            register(
                &self.pool,
                projection.as_ref(),
                *mode,
                Registrar::Runner,
                &instance,
            )
            .await?;
        }
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for (projection, mode) in self.projections {
            let task = Task {
                pool: self.pool.clone(),
                config: self.config.clone(),
                upcasters: self.upcasters.clone(),
                projection,
                mode,
                instance: instance.clone(),
                cancel: cancel.clone(),
            };
            tasks.spawn(task.run());
        }
        Ok(ProjectionsHandle {
            cancel,
            tasks,
            timeout: self.config.shutdown_timeout,
        })
    }
}

/// The running projections: stop them with [`shutdown`](Self::shutdown).
#[derive(Debug)]
pub struct ProjectionsHandle {
    cancel: CancellationToken,
    tasks: JoinSet<()>,
    timeout: Duration,
}

impl ProjectionsHandle {
    /// Stops every projection after its current batch (aborted after the
    /// shutdown timeout: an aborted batch's transaction rolls back, and its
    /// events are applied again by the next run).
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        let drained = tokio::time::timeout(self.timeout, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("projection batches did not finish in time; aborted (rolled back)");
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
    }
}

/// What one step of a projection did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Applied (or passed over) events: go on at once.
    Worked,
    /// Nothing to do now.
    Idle,
}

/// One projection's loop.
pub(super) struct Task {
    pub(super) pool: PgPool,
    pub(super) config: RunnerConfig,
    pub(super) upcasters: Upcasters,
    pub(super) projection: SharedProjection,
    pub(super) mode: ProjectionMode,
    pub(super) instance: String,
    pub(super) cancel: CancellationToken,
}

/// Why a step could not go on.
#[derive(Debug)]
pub(super) enum StepError {
    /// An event the projection could not apply (recorded on its row).
    Event(Failed),
    /// The database failed.
    Database(sqlx::Error),
    /// The projection's row is gone (`converge projections forget`).
    Forgotten,
    /// A newer version of the projection is registered.
    Superseded,
}

impl From<sqlx::Error> for StepError {
    fn from(e: sqlx::Error) -> Self {
        StepError::Database(e)
    }
}

impl Task {
    async fn run(self) {
        let name = self.projection.name();
        let mut failures: u32 = 0;
        let mut last_seen = tokio::time::Instant::now();
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            let mut worked = false;
            let mut failed = None;
            if self.mode == ProjectionMode::Async {
                match self.live_step().await {
                    Ok(step) => worked |= step == Step::Worked,
                    Err(e) => failed = Some((e, false)),
                }
            }
            if failed.is_none() {
                match rebuild::step(&self).await {
                    Ok(RebuildStep::Worked) => worked = true,
                    Ok(RebuildStep::Idle) => {}
                    Err(e) => failed = Some((e, true)),
                }
            }
            let pause = match failed {
                Some((StepError::Superseded, _)) => {
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                    }
                    continue;
                }
                Some((StepError::Forgotten, _)) => {
                    tracing::error!(
                        projection = name,
                        "the projection was forgotten (converge projections forget) while it \
                         ran; it stops here: restart the worker to register it again"
                    );
                    return;
                }
                Some((error, rebuilding)) => {
                    failures = failures.saturating_add(1);
                    self.report(&error, rebuilding).await;
                    backoff(failures, self.config.max_backoff)
                }
                None if worked => {
                    failures = 0;
                    Duration::ZERO
                }
                None => {
                    failures = 0;
                    self.config.poll_interval
                }
            };
            if last_seen.elapsed() >= Duration::from_secs(30) {
                last_seen = tokio::time::Instant::now();
                let _ = sqlx::query(
                    "UPDATE converge.projections SET seen_at = now(), seen_by = $2 WHERE name = $1",
                )
                .bind(name)
                .bind(&self.instance)
                .execute(&self.pool)
                .await;
            }
            if !pause.is_zero() {
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }

    /// Logs a failed step and records it on the projection's row: an event
    /// the live projection cannot apply in `error`, anything that stops a
    /// rebuild in `rebuild_error` (both cleared once past it).
    async fn report(&self, error: &StepError, rebuilding: bool) {
        let name = self.projection.name();
        let (text, event_id, position) = match error {
            StepError::Event(Failed {
                event_id,
                position,
                error,
            }) => {
                tracing::warn!(projection = name, %event_id, %error, rebuilding,
                    "projection cannot apply an event; it stops there and tries again");
                (
                    format!("event {event_id}: {error}"),
                    Some(*event_id),
                    *position,
                )
            }
            StepError::Database(e) => {
                tracing::warn!(projection = name, error = %e, rebuilding,
                    "projection step failed; retrying");
                (e.to_string(), None, (i64::MAX, i64::MAX))
            }
            StepError::Forgotten | StepError::Superseded => return,
        };
        // Only while it still holds: another runner may have got past it (or
        // finished the rebuild) meanwhile.
        let query = if rebuilding {
            sqlx::query(
                "UPDATE converge.projections SET rebuild_error = $2 \
                 WHERE name = $1 AND rebuild_state IS NOT NULL",
            )
            .bind(name)
            .bind(&text)
        } else if event_id.is_some() {
            sqlx::query(
                "UPDATE converge.projections \
                 SET error = $2, error_event_id = $3, error_at = now() \
                 WHERE name = $1 AND (cursor_tx_order, cursor_id) < ($4, $5)",
            )
            .bind(name)
            .bind(&text)
            .bind(event_id)
            .bind(position.0)
            .bind(position.1)
        } else {
            return;
        };
        let recorded = query.execute(&self.pool).await;
        if let Err(db) = recorded {
            tracing::warn!(projection = name, error = %db, "cannot record the projection's error");
        }
    }

    /// The live cursor and the registered version, or `Forgotten`.
    async fn live_cursor(&self) -> Result<(Position, i32), StepError> {
        let cursor: Option<(Option<i64>, Option<i64>, i32)> = sqlx::query_as(
            "SELECT cursor_tx_order, cursor_id, version FROM converge.projections WHERE name = $1",
        )
        .bind(self.projection.name())
        .fetch_optional(&self.pool)
        .await?;
        match cursor {
            Some((t, i, version)) => Ok(((t.unwrap_or(0), i.unwrap_or(0)), version)),
            None => Err(StepError::Forgotten),
        }
    }

    /// One batch of the live projection.
    async fn live_step(&self) -> Result<Step, StepError> {
        let name = self.projection.name();
        let (cursor, registered) = self.live_cursor().await?;
        if registered != self.projection.version() as i32 {
            // A newer build runs it (this one was refused at start if it
            // started after): stop applying, say so now and then.
            tracing::warn!(
                projection = name,
                registered,
                version = self.projection.version(),
                "a newer version of this projection is registered; this runner applies nothing"
            );
            return Err(StepError::Superseded);
        }
        let mut conn = self.pool.acquire().await?;
        let rows = rows_after(
            &mut conn,
            cursor,
            self.config.batch_size,
            self.projection.aggregate_types(),
            Bound::Settled,
            self.config.max_batch_bytes,
        )
        .await?
        .rows;
        if rows.is_empty() {
            return Ok(Step::Idle);
        }
        let Some(applied) = apply_batch(self, &mut conn, Cursor::Live, cursor, &rows).await? else {
            return Ok(Step::Idle);
        };
        if applied > 0 {
            tracing::debug!(projection = name, applied, "projection batch applied");
        }
        Ok(Step::Worked)
    }
}

/// `min(max_backoff, 100 ms × 2^(failures-1))`, jittered by up to half.
pub(super) fn backoff(failures: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1 << failures.saturating_sub(1).min(16));
    let ceiling = base.min(max);
    let nanos = ceiling.as_nanos() as u64;
    Duration::from_nanos(rand::random_range(nanos / 2..=nanos.max(1)))
}
