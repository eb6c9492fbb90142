//! `converge projections` against a worker running a projection, each part
//! as its least-privileged role: the application saves event-sourced
//! commands as `app`, the worker projects and rebuilds as `worker`, the
//! operator lists, rebuilds (waiting for the swap) and forgets, the viewer
//! reads and is refused the rest.

mod common;

use std::time::Duration;

use common::{converge_with, pool_as, url_as, Run};
use converge::eventsourcing::{ProjectionRunner, Repository, RunnerConfig};
use converge_tests::accounts::{self, Account, AccountCommand, Balances};
use converge_tests::{RoleGuard, TestEnv};
async fn as_role(env: &TestEnv, user: &str, args: &[&str]) -> Run {
    converge_with(url_as(env, user), env.nats_url().to_owned(), args).await
}

/// A role with the grants `converge grants --role ROLE` prints.
async fn role(env: &TestEnv, converge_role: &str) -> RoleGuard {
    let guard = RoleGuard::new(env, converge_role).await;
    let printed = common::converge(
        env,
        &["grants", "--role", converge_role, "--to", &guard.name],
    )
    .await
    .expect(0);
    sqlx::raw_sql(&printed.stdout)
        .execute(&env.pool)
        .await
        .unwrap_or_else(|e| panic!("the grants of {converge_role} apply ({e})"));
    guard
}

