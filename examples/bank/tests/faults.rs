//! Workers as processes that die: one aborts right after a debit commits in
//! a third of its runs (a crash between the saga's two steps) and is started
//! again each time; another is SIGKILLed mid-run and started again. Every
//! transfer still ends CREDITED or REFUNDED, with one debit and one credit or
//! refund each, and the books balance.

use std::process::Stdio;
use std::time::{Duration, Instant};

use converge_tests::TestEnv;

fn bank(env: &TestEnv) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_bank"));
    cmd.args([
        "--stream",
        &env.stream,
        "--app",
        &format!("bank-{}", env.prefix),
    ])
    .env("DATABASE_URL", env.database_url())
    .env("NATS_URL", env.nats_url())
    .env("RUST_LOG", "warn")
    .stdin(Stdio::null());
    converge_tests::clear_nats_client_env(&mut cmd);
    cmd
}

async fn run(env: &TestEnv, args: &[&str]) -> (bool, String) {
    let out = bank(env).args(args).output().await.expect("run bank");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn serve(env: &TestEnv, instance: &str, extra: &[&str]) -> tokio::process::Child {
    bank(env)
        .args([
            "serve",
            "--instance",
            instance,
            "--sweep-every",
            "1",
            "--relay-lease",
            "2",
            "--key-lease",
            "3",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start bank serve")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_converge_through_crashes_between_debit_and_credit() {
    let env = TestEnv::new().await;
    let (ok, out) = run(&env, &["open", "--accounts", "20", "--frozen-every", "7"]).await;
    assert!(ok, "{out}");
    let crashing = ["--stop-after-debit", "0.3", "--abort"];
    let mut a = serve(&env, "crashing", &crashing);
    let mut b = serve(&env, "killed", &[]);
    let (ok, out) = run(&env, &["transfer", "--count", "300", "--accounts", "20"]).await;
    assert!(ok, "{out}");
    let started = Instant::now();
    let (mut crashes, mut killed) = (0, false);
    loop {
        if let Ok(Some(_)) = a.try_wait() {
            crashes += 1;
            a = serve(&env, "crashing", &crashing);
        }
        if !killed && started.elapsed() > Duration::from_secs(2) {
            b.start_kill().expect("SIGKILL");
            let _ = b.wait().await;
            b = serve(&env, "killed", &[]);
            killed = true;
        }
        let (converged, report) = run(&env, &["check"]).await;
        if converged {
            assert!(report.contains("duplicates: 0"), "{report}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "not converged after {crashes} crashes:\n{report}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "converged after {crashes} crashes and a SIGKILL in {:?}",
        started.elapsed()
    );
    assert!(crashes > 0, "the crashing worker never crashed");
    let _ = a.start_kill();
    let _ = b.start_kill();
}
