//! The raw baselines the sweep is compared with, and the table they run on.

use super::*;

/// Creates and fills `orders` with ids 1..=`keys`, all SHIPPED; then updates
/// every row once and vacuums, so the table has the shape it has after a reset.
pub(super) async fn fill(pool: &PgPool, keys: u64) -> Result<Duration> {
    let started = Instant::now();
    pool.execute("CREATE TABLE orders (id bigint PRIMARY KEY, state text NOT NULL)")
        .await?;
    sqlx::query(
        "INSERT INTO orders (id, state) SELECT g, 'SHIPPED' FROM generate_series(1, $1::bigint) AS g",
    )
    .bind(keys as i64)
    .execute(pool)
    .await?;
    let elapsed = started.elapsed();
    pool.execute("UPDATE orders SET state = 'SHIPPED'").await?;
    pool.execute("VACUUM ANALYZE orders").await?;
    Ok(elapsed)
}

/// Puts every row back to SHIPPED and vacuums.
pub(super) async fn reset(pool: &PgPool, keys: u64) -> Result<()> {
    pool.execute("UPDATE orders SET state = 'SHIPPED' WHERE state <> 'SHIPPED'")
        .await?;
    pool.execute("VACUUM ANALYZE orders").await?;
    let shipped: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE state = 'SHIPPED'")
        .fetch_one(pool)
        .await?;
    if shipped != keys as i64 {
        return Err(format!("reset left {shipped} rows SHIPPED, not {keys}").into());
    }
    Ok(())
}

/// Fails unless every row has left SHIPPED.
pub(super) async fn expect_none_shipped(pool: &PgPool) -> Result<()> {
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE state = 'SHIPPED'")
        .fetch_one(pool)
        .await?;
    if left != 0 {
        return Err(format!("{left} rows are still SHIPPED").into());
    }
    Ok(())
}

/// The baseline: the conditional UPDATE for `batch` consecutive ids at a
/// time, on one connection; returns seconds.
pub(super) async fn baseline(pool: &PgPool, keys: u64, batch: usize) -> Result<f64> {
    let mut conn = pool.acquire().await?;
    let started = Instant::now();
    let mut moved = 0;
    let mut after = 0_i64;
    while after < keys as i64 {
        let last = (after + batch as i64).min(keys as i64);
        let ids: Vec<i64> = (after + 1..=last).collect();
        moved += sqlx::query(UPDATE_BATCH_SQL)
            .bind(&ids)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        after = last;
    }
    let secs = started.elapsed().as_secs_f64();
    if moved != keys {
        return Err(format!("baseline moved {moved} rows, not {keys}").into());
    }
    drop(conn);
    expect_none_shipped(pool).await?;
    Ok(secs)
}

/// Waits until the sweep's lease is free (`lock_at_least_for` keeps it for a
/// second after the previous run).
pub(super) async fn wait_for_lease(pool: &PgPool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let held: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM converge.leases WHERE name = $1 AND lock_until > now())",
        )
        .bind(SWEEP)
        .fetch_one(pool)
        .await?;
        if !held {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the sweep's lease stayed held".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Attribution: every candidate page of the sweep, read alone; returns seconds.
pub(super) async fn candidate_pages(pool: &PgPool, keys: u64, batch_size: i64) -> Result<f64> {
    let started = Instant::now();
    let mut after: Option<String> = None;
    let mut seen = 0_u64;
    loop {
        let page: Vec<String> = sqlx::query_scalar(CANDIDATES_SQL)
            .bind(after.as_deref())
            .bind(batch_size)
            .fetch_all(pool)
            .await?;
        seen += page.len() as u64;
        let full = page.len() as i64 == batch_size;
        after = page.last().cloned();
        if !full {
            break;
        }
    }
    if seen != keys {
        return Err(format!("candidate pages listed {seen} keys, not {keys}").into());
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Attribution: the sweep's per-page key leases granted and released alone,
/// one page after the other on one connection; returns seconds.
pub(super) async fn batch_locks(pool: &PgPool, keys: u64, batch_size: i64) -> Result<f64> {
    let mut conn = pool.acquire().await?;
    let started = Instant::now();
    let mut from = 1_u64;
    while from <= keys {
        let to = (from + batch_size as u64 - 1).min(keys);
        let batch: Vec<String> = (from..=to).map(|k| k.to_string()).collect();
        let names = vec![RECONCILER; batch.len()];
        let granted: Vec<(String, String, i64)> = sqlx::query_as(LEASE_SQL)
            .bind(&names)
            .bind(&batch)
            .bind("bench")
            .bind(20_000_i64)
            .fetch_all(&mut *conn)
            .await?;
        let n = granted.len();
        let (r, (k, t)): (Vec<String>, (Vec<String>, Vec<i64>)) =
            granted.into_iter().map(|(r, k, t)| (r, (k, t))).unzip();
        sqlx::query(RELEASE_SQL)
            .bind(&r)
            .bind(&k)
            .bind(&t)
            .bind(vec![false; n])
            .bind("bench")
            .execute(&mut *conn)
            .await?;
        from = to + 1;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Attribution: the reconciler's N single-key UPDATEs alone, `concurrency` at
/// a time, without the sweeper; returns seconds.
pub(super) async fn per_key_updates(pool: &PgPool, keys: u64, concurrency: usize) -> Result<f64> {
    warm(pool, concurrency as u32).await?;
    let started = Instant::now();
    let mut moved = 0;
    let mut results = stream::iter(1..=keys)
        .map(|k| async move {
            sqlx::query(UPDATE_ONE_SQL)
                .bind(k.to_string())
                .execute(pool)
                .await
        })
        .buffer_unordered(concurrency);
    while let Some(done) = results.next().await {
        moved += done?.rows_affected();
    }
    let secs = started.elapsed().as_secs_f64();
    if moved != keys {
        return Err(format!("per-key updates moved {moved} rows, not {keys}").into());
    }
    Ok(secs)
}

/// Opens `size` connections of `pool` so none is opened while timing.
pub(super) async fn warm(pool: &PgPool, size: u32) -> Result<()> {
    let mut held = Vec::with_capacity(size as usize);
    for _ in 0..size {
        held.push(pool.acquire().await?);
    }
    Ok(())
}

/// The sweep's time from a child's result line.
pub(super) fn child_secs(child: &serde_json::Value) -> Result<f64> {
    Ok(child
        .get("elapsed_secs")
        .and_then(serde_json::Value::as_f64)
        .ok_or("child result lacks elapsed_secs")?)
}

/// Runs `sweep-only` in a child process and returns its result line.
pub(super) async fn run_child(
    database: &str,
    keys: u64,
    batch_size: i64,
    concurrency: usize,
    pool: PoolVariant,
) -> Result<serde_json::Value> {
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command
        .arg("sweep-only")
        .args(["--database", database])
        .args(["--keys", &keys.to_string()])
        .args(["--batch-size", &batch_size.to_string()])
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--pool", pool.label()]);
    if BATCH_RECONCILER.load(Ordering::Relaxed) {
        command.env(BATCH_ENV, "1");
    }
    crate::common::child_json(&mut command, "sweep-only").await
}
