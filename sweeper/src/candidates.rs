//! Which keys a sweep visits: a keyset-paginated candidate query.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use sqlx::PgPool;

/// The candidate query of a sweep: one page of keys after `after` (exclusive,
/// `None` for the first page), in key order, at most `limit`.
///
/// Pages are keyset-paginated — never OFFSET, never the whole table in memory.
pub trait Candidates: Send + Sync + 'static {
    /// Reads one page.
    fn page<'a>(
        &'a self,
        pool: &'a PgPool,
        after: Option<&'a str>,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<String>, sqlx::Error>>;

    /// The sweep's convergence figure: how many keys are not converged now
    /// and since when the oldest of them has waited. `None` (the default):
    /// not measured.
    fn backlog<'a>(
        &'a self,
        pool: &'a PgPool,
    ) -> BoxFuture<'a, Result<Option<Backlog>, sqlx::Error>> {
        let _ = pool;
        Box::pin(async { Ok(None) })
    }
}

/// A sweep's convergence figure at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backlog {
    /// Keys not converged.
    pub keys: i64,
    /// When the oldest of them started waiting (`None` when there are none,
    /// or the query does not say).
    pub oldest: Option<DateTime<Utc>>,
}

impl Backlog {
    /// A figure of `keys` keys, the oldest waiting since `oldest`.
    pub fn new(keys: i64, oldest: Option<DateTime<Utc>>) -> Self {
        Backlog { keys, oldest }
    }
}

/// Candidates from one SQL query with `$1` = the last key of the previous page
/// (text, NULL for the first page) and `$2` = the page size, returning one
/// text column of keys in ascending key order.
///
/// Name the text column apart from the key column (`id::text AS key`): an
/// `ORDER BY id` on an output column named `id` would sort the text, so 10
/// would come before 9 and pages would skip keys.
///
/// ```
/// use converge_sweeper::SqlCandidates;
///
/// // Shipped orders, and orders whose INVOICING claim is older than its lease.
/// let candidates = SqlCandidates::new(
///     "SELECT id::text AS key FROM orders \
///      WHERE (state = 'SHIPPED' \
///             OR (state = 'INVOICING' AND claimed_at < now() - interval '5 minutes')) \
///        AND ($1::text IS NULL OR id > $1::bigint) \
///      ORDER BY id LIMIT $2",
/// );
/// ```
#[derive(Debug, Clone)]
pub struct SqlCandidates {
    sql: String,
    backlog_sql: Option<String>,
}

impl SqlCandidates {
    /// Candidates from `sql` (see the type's docs for its parameters).
    pub fn new(sql: impl Into<String>) -> Self {
        SqlCandidates {
            sql: sql.into(),
            backlog_sql: None,
        }
    }

    /// Measures the convergence figure with `sql`: no parameters, one row of
    /// two columns — the number of keys not converged (`bigint`) and when the
    /// oldest of them started waiting (`timestamptz`, NULL when none), e.g.
    /// `SELECT count(*), min(shipped_at) FROM orders WHERE state IN ('SHIPPED', 'INVOICING')`.
    /// Workers run it every few seconds; keep it index-backed.
    pub fn with_backlog(mut self, sql: impl Into<String>) -> Self {
        self.backlog_sql = Some(sql.into());
        self
    }
}

impl Candidates for SqlCandidates {
    fn page<'a>(
        &'a self,
        pool: &'a PgPool,
        after: Option<&'a str>,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<String>, sqlx::Error>> {
        Box::pin(async move {
            sqlx::query_scalar(self.sql.as_str())
                .bind(after)
                .bind(limit)
                .fetch_all(pool)
                .await
        })
    }

    fn backlog<'a>(
        &'a self,
        pool: &'a PgPool,
    ) -> BoxFuture<'a, Result<Option<Backlog>, sqlx::Error>> {
        Box::pin(async move {
            let Some(sql) = &self.backlog_sql else {
                return Ok(None);
            };
            let (keys, oldest): (i64, Option<DateTime<Utc>>) =
                sqlx::query_as(sql.as_str()).fetch_one(pool).await?;
            Ok(Some(Backlog { keys, oldest }))
        })
    }
}
