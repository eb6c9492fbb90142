//! The kit against real PostgreSQL: a correct invoice reconciler passes every
//! check.

mod common;

use common::{env, kit};

use common::{invoiced_once, order_facts};
use converge_testkit::RunOutcome;

#[tokio::test]
async fn a_correct_reconciler_passes_every_check() {
    let env = env().await;
    let kit = kit(&env.pool, common::Invoicing::new()).invariant(invoiced_once);

    let twice = kit.run_twice("42").await.expect("run_twice");
    assert_eq!(
        twice.outcomes(),
        [&RunOutcome::Changed, &RunOutcome::Unchanged]
    );
    assert_eq!(twice.steps(), ["claimed", "invoiced"]);

    let concurrent = kit
        .run_concurrently("42", 8)
        .await
        .expect("run_concurrently");
    assert_eq!(concurrent.runs.len(), 8);
    assert_eq!(concurrent.changed_runs(), 1, "{concurrent}");
    assert!(concurrent.outcomes().iter().all(|o| matches!(
        o,
        RunOutcome::Changed | RunOutcome::Unchanged | RunOutcome::Busy
    )));

    let duplicates = kit
        .duplicate_events("42", 3)
        .await
        .expect("duplicate_events");
    assert_eq!(duplicates.runs.len(), 3);
    assert_eq!(duplicates.changed_runs(), 1);
    assert!(duplicates.runs.iter().all(|r| r.path == "event"));
    assert_eq!(
        duplicates
            .runs
            .iter()
            .map(|r| r.attempt)
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );

    let paths = kit.every_path("42").await.expect("every_path");
    assert_eq!(paths.runs.len(), 9, "three rounds of three paths: {paths}");
    let firsts: Vec<_> = paths.runs.chunks(3).map(|round| round[0].path).collect();
    assert_eq!(firsts, ["event", "sweep", "manual"]);
    assert_eq!(
        paths.changed_runs(),
        3,
        "each round's first run converges: {paths}"
    );

    let crashes = kit
        .crash_after_each_step("42")
        .await
        .expect("crash_after_each_step");
    assert_eq!(crashes.len(), 2);
    for (report, step) in crashes.iter().zip(["claimed", "invoiced"]) {
        let crash = report.crashed_at.as_ref().expect("crash point");
        assert_eq!(crash.step, step);
        assert_eq!(
            report.runs[0].outcome,
            RunOutcome::Crashed { step: step.into() }
        );
        assert_eq!(report.runs.last().unwrap().outcome, RunOutcome::Unchanged);
    }
    // Crashed after the claim: a later run (after the lease) did the work.
    assert_eq!(crashes[0].changed_runs(), 1, "{}", crashes[0]);
    // Crashed after the last commit: the work was done, nothing left to do.
    assert_eq!(crashes[1].changed_runs(), 0, "{}", crashes[1]);

    // The whole set again, through all_checks, on another key.
    let reports = kit.all_checks("7").await.expect("all_checks");
    assert_eq!(reports.len(), 6);
    for key in ["42", "7"] {
        assert_eq!(
            order_facts(&env.pool, key, "invoices").await.unwrap(),
            ("INVOICED".to_owned(), 1, 1)
        );
    }
}
