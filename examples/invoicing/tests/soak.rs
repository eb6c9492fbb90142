//! The long form of the reliability suite: thousands of orders for minutes
//! under every fault at once. Not run by `cargo test`; run it with
//!
//! ```sh
//! SOAK_SECS=180 cargo test -p invoicing --test soak -- --ignored --nocapture
//! ```
//!
//! and record the printed summary in RELIABILITY.md.

mod common;
mod harness;

use std::time::{Duration, Instant};

use converge_tests::{NatsServer, TestEnv};
use harness::{converged, kill9, serve, ship, stream_exactly_once};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: the soak behind RELIABILITY.md"]
async fn soak_every_fault_at_once() {
    let soak = Duration::from_secs(
        std::env::var("SOAK_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(180),
    );
    let batch_orders: u64 = 250;
    let started = Instant::now();
    let mut nats = NatsServer::start().await;
    let env = TestEnv::with_nats_url(&nats.url()).await;
    let flaky = ["--fail-rate", "0.3", "--max-attempts", "10"];
    let crashy = ["--crash-after-claim", "0.02"];
    let mut workers = vec![
        serve(&env, "s1", &flaky),
        serve(&env, "s2", &crashy),
        serve(&env, "s3", &[]),
    ];
    let admin = sqlx::PgPool::connect(&env.database_url()).await.unwrap();
    let mut kills = 0;
    let mut crash_restarts = 0;
    let mut terminations = 0;
    let mut batch = 0usize;
    let mut nats_outages = 0;
    while started.elapsed() < soak {
        batch += 1;
        ship(&env, batch_orders, 0.2).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        match batch % 5 {
            // A rolling SIGKILL and restart.
            0 | 2 => {
                let i = (batch / 2) % 3;
                kill9(&mut workers[i]).await;
                kills += 1;
                let extra: &[&str] = match i {
                    0 => &flaky,
                    1 => &crashy,
                    _ => &[],
                };
                workers[i] = serve(&env, &format!("s{}-{batch}", i + 1), extra);
            }
            // Postgres connections terminated.
            1 => {
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                )
                .execute(&admin)
                .await
                .unwrap();
                terminations += 1;
            }
            // NATS down for 30 s while shipping goes on (every 40th batch).
            3 if batch % 40 == 8 => {
                nats.stop().await;
                for _ in 0..10 {
                    ship(&env, batch_orders / 5, 0.2).await;
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                nats.restart().await;
                nats_outages += 1;
            }
            _ => {}
        }
        // The crash-prone worker is restarted whenever it died.
        for (i, w) in workers.iter_mut().enumerate() {
            if let Ok(Some(_)) = w.child.try_wait() {
                crash_restarts += 1;
                let extra: &[&str] = if i == 1 { &crashy } else { &[] };
                *w = serve(&env, &format!("s{}-r{batch}", i + 1), extra);
            }
        }
    }
    let faults_over = Instant::now();
    let refs: Vec<_> = workers.iter().collect();
    let report = converged(&env, Duration::from_secs(600), &refs).await;
    let converge_secs = faults_over.elapsed().as_secs_f64();
    let messages = stream_exactly_once(&env, Duration::from_secs(120)).await;
    let dead: Vec<String> = sqlx::query_scalar(
        "SELECT aggregate_key || ': ' || error FROM converge.dead_letters WHERE resolved_at IS NULL",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.sweep_runs")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    println!(
        "SOAK orders={} invoices={} duplicates={} events_on_stream={} \
         sigkills={kills} crash_restarts={crash_restarts} pg_terminations={terminations} \
         nats_outages_30s={nats_outages} open_dead_letters={} sweep_runs={runs} batches={batch} \
         converged_after_faults_s={converge_secs:.1} total_s={:.1}",
        report["orders"],
        report["invoices"],
        report["duplicates"],
        messages.len(),
        dead.len(),
        started.elapsed().as_secs_f64()
    );
    for d in &dead {
        println!("SOAK open dead letter (the order converged by a later sweep): {d}");
    }
    for w in workers {
        let _ = w.terminate().await;
    }
}
