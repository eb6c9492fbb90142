//! The reliability suite, compact form (run by `cargo test`; the soak in
//! `soak.rs` runs the same faults for minutes with thousands of orders).
//!
//! Each scenario drives the `invoicing` binary as child processes against the
//! test's own database and stream (a private `nats-server` where NATS itself
//! fails), injects faults, and ends with: `check` passing within a bounded
//! time after the faults stop, exactly one invoice per order, and every
//! outbox event on the stream exactly once. RELIABILITY.md has the table.

mod common;
mod harness;

use std::time::Duration;

use futures::StreamExt;

use common::billing_url;
use converge_tests::{NatsServer, TestEnv};
use harness::{converged, in_state, kill9, serve, ship, signal, stream_exactly_once, Supervisor};

const CONVERGE_WITHIN: Duration = Duration::from_secs(90);
const STREAM_WITHIN: Duration = Duration::from_secs(30);

/// 1. SIGKILL mid-relay, mid-reconcile (after the claim, before the invoice)
///    and mid-sweep; restarted, or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_relay_mid_reconcile_and_mid_sweep() {
    let env = TestEnv::new().await;
    let mut a = serve(&env, "a", &[]);
    let b = serve(&env, "b", &[]);
    // Orders arrive while both relay and reconcile; 10 % legacy ones keep the sweep busy.
    tokio::join!(ship(&env, 400, 0.1), async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        kill9(&mut a).await; // mid-relay / mid-reconcile / mid-sweep: whatever it was doing
    });
    // Not restarted: b takes over a's partitions, redelivered events and the sweep lease.
    converged(&env, CONVERGE_WITHIN, &[&b]).await;

    // Mid-reconcile after the claim: the only worker aborts right after 10 %
    // of its claims, and is restarted every time it dies; then a healthy one
    // joins and resumes the dead claims (claim lease 2 s).
    assert_eq!(b.terminate().await.code(), Some(0));
    ship(&env, 100, 0.0).await;
    let mut crashing = Supervisor::start(&env, "crashing", &["--crash-after-claim", "0.1"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while crashing.crashes < 3 && tokio::time::Instant::now() < deadline {
        crashing.tend(&env);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        crashing.crashes > 0,
        "the crashing worker never crashed:\n{}",
        crashing.server.log()
    );
    let healthy = serve(&env, "healthy", &[]);
    let report = converged(&env, CONVERGE_WITHIN, &[&healthy, &crashing.server]).await;
    assert_eq!(report["orders"], 500);
    stream_exactly_once(&env, STREAM_WITHIN).await;
    assert_eq!(healthy.terminate().await.code(), Some(0));
    kill9(&mut crashing.server).await;
}

/// 2. Three workers; killed and restarted in a rolling pattern while orders ship.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_kills_of_three_workers_while_shipping() {
    let env = TestEnv::new().await;
    let names = ["r1", "r2", "r3"];
    let mut workers: Vec<_> = names.iter().map(|n| serve(&env, n, &[])).collect();
    let rolling = async {
        for round in 0..2 {
            for (i, name) in names.iter().enumerate() {
                tokio::time::sleep(Duration::from_millis(600)).await;
                kill9(&mut workers[i]).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                workers[i] = serve(&env, &format!("{name}-{round}"), &[]);
            }
        }
    };
    let shipping = async {
        for _ in 0..4 {
            ship(&env, 150, 0.1).await;
        }
    };
    tokio::join!(rolling, shipping);
    let refs: Vec<_> = workers.iter().collect();
    let report = converged(&env, CONVERGE_WITHIN, &refs).await;
    assert_eq!(report["orders"], 600);
    stream_exactly_once(&env, STREAM_WITHIN).await;
    for w in workers {
        assert_eq!(w.terminate().await.code(), Some(0));
    }
}

