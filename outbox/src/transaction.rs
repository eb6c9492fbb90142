//! A business transaction retried as a whole when it failed transiently: a
//! concurrent append to the same aggregate, a version conflict, a
//! serialization failure or deadlock, a lost connection.

use std::time::Duration;

use sqlx::{PgPool, Postgres};

use crate::backoff::Backoff;
use crate::{is_retryable_sqlx, OutboxError};

/// COMMIT got no answer (the connection broke while committing): the
/// transaction may or may not have committed. [`transaction`] does not run it
/// again; neither should the caller before finding out what happened.
#[derive(Debug, thiserror::Error)]
#[error(
    "the connection broke during COMMIT, so the transaction may or may not have committed: \
     check what it wrote before running it again ({source})"
)]
pub struct CommitUnknown {
    /// The driver's error.
    #[source]
    pub source: sqlx::Error,
}

/// Whether an error may go away if the whole transaction is run again.
///
/// Implemented for `sqlx::Error` and [`OutboxError`]; implement it for the
/// application's error type to use [`transaction`] with it.
pub trait Retryable {
    /// Whether running the transaction again can succeed.
    fn is_retryable(&self) -> bool;
}

impl Retryable for sqlx::Error {
    fn is_retryable(&self) -> bool {
        is_retryable_sqlx(self)
    }
}

impl Retryable for OutboxError {
    fn is_retryable(&self) -> bool {
        OutboxError::is_retryable(self)
    }
}

/// How [`transaction`] retries.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TransactionRetry {
    /// Runs of the transaction at most, the first included (at least 1).
    pub max_attempts: u32,
    /// The first delay between runs; doubled each time, with jitter.
    pub base_delay: Duration,
    /// The longest delay between runs.
    pub max_delay: Duration,
}

impl Default for TransactionRetry {
    /// 5 runs, 20 ms doubling to at most 1 s.
    fn default() -> Self {
        TransactionRetry {
            max_attempts: 5,
            base_delay: Duration::from_millis(20),
            max_delay: Duration::from_secs(1),
        }
    }
}

/// Runs `body` in a transaction and commits it; when `body` or the commit
/// fails with a [`Retryable`] error, rolls back, waits (exponential backoff
/// with jitter) and runs `body` again in a new transaction, up to
/// `retry.max_attempts` times. Returns the last error otherwise.
///
/// A COMMIT whose answer is lost (the connection breaks while committing) is
/// never run again: the transaction may have committed, and running it again
/// could write twice. It is returned as [`CommitUnknown`] (for
/// [`OutboxError`], [`OutboxError::CommitUnknown`], not retryable): find out
/// what happened before running it again. The error type `E` converts from
/// `sqlx::Error` and from [`CommitUnknown`].
///
/// `body` must be safe to run again: do the transaction's writes in it, and
/// effects outside the database after it returns. Its future may borrow the
/// transaction and anything that outlives the call (an outbox, `self`).
///
/// ```no_run
/// use converge_outbox::{transaction, DomainEvent, Outbox, OutboxError, TransactionRetry};
/// # #[derive(serde::Serialize)] struct OrderShipped { order_id: i64 }
/// # impl DomainEvent for OrderShipped {
/// #     fn aggregate_type(&self) -> &str { "order" }
/// #     fn aggregate_id(&self) -> String { self.order_id.to_string() }
/// #     fn event_type(&self) -> &str { "OrderShipped" }
/// # }
/// # async fn ship(pool: &sqlx::PgPool, outbox: &Outbox, id: i64) -> Result<(), OutboxError> {
/// transaction(pool, TransactionRetry::default(), |tx| {
///     Box::pin(async move {
///         sqlx::query("UPDATE orders SET state = 'SHIPPED' WHERE id = $1")
///             .bind(id)
///             .execute(&mut **tx)
///             .await
///             .map_err(OutboxError::Database)?;
///         outbox.append(tx, &OrderShipped { order_id: id }).await?;
///         Ok(())
///     })
/// })
/// .await
/// # }
/// ```
pub async fn transaction<'a, T, E, F>(
    pool: &PgPool,
    retry: TransactionRetry,
    mut body: F,
) -> Result<T, E>
where
    E: Retryable + From<sqlx::Error> + From<CommitUnknown>,
    F: for<'t> FnMut(
        &'t mut sqlx::Transaction<'a, Postgres>,
    ) -> futures::future::BoxFuture<'t, Result<T, E>>,
{
    let mut backoff = Backoff::new(retry.base_delay, retry.max_delay);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match run_once(pool, &mut body).await {
            Err(Failure::Run(error))
                if attempt < retry.max_attempts.max(1) && error.is_retryable() =>
            {
                tracing::debug!(attempt, "transaction failed transiently; running it again");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(Failure::Run(error)) | Err(Failure::CommitUnknown(error)) => return Err(error),
            Ok(value) => return Ok(value),
        }
    }
}

/// How one run failed.
enum Failure<E> {
    /// Before or at COMMIT, with the transaction certainly not committed.
    Run(E),
    /// COMMIT's answer was lost (the connection broke): the transaction may
    /// have committed, so it is not run again.
    CommitUnknown(E),
}

async fn run_once<'a, T, E, F>(pool: &PgPool, body: &mut F) -> Result<T, Failure<E>>
where
    E: From<sqlx::Error> + From<CommitUnknown>,
    F: for<'t> FnMut(
        &'t mut sqlx::Transaction<'a, Postgres>,
    ) -> futures::future::BoxFuture<'t, Result<T, E>>,
{
    // `'a`, not `'static`: the body's future may then borrow what outlives
    // the call (the caller's outbox, `self`), not only the transaction.
    let mut tx: sqlx::Transaction<'a, Postgres> =
        pool.begin().await.map_err(|e| Failure::Run(e.into()))?;
    let value = body(&mut tx).await.map_err(Failure::Run)?;
    match tx.commit().await {
        Ok(()) => Ok(value),
        // The server answered: the transaction did not commit (e.g. a
        // serialization failure detected at COMMIT).
        Err(e @ sqlx::Error::Database(_)) => Err(Failure::Run(e.into())),
        // No answer: it may have committed.
        Err(source) => Err(Failure::CommitUnknown(CommitUnknown { source }.into())),
    }
}
