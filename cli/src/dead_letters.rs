//! `converge dead-letters`: list, show, retry (through a worker), discard.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::audit::{self, AuditOutcome, Settled};
use crate::context::Ctx;
use crate::error::{bad_input, CliError, CliResult};
use crate::output::outln;
use crate::output::{self, Table};

/// A row of `converge.dead_letters`.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub(crate) struct DeadLetterRow {
    id: i64,
    reconciler: String,
    aggregate_key: String,
    path: String,
    event_id: Option<Uuid>,
    subject: Option<String>,
    headers: Option<Value>,
    /// The payload as JSON when it is JSON, as text when it is UTF-8, else as hex.
    #[serde(serialize_with = "serialize_payload")]
    payload: Option<Vec<u8>>,
    error: String,
    permanent: bool,
    attempts: i32,
    first_attempt_at: Option<DateTime<Utc>>,
    failed_at: DateTime<Utc>,
    recovered_at: Option<DateTime<Utc>>,
    recover_error: Option<String>,
    resolved_at: Option<DateTime<Utc>>,
    resolution: Option<String>,
    resolved_by: Option<String>,
}

const SELECT: &str =
    "SELECT id, reconciler, aggregate_key, path, event_id, subject, headers, payload, \
    error, permanent, attempts, first_attempt_at, failed_at, recovered_at, recover_error, \
    resolved_at, resolution, resolved_by FROM converge.dead_letters";

fn serialize_payload<S: serde::Serializer>(
    payload: &Option<Vec<u8>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    payload
        .as_deref()
        .map_or(Value::Null, payload_value)
        .serialize(serializer)
}

fn payload_value(bytes: &[u8]) -> Value {
    if let Ok(v) = serde_json::from_slice::<Value>(bytes) {
        return v;
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => Value::String(text.to_owned()),
        Err(_) => {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            json!({ "hex": hex })
        }
    }
}

