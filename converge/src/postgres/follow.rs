//! Finding the host that takes writes, and following it when a fail-over
//! moves it: one sentinel connection asks the current host every probe
//! interval; when it is gone or read-only, the hosts are asked in the URL's
//! order (the current one first) and the pool's connect options move to the
//! first that takes writes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection, PgPool, Row};

use super::hosts::{Host, PgHosts, TargetSession};

/// When the pool last moved to another host: connections opened before it
/// are closed instead of handed out (they may be on a server that no longer
/// takes writes).
#[derive(Debug, Default)]
pub(crate) struct Moved(Mutex<Option<Instant>>);

impl Moved {
    fn mark(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// Whether a connection `age` old was opened after the last move.
    pub(crate) fn opened_since(&self, age: Duration) -> bool {
        match *self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(moved) => Instant::now()
                .checked_sub(age)
                .is_some_and(|opened| opened >= moved),
            None => true,
        }
    }
}

/// The statement that tells a server's kind: in recovery (a standby), and
/// whether new transactions are read-only.
const KIND: &str = "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on'";

/// Why a host was not taken.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// No connection (refused, unknown database, credentials, no answer).
    Connect(sqlx::Error),
    /// It answered, but is not what the URL's target asks for.
    Kind(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Connect(e) => e.fmt(f),
            Refusal::Kind(why) => f.write_str(why),
        }
    }
}

/// Whether the server behind `conn` is what `target` asks for: `Ok(Err(why))`
/// when it answers but is not.
async fn kind(
    conn: &mut PgConnection,
    target: TargetSession,
) -> Result<Result<(), String>, sqlx::Error> {
    if target == TargetSession::Any {
        return Ok(Ok(()));
    }
    let row = sqlx::query(KIND).fetch_one(&mut *conn).await?;
    let (in_recovery, read_only): (bool, bool) = (row.try_get(0)?, row.try_get(1)?);
    let refused = match target {
        TargetSession::Primary => in_recovery.then_some("is in recovery (a standby)"),
        _ if in_recovery => Some("is in recovery (a standby)"),
        _ => read_only.then_some("takes no writes (transaction_read_only is on)"),
    };
    Ok(match refused {
        Some(why) => Err(format!(
            "the server {why}, and target_session_attrs={} asks for one that does",
            target.as_str()
        )),
        None => Ok(()),
    })
}

/// [`kind`] for the pool's `after_connect`: a server of the wrong kind is an
/// I/O error, not a configuration one, so the pool tries again (the follower
/// may move it meanwhile) and converge's callers count it as transient,
/// which it is during a fail-over.
pub(crate) async fn check_kind(
    conn: &mut PgConnection,
    target: TargetSession,
) -> Result<(), sqlx::Error> {
    kind(conn, target)
        .await?
        .map_err(|why| sqlx::Error::Io(std::io::Error::other(why)))
}

/// Connects to `host` within `timeout` and checks its kind.
async fn try_host(
    host: &Host,
    target: TargetSession,
    timeout: Duration,
) -> Result<PgConnection, Refusal> {
    let attempt = async {
        let mut conn = PgConnection::connect_with(&host.options)
            .await
            .map_err(Refusal::Connect)?;
        match kind(&mut conn, target).await {
            Ok(Ok(())) => Ok(conn),
            Ok(Err(why)) => {
                let _ = conn.close().await;
                Err(Refusal::Kind(why))
            }
            Err(e) => Err(Refusal::Connect(e)),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(Refusal::Connect(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )))),
    }
}

/// The first host, from `start` on in the URL's order (wrapping), that is
/// what the URL's target asks for, with a connection to it; otherwise each
/// host's reason, in the URL's order.
pub(crate) async fn find(
    hosts: &PgHosts,
    start: usize,
    timeout: Duration,
) -> Result<(usize, PgConnection), Vec<(String, Refusal)>> {
    let n = hosts.hosts.len();
    let mut reasons = Vec::with_capacity(n);
    for step in 0..n {
        let i = (start + step) % n;
        let host = &hosts.hosts[i];
        match try_host(host, hosts.target, timeout).await {
            Ok(conn) => return Ok((i, conn)),
            Err(why) => reasons.push((i, host.label.clone(), why)),
        }
    }
    reasons.sort_by_key(|(i, _, _)| *i);
    Err(reasons
        .into_iter()
        .map(|(_, host, why)| (host, why))
        .collect())
}

/// Follows the writable host for `pool` until the pool is closed.
pub(crate) async fn follow(
    pool: PgPool,
    hosts: Arc<PgHosts>,
    mut current: usize,
    mut sentinel: Option<PgConnection>,
    moved: Arc<Moved>,
    probe_every: Duration,
    timeout: Duration,
) {
    let mut warned_none = false;
    loop {
        tokio::time::sleep(probe_every).await;
        if pool.is_closed() {
            break;
        }
        if let Some(conn) = sentinel.as_mut() {
            let asked = tokio::time::timeout(timeout, check_kind(conn, hosts.target)).await;
            if matches!(asked, Ok(Ok(()))) {
                continue;
            }
            tracing::debug!(host = %hosts.hosts[current].label, "the current PostgreSQL host no longer answers as writable");
        }
        sentinel = None;
        match find(&hosts, current, timeout).await {
            Ok((found, conn)) => {
                sentinel = Some(conn);
                warned_none = false;
                if found != current {
                    pool.set_connect_options(hosts.hosts[found].options.clone());
                    moved.mark();
                    metrics::counter!(crate::metrics::POSTGRES_HOST_CHANGES).increment(1);
                    tracing::warn!(
                        from = %hosts.hosts[current].label,
                        to = %hosts.hosts[found].label,
                        target_session_attrs = hosts.target.as_str(),
                        "PostgreSQL: the writable host moved; new connections go to the new one"
                    );
                    current = found;
                }
            }
            Err(reasons) => {
                if !warned_none {
                    warned_none = true;
                    tracing::warn!(
                        hosts = %describe(&reasons),
                        "PostgreSQL: no host takes writes (a fail-over in progress?); asking again every {probe_every:?}"
                    );
                }
            }
        }
    }
    if let Some(conn) = sentinel {
        let _ = conn.close().await;
    }
}

/// `host: reason; host: reason` in the URL's order.
pub(crate) fn describe(reasons: &[(String, Refusal)]) -> String {
    reasons
        .iter()
        .map(|(host, why)| format!("{host}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}
