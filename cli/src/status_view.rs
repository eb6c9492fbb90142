//! The human screen of `converge status`: a line or a small table per
//! section, warnings marked with `!`.

use crate::context::redact;
use crate::locks;
use crate::output::outln;
use crate::output::{self, Table};
use crate::status::StatusReport;
use crate::sweep;

/// Prints the report.
pub(crate) fn print(r: &StatusReport, database_url: &str) {
    let now = r.now;
    outln!(
        "converge status at {}  ({})",
        output::time(now),
        redact(database_url)
    );

    outln!("\nOUTBOX");
    let o = &r.outbox;
    let oldest = o
        .oldest_unpublished_at
        .map(|t| format!(", oldest occurred {}", output::relative(t, now)))
        .unwrap_or_default();
    outln!(
        "  backlog {} events not yet on the stream{oldest}",
        o.backlog
    );
    if o.rejected > 0 {
        outln!(
            "  ! {} events rejected by the relay (converge.relay_rejects)",
            o.rejected
        );
    }
    if let Some(x) = &r.holding_transaction {
        outln!(
            "  ! {x} holds the relays back (user {}): {}",
            x.user_name.as_deref().unwrap_or("?"),
            x.query.as_deref().unwrap_or("")
        );
        outln!(
            "    end it ({}) or events committed after it stay unpublished",
            if x.prepared {
                "COMMIT PREPARED / ROLLBACK PREPARED"
            } else {
                "COMMIT, ROLLBACK or pg_terminate_backend"
            }
        );
    }

    outln!("\nRELAYS");
    let mut relays = Table::new(&["NAME", "HEARTBEAT", "PARTITIONS", "STATE"]);
    for relay in &r.relays {
        relays.row(vec![
            relay.name.clone(),
            output::relative(relay.heartbeat_at, now),
            format!(
                "{} ({})",
                output::ranges(&relay.partitions),
                relay.partitions.len()
            ),
            if relay.armed { "idle" } else { "busy" }.into(),
        ]);
    }
    print_indented(&relays, "no relay running");
    if !r.unowned_partitions.is_empty() && (!r.relays.is_empty() || o.backlog > 0) {
        outln!(
            "  ! partitions without a live relay: {}",
            output::ranges(&r.unowned_partitions)
        );
    }

    outln!("\nWORKERS (heartbeat in the last 60 s)");
    let mut workers = Table::new(&[
        "INSTANCE",
        "APP",
        "HEARTBEAT",
        "STREAM",
        "CONSUMERS",
        "SWEEPS",
    ]);
    for w in &r.workers {
        workers.row(vec![
            w.instance.clone(),
            w.application.clone(),
            output::relative(w.heartbeat_at, now),
            output::opt(w.stream.as_deref()),
            w.consumers.len().to_string(),
            w.sweeps.len().to_string(),
        ]);
    }
    print_indented(&workers, "no live worker");

    if !r.consumers.is_empty() {
        outln!("\nCONSUMERS");
        let mut consumers = Table::new(&[
            "CONSUMER",
            "APP",
            "STREAM",
            "PENDING",
            "ACK PENDING",
            "REDELIVERED",
        ]);
        for c in &r.consumers {
            let (pending, ack, redelivered) = match &c.error {
                Some(e) => (
                    format!("! {}", output::cut(e, 60)),
                    String::new(),
                    String::new(),
                ),
                None => (
                    output::opt(c.pending),
                    output::opt(c.ack_pending),
                    output::opt(c.redelivered),
                ),
            };
            consumers.row(vec![
                c.consumer.clone(),
                c.application.clone(),
                output::opt(c.stream.as_deref()),
                pending,
                ack,
                redelivered,
            ]);
        }
        output::emit(&consumers.render(2));
    }

    outln!("\nDEAD LETTERS (open)");
    let mut dead = Table::new(&["RECONCILER", "OPEN", "OLDEST"]);
    for d in &r.dead_letters {
        dead.row(vec![
            d.reconciler.clone(),
            d.open.to_string(),
            output::relative(d.oldest_failed_at, now),
        ]);
    }
    print_indented(&dead, "none");

    outln!("\nSWEEPS");
    print_indented(&sweep::sweeps_table(&r.sweeps, now), "none registered");

    if !r.projections.is_empty() {
        outln!("\nPROJECTIONS");
        output::emit(&crate::projections::status_table(&r.projections, now).render(2));
    }

    outln!("\nLEASES (held)");
    print_indented(&locks::leases_table(&r.leases, now), "none");
}

fn print_indented(table: &Table, empty: &str) {
    if table.is_empty() {
        outln!("  {empty}");
    } else {
        output::emit(&table.render(2));
    }
}
