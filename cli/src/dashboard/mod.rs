//! `converge dashboard`: the operations dashboard, served by the CLI over the
//! same database and control plane (axum, server-rendered HTML, no
//! JavaScript, the stylesheet embedded in the binary).
//!
//! Who may see and who may act ([`access`]): a loopback address is served to
//! this host (requests naming another `Host` are refused, against DNS
//! rebinding); any other address needs an access token. Every action is a
//! POST carrying the page's CSRF token, and is refused from another origin.
//! The dashboard acts only when its database role may (an operator role; a
//! viewer role, or `--read-only`, shows everything and acts on nothing), and
//! every action is audited as the CLI's are.

mod access;
mod convergence;
mod dead_letters;
mod pages;
mod pending;
mod replay;
mod sweeps;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::args::DashboardArgs;
use crate::context::Ctx;
use crate::error::{bad_input, CliError, CliResult};
use crate::output::outln;

/// What the dashboard's role lets it do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Power {
    /// Sees and acts.
    Operator,
    /// Sees only.
    Viewer,
}

/// The dashboard's shared state.
pub(crate) struct Dashboard {
    /// The CLI's context (database pool, NATS client, actor).
    pub(crate) ctx: Ctx,
    /// The access token, if one is required.
    pub(crate) token: Option<String>,
    /// The CSRF token every action must carry (random per process).
    pub(crate) csrf: String,
    /// Whether it may act.
    pub(crate) power: Power,
    /// Why it may not, when it may not.
    pub(crate) read_only_because: Option<String>,
    /// Who acts, in the audit log.
    pub(crate) actor: String,
    /// The database role it connected as.
    pub(crate) role: String,
    /// Whether it listens on loopback (the `Host` check).
    pub(crate) loopback: bool,
    /// Confirmations shown and not yet used.
    pub(crate) pending: pending::Pending,
    /// Actions running (waited for at shutdown).
    pub(crate) tasks: TaskTracker,
}

/// How long shutting down waits for actions still running.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(180);

/// Shared state as axum hands it out.
pub(crate) type Shared = Arc<Dashboard>;

/// `converge dashboard --listen ADDR:PORT [--access-token T] [--read-only]`
pub(crate) async fn serve(ctx: &Ctx, args: DashboardArgs) -> CliResult<()> {
    let loopback = args.listen.ip().is_loopback();
    let token = args.access_token.filter(|t| !t.is_empty());
    match &token {
        None if !loopback => {
            return Err(bad_input(format!(
                "--listen {}: not a loopback address, so the dashboard needs an access token: \
                 pass --access-token (or CONVERGE_DASHBOARD_TOKEN), at least 16 characters, and put TLS \
                 in front of it on a network you do not trust",
                args.listen
            )))
        }
        Some(t) if t.chars().count() < 16 => {
            return Err(bad_input(
                "--access-token: at least 16 characters (e.g. `openssl rand -hex 16`)",
            ))
        }
        _ => {}
    }
    let ctx = Ctx::new(ctx.global.clone());
    let pool = ctx.pool().await?;
    // Fail at start: the schema must be there, and the role's powers known.
    let (role, can_act): (String, bool) = sqlx::query_as(
        "SELECT current_user::text, \
                has_column_privilege('converge.dead_letters', 'resolved_at', 'UPDATE') \
                AND has_table_privilege('converge.audit', 'INSERT')",
    )
    .fetch_one(pool)
    .await
    .map_err(CliError::from)?;
    sqlx::query("SELECT 1 FROM converge.convergence_history LIMIT 0")
        .execute(pool)
        .await
        .map_err(|e| {
            CliError::Failed(format!(
                "the converge schema predates the dashboard ({e}): run `converge migrate`"
            ))
        })?;
    let read_only_because = if args.read_only {
        Some("started with --read-only".to_owned())
    } else if !can_act {
        Some(format!(
            "its database role {role} may not resolve dead letters or write the audit log \
             (a viewer role); connect as an operator role to act"
        ))
    } else {
        None
    };
    let power = if read_only_because.is_some() {
        Power::Viewer
    } else {
        Power::Operator
    };
    let actor = format!("{} (dashboard)", ctx.actor());
    let state = Arc::new(Dashboard {
        ctx,
        token,
        csrf: access::random_token(),
        power,
        read_only_because,
        actor,
        role,
        loopback,
        pending: pending::Pending::default(),
        tasks: TaskTracker::new(),
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| bad_input(format!("--listen {}: cannot listen: {e}", args.listen)))?;
    let local = listener
        .local_addr()
        .map_err(|e| CliError::Failed(format!("the listening address: {e}")))?;
    outln!(
        "converge dashboard on http://{local}/ as database role {} ({}){}",
        state.role,
        match state.power {
            Power::Operator => "operator: acts",
            Power::Viewer => "viewer: read-only",
        },
        if state.token.is_some() {
            "; log in at /login"
        } else {
            ""
        }
    );
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        stopped().await;
        stop.cancel();
    });
    let tasks = state.tasks.clone();
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(|e| CliError::Failed(format!("the dashboard's server failed: {e}")));
    // Actions still running finish (their audit rows get their outcome).
    tasks.close();
    if tokio::time::timeout(DRAIN, tasks.wait()).await.is_err() {
        eprintln!(
            "converge: stopped with {} dashboard actions still running after {} s; their audit \
             rows have no outcome (see `converge audit`)",
            tasks.len(),
            DRAIN.as_secs()
        );
    }
    served
}

/// Ctrl-c, or SIGTERM (systemd, Kubernetes).
async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/convergence", get(convergence::page_route))
        .route("/sweeps", get(sweeps::page_route))
        .route("/sweeps/runs/{id}", get(sweeps::run))
        .route("/sweeps/runs/{id}/replay", post(replay::replay))
        .route("/dead-letters", get(dead_letters::list))
        .route("/dead-letters/confirm", get(dead_letters::confirm))
        .route("/dead-letters/act", post(dead_letters::act))
        .route("/dead-letters/{id}", get(dead_letters::show))
        .route("/leases", get(pages::leases))
        .route("/audit", get(pages::audit))
        .route("/login", get(access::login_form).post(access::login))
        .route("/assets/style.css", get(access::stylesheet))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access::guard,
        ))
        .with_state(state)
}
