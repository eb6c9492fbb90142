//! `cargo run -p hello [PAYMENTS]`: captures payments and waits until each
//! has exactly one receipt. `DATABASE_URL` and `NATS_URL` say where.
use std::sync::Arc;
use std::time::Duration;

use converge::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use hello::ReceiptMailer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("warn").init();
    let count: usize = std::env::args().nth(1).map_or(Ok(20), |n| n.parse())?;
    let db = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1/postgres".into());
    // A transaction left open by a stuck process is ended after 60 s.
    let options: PgConnectOptions = db.parse()?;
    let options = options.options([("idle_in_transaction_session_timeout", "60s")]);
    let pool = PgPoolOptions::new()
        .max_connections(20)
        .connect_with(options)
        .await?;
    converge::migrate(&pool).await?; // the schema owner's step; here one role does both
    hello::create_schema(&pool).await?;
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".into());
    let nats = converge::async_nats::connect(nats_url).await?;

    let mailer = Arc::new(ReceiptMailer::default());
    let worker = hello::start(pool.clone(), nats, mailer.clone(), Duration::from_secs(5)).await?;
    let started = std::time::Instant::now();
    let mut ids = Vec::new();
    for _ in 0..count {
        ids.push(hello::capture(&pool).await?);
    }
    let unsent =
        "SELECT count(*) FROM hello.payments WHERE id = ANY($1) AND receipt_sent_at IS NULL";
    while converge::sqlx::query_scalar::<_, i64>(unsent)
        .bind(&ids)
        .fetch_one(&pool)
        .await?
        > 0
    {
        if started.elapsed() > Duration::from_secs(60) {
            worker.shutdown().await?;
            return Err("receipts still unsent after 60 s: see `converge status`".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.shutdown().await?;
    let sent = mailer.sent.lock().unwrap().len();
    println!(
        "converged: {count} payments, {sent} receipts in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
