//! Which keys a sweep visits: a keyset-paginated candidate query.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use sqlx::PgPool;

use crate::probe;

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

    /// Checks the queries against the database before the first run: that
    /// they prepare (tables and columns exist) and return what the sweep
    /// reads. A problem is refused at start, naming the query and the fix.
    /// The default checks nothing.
    fn check<'a>(&'a self, pool: &'a PgPool) -> BoxFuture<'a, Result<(), CheckError>> {
        let _ = pool;
        Box::pin(async { Ok(()) })
    }

    /// The SQL type of the keys, when known: keys an operator names by hand
    /// (`converge sweep run --key`) are checked against it before any run.
    fn key_type(&self) -> Option<KeyType> {
        None
    }
}

/// Why [`Candidates::check`] refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// The queries would fail every run: what is wrong and how to fix it.
    #[error("{0}")]
    Unusable(String),
    /// The database could not be asked (unreachable, restarting): retryable.
    #[error("could not check the sweep's queries: {0}")]
    Database(#[source] sqlx::Error),
}

/// The SQL type of a sweep's key column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyType {
    /// `bigint` (`int8`), e.g. a `bigserial` id.
    BigInt,
    /// `integer` (`int4`).
    Integer,
    /// `uuid`.
    Uuid,
    /// `text` (any string).
    Text,
}

impl KeyType {
    /// The type's name in SQL.
    pub fn sql(self) -> &'static str {
        match self {
            KeyType::BigInt => "bigint",
            KeyType::Integer => "integer",
            KeyType::Uuid => "uuid",
            KeyType::Text => "text",
        }
    }

    /// Checks that `key` is a value of this type, naming the problem if not.
    ///
    /// ```
    /// use converge_sweeper::KeyType;
    /// assert!(KeyType::BigInt.check_key("42").is_ok());
    /// assert!(KeyType::BigInt.check_key("abc").unwrap_err().contains("bigint"));
    /// assert!(KeyType::BigInt.check_key("007").unwrap_err().contains("\"7\""));
    /// ```
    /// Keys must be written as the candidate query writes them (`id::text`):
    /// `007` or an upper-case UUID would name the same row under another
    /// key, and another key's lease.
    pub fn check_key(self, key: &str) -> Result<(), String> {
        let canonical = match self {
            KeyType::BigInt => key.parse::<i64>().ok().map(|v| v.to_string()),
            KeyType::Integer => key.parse::<i32>().ok().map(|v| v.to_string()),
            KeyType::Uuid => uuid::Uuid::parse_str(key).ok().map(|v| v.to_string()),
            KeyType::Text => Some(key.to_owned()),
        };
        match canonical {
            Some(c) if c == key => Ok(()),
            Some(c) => Err(format!(
                "key {key:?} is written {c:?} by the sweep's candidates ({}): use that",
                self.sql()
            )),
            None => Err(format!(
                "key {key:?} is not a {} (the sweep's key type)",
                self.sql()
            )),
        }
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
    key_type: Option<KeyType>,
}

impl SqlCandidates {
    /// Candidates from `sql` (see the type's docs for its parameters).
    pub fn new(sql: impl Into<String>) -> Self {
        SqlCandidates {
            sql: sql.into(),
            backlog_sql: None,
            key_type: None,
        }
    }

    /// The common case written for you: rows of `table` matching `predicate`
    /// (an SQL condition, e.g. `state = 'SHIPPED'`), keyed by `key_column` of
    /// type `key_type`, in keyset pages (`key_column > last key ORDER BY
    /// key_column`: index it, with the predicate as a partial index's).
    /// `table`, `key_column` and `predicate` are SQL written by the
    /// application, never user input.
    ///
    /// ```
    /// use converge_sweeper::{KeyType, SqlCandidates};
    /// let shipped = SqlCandidates::keyset("invoicing.orders", "id", KeyType::BigInt, "state = 'SHIPPED'");
    /// assert_eq!(
    ///     shipped.sql(),
    ///     "SELECT id::text AS key FROM invoicing.orders WHERE (state = 'SHIPPED') \
    ///      AND ($1::text IS NULL OR id > $1::bigint) ORDER BY id LIMIT $2"
    /// );
    /// ```
    pub fn keyset(table: &str, key_column: &str, key_type: KeyType, predicate: &str) -> Self {
        let key = key_type.sql();
        let mut candidates = SqlCandidates::new(format!(
            "SELECT {key_column}::text AS key FROM {table} WHERE ({predicate}) \
             AND ($1::text IS NULL OR {key_column} > $1::{key}) ORDER BY {key_column} LIMIT $2"
        ));
        candidates.key_type = Some(key_type);
        candidates
    }

    /// Declares the keys' SQL type, so keys named by hand are checked
    /// ([`Candidates::key_type`]); [`SqlCandidates::keyset`] sets it.
    pub fn with_key_type(mut self, key_type: KeyType) -> Self {
        self.key_type = Some(key_type);
        self
    }

    /// The candidates query.
    pub fn sql(&self) -> &str {
        &self.sql
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

    fn check<'a>(&'a self, pool: &'a PgPool) -> BoxFuture<'a, Result<(), CheckError>> {
        Box::pin(probe::check(pool, &self.sql, self.backlog_sql.as_deref()))
    }

    fn key_type(&self) -> Option<KeyType> {
        self.key_type
    }
}
