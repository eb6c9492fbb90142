//! Orders to invoice: an event, a reconciler and a worker wiring them, for
//! tests that run a real worker under restricted roles or permissions.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use converge::handlers::{ConsumerConfig, Context, Outcome, ReconcileError, Reconciler};
use converge::sweeper::{Schedule, SqlCandidates, SweepConfig, Timing};
use converge::{DomainEvent, Worker, WorkerError, WorkerHandle};
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

/// SHIPPED → INVOICED in table `orders`, counting its calls.
#[derive(Default)]
pub struct Invoice {
    pub calls: AtomicUsize,
}

impl Reconciler for Invoice {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
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

const CANDIDATES: &str = "SELECT id::text AS key FROM orders WHERE state = 'SHIPPED' \
                          AND ($1::text IS NULL OR id > $1::bigint) ORDER BY id LIMIT $2";

/// Starts a worker of `application` on `pool` and `nats`: `env`'s relay, a
/// consumer of `Shipped` and the sweep `invoices`, both running [`Invoice`].
pub async fn invoicing_worker(
    env: &TestEnv,
    pool: PgPool,
    nats: async_nats::Client,
    application: &str,
) -> Result<WorkerHandle, WorkerError> {
    let invoice = Arc::new(Invoice::default());
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
