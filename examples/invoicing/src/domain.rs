//! The order aggregate: its states, its `OrderShipped` event, and shipping.

use std::time::Duration;

use converge::handlers::StateMachine;
use converge::{Event, Outbox};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::error::InvoicingError;
use crate::schema::ORDERS;

/// The aggregate type of orders: the middle token of the event subject.
pub const AGGREGATE_TYPE: &str = "order";

/// The event type of a shipment: the last token of the event subject.
pub const ORDER_SHIPPED: &str = "OrderShipped";

/// The states of an order.
pub mod state {
    /// Created, not shipped yet.
    pub const CREATED: &str = "CREATED";
    /// Shipped, to be invoiced.
    pub const SHIPPED: &str = "SHIPPED";
    /// Claimed by a reconciler creating its invoice (the intermediate state).
    pub const INVOICING: &str = "INVOICING";
    /// Invoiced: exactly one invoice exists.
    pub const INVOICED: &str = "INVOICED";
    /// Given up on: the order's invoice failed permanently and a dead letter
    /// records why; an operator's retry (`converge dead-letters retry`) takes
    /// it back to `SHIPPED`.
    pub const FAILED: &str = "FAILED";
    /// Every state, in lifecycle order.
    pub const ALL: [&str; 5] = [CREATED, SHIPPED, INVOICING, INVOICED, FAILED];
}

/// The event appended when an order ships.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderShipped {
    /// The order.
    pub order_id: i64,
    /// Its amount, in cents.
    pub amount_cents: i64,
}

impl Event for OrderShipped {
    const AGGREGATE_TYPE: &'static str = AGGREGATE_TYPE;
    const EVENT_TYPE: &'static str = ORDER_SHIPPED;

    fn aggregate_id(&self) -> String {
        self.order_id.to_string()
    }
}

/// The invoicing state machine over `invoicing.orders`:
/// `SHIPPED → INVOICING → INVOICED`, with `INVOICING` claimed for `claim_lease`
/// (a claim older than that belongs to a worker that died and is resumed).
pub fn state_machine(claim_lease: Duration) -> StateMachine {
    StateMachine::new(ORDERS, "id", "state")
        .key_type("bigint")
        .transition(state::SHIPPED, state::INVOICING)
        .transition(state::INVOICING, state::INVOICED)
        .intermediate(state::INVOICING, claim_lease)
}

/// What [`ship`] should do.
#[derive(Debug, Clone)]
pub struct ShipOptions {
    /// Orders to create and ship.
    pub orders: u64,
    /// The fraction (0 to 1) shipped by the legacy path, which emits no event.
    pub legacy_fraction: f64,
    /// Shipping transactions run at once.
    pub concurrency: usize,
}

/// What [`ship`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ShipReport {
    /// Orders shipped with an `OrderShipped` event in the same transaction.
    pub with_event: u64,
    /// Orders shipped by the legacy path: state updated, no event.
    pub legacy: u64,
    /// The first and last order id created, if any.
    pub ids: Option<(i64, i64)>,
}

impl std::fmt::Display for ShipReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "shipped {} orders: {} with an OrderShipped event, {} by the legacy path (no event)",
            self.with_event + self.legacy,
            self.with_event,
            self.legacy
        )?;
        if let Some((first, last)) = self.ids {
            write!(f, "; order ids {first}..={last}")?;
        }
        Ok(())
    }
}

/// Whether the order at `index` (0-based, in creation order) takes the legacy
/// path: deterministic and evenly spread, exactly `floor(n * fraction)` of the
/// first `n` (with 0.1, every 10th order).
pub fn is_legacy(index: u64, fraction: f64) -> bool {
    let fraction = fraction.clamp(0.0, 1.0);
    ((index + 1) as f64 * fraction).floor() > (index as f64 * fraction).floor()
}

/// Orders created per `INSERT`.
const CREATE_CHUNK: u64 = 1_000;

