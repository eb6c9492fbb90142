//! Appending events in the caller's transaction, and reading them back.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::append_sql::{append_many_sql, append_one_sql, HEAD_VERSION};
use crate::envelope::Envelope;
use crate::error::OutboxError;
use crate::event::{Appended, DomainEvent};
use crate::metrics as metrics_names;
use crate::trace::{TraceParent, HEADER_TRACEPARENT};
use crate::validate::{check_event, check_time};

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
    /// The event id; defaults to a new UUIDv7. Set it (to the same value on
    /// every attempt) to make a retried business operation idempotent: an
    /// event id already in the outbox is never appended again, the append
    /// fails with [`OutboxError::AlreadyAppended`] naming the stored version.
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
    schema_version: u32,
    occurred_at: Option<DateTime<Utc>>,
    headers: String,
    payload: String,
    traceparent: TraceParent,
    /// The message's size on the wire without its version's digits.
    size_base: usize,
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

    /// Checks and serializes an event. The size is the message the relay will
    /// send ([`Envelope`]), except the version's digits, which only the
    /// database knows: `digits` is how many to assume here (1 for a single
    /// append, whose statement checks the real number; 19, the most an
    /// `i64` has, for [`append_all`](Self::append_all)).
    fn prepare<E: DomainEvent>(
        &self,
        event: &E,
        options: &AppendOptions,
        digits: usize,
    ) -> Result<Prepared, OutboxError> {
        let aggregate_type = event.aggregate_type();
        let aggregate_id = event.aggregate_id();
        let event_type = event.event_type();
        let schema_version = event.schema_version();
        check_event(aggregate_type, &aggregate_id, event_type, &options.headers)?;
        if schema_version == 0 || schema_version > i32::MAX as u32 {
            return Err(OutboxError::InvalidEvent {
                field: "schema_version",
                reason: format!("{schema_version} is not a schema version: versions start at 1"),
            });
        }
        if let Some(at) = options.occurred_at {
            check_time(at)?;
        }
        let payload = serde_json::to_string(event).map_err(|source| OutboxError::Serialize {
            event_type: event_type.to_owned(),
            source,
        })?;
        let event_id = options.event_id.unwrap_or_else(Uuid::now_v7);
        let traceparent = options.trace_context();
        let envelope = Envelope {
            event_id,
            aggregate_type,
            aggregate_id: &aggregate_id,
            version: 0, // one digit, taken off below
            event_type,
            schema_version,
            // Without a time, the database's now(): always 27 characters.
            occurred_at: options.occurred_at.unwrap_or_else(Utc::now),
            traceparent: Some(traceparent),
            headers: options
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
        };
        let size_base = envelope.wire_size(&event_id.to_string(), payload.len()) - 1;
        if size_base + digits > self.config.max_event_bytes {
            return Err(OutboxError::TooLarge {
                aggregate_type: aggregate_type.to_owned(),
                aggregate_id,
                event_type: event_type.to_owned(),
                size: size_base + digits,
                limit: self.config.max_event_bytes,
            });
        }
        let headers =
            serde_json::to_string(&options.headers).map_err(|source| OutboxError::Serialize {
                event_type: event_type.to_owned(),
                source,
            })?;
        Ok(Prepared {
            event_id,
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id,
            event_type: event_type.to_owned(),
            schema_version,
            occurred_at: options.occurred_at,
            headers,
            payload,
            traceparent,
            size_base,
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

    /// Appends one event with options (expected version, headers, event time,
    /// event id, trace context).
    ///
    /// Appends to one aggregate queue on its head row until the appending
    /// transaction ends. Under READ COMMITTED the next one continues from the
    /// committed version; under REPEATABLE READ or SERIALIZABLE, an aggregate
    /// appended to since the transaction's snapshot fails with
    /// [`OutboxError::ConcurrentAppend`] (retry the transaction). A version
    /// is never used twice.
    #[tracing::instrument(
        skip_all,
        fields(aggregate_type = event.aggregate_type(), event_type = event.event_type()),
        // The caller gets the error; conflicts are expected under optimistic
        // concurrency, not worth an ERROR line each.
        err(level = tracing::Level::DEBUG)
    )]
    pub async fn append_with<E: DomainEvent>(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event: &E,
        options: &AppendOptions,
    ) -> Result<Appended, OutboxError> {
        let p = self.prepare(event, options, 1)?;
        let conn: &mut PgConnection = tx;
        let sql = append_one_sql(
            self.config.notify,
            options.expected_version.is_some(),
            options.event_id.is_some(),
        );
        let row = sqlx::query(sql)
            .bind(p.event_id)
            .bind(&p.aggregate_type)
            .bind(&p.aggregate_id)
            .bind(&p.event_type)
            .bind(p.occurred_at)
            .bind(&p.headers)
            .bind(&p.payload)
            .bind(options.expected_version)
            .bind(p.traceparent.to_string())
            .bind(p.size_base as i64)
            .bind(self.config.max_event_bytes as i64)
            .bind(p.schema_version as i32)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| map_insert_error(e, &p, options))?;
        match row {
            Some(row) if !row.get::<bool, _>(1) => {
                count_appended([&p]);
                Ok(Appended {
                    event_id: p.event_id,
                    version: row.get(0),
                    occurred_at: row.get(2),
                })
            }
            Some(row) => Err(OutboxError::AlreadyAppended {
                event_id: p.event_id,
                version: Some(row.get(0)),
            }),
            None => {
                // The expected version did not match, or the version's
                // digits made the event too large. Nothing was written.
                let actual = head_version(&mut *conn, &p.aggregate_type, &p.aggregate_id)
                    .await
                    .map_err(OutboxError::Database)?;
                let size = p.size_base + (actual + 1).to_string().len();
                match options.expected_version {
                    Some(expected) if expected != actual => Err(OutboxError::VersionConflict {
                        aggregate_type: p.aggregate_type,
                        aggregate_id: p.aggregate_id,
                        expected,
                        actual,
                    }),
                    _ if size > self.config.max_event_bytes => Err(OutboxError::TooLarge {
                        aggregate_type: p.aggregate_type,
                        aggregate_id: p.aggregate_id,
                        event_type: p.event_type,
                        size,
                        limit: self.config.max_event_bytes,
                    }),
                    _ => Err(OutboxError::ConcurrentAppend {
                        aggregate_type: p.aggregate_type,
                        aggregate_id: p.aggregate_id,
                    }),
                }
            }
        }
    }

    /// Appends several events in one statement, in the caller's transaction.
    ///
    /// Events of the same aggregate get consecutive versions in slice order.
    /// Every event is checked before anything is written: one bad event rejects
    /// the whole batch. The events share one trace context
    /// ([`TraceParent::current`]). Sizes are checked as if each version had
    /// 19 digits (up to 18 bytes stricter than [`append`](Self::append)).
    #[tracing::instrument(
        skip_all,
        fields(events = events.len()),
        err(level = tracing::Level::DEBUG)
    )]
    pub async fn append_all<E: DomainEvent>(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: &[E],
    ) -> Result<Vec<Appended>, OutboxError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let shared = AppendOptions::default().traceparent(Some(TraceParent::current()));
        let prepared = events
            .iter()
            .map(|e| self.prepare(e, &shared, MAX_VERSION_DIGITS))
            .collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<Uuid> = prepared.iter().map(|p| p.event_id).collect();
        let types: Vec<&str> = prepared.iter().map(|p| p.aggregate_type.as_str()).collect();
        let agg_ids: Vec<&str> = prepared.iter().map(|p| p.aggregate_id.as_str()).collect();
        let event_types: Vec<&str> = prepared.iter().map(|p| p.event_type.as_str()).collect();
        let headers: Vec<&str> = prepared.iter().map(|p| p.headers.as_str()).collect();
        let payloads: Vec<&str> = prepared.iter().map(|p| p.payload.as_str()).collect();
        let versions: Vec<i32> = prepared.iter().map(|p| p.schema_version as i32).collect();
        let conn: &mut PgConnection = tx;
        let rows = sqlx::query(append_many_sql(self.config.notify))
            .bind(&ids)
            .bind(&types)
            .bind(&agg_ids)
            .bind(&event_types)
            .bind(&headers)
            .bind(&payloads)
            .bind(prepared[0].traceparent.to_string())
            .bind(&versions)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| map_insert_error(e, &prepared[0], &shared))?;
        count_appended(&prepared);
        let mut versions: std::collections::HashMap<Uuid, (i64, DateTime<Utc>)> = rows
            .iter()
            .map(|r| (r.get::<Uuid, _>(0), (r.get::<i64, _>(1), r.get(2))))
            .collect();
        Ok(ids
            .into_iter()
            .map(|event_id| {
                let (version, occurred_at) = versions
                    .remove(&event_id)
                    .unwrap_or((0, DateTime::<Utc>::UNIX_EPOCH));
                Appended {
                    event_id,
                    version,
                    occurred_at,
                }
            })
            .collect())
    }

    /// The aggregate's current version (0 when it has no event). Retention
    /// never lowers it: versions live in the aggregate's head, not in its
    /// stored events.
    pub async fn version<'e>(
        executor: impl sqlx::PgExecutor<'e>,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<i64, OutboxError> {
        head_version(executor, aggregate_type, aggregate_id)
            .await
            .map_err(OutboxError::Database)
    }
}

