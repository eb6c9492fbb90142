//! The relay's tasks under supervision: a task that ends before the relay is
//! stopped (a panic, a bug) is logged and started again, so no partition
//! stays leased to a publisher that no longer runs.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::{Id, JoinSet};

use super::{cleanup, lease, listen, publish, Retention, Shared};
use crate::backoff::Backoff;

/// The relay's tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Task {
    Heartbeat,
    Listener,
    Publisher,
    Cleanup,
}

fn spawn(tasks: &mut JoinSet<()>, shared: &Arc<Shared>, task: Task) -> Id {
    let shared = shared.clone();
    let handle = match task {
        Task::Heartbeat => tasks.spawn(lease::heartbeat_loop(shared)),
        Task::Listener => tasks.spawn(listen::listen_loop(shared)),
        Task::Publisher => tasks.spawn(publish::publish_loop(shared)),
        Task::Cleanup => match shared.config.retention {
            Retention::For(period) => tasks.spawn(cleanup::cleanup_loop(shared, period)),
            Retention::Forever => unreachable!("cleanup runs only with a retention period"),
        },
    };
    handle.id()
}

/// Runs the relay's tasks until it is cancelled and they have all stopped.
/// Dropping (aborting) the supervisor aborts them.
pub(super) async fn supervise(shared: Arc<Shared>) {
    let mut tasks = JoinSet::new();
    let mut ids: Vec<(Id, Task, tokio::time::Instant)> = Vec::new();
    let mut wanted = vec![Task::Heartbeat, Task::Listener, Task::Publisher];
    if matches!(shared.config.retention, Retention::For(_)) {
        wanted.push(Task::Cleanup);
    }
    for task in wanted {
        ids.push((
            spawn(&mut tasks, &shared, task),
            task,
            tokio::time::Instant::now(),
        ));
    }
    // Restarts come quickly, well within a lease, so the partitions stay
    // published; a task that keeps failing backs off up to half a lease.
    let mut backoff = Backoff::new(
        Duration::from_millis(100),
        (shared.config.lease_ttl / 2).min(shared.config.max_backoff),
    );
    while let Some(done) = tasks.join_next_with_id().await {
        let (id, outcome) = match done {
            Ok((id, ())) => (id, None),
            Err(e) => (e.id(), Some(e)),
        };
        let Some(pos) = ids.iter().position(|(i, _, _)| *i == id) else {
            continue;
        };
        let (_, task, started) = ids.swap_remove(pos);
        if started.elapsed() > Duration::from_secs(60) {
            backoff.reset(); // it ran well for a while: a fresh failure
        }
        if shared.cancel.is_cancelled() {
            continue; // stopping: let the others finish
        }
        match outcome {
            Some(e) if e.is_panic() => {
                let message = panic_message(e.into_panic());
                tracing::error!(task = ?task, panic = %message, "relay task panicked; restarting it");
            }
            Some(e) => {
                tracing::error!(task = ?task, error = %e, "relay task failed; restarting it")
            }
            None => tracing::error!(task = ?task, "relay task ended on its own; restarting it"),
        }
        if task == Task::Publisher {
            // Its partitions wait for the new publisher; a publisher that
            // keeps failing hands them over after `handover_after`.
            shared.publish_failed();
        }
        tokio::select! {
            _ = shared.cancel.cancelled() => continue,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
        ids.push((
            spawn(&mut tasks, &shared, task),
            task,
            tokio::time::Instant::now(),
        ));
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(not a string)".to_owned()
    }
}
