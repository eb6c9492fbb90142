//! The metrics reconcilers, consumers, dead letters and rate limits record,
//! through the [`metrics`] facade.
//!
//! Nothing is exported unless the application installs a recorder (the
//! `converge` runtime installs a Prometheus exporter). Call
//! [`describe_metrics`] once to give them help texts and units. Labels are
//! low-cardinality: reconciler and limiter names, paths and outcomes, never a
//! key.
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `converge_reconciles_total` | counter | `reconciler`, `path`, `outcome` | runs of a key, whatever the path (`path`: `event`, `sweep`, `manual`; `outcome`: `changed`, `unchanged`, `busy`, `retryable`, `permanent`) |
//! | `converge_reconcile_duration_seconds` | histogram | `reconciler`, `path` | time in `reconcile` (busy runs, which do not reconcile, are not observed) |
//! | `converge_retries_total` | counter | `reconciler` | failed reconciles scheduled for another attempt |
//! | `converge_dead_letters_total` | counter | `reconciler`, `path` | keys given up on, recorded in `converge.dead_letters` |
//! | `converge_rate_limit_wait_seconds` | histogram | `limiter` | time a caller waited in `RateLimits::acquire` |
//!
//! The outbox's metrics are in [`converge_outbox::metrics`].

use metrics::{describe_counter, describe_histogram, Unit};

/// Counter `converge_reconciles_total{reconciler,path,outcome}`: runs of one
/// key through a reconciler ([`run_key`](crate::run_key), the consumer,
/// sweeps' [`run_keys`](crate::run_keys), including the keys of a
/// `reconcile_batch` page), by how they ended ([`RunResult::label`](crate::RunResult::label)).
///
/// An event whose key another run holds is tried again every few tens of
/// milliseconds for up to `lock_wait`: each try counts as `busy`.
pub const RECONCILES: &str = "converge_reconciles_total";
/// Histogram `converge_reconcile_duration_seconds{reconciler,path}`: how long
/// one key's `reconcile` took (a `reconcile_batch` page is not observed).
pub const RECONCILE_DURATION: &str = "converge_reconcile_duration_seconds";
/// Counter `converge_retries_total{reconciler}`: failed reconciles scheduled
/// for another attempt (the consumer naks the event with a backoff delay; a
/// sweep retries the key).
pub const RETRIES: &str = "converge_retries_total";
/// Counter `converge_dead_letters_total{reconciler,path}`: keys given up on
/// (recorded in `converge.dead_letters`; malformed events count with path
/// `manual`).
pub const DEAD_LETTERS: &str = "converge_dead_letters_total";
/// Histogram `converge_rate_limit_wait_seconds{limiter}`: time waited in
/// [`RateLimits::acquire`](crate::RateLimits::acquire) (0 when the limiter
/// allowed the call at once).
pub const RATE_LIMIT_WAIT: &str = "converge_rate_limit_wait_seconds";
/// Counter `converge_key_leases_lost_total{reconciler}`: runs stopped because
/// their key's lease could not be renewed in time or was taken from them.
pub const KEY_LEASES_LOST: &str = "converge_key_leases_lost_total";

/// Registers help texts and units of the handlers' metrics with the installed
/// recorder. Call once after installing it.
pub fn describe_metrics() {
    describe_counter!(
        RECONCILES,
        Unit::Count,
        "Runs of one key through a reconciler, by path (event, sweep, manual) and outcome"
    );
    describe_histogram!(
        RECONCILE_DURATION,
        Unit::Seconds,
        "Time one key's reconcile took (busy runs not observed)"
    );
    describe_counter!(
        RETRIES,
        Unit::Count,
        "Failed reconciles scheduled for another attempt"
    );
    describe_counter!(
        DEAD_LETTERS,
        Unit::Count,
        "Keys given up on and recorded in converge.dead_letters"
    );
    describe_histogram!(
        RATE_LIMIT_WAIT,
        Unit::Seconds,
        "Time waited for a rate limiter to allow a call"
    );
    describe_counter!(
        KEY_LEASES_LOST,
        Unit::Count,
        "Runs stopped because their key's lease was lost"
    );
}

/// Counts one run stopped by a lost key lease.
pub(crate) fn count_lease_loss(reconciler: &str) {
    metrics::counter!(KEY_LEASES_LOST, "reconciler" => reconciler.to_owned()).increment(1);
}

/// Counts one retry of `reconciler`.
pub(crate) fn count_retry(reconciler: &str) {
    metrics::counter!(RETRIES, "reconciler" => reconciler.to_owned()).increment(1);
}
