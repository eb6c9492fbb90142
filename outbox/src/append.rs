//! Appending events in the caller's transaction, and reading them back.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::error::OutboxError;
use crate::event::{Appended, DomainEvent, StoredEvent};
use crate::metrics as metrics_names;
use crate::trace::{TraceParent, HEADER_TRACEPARENT, TRACEPARENT_HEADER_BYTES};
use crate::validate::{check_event, envelope_size};

/// The channel the relay listens on; `append` notifies it at commit.
pub const NOTIFY_CHANNEL: &str = "converge_outbox";

/// Default for [`OutboxConfig::max_event_bytes`]: NATS's default `max_payload` (1 MiB).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

/// How the outbox checks and announces appended events.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OutboxConfig {
    /// Largest event accepted, payload and headers together. Keep it at or below
    /// the NATS server's `max_payload`; the relay checks that at start.
    pub max_event_bytes: usize,
    /// Wake an idle relay at commit with a `NOTIFY`. Without it the relay
    /// finds events at its next poll (`RelayConfig::poll_interval`).
    ///
    /// PostgreSQL serialises the commits of notifying transactions, so an
    /// append only notifies while some relay is idle and waiting ("armed"); a
    /// busy relay polls on its own and appends cost no notification.
    /// `BENCHMARKS.md` has figures.
    pub notify: bool,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            notify: true,
        }
    }
}

/// Per-append options: optimistic concurrency, headers, the event time and
/// the trace context.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct AppendOptions {
    /// The version the aggregate must have before this event (0: no event yet).
    /// A different version fails with [`OutboxError::VersionConflict`].
    pub expected_version: Option<i64>,
    /// Headers sent with the event (names must not start with `Converge-` or `Nats-`).
    pub headers: BTreeMap<String, String>,
    /// When the event happened; defaults to the transaction's time.
    pub occurred_at: Option<DateTime<Utc>>,
    /// The event id; defaults to a new UUIDv7. Set it to make a retried
    /// business operation append the very same event.
    pub event_id: Option<Uuid>,
    /// The W3C trace context sent with the event (the `traceparent` header).
    /// Defaults to a valid `traceparent` among [`headers`](Self::headers), else
    /// to [`TraceParent::current`]: the enclosing reconcile's trace, the
    /// current OpenTelemetry span (feature `opentelemetry`), or a new trace.
    pub traceparent: Option<TraceParent>,
}

impl AppendOptions {
    /// Options that require the aggregate to be at `version` before the append.
    pub fn expect_version(version: i64) -> Self {
        AppendOptions {
            expected_version: Some(version),
            ..Default::default()
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sends the event with this trace context instead of the current one
    /// (`None`: the default, see [`AppendOptions::traceparent`](Self#structfield.traceparent)).
    pub fn traceparent(mut self, traceparent: Option<TraceParent>) -> Self {
        self.traceparent = traceparent;
        self
    }

    /// The trace context to store: the option, a valid `traceparent` header,
    /// or the current context.
    fn trace_context(&self) -> TraceParent {
        self.traceparent
            .or_else(|| {
                self.headers
                    .get(HEADER_TRACEPARENT)
                    .and_then(|v| TraceParent::parse(v).ok())
            })
            .unwrap_or_else(TraceParent::current)
    }
}

/// The transactional outbox: appends domain events in the caller's transaction.
///
/// If the transaction rolls back, the events never existed; once it commits,
/// the [`Relay`](crate::Relay) publishes them. The outbox is also the ordered
/// event log of each aggregate: every event gets the aggregate's next version.
#[derive(Debug, Clone, Default)]
pub struct Outbox {
    config: OutboxConfig,
}

/// An event checked and serialized, ready to insert.
struct Prepared {
    event_id: Uuid,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    occurred_at: Option<DateTime<Utc>>,
    headers: String,
    payload: String,
}

/// Counts appended events once the INSERT succeeded (the transaction may
/// still roll back; the metric's docs say so).
fn count_appended<'a>(events: impl IntoIterator<Item = &'a Prepared>) {
    let mut events = events.into_iter().peekable();
    while let Some(first) = events.next() {
        // Runs of the same types are counted in one call.
        let mut n = 1;
        while events
            .next_if(|p| {
                p.aggregate_type == first.aggregate_type && p.event_type == first.event_type
            })
            .is_some()
        {
            n += 1;
        }
        metrics::counter!(
            metrics_names::EVENTS_APPENDED,
            "aggregate_type" => first.aggregate_type.clone(),
            "event_type" => first.event_type.clone()
        )
        .increment(n);
    }
}

impl Outbox {
    /// An outbox with the given configuration.
    pub fn new(config: OutboxConfig) -> Self {
        Outbox { config }
    }

