//! Orders to invoice: an event, a reconciler and a worker wiring them, for
//! tests that run a real worker under restricted roles or permissions.

use std::sync::Arc;
use std::time::Duration;

use converge::handlers::{ConsumerConfig, Context, Outcome, ReconcileError, Reconciler};
use converge::sweeper::{Schedule, SqlCandidates, SweepConfig, Timing};
use converge::{DomainEvent, Outbox, Worker, WorkerError, WorkerHandle};
use converge_tests::TestEnv;
use sqlx::PgPool;

/// An order shipped (aggregate `order`, event `Shipped`).
#[derive(serde::Serialize)]
pub struct Shipped {
    pub id: i64,
}

impl DomainEvent for Shipped {
    fn aggregate_type(&self) -> &str {
        "order"
    }
    fn aggregate_id(&self) -> String {
        self.id.to_string()
    }
    fn event_type(&self) -> &str {
        "Shipped"
    }
}

/// SHIPPED → INVOICED in table `orders`.
pub struct Invoice;

impl Reconciler for Invoice {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let moved = sqlx::query(
            "UPDATE orders SET state = 'INVOICED' WHERE id = $1::bigint AND state = 'SHIPPED'",
        )
        .bind(key)
        .execute(ctx.pool())
        .await?
        .rows_affected();
        Ok(if moved == 1 {
            Outcome::Changed
        } else {
            Outcome::Unchanged
        })
    }
}

/// The sweep's candidates: SHIPPED orders, keyset-paged by id.
pub const CANDIDATES: &str = "SELECT id::text AS key FROM orders WHERE state = 'SHIPPED' \
                          AND ($1::text IS NULL OR id > $1::bigint) ORDER BY id LIMIT $2";

/// Starts a worker of `application` on `pool` and `nats`: `env`'s relay, a
/// consumer of `Shipped` and the sweep `invoices`, both running [`Invoice`].
pub async fn invoicing_worker(
    env: &TestEnv,
    pool: PgPool,
    nats: async_nats::Client,
    application: &str,
) -> Result<WorkerHandle, WorkerError> {
    let invoice = Arc::new(Invoice);
    let mut sweep = SweepConfig::new(
        "invoices",
        "invoicing",
        Timing::new(Schedule::FixedRate(Duration::from_secs(3600))),
    );
    sweep.lease.lock_at_least_for = Duration::ZERO;
    let subject = format!("{}.order.Shipped", env.prefix);
    Worker::new(pool, nats, application)
        .relay(env.relay_config())
        .consumer(
            ConsumerConfig::new("invoicing", env.stream.clone(), subject),
            invoice.clone(),
        )
        .sweep(sweep, SqlCandidates::new(CANDIDATES), invoice)
        .shutdown_timeout(Duration::from_secs(10))
        .start()
        .await
}

/// Ships orders `ids` as `pool`'s role: each order row and its `Shipped`
/// event in one transaction.
pub async fn ship(pool: &PgPool, ids: std::ops::RangeInclusive<i64>) {
    for id in ids {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO orders VALUES ($1, 'SHIPPED')")
            .bind(id)
            .execute(&mut *tx)
            .await
            .unwrap();
        Outbox::default()
            .append(&mut tx, &Shipped { id })
            .await
            .expect("the order's event is appended");
        tx.commit().await.unwrap();
    }
}

/// Waits up to 30 s for `n` orders to be INVOICED; `Err` with how many are
/// when time runs out.
pub async fn wait_invoiced(env: &TestEnv, n: i64) -> Result<(), i64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let invoiced: i64 =
            sqlx::query_scalar("SELECT count(*) FROM orders WHERE state = 'INVOICED'")
                .fetch_one(&env.pool)
                .await
                .unwrap();
        if invoiced >= n {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(invoiced);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
