//! Candidates from the event log: "aggregates with `Requested` and no
//! `Credited` or `Refunded`", expressed once, without a state column the
//! application keeps by hand.

use std::time::Duration;

use chrono::{DateTime, Utc};
use converge_eventsourcing::{event_types, keep_forever, Aggregate};
use futures::future::BoxFuture;
use sqlx::PgPool;

use crate::candidates::{Backlog, Candidates, CheckError, KeyType};

/// The aggregates of one type whose history holds any of the `having` event
/// types and none of the `lacking` ones — e.g. transfers requested and not
/// yet credited or refunded — in keyset pages of aggregate ids.
///
/// Pages walk the aggregates' heads (`converge.outbox_heads`, one row per
/// aggregate, in its primary key's order) and probe each one's events by the
/// outbox's `(aggregate_type, aggregate_id, version)` index: a run reads one
/// head and a few index entries per aggregate of the type, whatever else the
/// outbox holds. The convergence figure ([`with_backlog`](Self::with_backlog))
/// counts the same set (its oldest is the first `having` event's time). The
/// type's history is kept from
/// retention ([`check`](Candidates::check) records it): a deleted event
/// would make a pending aggregate look done.
///
/// ```
/// # use converge_eventsourcing::Aggregate;
/// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct Transfer;
/// # #[derive(serde::Serialize, serde::Deserialize)] enum TransferEvent { Requested, Debited, Credited, Refunded }
/// # #[derive(Debug, thiserror::Error)] #[error("no")] struct No;
/// # impl Aggregate for Transfer {
/// #     const TYPE: &'static str = "transfer";
/// #     type Event = TransferEvent; type Command = (); type Error = No;
/// #     fn apply(&mut self, _: &TransferEvent) {}
/// #     fn decide(&self, _: &()) -> Result<Vec<TransferEvent>, No> { Ok(vec![]) }
/// # }
/// use converge_sweeper::EventCandidates;
///
/// let unfinished = EventCandidates::of::<Transfer>()
///     .having(["Requested"])
///     .lacking(["Credited", "Refunded"])
///     .quiet_for(std::time::Duration::from_secs(5)); // leave fresh ones to the event path
/// ```
#[derive(Debug, Clone)]
pub struct EventCandidates {
    aggregate_type: String,
    /// The aggregate's event types, when known (an [`Aggregate`]'s variants).
    known: Option<&'static [&'static str]>,
    having: Vec<String>,
    lacking: Vec<String>,
    quiet_for: Option<Duration>,
    measured: bool,
}

/// Each head in key order, and a summary of its aggregate's events read by
/// the outbox's `(aggregate_type, aggregate_id, version)` index — a lateral
/// aggregate, so the planner cannot turn it into a scan of every event; the
/// page's `LIMIT` stops the walk. `{start}` is the page's start: two forms,
/// not one `$1 IS NULL OR h.aggregate_id > $1`, which a generic plan (a
/// prepared statement's after a few runs) cannot use as an index condition:
/// every page would walk, and summarize, the heads before it.
macro_rules! page_sql {
    ($start:literal) => {
        concat!(
            "SELECT h.aggregate_id FROM converge.outbox_heads h \
             CROSS JOIN LATERAL ( \
                 SELECT bool_or(o.event_type = ANY($4::text[])) AS has, \
                        bool_or(o.event_type = ANY($5::text[])) AS ended, \
                        max(coalesce(o.recorded_at, o.occurred_at)) AS last_at \
                 FROM converge.outbox o \
                 WHERE o.aggregate_type = h.aggregate_type AND o.aggregate_id = h.aggregate_id) e \
             WHERE h.aggregate_type = $3 AND ",
            $start,
            " AND e.has AND NOT e.ended \
               AND ($6::float8 IS NULL OR e.last_at <= now() - make_interval(secs => $6)) \
             ORDER BY h.aggregate_id LIMIT $2"
        )
    };
}

/// The first page (`$1` is NULL).
const FIRST_PAGE: &str = page_sql!("$1::text IS NULL");

/// A later page, after the key `$1`.
const NEXT_PAGE: &str = page_sql!("h.aggregate_id > $1::text");

/// The same set, counted, with the oldest first `having` event.
const BACKLOG: &str = "\
    SELECT count(*), min(e.started) FROM converge.outbox_heads h \
    CROSS JOIN LATERAL ( \
        SELECT bool_or(o.event_type = ANY($2::text[])) AS has, \
               bool_or(o.event_type = ANY($3::text[])) AS ended, \
               min(coalesce(o.recorded_at, o.occurred_at)) \
                   FILTER (WHERE o.event_type = ANY($2::text[])) AS started \
        FROM converge.outbox o \
        WHERE o.aggregate_type = h.aggregate_type AND o.aggregate_id = h.aggregate_id) e \
    WHERE h.aggregate_type = $1 AND e.has AND NOT e.ended";

impl EventCandidates {
    /// Aggregates of `A`: the event types named later are checked against
    /// `A::Event`'s variants at start.
    pub fn of<A: Aggregate>() -> Self {
        EventCandidates {
            aggregate_type: A::TYPE.to_owned(),
            known: event_types::<A::Event>(),
            having: Vec::new(),
            lacking: Vec::new(),
            quiet_for: None,
            measured: false,
        }
    }

