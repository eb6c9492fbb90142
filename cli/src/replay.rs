//! `converge outbox replay`: publish published events again, so consumers
//! see them again.
//!
//! The relay sends `Nats-Msg-Id` = event id, and JetStream drops a repeat of
//! an id within the stream's duplicate window; a replay therefore sends
//! `<event_id>:replay:<audit_id>` with the relay's other headers and
//! `Converge-Replay: <audit_id>`. Events go out in (tx_order, id) order (per
//! aggregate: version order), an aggregate's next event only after the
//! previous one was acknowledged. Unpublished events are never sent ahead of
//! the relay, and rejected ones never.

use std::cell::Cell;
use std::io::IsTerminal;
use std::process::ExitCode;

use serde_json::json;
use sqlx::Row;

use crate::args::ReplayArgs;
use crate::audit::{self, AuditOutcome, Settled};
use crate::context::Ctx;
use crate::error::{bad_input, CliError, CliResult};
use crate::outbox::{bind_filter, check_filter, describe, FILTER_SQL, PUBLISHED_SQL};
use crate::output::outln;
use crate::output::{self, Table};
use crate::replay_publish::{ReplayEvent, Sender};
use crate::target::{self, StreamTarget};

/// Above this many events a replay asks for confirmation (or `--yes`).
const CONFIRM_ABOVE: i64 = 1000;

const PAGE: i64 = 1000;

/// How many events match, by what happens to them.
struct Counts {
    /// Published, not rejected: will be sent (capped by `--limit`).
    to_send: i64,
    /// Not published yet: skipped.
    unpublished: i64,
    /// Rejected by the relay: never on the stream, skipped.
    rejected: i64,
    /// The (tx_order, id) of the last event to send.
    last: Option<(i64, i64)>,
}

async fn count(ctx: &Ctx, args: &ReplayArgs) -> CliResult<Counts> {
    let pool = ctx.pool().await?;
    let sql = format!(
        "SELECT count(*) FILTER (WHERE {PUBLISHED_SQL} AND r.event_id IS NULL), \
                count(*) FILTER (WHERE NOT {PUBLISHED_SQL}), \
                count(*) FILTER (WHERE r.event_id IS NOT NULL) \
         FROM converge.outbox o JOIN converge.relay_partitions p ON p.partition = o.partition \
         LEFT JOIN converge.relay_rejects r ON r.event_id = o.event_id WHERE {FILTER_SQL}"
    );
    let row = bind_filter(sqlx::query(&sql), &args.filter)
        .fetch_one(pool)
        .await?;
    let matching: i64 = row.try_get(0)?;
    let to_send = args.limit.map_or(matching, |l| l.min(matching));
    let mut last = None;
    if to_send > 0 {
        let sql = format!(
            "SELECT o.tx_order, o.id FROM converge.outbox o \
             JOIN converge.relay_partitions p ON p.partition = o.partition \
             WHERE {FILTER_SQL} AND {PUBLISHED_SQL} \
               AND NOT EXISTS (SELECT 1 FROM converge.relay_rejects r WHERE r.event_id = o.event_id) \
             ORDER BY o.tx_order, o.id OFFSET $8 LIMIT 1"
        );
        let row = bind_filter(sqlx::query(&sql), &args.filter)
            .bind(to_send - 1)
            .fetch_one(pool)
            .await?;
        last = Some((row.try_get(0)?, row.try_get(1)?));
    }
    Ok(Counts {
        to_send,
        unpublished: row.try_get(1)?,
        rejected: row.try_get(2)?,
        last,
    })
}