    /// The configuration.
    pub fn config(&self) -> &OutboxConfig {
        &self.config
    }

    fn prepare<E: DomainEvent>(
        &self,
        event: &E,
        options: &AppendOptions,
    ) -> Result<Prepared, OutboxError> {
        let aggregate_type = event.aggregate_type();
        let aggregate_id = event.aggregate_id();
        let event_type = event.event_type();
        check_event(aggregate_type, &aggregate_id, event_type, &options.headers)?;
        let payload = serde_json::to_string(event).map_err(|source| OutboxError::Serialize {
            event_type: event_type.to_owned(),
            source,
        })?;
        let size = envelope_size(&aggregate_id, &options.headers, payload.len())
            + TRACEPARENT_HEADER_BYTES;
        if size > self.config.max_event_bytes {
            return Err(OutboxError::TooLarge {
                aggregate_type: aggregate_type.to_owned(),
                aggregate_id,
                event_type: event_type.to_owned(),
                size,
                limit: self.config.max_event_bytes,
            });
        }
        let headers =
            serde_json::to_string(&options.headers).map_err(|source| OutboxError::Serialize {
                event_type: event_type.to_owned(),
                source,
            })?;
        Ok(Prepared {
            event_id: options.event_id.unwrap_or_else(Uuid::now_v7),
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id,
            event_type: event_type.to_owned(),
            occurred_at: options.occurred_at,
            headers,
            payload,
        })
    }

    /// Appends one event in the caller's transaction and returns its id and the
    /// aggregate's new version.
    ///
    /// Bad input (an empty aggregate id, a type that cannot be a subject token,
    /// a payload that does not serialize or is too large) is rejected here,
    /// before anything is written.
    pub async fn append<E: DomainEvent>(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event: &E,
    ) -> Result<Appended, OutboxError> {
        self.append_with(tx, event, &AppendOptions::default()).await
    }

