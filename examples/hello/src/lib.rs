//! converge's smallest complete example: a captured payment gets exactly one
//! receipt e-mail. One event, one reconciler, one sweep, one [`Worker`].
use std::sync::{Arc, Mutex};
use std::time::Duration;

use converge::prelude::*;
use converge::sqlx::{self, PgPool};

/// The event, appended in the transaction that captures the payment.
#[derive(serde::Serialize)]
pub struct PaymentCaptured {
    /// The payment.
    pub payment_id: i64,
}

impl Event for PaymentCaptured {
    const AGGREGATE_TYPE: &'static str = "payment";
    const EVENT_TYPE: &'static str = "PaymentCaptured";
    fn aggregate_id(&self) -> String {
        self.payment_id.to_string()
    }
}

/// Sends a payment's receipt once: the e-mail provider gets an idempotency
/// key that is the same on every retry, redelivery, sweep and manual run.
#[derive(Default)]
pub struct ReceiptMailer {
    /// What the provider delivered (idempotency key, payment): a stand-in
    /// for the e-mail provider.
    pub sent: Mutex<Vec<(String, String)>>,
}

impl ReceiptMailer {
    /// The e-mail provider's call: it keeps idempotency keys, so a second
    /// call with the same key sends nothing.
    fn send(&self, idempotency_key: &str, payment: &str) {
        let mut sent = self.sent.lock().unwrap();
        if !sent.iter().any(|(k, _)| k == idempotency_key) {
            sent.push((idempotency_key.to_owned(), payment.to_owned()));
        }
    }
}

impl Reconciler for ReceiptMailer {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let pending: Option<bool> = sqlx::query_scalar(
            "SELECT receipt_sent_at IS NULL FROM hello.payments WHERE id = $1::bigint",
        )
        .bind(key)
        .fetch_optional(ctx.pool())
        .await?;
        if pending != Some(true) {
            return Ok(Outcome::Unchanged); // unknown, or already sent
        }
        let idempotency_key = ctx.idempotency_key("receipt").await?;
        self.send(&idempotency_key.to_string(), key);
        ctx.step("sent")?; // a crash here: sent, not recorded; the next run resends under the same key
        let mut tx = ctx.pool().begin().await?;
        sqlx::query("UPDATE hello.payments SET receipt_sent_at = now() WHERE id = $1::bigint")
            .bind(key)
            .execute(&mut *tx)
            .await?;
        ctx.complete_step(&mut tx, "receipt").await?;
        tx.commit().await?;
        Ok(Outcome::Changed)
    }
}

/// Creates the application's table (converge's own schema is migrated apart).
pub async fn create_schema(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(
        "CREATE SCHEMA IF NOT EXISTS hello; \
         CREATE TABLE IF NOT EXISTS hello.payments (id bigserial PRIMARY KEY, receipt_sent_at timestamptz)",
    )
    .execute(pool)
    .await
    .map(|_| ())
}

/// Captures a payment: its row and its event, committed together.
pub async fn capture(pool: &PgPool) -> Result<i64, OutboxError> {
    transaction(pool, TransactionRetry::default(), |tx| {
        Box::pin(async move {
            let payment_id: i64 =
                sqlx::query_scalar("INSERT INTO hello.payments DEFAULT VALUES RETURNING id")
                    .fetch_one(&mut **tx)
                    .await?;
            Outbox::default()
                .append(tx, &PaymentCaptured { payment_id })
                .await?;
            Ok(payment_id)
        })
    })
    .await
}

/// The worker: the relay, the mailer on `PaymentCaptured` events, and a sweep
/// every `sweep_every` for payments whose receipt is not sent yet.
pub async fn start(
    pool: PgPool,
    nats: converge::async_nats::Client,
    mailer: Arc<ReceiptMailer>,
    sweep_every: Duration,
) -> Result<WorkerHandle, WorkerError> {
    let unsent = SqlCandidates::keyset(
        "hello.payments",
        "id",
        KeyType::BigInt,
        "receipt_sent_at IS NULL",
    );
    let every =
        Schedule::fixed_rate(sweep_every).map_err(|e| WorkerError::Config(e.to_string()))?;
    Worker::new(pool, nats, "hello")
        .relay(RelayConfig::new(StreamConfig::new("HELLO", "hello")))
        .reconciler("receipt-mailer", mailer)
        .on::<PaymentCaptured>()
        .sweep(Timing::new(every), unsent)
        .start()
        .await
}
