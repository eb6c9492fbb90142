//! Per-type retention: the types whose history is kept for ever.

use sqlx::PgExecutor;

/// Keeps every event of `aggregate_type` from retention, for ever (a row in
/// `converge.retention_policies`; `reason` says why). A
/// [`Repository`](crate::Repository) does it for its aggregate type when it
/// starts; call it for any other type whose history must stay (e.g. one a
/// projection is rebuilt from, or a sweep over the event log reads).
/// Idempotent.
pub async fn keep_forever<'e>(
    executor: impl PgExecutor<'e>,
    aggregate_type: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO converge.retention_policies (aggregate_type, reason) VALUES ($1, $2) \
         ON CONFLICT (aggregate_type) DO NOTHING",
    )
    .bind(aggregate_type)
    .bind(reason)
    .execute(executor)
    .await?;
    Ok(())
}

/// Whether the events of `aggregate_type` are kept for ever.
pub async fn is_kept_forever<'e>(
    executor: impl PgExecutor<'e>,
    aggregate_type: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM converge.retention_policies WHERE aggregate_type = $1)",
    )
    .bind(aggregate_type)
    .fetch_one(executor)
    .await
}
