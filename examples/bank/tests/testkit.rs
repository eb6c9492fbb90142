//! The transfer saga passes converge-testkit: run twice, concurrently with
//! itself, with its events delivered several times, on every path, and after
//! a crash between the debit and the credit — one debit and one credit in
//! the log, the books balanced, the balances projection equal to the log,
//! every time.

use std::sync::Arc;

use bank::domain::{AccountCommand, TransferCommand};
use bank::saga::{SagaStats, TransferSaga};
use bank::worker::repositories;
use converge_testkit::{BoxError, Kit};
use converge_tests::TestEnv;

#[tokio::test(flavor = "multi_thread")]
async fn the_transfer_saga_passes_the_testkit() -> Result<(), BoxError> {
    let env = TestEnv::new().await;
    bank::schema::migrate(&env.pool).await?;
    let (accounts, transfers) = repositories(&env.pool).await?;
    let saga = Arc::new(TransferSaga::new(
        accounts.clone(),
        transfers.clone(),
        Arc::new(SagaStats::default()),
    ));
    let kit = Kit::new(env.pool.clone(), bank::worker::RECONCILER, saga)
        // Each check starts from nothing: two accounts and the transfer
        // requested.
        .setup(move |pool, key| {
            let (accounts, transfers) = (accounts.clone(), transfers.clone());
            async move {
                bank::schema::reset(&pool).await?;
                for id in ["from", "to"] {
                    accounts
                        .execute(id, &AccountCommand::Open { initial: 1000 })
                        .await?;
                }
                let request = TransferCommand::Request {
                    from: "from".into(),
                    to: "to".into(),
                    amount: 100,
                };
                transfers.execute(&key, &request).await?;
                Ok::<_, BoxError>(())
            }
        })
        .invariant(|pool, key| async move {
            let report =
                bank::check::check_with(&pool, bank::check::ReadModels::InlineOnly).await?;
            if !report.converged || report.transfers != 1 {
                return Err(format!("transfer {key}: {report}").into());
            }
            let (opened, balances, in_flight) = bank::check::books(&pool).await?;
            if (opened, balances, in_flight) != (2000, 2000, 0) {
                return Err(format!("books {opened} {balances} {in_flight}").into());
            }
            Ok::<_, BoxError>(())
        });
    kit.all_checks("t1").await?;
    Ok(())
}