#[tokio::test(flavor = "multi_thread")]
async fn operators_rebuild_and_forget_projections_viewers_only_look() {
    let env = TestEnv::new().await;
    let (app, worker) = (role(&env, "app").await, role(&env, "worker").await);
    let (operator, viewer) = (role(&env, "operator").await, role(&env, "viewer").await);
    accounts::create_tables(&env.pool).await;
    // The worker writes the read model and may create its rebuild copies
    // beside it (it need not own it); the viewer reads it, through rebuilds.
    for sql in [
        format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON proj.balances, proj.applied TO {}",
            worker.name
        ),
        format!("GRANT USAGE, CREATE ON SCHEMA proj TO {}", worker.name),
        format!("GRANT USAGE ON SCHEMA proj TO {}", viewer.name),
        format!("GRANT SELECT ON proj.balances TO {}", viewer.name),
    ] {
        sqlx::query(&sql).execute(&env.pool).await.unwrap();
    }

    // The application, as `app`: an event-sourced account (150 commands:
    // snapshots too).
    let app_pool = pool_as(&env, &app.name).await;
    let accounts_repo = Repository::<Account>::builder(app_pool.clone())
        .start()
        .await
        .expect("a repository starts with the app role's grants");
    accounts_repo
        .execute("a", &AccountCommand::Open)
        .await
        .unwrap();
    for _ in 0..150 {
        accounts_repo
            .execute("a", &AccountCommand::Deposit(1))
            .await
            .unwrap();
    }
    assert_eq!(
        accounts_repo
            .load(&app_pool, "a")
            .await
            .unwrap()
            .snapshot_version,
        100
    );

    // The worker, as `worker`.
    let worker_pool = pool_as(&env, &worker.name).await;
    let mut config = RunnerConfig::default();
    config.instance_name = "w1".into();
    let runner = ProjectionRunner::new(worker_pool.clone(), config)
        .projection(Balances::shared())
        .start()
        .await
        .expect("projections run with the worker role's grants");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while accounts::projected(&env.pool).await != [("a".to_owned(), 150, 151)] {
        assert!(tokio::time::Instant::now() < deadline, "never projected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The viewer looks, and may not act.
    let list = as_role(&env, &viewer.name, &["projections", "list"])
        .await
        .expect(0);
    assert!(
        list.stdout.contains("balances") && list.stdout.contains("async"),
        "{list:?}"
    );
    let json = as_role(&env, &viewer.name, &["-o", "json", "projections", "list"])
        .await
        .expect(0)
        .json();
    assert_eq!(json[0]["name"], "balances");
    assert_eq!(json[0]["applied"], 151);
    let refused = as_role(&env, &viewer.name, &["projections", "rebuild", "balances"])
        .await
        .expect(77);
    assert!(refused.stderr.contains("converge grants"), "{refused:?}");
    let status = as_role(&env, &viewer.name, &["status"]).await.expect(0);
    assert!(status.stdout.contains("PROJECTIONS"), "{status:?}");

    // The operator rebuilds, waiting for the worker's swap.
    let unknown = as_role(&env, &operator.name, &["projections", "rebuild", "nope"])
        .await
        .expect(2);
    assert!(unknown.stderr.contains("balances"), "{unknown:?}");
    let rebuilt = as_role(
        &env,
        &operator.name,
        &[
            "--actor",
            "alice",
            "projections",
            "rebuild",
            "balances",
            "--wait",
        ],
    )
    .await
    .expect(0);
    assert!(
        rebuilt.stdout.contains("rebuilt: 151 events"),
        "{rebuilt:?}"
    );
    let entries: Vec<(String, String, Option<String>, serde_json::Value)> = sqlx::query_as(
        "SELECT actor, action, outcome, details FROM converge.audit \
         WHERE action = 'projection.rebuild' ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(entries.len(), 2, "{entries:?}");
    let (cli, worker_entry) = (&entries[0], &entries[1]);
    assert_eq!((cli.0.as_str(), cli.2.as_deref()), ("alice", Some("ok")));
    assert_eq!(
        (worker_entry.0.as_str(), worker_entry.2.as_deref()),
        ("alice", Some("ok"))
    );
    assert_eq!(worker_entry.3["recorded_by"], "worker");
    assert_eq!(worker_entry.3["events"], 151);
    let status = as_role(&env, &viewer.name, &["projections", "status", "balances"])
        .await
        .expect(0);
    assert!(status.stdout.contains("generation 2"), "{status:?}");
    let reads: i64 = sqlx::query_scalar("SELECT count(*) FROM proj.balances")
        .fetch_one(&pool_as(&env, &viewer.name).await)
        .await
        .expect("the viewer still reads the rebuilt table");
    assert_eq!(reads, 1);
    runner.shutdown().await;

    // With no worker running it, a waiting rebuild times out with a JSON
    // outcome, and stays requested.
    let timed_out = as_role(
        &env,
        &operator.name,
        &[
            "-o",
            "json",
            "projections",
            "rebuild",
            "balances",
            "--wait",
            "--timeout",
            "1",
        ],
    )
    .await
    .expect(1);
    assert_eq!(timed_out.json()["outcome"], "timed_out", "{timed_out:?}");
    let busy = as_role(
        &env,
        &operator.name,
        &["projections", "rebuild", "balances"],
    )
    .await
    .expect(1);
    assert!(busy.stderr.contains("already being rebuilt"), "{busy:?}");
    // Cancelled, a rebuild nobody took ends at once for whoever waits.
    as_role(
        &env,
        &viewer.name,
        &["projections", "rebuild", "balances", "--cancel"],
    )
    .await
    .expect(77);
    as_role(
        &env,
        &operator.name,
        &[
            "--actor",
            "bob",
            "projections",
            "rebuild",
            "balances",
            "--cancel",
        ],
    )
    .await
    .expect(0);
    let waiting = {
        let (url, nats) = (url_as(&env, &operator.name), env.nats_url().to_owned());
        tokio::spawn(async move {
            converge_with(url, nats, &["projections", "rebuild", "balances", "--wait"]).await
        })
    };
    let requested = || async {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT rebuild_state FROM converge.projections WHERE name = 'balances'",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while requested().await.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "never requested");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    as_role(
        &env,
        &operator.name,
        &[
            "--actor",
            "bob",
            "projections",
            "rebuild",
            "balances",
            "--cancel",
        ],
    )
    .await
    .expect(0);
    let ended = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting CLI sees the cancellation, not its 600 s timeout")
        .unwrap()
        .expect(1);
    assert!(
        ended
            .stderr
            .contains("ended without a worker finishing it: cancelled by bob"),
        "{ended:?}"
    );
    let again = as_role(
        &env,
        &operator.name,
        &["projections", "rebuild", "balances", "--cancel"],
    )
    .await
    .expect(1);
    assert!(
        again
            .stderr
            .contains("no rebuild of balances is requested or under way"),
        "{again:?}"
    );

    // Forgetting needs --yes, and leaves the tables.
    let unsure = as_role(&env, &operator.name, &["projections", "forget", "balances"])
        .await
        .expect(2);
    assert!(unsure.stderr.contains("--yes"), "{unsure:?}");
    as_role(
        &env,
        &operator.name,
        &["projections", "forget", "balances", "--yes"],
    )
    .await
    .expect(0);
    let left = as_role(&env, &viewer.name, &["projections", "list"])
        .await
        .expect(0);
    assert!(left.stdout.contains("no projections"), "{left:?}");
    assert_eq!(accounts::projected(&env.pool).await.len(), 1);
}
