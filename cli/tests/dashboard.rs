//! `converge dashboard` in a real browser: headless Chromium driven through
//! chromedriver (Debian's `chromium` and `chromium-driver`; `.ci/setup`
//! installs them) against the dashboard binary over a real database, with a
//! worker running in this process. The pages render with the figures the
//! database holds, a bulk retry from the page resolves exactly the matching
//! letters (their keys run, the others do not), a viewer sees everything and
//! cannot act, and an action without the CSRF token is refused. Screenshots
//! of each page go to `target/dashboard-screenshots/`.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use converge::handlers::{ConsumerConfig, Context, Outcome, ReconcileError, Reconciler};
use converge::sweeper::{Schedule, SqlCandidates, SweepConfig, Timing};
use converge::{Worker, WorkerHandle};
use converge_tests::orders::{BACKLOG, CANDIDATES};
use converge_tests::{RoleGuard, TestEnv};
use fantoccini::{Client, ClientBuilder, Locator};
use tokio::process::{Child, Command};

/// SHIPPED → INVOICED, and counts the runs of each key.
#[derive(Default)]
struct Invoice {
    runs: std::sync::Mutex<Vec<String>>,
}

impl Reconciler for Invoice {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        self.runs.lock().unwrap().push(key.to_owned());
        converge_tests::orders::invoice(ctx, key).await
    }
}

async fn start_worker(env: &TestEnv, app: &str, invoice: Arc<Invoice>) -> WorkerHandle {
    let subject = format!("{}.order.Shipped", env.prefix);
    let consumer = ConsumerConfig::new("invoicing", env.stream.clone(), subject);
    // 02:30 in Berlin: the sweep's fire times cross the clock changes.
    let schedule = Schedule::cron("0 30 2 * * *", converge::chrono_tz::Europe::Berlin).unwrap();
    let mut sweep = SweepConfig::new("invoices", "invoicing", Timing::new(schedule));
    sweep.lease.lock_at_least_for = Duration::ZERO; // a replay may follow a run at once
    Worker::new(env.pool.clone(), env.nats.clone(), app)
        .instance_name(format!("{app}-w1"))
        .measure_interval(Duration::from_millis(300))
        .relay(env.relay_config())
        .consumer(consumer, invoice.clone())
        .sweep(
            sweep,
            SqlCandidates::new(CANDIDATES).with_backlog(BACKLOG),
            invoice.clone(),
        )
        .shutdown_timeout(Duration::from_secs(10))
        .reconciler("shipping", Arc::new(Invoice::default()))
        .start()
        .await
        .expect("worker starts")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `converge dashboard` process, killed on drop.
struct Dashboard {
    _child: Child,
    url: String,
}

async fn dashboard(database_url: &str, nats_url: &str, extra: &[&str]) -> Dashboard {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = common::command(database_url, nats_url);
    cmd.args(["dashboard", "--listen", &listen])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("start converge dashboard");
    let url = format!("http://{listen}");
    let http = reqwest::Client::new();
    for _ in 0..100 {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut err).await;
            }
            panic!("converge dashboard exited ({status}): {err}");
        }
        if http
            .get(format!("{url}/assets/style.css"))
            .send()
            .await
            .is_ok()
        {
            return Dashboard { _child: child, url };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("converge dashboard did not answer on {url} within 10 s");
}

/// Headless Chromium through a chromedriver of its own.
struct Browser {
    client: Client,
    _driver: Child,
}

