//! The reconciler through the sweep: failures given up on end FAILED through
//! the recover hook, successes SYNCED, changes captured by the trigger.

use std::time::Duration;

use converge::sweeper::{RunOutcome, RunSummary, SweepConfig, SweeperHandle, TriggerKind};
use converge_tests::TestEnv;
use identity_sync::api::{ApiConfig, IdentityApi, IdentityUser};
use identity_sync::reconciler::IdentitySync;
use identity_sync::schema;
use identity_sync::sweep::{self, SWEEP};

/// The production sweep with quick retries (3 attempts, 50 ms backoff) and no
/// minimum lease.
fn quick_config() -> SweepConfig {
    let mut config = sweep::sweep_config();
    config.retry.max_attempts = 3;
    config.retry.initial_backoff = Duration::from_millis(50);
    config.retry.max_backoff = Duration::from_millis(100);
    config.lease.lock_at_least_for = Duration::ZERO; // sweeps back to back
    config
}

async fn setup(fail_rate: f64) -> (TestEnv, IdentityApi, SweeperHandle) {
    let env = TestEnv::new().await;
    schema::migrate(&env.pool).await.unwrap();
    let api = IdentityApi::start(ApiConfig {
        fail_rate,
        ..ApiConfig::default()
    })
    .await
    .unwrap();
    let reconciler = IdentitySync::new(api.base_url()).unwrap();
    let sweeper = sweep::start_sweeper(env.pool.clone(), quick_config(), reconciler)
        .await
        .unwrap();
    (env, api, sweeper)
}

async fn sweep_now(sweeper: &SweeperHandle) -> RunSummary {
    match sweeper
        .run(SWEEP, None, TriggerKind::Programmatic)
        .await
        .unwrap()
    {
        RunOutcome::Ran(summary) => summary,
        other => panic!("the sweep did not run: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_keep_failing_end_failed_through_recover() {
    let (env, api, sweeper) = setup(1.0).await;
    let ids = schema::seed_users(&env.pool, 2).await.unwrap();
    let summary = sweep_now(&sweeper).await;
    assert_eq!(summary.counts.scanned, 2);
    assert_eq!(summary.counts.failed, 2);
    for id in &ids {
        let record = schema::changed_record(&env.pool, *id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.state, "FAILED", "{record:?}");
        assert_eq!(
            record.attempts, 3,
            "every attempt of the policy: {record:?}"
        );
        let error = record.last_error.unwrap_or_default();
        assert!(
            error.contains("503"),
            "the recover hook records the error: {error}"
        );
        assert!(api.user(*id).is_none());
    }
    let dead: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM converge.dead_letters WHERE reconciler = 'identity-sync'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(dead, 2);
    let stats = api.stats();
    assert_eq!(stats.unavailable, 6);
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
    assert!(stats.max_per_window <= 2, "{stats:?}");
    // FAILED is not a candidate: the next sweep leaves the records alone.
    assert_eq!(sweep_now(&sweeper).await.counts.scanned, 0);
    sweeper.shutdown().await.unwrap();
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_records_fail_at_once_and_valid_ones_sync_and_resync_on_change() {
    let (env, api, sweeper) = setup(0.0).await;
    let good = schema::insert_user(&env.pool, "ada@example.com", "Ada")
        .await
        .unwrap();
    let bad = schema::insert_user(&env.pool, "not-an-email", "Bob")
        .await
        .unwrap();
    let summary = sweep_now(&sweeper).await;
    assert_eq!((summary.counts.reconciled, summary.counts.failed), (1, 1));

    let record = schema::changed_record(&env.pool, bad)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.state, "FAILED");
    assert_eq!(record.attempts, 1, "a 422 is permanent: no retry");
    assert!(record.last_error.unwrap_or_default().contains("422"));
    let record = schema::changed_record(&env.pool, good)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((record.state.as_str(), record.version), ("SYNCED", 1));
    assert_eq!(
        api.user(good),
        Some(IdentityUser {
            email: "ada@example.com".into(),
            display_name: "Ada".into()
        })
    );

    // A change to either user makes its record PENDING again (the trigger).
    sqlx::query("UPDATE identity_sync.users SET email = 'ada@lovelace.example' WHERE id = $1")
        .bind(good)
        .execute(&env.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE identity_sync.users SET email = 'bob@example.com' WHERE id = $1")
        .bind(bad)
        .execute(&env.pool)
        .await
        .unwrap();
    // An update that changes nothing records nothing.
    sqlx::query("UPDATE identity_sync.users SET display_name = display_name")
        .execute(&env.pool)
        .await
        .unwrap();
    let counts = schema::state_counts(&env.pool).await.unwrap();
    assert_eq!(counts.pending, 2, "{counts:?}");
    let summary = sweep_now(&sweeper).await;
    assert_eq!((summary.counts.reconciled, summary.counts.failed), (2, 0));
    for id in [good, bad] {
        let record = schema::changed_record(&env.pool, id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((record.state.as_str(), record.version), ("SYNCED", 2));
    }
    assert_eq!(api.user(good).unwrap().email, "ada@lovelace.example");
    assert_eq!(api.user(bad).unwrap().email, "bob@example.com");
    assert_eq!(api.stats().rate_limited, 0);
    sweeper.shutdown().await.unwrap();
    api.shutdown().await;
}
