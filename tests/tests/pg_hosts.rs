//! A primary and its standby behind one libpq-style URL
//! (`postgres://h1,h2/db?target_session_attrs=read-write`), read by
//! `converge::postgres::PgConnect`: the pool takes the host that accepts
//! writes (the standby is listed first and skipped), and after the primary
//! dies and the standby is promoted, a running `Worker` — its relay, its
//! consumer and the consumer's own key-lease pool — reaches the new primary
//! with no address moved for it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use converge::handlers::{ConsumerConfig, Context, Outcome, ReconcileError, Reconciler};
use converge::postgres::{PgConnect, PgConnectError};
use converge::Worker;
use converge_tests::orders::{self, Shipped};
use converge_tests::{PgCluster, TestEnv};
use sqlx::PgPool;

/// The port of the server `pool`'s next connection reaches.
async fn server_port(pool: &PgPool) -> Result<u16, sqlx::Error> {
    let port: i32 = sqlx::query_scalar("SELECT inet_server_port()")
        .fetch_one(pool)
        .await?;
    Ok(port as u16)
}

/// Invoices orders, recording each key it moved (the effects, counted).
#[derive(Default)]
struct Invoicer {
    moved: Mutex<Vec<String>>,
}

impl Reconciler for Invoicer {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let outcome = orders::invoice(ctx, key).await?;
        if matches!(outcome, Outcome::Changed) {
            self.moved.lock().unwrap().push(key.to_owned());
        }
        Ok(outcome)
    }
}

/// Ships order `id` (its row and event in one transaction), trying again
/// for up to 30 s while the database is failing over.
async fn ship_through_failover(pool: &PgPool, id: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let mut tx = pool.begin().await?;
            sqlx::query("INSERT INTO orders (id, state) VALUES ($1, 'SHIPPED')")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            converge::Outbox::default()
                .append(&mut tx, &Shipped { id })
                .await
                .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
            tx.commit().await
        };
        match attempt.await {
            Ok(()) => return,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "order {id} could not be shipped within 30 s of the fail-over: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// How the primary stops being one.
#[derive(Clone, Copy, PartialEq)]
enum Failover {
    /// It dies (`pg_ctl -m immediate`).
    Crash,
    /// A planned switchover: it stays up, turned read-only, while the
    /// standby is promoted. The pool's idle connections to it still work
    /// (reads do) and must not be handed out for writes.
    Switchover,
}

// Several threads: PostgreSQL's programs run synchronously.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_a_multi_host_url_follows_the_promoted_standby() {
    worker_follows(Failover::Crash).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_switchover_no_write_goes_to_the_old_read_only_primary() {
    worker_follows(Failover::Switchover).await;
}

async fn worker_follows(failover: Failover) {
    let shared = TestEnv::new().await; // NATS and a unique stream
    let mut primary = PgCluster::start(&["synchronous_standby_names = '*'"]);
    // The promoted standby must not wait for a standby of its own.
    let mut standby = PgCluster::standby_of(primary.port(), &["synchronous_standby_names = ''"]);
    primary.wait_for_sync_standby().await;
    // Once the standby is there: a synchronous commit waits for it.
    primary.psql("postgres", "CREATE DATABASE app");

    // Only the standby: nothing takes writes, and the error says why.
    let only_standby = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?target_session_attrs=read-write",
        standby.port()
    );
    match PgConnect::new(&only_standby).connect().await {
        Err(e @ PgConnectError::NoSuitableHost { .. }) => {
            assert!(e.is_retryable(), "{e}");
            assert!(e.to_string().contains("in recovery"), "{e}");
        }
        other => panic!("a standby alone was taken for writes: {other:?}"),
    }

    // The standby first, then the primary: the pool takes the primary.
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/app",
        standby.port(),
        primary.port()
    );
    let pool = PgConnect::new(&url)
        .max_connections(8)
        .connect()
        .await
        .expect("a pool on the writable host");
    assert_eq!(server_port(&pool).await.unwrap(), primary.port());
    converge::migrate(&pool).await.unwrap();
    orders::create_table(&pool).await;

    let invoicer = Arc::new(Invoicer::default());
    let subject = format!("{}.order.Shipped", shared.prefix);
    // The event path only (no sweep): what is invoiced after the fail-over
    // went through the relay and the consumer on the new primary.
    let worker = Worker::new(pool.clone(), shared.nats.clone(), "hosts")
        .relay(shared.relay_config())
        .consumer(
            ConsumerConfig::new("invoicing", shared.stream.clone(), subject),
            invoicer.clone(),
        )
        .shutdown_timeout(Duration::from_secs(10))
        .start()
        .await
        .expect("the worker starts");
    for id in 1..=20 {
        ship_through_failover(&pool, id).await;
    }
    orders::wait_invoiced(&pool, 20, Duration::from_secs(30))
        .await
        .expect("the first 20 orders are invoiced on the first primary");

    // The primary dies, or turns read-only; the standby is promoted.
    // Nothing moves an address: the URL already names both.
    match failover {
        Failover::Crash => primary.crash(),
        Failover::Switchover => {
            primary.psql(
                "postgres",
                "ALTER SYSTEM SET default_transaction_read_only = on",
            );
            primary.psql("postgres", "SELECT pg_reload_conf()");
        }
    }
    standby.promote();
    for id in 21..=40 {
        ship_through_failover(&pool, id).await;
    }
    assert_eq!(
        server_port(&pool).await.unwrap(),
        standby.port(),
        "the pool's connections reach the promoted standby"
    );
    if let Err(invoiced) = orders::wait_invoiced(&pool, 40, Duration::from_secs(60)).await {
        panic!(
            "{invoiced} of 40 orders invoiced after the fail-over: the worker did not reach \
             the new primary"
        );
    }
    let mut moved = invoicer.moved.lock().unwrap().clone();
    moved.sort_by_key(|k| k.parse::<i64>().unwrap());
    let expected: Vec<String> = (1..=40).map(|i| i.to_string()).collect();
    assert_eq!(moved, expected, "each order invoiced once, none missed");
    worker.shutdown().await.expect("the worker stops cleanly");
    pool.close().await;
}
