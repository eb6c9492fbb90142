//! `converge outbox list` and the event filter shared with `outbox replay`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::{Postgres, Row};
use uuid::Uuid;

use crate::args::{EventFilter, TimeBound};
use crate::context::Ctx;
use crate::error::{bad_input, CliResult};
use crate::output::outln;
use crate::output::{self, Table};

/// The filter as SQL over `converge.outbox o`, parameters `$1`..`$7`
/// (bound by [`bind_filter`]).
pub(crate) const FILTER_SQL: &str = "($1::text IS NULL OR o.aggregate_type = $1) \
    AND ($2::text IS NULL OR o.aggregate_id = $2) \
    AND ($3::text IS NULL OR o.event_type = $3) \
    AND o.occurred_at >= coalesce($4::timestamptz, now() - make_interval(secs => $5::float8), '-infinity') \
    AND o.occurred_at < coalesce($6::timestamptz, now() - make_interval(secs => $7::float8), 'infinity')";

/// Published: at or before the partition's cursor (`relay_partitions p`).
pub(crate) const PUBLISHED_SQL: &str = "(o.tx_order, o.id) <= (p.cursor_tx_order, p.cursor_id)";

/// Binds `$1`..`$7` of [`FILTER_SQL`].
pub(crate) fn bind_filter<'q>(
    query: Query<'q, Postgres, PgArguments>,
    filter: &'q EventFilter,
) -> Query<'q, Postgres, PgArguments> {
    let (since_at, since_ago) = TimeBound::sql(filter.since);
    let (until_at, until_ago) = TimeBound::sql(filter.until);
    query
        .bind(filter.aggregate_type.as_deref())
        .bind(filter.aggregate_id.as_deref())
        .bind(filter.event_type.as_deref())
        .bind(since_at)
        .bind(since_ago)
        .bind(until_at)
        .bind(until_ago)
}

/// Rejects filters that cannot match anything for a reason the operator should hear.
pub(crate) fn check_filter(filter: &EventFilter) -> CliResult<()> {
    let now = Utc::now();
    let at = |b: TimeBound| match b {
        TimeBound::At(t) => t,
        TimeBound::Ago(d) => now - chrono::TimeDelta::from_std(d).unwrap_or(chrono::TimeDelta::MAX),
    };
    if let (Some(since), Some(until)) = (filter.since, filter.until) {
        if at(since) >= at(until) {
            return Err(bad_input(
                "--since must be before --until (relative times count back from now: \
                 --since 2h --until 1h)",
            ));
        }
    }
    for (name, value) in [
        ("--aggregate-type", &filter.aggregate_type),
        ("--aggregate-id", &filter.aggregate_id),
        ("--event-type", &filter.event_type),
    ] {
        if value.as_deref() == Some("") {
            return Err(bad_input(format!("{name} must not be empty")));
        }
    }
    Ok(())
}

/// The filter in words, for the audit log and messages.
pub(crate) fn describe(filter: &EventFilter) -> String {
    let mut parts = Vec::new();
    let mut push = |name: &str, value: Option<String>| {
        if let Some(v) = value {
            parts.push(format!("{name}={v}"));
        }
    };
    let time = |b: TimeBound| match b {
        TimeBound::At(t) => t.to_rfc3339(),
        TimeBound::Ago(d) => format!("{}s ago", d.as_secs()),
    };
    push("aggregate_type", filter.aggregate_type.clone());
    push("aggregate_id", filter.aggregate_id.clone());
    push("event_type", filter.event_type.clone());
    push("since", filter.since.map(time));
    push("until", filter.until.map(time));
    if parts.is_empty() {
        "all events".into()
    } else {
        parts.join(" ")
    }
}

/// An outbox row as listed.
#[derive(Debug, Serialize)]
pub(crate) struct EventRow {
    id: i64,
    event_id: Uuid,
    partition: i32,
    tx_order: i64,
    aggregate_type: String,
    aggregate_id: String,
    version: i64,
    event_type: String,
    /// `None`: a time converge cannot carry (the row is a reject).
    occurred_at: Option<DateTime<Utc>>,
    /// `published`, `pending` (not yet relayed) or `rejected`.
    status: &'static str,
    /// Why the relay rejected it, if it did.
    rejected: Option<String>,
    headers: Value,
    traceparent: Option<String>,
    /// The payload exactly as stored.
    payload: Box<RawValue>,
}

fn event_row(r: &PgRow) -> Result<EventRow, sqlx::Error> {
    let published: bool = r.try_get(9)?;
    let rejected: Option<String> = r.try_get(10)?;
    let headers: String = r.try_get(11)?;
    let payload: String = r.try_get(13)?;
    Ok(EventRow {
        id: r.try_get(0)?,
        event_id: r.try_get(1)?,
        partition: r.try_get(2)?,
        tx_order: r.try_get(3)?,
        aggregate_type: r.try_get(4)?,
        aggregate_id: r.try_get(5)?,
        version: r.try_get(6)?,
        event_type: r.try_get(7)?,
        occurred_at: r.try_get(8)?,
        status: match (published, rejected.is_some()) {
            (_, true) => "rejected",
            (true, false) => "published",
            (false, false) => "pending",
        },
        rejected,
        headers: serde_json::from_str(&headers).unwrap_or(Value::Null),
        traceparent: r.try_get(12)?,
        payload: RawValue::from_string(payload)
            .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON")),
    })
}

/// `converge outbox list`
pub(crate) async fn list(
    ctx: &Ctx,
    filter: &EventFilter,
    unpublished: bool,
    limit: i64,
) -> CliResult<()> {
    check_filter(filter)?;
    if limit < 1 {
        return Err(bad_input("--limit must be at least 1"));
    }
    let sql = format!(
        "SELECT * FROM ( \
           SELECT o.id, o.event_id, o.partition, o.tx_order, o.aggregate_type, o.aggregate_id, \
                  o.version, o.event_type, converge.event_time(o.occurred_at), {PUBLISHED_SQL} AS published, \
                  r.reason, o.headers::text, o.traceparent, o.payload::text \
           FROM converge.outbox o \
           JOIN converge.relay_partitions p ON p.partition = o.partition \
           LEFT JOIN converge.relay_rejects r ON r.event_id = o.event_id \
           WHERE {FILTER_SQL} AND (NOT $8 OR NOT {PUBLISHED_SQL}) \
           ORDER BY o.tx_order DESC, o.id DESC LIMIT $9) e \
         ORDER BY tx_order, id"
    );
    let rows = bind_filter(sqlx::query(&sql), filter)
        .bind(unpublished)
        .bind(limit)
        .fetch_all(ctx.pool().await?)
        .await?;
    let events = rows.iter().map(event_row).collect::<Result<Vec<_>, _>>()?;
    if ctx.json() {
        return output::print_json(&events);
    }
    let mut table = Table::new(&[
        "ID",
        "OCCURRED AT",
        "AGGREGATE",
        "VERSION",
        "EVENT TYPE",
        "STATUS",
        "EVENT ID",
    ]);
    for e in &events {
        table.row(vec![
            e.id.to_string(),
            e.occurred_at
                .map_or_else(|| "(invalid)".to_owned(), output::time),
            output::cut(&format!("{}/{}", e.aggregate_type, e.aggregate_id), 40),
            e.version.to_string(),
            e.event_type.clone(),
            e.status.to_string(),
            e.event_id.to_string(),
        ]);
    }
    table.print_or(&format!("no events match ({})", describe(filter)));
    if events.len() as i64 == limit {
        outln!("(the latest {limit} matching events; --limit N for more)");
    }
    Ok(())
}
