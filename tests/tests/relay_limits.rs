//! What the relay can and cannot send: sizes exact to the byte against a
//! private `nats-server` with a small `max_payload`, and rows that can never be
//! published (written by SQL around the API) recorded as rejects with their
//! reason instead of stalling the relay.

use std::collections::BTreeMap;
use std::time::Duration;

use converge::{AppendOptions, DomainEvent, Outbox, OutboxConfig, Relay, TraceParent};
use converge_tests::{NatsServer, StreamMessage, TestEnv};
use serde::Serialize;

/// The private server's `max_payload`.
const LIMIT: usize = 4096;

#[derive(Debug, Clone, Serialize)]
struct Sized {
    #[serde(skip)]
    aggregate_type: String,
    #[serde(skip)]
    aggregate_id: String,
    #[serde(skip)]
    event_type: String,
    fill: String,
}

impl DomainEvent for Sized {
    fn aggregate_type(&self) -> &str {
        &self.aggregate_type
    }
    fn aggregate_id(&self) -> String {
        self.aggregate_id.clone()
    }
    fn event_type(&self) -> &str {
        &self.event_type
    }
}

/// One shape of event: names and headers, with a payload of `fill` bytes.
#[derive(Clone)]
struct Shape {
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    headers: BTreeMap<String, String>,
    traceparent: Option<TraceParent>,
}

impl Shape {
    fn event(&self, fill: usize) -> Sized {
        Sized {
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            event_type: self.event_type.clone(),
            fill: "x".repeat(fill),
        }
    }

    fn options(&self) -> AppendOptions {
        let mut o = AppendOptions::default();
        for (k, v) in &self.headers {
            o = o.header(k, v);
        }
        o.traceparent(self.traceparent)
    }
}

fn outbox() -> Outbox {
    let mut c = OutboxConfig::default();
    c.max_event_bytes = LIMIT;
    Outbox::new(c)
}

