//! Refusing a pooler that shares server sessions between clients.
//!
//! converge's workers need each connection to be one PostgreSQL session for
//! as long as it is open: sqlx prepares statements per session (PgBouncer
//! before 1.21 cannot carry them across transactions), the relay LISTENs,
//! migrations hold a session lock and set the session's search path. A pooler
//! in transaction or statement mode (PgBouncer's `pool_mode = transaction`,
//! managed poolers in front of a cloud database) hands one server session to
//! many clients in turn. Its tell: two connections open at the same time
//! reach the same server process, or one sees a session setting the other
//! made — never possible on sessions of their own.

use sqlx::{Connection, Executor, PgConnection, Row};

use crate::MigrateError;

/// Opens two connections with `options` and checks that they are two
/// sessions; [`MigrateError::TransactionPooling`] when they share one.
/// Uses the simple query protocol only, so a transaction pooler answers.
pub(crate) async fn check_sessions(
    options: &sqlx::postgres::PgConnectOptions,
) -> Result<(), MigrateError> {
    let a = PgConnection::connect_with(options).await?;
    let b = PgConnection::connect_with(options).await?;
    let (a, b, result) = probe(a, b).await;
    let _ = a.close().await;
    let _ = b.close().await;
    result
}

async fn probe(
    mut a: PgConnection,
    mut b: PgConnection,
) -> (PgConnection, PgConnection, Result<(), MigrateError>) {
    let result = compare(&mut a, &mut b).await;
    (a, b, result)
}

async fn compare(a: &mut PgConnection, b: &mut PgConnection) -> Result<(), MigrateError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let marker = format!("p{:x}x{nanos:x}", std::process::id());
    for _ in 0..3 {
        let pid_a = backend_pid(a).await?;
        let set = format!("SELECT set_config('converge.session_probe', '{marker}', false)");
        a.execute(sqlx::raw_sql(&set)).await?;
        let pid_b = backend_pid(b).await?;
        let seen = b
            .fetch_one(sqlx::raw_sql(
                "SELECT current_setting('converge.session_probe', true)",
            ))
            .await?;
        let seen: Option<String> = seen.try_get(0)?;
        if pid_a == pid_b || seen.as_deref() == Some(marker.as_str()) {
            return Err(MigrateError::TransactionPooling);
        }
    }
    // Leave nothing behind on a pooler that does hand sessions around.
    a.execute(sqlx::raw_sql("RESET converge.session_probe"))
        .await?;
    Ok(())
}

async fn backend_pid(conn: &mut PgConnection) -> Result<i32, sqlx::Error> {
    let row = conn
        .fetch_one(sqlx::raw_sql("SELECT pg_backend_pid()"))
        .await?;
    row.try_get(0)
}
