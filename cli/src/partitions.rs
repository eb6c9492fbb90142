//! `converge partitions`: the relay partition count, and changing it on a
//! live system (`converge_outbox::Partitions` does the work; see SCALING.md).

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::audit::{self, AuditOutcome, Settled};
use crate::context::Ctx;
use crate::error::{CliError, CliResult};
use crate::output::{self, outln};
use converge::{PartitionChangeConfig, PartitionError, Partitions};

/// How often a waiting change looks again.
const RETRY_EVERY: Duration = Duration::from_millis(250);

fn cli_error(e: PartitionError) -> CliError {
    match e {
        PartitionError::Database(e)
            if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42501") =>
        {
            CliError::PermissionDenied(format!(
                "PostgreSQL refused: {e}\nhint: changing the partition count rewrites \
                 converge.partition_of and a constraint of converge.outbox_heads: connect as the \
                 converge schema's owner (the role that runs `converge migrate`)"
            ))
        }
        PartitionError::Database(e) => CliError::from(e),
        other => CliError::Failed(other.to_string()),
    }
}

/// `converge partitions show`
pub(crate) async fn show(ctx: &Ctx) -> CliResult<()> {
    let pool = ctx.pool().await?;
    let layout = Partitions::new(pool.clone())
        .layout()
        .await
        .map_err(cli_error)?;
    let (elsewhere, unrecorded): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE partition <> \
                    converge.partition_of(aggregate_type, aggregate_id)), \
                count(*) FILTER (WHERE partition IS NULL) \
         FROM converge.outbox_heads",
    )
    .fetch_one(pool)
    .await?;
    let retired = layout.retired();
    if ctx.json() {
        return output::print_json(&json!({
            "partitions": layout.partitions, "previous": layout.previous,
            "served": layout.served, "retired": retired,
            "aggregates_to_move": elsewhere, "aggregates_unrecorded": unrecorded,
        }));
    }
    outln!(
        "{} partitions for new aggregates{}",
        layout.partitions,
        layout
            .previous
            .map(|p| format!(" (was {p})"))
            .unwrap_or_default()
    );
    outln!("served by the relays: {}", output::ranges(&layout.served));
    if !retired.is_empty() {
        outln!(
            "retired (no new events; removed once empty): {}",
            output::ranges(&retired)
        );
    }
    if elsewhere > 0 {
        outln!(
            "{elsewhere} aggregates not yet in the partition the count gives them \
             (`converge partitions set {}` moves them)",
            layout.partitions
        );
    }
    Ok(())
}

/// How `converge partitions set` works and waits.
#[derive(Debug, Clone)]
pub(crate) struct SetOptions {
    /// Give up after this long (the change stays half-way, consistent).
    pub(crate) timeout: Duration,
    /// The change's batch size and lock timeout.
    pub(crate) config: PartitionChangeConfig,
}

/// What a change did.
#[derive(Debug, Default, serde::Serialize)]
struct Progress {
    previous: i32,
    partitions: i32,
    moved: u64,
    waiting: u64,
    passes: u32,
    removed: Vec<i32>,
    kept: Vec<(i32, i64)>,
    unpublished: i64,
}

/// `converge partitions set N`
pub(crate) async fn set(ctx: &Ctx, count: i32, options: SetOptions) -> CliResult<()> {
    let pool = ctx.pool().await?;
    let partitions = Partitions::new(pool.clone()).with_config(options.config.clone());
    let before = partitions.layout().await.map_err(cli_error)?;
    let entry = audit::begin(
        ctx,
        "partitions.set",
        &count.to_string(),
        json!({ "previous": before.partitions, "served": before.served.len() }),
    )
    .await?;
    let audit_id = entry.id;
    let deadline = Instant::now() + options.timeout;
    let progress = entry
        .settle_or_interrupt(
            async {
                let mut progress = Progress {
                    previous: before.partitions,
                    partitions: count,
                    ..Progress::default()
                };
                match change(&partitions, count, deadline, &mut progress).await {
                    Ok(()) => {
                        let details = serde_json::to_value(&progress).unwrap_or_default();
                        Ok(Settled::ok(details, progress))
                    }
                    Err(e) => Ok(Settled::err(
                        // The count changed, or aggregates moved: a second run finishes.
                        if progress.passes > 0 {
                            AuditOutcome::Partial
                        } else {
                            AuditOutcome::Failed
                        },
                        json!({ "error": e.to_string(), "progress": progress }),
                        e,
                    )),
                }
            },
            || {
                Settled::err(
                    AuditOutcome::Interrupted,
                    json!({ "interrupted": true }),
                    CliError::Interrupted(format!(
                        "interrupted; every step taken is whole: run `converge partitions set \
                         {count}` again to finish"
                    )),
                )
            },
        )
        .await?;
    if ctx.json() {
        let mut value = serde_json::to_value(&progress).unwrap_or_default();
        value["audit_id"] = json!(audit_id);
        return output::print_json(&value);
    }
    if progress.previous != count {
        outln!(
            "new aggregates now go to {count} partitions (was {})",
            progress.previous
        );
    }
    outln!(
        "moved {} aggregates to the partition the count gives them ({} passes)",
        progress.moved,
        progress.passes
    );
    if !progress.removed.is_empty() {
        outln!(
            "removed retired partitions {}",
            output::ranges(&progress.removed)
        );
    }
    if !progress.kept.is_empty() {
        let held: i64 = progress.kept.iter().map(|k| k.1).sum();
        let kept: Vec<i32> = progress.kept.iter().map(|k| k.0).collect();
        outln!(
            "retired partitions {} still hold {held} published events: the relays serve them \
             until retention deletes those; run `converge partitions set {count}` again then to \
             remove them",
            output::ranges(&kept)
        );
    }
    Ok(())
}

/// The change, step by step; each step is whole on its own, so a timeout
/// or an error leaves a consistent state that a second run continues.
async fn change(
    partitions: &Partitions,
    count: i32,
    deadline: Instant,
    progress: &mut Progress,
) -> CliResult<()> {
    if progress.previous != count {
        partitions.set_count(count).await.map_err(cli_error)?;
    }
    loop {
        let pass = partitions.move_aggregates().await.map_err(cli_error)?;
        progress.passes += 1;
        progress.moved += pass.moved;
        progress.waiting = pass.waiting;
        if pass.waiting == 0 {
            break;
        }
        if Instant::now() >= deadline {
            return Err(CliError::Failed(format!(
                "{} aggregates still wait to move: each has an event the relays have not \
                 published yet (are they running? see `converge status`). New aggregates already \
                 go to {count} partitions; run `converge partitions set {count}` again to finish",
                pass.waiting
            )));
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
    partitions.close_retired().await.map_err(cli_error)?;
    loop {
        let retirement = partitions.remove_retired().await.map_err(cli_error)?;
        progress.removed.extend(&retirement.removed);
        progress.kept = retirement.kept;
        progress.unpublished = retirement.unpublished;
        if retirement.unpublished == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CliError::Failed(format!(
                "the retired partitions still hold {} unpublished events (are the relays \
                 running? see `converge status`); no new event reaches them: run `converge \
                 partitions set {count}` again to finish",
                retirement.unpublished
            )));
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}
