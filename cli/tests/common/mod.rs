//! Running the built `converge` binary against a test's own database.
#![allow(dead_code, unreachable_pub)]

pub mod orders;

use std::process::Stdio;

use converge_tests::TestEnv;

/// What a run of the binary printed and returned.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Parses stdout as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// Asserts the exit code, showing the output when it differs.
    #[track_caller]
    pub fn expect(self, code: i32) -> Run {
        assert_eq!(self.code, code, "unexpected exit code: {self:#?}");
        self
    }
}

/// Runs `converge args…` with DATABASE_URL / NATS_URL of `env` and USER=tester.
pub async fn converge(env: &TestEnv, args: &[&str]) -> Run {
    converge_with(env.database_url(), env.nats_url().to_owned(), args).await
}

/// Runs `converge args…` against the given services.
pub async fn converge_with(database_url: String, nats_url: String, args: &[&str]) -> Run {
    converge_with_env(database_url, nats_url, &[], args).await
}

/// Runs `converge args…` against the given services, with `vars` set too.
pub async fn converge_with_env(
    database_url: String,
    nats_url: String,
    vars: &[(&str, &str)],
    args: &[&str],
) -> Run {
    let out = command(&database_url, &nats_url)
        .envs(vars.iter().copied())
        .args(args)
        .output()
        .await
        .expect("run the converge binary");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The `converge` binary with DATABASE_URL and NATS_URL, USER=tester, no
/// other NATS setting or CONVERGE_APP from the developer's environment, and
/// no stdin.
pub fn command(database_url: &str, nats_url: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_converge"));
    converge_tests::clear_nats_client_env(&mut cmd)
        .env("DATABASE_URL", database_url)
        .env("NATS_URL", nats_url)
        .env_remove("CONVERGE_APP")
        .env("USER", "tester")
        .stdin(Stdio::null());
    cmd
}

/// `env`'s database URL with `user` instead of its user (trust auth).
pub fn url_as(env: &TestEnv, user: &str) -> String {
    let url = env.database_url();
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let rest = rest.split_once('@').map_or(rest, |(_, r)| r);
    format!("{scheme}://{user}@{rest}")
}

/// A pool connected to `env`'s database as `user`.
pub async fn pool_as(env: &TestEnv, user: &str) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect_with(env.connect_options().username(user))
        .await
        .expect("connect as the role")
}

/// A unique application name for one test.
pub fn app() -> String {
    format!("cli{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

/// The latest audit row of an operator action: (actor, action, target, reason, details, outcome).
pub async fn last_audit(
    env: &TestEnv,
) -> (
    String,
    String,
    String,
    Option<String>,
    serde_json::Value,
    Option<String>,
) {
    sqlx::query_as(
        // Operators' actions: not the automatic resolution of a dead letter
        // whose key a run converged (audited too, by `converge`).
        "SELECT actor, action, target, reason, details, outcome FROM converge.audit \
         WHERE action <> 'dead_letter.resolve' AND details->>'recorded_by' IS DISTINCT FROM 'worker' \
         ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&env.pool)
    .await
    .expect("an audit row")
}

/// Number of audit rows the CLI wrote (not the workers' own).
pub async fn audit_rows(env: &TestEnv) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM converge.audit \
         WHERE details->>'recorded_by' IS DISTINCT FROM 'worker'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

/// Registers a live worker row of `app` that runs `sweeps` and registered
/// `reconcilers` (no process behind it: the test answers, or nobody does).
pub async fn register_worker(env: &TestEnv, app: &str, sweeps: &[&str], reconcilers: &[&str]) {
    sqlx::query(
        "INSERT INTO converge.workers (instance, application, sweeps, reconcilers, control_subject) \
         VALUES ($1, $2, $3, $4, 'converge.control.' || $2)",
    )
    .bind(format!("{app}-fake"))
    .bind(app)
    .bind(sweeps)
    .bind(reconcilers)
    .execute(&env.pool)
    .await
    .expect("register a worker row");
}

/// Starts `converge args…` (as [`converge`]) without waiting for it.
pub fn spawn_converge(env: &TestEnv, args: &[&str]) -> tokio::process::Child {
    command(&env.database_url(), env.nats_url())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the converge binary")
}

/// Waits for a started binary's end.
pub async fn finish(child: tokio::process::Child) -> Run {
    let out = child.wait_with_output().await.expect("converge ends");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Sorted ids as the CLI names them in audit targets: `1,2,3`.
pub fn id_list(ids: &[i64]) -> String {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}
