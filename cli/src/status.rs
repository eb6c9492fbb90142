//! `converge status`: one screen, readable in five seconds.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::context::{Ctx, LIVE_WORKER_SQL};
use crate::error::CliResult;
use crate::locks::{self, LeaseRow};
use crate::output;
use crate::sweep::{self, SweepRow};

/// Everything `converge status` shows.
#[derive(Debug, Serialize)]
pub(crate) struct StatusReport {
    /// The database clock when read.
    pub(crate) now: DateTime<Utc>,
    pub(crate) outbox: OutboxStatus,
    /// The oldest transaction holding an xid on the server (it holds the
    /// relays back), if it has been open for more than 5 s.
    pub(crate) holding_transaction: Option<converge::HoldingTransaction>,
    pub(crate) relays: Vec<RelayRow>,
    /// Partitions no live relay owns.
    pub(crate) unowned_partitions: Vec<i32>,
    pub(crate) workers: Vec<WorkerRow>,
    pub(crate) consumers: Vec<ConsumerStatus>,
    pub(crate) dead_letters: Vec<DeadLetterCount>,
    pub(crate) sweeps: Vec<SweepRow>,
    pub(crate) leases: Vec<LeaseRow>,
    pub(crate) projections: Vec<crate::projections::ProjectionRow>,
}

#[derive(Debug, Serialize)]
pub(crate) struct OutboxStatus {
    /// Events past their partition's cursor (not yet on the stream).
    pub(crate) backlog: i64,
    /// When the oldest of them occurred.
    pub(crate) oldest_unpublished_at: Option<DateTime<Utc>>,
    /// Its age in seconds.
    pub(crate) oldest_unpublished_age_secs: Option<f64>,
    /// Events the relay rejected.
    pub(crate) rejected: i64,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub(crate) struct RelayRow {
    pub(crate) name: String,
    pub(crate) instance_id: uuid::Uuid,
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) heartbeat_at: DateTime<Utc>,
    pub(crate) armed: bool,
    pub(crate) partitions: Vec<i32>,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub(crate) struct WorkerRow {
    pub(crate) instance: String,
    pub(crate) application: String,
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) heartbeat_at: DateTime<Utc>,
    pub(crate) stream: Option<String>,
    pub(crate) stream_prefix: Option<String>,
    pub(crate) consumers: Vec<String>,
    pub(crate) sweeps: Vec<String>,
    pub(crate) reconcilers: Vec<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ConsumerStatus {
    pub(crate) application: String,
    pub(crate) stream: Option<String>,
    pub(crate) consumer: String,
    /// Messages not yet delivered.
    pub(crate) pending: Option<u64>,
    /// Delivered, not yet acknowledged.
    pub(crate) ack_pending: Option<usize>,
    /// Delivered more than once and not yet acknowledged.
    pub(crate) redelivered: Option<usize>,
    /// Why the figures are missing.
    pub(crate) error: Option<String>,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub(crate) struct DeadLetterCount {
    pub(crate) reconciler: String,
    pub(crate) open: i64,
    pub(crate) oldest_failed_at: DateTime<Utc>,
}

async fn outbox(pool: &PgPool) -> CliResult<OutboxStatus> {
    let (backlog, oldest, age, rejected): (i64, Option<DateTime<Utc>>, Option<f64>, i64) =
        sqlx::query_as(
            "SELECT coalesce(sum(b.n), 0)::bigint, min(b.oldest), \
                    extract(epoch FROM now() - min(b.oldest))::float8, \
                    (SELECT count(*) FROM converge.relay_rejects) \
             FROM converge.relay_partitions p \
             CROSS JOIN LATERAL ( \
               SELECT count(*) AS n, min(converge.event_time(o.occurred_at)) AS oldest \
               FROM converge.outbox o \
               WHERE o.partition = p.partition \
                 AND (o.tx_order, o.id) > (p.cursor_tx_order, p.cursor_id)) b",
        )
        .fetch_one(pool)
        .await?;
    Ok(OutboxStatus {
        backlog,
        oldest_unpublished_at: oldest,
        oldest_unpublished_age_secs: age,
        rejected,
    })
}

/// The relay only reads below its snapshot's xmin: the oldest transaction
/// with an xid anywhere on the server (sessions and prepared transactions)
/// holds it back. Shown once it has been open for 5 s.
async fn holding_transaction(pool: &PgPool) -> CliResult<Option<converge::HoldingTransaction>> {
    Ok(converge::holding_transaction(pool)
        .await?
        .filter(|h| h.age_secs.is_none_or(|a| a >= 5.0)))
}

/// A consumer as the worker registry names it: `STREAM/name`, or a bare
/// `name` on the worker's own (relay) stream, `fallback`. `Err` says what is
/// wrong with a malformed entry.
fn consumer_ref(entry: &str, fallback: Option<&str>) -> Result<(Option<String>, String), String> {
    let (stream, name) = match entry.split_once('/') {
        Some((stream, name)) => (Some(stream.trim()), name.trim()),
        None => (None, entry.trim()),
    };
    if name.is_empty() || name.contains('/') {
        return Err(format!(
            "registered consumer {entry:?} is neither STREAM/name nor a bare name"
        ));
    }
    let stream = stream.filter(|s| !s.is_empty()).or(fallback);
    Ok((stream.map(str::to_owned), name.to_owned()))
}

async fn consumers(ctx: &Ctx, workers: &[WorkerRow]) -> Vec<ConsumerStatus> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for w in workers {
        for entry in &w.consumers {
            let (stream, name, malformed) = match consumer_ref(entry, w.stream.as_deref()) {
                Ok((stream, name)) => (stream, name, None),
                Err(e) => (None, entry.clone(), Some(e)),
            };
            if !seen.insert((w.application.clone(), stream.clone(), name.clone())) {
                continue;
            }
            let mut status = ConsumerStatus {
                application: w.application.clone(),
                stream: stream.clone(),
                consumer: name.clone(),
                pending: None,
                ack_pending: None,
                redelivered: None,
                error: malformed,
            };
            match stream {
                _ if status.error.is_some() => {}
                None => {
                    status.error = Some(
                        "no stream: neither named (STREAM/name) nor the worker's relay stream"
                            .into(),
                    )
                }
                Some(stream) => match consumer_info(ctx, &stream, &name).await {
                    Ok(info) => {
                        status.pending = Some(info.num_pending);
                        status.ack_pending = Some(info.num_ack_pending);
                        status.redelivered = Some(info.num_redelivered);
                    }
                    Err(e) => status.error = Some(e),
                },
            }
            out.push(status);
        }
    }
    out
}

async fn consumer_info(
    ctx: &Ctx,
    stream: &str,
    name: &str,
) -> Result<async_nats::jetstream::consumer::Info, String> {
    let js = ctx.jetstream().await.map_err(|e| e.to_string())?;
    let lookup = async {
        let s = js
            .get_stream(stream)
            .await
            .map_err(|e| format!("stream {stream} missing: {e}"))?;
        s.consumer_info(name)
            .await
            .map_err(|e| format!("consumer missing on stream {stream}: {e}"))
    };
    tokio::time::timeout(Duration::from_secs(5), lookup)
        .await
        .unwrap_or_else(|_| Err("JetStream did not answer within 5 s".into()))
}

/// Reads everything.
pub(crate) async fn report(ctx: &Ctx) -> CliResult<StatusReport> {
    let pool = ctx.pool().await?;
    let app = ctx.known_app().await?;
    let now = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    let relays: Vec<RelayRow> = sqlx::query_as(
        "SELECT i.name, i.instance_id, i.started_at, i.heartbeat_at, i.armed, \
                coalesce(array_agg(p.partition ORDER BY p.partition) \
                         FILTER (WHERE p.partition IS NOT NULL), '{}') AS partitions \
         FROM converge.relay_instances i \
         LEFT JOIN converge.relay_partitions p \
           ON p.owner_id = i.instance_id AND p.lease_until > now() \
         GROUP BY i.instance_id ORDER BY i.name",
    )
    .fetch_all(pool)
    .await?;
    let unowned_partitions = sqlx::query_scalar(
        "SELECT partition FROM converge.relay_partitions \
         WHERE owner_id IS NULL OR lease_until IS NULL OR lease_until <= now() ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    let workers: Vec<WorkerRow> = sqlx::query_as(&format!(
        "SELECT instance, application, started_at, heartbeat_at, stream, stream_prefix, \
                consumers, sweeps, reconcilers \
         FROM converge.workers WHERE {LIVE_WORKER_SQL} AND ($1::text IS NULL OR application = $1) \
         ORDER BY application, instance"
    ))
    .bind(app)
    .fetch_all(pool)
    .await?;
    let dead_letters = sqlx::query_as(
        "SELECT reconciler, count(*) AS open, min(failed_at) AS oldest_failed_at \
         FROM converge.dead_letters WHERE resolved_at IS NULL GROUP BY reconciler ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    Ok(StatusReport {
        now,
        outbox: outbox(pool).await?,
        holding_transaction: holding_transaction(pool).await?,
        relays,
        unowned_partitions,
        consumers: consumers(ctx, &workers).await,
        workers,
        dead_letters,
        sweeps: sweep::sweeps(pool, app).await?,
        leases: locks::leases(pool, true).await?,
        // A schema migrated before projections existed has none to show.
        projections: match crate::projections::all(pool).await {
            Err(crate::error::CliError::SchemaMissing { .. }) => Vec::new(),
            other => other?,
        },
    })
}