/// The most decimal digits an `i64` version has.
const MAX_VERSION_DIGITS: usize = 19;

async fn head_version<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(HEAD_VERSION)
        .bind(aggregate_type)
        .bind(aggregate_id)
        .fetch_one(executor)
        .await
}

fn map_insert_error(error: sqlx::Error, p: &Prepared, options: &AppendOptions) -> OutboxError {
    let (code, constraint) = match &error {
        sqlx::Error::Database(db) => (
            db.code().map(|c| c.into_owned()),
            db.constraint().map(str::to_owned),
        ),
        _ => (None, None),
    };
    let conflict = || match options.expected_version {
        Some(expected) => OutboxError::VersionConflict {
            aggregate_type: p.aggregate_type.clone(),
            aggregate_id: p.aggregate_id.clone(),
            expected,
            actual: expected + 1,
        },
        None => OutboxError::ConcurrentAppend {
            aggregate_type: p.aggregate_type.clone(),
            aggregate_id: p.aggregate_id.clone(),
        },
    };
    match (code.as_deref(), constraint.as_deref()) {
        // Another transaction appended to the aggregate since this one's
        // snapshot (REPEATABLE READ, SERIALIZABLE).
        (Some("40001"), _) => conflict(),
        (Some("23505"), Some("outbox_aggregate_version_key")) => conflict(),
        // The same event id, appended by a transaction that committed while
        // this one waited.
        (Some("23505"), Some("outbox_event_id_key")) => OutboxError::AlreadyAppended {
            event_id: p.event_id,
            version: None,
        },
        (Some("CV001"), _) => OutboxError::ForeignCluster {
            message: database_message(&error),
        },
        _ => OutboxError::Database(error),
    }
}

/// The server's message and hint.
fn database_message(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(db) => {
            let pg = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>();
            match pg.and_then(|pg| pg.hint()) {
                Some(hint) => format!("{}; {hint}", db.message()),
                None => db.message().to_owned(),
            }
        }
        other => other.to_string(),
    }
}