/// 3. NATS down while orders ship: sweeps keep converging (they need only
///    Postgres); the relay backs off and resumes; nothing lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_while_shipping() {
    let mut nats = NatsServer::start().await;
    let env = TestEnv::with_nats_url(&nats.url()).await;
    let worker = serve(&env, "n1", &[]);
    ship(&env, 100, 0.0).await;
    converged(&env, CONVERGE_WITHIN, &[&worker]).await;

    nats.stop().await;
    ship(&env, 100, 0.0).await;
    // Meanwhile the sweep alone invoices the new orders.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while in_state(&env, "INVOICED").await < 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sweeps did not converge while NATS was down:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let unpublished: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM converge.outbox o JOIN converge.relay_partitions p USING (partition) \
         WHERE (o.tx_order, o.id) > (p.cursor_tx_order, p.cursor_id)",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(
        unpublished > 0,
        "events were published while NATS was down?"
    );

    nats.restart().await;
    converged(&env, CONVERGE_WITHIN, &[&worker]).await;
    stream_exactly_once(&env, STREAM_WITHIN).await;
    assert_eq!(worker.terminate().await.code(), Some(0));
}

/// 4. Postgres connections terminated during relay and sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_terminated_during_relay_and_sweep() {
    let env = TestEnv::new().await;
    ship(&env, 300, 0.2).await;
    let worker = serve(&env, "p1", &[]);
    let admin = sqlx::PgPool::connect(&env.database_url()).await.unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .execute(&admin)
        .await
        .unwrap();
    }
    let report = converged(&env, CONVERGE_WITHIN, &[&worker]).await;
    assert_eq!(report["orders"], 300);
    stream_exactly_once(&env, STREAM_WITHIN).await;
    assert_eq!(worker.terminate().await.code(), Some(0));
}

/// 5. Duplicate and out-of-order deliveries: the whole stream published again
///    in reverse order (new message ids, so JetStream keeps them) changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_reordered_deliveries_change_nothing() {
    let env = TestEnv::new().await;
    let worker = serve(&env, "d1", &[]);
    ship(&env, 100, 0.0).await;
    converged(&env, CONVERGE_WITHIN, &[&worker]).await;
    let messages = stream_exactly_once(&env, STREAM_WITHIN).await;
    let js = async_nats::jetstream::new(env.nats.clone());
    for m in messages.iter().rev() {
        let mut headers = async_nats::HeaderMap::new();
        for (k, v) in &m.headers {
            headers.insert(k.as_str(), v.as_str());
        }
        headers.insert("Nats-Msg-Id", format!("{}:dup", m.msg_id).as_str());
        headers.insert("Converge-Replay", "fault-suite");
        js.publish_with_headers(
            m.subject.clone(),
            headers,
            serde_json::to_vec(&m.payload).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    // The consumer works through the 100 duplicates (all Unchanged).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let info = js
            .get_stream(&env.stream)
            .await
            .unwrap()
            .consumer_info("invoicing")
            .await
            .unwrap();
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "duplicates not consumed: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let report = converged(&env, Duration::from_secs(5), &[&worker]).await;
    assert_eq!(report["invoices"], 100);
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.dead_letters")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(dead, 0, "duplicates must not dead-letter");
    assert_eq!(worker.terminate().await.code(), Some(0));
}

/// 6. Transient failures 30 % of the time; permanent ones for a few keys:
///    those land in dead letters (and FAILED), nothing else is held up; an
///    operator's retry then converges them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_and_permanent_failures() {
    let env = TestEnv::new().await;
    let flaky = serve(
        &env,
        "f1",
        &[
            "--fail-rate",
            "0.3",
            "--fail-every",
            "25",
            "--max-attempts",
            "8",
        ],
    );
    ship(&env, 200, 0.1).await;
    let deadline = tokio::time::Instant::now() + CONVERGE_WITHIN;
    while in_state(&env, "SHIPPED").await + in_state(&env, "INVOICING").await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "{}", flaky.log());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let failed: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM invoicing.orders WHERE state = 'FAILED' ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(failed, (1..=8).map(|i| i * 25).collect::<Vec<i64>>());
    assert_eq!(in_state(&env, "INVOICED").await, 192);
    let dead: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT aggregate_key FROM converge.dead_letters \
         WHERE resolved_at IS NULL AND permanent ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let mut expected: Vec<String> = failed.iter().map(i64::to_string).collect();
    expected.sort();
    assert_eq!(dead, expected, "exactly the failing keys are dead-lettered");
    assert_eq!(flaky.terminate().await.code(), Some(0));
    stream_exactly_once(&env, STREAM_WITHIN).await;

    // Fixed: an operator retries the dead letters through the control plane
    // (what `converge dead-letters retry` sends); FAILED orders start over.
    let healthy = serve(&env, "f2", &[]);
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM converge.dead_letters WHERE resolved_at IS NULL ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let subject =
        converge::control::reconciler_subject(&format!("app_{}", env.prefix), "invoicing");
    let request = converge::control::ControlRequest::DeadLetterRetry {
        ids: ids.clone(),
        actor: "fault-suite".into(),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let results = loop {
        let inbox = env.nats.new_inbox();
        let mut replies = env.nats.subscribe(inbox.clone()).await.unwrap();
        env.nats
            .publish_with_reply(
                subject.clone(),
                inbox,
                serde_json::to_vec(&request).unwrap().into(),
            )
            .await
            .unwrap();
        let mut last = None;
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(20), replies.next()).await
        {
            // An empty message is the server's "no responders": nobody subscribed yet.
            let Ok(reply) = serde_json::from_slice::<converge::control::ControlReply>(&m.payload)
            else {
                break;
            };
            if !matches!(reply, converge::control::ControlReply::Accepted { .. }) {
                last = Some(reply);
                break;
            }
        }
        match last {
            Some(converge::control::ControlReply::Retried { results }) => break results,
            // The new worker is still starting: ask again.
            _ if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            other => panic!("no retry results: {other:?}\n{}", healthy.log()),
        }
    };
    assert_eq!(results.len(), ids.len());
    assert!(
        results
            .iter()
            .all(|r| r.outcome == "changed" || r.outcome == "unchanged"),
        "{results:?}"
    );
    let report = converged(&env, Duration::from_secs(30), &[&healthy]).await;
    assert_eq!(report["invoices"], 200);
    let open: i64 =
        sqlx::query_scalar("SELECT count(*) FROM converge.dead_letters WHERE resolved_at IS NULL")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(open, 0, "every retried dead letter is resolved");
    assert_eq!(healthy.terminate().await.code(), Some(0));
}

