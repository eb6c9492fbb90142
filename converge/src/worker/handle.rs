//! A running worker: its parts, their ordered shutdown, and the signals that
//! trigger it.

use std::sync::Arc;
use std::time::Duration;

use converge_handlers::ConsumerHandle;
use converge_outbox::RelayHandle;
use converge_sweeper::SweeperHandle;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{registry, WorkerError};

/// A running worker: stop it with [`shutdown`](WorkerHandle::shutdown) or
/// [`run_until_signal`](WorkerHandle::run_until_signal).
pub struct WorkerHandle {
    pub(super) instance: String,
    pub(super) application: String,
    pub(super) pool: PgPool,
    pub(super) relay: Option<RelayHandle>,
    pub(super) consumers: Vec<ConsumerHandle>,
    pub(super) sweeper: Option<Arc<SweeperHandle>>,
    pub(super) projections: Option<converge_eventsourcing::ProjectionsHandle>,
    pub(super) shutdown: CancellationToken,
    pub(super) tasks: JoinSet<()>,
    pub(super) timeout: Duration,
}

impl std::fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("application", &self.application)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl WorkerHandle {
    /// This worker's instance name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The sweeps, to trigger or run them from application code.
    pub fn sweeper(&self) -> Option<&SweeperHandle> {
        self.sweeper.as_deref()
    }

    /// The relay partitions this worker publishes now (empty without a relay).
    pub fn relay_partitions(&self) -> Vec<i32> {
        self.relay
            .as_ref()
            .map(|r| r.partitions())
            .unwrap_or_default()
    }

    /// Waits for SIGTERM or ctrl-c (SIGINT), then shuts down gracefully.
    ///
    /// The handlers are installed when this is called; a process that may be
    /// signalled while it starts should call [`shutdown_signal`] first and
    /// pass it to [`run_until`](WorkerHandle::run_until).
    pub async fn run_until_signal(self) -> Result<(), WorkerError> {
        let signal = shutdown_signal().map_err(WorkerError::Signal)?;
        self.run_until(signal).await
    }

    /// Runs until `stop` completes, then shuts down gracefully.
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), WorkerError> {
        stop.await;
        tracing::info!(instance = %self.instance, "shutdown requested; draining");
        self.shutdown().await
    }

    /// Stops the control plane, then the consumers and sweeps (each finishes
    /// its current keys within the timeout), then the projections (after
    /// their current batch), then the relay (so events the
    /// reconcilers appended while draining are still published), and removes
    /// the worker from `converge.workers`.
    #[tracing::instrument(skip(self), fields(instance = %self.instance), err)]
    pub async fn shutdown(mut self) -> Result<(), WorkerError> {
        let result = self.stop_parts().await;
        if let Err(e) = registry::deregister(&self.pool, &self.instance).await {
            tracing::warn!(error = %e, "could not remove the worker from converge.workers");
        }
        result
    }

    pub(super) async fn stop_parts(&mut self) -> Result<(), WorkerError> {
        self.shutdown.cancel();
        let mut problems = Vec::new();
        let mut tasks = std::mem::take(&mut self.tasks);
        let drained = tokio::time::timeout(self.timeout, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            // Aborted tasks release what they hold (the sweeper) only once
            // they are gone: wait for that, so the sweeper is shut down below.
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            problems.push(format!("control plane still busy after {:?}", self.timeout));
        }
        for consumer in self.consumers.drain(..) {
            if let Err(e) = consumer.shutdown().await {
                problems.push(format!("consumer: {e}"));
            }
        }
        if let Some(mut sweeper) = self.sweeper.take() {
            // Aborted control-plane tasks drop their share of the sweeper
            // when the runtime gets to them: give them a moment.
            let mut unique = None;
            for _ in 0..100 {
                match Arc::try_unwrap(sweeper) {
                    Ok(s) => {
                        unique = Some(s);
                        break;
                    }
                    Err(shared) => {
                        sweeper = shared;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            match unique {
                Some(sweeper) => {
                    if let Err(e) = sweeper.shutdown().await {
                        problems.push(format!("sweeper: {e}"));
                    }
                }
                None => problems.push(
                    "sweeper still referenced after 2 s; its runs stop and leases expire on their own"
                        .into(),
                ),
            }
        }
        if let Some(projections) = self.projections.take() {
            projections.shutdown().await;
        }
        if let Some(relay) = self.relay.take() {
            if let Err(e) = relay.shutdown().await {
                problems.push(format!("relay: {e}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(WorkerError::Shutdown(problems.join("; ")))
        }
    }
}

/// Installs SIGTERM and SIGINT (ctrl-c) handlers now and returns a future
/// that completes at the first of them. Call it first thing in a worker
/// process, so a signal that arrives while the worker starts is not fatal.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
