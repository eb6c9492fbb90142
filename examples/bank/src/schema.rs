//! The example's own schema, `bank`: its read models. The accounts and
//! transfers themselves are their events in converge's outbox.

use sqlx::PgPool;

use crate::error::BankError;

const MIGRATION: &str = r#"
SELECT pg_advisory_xact_lock(hashtext('bank.schema')::bigint);
CREATE SCHEMA IF NOT EXISTS bank;
CREATE TABLE IF NOT EXISTS bank.balances (
    account  text PRIMARY KEY,
    balance  bigint NOT NULL,
    frozen   boolean NOT NULL DEFAULT false
);
CREATE TABLE IF NOT EXISTS bank.transfers (
    id            text PRIMARY KEY,
    state         text NOT NULL,
    from_account  text NOT NULL,
    to_account    text NOT NULL,
    amount        bigint NOT NULL,
    reason        text,
    updated_at    timestamptz
);
CREATE INDEX IF NOT EXISTS transfers_state_idx ON bank.transfers (state);
"#;

/// Creates (or leaves as is) converge's schema and the `bank` schema.
pub async fn migrate(pool: &PgPool) -> Result<(), BankError> {
    converge::migrate(pool).await?;
    let mut tx = pool.begin().await.map_err(BankError::db("migrating"))?;
    sqlx::raw_sql(MIGRATION)
        .execute(&mut *tx)
        .await
        .map_err(BankError::db("migrating the bank schema"))?;
    tx.commit().await.map_err(BankError::db("migrating"))?;
    Ok(())
}

/// Deletes every account and transfer — their events, snapshots and read
/// models, the saga's dead letters and leases — so a repeated demo starts
/// from nothing. The demo's own reset; no application deletes its events.
pub async fn reset(pool: &PgPool) -> Result<(), BankError> {
    sqlx::raw_sql(
        "DELETE FROM converge.outbox WHERE aggregate_type IN ('account', 'transfer'); \
         DELETE FROM converge.outbox_heads WHERE aggregate_type IN ('account', 'transfer'); \
         DELETE FROM converge.snapshots WHERE aggregate_type IN ('account', 'transfer'); \
         DELETE FROM converge.projections WHERE name IN ('bank-balances', 'bank-transfers'); \
         DELETE FROM converge.dead_letters WHERE reconciler = 'transfers'; \
         DELETE FROM converge.key_leases WHERE reconciler = 'transfers'; \
         DELETE FROM converge.step_keys WHERE reconciler = 'transfers'; \
         TRUNCATE bank.balances, bank.transfers;",
    )
    .execute(pool)
    .await
    .map_err(BankError::db("resetting the demo"))?;
    Ok(())
}