/// 7a. A lease holder whose clock is skewed by an hour: leases and claims use
///     the database clock, so runs never overlap and each order is invoiced once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_skewed_clock_changes_nothing() {
    let env = TestEnv::new().await;
    let normal = serve(&env, "clock-ok", &[]);
    // libfaketime moves the worker's wall clock an hour ahead (its monotonic
    // clock, which timers use, is left alone).
    let libfaketime = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    assert!(
        std::path::Path::new(libfaketime).exists(),
        "{libfaketime} is missing: `apt-get install libfaketime` (.ci/run installs it)"
    );
    let skewed = common::Server::start_with_env(
        &env,
        &[
            ("LD_PRELOAD", libfaketime),
            ("FAKETIME", "+1h"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
        &[&["--instance", "clock-ahead"][..], harness::FAST].concat(),
    );
    ship(&env, 300, 0.3).await;
    converged(&env, CONVERGE_WITHIN, &[&normal, &skewed]).await;
    let overlapping: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM converge.sweep_runs a JOIN converge.sweep_runs b \
           ON a.sweep = b.sweep AND a.id < b.id \
          AND tstzrange(a.started_at, coalesce(a.finished_at, 'infinity')) \
              && tstzrange(b.started_at, coalesce(b.finished_at, 'infinity'))",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(overlapping, 0, "two sweep runs overlapped");
    let log = skewed.log();
    assert!(
        log.contains("invoicing worker started"),
        "the skewed worker never started:\n{log}"
    );
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.sweep_runs")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(runs > 0, "no sweep ran");
    stream_exactly_once(&env, STREAM_WITHIN).await;
    assert_eq!(normal.terminate().await.code(), Some(0));
    assert_eq!(skewed.terminate().await.code(), Some(0));
}

/// 7b. A worker that stalls past its leases (SIGSTOP) is taken over; when it
///     wakes, fencing stops its stale writes: still one invoice per order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_lease_holder_is_fenced() {
    let env = TestEnv::new().await;
    let stalling = serve(&env, "stall", &[]);
    tokio::time::sleep(Duration::from_secs(2)).await; // it holds the partitions
    let stall = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        signal(&stalling, "-STOP");
    };
    tokio::join!(ship(&env, 300, 0.2), stall);
    let healthy = serve(&env, "healthy", &[]);
    // Past every lease the stalled worker held (relay 2 s, claims 2 s, sweep
    // 10 s) and past Postgres ending its idle transactions (5 s).
    tokio::time::sleep(Duration::from_secs(11)).await;
    let partitions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM converge.relay_partitions WHERE owner_name = 'healthy'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        partitions, 32,
        "the healthy worker took every partition over"
    );
    signal(&stalling, "-CONT"); // wakes up believing it holds leases and claims
    let report = converged(&env, CONVERGE_WITHIN, &[&healthy, &stalling]).await;
    assert_eq!(report["invoices"], 300);
    stream_exactly_once(&env, STREAM_WITHIN).await;
    assert_eq!(stalling.terminate().await.code(), Some(0));
    assert_eq!(healthy.terminate().await.code(), Some(0));
}

