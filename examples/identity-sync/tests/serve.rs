//! `identity-sync serve` runs until SIGTERM, then exits 0.

use std::process::Stdio;
use std::time::Duration;

use converge_tests::TestEnv;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_stops_cleanly_on_sigterm() {
    let env = TestEnv::new().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_identity-sync"))
        .arg("serve")
        .env("DATABASE_URL", env.database_url())
        .env("NATS_URL", env.nats_url())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start identity-sync serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("serve announces itself within 30 s")
        .unwrap()
        .expect("a line on stdout");
    assert!(
        ready.starts_with("serving: sweep `identity-sync`"),
        "{ready}"
    );
    assert!(ready.contains("0 */5 22-23,0-5 * * *"), "{ready}");

    // The sweep is registered with its schedule planned.
    let planned: Option<chrono::DateTime<chrono::Utc>> = tokio::time::timeout(
        Duration::from_secs(10),
        async {
            loop {
                let at: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
                    "SELECT next_fire_at FROM converge.sweep_schedules WHERE sweep = 'identity-sync'",
                )
                .fetch_optional(&env.pool)
                .await
                .unwrap()
                .flatten();
                if at.is_some() {
                    return at;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await
    .expect("the schedule is planned within 10 s");
    let expected =
        identity_sync::sweep::next_runs(chrono::Utc::now() - chrono::Duration::minutes(10), 3);
    assert!(
        expected.contains(&planned.unwrap()),
        "{planned:?} not in {expected:?}"
    );

    // The worker is registered for operators, with its sweep.
    let registered: Vec<(String, Vec<String>)> =
        sqlx::query_as("SELECT application, sweeps FROM converge.workers")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        registered,
        [("identity-sync".to_owned(), vec!["identity-sync".to_owned()])]
    );

    let pid = child.id().expect("running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("serve exits within 10 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "exit {status:?}");
    let rest = lines.next_line().await.unwrap();
    assert_eq!(rest.as_deref(), Some("stopped"));
    let workers: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.workers")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(workers, 0, "a clean stop deregisters the worker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_nats_names_what_to_start() {
    let env = TestEnv::new().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_identity-sync"))
        .arg("serve")
        .env("DATABASE_URL", env.database_url())
        .env("NATS_URL", "nats://127.0.0.1:1")
        .output()
        .await
        .expect("run identity-sync serve");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot connect to NATS at nats://127.0.0.1:1"),
        "{stderr}"
    );
    assert!(stderr.contains("nats-server -js"), "{stderr}");
}
