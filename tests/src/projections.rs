//! Helpers of the projection tests: a runner's configuration for tests, and
//! a rebuild requested as `converge projections rebuild` requests it.

use std::time::Duration;

use converge::eventsourcing::RunnerConfig;
use sqlx::PgPool;

/// A runner named `name` that polls every 20 ms, in batches of 25, backing
/// off at most 200 ms.
pub fn runner_config(name: &str) -> RunnerConfig {
    let mut config = RunnerConfig::default();
    config.instance_name = name.to_owned();
    config.batch_size = 25;
    config.poll_interval = Duration::from_millis(20);
    config.max_backoff = Duration::from_millis(200);
    config
}

/// Requests a rebuild of the projection `name` as `converge projections
/// rebuild` does (an audit entry, then the request), and waits for its end;
/// returns the worker's audit entry's outcome and details.
pub async fn rebuild_of(
    pool: &PgPool,
    name: &str,
    within: Duration,
) -> (String, serde_json::Value) {
    let audit: i64 = sqlx::query_scalar(
        "INSERT INTO converge.audit (actor, action, target) \
         VALUES ('test', 'projection.rebuild', $1) RETURNING id",
    )
    .bind(name)
    .fetch_one(pool)
    .await
    .unwrap();
    let requested = converge::eventsourcing::request_rebuild(pool, name, "test", Some(audit))
        .await
        .unwrap();
    assert!(requested, "{name} is registered and not being rebuilt");
    wait_rebuild(pool, name, audit, within).await
}

/// Waits for the runner's audit entry of the rebuild of `name` requested
/// in entry `requested_in` to be settled.
pub async fn wait_rebuild(
    pool: &PgPool,
    name: &str,
    requested_in: i64,
    within: Duration,
) -> (String, serde_json::Value) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let settled: Option<(String, serde_json::Value)> = sqlx::query_as(
            "SELECT outcome, details FROM converge.audit \
             WHERE action = 'projection.rebuild' AND (details->>'requested_in')::bigint = $1 \
               AND finished_at IS NOT NULL",
        )
        .bind(requested_in)
        .fetch_optional(pool)
        .await
        .unwrap();
        if let Some(settled) = settled {
            return settled;
        }
        if tokio::time::Instant::now() > deadline {
            let state: (Option<String>, Option<String>) = sqlx::query_as(
                "SELECT rebuild_state, rebuild_error FROM converge.projections WHERE name = $1",
            )
            .bind(name)
            .fetch_one(pool)
            .await
            .unwrap();
            panic!("the rebuild of {name} did not end: {state:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
