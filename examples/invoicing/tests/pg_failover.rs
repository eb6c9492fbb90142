//! PostgreSQL fail-over while the invoicing workers run: a private primary
//! with a synchronous streaming standby (made by `pg_basebackup`), every
//! process (workers, `ship`, `check`, the test) reaching "the primary"
//! through one address (a proxy standing in for a virtual IP or a DNS name
//! that the fail-over moves). The primary is crashed mid-work, the standby
//! promoted and the address moved to it; the workers reconnect by
//! themselves. Then the fault suite's checks: converged, one invoice and one
//! billing charge per order, every outbox event on the stream exactly once.
//!
//! The second scenario gives the workers both hosts in one libpq-style URL
//! instead (`postgres://…@standby,primary/db`, read by
//! `converge::postgres::PgConnect`): no address moves for them; they find
//! the promoted standby themselves.
//!
//! Synchronous replication is the condition: with an asynchronous standby a
//! promotion loses the last commits, and with them orders whose charge the
//! billing service already applied (RELIABILITY.md says so; the relay's side
//! of that case is `converge-tests`' `relay_failover`).

mod common;
mod harness;

use std::time::Duration;

use common::Server;
use converge_tests::{PgCluster, TcpProxy, TestEnv};
use harness::{converged, serve, ship, stream_exactly_once, FAST};

const CONVERGE_WITHIN: Duration = Duration::from_secs(120);

// Several threads: PostgreSQL's programs run synchronously while the proxy
// runs on the runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_standby_promoted_while_workers_run() {
    let mut primary = PgCluster::start(&["synchronous_standby_names = '*'"]);
    // The promoted standby must not wait for a standby of its own.
    let mut standby = PgCluster::standby_of(primary.port(), &["synchronous_standby_names = ''"]);
    primary.wait_for_sync_standby().await;
    let address = TcpProxy::start(&format!("127.0.0.1:{}", primary.port())).await;
    let env = TestEnv::on_postgres(
        &format!("postgres://postgres@{}/postgres", address.addr()),
        &converge_tests::nats_url().await,
    )
    .await;
    let a = serve(&env, "a", &[]);
    let b = serve(&env, "b", &[]);
    ship(&env, 300, 0.1).await;

    // Mid-work (relaying, reconciling, charging, sweeping): the primary dies.
    tokio::time::sleep(Duration::from_millis(300)).await;
    primary.crash();
    standby.promote();
    address
        .retarget(&format!("127.0.0.1:{}", standby.port()))
        .await;

    ship(&env, 100, 0.0).await;
    let report = converged(&env, CONVERGE_WITHIN, &[&a, &b]).await;
    assert_eq!(report["orders"], 400, "{report}");
    stream_exactly_once(&env, Duration::from_secs(60)).await;
    assert_eq!(a.terminate().await.code(), Some(0));
    assert_eq!(b.terminate().await.code(), Some(0));
}

/// `invoicing serve` named `instance` on `database_url` instead of the test's.
fn serve_on(env: &TestEnv, instance: &str, database_url: &str) -> Server {
    let mut args = vec!["--instance", instance];
    args.extend_from_slice(FAST);
    Server::start_with_env(env, &[("DATABASE_URL", database_url)], &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_given_both_hosts_find_the_promoted_standby() {
    let mut primary = PgCluster::start(&["synchronous_standby_names = '*'"]);
    let mut standby = PgCluster::standby_of(primary.port(), &["synchronous_standby_names = ''"]);
    primary.wait_for_sync_standby().await;
    // The test's own connections (shipping, checks) go through an address
    // it moves; the workers get the two hosts, the standby first.
    let address = TcpProxy::start(&format!("127.0.0.1:{}", primary.port())).await;
    let env = TestEnv::on_postgres(
        &format!("postgres://postgres@{}/postgres", address.addr()),
        &converge_tests::nats_url().await,
    )
    .await;
    let both = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{}?target_session_attrs=read-write",
        standby.port(),
        primary.port(),
        env.db_name
    );
    let a = serve_on(&env, "a", &both);
    let b = serve_on(&env, "b", &both);
    ship(&env, 300, 0.1).await;

    tokio::time::sleep(Duration::from_millis(300)).await;
    primary.crash();
    standby.promote();
    address
        .retarget(&format!("127.0.0.1:{}", standby.port()))
        .await;

    ship(&env, 100, 0.0).await;
    let report = converged(&env, CONVERGE_WITHIN, &[&a, &b]).await;
    assert_eq!(report["orders"], 400, "{report}");
    stream_exactly_once(&env, Duration::from_secs(60)).await;
    assert!(
        a.log().contains("the writable host moved") || b.log().contains("the writable host moved"),
        "no worker reported following the promotion"
    );
    assert_eq!(a.terminate().await.code(), Some(0));
    assert_eq!(b.terminate().await.code(), Some(0));
}
