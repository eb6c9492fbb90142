//! The control plane on NATS's own authorization: a private `nats-server`
//! configured with the blocks `converge nats-permissions` prints. A real
//! worker runs as the worker user; the operator's action works, the viewer's
//! is refused with a clear error, and no other client can join the workers'
//! queue group or answer on the operators' inboxes.

mod common;

use std::time::Duration;

use common::orders::{invoicing_worker, ship, wait_invoiced};
use common::{app, converge_with, converge_with_env, Run};
use converge::control::{inbox_prefix, NatsRole, CONTROL_QUEUE_GROUP};
use converge::nats::{NatsConnect, Secret};
use converge_tests::{NatsServer, TestEnv};
use futures::StreamExt;

const PASSWORD: &str = "pw-f0r-the-test";

/// The `permissions` block the CLI prints for `role`.
async fn block(application: &str, role: &str, stream: &str, prefix: &str) -> String {
    let printed = converge_with(
        "postgres://unused@127.0.0.1:1/unused".into(),
        "nats://127.0.0.1:1".into(),
        &[
            "--app",
            application,
            "nats-permissions",
            "--role",
            role,
            "--stream",
            stream,
            "--subject-prefix",
            prefix,
        ],
    )
    .await;
    assert_eq!(printed.code, 0, "{printed:?}");
    printed.stdout
}

/// A connection as `user`, with `role`'s inbox prefix.
fn as_user(server: &NatsServer, application: &str, user: &str, role: NatsRole) -> NatsConnect {
    let mut c = NatsConnect::new(server.url());
    c.user = Some(user.into());
    c.password = Some(Secret::new(PASSWORD));
    c.inbox_prefix = Some(inbox_prefix(application, role));
    c
}

/// Runs the CLI as NATS user `user` with `role`'s inbox prefix.
async fn cli(env: &TestEnv, user: &str, prefix: &str, args: &[&str]) -> Run {
    let mut all = vec!["--user", user, "--inbox-prefix", prefix];
    all.extend_from_slice(args);
    converge_with_env(
        env.database_url(),
        env.nats_url().to_owned(),
        &[("NATS_PASSWORD", PASSWORD)],
        &all,
    )
    .await
}

/// Waits until `c`'s connection reports a permissions violation containing `what`.
async fn refused(c: &NatsConnect, what: &str) -> String {
    for _ in 0..100 {
        if let Some(text) = c.last_refusal().filter(|t| t.contains(what)) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "no permissions violation for {what:?}; last: {:?}",
        c.last_refusal()
    );
}

