//! Orders to invoice (the shared fixture, `converge_tests::orders`) and a
//! worker wiring them, for tests that run a real worker under restricted
//! roles or permissions.

use std::sync::Arc;
use std::time::Duration;

use converge::handlers::{Context, Outcome, ReconcileError, Reconciler};
use converge::sweeper::{Schedule, SqlCandidates, Timing};
use converge::{Worker, WorkerError, WorkerHandle};
use converge_tests::TestEnv;
use sqlx::PgPool;

#[allow(unused_imports)] // each test binary uses some of them
pub use converge_tests::orders::{ship, Shipped, CANDIDATES};

/// SHIPPED → INVOICED in table `orders`.
pub struct Invoice;

impl Reconciler for Invoice {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        converge_tests::orders::invoice(ctx, key).await
    }
}

/// Starts a worker of `application` on `pool` and `nats`: `env`'s relay and
/// the reconciler `invoicing` on `Shipped` events and in the sweep `invoices`.
pub async fn invoicing_worker(
    env: &TestEnv,
    pool: PgPool,
    nats: async_nats::Client,
    application: &str,
) -> Result<WorkerHandle, WorkerError> {
    Worker::new(pool, nats, application)
        .relay(env.relay_config())
        .shutdown_timeout(Duration::from_secs(10))
        .reconciler("invoicing", Arc::new(Invoice))
        .on::<Shipped>()
        .sweep_with(
            Timing::new(Schedule::FixedRate(Duration::from_secs(3600))),
            SqlCandidates::new(CANDIDATES),
            |s| {
                s.name = "invoices".into();
                s.lease.lock_at_least_for = Duration::ZERO;
            },
        )
        .start()
        .await
}

/// Waits up to 30 s for `n` orders to be INVOICED; `Err` with how many are
/// when time runs out.
pub async fn wait_invoiced(env: &TestEnv, n: i64) -> Result<(), i64> {
    converge_tests::orders::wait_invoiced(&env.pool, n, Duration::from_secs(30)).await
}