/// Dead letters, newest first: of `reconciler` (all when `None`), resolved
/// ones too when `all`, only `id` when given.
async fn fetch(
    pool: &PgPool,
    reconciler: Option<&str>,
    all: bool,
    id: Option<i64>,
    limit: i64,
) -> CliResult<Vec<DeadLetterRow>> {
    Ok(sqlx::query_as(&format!(
        "{SELECT} WHERE ($1::text IS NULL OR reconciler = $1) AND ($2 OR resolved_at IS NULL) \
           AND ($3::bigint IS NULL OR id = $3) ORDER BY id DESC LIMIT $4"
    ))
    .bind(reconciler)
    .bind(all)
    .bind(id)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// `converge dead-letters list`
pub(crate) async fn list(
    ctx: &Ctx,
    reconciler: Option<&str>,
    all: bool,
    limit: i64,
) -> CliResult<()> {
    let rows = fetch(ctx.pool().await?, reconciler, all, None, limit).await?;
    if ctx.json() {
        return output::print_json(&rows);
    }
    let mut headers = vec![
        "ID",
        "RECONCILER",
        "KEY",
        "PATH",
        "ATTEMPTS",
        "FAILED AT",
        "ERROR",
    ];
    if all {
        headers.push("RESOLVED");
    }
    let mut table = Table::new(&headers);
    for d in &rows {
        let mut cells = vec![
            d.id.to_string(),
            d.reconciler.clone(),
            output::cut(&d.aggregate_key, 30),
            d.path.clone(),
            format!(
                "{}{}",
                d.attempts,
                if d.permanent { " (permanent)" } else { "" }
            ),
            output::time(d.failed_at),
            output::cut(&d.error, 50),
        ];
        if all {
            cells.push(output::opt(d.resolution.as_deref()));
        }
        table.row(cells);
    }
    table.print_or(if all {
        "no dead letters"
    } else {
        "no open dead letters"
    });
    Ok(())
}

/// `converge dead-letters show ID`
pub(crate) async fn show(ctx: &Ctx, id: i64) -> CliResult<()> {
    let rows = fetch(ctx.pool().await?, None, true, Some(id), 1).await?;
    let Some(d) = rows.into_iter().next() else {
        return Err(bad_input(format!("no dead letter with id {id}")));
    };
    if ctx.json() {
        return output::print_json(&d);
    }
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let fields: Vec<(&str, String)> = vec![
        ("id", d.id.to_string()),
        ("reconciler", d.reconciler.clone()),
        ("key", d.aggregate_key.clone()),
        ("path", d.path.clone()),
        ("event id", output::opt(d.event_id)),
        ("subject", output::opt(d.subject.as_deref())),
        ("error", d.error.clone()),
        ("permanent", d.permanent.to_string()),
        ("attempts", d.attempts.to_string()),
        ("first attempt", output::opt_time(d.first_attempt_at)),
        ("failed at", output::time(d.failed_at)),
        ("recovered at", output::opt_time(d.recovered_at)),
        ("recover error", output::opt(d.recover_error.as_deref())),
        ("resolved at", output::opt_time(d.resolved_at)),
        ("resolution", output::opt(d.resolution.as_deref())),
        ("resolved by", output::opt(d.resolved_by.as_deref())),
        (
            "headers",
            d.headers.as_ref().map(pretty).unwrap_or_else(|| "-".into()),
        ),
        (
            "payload",
            d.payload
                .as_deref()
                .map_or_else(|| "-".into(), |p| pretty(&payload_value(p))),
        ),
    ];
    for (name, value) in fields {
        outln!(
            "{:<14} {}",
            format!("{name}:"),
            value.replace('\n', "\n               ")
        );
    }
    Ok(())
}

/// Checks that every id names an open dead letter; nothing is done otherwise.
pub(crate) async fn check_open(pool: &PgPool, ids: &[i64]) -> CliResult<()> {
    // (id, resolved_at, resolution, resolved_by)
    type Found = (i64, Option<DateTime<Utc>>, Option<String>, Option<String>);
    let found: Vec<Found> = sqlx::query_as(
        "SELECT id, resolved_at, resolution, resolved_by FROM converge.dead_letters WHERE id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    let missing: Vec<String> = ids
        .iter()
        .filter(|id| !found.iter().any(|f| f.0 == **id))
        .map(|id| id.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(bad_input(format!(
            "no dead letter with id {}; nothing was done (see `converge dead-letters list`)",
            missing.join(", ")
        )));
    }
    let resolved: Vec<String> = found
        .iter()
        .filter_map(|(id, at, resolution, by)| {
            at.map(|at| {
                format!(
                    "{id} ({} by {} at {})",
                    resolution.as_deref().unwrap_or("resolved"),
                    by.as_deref().unwrap_or("?"),
                    output::time(at)
                )
            })
        })
        .collect();
    if !resolved.is_empty() {
        return Err(bad_input(format!(
            "already resolved: {}; nothing was done",
            resolved.join(", ")
        )));
    }
    Ok(())
}

/// The ids as `1,2,3`.
pub(crate) fn id_list(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

/// The ids sorted, each once (`discard 7 7` names one dead letter).
pub(crate) fn unique_ids(mut ids: Vec<i64>) -> Vec<i64> {
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// `converge dead-letters discard ID...`
pub(crate) async fn discard(ctx: &Ctx, ids: Vec<i64>) -> CliResult<()> {
    let ids = unique_ids(ids);
    let pool = ctx.pool().await?;
    check_open(pool, &ids).await?;
    let actor = ctx.actor();
    let entry = audit::begin(
        ctx,
        "dead_letter.discard",
        &format!("dead letters {}", id_list(&ids)),
        json!({ "ids": ids }),
    )
    .await?;
    let audit_id = entry.id;
    entry
        .settle(async {
            let mut tx = pool.begin().await?;
            let discarded: Vec<i64> = sqlx::query_scalar(
                "UPDATE converge.dead_letters \
                 SET resolved_at = now(), resolution = 'discarded', resolved_by = $2 \
                 WHERE id = ANY($1) AND resolved_at IS NULL RETURNING id",
            )
            .bind(&ids)
            .bind(&actor)
            .fetch_all(&mut *tx)
            .await?;
            if discarded.len() != ids.len() {
                tx.rollback().await?;
                return Ok(Settled::err(
                    AuditOutcome::Failed,
                    json!({ "error": "resolved concurrently" }),
                    CliError::Failed(
                        "some of these dead letters were resolved meanwhile; nothing was \
                         discarded"
                            .into(),
                    ),
                ));
            }
            tx.commit().await?;
            Ok(Settled::ok(json!({}), ()))
        })
        .await?;
    if ctx.json() {
        return output::print_json(&json!({ "discarded": ids, "by": actor, "audit_id": audit_id }));
    }
    outln!("discarded dead letters {} (by {actor})", id_list(&ids));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_sorted_and_each_named_once() {
        assert_eq!(unique_ids(vec![9, 7, 7, 3, 9]), vec![3, 7, 9]);
        assert_eq!(id_list(&unique_ids(vec![7, 7])), "7");
    }
}
