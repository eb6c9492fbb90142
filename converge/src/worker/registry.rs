//! `converge.workers`: each running worker's row, its heartbeat, and the
//! sweeps' convergence figures it measures.

use std::sync::Arc;
use std::time::Duration;

use converge_sweeper::SweeperHandle;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// What a worker registers.
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

/// Beats every `interval` and measures the sweeps' convergence (recorded in
/// `converge.sweep_schedules` and as gauges) until `shutdown`.
pub(crate) async fn heartbeat(
    pool: PgPool,
    instance: String,
    sweeper: Option<Arc<SweeperHandle>>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(100)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let beat =
            sqlx::query("UPDATE converge.workers SET heartbeat_at = now() WHERE instance = $1")
                .bind(&instance)
                .execute(&pool)
                .await;
        if let Err(e) = beat {
            tracing::warn!(error = %e, "worker heartbeat failed");
        }
        if let Some(sweeper) = &sweeper {
            match sweeper.measure().await {
                Ok(figures) => {
                    let now = chrono::Utc::now();
                    for f in figures {
                        crate::metrics::record_convergence(&f.sweep, f.keys, f.oldest_age(now));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "measuring the sweeps' convergence failed"),
            }
        }
    }
}
