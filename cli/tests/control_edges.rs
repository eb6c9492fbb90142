//! The control plane's edges on the real NATS, with the test answering in a
//! worker's place (a worker that accepts and never finishes, one whose reply
//! is an error) or nobody answering: unknown names and absent workers caught
//! before sending, timeouts after `Accepted`, ctrl-c while waiting.

mod common;

use std::time::Duration;

use common::{audit_rows, converge, last_audit, register_worker};
use converge::control::{
    reconciler_subject, sweep_subject, ControlErrorKind, ControlReply, ControlRequest,
};
use converge_tests::TestEnv;
use futures::StreamExt;
use tokio::sync::mpsc;

/// Answers every request on `subject` with `replies`, in order, then keeps
/// quiet (as a worker still at work); hands over each request it got.
async fn respond(
    env: &TestEnv,
    subject: String,
    replies: Vec<ControlReply>,
) -> mpsc::UnboundedReceiver<ControlRequest> {
    let mut requests = env.nats.subscribe(subject).await.unwrap();
    env.nats.flush().await.unwrap();
    let nats = env.nats.clone();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = requests.next().await {
            let request: ControlRequest = serde_json::from_slice(&m.payload).unwrap();
            let _ = tx.send(request);
            let Some(inbox) = m.reply else { continue };
            for reply in &replies {
                let body = serde_json::to_vec(reply).unwrap();
                nats.publish(inbox.clone(), body.into()).await.unwrap();
            }
            nats.flush().await.unwrap();
        }
    });
    rx
}

fn accepted() -> Vec<ControlReply> {
    vec![ControlReply::Accepted {
        instance: "w-slow".into(),
    }]
}

