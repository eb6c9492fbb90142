//! The identity reconciler under `converge-testkit`, against the example's
//! local identity API: idempotent on every path, safe under concurrent runs
//! and redelivered events, and crash-safe at each of its steps (`"sent"`,
//! `"synced"`).
//!
//! What is asserted, and why: after every check the record is SYNCED and the
//! API stores exactly the user's current email and display name (each setup
//! renames the user, so a check only passes if its own `PUT` arrived). The
//! `PUT` replaces the whole user, so sending the same data twice is harmless —
//! and unavoidable after a crash at `"sent"` (the API has the user, the record
//! is still PENDING, the next run sends it again). What must not happen is a
//! `PUT` from a run that had nothing to do: the API's accepted requests must
//! equal the runs that passed `"sent"` (each made one `PUT`), with no 429 or
//! 503 in between.

use std::sync::Arc;

use converge_testkit::{BoxError, Kit, Report, RunOutcome};
use converge_tests::TestEnv;
use identity_sync::api::{ApiConfig, IdentityApi, IdentityUser};
use identity_sync::reconciler::{self, IdentitySync};
use identity_sync::schema;
use identity_sync::sweep::RECONCILER;
use sqlx::PgPool;

/// The user `key` just changed: a new display name, so the trigger marks the
/// record PENDING (version + 1, attempts 0) and the API's copy is stale.
async fn renamed(pool: PgPool, key: String) -> Result<(), BoxError> {
    let updated = sqlx::query(
        "UPDATE identity_sync.users \
         SET display_name = 'User ' || id || ' (' || gen_random_uuid() || ')', updated_at = now() \
         WHERE id = $1::bigint",
    )
    .bind(&key)
    .execute(&pool)
    .await?;
    if updated.rows_affected() != 1 {
        return Err(format!("user {key} does not exist: insert it before the checks").into());
    }
    Ok(())
}

/// Converged: the record is SYNCED and the API holds the user's current data.
async fn synced_to(api: &IdentityApi, pool: PgPool, key: String) -> Result<(), BoxError> {
    let (state, email, display_name): (String, String, String) = sqlx::query_as(
        "SELECT c.state, u.email, u.display_name \
         FROM identity_sync.changed_records c \
         JOIN identity_sync.users u ON u.id = c.user_id WHERE c.user_id = $1::bigint",
    )
    .bind(&key)
    .fetch_one(&pool)
    .await?;
    if state != "SYNCED" {
        return Err(format!("user {key}'s changed record is {state}, not SYNCED").into());
    }
    let expected = IdentityUser {
        email,
        display_name,
    };
    match api.user(key.parse()?) {
        Some(stored) if stored == expected => Ok(()),
        stored => Err(format!("the API holds {stored:?} for user {key}, not {expected:?}").into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_identity_reconciler_passes_every_check_of_the_kit() {
    let env = TestEnv::new().await;
    schema::migrate(&env.pool)
        .await
        .expect("migrate the schema");
    // The provider's limit (2 per second), without random failures.
    let api = Arc::new(
        IdentityApi::start(ApiConfig {
            fail_rate: 0.0,
            ..ApiConfig::default()
        })
        .await
        .expect("start the identity API"),
    );
    let ids = schema::seed_users(&env.pool, 2).await.expect("seed users");
    let sync = IdentitySync::new(api.base_url()).expect("an HTTP client");
    let invariant_api = api.clone();
    let kit = Kit::new(env.pool.clone(), RECONCILER, Arc::new(sync))
        .limits(reconciler::limits())
        .setup(renamed)
        .invariant(move |pool, key| {
            let api = invariant_api.clone();
            async move { synced_to(&api, pool, key).await }
        });

    let mut all_reports = Vec::new();
    for id in &ids {
        let key = id.to_string();
        let reports = kit
            .all_checks(&key)
            .await
            .unwrap_or_else(|e| panic!("user {key}: {e}"));

        let run_twice = &reports[0];
        assert_eq!(run_twice.check, "run_twice");
        assert_eq!(run_twice.steps(), ["sent", "synced"], "{run_twice}");

        let crashes: Vec<&Report> = reports.iter().filter(|r| r.crashed_at.is_some()).collect();
        let crash_steps: Vec<&str> = crashes
            .iter()
            .map(|r| r.crashed_at.as_ref().unwrap().step.as_str())
            .collect();
        assert_eq!(crash_steps, ["sent", "synced"]);
        for crash in &crashes {
            let step = &crash.crashed_at.as_ref().unwrap().step;
            assert_eq!(
                crash.runs[0].outcome,
                RunOutcome::Crashed { step: step.clone() },
                "{crash}"
            );
            // Crashed after the PUT, the record is still PENDING: exactly one
            // later run sends again and marks it. Crashed after marking it,
            // nothing is left: no later run changes anything.
            let changed_after = crash.runs[1..]
                .iter()
                .filter(|r| r.outcome.is_changed())
                .count();
            assert_eq!(changed_after, usize::from(step == "sent"), "{crash}");
        }
        synced_to(&api, env.pool.clone(), key)
            .await
            .expect("converged after the checks");
        all_reports.extend(reports);
    }

    // One PUT per run that got past it, none from runs with nothing to do.
    // Plus, per user, the clean run crash_after_each_step makes to discover
    // the steps (its reports hold only the crashes and their recoveries).
    let reported_puts = all_reports
        .iter()
        .flat_map(|r| &r.runs)
        .filter(|run| run.steps.first().is_some_and(|s| s == "sent"))
        .count();
    let puts = (reported_puts + ids.len()) as u64;
    let stats = api.stats();
    assert_eq!(stats.accepted, puts, "{stats:?}");
    assert_eq!(stats.requests, stats.accepted, "no 429 or 503: {stats:?}");
    assert!(stats.max_per_window <= 2, "{stats:?}");
}
