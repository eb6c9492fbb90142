//! Reading a relay's stream back and checking, for every aggregate, that its
//! events appear in version order exactly once.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull::OrderedConfig};
use converge::{
    HEADER_AGGREGATE_ID, HEADER_AGGREGATE_TYPE, HEADER_AGGREGATE_VERSION, HEADER_EVENT_ID,
};
use futures::StreamExt;

use crate::common::Result;

/// Longest wait for the next message of the read-back.
const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// What the read-back found wrong. Every variant names the aggregate.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OrderError {
    /// An event of an aggregate arrived again (same version as one already seen).
    #[error(
        "aggregate {aggregate}: version {version} appears again at stream sequence {seq} \
         (duplicate; event id {event_id})"
    )]
    Duplicate {
        aggregate: String,
        version: u64,
        seq: u64,
        event_id: String,
    },
    /// An event arrived before an earlier version of its aggregate.
    #[error(
        "aggregate {aggregate}: version {version} at stream sequence {seq} follows version \
         {last} (out of order or missing versions)"
    )]
    OutOfOrder {
        aggregate: String,
        version: u64,
        last: u64,
        seq: u64,
    },
    /// The stream ended before an aggregate's last version.
    #[error("aggregate {aggregate}: the stream ends at version {last}, expected {expected}")]
    Missing {
        aggregate: String,
        last: u64,
        expected: u64,
    },
    /// A message lacks a header the relay always sets.
    #[error("stream sequence {seq} lacks header {header}")]
    MissingHeader { seq: u64, header: &'static str },
    /// The same event id was published twice (de-duplication failed).
    #[error("aggregate {aggregate}: event id {event_id} appears twice (second at stream sequence {seq})")]
    DuplicateId {
        aggregate: String,
        event_id: String,
        seq: u64,
    },
}

/// What a clean read-back saw.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OrderReport {
    /// Messages read.
    pub(crate) messages: u64,
    /// Distinct aggregates among them.
    pub(crate) aggregates: u64,
    /// Seconds the read-back took.
    pub(crate) secs: f64,
}

/// Reads every message of `stream` (headers only, in stream order) and checks
/// that aggregate `a` of the fill shows versions `1..=expected(a)` in order,
/// each once, with no event id twice.
pub(crate) async fn check_order(
    client: &async_nats::Client,
    stream: &str,
    expected: impl Fn(&str) -> u64,
) -> Result<OrderReport> {
    let started = std::time::Instant::now();
    let js = jetstream::new(client.clone());
    let mut stream = js.get_stream(stream).await?;
    let total = stream.info().await?.state.messages;
    let consumer = stream
        .create_consumer(OrderedConfig {
            headers_only: true,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut ids: HashSet<String> = HashSet::with_capacity(total as usize);
    for _ in 0..total {
        let message = tokio::time::timeout(READ_TIMEOUT, messages.next())
            .await
            .map_err(|_| "read-back: no message within 15 s")?
            .ok_or("read-back: the consumer ended")??;
        let seq = message.info()?.stream_sequence;
        let headers = message.headers.as_ref();
        let header = |name: &'static str| {
            headers
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
                .ok_or(OrderError::MissingHeader { seq, header: name })
        };
        let aggregate = format!(
            "{}/{}",
            header(HEADER_AGGREGATE_TYPE)?,
            header(HEADER_AGGREGATE_ID)?
        );
        let version: u64 =
            header(HEADER_AGGREGATE_VERSION)?
                .parse()
                .map_err(|_| OrderError::MissingHeader {
                    seq,
                    header: HEADER_AGGREGATE_VERSION,
                })?;
        let event_id = header(HEADER_EVENT_ID)?;
        if !ids.insert(event_id.clone()) {
            return Err(OrderError::DuplicateId {
                aggregate,
                event_id,
                seq,
            }
            .into());
        }
        let previous = last.entry(aggregate.clone()).or_insert(0);
        if version <= *previous {
            return Err(OrderError::Duplicate {
                aggregate,
                version,
                seq,
                event_id,
            }
            .into());
        }
        if version != *previous + 1 {
            return Err(OrderError::OutOfOrder {
                aggregate,
                version,
                last: *previous,
                seq,
            }
            .into());
        }
        *previous = version;
    }
    for (aggregate, last) in &last {
        let id = aggregate.rsplit('/').next().unwrap_or_default();
        let expected = expected(id);
        if *last != expected {
            return Err(OrderError::Missing {
                aggregate: aggregate.clone(),
                last: *last,
                expected,
            }
            .into());
        }
    }
    Ok(OrderReport {
        messages: total,
        aggregates: last.len() as u64,
        secs: started.elapsed().as_secs_f64(),
    })
}

/// The last version of aggregate `id` in a fill of `events` events over
/// `aggregates` aggregates (event `g` belongs to aggregate `g % aggregates`).
pub(crate) fn fill_versions(id: &str, events: u64, aggregates: u64) -> u64 {
    let Ok(a) = id.parse::<u64>() else { return 0 };
    events / aggregates + u64::from(a < events % aggregates)
}