/// `converge status [--watch SECS]`
pub(crate) async fn status(ctx: &Ctx, watch: Option<u64>) -> CliResult<()> {
    let Some(every) = watch else {
        return show(ctx, &report(ctx).await?, false);
    };
    loop {
        let report = report(ctx).await?;
        if !ctx.json() {
            print!("\x1b[2J\x1b[H");
        }
        show(ctx, &report, true)?;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(every)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn show(ctx: &Ctx, r: &StatusReport, watching: bool) -> CliResult<()> {
    match (ctx.json(), watching) {
        // One object per refresh, one per line (JSON lines).
        (true, true) => output::print_json_line(r),
        (true, false) => output::print_json(r),
        (false, _) => {
            crate::status_view::print(r, &ctx.global.database_url);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::consumer_ref;

    #[test]
    fn registered_consumers_name_their_stream_or_use_the_workers() {
        let pair = |s: &str, n: &str| Ok((Some(s.to_owned()), n.to_owned()));
        assert_eq!(
            consumer_ref("ORDERS/invoicing", Some("EVENTS")),
            pair("ORDERS", "invoicing")
        );
        assert_eq!(
            consumer_ref("ORDERS/invoicing", None),
            pair("ORDERS", "invoicing")
        );
        assert_eq!(
            consumer_ref("invoicing", Some("EVENTS")),
            pair("EVENTS", "invoicing")
        );
        assert_eq!(
            consumer_ref("/invoicing", Some("EVENTS")),
            pair("EVENTS", "invoicing")
        );
        assert_eq!(
            consumer_ref("invoicing", None),
            Ok((None, "invoicing".into()))
        );
        for bad in ["ORDERS/", "", "A/b/c"] {
            assert!(consumer_ref(bad, Some("EVENTS")).is_err(), "{bad:?}");
        }
    }
}
