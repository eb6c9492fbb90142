//! `converge.workers`: each running worker's row, its heartbeat, and the
//! sweeps' convergence figures it measures.

use std::sync::Arc;
use std::time::Duration;

use converge_sweeper::SweeperHandle;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// What a worker registers.
#[derive(Clone)]
pub(crate) struct Entry {
    pub(crate) instance: String,
    pub(crate) application: String,
    pub(crate) stream: Option<(String, String)>,
    pub(crate) consumers: Vec<String>,
    pub(crate) sweeps: Vec<String>,
    pub(crate) reconcilers: Vec<String>,
    pub(crate) control_subject: Option<String>,
}

/// Inserts or replaces the worker's row (a restarted instance takes its old row over).
pub(crate) async fn register(pool: &PgPool, e: &Entry) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO converge.workers \
             (instance, application, stream, stream_prefix, consumers, sweeps, reconcilers, control_subject) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (instance) DO UPDATE SET application = $2, stream = $3, stream_prefix = $4, \
             consumers = $5, sweeps = $6, reconcilers = $7, control_subject = $8, \
             started_at = now(), heartbeat_at = now()",
    )
    .bind(&e.instance)
    .bind(&e.application)
    .bind(e.stream.as_ref().map(|s| &s.0))
    .bind(e.stream.as_ref().map(|s| &s.1))
    .bind(&e.consumers)
    .bind(&e.sweeps)
    .bind(&e.reconcilers)
    .bind(&e.control_subject)
    .execute(pool)
    .await?;
    Ok(())
}

/// Removes the worker's row.
pub(crate) async fn deregister(pool: &PgPool, instance: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM converge.workers WHERE instance = $1")
        .bind(instance)
        .execute(pool)
        .await?;
    Ok(())
}

/// The age of the oldest event no relay has published yet: the first row
/// past each partition's cursor (32 index probes), so it stays cheap with any
/// backlog, and it grows while a long transaction holds the relays back.
async fn oldest_unpublished(pool: &PgPool) -> Result<Option<f64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - min(converge.event_time(o.occurred_at)))::float8 \
         FROM converge.relay_partitions p \
         CROSS JOIN LATERAL ( \
             SELECT occurred_at FROM converge.outbox o \
             WHERE o.partition = p.partition \
               AND (o.tx_order, o.id) > (p.cursor_tx_order, p.cursor_id) \
             ORDER BY o.partition, o.tx_order, o.id LIMIT 1) o",
    )
    .fetch_one(pool)
    .await
}

/// How often a worker's row is touched; `converge status` counts a worker
/// live for 60 s after its last beat.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);

/// One beat: the registry row, re-registered if it vanished.
async fn beat(pool: &PgPool, entry: &Entry) {
    let beat = sqlx::query("UPDATE converge.workers SET heartbeat_at = now() WHERE instance = $1")
        .bind(&entry.instance)
        .execute(pool)
        .await;
    match beat {
        Ok(done) if done.rows_affected() == 0 => {
            // Removed behind our back (an operator, a namesake's shutdown): register again.
            if let Err(e) = register(pool, entry).await {
                tracing::warn!(error = %e, "re-registering the worker failed");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "worker heartbeat failed"),
    }
}

/// One measurement: the sweeps' convergence figures and the outbox lag.
async fn measure(
    pool: &PgPool,
    entry: &Entry,
    sweeper: Option<&SweeperHandle>,
    interval: Duration,
) {
    if let Some(sweeper) = sweeper {
        let now = chrono::Utc::now();
        for f in sweeper.measure(interval).await {
            crate::metrics::record_convergence(&f.sweep, f.keys, f.oldest_age(now));
        }
    }
    if let Some((stream, _)) = &entry.stream {
        match oldest_unpublished(pool).await {
            Ok(age) => crate::metrics::record_outbox_lag(stream, age.unwrap_or(0.0).max(0.0)),
            Err(e) => tracing::warn!(error = %e, "measuring the outbox lag failed"),
        }
    }
}

/// Runs `step` every `period` until `shutdown`; a step in progress is
/// abandoned at shutdown (its statements are reads and single-row updates).
async fn every<F, Fut>(period: Duration, shutdown: CancellationToken, mut step: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut ticker = tokio::time::interval(period.max(Duration::from_millis(100)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = step() => {}
        }
    }
}

/// Keeps the worker's row alive until `shutdown`, on its own period, so a
/// slow measurement never makes a worker look dead.
pub(crate) async fn heartbeat(pool: PgPool, entry: Entry, shutdown: CancellationToken) {
    every(HEARTBEAT_INTERVAL, shutdown, || beat(&pool, &entry)).await;
}

/// Measures the convergence figures and the outbox lag every `interval`
/// until `shutdown`.
pub(crate) async fn measurements(
    pool: PgPool,
    entry: Entry,
    sweeper: Option<Arc<SweeperHandle>>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    every(interval, shutdown, || {
        measure(&pool, &entry, sweeper.as_deref(), interval)
    })
    .await;
}