/// 8. A fifth of the orders shipped by the legacy path (no event): the sweep
///    alone converges them; the stream holds exactly the others' events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_orders_converge_by_the_sweep_alone() {
    let env = TestEnv::new().await;
    let worker = serve(&env, "l1", &[]);
    ship(&env, 250, 0.2).await;
    let report = converged(&env, CONVERGE_WITHIN, &[&worker]).await;
    assert_eq!(report["orders"], 250);
    let messages = stream_exactly_once(&env, STREAM_WITHIN).await;
    assert_eq!(messages.len(), 200, "one event per evented order");
    let by_sweep: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(reconciled), 0)::bigint FROM converge.sweep_runs")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(by_sweep >= 50, "the sweep invoiced only {by_sweep} orders");
    assert_eq!(worker.terminate().await.code(), Some(0));
}

/// 9. Bad input: a payload that is not JSON, an oversized event and an
///    invalid subject token appended through raw SQL, and unknown or
///    malformed messages on the stream: each gives a reject or a dead letter;
///    nothing else is blocked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_blocks_nothing() {
    let env = TestEnv::new().await;
    let worker = serve(&env, "b1", &[]);
    ship(&env, 20, 0.0).await;
    converged(&env, CONVERGE_WITHIN, &[&worker]).await;

    // Raw SQL behind the library's back: an invalid subject token, an event too large to publish.
    sqlx::query(
        "INSERT INTO converge.outbox (partition, tx_order, aggregate_type, aggregate_id, version, event_type, payload) VALUES \
         (converge.partition_of('order', '9001'), converge.tx_order(), 'order', '9001', 1, 'Order Shipped', '{}'), \
         (converge.partition_of('order', '9002'), converge.tx_order(), 'order', '9002', 1, 'OrderShipped', json_build_object('pad', repeat('x', 2000000)))",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    // Straight onto the stream: an event for an order id that is not a number,
    // a message without converge headers, an unknown event type.
    let prefix = env.stream.to_ascii_lowercase();
    let js = async_nats::jetstream::new(env.nats.clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "Converge-Event-Id",
        uuid::Uuid::now_v7().to_string().as_str(),
    );
    headers.insert("Converge-Aggregate-Id", "not-a-number");
    headers.insert("Converge-Aggregate-Type", "order");
    headers.insert("Converge-Aggregate-Version", "1");
    headers.insert("Converge-Event-Type", "OrderShipped");
    js.publish_with_headers(format!("{prefix}.order.OrderShipped"), headers, "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    js.publish(format!("{prefix}.order.OrderShipped"), "garbage".into())
        .await
        .unwrap()
        .await
        .unwrap();
    js.publish(format!("{prefix}.order.OrderLost"), "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();

    // Good orders after the bad input still converge.
    ship(&env, 30, 0.0).await;
    let deadline = tokio::time::Instant::now() + CONVERGE_WITHIN;
    while in_state(&env, "INVOICED").await < 50 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "blocked:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let rejects = loop {
        let rejects: Vec<String> =
            sqlx::query_scalar("SELECT reason FROM converge.relay_rejects ORDER BY outbox_id")
                .fetch_all(&env.pool)
                .await
                .unwrap();
        if rejects.len() == 2 || tokio::time::Instant::now() > deadline {
            break rejects;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(
        rejects.len(),
        2,
        "both poison rows are recorded: {rejects:?}"
    );
    assert!(rejects[0].contains("Order Shipped"), "{rejects:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let dead: Vec<(String, bool, String)> = sqlx::query_as(
            "SELECT aggregate_key, permanent, error FROM converge.dead_letters ORDER BY aggregate_key",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap();
        if dead.len() >= 2 || tokio::time::Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(dead.len(), 2, "{dead:?}");
    // The message without converge headers: dead-lettered as malformed, keyless.
    assert!(dead[0].0.is_empty() && dead[0].1, "{dead:?}");
    assert!(dead[0].2.contains("not a converge event"), "{dead:?}");
    // The event whose order id is not a number: the reconciler's permanent error.
    assert_eq!(
        (dead[1].0.as_str(), dead[1].1),
        ("not-a-number", true),
        "{dead:?}"
    );
    assert_eq!(worker.terminate().await.code(), Some(0));
}

/// 10. A worker stopped (SIGSTOP) while its charges are in flight, past its
///     key leases and claims; another worker takes the orders over and
///     charges them again under the same idempotency keys; the stopped worker
///     resumes with its answers in hand and writes nothing. Each order is
///     charged once (effects counted by the billing service).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_mid_charge_charges_nothing_twice() {
    let env = TestEnv::new().await;
    // Every charge is applied at once and answered 1.5 s later.
    billing_url(&env, Duration::from_millis(1500));
    let a = serve(&env, "stopped", &[]);
    ship(&env, 20, 0.0).await;
    // Charges of a are in flight: applied, unanswered.
    tokio::time::sleep(Duration::from_millis(900)).await;
    signal(&a, "-STOP");
    let b = serve(&env, "taker", &[]);
    // Past a's key leases (3 s) and claims (2 s): b resumes the orders.
    tokio::time::sleep(Duration::from_secs(8)).await;
    signal(&a, "-CONT");
    let report = converged(&env, CONVERGE_WITHIN, &[&a, &b]).await;
    assert_eq!(report["orders"], 20);
    let calls = report["billing"]["calls"].as_u64().unwrap();
    assert!(
        calls > 20,
        "no order was charged twice over: the scenario missed the stall ({report})"
    );
    let log = a.log();
    assert!(
        log.contains("key lease lost"),
        "the stopped worker never noticed its leases were gone:\n{log}"
    );
    stream_exactly_once(&env, STREAM_WITHIN).await;
    assert_eq!(a.terminate().await.code(), Some(0));
    assert_eq!(b.terminate().await.code(), Some(0));
}

/// 11. Every PostgreSQL session of a worker terminated while its charges are
///     in flight: no key is released behind the running charges (leases are
///     rows, not sessions), so a second worker never charges an order at the
///     same time; each order is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_killed_mid_charge_release_no_key() {
    let env = TestEnv::new().await;
    billing_url(&env, Duration::from_millis(1500));
    let a = serve(&env, "killed", &[]);
    let b = serve(&env, "other", &[]);
    ship(&env, 40, 0.25).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let _: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap();
    }
    let report = converged(&env, CONVERGE_WITHIN, &[&a, &b]).await;
    assert_eq!(report["orders"], 40);
    stream_exactly_once(&env, STREAM_WITHIN).await;
    assert_eq!(a.terminate().await.code(), Some(0));
    assert_eq!(b.terminate().await.code(), Some(0));
}
