//! The saga without the key lease: eight runs of one transfer at once, each
//! from a `Context` built by hand (no fence), as an application calling the
//! reconciler itself would. The transfer's claim serialises them: one debit
//! and one credit in the log, every time.

use std::sync::Arc;

use bank::check::{check_with, ReadModels};
use bank::domain::{AccountCommand, TransferCommand};
use bank::saga::{SagaStats, TransferSaga};
use bank::worker::repositories;
use converge::handlers::{Context, RateLimits, Reconciler, Trigger};
use converge_tests::TestEnv;

/// Rounds: the race wants the second run to read the transfer before the
/// first commits and the account after.
const ROUNDS: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_runs_without_a_lease_move_the_money_once() {
    let env = TestEnv::new().await;
    bank::schema::migrate(&env.pool).await.unwrap();
    let (accounts, transfers) = repositories(&env.pool).await.unwrap();
    let saga = Arc::new(TransferSaga::new(
        accounts.clone(),
        transfers.clone(),
        Arc::new(SagaStats::default()),
    ));
    for round in 0..ROUNDS {
        bank::schema::reset(&env.pool).await.unwrap();
        for id in ["from", "to"] {
            accounts
                .execute(id, &AccountCommand::Open { initial: 1000 })
                .await
                .unwrap();
        }
        let request = TransferCommand::Request {
            from: "from".into(),
            to: "to".into(),
            amount: 100,
        };
        transfers.execute("t", &request).await.unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(8));
        let mut runs = Vec::new();
        for n in 0..8 {
            let (saga, barrier, pool) = (saga.clone(), barrier.clone(), env.pool.clone());
            runs.push(tokio::spawn(async move {
                let ctx = Context::new(
                    pool,
                    Trigger::Manual { reason: None },
                    1,
                    RateLimits::default(),
                    format!("hand-{n}"),
                );
                barrier.wait().await;
                saga.reconcile(&ctx, "t").await
            }));
        }
        for run in runs {
            run.await.unwrap().unwrap();
        }
        let report = check_with(&env.pool, ReadModels::InlineOnly).await.unwrap();
        assert!(report.converged, "round {round}: {report}");
        assert_eq!(report.transfers, 1);
    }
}
