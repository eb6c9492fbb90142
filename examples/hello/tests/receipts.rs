//! The mailer proven idempotent with converge-testkit, and the whole worker
//! run against real PostgreSQL and NATS: one receipt per payment.
use std::sync::Arc;
use std::time::Duration;

use converge::sqlx;
use converge_testkit::{BoxError, Kit};
use converge_tests::TestEnv;
use hello::ReceiptMailer;

#[tokio::test(flavor = "multi_thread")]
async fn the_mailer_passes_the_testkit() -> Result<(), BoxError> {
    let env = TestEnv::new().await;
    hello::create_schema(&env.pool).await?;
    let mailer = Arc::new(ReceiptMailer::default());
    // Each check starts from a new payment (the provider forgets its
    // receipts) and ends with exactly one delivered receipt: a crash between
    // the call and its record must not send a second e-mail.
    let (forget, count) = (mailer.clone(), mailer.clone());
    let kit = Kit::new(env.pool.clone(), "receipt-mailer", mailer.clone())
        .setup(move |pool, key| {
            forget.sent.lock().unwrap().retain(|(_, p)| *p != key);
            async move {
                sqlx::query(
                    "INSERT INTO hello.payments (id) VALUES ($1::bigint) \
                     ON CONFLICT (id) DO UPDATE SET receipt_sent_at = NULL",
                )
                .bind(&key)
                .execute(&pool)
                .await?;
                Ok::<_, BoxError>(())
            }
        })
        .invariant(move |pool, key| {
            let delivered = count
                .sent
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, p)| *p == key)
                .count();
            async move {
                let sent: bool = sqlx::query_scalar(
                    "SELECT receipt_sent_at IS NOT NULL FROM hello.payments WHERE id = $1::bigint",
                )
                .bind(&key)
                .fetch_one(&pool)
                .await?;
                if !sent || delivered != 1 {
                    return Err(
                        format!("payment {key}: recorded {sent}, {delivered} e-mails").into(),
                    );
                }
                Ok::<_, BoxError>(())
            }
        });
    kit.all_checks("7").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_payment_gets_one_receipt() -> Result<(), BoxError> {
    let env = TestEnv::new().await;
    hello::create_schema(&env.pool).await?;
    let mailer = Arc::new(ReceiptMailer::default());
    let worker = hello::start(
        env.pool.clone(),
        env.nats.clone(),
        mailer.clone(),
        Duration::from_millis(200),
    )
    .await?;
    for _ in 0..20 {
        hello::capture(&env.pool).await?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM hello.payments WHERE receipt_sent_at IS NULL",
    )
    .fetch_one(&env.pool)
    .await?
        > 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "receipts still unsent"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.shutdown().await?;
    let sent = mailer.sent.lock().unwrap().clone();
    let mut payments: Vec<_> = sent.iter().map(|(_, p)| p.clone()).collect();
    payments.sort();
    payments.dedup();
    assert_eq!(
        (payments.len(), sent.len()),
        (20, 20),
        "one receipt per payment: {sent:?}"
    );
    Ok(())
}
