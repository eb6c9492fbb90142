//! Named rate limits: one limiter shared by every path of a process, and a
//! Postgres limiter shared by several processes, measured from the moments
//! `acquire` returns.

use std::time::{Duration, Instant};

use converge::handlers::{Rate, RateLimitError, RateLimits};
use converge_tests::TestEnv;
use sqlx::postgres::PgPoolOptions;

/// A timestamp is taken when the task runs again after its grant, which can be
/// a little late under load: two grants `interval` apart may be recorded
/// slightly closer. Windows are therefore checked with length `per − SLACK`.
const SLACK: Duration = Duration::from_millis(100);

/// Clock tolerance for the lower bound on the total duration (governor's clock
/// and `Instant` are different sources).
const CLOCK_TOLERANCE: Duration = Duration::from_millis(10);

/// Runs one task per entry of `paths` ("paths" of the process: a consumer, a
/// sweep…), each acquiring `name` from its `RateLimits` `calls` times. Returns
/// the start and, per path, the moments its acquires returned.
async fn run_paths(
    paths: Vec<RateLimits>,
    name: &str,
    calls: usize,
) -> (Instant, Vec<Vec<Instant>>) {
    let start = Instant::now();
    let tasks: Vec<_> = paths
        .into_iter()
        .map(|limits| {
            let name = name.to_owned();
            tokio::spawn(async move {
                let mut times = Vec::with_capacity(calls);
                for _ in 0..calls {
                    limits.acquire(&name).await.expect("acquire");
                    times.push(Instant::now());
                }
                times
            })
        })
        .collect();
    let mut per_path = Vec::new();
    for task in tasks {
        per_path.push(task.await.expect("path task"));
    }
    (start, per_path)
}

/// The most timestamps in any half-open window `[t, t + window)`.
fn max_in_window(sorted: &[Instant], window: Duration) -> usize {
    let mut best = 0;
    let mut first = 0;
    for (i, t) in sorted.iter().enumerate() {
        while *t - sorted[first] >= window {
            first += 1;
        }
        best = best.max(i - first + 1);
    }
    best
}

/// Checks the calls against `rate`: at most `max_per_window` in any window of
/// `per − SLACK`, and no sooner than the theoretical minimum: after the
/// burst, one call per interval.
fn check(start: Instant, per_path: &[Vec<Instant>], rate: Rate) -> Duration {
    let mut all: Vec<Instant> = per_path.iter().flatten().copied().collect();
    all.sort();
    let timeline: Vec<u128> = all.iter().map(|t| (*t - start).as_millis()).collect();
    let most = max_in_window(&all, rate.per() - SLACK);
    let total = *all.last().expect("calls") - start;
    println!(
        "{} calls in {total:?}, at most {most} within {:?}; timeline in ms: {timeline:?}",
        all.len(),
        rate.per() - SLACK
    );
    assert!(
        most <= rate.max_per_window() as usize,
        "{most} calls within {:?} (limit {}); timeline in ms: {timeline:?}",
        rate.per() - SLACK,
        rate.max_per_window()
    );
    let spaced = all.len().saturating_sub(rate.burst() as usize) as u32;
    let minimum = rate.interval() * spaced;
    assert!(
        total + CLOCK_TOLERANCE >= minimum,
        "{} calls took {total:?}, faster than the rate allows ({minimum:?}); timeline in ms: \
         {timeline:?}",
        all.len()
    );
    // Not starved either (generous: the machine may be busy).
    assert!(
        total < minimum + Duration::from_secs(2),
        "{} calls took {total:?}, expected about {minimum:?}; timeline in ms: {timeline:?}",
        all.len()
    );
    total
}

#[tokio::test]
async fn local_limiter_is_shared_by_every_path_of_the_process() {
    let rate = Rate::per_second(2);
    let limits = RateLimits::new().local("identity-api", rate);
    // The fast path and a sweep, concurrently, 5 calls each.
    let (start, per_path) =
        run_paths(vec![limits.clone(), limits.clone()], "identity-api", 5).await;
    assert!(per_path.iter().all(|p| p.len() == 5));
    // 10 calls at 2/s: 4.5 s (two separate limiters would take 2 s).
    let total = check(start, &per_path, rate);
    assert!(total >= Duration::from_millis(4490), "{total:?}");
}

