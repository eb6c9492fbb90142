//! The orders every worker test invoices: the table, the `Shipped` event,
//! shipping, the sweep's candidates and the one conditional UPDATE that
//! invoices an order — shared by the integration tests, the CLI's and the
//! test kit's, each adding its own faults around [`invoice`].

use std::time::Duration;

use converge::handlers::{Context, Outcome, ReconcileError};
use converge::Event;
use sqlx::PgPool;

/// An order shipped: aggregate `order`, event `Shipped`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Shipped {
    /// The order.
    pub id: i64,
}

impl Event for Shipped {
    const AGGREGATE_TYPE: &'static str = "order";
    const EVENT_TYPE: &'static str = "Shipped";
    fn aggregate_id(&self) -> String {
        self.id.to_string()
    }
}

/// The sweep's candidates: SHIPPED orders, keyset-paged by id.
pub const CANDIDATES: &str = "SELECT id::text AS key FROM orders WHERE state = 'SHIPPED' \
                              AND ($1::text IS NULL OR id > $1::bigint) ORDER BY id LIMIT $2";

/// The convergence figure of the sweep over [`CANDIDATES`].
pub const BACKLOG: &str = "SELECT count(*), min(shipped_at) FROM orders WHERE state = 'SHIPPED'";

/// Creates `orders (id bigint, state text, shipped_at timestamptz)`.
pub async fn create_table(pool: &PgPool) {
    sqlx::query(
        "CREATE TABLE orders (id bigint PRIMARY KEY, state text NOT NULL, \
         shipped_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(pool)
    .await
    .expect("create the orders table");
}

/// Inserts orders `ids` as SHIPPED, without events (a legacy path).
pub async fn insert_shipped(pool: &PgPool, ids: std::ops::RangeInclusive<i64>) {
    sqlx::query(
        "INSERT INTO orders (id, state) SELECT g, 'SHIPPED' FROM generate_series($1, $2) g",
    )
    .bind(ids.start())
    .bind(ids.end())
    .execute(pool)
    .await
    .expect("insert shipped orders");
}

/// Ships orders `ids` as `pool`'s role: each order row and its [`Shipped`]
/// event in one transaction.
pub async fn ship(pool: &PgPool, ids: std::ops::RangeInclusive<i64>) {
    for id in ids {
        let mut tx = pool.begin().await.expect("begin");
        sqlx::query("INSERT INTO orders (id, state) VALUES ($1, 'SHIPPED')")
            .bind(id)
            .execute(&mut *tx)
            .await
            .expect("insert the order");
        converge::Outbox::default()
            .append(&mut tx, &Shipped { id })
            .await
            .expect("the order's event is appended");
        tx.commit().await.expect("commit");
    }
}

/// Invoices order `key`: SHIPPED → INVOICED with one conditional UPDATE;
/// `Changed` when it moved the order, `Unchanged` otherwise.
pub async fn invoice(ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
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

/// The state of order `id`.
pub async fn state(pool: &PgPool, id: i64) -> String {
    sqlx::query_scalar("SELECT state FROM orders WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("read the order's state")
}

/// Waits up to `within` for `n` orders to be INVOICED; `Err` with how many
/// are when time runs out.
pub async fn wait_invoiced(pool: &PgPool, n: i64, within: Duration) -> Result<(), i64> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let invoiced: i64 =
            sqlx::query_scalar("SELECT count(*) FROM orders WHERE state = 'INVOICED'")
                .fetch_one(pool)
                .await
                .expect("count invoiced orders");
        if invoiced >= n {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(invoiced);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
