//! The orders schema and the correct invoice reconciler, shared by the tests.
#![allow(dead_code)]

use std::time::Duration;

use converge::handlers::{
    Claim, Context, Outcome, ReconcileError, Reconciler, StateMachine, Transition,
};
use converge_testkit::BoxError;
use sqlx::PgPool;

/// A fresh database with the orders schema.
pub(crate) async fn env() -> converge_tests::TestEnv {
    let env = converge_tests::TestEnv::new().await;
    create_schema(&env.pool).await;
    env
}

/// The kit on `reconciler` as `invoicing`, resetting the order before each
/// check, with quick recovery runs.
pub(crate) fn kit<R: Reconciler>(pool: &PgPool, reconciler: R) -> converge_testkit::Kit<R> {
    converge_testkit::Kit::new(pool.clone(), "invoicing", std::sync::Arc::new(reconciler))
        .setup(reset_order)
        .recovery(40, Duration::from_millis(25))
}

/// The claim lease of INVOICING in the tests: short, so a crashed claim is
/// taken over quickly.
pub(crate) const LEASE: Duration = Duration::from_millis(150);

/// Creates the orders, invoices and side-effect tables.
pub(crate) async fn create_schema(pool: &PgPool) {
    for sql in [
        "CREATE TABLE orders (id bigint PRIMARY KEY, state text NOT NULL, \
         claimed_by text, claimed_at timestamptz)",
        "CREATE TABLE invoices (id bigserial PRIMARY KEY, order_id bigint NOT NULL UNIQUE)",
        "CREATE TABLE side_effects (order_id bigint PRIMARY KEY, applied int NOT NULL)",
        // For the broken reconcilers: no unique constraint.
        "CREATE TABLE loose_invoices (id bigserial PRIMARY KEY, order_id bigint NOT NULL)",
    ] {
        sqlx::query(sql).execute(pool).await.expect(sql);
    }
}

/// Puts `key` back to SHIPPED with no invoice and no side effect.
pub(crate) async fn reset_order(pool: PgPool, key: String) -> Result<(), BoxError> {
    let mut tx = pool.begin().await?;
    for sql in [
        "DELETE FROM invoices WHERE order_id = $1::bigint",
        "DELETE FROM loose_invoices WHERE order_id = $1::bigint",
        "DELETE FROM side_effects WHERE order_id = $1::bigint",
        "INSERT INTO orders (id, state) VALUES ($1::bigint, 'SHIPPED') ON CONFLICT (id) \
         DO UPDATE SET state = 'SHIPPED', claimed_by = NULL, claimed_at = NULL",
    ] {
        sqlx::query(sql).bind(&key).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The order's state, its invoices in `table`, and its side-effect count.
pub(crate) async fn order_facts(
    pool: &PgPool,
    key: &str,
    table: &str,
) -> Result<(String, i64, i32), sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT o.state, \
                (SELECT count(*) FROM {table} i WHERE i.order_id = o.id), \
                coalesce((SELECT applied FROM side_effects s WHERE s.order_id = o.id), 0) \
         FROM orders o WHERE o.id = $1::bigint"
    ))
    .bind(key)
    .fetch_one(pool)
    .await
}

/// The user's invariant: INVOICED, exactly one invoice, the side effect applied once.
pub(crate) async fn invoiced_once(pool: PgPool, key: String) -> Result<(), BoxError> {
    invoiced_once_in(&pool, &key, "invoices").await
}

/// [`invoiced_once`] for the broken reconcilers' table.
pub(crate) async fn loosely_invoiced_once(pool: PgPool, key: String) -> Result<(), BoxError> {
    invoiced_once_in(&pool, &key, "loose_invoices").await
}

async fn invoiced_once_in(pool: &PgPool, key: &str, table: &str) -> Result<(), BoxError> {
    let (state, invoices, applied) = order_facts(pool, key, table).await?;
    if state != "INVOICED" || invoices != 1 || applied != 1 {
        return Err(format!(
            "order {key} is {state} with {invoices} invoice(s) and the side effect applied \
             {applied} time(s); expected INVOICED, 1 and 1"
        )
        .into());
    }
    Ok(())
}

/// SHIPPED → INVOICING (claimed) → invoice + side effect → INVOICED.
pub(crate) struct Invoicing {
    orders: StateMachine,
}

impl Invoicing {
    pub(crate) fn new() -> Self {
        Invoicing {
            orders: StateMachine::new("orders", "id", "state")
                .key_type("bigint")
                .transition("SHIPPED", "INVOICING")
                .transition("INVOICING", "INVOICED")
                .intermediate("INVOICING", LEASE),
        }
    }
}

impl Reconciler for Invoicing {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let mut tx = ctx.pool().begin().await?;
        match self
            .orders
            .claim(&mut tx, key, "SHIPPED", "INVOICING", ctx.claimant())
            .await?
        {
            Claim::Claimed | Claim::Resumed { .. } => tx.commit().await?,
            Claim::NotClaimable { .. } => return Ok(Outcome::Unchanged),
        }
        ctx.step("claimed")?;

        let mut tx = ctx.pool().begin().await?;
        sqlx::query("INSERT INTO invoices (order_id) VALUES ($1::bigint) ON CONFLICT DO NOTHING")
            .bind(key)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO side_effects (order_id, applied) VALUES ($1::bigint, 1) \
             ON CONFLICT (order_id) DO UPDATE SET applied = side_effects.applied + 1",
        )
        .bind(key)
        .execute(&mut *tx)
        .await?;
        match self
            .orders
            .transition_to(&mut tx, key, "INVOICING", "INVOICED", ctx.claimant())
            .await?
        {
            Transition::Applied => tx.commit().await?,
            Transition::Conflict { .. } => return Ok(Outcome::Unchanged), // rolls back
        }
        ctx.step("invoiced")?;
        Ok(Outcome::Changed)
    }
}
