//! A worker's NATS connection watched for a server that keeps its socket
//! open but answers nothing (stopped, partitioned, wedged).
//!
//! async-nats pings its server only while the connection is otherwise idle,
//! and every request a worker makes (publishes, pulls, heartbeats) postpones
//! that ping: a busy client on a silent server never notices, and its
//! requests time out one after another until the server comes back. The
//! watchdog notices instead: bytes go out, nothing comes in for the stall
//! timeout, and it makes the client reconnect to another of its servers
//! (subscriptions are restored by the client; the relay and the consumers go
//! on). A healthy worker always hears back: publish acknowledgements, pull
//! heartbeats, replies, the server's and the client's pings.
//!
//! A limit of the client (async-nats 0.46): its handshake with a server has
//! no timeout once the TCP connection is made, so a reconnection that picks
//! the silent server again (it accepts connections: its listening socket is
//! open) waits there until that server answers.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Watches `client` until `shutdown`: when it sent bytes but received none
/// for `stall_timeout`, forces a reconnection (to any of its servers).
pub(crate) async fn watch(
    client: async_nats::Client,
    stall_timeout: Duration,
    shutdown: CancellationToken,
) {
    if stall_timeout.is_zero() {
        return;
    }
    let stats = client.statistics();
    let tick = (stall_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut received = stats.in_bytes.load(Ordering::Relaxed);
    let mut heard_at = Instant::now();
    let mut sent_then = stats.out_bytes.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let now_received = stats.in_bytes.load(Ordering::Relaxed);
        let now_sent = stats.out_bytes.load(Ordering::Relaxed);
        if now_received != received
            || client.connection_state() != async_nats::connection::State::Connected
        {
            // Heard from the server, or the client is reconnecting already.
            received = now_received;
            heard_at = Instant::now();
            sent_then = now_sent;
            continue;
        }
        if heard_at.elapsed() >= stall_timeout && now_sent > sent_then {
            tracing::warn!(
                silent_for = ?heard_at.elapsed(),
                sent_bytes = now_sent - sent_then,
                "the NATS server answers nothing; forcing a reconnection (to one of its servers)"
            );
            metrics::counter!(crate::metrics::NATS_STALLED_RECONNECTS).increment(1);
            // The client takes the request only while it can write (a client
            // whose socket is full is left to its own pings); a shutdown
            // does not wait for it.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::timeout(stall_timeout, client.force_reconnect()) => {}
            }
            heard_at = Instant::now();
            sent_then = now_sent;
        }
    }
}
