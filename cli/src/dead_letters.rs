//! `converge dead-letters`: list, show, retry (through a worker), discard.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::args::BulkArgs;
use crate::audit::{self, AuditOutcome, Settled};
use crate::context::Ctx;
use crate::dead_letter_filter::{select, Selection};
use crate::error::{bad_input, CliError, CliResult};
use crate::output::outln;
use crate::output::{self, Table};

/// A row of `converge.dead_letters`.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub(crate) struct DeadLetterRow {
    pub(crate) id: i64,
    pub(crate) reconciler: String,
    pub(crate) aggregate_key: String,
    pub(crate) path: String,
    pub(crate) event_id: Option<Uuid>,
    pub(crate) subject: Option<String>,
    pub(crate) headers: Option<Value>,
    /// The payload as JSON when it is JSON, as text when it is UTF-8, else as hex.
    #[serde(serialize_with = "serialize_payload")]
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) error: String,
    pub(crate) permanent: bool,
    pub(crate) attempts: i32,
    pub(crate) first_attempt_at: Option<DateTime<Utc>>,
    pub(crate) failed_at: DateTime<Utc>,
    pub(crate) recovered_at: Option<DateTime<Utc>>,
    pub(crate) recover_error: Option<String>,
    pub(crate) resolved_at: Option<DateTime<Utc>>,
    pub(crate) resolution: Option<String>,
    pub(crate) resolved_by: Option<String>,
}

pub(crate) const SELECT: &str =
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

/// The payload as JSON when it is JSON, as text when it is UTF-8, else as
/// `{"hex": …}`.
pub(crate) fn payload_value(bytes: &[u8]) -> Value {
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
    table(&rows, all).print_or(if all {
        "no dead letters"
    } else {
        "no open dead letters"
    });
    Ok(())
}

/// The letters with these ids, as `list` prints them (oldest first).
pub(crate) async fn print_ids(pool: &PgPool, ids: &[i64], json: bool) -> CliResult<()> {
    let rows: Vec<DeadLetterRow> =
        sqlx::query_as(&format!("{SELECT} WHERE id = ANY($1) ORDER BY id"))
            .bind(ids)
            .fetch_all(pool)
            .await?;
    if json {
        return output::print_json(&rows);
    }
    table(&rows, false).print_or("no dead letters");
    Ok(())
}

fn table(rows: &[DeadLetterRow], all: bool) -> Table {
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
    for d in rows {
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
    table
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

/// `converge dead-letters discard ID... | --reconciler R --since AGE --error-like TEXT`
pub(crate) async fn discard(ctx: &Ctx, ids: Vec<i64>, bulk: BulkArgs) -> CliResult<()> {
    let pool = ctx.pool().await?;
    if ids.is_empty() {
        let Some(selection) = select(pool, &bulk, "discard", ctx.json()).await? else {
            return Ok(());
        };
        let done =
            discard_selected(pool, &ctx.actor(), ctx.global.reason.as_deref(), &selection).await?;
        if ctx.json() {
            return output::print_json(&json!({
                "discarded": done.discarded, "already_resolved": done.already_resolved,
                "matched": selection.matches.total, "audit_id": done.audit_id,
            }));
        }
        outln!(
            "discarded {} dead letters {} (by {}){}",
            done.discarded,
            selection.filter.describe(),
            ctx.actor(),
            if done.already_resolved > 0 {
                format!("; {} were resolved meanwhile", done.already_resolved)
            } else {
                String::new()
            }
        );
        if let Some(note) = selection.more_note() {
            outln!("{note}");
        }
        return Ok(());
    }
    bulk.refuse_with_ids()?;
    let ids = unique_ids(ids);
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

/// How a bulk discard ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BulkDiscard {
    /// Letters this action resolved.
    pub(crate) discarded: usize,
    /// Letters of the selection someone else resolved in between.
    pub(crate) already_resolved: usize,
    /// The action's row in `converge.audit`.
    pub(crate) audit_id: i64,
}

/// Discards the selected letters that are still open, in one statement,
/// audited as one action (`dead_letter.discard`) with its count.
pub(crate) async fn discard_selected(
    pool: &PgPool,
    actor: &str,
    reason: Option<&str>,
    selection: &Selection,
) -> CliResult<BulkDiscard> {
    let ids = &selection.matches.ids;
    let entry = audit::begin_as(
        pool,
        actor,
        reason,
        "dead_letter.discard",
        &selection.target(),
        selection.details(),
    )
    .await?;
    let audit_id = entry.id;
    entry
        .settle(async {
            let discarded: i64 = sqlx::query_scalar(
                "WITH done AS (UPDATE converge.dead_letters \
                   SET resolved_at = now(), resolution = 'discarded', resolved_by = $2 \
                   WHERE id = ANY($1) AND resolved_at IS NULL RETURNING 1) \
                 SELECT count(*) FROM done",
            )
            .bind(ids)
            .bind(actor)
            .fetch_one(pool)
            .await?;
            let done = BulkDiscard {
                discarded: discarded as usize,
                already_resolved: ids.len() - discarded as usize,
                audit_id,
            };
            Ok(Settled::ok(
                json!({ "discarded": done.discarded, "already_resolved": done.already_resolved }),
                done,
            ))
        })
        .await
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