async fn browser() -> Browser {
    let driver_bin =
        std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
    assert!(
        std::path::Path::new(&driver_bin).exists(),
        "{driver_bin} is missing: install Debian's chromium and chromium-driver (bash .ci/setup \
         does), or point CHROMEDRIVER at a chromedriver"
    );
    let port = free_port();
    let driver = Command::new(&driver_bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromedriver");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,1000"],
        }),
    );
    for _ in 0..100 {
        let http = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(http)
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(client) => {
                return Browser {
                    client,
                    _driver: driver,
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("chromedriver did not start a session within 10 s");
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shoot(client: &Client, name: &str) {
    let png = client.screenshot().await.expect("screenshot");
    std::fs::write(screenshots().join(format!("{name}.png")), png).unwrap();
}

/// The text of the element `css`, waiting up to 10 s for it (a click's
/// navigation may still be loading the page).
async fn text(client: &Client, css: &str) -> String {
    let found = client
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await;
    match found {
        Ok(element) => element.text().await.unwrap(),
        Err(e) => panic!("{css}: {e}\n{}", source(client).await),
    }
}

/// The element `css`, waiting up to 10 s for it.
async fn element(client: &Client, css: &str) -> fantoccini::elements::Element {
    match client
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await
    {
        Ok(e) => e,
        Err(e) => panic!("{css}: {e}\n{}", source(client).await),
    }
}

/// The CSRF token and the nonce of the confirmation form on the page.
async fn form_tokens(client: &Client) -> (String, String) {
    let mut values = Vec::new();
    for name in ["csrf", "nonce"] {
        let input = client
            .find(Locator::Css(&format!("input[name={name}]")))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        values.push(input.attr("value").await.unwrap().unwrap());
    }
    (values.remove(0), values.remove(0))
}

async fn source(client: &Client) -> String {
    client.source().await.unwrap()
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn letters(env: &TestEnv) {
    sqlx::query(
        "INSERT INTO converge.dead_letters \
           (reconciler, aggregate_key, path, error, permanent, attempts, payload) \
         SELECT 'invoicing', g::text, 'event', 'HTTP 503: timeout after 30 s', false, 5, \
                convert_to('{\"id\": ' || g || '}', 'UTF8') \
         FROM generate_series(1, 5) g",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO converge.dead_letters (reconciler, aggregate_key, path, error, permanent, attempts) \
         VALUES ('invoicing', '6', 'event', 'customer has no <b>billing</b> address', true, 1), \
                ('shipping', '7', 'sweep', 'timeout', false, 5)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
}

/// Six hours of an earlier day's figures, as workers would have measured
/// them every two minutes (a backlog that builds up and drains twice), and
/// three runs of the sweep, the second failed.
async fn history(env: &TestEnv) {
    sqlx::query(
        "INSERT INTO converge.convergence_history \
           (sweep, measured_at, unconverged_keys, oldest_unconverged_at) \
         SELECT 'invoices', now() - make_interval(mins => m), \
                (48 * abs(sin(m / 57.0)))::bigint, \
                now() - make_interval(mins => m) - make_interval(secs => 30 * (m % 90)) \
         FROM generate_series(2, 358, 2) m",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO converge.sweep_runs \
           (sweep, trigger, instance, lease_token, started_at, finished_at, status, scanned, \
            reconciled, failed, error) \
         VALUES ('invoices', 'schedule', 'earlier', 1, now() - interval '5 hours', \
                 now() - interval '5 hours' + interval '40 s', 'completed', 40, 40, 0, NULL), \
                ('invoices', 'schedule', 'earlier', 2, now() - interval '3 hours', \
                 now() - interval '3 hours' + interval '9 s', 'failed', 12, 3, 0, \
                 'connection reset by peer'), \
                ('invoices', 'manual', 'earlier', 3, now() - interval '2 hours', \
                 now() - interval '2 hours' + interval '30 s', 'completed', 30, 30, 0, NULL)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
}

async fn shipped(env: &TestEnv) -> Vec<i64> {
    sqlx::query_scalar("SELECT id FROM orders WHERE state = 'SHIPPED' ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

async fn open_letters(env: &TestEnv) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT reconciler || '/' || aggregate_key FROM converge.dead_letters \
         WHERE resolved_at IS NULL ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pages_show_the_figures_and_a_bulk_retry_from_the_page_resolves_the_matching_letters() {
    let env = TestEnv::new().await;
    converge_tests::orders::create_table(&env.pool).await;
    converge_tests::orders::insert_shipped(&env.pool, 1..=8).await;
    letters(&env).await;
    let app = common::app();
    let invoice = Arc::new(Invoice::default());
    let worker = start_worker(&env, &app, invoice.clone()).await;
    wait_for("a measurement of 8 unconverged keys", async || {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM converge.convergence_history \
             WHERE sweep = 'invoices' AND unconverged_keys = 8",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap()
            > 0
    })
    .await;
    history(&env).await;
    let board = dashboard(&env.database_url(), env.nats_url(), &["--app", &app]).await;
    let b = browser().await;
    let c = &b.client;

    // Overview: the database's figures.
    c.goto(&format!("{}/", board.url)).await.unwrap();
    assert_eq!(text(c, "#open-dead-letters").await, "7");
    assert_eq!(text(c, "#backlog").await, "0");
    assert_eq!(text(c, "#live-workers").await, "1");
    let page = source(c).await;
    assert!(page.contains(&format!("{app}-w1")), "the worker is listed");
    assert!(page.contains("invoicing"), "its consumer is listed");
    shoot(c, "overview").await;

    // Sweeps: the cron schedule's fire times, the clock change ahead marked.
    c.goto(&format!("{}/sweeps", board.url)).await.unwrap();
    let page = source(c).await;
    assert!(page.contains("`0 30 2 * * *` in Europe/Berlin"), "{page}");
    assert!(
        page.contains("clocks change at") || page.contains("clock change ahead at"),
        "a clock change of Europe/Berlin within a year is marked"
    );
    assert!(
        page.contains("CET") || page.contains("CEST"),
        "local times shown"
    );
    shoot(c, "sweeps").await;

    // Dead letters: filter by reconciler and error text, then retry all.
    c.goto(&format!("{}/dead-letters", board.url))
        .await
        .unwrap();
    assert_eq!(
        element(c, "#matching")
            .await
            .attr("data-count")
            .await
            .unwrap(),
        Some("7".into())
    );
    assert!(
        source(c)
            .await
            .contains("customer has no &lt;b&gt;billing&lt;/b&gt; address"),
        "error text is escaped, not markup"
    );
    let form = c.form(Locator::Css("form.filter")).await.unwrap();
    form.set_by_name("error_like", "TIMEOUT").await.unwrap();
    c.find(Locator::Css(
        "select[name=reconciler] option[value=invoicing]",
    ))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    form.submit().await.unwrap();
    wait_for("the filtered list", async || {
        c.current_url()
            .await
            .unwrap()
            .as_str()
            .contains("error_like=TIMEOUT")
    })
    .await;
    assert_eq!(
        element(c, "#matching")
            .await
            .attr("data-count")
            .await
            .unwrap(),
        Some("5".into()),
        "five invoicing letters mention a timeout"
    );
    shoot(c, "dead-letters").await;
    element(c, "#retry-all").await.click().await.unwrap();
    let confirm = text(c, "#confirm-count").await;
    assert!(
        confirm.starts_with("Retry 5 open dead letters of reconciler invoicing"),
        "{confirm}"
    );
    shoot(c, "confirm").await;
    // A letter that matches, written after the confirmation was shown: the
    // action takes the five confirmed, not it.
    sqlx::query(
        "INSERT INTO converge.dead_letters (reconciler, aggregate_key, path, error, permanent, attempts) \
         VALUES ('invoicing', '8', 'event', 'timeout', false, 5)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        shipped(&env).await,
        (1..=8).collect::<Vec<_>>(),
        "nothing before the confirmation"
    );
    let (csrf, nonce) = form_tokens(c).await;
    element(c, "#confirm").await.click().await.unwrap();
    let result = text(c, "#result").await;
    assert!(result.contains("5 resolved, 0 failed again"), "{result}");
    shoot(c, "retried").await;
    // The same confirmation submitted again: nothing runs twice.
    let audits = common::audit_rows(&env).await;
    let again = reqwest::Client::new()
        .post(format!("{}/dead-letters/act", board.url))
        .form(&[("csrf", csrf.as_str()), ("nonce", nonce.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409, "a confirmation is used once");
    assert_eq!(common::audit_rows(&env).await, audits, "no second action");
    assert_eq!(
        shipped(&env).await,
        vec![6, 7, 8],
        "exactly the five keys ran"
    );
    let mut runs = invoice.runs.lock().unwrap().clone();
    runs.sort();
    assert_eq!(runs, ["1", "2", "3", "4", "5"], "each once, by the retry");
    assert_eq!(
        open_letters(&env).await,
        ["invoicing/6", "shipping/7", "invoicing/8"],
        "the letter written after the confirmation stays open"
    );
    let (actor, action, _, _, details, outcome) = common::last_audit(&env).await;
    assert_eq!(
        (actor.as_str(), action.as_str(), outcome.as_deref()),
        ("tester (dashboard)", "dead_letter.retry", Some("ok"))
    );
    assert_eq!(details["count"], 5);
    assert_eq!(details["filter"]["error_like"], "TIMEOUT");

    // One letter: shown whole.
    let six: i64 =
        sqlx::query_scalar("SELECT id FROM converge.dead_letters WHERE aggregate_key = '6'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    c.goto(&format!("{}/dead-letters/{six}", board.url))
        .await
        .unwrap();
    assert!(source(c).await.contains("(permanent)"));
    shoot(c, "dead-letter").await;

    // Actions without the page's CSRF token, or from another origin: refused,
    // each with a confirmation that would otherwise act (two letters).
    c.goto(&format!(
        "{}/dead-letters/confirm?action=discard&error_like=timeout",
        board.url
    ))
    .await
    .unwrap();
    assert!(text(c, "#confirm-count")
        .await
        .starts_with("Discard 2 open dead letters"));
    let (csrf, nonce) = form_tokens(c).await;
    let http = reqwest::Client::new();
    let act = format!("{}/dead-letters/act", board.url);
    let refused = http
        .post(&act)
        .form(&[("nonce", nonce.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    assert!(refused.text().await.unwrap().contains("CSRF"));
    let forged = [("csrf", "0000"), ("nonce", nonce.as_str())];
    let refused = http.post(&act).form(&forged).send().await.unwrap();
    assert_eq!(refused.status(), 403);
    let valid = [("csrf", csrf.as_str()), ("nonce", nonce.as_str())];
    let refused = http
        .post(&act)
        .header("Origin", "https://evil.example")
        .form(&valid)
        .send()
        .await
        .unwrap();
    assert_eq!(
        refused.status(),
        403,
        "another origin, with the page's token"
    );
    assert!(refused.text().await.unwrap().contains("origin"));
    let refused = http
        .post(&act)
        .header("Sec-Fetch-Site", "cross-site")
        .form(&valid)
        .send()
        .await
        .unwrap();
    assert_eq!(
        refused.status(),
        403,
        "a cross-site form, with the page's token"
    );
    let proxied = http
        .get(format!("{}/", board.url))
        .header("X-Forwarded-For", "203.0.113.7")
        .send()
        .await
        .unwrap();
    assert_eq!(
        proxied.status(),
        403,
        "no proxy in front of a dashboard without a token"
    );
    let rebound = http
        .get(format!("{}/", board.url))
        .header("Host", "evil.example:80")
        .send()
        .await
        .unwrap();
    assert_eq!(
        rebound.status(),
        421,
        "a loopback dashboard answers only to localhost"
    );
    assert_eq!(
        open_letters(&env).await,
        ["invoicing/6", "shipping/7", "invoicing/8"],
        "nothing discarded"
    );

    // A sweep run, then the convergence chart: the fall to 0, the run marked.
    common::converge(&env, &["sweep", "run", "invoices", "--wait", "--app", &app])
        .await
        .expect(0);
    wait_for(
        "the latest measurement to be 0 unconverged keys",
        async || {
            sqlx::query_scalar::<_, i64>(
                "SELECT unconverged_keys FROM converge.convergence_history \
             WHERE sweep = 'invoices' ORDER BY measured_at DESC LIMIT 1",
            )
            .fetch_one(&env.pool)
            .await
            .unwrap()
                == 0
        },
    )
    .await;
    c.goto(&format!("{}/convergence?range=6h", board.url))
        .await
        .unwrap();
    assert_eq!(text(c, "strong.keys[data-sweep=invoices]").await, "0");
    let points = c
        .find(Locator::Css("polyline.keys"))
        .await
        .unwrap()
        .attr("points")
        .await
        .unwrap()
        .unwrap();
    assert!(
        points.split(' ').count() > 100,
        "six hours of history drawn: {points}"
    );
    let page = source(c).await;
    assert!(
        page.contains(">48<"),
        "the keys' axis reaches the history's 48"
    );
    assert_eq!(
        c.find_all(Locator::Css("line.run.failed"))
            .await
            .unwrap()
            .len(),
        1,
        "the failed run of the history is marked red"
    );
    assert_eq!(
        c.find_all(Locator::Css("line.run")).await.unwrap().len(),
        4,
        "three runs of the history and the run just made"
    );
    shoot(c, "convergence").await;

    // The run's page: replay it from there, through the worker.
    let run: i64 =
        sqlx::query_scalar("SELECT max(id) FROM converge.sweep_runs WHERE instance <> 'earlier'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    c.goto(&format!("{}/sweeps/runs/{run}", board.url))
        .await
        .unwrap();
    shoot(c, "sweep-run").await;
    element(c, "#replay").await.click().await.unwrap();
    let result = text(c, "#result").await;
    assert!(
        result.starts_with(&format!(
            "Replay of run #{run} of sweep invoices accepted by worker {app}-w1"
        )),
        "{result}"
    );
    wait_for("the replayed run", async || {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM converge.sweep_runs WHERE id > $1")
            .bind(run)
            .fetch_one(&env.pool)
            .await
            .unwrap()
            > 0
    })
    .await;
    let (actor, action, target, _, _, outcome) = common::last_audit(&env).await;
    assert_eq!(
        (
            actor.as_str(),
            action.as_str(),
            target.as_str(),
            outcome.as_deref()
        ),
        (
            "tester (dashboard)",
            "sweep.replay",
            run.to_string().as_str(),
            Some("ok")
        )
    );

    c.goto(&format!("{}/leases", board.url)).await.unwrap();
    assert!(source(c).await.contains("invoices"), "the sweep's lease");
    shoot(c, "leases").await;
    c.goto(&format!("{}/audit", board.url)).await.unwrap();
    let page = source(c).await;
    assert!(page.contains("dead_letter.retry") && page.contains("sweep.run"));
    shoot(c, "audit").await;

    // The sweep's successes resolved the invoicing letters of keys 6 and 8.
    assert_eq!(open_letters(&env).await, ["shipping/7"]);
    // One letter, from its own page: discard it.
    let seven: i64 =
        sqlx::query_scalar("SELECT id FROM converge.dead_letters WHERE reconciler = 'shipping'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    c.goto(&format!("{}/dead-letters/{seven}", board.url))
        .await
        .unwrap();
    element(c, "#discard-one").await.click().await.unwrap();
    let confirm = text(c, "#confirm-count").await;
    assert!(
        confirm.starts_with(&format!("Discard 1 open dead letters with id {seven}")),
        "{confirm}"
    );
    element(c, "#confirm").await.click().await.unwrap();
    assert!(text(c, "#result")
        .await
        .starts_with("Discarded 1 dead letters"));
    assert!(open_letters(&env).await.is_empty());

    b.client.close().await.unwrap();
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_viewer_sees_everything_and_cannot_act() {
    let env = TestEnv::new().await;
    converge_tests::orders::create_table(&env.pool).await;
    letters(&env).await;
    let viewer = RoleGuard::new(&env, "dash_viewer").await;
    let grants = converge::grant_sql(converge::Role::Viewer, &viewer.name).unwrap();
    sqlx::raw_sql(&grants).execute(&env.pool).await.unwrap();
    let board = dashboard(&common::url_as(&env, &viewer.name), env.nats_url(), &[]).await;
    let b = browser().await;
    let c = &b.client;

    c.goto(&format!("{}/dead-letters?error_like=timeout", board.url))
        .await
        .unwrap();
    assert_eq!(
        element(c, "#matching")
            .await
            .attr("data-count")
            .await
            .unwrap(),
        Some("6".into()),
        "a viewer sees the letters"
    );
    assert!(text(c, "#read-only").await.contains("viewer role"));
    assert!(
        c.find(Locator::Css("#retry-all")).await.is_err(),
        "no action offered"
    );
    assert_eq!(
        text(c, "header .role").await,
        format!("role {} · viewer (read-only)", viewer.name)
    );
    shoot(c, "viewer").await;
    // The confirmation and the action are refused, token or not.
    c.goto(&format!(
        "{}/dead-letters/confirm?action=discard&error_like=timeout",
        board.url
    ))
    .await
    .unwrap();
    assert!(source(c)
        .await
        .contains("refused: this dashboard is read-only"));
    let http = reqwest::Client::new();
    let confirm = http
        .get(format!(
            "{}/dead-letters/confirm?action=discard&error_like=timeout",
            board.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(confirm.status(), 403, "no confirmation for a viewer");
    let refused = http
        .post(format!("{}/dead-letters/act", board.url))
        .form(&[("csrf", "x"), ("nonce", "y")])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    assert!(refused
        .text()
        .await
        .unwrap()
        .contains("refused: this dashboard is read-only"));
    assert_eq!(open_letters(&env).await.len(), 7, "nothing resolved");
    b.client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn off_loopback_the_dashboard_needs_its_token() {
    let env = TestEnv::new().await;
    let run = common::converge(&env, &["dashboard", "--listen", "0.0.0.0:0"])
        .await
        .expect(2);
    assert!(run.stderr.contains("needs an access token"), "{run:#?}");
    let run = common::converge(
        &env,
        &[
            "dashboard",
            "--listen",
            "0.0.0.0:0",
            "--access-token",
            "short",
        ],
    )
    .await
    .expect(2);
    assert!(run.stderr.contains("at least 16 characters"), "{run:#?}");

    let port = free_port();
    let listen = format!("0.0.0.0:{port}");
    let token = "a-token-of-32-characters-0123456";
    let mut cmd = common::command(&env.database_url(), env.nats_url());
    cmd.args(["dashboard", "--listen", &listen, "--access-token", token])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let _child = cmd.spawn().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut answered = None;
    for _ in 0..100 {
        if let Ok(r) = http.get(format!("{url}/")).send().await {
            answered = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answered.expect("the dashboard answers").status(), 401);
    let bearer = http
        .get(format!("{url}/"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 200);
    let form = http.get(format!("{url}/login")).send().await.unwrap();
    assert_eq!(form.status(), 200, "the login form needs no token");
    let wrong = http
        .post(format!("{url}/login"))
        .form(&[("token", "nope")])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let login = http
        .post(format!("{url}/login"))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 303);
    let cookie = login.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let with_cookie = http
        .get(format!("{url}/dead-letters"))
        .header("Cookie", cookie.split(';').next().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(with_cookie.status(), 200);
}
