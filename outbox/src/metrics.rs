//! The metrics the outbox and the relay record, through the [`metrics`] facade.
//!
//! Nothing is exported unless the application installs a recorder (the
//! `converge` runtime installs a Prometheus exporter); without one, recording
//! is a no-op. Call [`describe_metrics`] once to give them help texts and units.
//! Labels are low-cardinality: types, stream and instance names, never a key
//! or an id.
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `converge_events_appended_total` | counter | `aggregate_type`, `event_type` | events written by `Outbox::append*` (see [`EVENTS_APPENDED`]) |
//! | `converge_events_published_total` | counter | `stream` | events the relay published and JetStream acknowledged |
//! | `converge_publish_errors_total` | counter | `stream`, `kind` | failed publishes (`kind`: `timed_out`, `stream_not_found`, `broken_pipe`, `max_ack_pending`, `other`) |
//! | `converge_relay_rejects_total` | counter | `stream` | events the server can never accept, recorded in `converge.relay_rejects` |
//! | `converge_relay_lag_seconds` | gauge | `stream` | age of the oldest committed, unpublished event in the relay's partitions (0 when none) — it grows while a transaction holds the relay back |
//! | `converge_relay_held_back_seconds` | gauge | `stream` | how long the transaction holding the relay back has been open (0 when none is) — alert on it |
//! | `converge_relay_holding_transaction_seconds` | gauge | `stream`, `pid`, `database`, `xid`, `state`, `prepared` | the same age, labelled with the transaction holding the relay back (0 once it no longer does) |
//! | `converge_relay_partitions_owned` | gauge | `instance` | outbox partitions this relay instance holds |
//! | `converge_relay_partition_losses_total` | counter | `instance` | partition leases lost (expired or taken over) |

use metrics::{describe_counter, describe_gauge, Unit};

/// Counter `converge_events_appended_total{aggregate_type,event_type}`: events
/// written by `Outbox::append`, `append_with` and `append_all`.
///
/// Counted once the `INSERT` succeeded, inside the caller's transaction: a
/// transaction that then rolls back has counted events that never existed.
/// `converge_events_published_total` counts what committed and went out.
pub const EVENTS_APPENDED: &str = "converge_events_appended_total";
/// Counter `converge_events_published_total{stream}`: events published and
/// acknowledged by JetStream (a re-send after a crash counts again; JetStream
/// drops the duplicate).
pub const EVENTS_PUBLISHED: &str = "converge_events_published_total";
/// Counter `converge_publish_errors_total{stream,kind}`: publishes that failed
/// or were not acknowledged in time; the relay retries them.
pub const PUBLISH_ERRORS: &str = "converge_publish_errors_total";
/// Counter `converge_relay_rejects_total{stream}`: events stepped over because
/// the server can never accept them (see `converge.relay_rejects`).
pub const RELAY_REJECTS: &str = "converge_relay_rejects_total";
/// Gauge `converge_relay_lag_seconds{stream}`: how old the oldest committed,
/// unpublished event in this relay's partitions is (by its `occurred_at`, the
/// appending transaction's time unless the application set it), on this
/// process's clock; 0 when nothing waits. It keeps growing while a
/// transaction holds the relay back.
pub const RELAY_LAG: &str = "converge_relay_lag_seconds";
/// Gauge `converge_relay_held_back_seconds{stream}`: while committed events
/// wait behind an open transaction (anywhere on the server), how long that
/// transaction has been open; 0 otherwise. The figure to alert on.
pub const RELAY_HELD_BACK: &str = "converge_relay_held_back_seconds";
/// Gauge `converge_relay_holding_transaction_seconds{stream,pid,database,xid,state,prepared}`:
/// the same age, labelled with the transaction holding the relay back, set
/// to 0 once it no longer does. One series per such transaction (rare; an
/// exporter's idle timeout drops old ones).
pub const RELAY_HOLDING_TRANSACTION: &str = "converge_relay_holding_transaction_seconds";
/// Gauge `converge_relay_partitions_owned{instance}`: partitions this relay
/// instance holds.
pub const RELAY_PARTITIONS_OWNED: &str = "converge_relay_partitions_owned";
/// Counter `converge_relay_partition_losses_total{instance}`: partition leases
/// this instance lost without handing them back (expired, or taken over).
pub const RELAY_PARTITION_LOSSES: &str = "converge_relay_partition_losses_total";

/// Registers help texts and units of the outbox's and the relay's metrics with
/// the installed recorder. Call once after installing it.
pub fn describe_metrics() {
    describe_counter!(
        EVENTS_APPENDED,
        Unit::Count,
        "Events appended to the outbox (counted at INSERT: a rolled-back transaction's events count too)"
    );
    describe_counter!(
        EVENTS_PUBLISHED,
        Unit::Count,
        "Outbox events published to JetStream and acknowledged"
    );
    describe_counter!(
        PUBLISH_ERRORS,
        Unit::Count,
        "Relay publishes that failed or were not acknowledged, by error kind"
    );
    describe_counter!(
        RELAY_REJECTS,
        Unit::Count,
        "Outbox events the server can never accept, recorded in converge.relay_rejects and stepped over"
    );
    describe_gauge!(
        RELAY_LAG,
        Unit::Seconds,
        "Age of the oldest committed, unpublished event in the relay's partitions (0 when none)"
    );
    describe_gauge!(
        RELAY_HELD_BACK,
        Unit::Seconds,
        "How long the transaction holding the relay back has been open (0 when none is)"
    );
    describe_gauge!(
        RELAY_HOLDING_TRANSACTION,
        Unit::Seconds,
        "Age of the transaction holding the relay back, labelled with it (0 once it no longer does)"
    );
    describe_gauge!(
        RELAY_PARTITIONS_OWNED,
        Unit::Count,
        "Outbox partitions this relay instance holds"
    );
    describe_counter!(
        RELAY_PARTITION_LOSSES,
        Unit::Count,
        "Relay partition leases lost (expired or taken over)"
    );
}
