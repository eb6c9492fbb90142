//! Metrics through the [`metrics`] facade: install any recorder (the
//! `prometheus` feature's `serve_prometheus` endpoint, or your own) and
//! converge's counters, gauges and histograms flow into it.
//!
//! Names follow Prometheus conventions (`converge_` prefix, `_total` counters,
//! base units). The relay's are in [`outbox`], the reconcilers' in
//! [`crate::handlers::metrics`], the sweeps' in [`crate::sweeper::metrics`];
//! this module adds the sweeps' convergence figure, which workers measure.

/// The outbox's and the relay's metric names.
pub use converge_outbox::metrics as outbox;

/// Keys a sweep would find not converged now (gauge, label `sweep`).
pub const SWEEP_UNCONVERGED_KEYS: &str = "converge_sweep_unconverged_keys";
/// Age of the oldest key not converged (gauge, seconds, label `sweep`).
pub const SWEEP_OLDEST_UNCONVERGED_SECONDS: &str = "converge_sweep_oldest_unconverged_seconds";

/// Age of the oldest event no relay has published yet (gauge, seconds, label
/// `stream`), measured by workers that run a relay; 0 when none waits.
/// It grows while NATS is down or a long transaction holds the relays back.
pub const OUTBOX_OLDEST_UNPUBLISHED_SECONDS: &str = "converge_outbox_oldest_unpublished_seconds";

/// Reconnections a worker forced because its NATS server took its bytes but
/// answered nothing for the stall timeout (counter; see
/// [`Worker::nats_stall_timeout`](crate::Worker::nats_stall_timeout)).
pub const NATS_STALLED_RECONNECTS: &str = "converge_nats_stalled_reconnects_total";

/// Moves of a pool made by [`PgConnect`](crate::postgres::PgConnect) to
/// another host of its URL, because the one it used stopped taking writes (a
/// fail-over; counter).
pub const POSTGRES_HOST_CHANGES: &str = "converge_postgres_host_changes_total";

/// Describes every converge metric to the installed recorder (units, help).
/// [`Worker::start`](crate::Worker::start) calls it; calling it again is harmless.
pub fn describe() {
    converge_outbox::metrics::describe_metrics();
    converge_handlers::metrics::describe_metrics();
    converge_sweeper::metrics::describe_metrics();
    metrics::describe_counter!(
        NATS_STALLED_RECONNECTS,
        "Reconnections forced because the NATS server answered nothing for the stall timeout."
    );
    metrics::describe_counter!(
        POSTGRES_HOST_CHANGES,
        "Moves of a pool to another PostgreSQL host of its URL because the one it used stopped taking writes."
    );
    metrics::describe_gauge!(
        SWEEP_UNCONVERGED_KEYS,
        "Keys a sweep would find not converged now, measured by the workers."
    );
    metrics::describe_gauge!(
        OUTBOX_OLDEST_UNPUBLISHED_SECONDS,
        metrics::Unit::Seconds,
        "Age of the oldest event no relay has published yet."
    );
    metrics::describe_gauge!(
        SWEEP_OLDEST_UNCONVERGED_SECONDS,
        metrics::Unit::Seconds,
        "Age of the oldest key a sweep would find not converged now."
    );
}

/// Records the outbox lag.
pub(crate) fn record_outbox_lag(stream: &str, seconds: f64) {
    metrics::gauge!(OUTBOX_OLDEST_UNPUBLISHED_SECONDS, "stream" => stream.to_owned()).set(seconds);
}

/// Records a sweep's convergence figure.
pub(crate) fn record_convergence(sweep: &str, keys: i64, oldest: std::time::Duration) {
    metrics::gauge!(SWEEP_UNCONVERGED_KEYS, "sweep" => sweep.to_owned()).set(keys as f64);
    metrics::gauge!(SWEEP_OLDEST_UNCONVERGED_SECONDS, "sweep" => sweep.to_owned())
        .set(oldest.as_secs_f64());
}

/// Why the Prometheus endpoint could not start.
#[cfg(feature = "prometheus")]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrometheusError {
    /// Another metrics recorder is installed, or the address cannot be bound.
    #[error("could not start the Prometheus endpoint on {addr}: {source}")]
    Install {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The exporter's error.
        #[source]
        source: metrics_exporter_prometheus::BuildError,
    },
}

/// Installs a Prometheus recorder as the process's metrics recorder and serves
/// `GET /metrics` on `addr` (feature `prometheus`). Call once, inside a Tokio
/// runtime, before starting workers.
#[cfg(feature = "prometheus")]
pub fn serve_prometheus(addr: std::net::SocketAddr) -> Result<(), PrometheusError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|source| PrometheusError::Install { addr, source })?;
    describe();
    Ok(())
}

#[cfg(all(test, feature = "prometheus"))]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_prometheus_endpoint_serves_converge_metrics() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        super::serve_prometheus(addr).expect("the endpoint starts");
        super::record_convergence("invoices", 7, std::time::Duration::from_secs(3));
        super::record_outbox_lag("ORDERS", 1.5);
        // A second recorder cannot be installed: the error names the address.
        let again = super::serve_prometheus(addr).unwrap_err();
        assert!(again.to_string().contains(&addr.to_string()), "{again}");

        let mut body = String::new();
        for _ in 0..50 {
            if let Ok(mut conn) = tokio::net::TcpStream::connect(addr).await {
                conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                    .await
                    .unwrap();
                conn.read_to_string(&mut body).await.unwrap();
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(
            body.contains(r#"converge_sweep_unconverged_keys{sweep="invoices"} 7"#),
            "{body}"
        );
        assert!(
            body.contains(r#"converge_outbox_oldest_unpublished_seconds{stream="ORDERS"} 1.5"#),
            "{body}"
        );
    }
}
