//! A reconciler bound to its name, with its type erased: what the sweeper's
//! key-by-key runs, a worker's operator runs and dead-letter retries hold to
//! run one key through [`run_key`](crate::run_key). (A sweep's page-at-once
//! path, `run_keys`, keeps its own closure.)

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::reconciler::{Context, Reconciler};
use crate::run::{run_key, RunResult};

type RunOne = dyn Fn(Context, String) -> BoxFuture<'static, RunResult> + Send + Sync;

/// A reconciler under its name (its leases, dead letters and manual runs),
/// runnable without knowing its type. Clones share the reconciler.
#[derive(Clone)]
pub struct NamedReconciler {
    name: Arc<str>,
    run: Arc<RunOne>,
}

impl std::fmt::Debug for NamedReconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamedReconciler")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl NamedReconciler {
    /// `reconciler` under `name`.
    pub fn new<R: Reconciler>(name: impl Into<String>, reconciler: Arc<R>) -> Self {
        let name: Arc<str> = Arc::from(name.into());
        let bound = name.clone();
        NamedReconciler {
            name,
            run: Arc::new(move |ctx, key| {
                let (r, n) = (reconciler.clone(), bound.clone());
                Box::pin(async move { run_key(r.as_ref(), &n, &ctx, &key).await })
            }),
        }
    }

    /// The reconciler's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `key` through [`run_key`] under this name.
    pub fn run_key(&self, ctx: Context, key: String) -> BoxFuture<'static, RunResult> {
        (self.run)(ctx, key)
    }
}
