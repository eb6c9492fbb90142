//! Reading committed events and publishing them, in order, to JetStream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use sqlx::Row;
use tokio::time::Instant;
use uuid::Uuid;

use super::listen::sleep_or_cancel;
use super::message::{message, reject_reason, OutboxRow};
use super::{lease, Shared};
use crate::backoff::Backoff;
use crate::metrics as metrics_names;
use crate::stream::ensure_stream;

/// Shortest and longest pause between reads while rows may be about to become
/// visible (a notification arrived, or the last batch was full).
const HINT_MIN: Duration = Duration::from_millis(1);
const HINT_MAX: Duration = Duration::from_millis(64);
/// Idle this long (in hint steps) before asking appenders for a NOTIFY.
const ARM_AFTER: Duration = Duration::from_millis(8);

#[derive(Debug, Clone, PartialEq)]
enum Status {
    /// Not sent (a previous round failed, or the lease deadline passed).
    Pending,
    Acked,
    /// Can never be published; recorded in `converge.relay_rejects`.
    Rejected(String),
    Failed,
}

/// The publisher: read a batch from the owned partitions, publish it, move the
/// cursors, and wait for a notification or the poll interval when idle.
pub(super) async fn publish_loop(shared: Arc<Shared>) {
    let cfg = &shared.config;
    let mut failures = Backoff::new(Duration::from_millis(50), cfg.max_backoff);
    let mut hint = Some(HINT_MIN);
    let mut stream_checked = true;
    let mut armed = false;
    loop {
        if shared.cancel.is_cancelled() {
            return;
        }
        if let Err(error) = lease::release_marked(&shared).await {
            tracing::warn!(%error, "relay could not release partitions; retrying");
        }
        if !stream_checked {
            match ensure_stream(
                &shared.js,
                &cfg.stream,
                cfg.republish_horizon(),
                cfg.max_event_bytes,
            )
            .await
            {
                Ok(()) => stream_checked = true,
                Err(error) => {
                    tracing::error!(%error, "relay cannot find or create its stream");
                    if sleep_or_cancel(&shared, failures.next_delay()).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let now = Instant::now();
        let parts: Vec<(i32, i64, (i64, i64))> = {
            let owned = shared.owned.lock().expect("relay state lock");
            owned
                .iter()
                .filter(|(_, o)| o.deadline > now && !o.release)
                .map(|(p, o)| (*p, o.epoch, o.cursor))
                .collect()
        };
        let rows = if parts.is_empty() {
            Vec::new()
        } else {
            let per_partition = cfg.batch_size.div_ceil(parts.len()).max(16);
            match fetch(&shared, &parts, per_partition).await {
                Ok(rows) => rows,
                Err(error) => {
                    tracing::warn!(%error, attempt = failures.attempts(), "relay read failed; backing off");
                    if sleep_or_cancel(&shared, failures.next_delay()).await {
                        return;
                    }
                    continue;
                }
            }
        };
        record_lag(&shared, &rows);
        if rows.is_empty() {
            if !armed && hint.is_none_or(|h| h >= ARM_AFTER) {
                // Idle: from now on appends notify. Read once more, for what
                // committed before the flag was visible.
                match set_armed(&shared, true).await {
                    Ok(()) => {
                        armed = true;
                        continue;
                    }
                    Err(error) => tracing::debug!(%error, "relay could not arm notifications"),
                }
            }
            let wait = hint.unwrap_or(cfg.poll_interval).min(cfg.poll_interval);
            hint = hint.map(|h| h * 2).filter(|h| *h <= HINT_MAX);
            tokio::select! {
                _ = shared.cancel.cancelled() => return,
                _ = shared.wake.notified() => hint = Some(HINT_MIN),
                _ = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        hint = Some(HINT_MIN);
        if armed {
            // Busy again: the relay polls on its own, appends need not notify.
            match set_armed(&shared, false).await {
                Ok(()) => armed = false,
                Err(error) => tracing::debug!(%error, "relay could not disarm notifications"),
            }
        }
        let span =
            tracing::debug_span!("relay_batch", events = rows.len(), partitions = parts.len());
        let statuses = publish_rows(&shared, &rows).await;
        let acked = statuses.iter().filter(|s| **s == Status::Acked).count();
        if acked > 0 {
            metrics::counter!(metrics_names::EVENTS_PUBLISHED, "stream" => cfg.stream.name.clone())
                .increment(acked as u64);
        }
        let stream_missing = statuses.contains(&Status::Failed) && !stream_exists(&shared).await;
        let all_done = statuses
            .iter()
            .all(|s| matches!(s, Status::Acked | Status::Rejected(_)));
        let epochs: HashMap<i32, i64> = parts.iter().map(|(p, e, _)| (*p, *e)).collect();
        match record(&shared, &rows, &statuses, &epochs).await {
            Ok(published) => {
                let _enter = span.enter();
                tracing::debug!(published, "relay batch recorded");
            }
            Err(error) => {
                // Nothing recorded: the batch is re-sent and de-duplicated.
                tracing::warn!(%error, "relay could not record its progress; re-reading");
            }
        }
        if all_done {
            failures.reset();
        } else {
            if stream_missing {
                stream_checked = false;
            }
            let failed = statuses.iter().filter(|s| **s == Status::Failed).count();
            tracing::warn!(
                failed,
                attempt = failures.attempts(),
                "relay publish failed; backing off"
            );
            if sleep_or_cancel(&shared, failures.next_delay()).await {
                return;
            }
        }
    }
}

async fn set_armed(shared: &Shared, armed: bool) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE converge.relay_instances SET armed = $2 WHERE instance_id = $1")
        .bind(shared.instance_id)
        .bind(armed)
        .execute(&shared.pool)
        .await?;
    Ok(())
}

async fn stream_exists(shared: &Shared) -> bool {
    shared
        .js
        .get_stream(&shared.config.stream.name)
        .await
        .is_ok()
}

/// Reads up to `limit` visible rows after each partition's cursor.
async fn fetch(
    shared: &Shared,
    parts: &[(i32, i64, (i64, i64))],
    limit: usize,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    let partitions: Vec<i32> = parts.iter().map(|p| p.0).collect();
    let tx_orders: Vec<i64> = parts.iter().map(|p| p.2 .0).collect();
    let ids: Vec<i64> = parts.iter().map(|p| p.2 .1).collect();
    let rows = sqlx::query(
        "SELECT o.partition, o.tx_order, o.id, o.event_id, o.aggregate_type, o.aggregate_id, \
                o.version, o.event_type, o.occurred_at, o.headers::text, o.payload::text, \
                o.traceparent \
         FROM unnest($1::int[], $2::bigint[], $3::bigint[]) AS c(partition, tx_order, id) \
         CROSS JOIN LATERAL ( \
             SELECT * FROM converge.outbox o \
             WHERE o.partition = c.partition \
               AND (o.tx_order, o.id) > (c.tx_order, c.id) \
               AND o.tx_order < (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint) \
             ORDER BY o.tx_order, o.id \
             LIMIT $4) AS o \
         ORDER BY o.partition, o.tx_order, o.id",
    )
    .bind(&partitions)
    .bind(&tx_orders)
    .bind(&ids)
    .bind(limit as i64)
    .fetch_all(&shared.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| OutboxRow {
            partition: r.get(0),
            tx_order: r.get(1),
            id: r.get(2),
            event_id: r.get(3),
            aggregate_type: r.get(4),
            aggregate_id: r.get(5),
            version: r.get(6),
            event_type: r.get(7),
            occurred_at: r.get(8),
            headers: r.get(9),
            payload: r.get(10),
            traceparent: r.get(11),
        })
        .collect())
}

/// Publishes a batch. An aggregate's events go out one round at a time, each
/// round after every acknowledgement of the one before; the first failure ends
/// the batch, so no event is ever on the stream before its predecessor.
async fn publish_rows(shared: &Shared, rows: &[OutboxRow]) -> Vec<Status> {
    let mut statuses = vec![Status::Pending; rows.len()];
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    {
        let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, row) in rows.iter().enumerate() {
            let n = seen
                .entry((&row.aggregate_type, &row.aggregate_id))
                .or_default();
            if rounds.len() <= *n {
                rounds.push(Vec::new());
            }
            rounds[*n].push(i);
            *n += 1;
        }
    }
    for round in rounds {
        let deadlines: HashMap<i32, Instant> = {
            let owned = shared.owned.lock().expect("relay state lock");
            owned.iter().map(|(p, o)| (*p, o.deadline)).collect()
        };
        let mut pending = Vec::with_capacity(round.len());
        let mut failed = false;
        for i in round {
            let row = &rows[i];
            let headers: HashMap<String, String> =
                serde_json::from_str(&row.headers).unwrap_or_default();
            if let Some(reason) = reject_reason(shared, row, &headers) {
                statuses[i] = Status::Rejected(reason);
                continue;
            }
            // Fencing on the local clock: past the deadline another instance may
            // already own the partition.
            if deadlines
                .get(&row.partition)
                .is_none_or(|d| Instant::now() >= *d)
            {
                failed = true;
                continue;
            }
            let (subject, publish) = message(shared, row, headers);
            match shared.js.send_publish(subject, publish).await {
                Ok(ack) => pending.push((i, ack)),
                Err(error) => {
                    count_publish_error(shared, error.kind());
                    tracing::warn!(%error, event_id = %row.event_id, "relay publish failed");
                    statuses[i] = Status::Failed;
                    failed = true;
                }
            }
        }
        let acks = futures::future::join_all(
            pending
                .into_iter()
                .map(|(i, ack)| async move { (i, ack.await) }),
        )
        .await;
        for (i, result) in acks {
            match result {
                Ok(_) => statuses[i] = Status::Acked,
                Err(error) => {
                    count_publish_error(shared, error.kind());
                    if error.kind() != PublishErrorKind::TimedOut {
                        tracing::warn!(%error, event_id = %rows[i].event_id, "relay publish not acknowledged");
                    }
                    statuses[i] = Status::Failed;
                    failed = true;
                }
            }
        }
        if failed {
            break;
        }
    }
    statuses
}

/// Moves each partition's cursor over its acknowledged (or rejected) prefix
/// and records rejects, fenced by the lease epoch. Returns the events recorded.
async fn record(
    shared: &Shared,
    rows: &[OutboxRow],
    statuses: &[Status],
    epochs: &HashMap<i32, i64>,
) -> Result<usize, sqlx::Error> {
    let mut advance: Vec<(i32, i64, i64, i64, i64)> = Vec::new(); // partition, epoch, tx_order, id, n
    let mut rejects: Vec<(i64, Uuid, String)> = Vec::new();
    let mut blocked: Option<i32> = None;
    for (row, status) in rows.iter().zip(statuses) {
        if blocked == Some(row.partition) {
            continue;
        }
        match status {
            Status::Acked | Status::Rejected(_) => {
                if let Status::Rejected(reason) = status {
                    tracing::error!(event_id = %row.event_id, outbox_id = row.id, reason = %reason, "relay rejected an event it can never publish");
                    rejects.push((row.id, row.event_id, reason.clone()));
                }
                match advance.last_mut() {
                    Some(a) if a.0 == row.partition => {
                        a.2 = row.tx_order;
                        a.3 = row.id;
                        a.4 += 1;
                    }
                    _ => advance.push((
                        row.partition,
                        epochs[&row.partition],
                        row.tx_order,
                        row.id,
                        1,
                    )),
                }
            }
            Status::Pending | Status::Failed => blocked = Some(row.partition),
        }
    }
    if advance.is_empty() {
        return Ok(0);
    }
    let mut tx = shared.pool.begin().await?;
    if !rejects.is_empty() {
        let ids: Vec<i64> = rejects.iter().map(|r| r.0).collect();
        let event_ids: Vec<Uuid> = rejects.iter().map(|r| r.1).collect();
        let reasons: Vec<&str> = rejects.iter().map(|r| r.2.as_str()).collect();
        sqlx::query(
            "INSERT INTO converge.relay_rejects (outbox_id, event_id, reason) \
             SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[]) \
             ON CONFLICT (outbox_id) DO NOTHING",
        )
        .bind(&ids)
        .bind(&event_ids)
        .bind(&reasons)
        .execute(&mut *tx)
        .await?;
    }
    let partitions: Vec<i32> = advance.iter().map(|a| a.0).collect();
    let ep: Vec<i64> = advance.iter().map(|a| a.1).collect();
    let tx_orders: Vec<i64> = advance.iter().map(|a| a.2).collect();
    let ids: Vec<i64> = advance.iter().map(|a| a.3).collect();
    let counts: Vec<i64> = advance.iter().map(|a| a.4).collect();
    let kept: Vec<i32> = sqlx::query_scalar(
        "UPDATE converge.relay_partitions p \
         SET cursor_tx_order = c.tx_order, cursor_id = c.id, published = p.published + c.n, \
             updated_at = now() \
         FROM unnest($2::int[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[]) \
              AS c(partition, epoch, tx_order, id, n) \
         WHERE p.partition = c.partition AND p.owner_id = $1 AND p.epoch = c.epoch \
         RETURNING p.partition",
    )
    .bind(shared.instance_id)
    .bind(&partitions)
    .bind(&ep)
    .bind(&tx_orders)
    .bind(&ids)
    .bind(&counts)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    if !rejects.is_empty() {
        metrics::counter!(metrics_names::RELAY_REJECTS, "stream" => shared.config.stream.name.clone())
            .increment(rejects.len() as u64);
    }
    let mut recorded = 0;
    let mut owned = shared.owned.lock().expect("relay state lock");
    for a in &advance {
        if kept.contains(&a.0) {
            recorded += a.4 as usize;
            if let Some(o) = owned.get_mut(&a.0) {
                if o.epoch == a.1 {
                    o.cursor = (a.2, a.3);
                }
            }
        } else {
            tracing::warn!(
                partition = a.0,
                "relay partition was taken over; dropping it"
            );
            if owned.remove(&a.0).is_some() {
                lease::count_loss(shared);
            }
        }
    }
    lease::gauge_owned(shared, owned.len());
    Ok(recorded)
}

/// Sets the lag gauge: the age of the oldest row just read, 0 when none.
fn record_lag(shared: &Shared, rows: &[OutboxRow]) {
    let lag = rows
        .iter()
        .map(|r| r.occurred_at)
        .min()
        .map_or(0.0, |oldest| {
            (chrono::Utc::now() - oldest)
                .to_std()
                .unwrap_or_default()
                .as_secs_f64()
        });
    metrics::gauge!(metrics_names::RELAY_LAG, "stream" => shared.config.stream.name.clone())
        .set(lag);
}

fn count_publish_error(shared: &Shared, kind: PublishErrorKind) {
    let kind = match kind {
        PublishErrorKind::TimedOut => "timed_out",
        PublishErrorKind::StreamNotFound => "stream_not_found",
        PublishErrorKind::BrokenPipe => "broken_pipe",
        PublishErrorKind::MaxAckPending => "max_ack_pending",
        _ => "other",
    };
    metrics::counter!(
        metrics_names::PUBLISH_ERRORS,
        "stream" => shared.config.stream.name.clone(),
        "kind" => kind
    )
    .increment(1);
}
