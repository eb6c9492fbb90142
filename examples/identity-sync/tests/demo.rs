//! `identity-sync demo` against a database of its own.

use std::collections::BTreeMap;

use converge_tests::TestEnv;

fn report(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn number(report: &BTreeMap<String, String>, key: &str) -> u64 {
    report
        .get(key)
        .unwrap_or_else(|| panic!("no `{key}` in the report: {report:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("`{key}` is not a number: {report:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_syncs_every_record_within_the_rate_limit() {
    let env = TestEnv::new().await;
    let run = || async {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_identity-sync"))
            .args(["demo", "--users", "6", "--fail-rate", "0.2"])
            .env("DATABASE_URL", env.database_url())
            .output()
            .await
            .expect("run identity-sync demo")
    };
    for round in 0..2 {
        let out = run().await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "round {round}: exit {:?}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let report = report(&stdout);
        assert_eq!(number(&report, "api 429s"), 0, "{stdout}");
        assert!(number(&report, "max requests in 1 s") <= 2, "{stdout}");
        assert!(number(&report, "max requests in 1 s") >= 1, "{stdout}");
        let (synced, failed) = (
            number(&report, "records synced"),
            number(&report, "records failed"),
        );
        assert_eq!(synced + failed, 6, "fresh data each run: {stdout}");
        assert_eq!(number(&report, "records pending"), 0, "{stdout}");
        assert!(number(&report, "api requests") >= 6, "{stdout}");

        let states: Vec<(String, i64)> = sqlx::query_as(
            "SELECT state, count(*) FROM identity_sync.changed_records GROUP BY state ORDER BY state",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap();
        let in_db: i64 = states.iter().map(|(_, n)| n).sum();
        assert_eq!(in_db, 6, "{states:?}");
        assert!(
            states.iter().all(|(s, _)| s == "SYNCED" || s == "FAILED"),
            "{states:?}"
        );
        let users: i64 = sqlx::query_scalar("SELECT count(*) FROM identity_sync.users")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        assert_eq!(users, 6);
    }
    let runs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM converge.sweep_runs \
         WHERE sweep = 'identity-sync' AND trigger = 'operator' AND status = 'completed'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(runs, 2, "each demo is one recorded sweep run");
}