#[tokio::test]
async fn local_limiter_allows_its_burst_and_no_more() {
    let rate = Rate::per_second(4).with_burst(3);
    let limits = RateLimits::new().local("geocoder", rate);
    let (start, per_path) = run_paths(vec![limits.clone(), limits], "geocoder", 6).await;
    // 3 at once, then 9 more 250 ms apart: 2.25 s; at most 6 per second.
    check(start, &per_path, rate);
    let mut all: Vec<Instant> = per_path.into_iter().flatten().collect();
    all.sort();
    assert!(
        all[2] - start < Duration::from_millis(200),
        "the burst of 3 was not granted at once: {:?}",
        all[2] - start
    );
}

#[tokio::test]
async fn postgres_limiter_is_shared_by_several_processes() {
    let env = TestEnv::new().await;
    let rate = Rate::per_second(2);
    // Two "processes": each its own pool and its own RateLimits.
    let mut instances = Vec::new();
    for _ in 0..2 {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(env.connect_options())
            .await
            .expect("connect");
        instances.push(RateLimits::new().postgres("identity-api", rate, pool));
    }
    // Two paths in each process, 3 calls each: 12 calls.
    let paths = vec![
        instances[0].clone(),
        instances[0].clone(),
        instances[1].clone(),
        instances[1].clone(),
    ];
    let (start, per_path) = run_paths(paths, "identity-api", 3).await;
    assert!(per_path.iter().all(|p| p.len() == 3));
    // 12 calls at 2/s cluster-wide: 5.5 s (per-process limiters would take 2.5 s).
    let total = check(start, &per_path, rate);
    assert!(total >= Duration::from_millis(5490), "{total:?}");

    let rows: Vec<String> = sqlx::query_scalar("SELECT name FROM converge.rate_limits")
        .fetch_all(&env.pool)
        .await
        .expect("rate_limits rows");
    assert_eq!(rows, ["identity-api"]);
}

#[tokio::test]
async fn postgres_limiter_burst_refills_after_idle() {
    let env = TestEnv::new().await;
    let rate = Rate::per_second(5).with_burst(3); // 200 ms apart, 3 at once
    let limits = RateLimits::new().postgres("mailer", rate, env.pool.clone());
    for round in 0..2 {
        let start = Instant::now();
        for _ in 0..3 {
            limits.acquire("mailer").await.expect("acquire");
        }
        let burst = start.elapsed();
        // Without the burst, 3 calls take 400 ms.
        assert!(
            burst < Duration::from_millis(300),
            "round {round}: burst took {burst:?}"
        );
        limits.acquire("mailer").await.expect("acquire");
        let fourth = start.elapsed();
        assert!(
            fourth + CLOCK_TOLERANCE >= Duration::from_millis(200),
            "round {round}: the 4th call came after {fourth:?}, before its slot"
        );
        // Idle long enough (more than burst × interval) to refill the burst.
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
}

#[tokio::test]
async fn unknown_limiter_names_the_known_ones_and_database_errors_are_retryable() {
    let env = TestEnv::new().await;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(env.connect_options())
        .await
        .expect("connect");
    let limits = RateLimits::new()
        .local("geocoder", Rate::per_second(10))
        .postgres("identity-api", Rate::per_second(2), pool.clone());
    assert_eq!(limits.names(), ["geocoder", "identity-api"]);

    let err = limits.acquire("identity_api").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown rate limiter `identity_api` (known: geocoder, identity-api)"
    );
    assert!(!err.is_retryable());
    match err {
        RateLimitError::Unknown { name, known } => {
            assert_eq!(name, "identity_api");
            assert_eq!(known, ["geocoder", "identity-api"]);
        }
        other => panic!("unexpected error: {other:?}"),
    }

    // The database going away is retryable, and names the limiter.
    limits.acquire("identity-api").await.expect("acquire");
    pool.close().await;
    let err = limits.acquire("identity-api").await.unwrap_err();
    assert!(matches!(err, RateLimitError::Database { .. }), "{err:?}");
    assert!(err.is_retryable(), "{err}");
    assert!(
        err.to_string()
            .starts_with("rate limiter `identity-api`: database error"),
        "{err}"
    );
}