    /// Appends one event with options (expected version, headers, event time).
    #[tracing::instrument(
        skip_all,
        fields(aggregate_type = event.aggregate_type(), event_type = event.event_type()),
        err
    )]
    pub async fn append_with<E: DomainEvent>(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event: &E,
        options: &AppendOptions,
    ) -> Result<Appended, OutboxError> {
        let p = self.prepare(event, options)?;
        let traceparent = options.trace_context().to_string();
        let conn: &mut PgConnection = tx;
        let sql = if self.config.notify {
            APPEND_ONE_NOTIFY
        } else {
            APPEND_ONE
        };
        let row = sqlx::query(sql)
            .bind(p.event_id)
            .bind(&p.aggregate_type)
            .bind(&p.aggregate_id)
            .bind(&p.event_type)
            .bind(p.occurred_at)
            .bind(&p.headers)
            .bind(&p.payload)
            .bind(options.expected_version)
            .bind(&traceparent)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| map_insert_error(e, &p.aggregate_type, &p.aggregate_id, options))?;
        match row {
            Some(row) => {
                count_appended([&p]);
                Ok(Appended {
                    event_id: p.event_id,
                    version: row.get(0),
                })
            }
            None => {
                // Only the expected-version guard filters the insert out.
                let actual = current_version(&mut *conn, &p.aggregate_type, &p.aggregate_id)
                    .await
                    .map_err(OutboxError::Database)?;
                Err(OutboxError::VersionConflict {
                    aggregate_type: p.aggregate_type,
                    aggregate_id: p.aggregate_id,
                    expected: options.expected_version.unwrap_or_default(),
                    actual,
                })
            }
        }
    }

    /// Appends several events in one statement, in the caller's transaction.
    ///
    /// Events of the same aggregate get consecutive versions in slice order.
    /// Every event is checked before anything is written: one bad event rejects
    /// the whole batch. The events share one trace context
    /// ([`TraceParent::current`]).
    #[tracing::instrument(skip_all, fields(events = events.len()), err)]
    pub async fn append_all<E: DomainEvent>(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: &[E],
    ) -> Result<Vec<Appended>, OutboxError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let none = AppendOptions::default();
        let prepared = events
            .iter()
            .map(|e| self.prepare(e, &none))
            .collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<Uuid> = prepared.iter().map(|p| p.event_id).collect();
        let types: Vec<&str> = prepared.iter().map(|p| p.aggregate_type.as_str()).collect();
        let agg_ids: Vec<&str> = prepared.iter().map(|p| p.aggregate_id.as_str()).collect();
        let event_types: Vec<&str> = prepared.iter().map(|p| p.event_type.as_str()).collect();
        let headers: Vec<&str> = prepared.iter().map(|p| p.headers.as_str()).collect();
        let payloads: Vec<&str> = prepared.iter().map(|p| p.payload.as_str()).collect();
        let conn: &mut PgConnection = tx;
        let sql = if self.config.notify {
            APPEND_MANY_NOTIFY
        } else {
            APPEND_MANY
        };
        let rows = sqlx::query(sql)
            .bind(&ids)
            .bind(&types)
            .bind(&agg_ids)
            .bind(&event_types)
            .bind(&headers)
            .bind(&payloads)
            .bind(none.trace_context().to_string())
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| {
                let first = &prepared[0];
                map_insert_error(e, &first.aggregate_type, &first.aggregate_id, &none)
            })?;
        count_appended(&prepared);
        let mut versions: std::collections::HashMap<Uuid, i64> = rows
            .iter()
            .map(|r| (r.get::<Uuid, _>(0), r.get::<i64, _>(1)))
            .collect();
        Ok(ids
            .into_iter()
            .map(|event_id| Appended {
                event_id,
                version: versions.remove(&event_id).unwrap_or(0),
            })
            .collect())
    }

    /// Reads an aggregate's events in version order, starting after `after_version`
    /// (0 for all of them), at most `limit` events.
    ///
    /// With a retention period set on the relay, only events within it (and each
    /// aggregate's latest event) remain; with [`Retention::Forever`](crate::Retention)
    /// this is the aggregate's whole history.
    pub async fn history<'e>(
        executor: impl PgExecutor<'e>,
        aggregate_type: &str,
        aggregate_id: &str,
        after_version: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, OutboxError> {
        let rows = sqlx::query(
            "SELECT id, event_id, aggregate_type, aggregate_id, version, event_type, occurred_at, \
                    headers::text, payload::text \
             FROM converge.outbox \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND version > $3 \
             ORDER BY version LIMIT $4",
        )
        .bind(aggregate_type)
        .bind(aggregate_id)
        .bind(after_version)
        .bind(limit)
        .fetch_all(executor)
        .await
        .map_err(OutboxError::Database)?;
        rows.iter()
            .map(|r| {
                let headers: String = r.get(7);
                let payload: String = r.get(8);
                Ok(StoredEvent {
                    position: r.get(0),
                    event_id: r.get(1),
                    aggregate_type: r.get(2),
                    aggregate_id: r.get(3),
                    version: r.get(4),
                    event_type: r.get(5),
                    occurred_at: r.get(6),
                    headers: serde_json::from_str(&headers).unwrap_or_default(),
                    payload: serde_json::from_str(&payload).map_err(|source| {
                        OutboxError::Serialize {
                            event_type: r.get(5),
                            source,
                        }
                    })?,
                })
            })
            .collect()
    }

    /// The aggregate's current version (0 when it has no event).
    pub async fn version<'e>(
        executor: impl PgExecutor<'e>,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<i64, OutboxError> {
        current_version(executor, aggregate_type, aggregate_id)
            .await
            .map_err(OutboxError::Database)
    }
}

async fn current_version<'e>(
    executor: impl PgExecutor<'e>,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce(max(version), 0)::bigint FROM converge.outbox \
         WHERE aggregate_type = $1 AND aggregate_id = $2",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .fetch_one(executor)
    .await
}