/// Creates `opts.orders` orders (state `CREATED`) and ships each in its own
/// transaction, `opts.concurrency` at once: the state change and its
/// `OrderShipped` event commit together, except on the legacy path.
#[tracing::instrument(skip(pool), err)]
pub async fn ship(pool: &PgPool, opts: &ShipOptions) -> Result<ShipReport, InvoicingError> {
    if !(0.0..=1.0).contains(&opts.legacy_fraction) {
        return Err(InvoicingError::InvalidArgument {
            option: "--legacy-fraction",
            message: format!(
                "{} is not a fraction: give a number from 0 to 1, e.g. 0.1",
                opts.legacy_fraction
            ),
        });
    }
    let ids = create_orders(pool, opts.orders).await?;
    let outbox = Outbox::default();
    let fraction = opts.legacy_fraction;
    let shipped: Vec<bool> = futures::stream::iter(ids.clone().into_iter().enumerate())
        .map(|(index, id)| {
            let legacy = is_legacy(index as u64, fraction);
            let (pool, outbox) = (pool.clone(), outbox.clone());
            async move { ship_order(&pool, &outbox, id, legacy).await.map(|_| legacy) }
        })
        .buffer_unordered(opts.concurrency.max(1))
        .try_collect()
        .await?;
    let legacy = shipped.iter().filter(|l| **l).count() as u64;
    Ok(ShipReport {
        with_event: shipped.len() as u64 - legacy,
        legacy,
        ids: ids.first().zip(ids.last()).map(|(a, b)| (*a, *b)),
    })
}

/// Inserts `count` orders in state `CREATED` with random amounts; their ids, ascending.
pub async fn create_orders(pool: &PgPool, count: u64) -> Result<Vec<i64>, InvoicingError> {
    let mut ids = Vec::with_capacity(count as usize);
    let mut left = count;
    while left > 0 {
        let n = left.min(CREATE_CHUNK);
        let mut chunk: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO invoicing.orders (amount_cents) \
             SELECT 100 + floor(random() * 99900)::bigint FROM generate_series(1, $1) \
             RETURNING id",
        )
        .bind(n as i64)
        .fetch_all(pool)
        .await
        .map_err(InvoicingError::db("creating orders"))?;
        chunk.sort_unstable();
        ids.extend(chunk);
        left -= n;
    }
    Ok(ids)
}

/// Ships one order in its own transaction: `CREATED → SHIPPED` and, unless
/// `legacy`, its [`OrderShipped`] event, committed together. Returns whether
/// the order was shipped (false: it was not in `CREATED`). Retries a
/// transaction that failed transiently.
pub async fn ship_order(
    pool: &PgPool,
    outbox: &Outbox,
    order_id: i64,
    legacy: bool,
) -> Result<bool, InvoicingError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match try_ship_order(pool, outbox, order_id, legacy).await {
            Err(e) if attempt < 5 && is_transient(&e) => {
                tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
            }
            result => return result,
        }
    }
}

fn is_transient(error: &InvoicingError) -> bool {
    match error {
        InvoicingError::Outbox(e) => e.is_retryable(),
        InvoicingError::Database { source, .. } => converge::is_retryable_sqlx(source),
        _ => false,
    }
}

async fn try_ship_order(
    pool: &PgPool,
    outbox: &Outbox,
    order_id: i64,
    legacy: bool,
) -> Result<bool, InvoicingError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(InvoicingError::db("shipping an order"))?;
    let amount_cents: Option<i64> = sqlx::query_scalar(
        "UPDATE invoicing.orders SET state = 'SHIPPED', shipped_at = now() \
         WHERE id = $1 AND state = 'CREATED' RETURNING amount_cents",
    )
    .bind(order_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(InvoicingError::db("shipping an order"))?;
    let Some(amount_cents) = amount_cents else {
        return Ok(false);
    };
    if !legacy {
        let event = OrderShipped {
            order_id,
            amount_cents,
        };
        outbox.append(&mut tx, &event).await?;
    }
    tx.commit()
        .await
        .map_err(InvoicingError::db("shipping an order"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_orders_are_evenly_spread() {
        let legacy: Vec<u64> = (0..30).filter(|i| is_legacy(*i, 0.1)).collect();
        assert_eq!(legacy, [9, 19, 29]);
        assert_eq!((0..1000).filter(|i| is_legacy(*i, 0.25)).count(), 250);
        assert_eq!((0..1000).filter(|i| is_legacy(*i, 0.0)).count(), 0);
        assert_eq!((0..1000).filter(|i| is_legacy(*i, 1.0)).count(), 1000);
        assert_eq!((0..7).filter(|i| is_legacy(*i, 1.0 / 3.0)).count(), 2);
    }

    #[test]
    fn the_event_names_its_subject_tokens() {
        let e = OrderShipped {
            order_id: 42,
            amount_cents: 1999,
        };
        use converge::DomainEvent;
        assert_eq!(e.aggregate_type(), "order");
        assert_eq!(Event::aggregate_id(&e), "42");
        assert_eq!(e.event_type(), "OrderShipped");
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"order_id":42,"amount_cents":1999}"#
        );
    }
}
