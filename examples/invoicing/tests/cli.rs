//! The `invoicing` binary end to end: ship, check, serve, crash and resume, demo.

mod common;

use std::time::Duration;

use common::{check_json, invoicing, run, wait_converged, Server};
use converge_tests::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_until_serve_converges_evented_and_legacy_orders() {
    let env = TestEnv::new().await;
    let shipped = run(
        &env,
        &["ship", "--orders", "300", "--legacy-fraction", "0.1"],
    )
    .await;
    assert!(shipped.status.success(), "{shipped:?}");
    assert!(
        shipped.stdout.contains(
            "shipped 300 orders: 270 with an OrderShipped event, 30 by the legacy path (no event)"
        ),
        "{shipped:?}"
    );

    // Nothing invoices yet: check says so and exits 1.
    let before = run(&env, &["check"]).await;
    assert_eq!(before.status.code(), Some(1), "{before:?}");
    assert!(before.stdout.contains("SHIPPED 300"), "{before:?}");
    assert!(
        before
            .stdout
            .contains("not converged: 300 orders in SHIPPED (e.g. 1, 2, 3"),
        "{before:?}"
    );

    let server = Server::start(&env, &["--instance", "t-serve", "--sweep-every", "1"]);
    let report = wait_converged(&env, Duration::from_secs(60), &server).await;
    assert_eq!(report["orders"], 300);
    assert_eq!(report["invoices"], 300);
    assert_eq!(report["orders_by_state"]["INVOICED"], 300);
    assert_eq!(report["duplicates"], 0);
    assert_eq!(report["orphan_invoices"], 0);
    let log = server.log();
    assert!(
        log.contains("invoicing worker started")
            && log.contains("t-serve")
            && log.contains(&env.stream),
        "the start line names instance, stream and app:\n{log}"
    );

    let status = server.terminate().await;
    assert_eq!(status.code(), Some(0), "serve exits 0 after SIGTERM");

    let after = run(&env, &["check"]).await;
    assert!(after.status.success(), "{after:?}");
    assert!(after.stdout.trim_end().ends_with("converged"), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_alone_converge_only_evented_orders() {
    let env = TestEnv::new().await;
    // A nightly sweep: only the event path runs during the test.
    let server = Server::start(
        &env,
        &[
            "--sweep-cron",
            "0 0 2 * * *",
            "--sweep-time-zone",
            "Europe/Berlin",
        ],
    );
    let shipped = run(
        &env,
        &["ship", "--orders", "50", "--legacy-fraction", "0.2"],
    )
    .await;
    assert!(shipped.status.success(), "{shipped:?}");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let report = loop {
        let (report, status) = check_json(&env).await;
        assert_eq!(
            status.code(),
            Some(1),
            "legacy orders cannot converge without a sweep: {report}"
        );
        if report["orders_by_state"]["INVOICED"] == 40 {
            break report;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "events did not invoice the 40 evented orders: {report}\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(report["orders_by_state"]["SHIPPED"], 10, "{report}");
    assert_eq!(report["invoices"], 40);
    // Every 5th order took the legacy path; those are the ones left.
    assert_eq!(
        report["unconverged"]["SHIPPED"],
        serde_json::json!([5, 10, 15, 20, 25, 30, 35, 40, 45, 50])
    );
    assert_eq!(server.terminate().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dying_after_its_claim_is_resumed_with_one_invoice() {
    let env = TestEnv::new().await;
    let shipped = run(&env, &["ship", "--orders", "20"]).await;
    assert!(shipped.status.success(), "{shipped:?}");

    let mut crashing = Server::start(
        &env,
        &[
            "--instance",
            "t-crash",
            "--crash-after-claim",
            "1.0",
            "--sweep-every",
            "3600",
        ],
    );
    let status = crashing.wait(Duration::from_secs(60)).await;
    assert!(!status.success(), "the process aborted: {status:?}");
    assert_eq!(
        status.code(),
        None,
        "killed by SIGABRT, not an exit: {status:?}"
    );
    let (report, code) = check_json(&env).await;
    assert_eq!(code.code(), Some(1));
    assert!(
        report["orders_by_state"]["INVOICING"].as_i64().unwrap() >= 1,
        "{report}"
    );
    assert_eq!(
        report["invoices"], 0,
        "it died before any invoice: {report}"
    );
    let claimed_by: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT claimed_by FROM invoicing.orders WHERE state = 'INVOICING'",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(claimed_by, ["t-crash/invoicing"]);

    let server = Server::start(
        &env,
        &[
            "--instance",
            "t-resume",
            "--claim-lease",
            "1",
            "--sweep-every",
            "1",
        ],
    );
    let report = wait_converged(&env, Duration::from_secs(60), &server).await;
    assert_eq!(report["orders"], 20);
    assert_eq!(report["invoices"], 20);
    assert_eq!(report["duplicates"], 0);
    let log = server.log();
    assert!(log.contains("resuming an expired INVOICING claim"), "{log}");
    assert_eq!(server.terminate().await.code(), Some(0));
    let per_order: Vec<i64> = sqlx::query_scalar(
        "SELECT count(i.id) FROM invoicing.orders o LEFT JOIN invoicing.invoices i ON i.order_id = o.id GROUP BY o.id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(per_order, vec![1; 20], "exactly one invoice per order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_converges_and_can_be_repeated() {
    let env = TestEnv::new().await;
    for _ in 0..2 {
        let out = run(&env, &["demo", "--orders", "200", "--timeout", "90"]).await;
        assert!(out.status.success(), "{out:?}");
        let last = out.stdout.lines().last().unwrap_or_default();
        let rest = last
            .strip_prefix("converged: 200 orders, 200 invoices, 200 charges, 0 duplicates in ")
            .unwrap_or_else(|| panic!("unexpected last line {last:?}: {out:?}"));
        let secs = rest.strip_suffix(" s").expect("ends with ` s`");
        let (whole, tenths) = secs.split_once('.').expect("one decimal");
        assert!(
            whole.parse::<u64>().is_ok() && tenths.len() == 1,
            "{last:?}"
        );
        assert!(
            out.stdout
                .contains("180 with an OrderShipped event, 20 by the legacy path"),
            "{out:?}"
        );
    }
    // The demo charged through its own billing service, gone with it: check
    // the database alone.
    let out = invoicing(&env)
        .env_remove("INVOICING_BILLING_URL")
        .args(["check", "--json"])
        .output()
        .await
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{report}");
    assert_eq!(
        report["orders"], 200,
        "the second run started from clean data"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_services_say_what_to_start() {
    let env = TestEnv::new().await;
    let out = run(
        &env,
        &[
            "check",
            "--database-url",
            "postgres://postgres@127.0.0.1:1/postgres",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("cannot connect to PostgreSQL at postgres://postgres@127.0.0.1:1/postgres")
            && out.stderr.contains("start PostgreSQL"),
        "{out:?}"
    );

    let out = run(&env, &["serve", "--nats-url", "nats://127.0.0.1:1"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("cannot connect to NATS at nats://127.0.0.1:1")
            && out.stderr.contains("nats-server -js"),
        "{out:?}"
    );

    let out = run(&env, &["ship", "--orders", "1", "--legacy-fraction", "1.5"]).await;
    assert_eq!(out.status.code(), Some(2), "a usage error: {out:?}");
    assert!(out.stderr.contains("outside 0..=1"), "{out:?}");

    let out = run(&env, &["check", "--stream", "NOT.VALID"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("invalid --stream"), "{out:?}");
}

/// The demo behind a real PgBouncer in session mode with a pool of 24 server
/// connections: two workers of 6 pool connections, each with its relay's
/// LISTEN and its consumer's 3 lease connections, and the demo's 4 fit, so
/// no client waits for a server connection and the demo ends as it does on a
/// direct connection: every order invoiced and charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_behind_pgbouncer_in_session_mode() {
    let env = TestEnv::new().await;
    let opts = env.connect_options();
    let bouncer = converge_tests::PgBouncer::start(
        &format!("127.0.0.1:{}", opts.get_port()),
        converge_tests::PoolMode::Session,
        24,
    )
    .await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/{}",
        bouncer.port(),
        env.db_name
    );
    let out = invoicing(&env)
        .env("DATABASE_URL", &url)
        .args([
            "demo",
            "--orders",
            "300",
            "--timeout",
            "60",
            "--max-connections",
            "6",
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\npgbouncer:\n{}",
        String::from_utf8_lossy(&out.stderr),
        bouncer.log()
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("converged: 300 orders, 300 invoices, 300 charges, 0 duplicates in "),
        "{last}"
    );
    // Transaction pooling is refused at start, naming the setting.
    let tx_bouncer = converge_tests::PgBouncer::start(
        &format!("127.0.0.1:{}", opts.get_port()),
        converge_tests::PoolMode::Transaction,
        20,
    )
    .await;
    let out = invoicing(&env)
        .env(
            "DATABASE_URL",
            format!(
                "postgres://postgres@127.0.0.1:{}/{}",
                tx_bouncer.port(),
                env.db_name
            ),
        )
        .args(["serve"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("pool_mode = session"), "{stderr}");
}

/// `serve --metrics-listen` runs the `prometheus` feature in a real process:
/// the exposition parses with a Prometheus text-format parser and carries
/// the relay's, the reconciler's and the sweep's figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exposes_prometheus_metrics() {
    let env = TestEnv::new().await;
    let shipped = run(&env, &["ship", "--orders", "30"]).await;
    assert!(shipped.status.success(), "{shipped:?}");
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let server = Server::start(
        &env,
        &["--sweep-every", "1", "--metrics-listen", &addr.to_string()],
    );
    wait_converged(&env, Duration::from_secs(60), &server).await;
    // Long enough for one convergence measurement after the last invoice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .unwrap();
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("the exposition parses");
    let sum = |name: &str| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    assert!(sum("converge_events_published_total") >= 30.0, "{body}");
    assert!(sum("converge_reconciles_total") >= 30.0, "{body}");
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "converge_sweep_unconverged_keys"
                && s.labels.get("sweep") == Some("invoices")),
        "{body}"
    );
    assert!(
        scrape.docs.contains_key("converge_events_published_total"),
        "described: {body}"
    );
    let status = server.terminate().await;
    assert_eq!(status.code(), Some(0));
}