async fn dead_letter(env: &TestEnv, reconciler: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO converge.dead_letters (reconciler, aggregate_key, path, error, permanent, attempts) \
         VALUES ($1, '1', 'event', 'boom', false, 1) RETURNING id",
    )
    .bind(reconciler)
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_names_and_absent_workers_are_caught_before_sending() {
    let env = TestEnv::new().await;
    let app = common::app();
    let billing = dead_letter(&env, "billing").await.to_string();

    // No live worker of the application at all.
    let run = converge(&env, &["sweep", "run", "invoices", "--app", &app])
        .await
        .expect(1);
    assert!(
        run.stderr
            .contains(&format!("no live worker of application \"{app}\"")),
        "{run:#?}"
    );

    register_worker(&env, &app, &["invoices"], &["invoicing"]).await;
    let run = converge(&env, &["sweep", "run", "nightly", "--app", &app])
        .await
        .expect(2);
    assert!(
        run.stderr.contains("runs sweep \"nightly\"")
            && run.stderr.contains("known sweeps: invoices"),
        "{run:#?}"
    );
    let run = converge(
        &env,
        &["sweep", "run", "nightly", "--dry-run", "--app", &app],
    )
    .await
    .expect(2);
    assert!(run.stderr.contains("known sweeps: invoices"), "{run:#?}");
    let old_run: i64 = sqlx::query_scalar(
        "INSERT INTO converge.sweep_runs (sweep, trigger, instance, lease_token) \
         VALUES ('retired', 'schedule', 'w0', 1) RETURNING id",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let run = converge(
        &env,
        &["sweep", "replay", &old_run.to_string(), "--app", &app],
    )
    .await
    .expect(2);
    assert!(
        run.stderr.contains("runs sweep \"retired\"")
            && run.stderr.contains("known sweeps: invoices"),
        "{run:#?}"
    );
    let run = converge(&env, &["dead-letters", "retry", &billing, "--app", &app])
        .await
        .expect(2);
    assert!(
        run.stderr.contains("runs reconciler \"billing\"")
            && run.stderr.contains("known reconcilers: invoicing"),
        "{run:#?}"
    );
    assert_eq!(
        audit_rows(&env).await,
        0,
        "nothing was sent, nothing audited"
    );

    // Registered, but nobody listens on the sweep's subject.
    let run = converge(&env, &["sweep", "run", "invoices", "--app", &app])
        .await
        .expect(1);
    assert!(
        run.stderr.contains(&format!(
            "no worker of application \"{app}\" answered on subject converge.control.{app}.sweep.invoices (nobody listens)"
        )),
        "{run:#?}"
    );
    let (_, action, _, _, details, outcome) = last_audit(&env).await;
    assert_eq!(
        (action.as_str(), outcome.as_deref()),
        ("sweep.run", Some("failed"))
    );
    assert!(details["error"].as_str().unwrap().contains("no worker"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_workers_error_reply_names_what_it_knows() {
    let env = TestEnv::new().await;
    let app = common::app();
    // The registry says the sweep exists; the worker that answers says not.
    register_worker(&env, &app, &["nightly"], &[]).await;
    let _requests = respond(
        &env,
        sweep_subject(&app, "nightly"),
        vec![ControlReply::Error {
            kind: ControlErrorKind::UnknownSweep,
            message: "no sweep named \"nightly\" in this application".into(),
            known: vec!["invoices".into()],
        }],
    )
    .await;
    let run = converge(&env, &["sweep", "run", "nightly", "--app", &app])
        .await
        .expect(2);
    assert!(
        run.stderr.contains("no sweep named \"nightly\"")
            && run.stderr.contains("known sweeps: invoices"),
        "{run:#?}"
    );
    let (_, _, _, _, _, outcome) = last_audit(&env).await;
    assert_eq!(outcome.as_deref(), Some("failed"));
}

#[tokio::test(flavor = "multi_thread")]
async fn silence_after_accepted_is_timed_out_and_names_the_worker() {
    let env = TestEnv::new().await;
    let app = common::app();
    register_worker(&env, &app, &["nightly"], &["billing"]).await;
    let mut sweep_requests = respond(&env, sweep_subject(&app, "nightly"), accepted()).await;
    let mut retry_requests = respond(&env, reconciler_subject(&app, "billing"), accepted()).await;

    let run = converge(
        &env,
        &[
            "sweep",
            "run",
            "nightly",
            "--wait",
            "--timeout",
            "1",
            "--app",
            &app,
        ],
    )
    .await
    .expect(1);
    assert!(
        run.stderr
            .contains("accepted by worker w-slow and goes on there")
            && run.stderr.contains("converge sweep history nightly"),
        "{run:#?}"
    );
    assert!(matches!(
        sweep_requests.try_recv().unwrap(),
        ControlRequest::SweepRun { sweep, .. } if sweep == "nightly"
    ));
    let (_, action, _, _, details, outcome) = last_audit(&env).await;
    assert_eq!(
        (action.as_str(), outcome.as_deref()),
        ("sweep.run", Some("timed_out"))
    );
    assert_eq!(details["accepted_by"], "w-slow");

    // A dead letter named twice is retried once.
    let id = dead_letter(&env, "billing").await;
    let run = converge(
        &env,
        &[
            "dead-letters",
            "retry",
            &id.to_string(),
            &id.to_string(),
            "--timeout",
            "1",
            "--app",
            &app,
        ],
    )
    .await
    .expect(1);
    assert!(
        run.stderr.contains("accepted by worker w-slow")
            && run.stderr.contains("converge dead-letters list"),
        "{run:#?}"
    );
    assert!(matches!(
        retry_requests.try_recv().unwrap(),
        ControlRequest::DeadLetterRetry { ids, .. } if ids == vec![id]
    ));
    let (_, action, target, _, details, outcome) = last_audit(&env).await;
    assert_eq!(
        (action.as_str(), outcome.as_deref()),
        ("dead_letter.retry", Some("timed_out"))
    );
    assert_eq!(target, format!("dead letters {id}"));
    assert_eq!(details["accepted_by"], "w-slow");
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_while_waiting_records_interrupted_and_exits_130() {
    let env = TestEnv::new().await;
    let app = common::app();
    register_worker(&env, &app, &["nightly"], &[]).await;
    let mut requests = respond(&env, sweep_subject(&app, "nightly"), accepted()).await;
    let child = common::spawn_converge(
        &env,
        &[
            "sweep",
            "run",
            "nightly",
            "--wait",
            "--timeout",
            "60",
            "--app",
            &app,
        ],
    );
    tokio::time::timeout(Duration::from_secs(20), requests.recv())
        .await
        .expect("the request within 20 s")
        .unwrap();
    // Let the CLI read `Accepted`, then press ctrl-c.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = child.id().expect("still running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let run = tokio::time::timeout(Duration::from_secs(20), common::finish(child))
        .await
        .expect("converge stops on ctrl-c")
        .expect(130);
    assert!(
        run.stderr.contains("the run goes on on worker w-slow"),
        "{run:#?}"
    );
    let (_, action, _, _, details, outcome) = last_audit(&env).await;
    assert_eq!(
        (action.as_str(), outcome.as_deref()),
        ("sweep.run", Some("interrupted"))
    );
    assert_eq!(details["accepted_by"], "w-slow");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_nats_credential_is_named_and_never_shown() {
    let env = TestEnv::new().await;
    let app = common::app();
    register_worker(&env, &app, &["invoices"], &[]).await;
    let server =
        converge_tests::NatsServer::start_with_config("authorization { token: \"r1ght-t0ken\" }")
            .await;
    // Several servers: the first answers nothing, the second refuses.
    let servers = format!("nats://127.0.0.1:1,{}", server.url());
    let out = common::command(&env.database_url(), &servers)
        .args(["sweep", "run", "invoices", "--app", &app])
        .env("NATS_TOKEN", "wr0ng-t0ken")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("refused the token"), "{stderr}");
    assert!(stderr.contains("NATS_TOKEN"), "{stderr}");
    assert!(!stderr.contains("wr0ng-t0ken"), "{stderr}");
}