/// Whether `append` accepts this shape with `fill` bytes (rolled back).
async fn accepted(env: &TestEnv, shape: &Shape, fill: usize) -> bool {
    let mut tx = env.pool.begin().await.unwrap();
    let r = outbox()
        .append_with(&mut tx, &shape.event(fill), &shape.options())
        .await;
    tx.rollback().await.unwrap();
    match r {
        Ok(_) => true,
        Err(converge::OutboxError::TooLarge { .. }) => false,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// The largest fill that append accepts.
async fn largest_accepted(env: &TestEnv, shape: &Shape) -> usize {
    let (mut lo, mut hi) = (0usize, LIMIT);
    assert!(accepted(env, shape, lo).await, "an empty payload must fit");
    assert!(!accepted(env, shape, hi).await);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if accepted(env, shape, mid).await {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The size NATS counts against `max_payload` for a message as received:
/// the header block (`NATS/1.0\r\n`, `Name: value\r\n` per header, `\r\n`)
/// plus the payload.
fn wire_size(m: &StreamMessage, payload_len: usize) -> usize {
    let headers: usize = m.headers.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
    "NATS/1.0\r\n".len() + headers + 2 + payload_len
}

fn shapes() -> Vec<Shape> {
    let mut long_headers = BTreeMap::new();
    long_headers.insert("x-tenant".to_string(), "t".repeat(100));
    long_headers.insert("x-correlation".to_string(), "c".repeat(40));
    vec![
        Shape {
            aggregate_type: "o".into(),
            aggregate_id: "1".into(),
            event_type: "E".into(),
            headers: BTreeMap::new(),
            traceparent: None,
        },
        Shape {
            aggregate_type: "a".repeat(128),
            aggregate_id: "i".repeat(512),
            event_type: "e".repeat(128),
            headers: long_headers,
            traceparent: Some(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                    .parse()
                    .unwrap(),
            ),
        },
    ]
}

#[tokio::test]
async fn the_largest_event_append_accepts_is_exactly_the_servers_limit_and_is_published() {
    let server = NatsServer::start_with_config(&format!("max_payload: {LIMIT}\n")).await;
    let env = TestEnv::with_nats_url(&server.url()).await;
    let mut config = env.relay_config();
    config.max_event_bytes = LIMIT;
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), config)
        .start()
        .await
        .unwrap();
    let shapes = shapes();
    let mut fills = Vec::new();
    for shape in &shapes {
        let fill = largest_accepted(&env, shape).await;
        let mut tx = env.pool.begin().await.unwrap();
        outbox()
            .append_with(&mut tx, &shape.event(fill), &shape.options())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        fills.push(fill);
    }
    let messages = env.read_stream(shapes.len(), Duration::from_secs(15)).await;
    assert_eq!(
        messages.len(),
        shapes.len(),
        "every accepted event reaches the stream"
    );
    for (m, fill) in messages.iter().zip(&fills) {
        let payload_len = serde_json::to_string(&m.payload).unwrap().len();
        assert_eq!(payload_len, fill + r#"{"fill":""}"#.len());
        assert_eq!(
            wire_size(m, payload_len),
            LIMIT,
            "the largest accepted event of {:?} is exactly max_payload on the wire",
            m.subject.chars().take(40).collect::<String>()
        );
    }
    // Nothing was rejected and the connection never had to be re-established.
    let rejects: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.relay_rejects")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(rejects, 0);
    assert_eq!(
        env.nats
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    relay.shutdown().await.unwrap();
}

/// A row one byte over the limit, written around the API, is a recorded
/// reject; the relay's connection survives and later events go out.
#[tokio::test]
async fn a_row_one_byte_over_the_limit_is_a_reject_not_a_reconnect_loop() {
    let server = NatsServer::start_with_config(&format!("max_payload: {LIMIT}\n")).await;
    let env = TestEnv::with_nats_url(&server.url()).await;
    let shape = &shapes()[1];
    let fill = largest_accepted(&env, shape).await;
    // The same event one byte larger, inserted by SQL (no size check there).
    let headers = serde_json::to_string(&shape.headers).unwrap();
    sqlx::query(
        "INSERT INTO converge.outbox (partition, tx_order, aggregate_type, aggregate_id, version, \
                                      event_type, headers, payload, traceparent) \
         VALUES (converge.partition_of($1, $2), converge.tx_order(), $1, $2, 1, $3, $4::jsonb, \
                 $5::json, $6)",
    )
    .bind(&shape.aggregate_type)
    .bind(&shape.aggregate_id)
    .bind(&shape.event_type)
    .bind(&headers)
    .bind(serde_json::to_string(&shape.event(fill + 1)).unwrap())
    .bind(shape.traceparent.map(|t| t.to_string()))
    .execute(&env.pool)
    .await
    .unwrap();
    let small = Shape {
        aggregate_id: "after".into(),
        ..shape.clone()
    };
    let mut tx = env.pool.begin().await.unwrap();
    outbox()
        .append_with(&mut tx, &small.event(10), &small.options())
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let mut config = env.relay_config();
    config.max_event_bytes = LIMIT;
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), config)
        .start()
        .await
        .unwrap();
    let messages = env.read_stream(1, Duration::from_secs(15)).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].aggregate_id, "after");
    // The reject is recorded with the batch, just after the acknowledgements.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let reasons: Vec<String> = loop {
        let r: Vec<String> = sqlx::query_scalar("SELECT reason FROM converge.relay_rejects")
            .fetch_all(&env.pool)
            .await
            .unwrap();
        if !r.is_empty() || tokio::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(
        reasons[0].contains(&format!("{}", LIMIT + 1)),
        "{}",
        reasons[0]
    );
    assert!(reasons[0].contains("max_payload"), "{}", reasons[0]);
    assert_eq!(
        env.nats
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    relay.shutdown().await.unwrap();
}

/// Rows that can never become a message are rejects with the reason, and the
/// rows after them are published: an undecodable time, reserved headers,
/// headers that are not strings.
#[tokio::test]
async fn undecodable_rows_and_reserved_headers_become_rejects() {
    let env = TestEnv::new().await;
    for (id, occurred_at, headers) in [
        ("infinite", "'infinity'", "'{}'"),
        ("far-future", "'290000-01-01'", "'{}'"),
        ("year-10000", "'10000-01-01'", "'{}'"),
        (
            "nats-header",
            "now()",
            r#"'{"Nats-Expected-Stream": "ELSEWHERE"}'"#,
        ),
        ("number-header", "now()", r#"'{"x-count": 3}'"#),
        ("fine", "now()", r#"'{"x-ok": "yes"}'"#),
    ] {
        sqlx::query(&format!(
            "INSERT INTO converge.outbox (partition, tx_order, aggregate_type, aggregate_id, \
                                          version, event_type, occurred_at, headers, payload) \
             VALUES (converge.partition_of('account', '{id}'), converge.tx_order(), 'account', \
                     '{id}', 1, 'Changed', \
                     {occurred_at}, {headers}, '{{}}')"
        ))
        .execute(&env.pool)
        .await
        .unwrap();
    }
    let relay = Relay::new(env.pool.clone(), env.nats.clone(), env.relay_config())
        .start()
        .await
        .unwrap();
    let messages = env.read_stream(1, Duration::from_secs(15)).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].aggregate_id, "fine");
    assert_eq!(
        messages[0].headers.get("x-ok").map(String::as_str),
        Some("yes")
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let rejects: Vec<(String, String)> = loop {
        let r: Vec<(String, String)> = sqlx::query_as(
            "SELECT o.aggregate_id, r.reason FROM converge.relay_rejects r \
             JOIN converge.outbox o ON o.event_id = r.event_id ORDER BY o.aggregate_id",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap();
        if r.len() == 5 || tokio::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(rejects.len(), 5, "{rejects:?}");
    for (i, id) in ["far-future", "infinite"].iter().enumerate() {
        assert_eq!(rejects[i].0, *id);
        assert!(rejects[i].1.contains("occurred_at"), "{}", rejects[i].1);
    }
    assert_eq!(rejects[2].0, "nats-header");
    assert!(
        rejects[2].1.contains("Nats-Expected-Stream"),
        "{}",
        rejects[2].1
    );
    assert_eq!(rejects[3].0, "number-header");
    assert!(rejects[3].1.contains("x-count"), "{}", rejects[3].1);
    assert_eq!(rejects[4].0, "year-10000");
    assert!(rejects[4].1.contains("occurred_at"), "{}", rejects[4].1);
    // History reads such an event as unreadable, never a crash.
    let err = converge::Outbox::history(&env.pool, "account", "far-future", 0, 10)
        .await
        .unwrap_err();
    assert!(
        matches!(err, converge::OutboxError::Unreadable { .. }),
        "{err:?}"
    );
    relay.shutdown().await.unwrap();
}
