//! `converge::transaction`: a business transaction that lost a race for an
//! aggregate (another transaction appended to it first) is run again, so
//! every caller's write lands, instead of each application copying a retry
//! loop — against real Postgres.

use std::sync::atomic::{AtomicU32, Ordering};

use converge::{transaction, AppendOptions, Outbox, OutboxError, TransactionRetry};
use converge_tests::{AccountChanged, ProxyMode, TcpProxy, TestEnv};

const WRITERS: usize = 8;

/// One writer's transaction, the optimistic pattern of an aggregate: read
/// its version, decide (a moment, so the writers overlap), append expecting
/// that version.
async fn write(tx: &mut sqlx::PgTransaction<'static>) -> Result<i64, OutboxError> {
    let outbox = Outbox::default();
    let seen = Outbox::version(&mut **tx, "account", "shared").await?;
    sqlx::query("SELECT pg_sleep(0.05)")
        .execute(&mut **tx)
        .await?;
    let appended = outbox
        .append_with(
            tx,
            &AccountChanged::new("shared"),
            &AppendOptions::expect_version(seen),
        )
        .await?;
    Ok(appended.version)
}

#[tokio::test(flavor = "multi_thread")]
async fn writers_racing_for_one_aggregate_all_land_with_the_helper() {
    let env = TestEnv::new().await;

    // Without the helper, the race loses writes: at least one writer fails
    // with a retryable conflict (this is what the helper is for).
    let mut raw = Vec::new();
    for _ in 0..WRITERS {
        let pool = env.pool.clone();
        raw.push(tokio::spawn(async move {
            let mut tx = pool.begin().await?;
            let version = write(&mut tx).await?;
            tx.commit().await?;
            Ok::<i64, OutboxError>(version)
        }));
    }
    let mut lost = 0;
    for task in raw {
        match task.await.unwrap() {
            Ok(_) => {}
            Err(e) => {
                assert!(e.is_retryable(), "a race is retryable: {e}");
                lost += 1;
            }
        }
    }
    assert!(lost > 0, "the writers did not race; the test shows nothing");
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.outbox")
        .fetch_one(&env.pool)
        .await
        .unwrap();

    // With it, every writer's event lands, each in its own version.
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let pool = env.pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut retry = TransactionRetry::default();
            retry.max_attempts = 50;
            transaction(&pool, retry, |tx| Box::pin(write(tx))).await
        }));
    }
    let mut versions = Vec::new();
    for task in tasks {
        versions.push(
            task.await
                .unwrap()
                .expect("the helper retries the race away"),
        );
    }
    versions.sort_unstable();
    let first = before + 1;
    assert_eq!(
        versions,
        (first..first + WRITERS as i64).collect::<Vec<_>>(),
        "one version per writer"
    );

    // A permanent error is returned at once, not retried.
    let runs = AtomicU32::new(0);
    let e = transaction(&env.pool, TransactionRetry::default(), |tx| {
        runs.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            Outbox::default()
                .append(tx, &AccountChanged::new(""))
                .await
                .map(|a| a.version)
        })
    })
    .await
    .unwrap_err();
    assert!(!e.is_retryable(), "{e}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "a permanent error is not retried"
    );
}

/// A COMMIT whose answer is lost (the connection breaks) may have committed:
/// the helper returns the error and does not run the transaction again, which
/// could write twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_commit_without_an_answer_is_not_run_again() {
    let env = TestEnv::new().await;
    sqlx::query("CREATE TABLE payments (id bigserial PRIMARY KEY)")
        .execute(&env.pool)
        .await
        .unwrap();
    let opts = env.connect_options();
    let proxy = TcpProxy::start(&format!("{}:{}", opts.get_host(), opts.get_port())).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(
            opts.clone()
                .host("127.0.0.1")
                .port(proxy.port())
                // A reconnect through the cut proxy fails as I/O (retryable), not TLS.
                .ssl_mode(sqlx::postgres::PgSslMode::Disable),
        )
        .await
        .unwrap();
    let runs = AtomicU32::new(0);
    let mut retry = TransactionRetry::default();
    retry.max_attempts = 10;
    let commit = transaction(&pool, retry, |tx| {
        let run = runs.fetch_add(1, Ordering::SeqCst);
        let proxy = &proxy;
        Box::pin(async move {
            sqlx::query("INSERT INTO payments DEFAULT VALUES")
                .execute(&mut **tx)
                .await?;
            if run == 0 {
                proxy.set(ProxyMode::Paused); // the COMMIT is held, then the line is cut
            }
            Ok::<_, OutboxError>(())
        })
    });
    let cut = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        proxy.set(ProxyMode::Cut);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        proxy.set(ProxyMode::Open); // a second run would now go through
    };
    let (result, ()) = tokio::join!(commit, cut);
    let e = result.unwrap_err();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "run again after a lost COMMIT: {e}"
    );
    assert!(matches!(e, OutboxError::CommitUnknown(_)), "{e}");
    assert!(
        !e.is_retryable(),
        "a caller's own retry would write twice: {e}"
    );
}