fn map_insert_error(
    error: sqlx::Error,
    aggregate_type: &str,
    aggregate_id: &str,
    options: &AppendOptions,
) -> OutboxError {
    let unique_version = matches!(
        &error,
        sqlx::Error::Database(db)
            if db.code().as_deref() == Some("23505")
                && db.constraint() == Some("outbox_aggregate_version_key")
    );
    if !unique_version {
        return OutboxError::Database(error);
    }
    match options.expected_version {
        Some(expected) => OutboxError::VersionConflict {
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            expected,
            actual: expected + 1,
        },
        None => OutboxError::ConcurrentAppend {
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
        },
    }
}

// The next version is the aggregate's latest version + 1. `tx_order` is the
// transaction's xid, raised to the latest event's `tx_order` when that one is
// higher (a transaction that got its xid earlier but appends later), so that
// per aggregate the relay's (tx_order, id) order is the version order.
macro_rules! append_one_sql {
    ($returning:literal) => {
        concat!(
            "INSERT INTO converge.outbox \
               (tx_order, event_id, aggregate_type, aggregate_id, version, event_type, \
                occurred_at, headers, payload, traceparent) \
             SELECT greatest(pg_current_xact_id()::text::bigint, coalesce(l.tx_order, 0)), \
                    $1, $2, $3, coalesce(l.version, 0) + 1, $4, coalesce($5, now()), \
                    $6::jsonb, $7::json, $9::text \
             FROM (SELECT 1) AS one \
             LEFT JOIN LATERAL ( \
                 SELECT version, tx_order FROM converge.outbox \
                 WHERE aggregate_type = $2 AND aggregate_id = $3 \
                 ORDER BY version DESC LIMIT 1) AS l ON true \
             WHERE $8::bigint IS NULL OR coalesce(l.version, 0) = $8 \
             RETURNING version",
            $returning
        )
    };
}

const APPEND_ONE: &str = append_one_sql!("");
const APPEND_ONE_NOTIFY: &str = append_one_sql!(
    ", CASE WHEN EXISTS (SELECT 1 FROM converge.relay_instances \
                         WHERE armed AND heartbeat_at > now() - interval '1 minute') \
       THEN pg_notify('converge_outbox', '') END"
);

macro_rules! append_many_sql {
    ($returning:literal) => {
        concat!(
            "WITH input AS ( \
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], \
                                      $5::text[], $6::text[]) WITH ORDINALITY \
                     AS t(event_id, aggregate_type, aggregate_id, event_type, headers, payload, ord)), \
             numbered AS ( \
                 SELECT i.*, row_number() OVER ( \
                     PARTITION BY aggregate_type, aggregate_id ORDER BY ord) AS n \
                 FROM input i), \
             heads AS ( \
                 SELECT k.aggregate_type, k.aggregate_id, l.version, l.tx_order \
                 FROM (SELECT DISTINCT aggregate_type, aggregate_id FROM input) AS k \
                 LEFT JOIN LATERAL ( \
                     SELECT o.version, o.tx_order FROM converge.outbox o \
                     WHERE o.aggregate_type = k.aggregate_type AND o.aggregate_id = k.aggregate_id \
                     ORDER BY o.version DESC LIMIT 1) AS l ON true) \
             INSERT INTO converge.outbox \
               (tx_order, event_id, aggregate_type, aggregate_id, version, event_type, \
                occurred_at, headers, payload, traceparent) \
             SELECT greatest(pg_current_xact_id()::text::bigint, coalesce(h.tx_order, 0)), \
                    n.event_id, n.aggregate_type, n.aggregate_id, coalesce(h.version, 0) + n.n, \
                    n.event_type, now(), n.headers::jsonb, n.payload::json, $7::text \
             FROM numbered n JOIN heads h USING (aggregate_type, aggregate_id) \
             ORDER BY n.ord \
             RETURNING event_id, version",
            $returning
        )
    };
}

const APPEND_MANY: &str = append_many_sql!("");
const APPEND_MANY_NOTIFY: &str = append_many_sql!(
    ", CASE WHEN EXISTS (SELECT 1 FROM converge.relay_instances \
                         WHERE armed AND heartbeat_at > now() - interval '1 minute') \
       THEN pg_notify('converge_outbox', '') END"
);
