//! Helpers: run the `invoicing` binary against a test's own database and stream.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use converge_tests::TestEnv;
use tokio::process::{Child, Command};

/// Each test's billing service (by the test's subject prefix): every `serve`
/// charges through it and every `check` counts its charges.
static BILLING: std::sync::Mutex<Option<std::collections::HashMap<String, String>>> =
    std::sync::Mutex::new(None);

/// Starts the test's billing service (answers delayed by `latency` after the
/// charge is applied) unless it runs; its URL. Call it before the first
/// `invoicing` command to choose the latency; otherwise the first command
/// starts one without.
pub fn billing_url(env: &TestEnv, latency: Duration) -> String {
    let mut all = BILLING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let all = all.get_or_insert_with(Default::default);
    if let Some(url) = all.get(&env.prefix) {
        return url.clone();
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the billing service");
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let url = format!("http://{}", listener.local_addr().expect("billing address"));
    tokio::spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let _ = axum::serve(listener, invoicing::billing::router(latency)).await;
    });
    all.insert(env.prefix.clone(), url.clone());
    url
}

/// The binary under test, configured for `env` (its database, a unique stream
/// and app, and the test's billing service).
pub fn invoicing(env: &TestEnv) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_invoicing"));
    converge_tests::clear_nats_client_env(&mut cmd);
    cmd.env("INVOICING_BILLING_URL", billing_url(env, Duration::ZERO));
    cmd.env("DATABASE_URL", database_url(env))
        .env("NATS_URL", env.nats_url())
        .env("INVOICING_STREAM", &env.stream)
        .env("INVOICING_APP", format!("app_{}", env.prefix))
        .env("RUST_LOG", "info")
        .kill_on_drop(true);
    cmd
}

/// The database URL the `invoicing` processes use: the test's database,
/// directly, or through the connection pooler at `INVOICING_TEST_POOLER`
/// (`host:port` of a PgBouncer in session mode whose `[databases]` has
/// `* = host=... port=...`; `.ci/faults-behind-pgbouncer` starts one and runs
/// the fault suite through it). The test's own checks stay direct.
pub fn database_url(env: &TestEnv) -> String {
    let url = env.database_url();
    match std::env::var("INVOICING_TEST_POOLER") {
        Ok(pooler) if !pooler.is_empty() => {
            // The same URL (user, password, parameters) with the pooler's
            // host and port.
            let start = url.find("://").map_or(0, |i| i + 3);
            let end = url[start..].find('/').map_or(url.len(), |i| start + i);
            let authority = &url[start..end];
            let user = authority.rfind('@').map_or("", |at| &authority[..=at]);
            format!("{}{user}{pooler}{}", &url[..start], &url[end..])
        }
        _ => url,
    }
}

/// A finished command's output.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `invoicing <args>` to completion.
pub async fn run(env: &TestEnv, args: &[&str]) -> Output {
    let out = invoicing(env)
        .args(args)
        .output()
        .await
        .expect("run the invoicing binary");
    Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `check --json`, parsed, and its exit status.
pub async fn check_json(env: &TestEnv) -> (serde_json::Value, ExitStatus) {
    let out = run(env, &["check", "--json"]).await;
    let report = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("check --json printed no JSON ({e}): {out:?}"));
    (report, out.status)
}

/// A `serve` child process logging to a file.
pub struct Server {
    pub child: Child,
    pub log: PathBuf,
}

impl Server {
    /// Starts `invoicing serve <args>`.
    pub fn start(env: &TestEnv, args: &[&str]) -> Server {
        Server::start_with_env(env, &[], args)
    }

    /// Starts `invoicing serve <args>` with extra environment variables
    /// (e.g. `LD_PRELOAD` of libfaketime to skew its clock).
    pub fn start_with_env(env: &TestEnv, vars: &[(&str, &str)], args: &[&str]) -> Server {
        let log =
            std::env::temp_dir().join(format!("invoicing-{}-{}.log", env.prefix, uuid_like()));
        let file = std::fs::File::create(&log).expect("create the server log");
        let child = invoicing(env)
            .envs(vars.iter().copied())
            .arg("serve")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn invoicing serve");
        Server { child, log }
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit.
    pub async fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().expect("the server is running");
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(killed.success(), "kill -TERM {pid} failed");
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!("serve did not exit within 30 s of SIGTERM:\n{}", self.log())
            })
            .expect("wait for serve");
        if !status.success() {
            eprintln!(
                "serve exited with {status:?} after SIGTERM; its log:\n{}",
                self.log()
            );
        }
        let _ = std::fs::remove_file(&self.log);
        status
    }

    /// Waits for the process to exit by itself.
    pub async fn wait(&mut self, within: Duration) -> ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("serve did not exit within {within:?}:\n{}", self.log()))
            .expect("wait for serve")
    }
}

fn uuid_like() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )
}

/// Polls `check` until it exits 0, or panics after `within` with the last report.
pub async fn wait_converged(env: &TestEnv, within: Duration, server: &Server) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let (report, status) = check_json(env).await;
        if status.success() {
            assert_eq!(
                report["converged"], true,
                "exit 0 but not converged: {report}"
            );
            return report;
        }
        if Instant::now() >= deadline {
            panic!(
                "not converged within {within:?}: {report}\nserver log:\n{}",
                server.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
