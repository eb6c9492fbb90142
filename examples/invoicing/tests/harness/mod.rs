//! The fault suite's harness: workers as child processes that can be killed,
//! stalled and restarted; shipping in the background; the final checks every
//! scenario ends with (converged, one invoice per order, every outbox event on
//! the stream exactly once).
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use converge_tests::{StreamMessage, TestEnv};

use crate::common::{check_json, run, Server};

/// Timings that make a compact scenario fast: short leases so a killed
/// worker's partitions, sweep lease and claims are taken over in seconds.
pub const FAST: &[&str] = &[
    "--sweep-every",
    "1",
    "--relay-lease",
    "2",
    "--claim-lease",
    "2",
    "--key-lease",
    "3",
];

/// Starts `invoicing serve` named `instance` with [`FAST`] timings and `extra` flags.
pub fn serve(env: &TestEnv, instance: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--instance", instance];
    args.extend_from_slice(FAST);
    args.extend_from_slice(extra);
    Server::start(env, &args)
}

/// SIGKILL: the process dies at once, mid-whatever it was doing.
pub async fn kill9(server: &mut Server) {
    server.child.start_kill().expect("SIGKILL the worker");
    let _ = server.child.wait().await;
}

/// Sends `signal` (e.g. `-STOP`, `-CONT`) to the worker.
pub fn signal(server: &Server, signal: &str) {
    let pid = server.child.id().expect("the worker is running");
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid} failed");
}

/// `invoicing ship --orders n --legacy-fraction legacy`, asserting success.
pub async fn ship(env: &TestEnv, orders: u64, legacy: f64) {
    let out = run(
        env,
        &[
            "ship",
            "--orders",
            &orders.to_string(),
            "--legacy-fraction",
            &legacy.to_string(),
        ],
    )
    .await;
    assert!(out.status.success(), "ship failed: {out:?}");
}

/// Polls `check --json` until it exits 0; panics after `within` with the last
/// report and every worker's log.
pub async fn converged(env: &TestEnv, within: Duration, servers: &[&Server]) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let (report, status) = check_json(env).await;
        if status.success() {
            assert_eq!(report["converged"], true, "{report}");
            assert_eq!(report["duplicates"], 0, "{report}");
            assert_eq!(report["orphan_invoices"], 0, "{report}");
            assert_eq!(report["invoices"], report["orders"], "{report}");
            // Effects, not rows: the billing service charged each order once.
            let billing = &report["billing"];
            assert_eq!(billing["charges"], report["orders"], "{report}");
            assert_eq!(billing["charged_twice"], serde_json::json!([]), "{report}");
            assert_eq!(billing["overlapping_calls"], 0, "{report}");
            return report;
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = servers.iter().map(|s| s.log()).collect();
            panic!(
                "not converged within {within:?}: {report}\nworker logs:\n{}",
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Orders in `state` now.
pub async fn in_state(env: &TestEnv, state: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM invoicing.orders WHERE state = $1")
        .bind(state)
        .fetch_one(&env.pool)
        .await
        .expect("count orders")
}

/// Waits until every outbox event is on the stream, then asserts each is
/// there exactly once (replays, which carry `Converge-Replay`, aside) and
/// nothing else the relay sent is. Returns the messages.
pub async fn stream_exactly_once(env: &TestEnv, within: Duration) -> Vec<StreamMessage> {
    let events: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT event_id FROM converge.outbox")
        .fetch_all(&env.pool)
        .await
        .expect("read the outbox");
    let deadline = Instant::now() + within;
    loop {
        let messages = env.read_stream(events.len(), Duration::from_secs(1)).await;
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for m in messages
            .iter()
            .filter(|m| !m.headers.contains_key("Converge-Replay"))
        {
            *seen.entry(m.msg_id.as_str()).or_default() += 1;
        }
        let missing = events
            .iter()
            .filter(|e| !seen.contains_key(e.to_string().as_str()))
            .count();
        if missing > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        }
        assert_eq!(
            missing,
            0,
            "{missing} of {} events never reached the stream",
            events.len()
        );
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "events on the stream more than once: {twice:?}"
        );
        assert_eq!(
            seen.len(),
            events.len(),
            "the stream holds events that are not in the outbox"
        );
        return messages;
    }
}

/// Keeps restarting a worker whose process died (e.g. `--crash-after-claim`)
/// until `stop` is set, counting the crashes.
pub struct Supervisor {
    pub crashes: usize,
    pub server: Server,
    instance: String,
    extra: Vec<String>,
}

impl Supervisor {
    /// Starts the first process.
    pub fn start(env: &TestEnv, instance: &str, extra: &[&str]) -> Supervisor {
        Supervisor {
            crashes: 0,
            server: serve(env, instance, extra),
            instance: instance.to_owned(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Restarts the worker if it died since the last call.
    pub fn tend(&mut self, env: &TestEnv) {
        if let Ok(Some(_)) = self.server.child.try_wait() {
            self.crashes += 1;
            let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
            self.server = serve(env, &self.instance, &extra);
        }
    }
}
