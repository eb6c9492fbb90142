//! No secret in a worker's output: `invoicing serve` authenticated to NATS
//! with a password and to PostgreSQL with a URL holding one, logging at
//! TRACE (every crate, async-nats included), never writes either.

mod common;

use std::time::Duration;

use common::Server;
use converge_tests::{NatsServer, TestEnv};

const NATS_SECRET: &str = "n4ts-pa55-9f3k2";
const PG_SECRET: &str = "pg-pa55-7d1x0";

#[tokio::test]
async fn a_worker_logging_at_trace_writes_no_password() {
    let server = NatsServer::start_with_config(&format!(
        "no_auth_user: admin\nauthorization {{ users = [\n\
         {{ user: admin, password: \"admin-only\" }}\n\
         {{ user: invoicing, password: \"{NATS_SECRET}\" }}\n] }}\n"
    ))
    .await;
    let env = TestEnv::with_nats_url(&server.url()).await;
    // Trust authentication ignores the password, but it is in the URL.
    let url = common::database_url(&env);
    let (scheme, rest) = url.split_once("://").unwrap();
    let rest = rest.split_once('@').map_or(rest, |(_, r)| r);
    let database_url = format!("{scheme}://postgres:{PG_SECRET}@{rest}");
    // The NATS password from NATS_PASSWORD, then in the URL's user info.
    let in_url = server
        .url()
        .replace("nats://", &format!("nats://invoicing:{NATS_SECRET}@"));
    for vars in [
        vec![("NATS_USER", "invoicing"), ("NATS_PASSWORD", NATS_SECRET)],
        vec![("NATS_URL", in_url.as_str())],
    ] {
        let mut vars = vars;
        vars.extend([
            ("DATABASE_URL", database_url.as_str()),
            ("RUST_LOG", "trace"),
        ]);
        sqlx::query("DELETE FROM converge.workers")
            .execute(&env.pool)
            .await
            .ok();
        no_secret_in_the_log(&env, &vars).await;
    }
}

/// Runs `invoicing serve` with `vars` until it is up, then greps its log.
async fn no_secret_in_the_log(env: &TestEnv, vars: &[(&str, &str)]) {
    let worker = Server::start_with_env(env, vars, &[]);
    // Until it is up (its registry row), then a little traffic.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let live: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.workers")
            .fetch_one(&env.pool)
            .await
            .unwrap_or(0);
        if live > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker did not start: {}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log = worker.log();
    worker.terminate().await;
    assert!(log.len() > 1000, "a TRACE log was written: {log}");
    for secret in [NATS_SECRET, PG_SECRET] {
        if let Some(at) = log.find(secret) {
            let from = log[..at].rfind('\n').map_or(0, |n| n + 1);
            let to = log[at..].find('\n').map_or(log.len(), |n| at + n);
            panic!("the log holds a secret: {}", &log[from..to]);
        }
    }
}
