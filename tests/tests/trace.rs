//! W3C trace context end to end, against real PostgreSQL and NATS: an append
//! stamps `traceparent`, the relay sends it as the `traceparent` header, the
//! consumer's reconcile runs in the same trace, and what the reconcile appends
//! continues it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use converge::handlers::{Consumer, ConsumerConfig, Context, Outcome, ReconcileError, Reconciler};
use converge::{AppendOptions, DomainEvent, Outbox, Relay};
use converge::{TraceParent, HEADER_TRACEPARENT};
use converge_tests::{StreamMessage, TestEnv};

#[derive(serde::Serialize)]
struct OrderEvent {
    id: String,
    #[serde(skip)]
    kind: &'static str,
}

impl DomainEvent for OrderEvent {
    fn aggregate_type(&self) -> &str {
        "order"
    }
    fn aggregate_id(&self) -> String {
        self.id.clone()
    }
    fn event_type(&self) -> &str {
        self.kind
    }
}

fn shipped(id: &str) -> OrderEvent {
    OrderEvent {
        id: id.into(),
        kind: "Shipped",
    }
}

fn header_of(message: &StreamMessage) -> TraceParent {
    let value = message
        .headers
        .get(HEADER_TRACEPARENT)
        .unwrap_or_else(|| panic!("no traceparent header on {message:?}"));
    TraceParent::parse(value).expect("a valid traceparent header")
}

async fn stored(env: &TestEnv, id: &str, version: i64) -> Option<String> {
    sqlx::query_scalar(
        "SELECT traceparent FROM converge.outbox \
         WHERE aggregate_type = 'order' AND aggregate_id = $1 AND version = $2",
    )
    .bind(id)
    .bind(version)
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn appends_carry_the_trace_to_the_stream_and_raw_rows_carry_none() {
    let env = TestEnv::new().await;
    let outbox = Outbox::default();
    let tp = TraceParent::new_root();
    let explicit = TraceParent::new_root();

    let mut tx = env.pool.begin().await.unwrap();
    TraceParent::scope(tp, async {
        outbox.append(&mut tx, &shipped("1")).await.unwrap();
        outbox
            .append_all(&mut tx, &[shipped("2"), shipped("3")])
            .await
            .unwrap();
        let options = AppendOptions::default().traceparent(Some(explicit));
        outbox
            .append_with(&mut tx, &shipped("4"), &options)
            .await
            .unwrap();
    })
    .await;
    // Outside any scope: a trace of its own.
    outbox.append(&mut tx, &shipped("5")).await.unwrap();
    tx.commit().await.unwrap();
    // Written from SQL: no trace context.
    sqlx::query("SELECT converge.append('order', '6', 'Shipped', '{}')")
        .execute(&env.pool)
        .await
        .unwrap();
    let in_db = stored(&env, "1", 1).await.expect("stored traceparent");
    assert_eq!(
        TraceParent::parse(&in_db).unwrap().trace_id(),
        tp.trace_id()
    );
    assert_eq!(stored(&env, "6", 1).await, None);

    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    let messages = env.read_stream(6, Duration::from_secs(10)).await;
    relay.shutdown().await.unwrap();
    assert_eq!(messages.len(), 6);
    let by_id = |id: &str| {
        messages
            .iter()
            .find(|m| m.aggregate_id == id)
            .unwrap_or_else(|| panic!("event of order {id} on the stream"))
    };
    for id in ["1", "2", "3"] {
        let sent = header_of(by_id(id));
        assert_eq!(sent.trace_id(), tp.trace_id(), "order {id}");
        assert_ne!(sent.span_id(), tp.span_id(), "a child of the scope");
    }
    assert_eq!(header_of(by_id("1")).to_string(), in_db, "sent as stored");
    assert_eq!(header_of(by_id("4")), explicit, "the explicit option wins");
    assert_ne!(header_of(by_id("5")).trace_id(), tp.trace_id());
    assert!(!by_id("6").headers.contains_key(HEADER_TRACEPARENT));
    // The converge headers are all still there.
    for name in [
        converge::HEADER_EVENT_ID,
        converge::HEADER_AGGREGATE_TYPE,
        converge::HEADER_AGGREGATE_ID,
        converge::HEADER_AGGREGATE_VERSION,
        converge::HEADER_EVENT_TYPE,
        converge::HEADER_OCCURRED_AT,
    ] {
        assert!(by_id("1").headers.contains_key(name), "{name}");
    }
}

/// What the reconciler saw of the trace.
#[derive(Debug, Clone, Default)]
struct Seen {
    hint: Option<TraceParent>,
    current: Option<TraceParent>,
    scoped: Option<TraceParent>,
}

/// Invoices a shipped order and appends `Invoiced`, recording the trace.
struct Invoicer {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Reconciler for Invoicer {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        self.seen.lock().unwrap().push(Seen {
            hint: ctx.trigger().event().and_then(|e| e.traceparent),
            current: Some(TraceParent::current()),
            scoped: TraceParent::scoped(),
        });
        let mut tx = ctx.pool().begin().await?;
        Outbox::default()
            .append(
                &mut tx,
                &OrderEvent {
                    id: key.into(),
                    kind: "Invoiced",
                },
            )
            .await
            .map_err(ReconcileError::permanent)?;
        tx.commit().await?;
        Ok(Outcome::Changed)
    }
}

#[tokio::test]
async fn a_reconcile_continues_the_trace_of_its_event_and_so_do_its_appends() {
    let env = TestEnv::new().await;
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let config = ConsumerConfig::new(
        "invoicing",
        &env.stream,
        format!("{}.order.Shipped", env.prefix),
    );
    let consumer = Consumer::new(
        env.pool.clone(),
        env.nats.clone(),
        Invoicer { seen: seen.clone() },
        config,
    )
    .start()
    .await
    .unwrap();

    let tp = TraceParent::new_root();
    let mut tx = env.pool.begin().await.unwrap();
    TraceParent::scope(tp, Outbox::default().append(&mut tx, &shipped("42")))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let messages = env.read_stream(2, Duration::from_secs(15)).await;
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
    assert_eq!(
        messages.len(),
        2,
        "Shipped, then Invoiced from the reconcile"
    );
    let shipped_tp = header_of(&messages[0]);
    let invoiced_tp = header_of(&messages[1]);
    assert_eq!(
        messages[1].subject,
        format!("{}.order.Invoiced", env.prefix)
    );

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let seen = &seen[0];
    assert_eq!(
        seen.hint,
        Some(shipped_tp),
        "the event hint carries the header"
    );
    let scoped = seen.scoped.expect("the reconcile runs in a trace scope");
    assert_eq!(scoped.trace_id(), tp.trace_id());
    assert_ne!(
        scoped.span_id(),
        shipped_tp.span_id(),
        "the reconcile is a child"
    );
    let current = seen.current.expect("recorded");
    assert_eq!(current.trace_id(), tp.trace_id());
    assert_eq!(invoiced_tp.trace_id(), tp.trace_id(), "the trace goes on");
    assert_ne!(invoiced_tp.span_id(), shipped_tp.span_id());
}
