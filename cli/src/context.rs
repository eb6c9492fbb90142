//! What every command needs: the global options, and the connections made
//! on first use (a command that needs no NATS never connects to it).

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::OnceCell;

use crate::args::GlobalArgs;
use crate::error::{bad_input, CliError, CliResult};

/// A worker counts as live while its heartbeat is younger than this.
pub(crate) const LIVE_WORKER_SQL: &str = "heartbeat_at > now() - interval '60 seconds'";

/// The global options and lazily made connections.
pub(crate) struct Ctx {
    /// The global options.
    pub(crate) global: GlobalArgs,
    pool: OnceCell<PgPool>,
    nats: OnceCell<async_nats::Client>,
    connect: std::sync::OnceLock<converge::nats::NatsConnect>,
}

impl Ctx {
    /// A context for these options.
    pub(crate) fn new(global: GlobalArgs) -> Ctx {
        Ctx {
            global,
            pool: OnceCell::new(),
            nats: OnceCell::new(),
            connect: std::sync::OnceLock::new(),
        }
    }

    /// Whether to print JSON.
    pub(crate) fn json(&self) -> bool {
        self.global.json || self.global.output == Some(crate::args::OutputFormat::Json)
    }

    /// `--app`, checked against the applications whose workers registered
    /// in `converge.workers`: a typo exits 2 naming the known ones instead
    /// of showing an empty screen or waiting for a reply no one sends.
    pub(crate) async fn known_app(&self) -> CliResult<Option<&str>> {
        let Some(app) = self.global.app.as_deref() else {
            return Ok(None);
        };
        if app.is_empty() || app.contains(['.', '*', '>', ' ']) {
            return Err(bad_input(format!(
                "--app {app:?}: an application name is one NATS subject token \
                 (no '.', '*', '>' or spaces)"
            )));
        }
        let known: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT application FROM converge.workers ORDER BY 1")
                .fetch_all(self.pool().await?)
                .await?;
        // No worker registered at all: nothing to compare with; the command
        // says no worker is live (exit 1) where it needs one.
        if known.is_empty() || known.iter().any(|k| k == app) {
            return Ok(Some(app));
        }
        Err(bad_input(format!(
            "--app {app:?} is not an application with a registered worker (a typo, or all its \
             workers are stopped); known: {}",
            known.join(", ")
        )))
    }

    /// The database pool, connecting on first use.
    pub(crate) async fn pool(&self) -> CliResult<&PgPool> {
        self.pool
            .get_or_try_init(|| async {
                use converge::postgres::{PgConnect, PgConnectError};
                // Connects once first: a pool reports only "timed out", a
                // connection says why (refused, no such database, auth).
                PgConnect::new(self.global.database_url.clone())
                    .max_connections(4)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect()
                    .await
                    .map_err(|e| match e {
                        PgConnectError::InvalidUrl { .. } => {
                            bad_input(format!("--database-url / DATABASE_URL: {e}"))
                        }
                        PgConnectError::Unreachable { url, source } => {
                            CliError::DatabaseUnreachable { url, source }
                        }
                        other => CliError::Failed(format!(
                            "{other}\nhint: if a fail-over is under way, try again once a \
                             standby is promoted"
                        )),
                    })
            })
            .await
    }

    /// The NATS client, connecting on first use.
    pub(crate) async fn nats(&self) -> CliResult<&async_nats::Client> {
        self.nats
            .get_or_try_init(|| async {
                let g = &self.global;
                let mut nats = converge::nats::NatsConnect::new(g.nats_url.clone());
                nats.creds = g.creds.clone();
                nats.nkey = g.nkey.clone();
                nats.user = g.user.clone();
                nats.password = g.password.clone();
                nats.token = g.token.clone();
                nats.tls_ca = g.tlsca.clone();
                nats.tls_cert = g.tlscert.clone();
                nats.tls_key = g.tlskey.clone();
                nats.inbox_prefix = g.inbox_prefix.clone();
                let nats = self.connect.get_or_init(|| nats.name("converge-cli"));
                nats.connect()
                    .await
                    .map_err(|source| CliError::NatsUnreachable { source })
            })
            .await
    }

    /// The last permissions violation NATS reported on this CLI's connection.
    pub(crate) fn nats_refusal(&self) -> Option<String> {
        self.connect.get().and_then(|c| c.last_refusal())
    }

    /// Forgets an earlier permissions violation, before a new action.
    pub(crate) fn forget_nats_refusal(&self) {
        if let Some(c) = self.connect.get() {
            c.take_refusal();
        }
    }

    /// JetStream on the NATS client.
    pub(crate) async fn jetstream(&self) -> CliResult<async_nats::jetstream::Context> {
        Ok(async_nats::jetstream::new(self.nats().await?.clone()))
    }

    /// Who acts: `--actor`, else `$USER`, else `$LOGNAME`, else the OS
    /// user of this process (`id -un`), else `uid <n>`.
    pub(crate) fn actor(&self) -> String {
        let non_empty = |a: &String| !a.trim().is_empty();
        self.global
            .actor
            .clone()
            .filter(non_empty)
            .or_else(|| std::env::var("USER").ok().filter(non_empty))
            .or_else(|| std::env::var("LOGNAME").ok().filter(non_empty))
            .or_else(os_user)
            .unwrap_or_else(|| "unknown".into())
    }

    /// The application to reach: `--app`, or the only one with a live worker.
    pub(crate) async fn app(&self) -> CliResult<String> {
        if let Some(app) = self.known_app().await? {
            return Ok(app.to_owned());
        }
        let apps: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT DISTINCT application FROM converge.workers WHERE {LIVE_WORKER_SQL} ORDER BY 1"
        ))
        .fetch_all(self.pool().await?)
        .await?;
        match apps.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(bad_input(
                "no application has a live worker in converge.workers; \
                 start the application's worker, or name it with --app NAME (or CONVERGE_APP)",
            )),
            many => Err(bad_input(format!(
                "several applications have live workers: {}; choose one with --app NAME",
                many.join(", ")
            ))),
        }
    }
}

/// The URL with its password hidden.
pub(crate) use converge::postgres::redact;

/// The name of the OS user running this process.
fn os_user() -> Option<String> {
    let out = std::process::Command::new("id").arg("-un").output().ok()?;
    let name = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    if out.status.success() && !name.is_empty() {
        return Some(name);
    }
    // No `id`: the numeric uid from /proc.
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    Some(format!("uid {}", uid.split_whitespace().next()?))
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("nonsense"), "<not a URL>");
    }
}