/// The next page after `after`, up to and including `last`.
async fn page(
    ctx: &Ctx,
    args: &ReplayArgs,
    after: (i64, i64),
    last: (i64, i64),
) -> CliResult<Vec<ReplayEvent>> {
    let sql = format!(
        "SELECT o.id, o.tx_order, o.event_id, o.aggregate_type, o.aggregate_id, o.version, \
                o.event_type, converge.event_time(o.occurred_at), o.headers::text, o.traceparent, \
                o.payload::text, o.schema_version \
         FROM converge.outbox o JOIN converge.relay_partitions p ON p.partition = o.partition \
         WHERE {FILTER_SQL} AND {PUBLISHED_SQL} \
           AND NOT EXISTS (SELECT 1 FROM converge.relay_rejects r WHERE r.event_id = o.event_id) \
           AND (o.tx_order, o.id) > ($8, $9) AND (o.tx_order, o.id) <= ($10, $11) \
         ORDER BY o.tx_order, o.id LIMIT $12"
    );
    let rows = bind_filter(sqlx::query(&sql), &args.filter)
        .bind(after.0)
        .bind(after.1)
        .bind(last.0)
        .bind(last.1)
        .bind(PAGE)
        .fetch_all(ctx.pool().await?)
        .await?;
    rows.iter()
        .map(|r| {
            let headers: String = r.try_get(8)?;
            Ok(ReplayEvent {
                id: r.try_get(0)?,
                tx_order: r.try_get(1)?,
                event_id: r.try_get(2)?,
                aggregate_type: r.try_get(3)?,
                aggregate_id: r.try_get(4)?,
                version: r.try_get(5)?,
                event_type: r.try_get(6)?,
                occurred_at: r.try_get(7)?,
                headers: serde_json::from_str(&headers).unwrap_or_default(),
                traceparent: r.try_get(9)?,
                payload: r.try_get(10)?,
                schema_version: u32::try_from(r.try_get::<i32, _>(11)?).unwrap_or(1).max(1),
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(CliError::from)
}

/// `converge outbox replay`
pub(crate) async fn replay(ctx: &Ctx, args: &ReplayArgs) -> CliResult<ExitCode> {
    if args.unpublished {
        return Err(bad_input(
            "--unpublished cannot be replayed: the relay publishes those events itself, \
             and a replay never runs ahead of it",
        ));
    }
    if args.limit.is_some_and(|l| l < 1) {
        return Err(bad_input("--limit must be at least 1"));
    }
    check_filter(&args.filter)?;
    let target = target::resolve(ctx, args.stream.as_deref(), args.prefix.as_deref()).await?;
    let counts = count(ctx, args).await?;
    let skipped = skipped_note(&counts);
    let Some(last) = counts.last else {
        if !ctx.json() {
            outln!(
                "no published events match ({}); nothing to replay{skipped}",
                describe(&args.filter)
            );
        } else {
            output::print_json(
                &json!({ "replayed": 0, "skipped_unpublished": counts.unpublished,
                                        "skipped_rejected": counts.rejected }),
            )?;
        }
        return Ok(ExitCode::SUCCESS);
    };
    if args.dry_run {
        return dry_run(ctx, args, &target, &counts, last).await;
    }
    if counts.to_send > CONFIRM_ABOVE && !args.yes {
        confirm(counts.to_send, &target)?;
    }
    let js = ctx.jetstream().await?;
    target::check_stream(&js, &target).await?;
    let entry = audit::begin(
        ctx,
        "outbox.replay",
        &describe(&args.filter),
        json!({ "stream": target.stream, "prefix": target.prefix, "events": counts.to_send,
                "skipped_unpublished": counts.unpublished, "skipped_rejected": counts.rejected,
                "limit": args.limit }),
    )
    .await?;
    let audit_id = entry.id;
    let progress = progress_bar(counts.to_send as u64);
    let sent = Cell::new(0u64);
    let sender = Sender {
        js: &js,
        target: &target,
        audit_id,
        batch: args.batch as usize,
        acked: &sent,
    };
    let work = async {
        let mut after = (i64::MIN, i64::MIN);
        let failure = loop {
            let events = match page(ctx, args, after, last).await {
                Ok(e) => e,
                Err(e) => break Some((None, e.to_string())),
            };
            let Some(tail) = events.last() else {
                break None;
            };
            after = (tail.tx_order, tail.id);
            let failed = sender.send(&events).await;
            progress.set_position(sent.get());
            if let Some((index, error)) = failed {
                break Some((Some(events[index].describe()), error));
            }
        };
        progress.finish_and_clear();
        let sent = sent.get();
        Ok(match failure {
            None => Settled::ok(json!({ "sent": sent }), sent),
            Some((first_not_sent, error)) => Settled::err(
                if sent == 0 {
                    AuditOutcome::Failed
                } else {
                    AuditOutcome::Partial
                },
                json!({ "sent": sent, "first_not_sent": first_not_sent, "error": error }),
                CliError::Failed(stopped_message(
                    sent,
                    counts.to_send,
                    first_not_sent.as_deref(),
                    &error,
                )),
            ),
        })
    };
    let sent = entry
        .settle_or_interrupt(work, || {
            progress.finish_and_clear();
            let sent = sent.get();
            Settled::err(
                if sent == 0 {
                    AuditOutcome::Interrupted
                } else {
                    AuditOutcome::Partial
                },
                json!({ "sent": sent, "interrupted": true }),
                CliError::Interrupted(format!(
                    "interrupted: {sent} of {} events were sent and acknowledged (events in \
                     flight may have reached the stream too); see audit #{audit_id}",
                    counts.to_send
                )),
            )
        })
        .await?;
    if ctx.json() {
        output::print_json(&json!({ "replayed": sent, "stream": target.stream,
            "audit_id": audit_id, "skipped_unpublished": counts.unpublished,
            "skipped_rejected": counts.rejected }))?;
    } else {
        outln!(
            "replayed {sent} events to stream {} (audit #{audit_id}){skipped}",
            target.stream
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Why a replay stopped, what was sent, and what a rerun would do.
fn stopped_message(sent: u64, total: i64, first_not_sent: Option<&str>, error: &str) -> String {
    let Some(first) = first_not_sent else {
        return format!(
            "replay stopped: {sent} of {total} events were sent; reading the next page of the \
             outbox failed\nerror: {error}"
        );
    };
    format!(
        "replay stopped: {sent} of {total} events were sent; first event not sent: {first}\n\
         error: {error}\n\
         note: a rerun from the first event not sent may resend events of other aggregates \
         from the same batch that were acknowledged after it (harmless for idempotent \
         consumers)"
    )
}

fn skipped_note(counts: &Counts) -> String {
    let mut note = String::new();
    if counts.unpublished > 0 {
        note.push_str(&format!(
            "\nskipped {} matching events the relay has not published yet (it will)",
            counts.unpublished
        ));
    }
    if counts.rejected > 0 {
        note.push_str(&format!(
            "\nskipped {} matching events the relay rejected (see converge.relay_rejects)",
            counts.rejected
        ));
    }
    note
}

async fn dry_run(
    ctx: &Ctx,
    args: &ReplayArgs,
    target: &StreamTarget,
    counts: &Counts,
    last: (i64, i64),
) -> CliResult<ExitCode> {
    let mut all = Vec::new();
    let mut after = (i64::MIN, i64::MIN);
    loop {
        let events = page(ctx, args, after, last).await?;
        let Some(tail) = events.last() else { break };
        after = (tail.tx_order, tail.id);
        all.extend(events);
    }
    if ctx.json() {
        let items: Vec<_> = all
            .iter()
            .map(|e| {
                json!({ "id": e.id, "event_id": e.event_id,
                "subject": target.subject(&e.aggregate_type, &e.event_type),
                "msg_id": format!("{}:replay:<audit id>", e.event_id),
                "aggregate_type": e.aggregate_type, "aggregate_id": e.aggregate_id,
                "version": e.version, "event_type": e.event_type })
            })
            .collect();
        output::print_json(&items)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&["ID", "SUBJECT", "AGGREGATE ID", "VERSION", "EVENT ID"]);
    for e in &all {
        table.row(vec![
            e.id.to_string(),
            target.subject(&e.aggregate_type, &e.event_type),
            output::cut(&e.aggregate_id, 30),
            e.version.to_string(),
            e.event_id.to_string(),
        ]);
    }
    output::emit(&table.render(0));
    outln!(
        "dry run: would replay {} events to stream {} ({}); nothing was sent{}",
        counts.to_send,
        target.stream,
        describe(&args.filter),
        skipped_note(counts)
    );
    Ok(ExitCode::SUCCESS)
}

fn confirm(n: i64, target: &StreamTarget) -> CliResult<()> {
    output::confirm(
        &format!("replay {n} events to stream {}?", target.stream),
        format!(
            "refusing to replay {n} events (more than {CONFIRM_ABOVE}) without confirmation\n\
             hint: pass --yes, or narrow the filter; --dry-run shows what would be sent"
        ),
        "not confirmed; nothing was sent",
    )
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} events  {per_sec}  eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}