    /// Aggregates of the type named `aggregate_type` (events appended with
    /// [`Outbox::append`](converge_outbox::Outbox::append)); the event types
    /// are not checked.
    pub fn named(aggregate_type: impl Into<String>) -> Self {
        EventCandidates {
            aggregate_type: aggregate_type.into(),
            known: None,
            having: Vec::new(),
            lacking: Vec::new(),
            quiet_for: None,
            measured: false,
        }
    }

    /// The aggregate must have an event of one of these types.
    pub fn having<S: Into<String>>(mut self, event_types: impl IntoIterator<Item = S>) -> Self {
        self.having.extend(event_types.into_iter().map(Into::into));
        self
    }

    /// The aggregate must have no event of these types.
    pub fn lacking<S: Into<String>>(mut self, event_types: impl IntoIterator<Item = S>) -> Self {
        self.lacking.extend(event_types.into_iter().map(Into::into));
        self
    }

    /// Only aggregates whose last event was stored longer than `quiet` ago:
    /// those still moving are left to the event path.
    pub fn quiet_for(mut self, quiet: Duration) -> Self {
        self.quiet_for = Some(quiet);
        self
    }

    /// Measures the sweep's convergence figure (how many aggregates are
    /// unfinished, since when the oldest waits) every few seconds: one index
    /// probe per aggregate of the type — cheap for thousands, worth a
    /// thought for millions. Off by default.
    pub fn with_backlog(mut self) -> Self {
        self.measured = true;
        self
    }

    /// The aggregate type.
    pub fn aggregate_type(&self) -> &str {
        &self.aggregate_type
    }

    /// The query of a page after the first: `$1` the last key of the
    /// previous page, `$2` the page size, `$3` the aggregate type, `$4` /
    /// `$5` the event types to have / to lack, `$6` the quiet period in
    /// seconds (NULL: none). The first page's query is the same without the
    /// start (its `$1` is NULL).
    pub fn sql() -> &'static str {
        NEXT_PAGE
    }

    fn problems(&self) -> Option<String> {
        let what = format!("the event-log candidates of {}", self.aggregate_type);
        if self.having.is_empty() {
            return Some(format!(
                "{what} name no event type to have: add .having([\"...\"])"
            ));
        }
        if let Some(known) = self.known {
            let unknown: Vec<&str> = self
                .having
                .iter()
                .chain(&self.lacking)
                .map(String::as_str)
                .filter(|t| !known.contains(t))
                .collect();
            if !unknown.is_empty() {
                return Some(format!(
                    "{what} name event types {} has not: {} (its event types: {})",
                    self.aggregate_type,
                    unknown.join(", "),
                    known.join(", ")
                ));
            }
        }
        None
    }
}

impl Candidates for EventCandidates {
    fn page<'a>(
        &'a self,
        pool: &'a PgPool,
        after: Option<&'a str>,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<String>, sqlx::Error>> {
        Box::pin(async move {
            let sql = if after.is_some() {
                NEXT_PAGE
            } else {
                FIRST_PAGE
            };
            sqlx::query_scalar(sql)
                .bind(after)
                .bind(limit)
                .bind(&self.aggregate_type)
                .bind(&self.having)
                .bind(&self.lacking)
                .bind(self.quiet_for.map(|d| d.as_secs_f64()))
                .fetch_all(pool)
                .await
        })
    }

    fn backlog<'a>(
        &'a self,
        pool: &'a PgPool,
    ) -> BoxFuture<'a, Result<Option<Backlog>, sqlx::Error>> {
        Box::pin(async move {
            if !self.measured {
                return Ok(None);
            }
            let (keys, oldest): (i64, Option<DateTime<Utc>>) = sqlx::query_as(BACKLOG)
                .bind(&self.aggregate_type)
                .bind(&self.having)
                .bind(&self.lacking)
                .fetch_one(pool)
                .await?;
            Ok(Some(Backlog::new(keys, oldest)))
        })
    }

    /// Checks the event types against the aggregate's (for
    /// [`EventCandidates::of`]), and keeps the type's history from
    /// retention (`converge.retention_policies`; idempotent).
    fn check<'a>(&'a self, pool: &'a PgPool) -> BoxFuture<'a, Result<(), CheckError>> {
        Box::pin(async move {
            if let Some(problem) = self.problems() {
                return Err(CheckError::Unusable(problem));
            }
            keep_forever(
                pool,
                &self.aggregate_type,
                "read by sweeps over the event log",
            )
            .await
            .map_err(|e| {
                if converge_outbox::is_retryable_sqlx(&e) {
                    CheckError::Database(e)
                } else {
                    CheckError::Unusable(format!(
                        "{}'s history cannot be kept from retention \
                             (converge.retention_policies): {e}",
                        self.aggregate_type
                    ))
                }
            })
        })
    }

    fn key_type(&self) -> Option<KeyType> {
        Some(KeyType::Text)
    }
}
