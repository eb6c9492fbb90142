//! The bank's read models: account balances, kept inline (in the
//! transaction that saves each account event), and transfers' states, kept
//! asynchronously by the workers. Both can be rebuilt from history without
//! stopping anything (`converge projections rebuild bank-balances`).

use converge::eventsourcing::{ProjectedEvent, Projection, ProjectionError, ProjectionTx};

use crate::domain::{Account, AccountEvent, Transfer, TransferEvent};

/// `bank.balances`: each account's balance and whether it is frozen.
#[derive(Debug, Default)]
pub struct Balances;

impl Projection for Balances {
    const NAME: &'static str = "bank-balances";
    const TABLES: &'static [&'static str] = &["bank.balances"];
    const AGGREGATE_TYPES: &'static [&'static str] = &["account"];

    async fn apply(
        &self,
        tx: &mut ProjectionTx<'_>,
        event: &ProjectedEvent,
    ) -> Result<(), ProjectionError> {
        let Some(e) = event.decode::<Account>()? else {
            return Ok(());
        };
        let (delta, frozen) = match e {
            AccountEvent::Opened { initial } => (initial, false),
            AccountEvent::Debited { amount, .. } => (-amount, false),
            AccountEvent::Credited { amount, .. } | AccountEvent::Refunded { amount, .. } => {
                (amount, false)
            }
            AccountEvent::Frozen => (0, true),
        };
        let sql = format!(
            "INSERT INTO {t} (account, balance, frozen) VALUES ($1, $2, $3) \
             ON CONFLICT (account) DO UPDATE \
                 SET balance = {t}.balance + $2, frozen = {t}.frozen OR $3",
            t = tx.table("bank.balances")?
        );
        sqlx::query(&sql)
            .bind(&event.aggregate_id)
            .bind(delta)
            .bind(frozen)
            .execute(tx.conn())
            .await?;
        Ok(())
    }
}

/// `bank.transfers`: each transfer's state, terms and last change.
#[derive(Debug, Default)]
pub struct TransferStates;

impl Projection for TransferStates {
    const NAME: &'static str = "bank-transfers";
    const TABLES: &'static [&'static str] = &["bank.transfers"];
    const AGGREGATE_TYPES: &'static [&'static str] = &["transfer"];

    async fn apply(
        &self,
        tx: &mut ProjectionTx<'_>,
        event: &ProjectedEvent,
    ) -> Result<(), ProjectionError> {
        let Some(e) = event.decode::<Transfer>()? else {
            return Ok(());
        };
        let table = tx.table("bank.transfers")?.to_owned();
        let (state, reason) = match &e {
            TransferEvent::Requested { from, to, amount } => {
                let sql = format!(
                    "INSERT INTO {table} (id, state, from_account, to_account, amount, updated_at) \
                     VALUES ($1, 'REQUESTED', $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING"
                );
                sqlx::query(&sql)
                    .bind(&event.aggregate_id)
                    .bind(from)
                    .bind(to)
                    .bind(amount)
                    .bind(event.occurred_at)
                    .execute(tx.conn())
                    .await?;
                return Ok(());
            }
            TransferEvent::Debited => ("DEBITED", None),
            TransferEvent::Credited => ("CREDITED", None),
            TransferEvent::Refunded { reason } => ("REFUNDED", Some(reason.as_str())),
            TransferEvent::Rejected { reason } => ("REJECTED", Some(reason.as_str())),
        };
        let sql = format!(
            "UPDATE {table} SET state = $2, reason = coalesce($3, reason), updated_at = $4 \
             WHERE id = $1"
        );
        sqlx::query(&sql)
            .bind(&event.aggregate_id)
            .bind(state)
            .bind(reason)
            .bind(event.occurred_at)
            .execute(tx.conn())
            .await?;
        Ok(())
    }
}
