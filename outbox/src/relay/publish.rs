//! The publisher: read a batch from the owned partitions, publish it in
//! order, record it; wait for a notification or the poll interval when idle.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::ErrorCode;
use tokio::time::Instant;

use super::fetch::{fetch, waiting, Part};
use super::held_back::{holding_transaction, HoldingTransaction};
use super::listen::sleep_or_cancel;
use super::message::{prepare, OutboxRow, Prepared};
use super::record::{record, Progress, RecordError, Status};
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
/// How often an idle relay looks at what waits beyond its reads.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// How often a relay held back says so in the log.
const WARN_EVERY: Duration = Duration::from_secs(30);
/// Committed events wait behind running transactions for a few milliseconds
/// under any load; held back means waiting longer than this.
const HELD_BACK_AFTER: Duration = Duration::from_secs(2);

/// The publisher: until cancelled, record what was published, then read,
/// publish and record the next batch.
pub(super) async fn publish_loop(shared: Arc<Shared>) {
    let cfg = &shared.config;
    let mut failures = Backoff::new(Duration::from_millis(50), cfg.max_backoff);
    let mut hint = Some(HINT_MIN);
    let mut stream_checked = true;
    let mut armed = false;
    let mut watch = Watch::default();
    // Average payload bytes of recent rows: the read limit per partition
    // follows it, so large events are not read (and thrown away) by the
    // thousand to publish a budget's worth.
    let mut average_payload = 256.0_f64;
    let mut first_partition = 0_i32;
    loop {
        if shared.panic_once.swap(false, Ordering::SeqCst) {
            panic!("injected publisher panic (a fault drill)");
        }
        let clock = *shared.clock.lock().expect("relay clock lock");
        // What JetStream acknowledged is written before anything is read
        // again: re-reading would send it again, maybe after the duplicate
        // window.
        let remembered = shared.pending.lock().expect("relay progress lock").take();
        if let Some(progress) = remembered {
            match record(&shared, clock, &progress).await {
                Ok(recorded) => tracing::info!(
                    recorded,
                    "relay recorded published events after a failed write"
                ),
                Err(RecordError::OtherCluster) => {
                    tracing::error!("the database is another PostgreSQL cluster than the one the published events were read from; dropping their progress and the partitions");
                    lease::forget_all(&shared);
                }
                Err(error) => {
                    tracing::warn!(%error, attempt = failures.attempts(), "relay could not record published events; retrying before reading again");
                    *shared.pending.lock().expect("relay progress lock") = Some(progress);
                    if sleep_or_cancel(&shared, failures.next_delay()).await {
                        return;
                    }
                    continue;
                }
            }
        }
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
                Ok(max_msg_size) => {
                    shared
                        .stream_max_msg_size
                        .store(max_msg_size, Ordering::Relaxed);
                    stream_checked = true;
                }
                Err(error) => {
                    tracing::error!(%error, "relay cannot find or create its stream");
                    shared.publish_failed();
                    if sleep_or_cancel(&shared, failures.next_delay()).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let now = Instant::now();
        let parts: Vec<Part> = {
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
            let by_count = cfg.batch_size.div_ceil(parts.len()).max(1);
            let by_bytes = (cfg.max_batch_bytes as f64 / (average_payload * parts.len() as f64))
                .ceil()
                .max(1.0) as usize;
            let per_partition = by_count.min(by_bytes);
            // Rotate over the partitions held (their numbers stay below 1024).
            let highest = parts.iter().map(|p| p.0).max().unwrap_or(0);
            first_partition = (first_partition + 1) % (highest + 1);
            match fetch(
                &shared,
                clock,
                &parts,
                per_partition,
                cfg.max_batch_bytes,
                first_partition,
            )
            .await
            {
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
        if rows.is_empty() {
            if shared.client.connection_state() == async_nats::connection::State::Connected {
                // Nothing failing to publish: an earlier failure is not a reason
                // to hand the partitions over.
                shared.publish_succeeded();
            }
            watch.idle(&shared, clock, &parts).await;
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
        watch.busy(&shared, &rows);
        let bytes: usize = rows.iter().map(|r| r.payload.len()).sum();
        average_payload = 0.5 * average_payload + 0.5 * (bytes as f64 / rows.len() as f64).max(1.0);
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
        let failed = statuses.iter().filter(|s| **s == Status::Failed).count();
        let stream_missing = failed > 0 && !stream_exists(&shared).await;
        let all_done = statuses
            .iter()
            .all(|s| matches!(s, Status::Acked | Status::Rejected(_)));
        let epochs: HashMap<i32, i64> = parts.iter().map(|(p, e, _)| (*p, *e)).collect();
        let progress = Progress::of(&rows, &statuses, |p| epochs[&p]);
        drop(rows); // the payloads: memory is one batch at most
        match record(&shared, clock, &progress).await {
            Ok(published) => {
                let _enter = span.enter();
                tracing::debug!(published, "relay batch recorded");
            }
            Err(RecordError::OtherCluster) => {
                tracing::error!("the database is another PostgreSQL cluster than the one the batch was read from; dropping its progress and the partitions");
                lease::forget_all(&shared);
            }
            Err(error) => {
                tracing::warn!(%error, "relay could not record a published batch; writing it before any new read");
                *shared.pending.lock().expect("relay progress lock") = Some(progress);
            }
        }
        if failed > 0 {
            shared.publish_failed();
        } else if acked > 0 {
            shared.publish_succeeded();
        }
        let unrecorded = shared
            .pending
            .lock()
            .expect("relay progress lock")
            .is_some();
        if all_done && !unrecorded {
            failures.reset();
        } else if !all_done {
            if stream_missing {
                stream_checked = false;
            }
            tracing::warn!(
                failed,
                attempt = failures.attempts(),
                "relay publish failed; backing off"
            );
            if sleep_or_cancel(&shared, failures.next_delay()).await {
                // Stopping: write what was acknowledged once more.
                let remembered = shared.pending.lock().expect("relay progress lock").take();
                if let Some(progress) = remembered {
                    let _ = record(&shared, clock, &progress).await;
                }
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
    let limit = shared.message_limit();
    let prefix = &shared.config.stream.subject_prefix;
    for round in rounds {
        let deadlines: HashMap<i32, Instant> = {
            let owned = shared.owned.lock().expect("relay state lock");
            owned.iter().map(|(p, o)| (*p, o.deadline)).collect()
        };
        let mut pending = Vec::with_capacity(round.len());
        let mut failed = false;
        for i in round {
            let row = &rows[i];
            let (subject, message, size) = match prepare(row, prefix, limit) {
                Prepared::Reject(reason) => {
                    statuses[i] = Status::Rejected(reason);
                    continue;
                }
                Prepared::Message {
                    subject,
                    message,
                    size,
                } => (subject, message, size),
            };
            // Fencing on the local clock: past the deadline another instance may
            // already own the partition.
            if deadlines
                .get(&row.partition)
                .is_none_or(|d| Instant::now() >= *d)
            {
                failed = true;
                continue;
            }
            match shared.js.send_publish(subject, message).await {
                Ok(ack) => pending.push((i, size, ack)),
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
                .map(|(i, size, ack)| async move { (i, size, ack.await) }),
        )
        .await;
        for (i, size, result) in acks {
            match result {
                Ok(_) => statuses[i] = Status::Acked,
                Err(error) => {
                    if let Some(reason) = refused_for_size(&error, size) {
                        statuses[i] = Status::Rejected(reason);
                        continue;
                    }
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

/// The stream refused the message for its size (a `max_msg_size` lowered
/// since the relay checked it): it never will take it.
fn refused_for_size(
    error: &async_nats::jetstream::context::PublishError,
    size: usize,
) -> Option<String> {
    let source = std::error::Error::source(error)?;
    let js = source.downcast_ref::<async_nats::jetstream::Error>()?;
    matches!(
        js.error_code(),
        ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM | ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM
    )
    .then(|| format!("the stream refused the {size}-byte message: {js}"))
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

/// The lag and held-back figures: from the rows read while busy; from a
/// look beyond the read (at most every second) while idle.
#[derive(Default)]
struct Watch {
    last_look: Option<Instant>,
    last_warning: Option<Instant>,
    /// The labels of the holding-transaction series last set, to zero it.
    holding: Option<[String; 5]>,
}

impl Watch {
    fn busy(&mut self, shared: &Shared, rows: &[OutboxRow]) {
        let oldest = rows.iter().filter_map(|r| r.occurred_at).min();
        set_lag(shared, oldest);
        self.clear_holding(shared);
    }

    async fn idle(&mut self, shared: &Shared, clock: crate::clock::Clock, parts: &[Part]) {
        if self.last_look.is_some_and(|t| t.elapsed() < WATCH_EVERY) {
            return;
        }
        self.last_look = Some(Instant::now());
        if parts.is_empty() {
            set_lag(shared, None);
            self.clear_holding(shared);
            return;
        }
        let waiting = match waiting(shared, clock, parts).await {
            Ok(w) => w,
            Err(error) => {
                tracing::debug!(%error, "relay could not look at waiting events");
                return;
            }
        };
        set_lag(shared, waiting.oldest);
        let waited_long = waiting
            .oldest
            .is_some_and(|at| age_secs(at) >= HELD_BACK_AFTER.as_secs_f64());
        if !waiting.held_back || !waited_long {
            self.clear_holding(shared);
            return;
        }
        let holder = match holding_transaction(&shared.pool).await {
            Ok(h) => h,
            Err(error) => {
                tracing::debug!(%error, "relay could not read pg_stat_activity");
                None
            }
        };
        self.hold(shared, holder.as_ref(), waiting.oldest);
    }

    fn hold(
        &mut self,
        shared: &Shared,
        holder: Option<&HoldingTransaction>,
        oldest: Option<chrono::DateTime<chrono::Utc>>,
    ) {
        let stream = shared.config.stream.name.clone();
        // Without the holder's start (no rights on pg_stat_activity), the
        // waiting events' age is a lower bound.
        let age = holder
            .and_then(|h| h.age_secs)
            .or_else(|| oldest.map(age_secs))
            .unwrap_or(0.0);
        metrics::gauge!(metrics_names::RELAY_HELD_BACK, "stream" => stream.clone()).set(age);
        if let Some(h) = holder {
            let labels = [
                h.pid.map_or_else(String::new, |p| p.to_string()),
                h.database.clone().unwrap_or_default(),
                h.xid.clone(),
                h.state.clone().unwrap_or_default(),
                h.prepared.to_string(),
            ];
            if self.holding.as_ref().is_some_and(|l| *l != labels) {
                self.clear_holding(shared);
            }
            holding_gauge(&stream, &labels).set(age);
            self.holding = Some(labels);
        }
        if self.last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            self.last_warning = Some(Instant::now());
            match holder {
                Some(h) => tracing::warn!(
                    holder = %h,
                    pid = ?h.pid,
                    database = ?h.database,
                    xid = %h.xid,
                    state = ?h.state,
                    prepared = h.prepared,
                    age_secs = ?h.age_secs,
                    query = ?h.query,
                    "committed events wait behind an open transaction: the relay reads only \
                     below the oldest transaction id still running on the server; end it \
                     (COMMIT, ROLLBACK, pg_terminate_backend, ROLLBACK PREPARED)"
                ),
                None => tracing::warn!(
                    "committed events wait behind an open transaction the relay cannot see \
                     (grant it pg_read_all_stats to name it)"
                ),
            }
        }
    }

    fn clear_holding(&mut self, shared: &Shared) {
        let stream = shared.config.stream.name.clone();
        if let Some(labels) = self.holding.take() {
            holding_gauge(&stream, &labels).set(0.0);
            metrics::gauge!(metrics_names::RELAY_HELD_BACK, "stream" => stream).set(0.0);
            self.last_warning = None;
        } else if self.last_warning.take().is_some() {
            metrics::gauge!(metrics_names::RELAY_HELD_BACK, "stream" => stream).set(0.0);
        }
    }
}

fn holding_gauge(stream: &str, labels: &[String; 5]) -> metrics::Gauge {
    metrics::gauge!(
        metrics_names::RELAY_HOLDING_TRANSACTION,
        "stream" => stream.to_owned(),
        "pid" => labels[0].clone(),
        "database" => labels[1].clone(),
        "xid" => labels[2].clone(),
        "state" => labels[3].clone(),
        "prepared" => labels[4].clone()
    )
}

fn age_secs(at: chrono::DateTime<chrono::Utc>) -> f64 {
    (chrono::Utc::now() - at)
        .to_std()
        .unwrap_or_default()
        .as_secs_f64()
}

/// Sets the lag gauge: the age of the oldest waiting event, 0 when none.
fn set_lag(shared: &Shared, oldest: Option<chrono::DateTime<chrono::Utc>>) {
    metrics::gauge!(metrics_names::RELAY_LAG, "stream" => shared.config.stream.name.clone())
        .set(oldest.map_or(0.0, age_secs));
}
