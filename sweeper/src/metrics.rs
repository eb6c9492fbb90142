//! The metrics sweeps and leases record, through the [`metrics`] facade.
//!
//! Nothing is exported unless the application installs a recorder (the
//! `converge` runtime installs a Prometheus exporter). Call
//! [`describe_metrics`] once to give them help texts and units. Labels are
//! low-cardinality: sweep and lease names, statuses and results, never a key
//! or a run id. The keys' reconciles also count in
//! [`converge_handlers::metrics`] with path `sweep`.
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `converge_sweep_runs_total` | counter | `sweep`, `status` | finished runs (`status`: `completed`, `stopped_early`, `interrupted`, `superseded`, `lease_lost`, `failed`, `error`) |
//! | `converge_sweep_run_duration_seconds` | histogram | `sweep` | how long a run took, lease to release |
//! | `converge_sweep_keys_total` | counter | `sweep`, `result` | keys a run settled (`result`: `reconciled`, `converged`, `failed`, `busy`) |
//! | `converge_lease_acquisitions_total` | counter | `lease` | leases taken (one per run) |
//! | `converge_lease_losses_total` | counter | `lease` | leases lost while held (expired and taken over, or no longer vouched for) |

use metrics::{describe_counter, describe_histogram, Unit};

use crate::history::RunCounts;

/// Counter `converge_sweep_runs_total{sweep,status}`: runs that ended, by
/// [`RunStatus`](crate::RunStatus) (`completed`, `stopped_early`,
/// `interrupted`, `superseded`, `lease_lost`, `failed`), or `error` when a
/// database error ended it (taking the lease, or recording the run). A
/// trigger that found the lease held, or that the overlap policy skipped, is
/// no run and is not counted.
pub const SWEEP_RUNS: &str = "converge_sweep_runs_total";
/// Histogram `converge_sweep_run_duration_seconds{sweep}`: how long a run took.
pub const SWEEP_RUN_DURATION: &str = "converge_sweep_run_duration_seconds";
/// Counter `converge_sweep_keys_total{sweep,result}`: keys settled by runs,
/// counted page by page: `reconciled` (changed), `converged` (already
/// there), `failed` (given up on, or cut short by a stop), `busy` (the
/// event path held the key).
pub const SWEEP_KEYS: &str = "converge_sweep_keys_total";
/// Counter `converge_lease_acquisitions_total{lease}`: leases taken.
pub const LEASE_ACQUISITIONS: &str = "converge_lease_acquisitions_total";
/// Counter `converge_lease_losses_total{lease}`: leases lost while held: a
/// heartbeat found the lease taken over, or failed until the local clock no
/// longer vouched for it.
pub const LEASE_LOSSES: &str = "converge_lease_losses_total";

/// Registers help texts and units of the sweeper's metrics with the installed
/// recorder. Call once after installing it.
pub fn describe_metrics() {
    describe_counter!(SWEEP_RUNS, Unit::Count, "Sweep runs that ended, by status");
    describe_histogram!(
        SWEEP_RUN_DURATION,
        Unit::Seconds,
        "How long a sweep run took"
    );
    describe_counter!(
        SWEEP_KEYS,
        Unit::Count,
        "Keys settled by sweep runs, by result (reconciled, converged, failed, busy)"
    );
    describe_counter!(LEASE_ACQUISITIONS, Unit::Count, "Cluster-wide leases taken");
    describe_counter!(
        LEASE_LOSSES,
        Unit::Count,
        "Cluster-wide leases lost while held"
    );
}

/// Counts the keys settled since `reported` and moves `reported` up to `now`.
pub(crate) fn count_keys(sweep: &str, reported: &mut RunCounts, now: &RunCounts) {
    let deltas = [
        ("reconciled", now.reconciled - reported.reconciled),
        ("converged", now.converged - reported.converged),
        ("failed", now.failed - reported.failed),
        ("busy", now.busy - reported.busy),
    ];
    for (result, n) in deltas {
        if n > 0 {
            metrics::counter!(SWEEP_KEYS, "sweep" => sweep.to_owned(), "result" => result)
                .increment(n);
        }
    }
    *reported = now.clone();
}

/// Counts one lease lost.
pub(crate) fn count_lease_loss(lease: &str) {
    metrics::counter!(LEASE_LOSSES, "lease" => lease.to_owned()).increment(1);
}
