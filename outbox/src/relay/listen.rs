//! The LISTEN side of the relay's wake-up.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;

use super::Shared;
use crate::append::NOTIFY_CHANNEL;
use crate::backoff::Backoff;

/// Wakes the publisher on every `NOTIFY converge_outbox`. A lost notification or
/// a dropped listener only costs latency: the publisher also polls.
pub(super) async fn listen_loop(shared: Arc<Shared>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), shared.config.max_backoff);
    loop {
        let mut listener = match PgListener::connect_with(&shared.pool).await {
            Ok(l) => l,
            Err(error) => {
                tracing::warn!(%error, "relay listener cannot connect; polling meanwhile");
                if sleep_or_cancel(&shared, backoff.next_delay()).await {
                    return;
                }
                continue;
            }
        };
        if let Err(error) = listener.listen(NOTIFY_CHANNEL).await {
            tracing::warn!(%error, "relay LISTEN failed; polling meanwhile");
            if sleep_or_cancel(&shared, backoff.next_delay()).await {
                return;
            }
            continue;
        }
        backoff.reset();
        // Anything committed while we were not listening is found by this read.
        shared.wake.notify_one();
        loop {
            tokio::select! {
                _ = shared.cancel.cancelled() => return,
                received = listener.try_recv() => match received {
                    Ok(Some(_)) => shared.wake.notify_one(),
                    Ok(None) => {
                        // The connection dropped and sqlx reconnected: wake to
                        // cover notifications sent in between.
                        shared.wake.notify_one();
                    }
                    Err(error) => {
                        tracing::warn!(%error, "relay listener failed; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}

/// Returns true when cancelled.
pub(super) async fn sleep_or_cancel(shared: &Shared, delay: Duration) -> bool {
    tokio::select! {
        _ = shared.cancel.cancelled() => true,
        _ = tokio::time::sleep(delay) => false,
    }
}