#[tokio::test]
async fn only_operators_act_only_workers_answer_and_viewers_read() {
    let application = app();
    let (stream, prefix) = {
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..10];
        (format!("P_{tag}"), format!("p{tag}"))
    };
    let mut users = String::new();
    for role in ["worker", "operator", "viewer"] {
        users += &format!(
            "{{ user: {role}, password: \"{PASSWORD}\"\n{}\n}}\n",
            block(&application, role, &stream, &prefix).await
        );
    }
    // Another application on the same account, with permissions of its own.
    users += &format!(
        "{{ user: foreign, password: \"{PASSWORD}\", permissions: {{ \
           publish: {{ allow: [\"billing.>\"] }}, \
           subscribe: {{ allow: [\"billing.>\", \"_INBOX.>\"] }} }} }}\n"
    );
    let server = NatsServer::start_with_config(&format!(
        "no_auth_user: admin\nauthorization {{ users = [\n{{ user: admin, password: \"{PASSWORD}\" }}\n{users}] }}\n"
    ))
    .await;
    let mut env = TestEnv::with_nats_url(&server.url()).await;
    env.stream = stream.clone();
    env.prefix = prefix.clone();
    sqlx::query("CREATE TABLE orders (id bigint PRIMARY KEY, state text NOT NULL)")
        .execute(&env.pool)
        .await
        .unwrap();
    ship(&env.pool, 1..=3).await;

    // A worker as the worker user: relay, consumer, sweep, control plane.
    let worker_nats = as_user(&server, &application, "worker", NatsRole::Worker);
    let nats = worker_nats
        .connect()
        .await
        .expect("the worker user connects");
    let worker = invoicing_worker(&env, env.pool.clone(), nats, &application)
        .await
        .expect("a worker starts with the worker's NATS permissions");
    if let Err(invoiced) = wait_invoiced(&env, 3).await {
        panic!(
            "events relayed and consumed under the worker's permissions: {invoiced} of 3 \
             invoiced (last refusal: {:?})",
            worker_nats.last_refusal()
        );
    }
    assert_eq!(
        worker_nats.last_refusal(),
        None,
        "the worker was refused nothing"
    );

    // Clients that must not join the workers' queue group or answer operators.
    let control = format!("converge.control.{application}.>");
    let operator_inbox = format!("{}.forged", inbox_prefix(&application, NatsRole::Operator));
    let mut intruders = Vec::new();
    for (user, role) in [
        ("foreign", NatsRole::Viewer),
        ("viewer", NatsRole::Viewer),
        ("operator", NatsRole::Operator),
    ] {
        let c = as_user(&server, &application, user, role);
        let client = c.connect().await.unwrap();
        let mut joined = client
            .queue_subscribe(control.clone(), CONTROL_QUEUE_GROUP.into())
            .await
            .unwrap();
        client.flush().await.unwrap();
        let text = refused(&c, "Subscription to").await;
        assert!(text.contains(&control), "{user}: {text}");
        intruders.push((user, c, client, async move { joined.next().await }));
    }
    // A worker user may listen only in the queue group, not beside it.
    let snoop = as_user(&server, &application, "worker", NatsRole::Worker);
    let snooper = snoop.connect().await.unwrap();
    let _snooped = snooper.subscribe(control.clone()).await.unwrap();
    snooper.flush().await.unwrap();
    refused(&snoop, "Subscription to").await;

    // The operator's action reaches the worker and its answer comes back.
    let operator_prefix = inbox_prefix(&application, NatsRole::Operator);
    let mut answers = env
        .nats
        .subscribe(format!("{operator_prefix}.>"))
        .await
        .unwrap();
    env.nats.flush().await.unwrap();
    let ran = cli(
        &env,
        "operator",
        &operator_prefix,
        &["--app", &application, "sweep", "run", "invoices", "--wait"],
    )
    .await;
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(ran.stdout.contains("completed"), "{ran:?}");

    // Nobody else answers on the operators' inboxes: a forged reply is
    // refused by the server and never delivered.
    for (user, c, client, _) in &intruders {
        if *user == "operator" {
            continue;
        }
        client
            .publish(
                operator_inbox.clone(),
                "{\"reply\":\"accepted\",\"instance\":\"evil\"}".into(),
            )
            .await
            .unwrap();
        client.flush().await.unwrap();
        let text = refused(c, "Publish to").await;
        assert!(text.contains(&operator_inbox), "{user}: {text}");
    }
    let forged = tokio::time::timeout(Duration::from_millis(500), async {
        while let Some(m) = answers.next().await {
            if m.subject.as_str() == operator_inbox {
                return Some(m);
            }
        }
        None
    })
    .await;
    assert!(
        forged.is_err(),
        "a forged reply reached the operators' inbox: {forged:?}"
    );
    for (user, _, _, joined) in intruders {
        let got = tokio::time::timeout(Duration::from_millis(200), joined).await;
        assert!(got.is_err(), "{user} received a control request: {got:?}");
    }

    // The viewer reads, and its action is refused, naming why.
    let viewer_prefix = inbox_prefix(&application, NatsRole::Viewer);
    let status = cli(
        &env,
        "viewer",
        &viewer_prefix,
        &["--app", &application, "status"],
    )
    .await;
    assert_eq!(status.code, 0, "{status:?}");
    let denied = cli(
        &env,
        "viewer",
        &viewer_prefix,
        &["--app", &application, "sweep", "run", "invoices", "--wait"],
    )
    .await;
    assert_eq!(denied.code, 77, "{denied:?}");
    assert!(
        denied.stderr.contains("NATS refused")
            && denied.stderr.contains("only operators may")
            && denied.stderr.contains("converge nats-permissions"),
        "{denied:?}"
    );
    // Without its inbox prefix the viewer cannot even receive an answer.
    let no_prefix = cli(
        &env,
        "operator",
        "_INBOX",
        &[
            "--app",
            &application,
            "sweep",
            "run",
            "invoices",
            "--dry-run",
        ],
    )
    .await;
    assert_eq!(no_prefix.code, 77, "{no_prefix:?}");
    assert!(no_prefix.stderr.contains("--inbox-prefix"), "{no_prefix:?}");

    // The worker recorded the run it executed, with the claimed actor.
    let (actor, outcome, client): (String, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT actor, outcome, details->>'client' FROM converge.audit \
         WHERE action = 'sweep.run' AND details->>'recorded_by' = 'worker'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("one worker audit row for the operator's run");
    assert_eq!(actor, "tester");
    assert_eq!(outcome.as_deref(), Some("ok"));
    assert!(client.is_some_and(|c| c.starts_with("converge-cli")));

    // No secret in any output: the CLI's, `--json`, errors, the audit log and
    // the worker registry (the NATS password was in the environment of every
    // run; a PostgreSQL password in an unreachable URL).
    let json = cli(
        &env,
        "viewer",
        &viewer_prefix,
        &["--app", &application, "--json", "status"],
    )
    .await;
    assert_eq!(json.code, 0, "{json:?}");
    // The viewer's JetStream reads were allowed: each consumer has figures.
    let consumers = json.json()["consumers"].clone();
    let consumers = consumers.as_array().expect("consumers in the status");
    assert!(!consumers.is_empty(), "{json:?}");
    for c in consumers {
        assert!(c["error"].is_null() && c["pending"].is_u64(), "{c}");
    }
    let pg_secret = "pg-s3cret-in-url";
    let unreachable = converge_with(
        format!("postgres://someone:{pg_secret}@127.0.0.1:1/db"),
        env.nats_url().to_owned(),
        &["status"],
    )
    .await;
    assert_eq!(unreachable.code, 1, "{unreachable:?}");
    let stored: String = sqlx::query_scalar(
        "SELECT coalesce((SELECT string_agg(a::text, ' ') FROM converge.audit a), '') || \
                coalesce((SELECT string_agg(w::text, ' ') FROM converge.workers w), '')",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    for (what, text) in [
        ("sweep run", format!("{ran:?}")),
        ("status", format!("{status:?}")),
        ("status --json", format!("{json:?}")),
        ("refusal", format!("{denied:?}{no_prefix:?}")),
        ("unreachable", format!("{unreachable:?}")),
        ("audit and workers", stored),
    ] {
        assert!(
            !text.contains(PASSWORD) && !text.contains(pg_secret),
            "a secret in the {what} output: {text}"
        );
    }
    worker.shutdown().await.expect("worker stops");
}
