//! `converge leases` (alias `locks`): the cluster-wide leases of `converge.leases`.
//!
//! Releasing bumps the lease's fencing token: a holder that still runs finds
//! its heartbeats and fenced writes (`WHERE token = <its token>`) rejected, so
//! it stops instead of silently taking the lease back with its next heartbeat.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;

use crate::audit::{self, AuditOutcome, Settled};
use crate::context::Ctx;
use crate::error::{bad_input, CliError, CliResult};
use crate::output::outln;
use crate::output::{self, Table};

/// A row of `converge.leases`.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub(crate) struct LeaseRow {
    /// The lease's name.
    pub(crate) name: String,
    /// Its holder, if any.
    pub(crate) holder: Option<String>,
    /// Fencing token (grows on every acquisition and forced release).
    pub(crate) token: i64,
    /// When the holder acquired it.
    pub(crate) acquired_at: Option<DateTime<Utc>>,
    /// The holder's last heartbeat.
    pub(crate) heartbeat_at: Option<DateTime<Utc>>,
    /// Nobody else may acquire before this.
    pub(crate) lock_until: Option<DateTime<Utc>>,
    /// When it was last released.
    pub(crate) released_at: Option<DateTime<Utc>>,
    /// `lock_until > now()` on the database clock.
    pub(crate) live: bool,
}

// `lock_until` may be '-infinity', which chrono cannot hold: shown as NULL.
const COLUMNS: &str = "name, holder, token, acquired_at, heartbeat_at, \
    CASE WHEN isfinite(lock_until) THEN lock_until END AS lock_until, released_at, \
    lock_until > now() AS live";

/// Leases, live ones only when `live_only`.
pub(crate) async fn leases(pool: &PgPool, live_only: bool) -> CliResult<Vec<LeaseRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM converge.leases WHERE NOT $1 OR lock_until > now() ORDER BY name"
    ))
    .bind(live_only)
    .fetch_all(pool)
    .await?)
}

/// Leases as a table.
pub(crate) fn leases_table(rows: &[LeaseRow], now: DateTime<Utc>) -> Table {
    let mut table = Table::new(&[
        "NAME",
        "HOLDER",
        "TOKEN",
        "ACQUIRED",
        "HEARTBEAT",
        "LOCK UNTIL",
        "LIVE",
    ]);
    for l in rows {
        table.row(vec![
            l.name.clone(),
            output::opt(l.holder.as_deref()),
            l.token.to_string(),
            output::opt_time(l.acquired_at),
            output::opt_relative(l.heartbeat_at, now),
            output::opt_relative(l.lock_until, now),
            if l.live { "yes" } else { "no" }.into(),
        ]);
    }
    table
}

/// `converge leases list`
pub(crate) async fn list(ctx: &Ctx) -> CliResult<()> {
    let pool = ctx.pool().await?;
    let rows = leases(pool, false).await?;
    if ctx.json() {
        return output::print_json(&rows);
    }
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    leases_table(&rows, now).print_or("no leases");
    Ok(())
}

/// `converge leases release NAME [--force]`
pub(crate) async fn release(ctx: &Ctx, name: &str, force: bool) -> CliResult<()> {
    let pool = ctx.pool().await?;
    let current: Option<LeaseRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM converge.leases WHERE name = $1"
    ))
    .bind(name)
    .fetch_optional(pool)
    .await?;
    let Some(current) = current else {
        let known: Vec<String> = leases(pool, false)
            .await?
            .into_iter()
            .map(|l| l.name)
            .collect();
        return Err(bad_input(format!(
            "no lease named {name:?}; known leases: {}",
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        )));
    };
    let holder = current.holder.clone().unwrap_or_else(|| "nobody".into());
    if current.live && !force {
        return Err(CliError::Failed(format!(
            "lease {name:?} is live: held by {holder} until {}; releasing it lets another \
             instance start while the holder may still be working\n\
             hint: pass --force to release it anyway (the holder's token is fenced off)",
            output::opt_time(current.lock_until)
        )));
    }
    let entry = audit::begin(
        ctx,
        "lock.release",
        name,
        json!({ "force": force, "holder": current.holder, "token": current.token,
                "live": current.live, "lock_until": current.lock_until }),
    )
    .await?;
    let audit_id = entry.id;
    // Fenced on the token read above: if the lease changed hands meanwhile,
    // nothing is released and the operator looks again.
    let token = entry
        .settle(async {
            let released: Option<i64> = sqlx::query_scalar(
                "UPDATE converge.leases \
                 SET lock_until = now(), holder = NULL, released_at = now(), token = token + 1 \
                 WHERE name = $1 AND token = $2 RETURNING token",
            )
            .bind(name)
            .bind(current.token)
            .fetch_optional(pool)
            .await?;
            Ok(match released {
                Some(token) => Settled::ok(json!({ "new_token": token }), token),
                None => Settled::err(
                    AuditOutcome::Failed,
                    json!({ "error": "the lease changed hands while releasing" }),
                    CliError::Failed(format!(
                        "lease {name:?} changed hands while releasing it; nothing was released \
                         (look again with `converge leases list`)"
                    )),
                ),
            })
        })
        .await?;
    if ctx.json() {
        return output::print_json(&json!({
            "released": name, "previous_holder": current.holder,
            "was_live": current.live, "token": token, "audit_id": audit_id,
        }));
    }
    outln!(
        "released lease {name} (was held by {holder}{}); token is now {token}",
        if current.live { ", live" } else { "" }
    );
    Ok(())
}
