//! Which keys a sweep visits: a keyset-paginated candidate query.

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
}

impl SqlCandidates {
    /// Candidates from `sql` (see the type's docs for its parameters).
    pub fn new(sql: impl Into<String>) -> Self {
        SqlCandidates { sql: sql.into() }
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
}
