//! The command line: global options and every subcommand (clap derive).

use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};

/// Operate converge: the outbox, the relay, reconcilers, sweeps, leases and
/// dead letters of running applications.
#[derive(Debug, Parser)]
#[command(name = "converge", version, about, max_term_width = 100)]
pub(crate) struct Cli {
    /// Options every command takes.
    #[command(flatten)]
    pub(crate) global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Global options")]
pub(crate) struct GlobalArgs {
    /// PostgreSQL holding the `converge` schema.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        global = true,
        hide_env_values = true
    )]
    pub(crate) database_url: String,
    /// NATS with JetStream: one server or several, comma-separated
    /// (`nats://`, or `tls://` for TLS).
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true,
        hide_env_values = true
    )]
    pub(crate) nats_url: String,
    /// NATS credentials file (JWT and seed), as the `nats` CLI's --creds.
    #[arg(
        long,
        env = "NATS_CREDS",
        global = true,
        value_name = "FILE",
        hide_env_values = true
    )]
    pub(crate) creds: Option<std::path::PathBuf>,
    /// File holding a NATS NKey seed, as the `nats` CLI's --nkey.
    #[arg(
        long,
        env = "NATS_NKEY",
        global = true,
        value_name = "FILE",
        hide_env_values = true
    )]
    pub(crate) nkey: Option<std::path::PathBuf>,
    /// NATS user (with --password).
    #[arg(long, env = "NATS_USER", global = true, hide_env_values = true)]
    pub(crate) user: Option<String>,
    /// NATS password (prefer NATS_PASSWORD: a flag shows in `ps`).
    #[arg(long, env = "NATS_PASSWORD", global = true, hide_env_values = true)]
    pub(crate) password: Option<converge::nats::Secret>,
    /// NATS token (prefer NATS_TOKEN: a flag shows in `ps`).
    #[arg(long, env = "NATS_TOKEN", global = true, hide_env_values = true)]
    pub(crate) token: Option<converge::nats::Secret>,
    /// CA certificate to trust for NATS TLS.
    #[arg(
        long,
        env = "NATS_CA",
        global = true,
        value_name = "FILE",
        hide_env_values = true
    )]
    pub(crate) tlsca: Option<std::path::PathBuf>,
    /// Client certificate for NATS mutual TLS (with --tlskey).
    #[arg(
        long,
        env = "NATS_CERT",
        global = true,
        value_name = "FILE",
        hide_env_values = true
    )]
    pub(crate) tlscert: Option<std::path::PathBuf>,
    /// The client certificate's key.
    #[arg(
        long,
        env = "NATS_KEY",
        global = true,
        value_name = "FILE",
        hide_env_values = true
    )]
    pub(crate) tlskey: Option<std::path::PathBuf>,
    /// Prefix of this client's NATS reply inboxes (default _INBOX); under
    /// converge's NATS permissions, _INBOX_<app>_<role>.
    #[arg(
        long,
        env = "NATS_INBOX_PREFIX",
        global = true,
        value_name = "PREFIX",
        hide_env_values = true
    )]
    pub(crate) inbox_prefix: Option<String>,
    /// The application whose workers to reach (default: the only application
    /// with a live worker in `converge.workers`).
    #[arg(
        short = 'a',
        long,
        env = "CONVERGE_APP",
        global = true,
        value_name = "NAME",
        hide_env_values = true
    )]
    pub(crate) app: Option<String>,
    /// Machine-readable JSON instead of tables (as `-o json`).
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Output format: `table` (the default) or `json`.
    #[arg(
        short = 'o',
        long = "output",
        global = true,
        value_name = "FORMAT",
        value_enum
    )]
    pub(crate) output: Option<OutputFormat>,
    /// Who acts, recorded in `converge.audit` (default: $USER or $LOGNAME).
    #[arg(long, global = true)]
    pub(crate) actor: Option<String>,
    /// Why, recorded in `converge.audit`.
    #[arg(long, global = true, value_name = "TEXT")]
    pub(crate) reason: Option<String>,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum OutputFormat {
    /// Tables for people.
    Table,
    /// JSON for programs.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Print a shell completion script: e.g. `converge completions bash >
    /// /etc/bash_completion.d/converge`, or `source <(converge completions zsh)`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Create or upgrade the `converge` schema.
    Migrate,
    /// One screen: outbox backlog, relays, workers, consumers, dead letters, sweeps, leases.
    Status {
        /// Refresh every SECS seconds (default 2) until ctrl-c.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2",
              value_parser = clap::value_parser!(u64).range(1..))]
        watch: Option<u64>,
    },
    /// The outbox: list and replay events.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Sweeps: list, history, run now, replay a run.
    #[command(subcommand)]
    Sweep(SweepCommand),
    /// Leases (`converge.leases`): list and release (`locks` is an alias).
    #[command(subcommand, alias = "locks")]
    Leases(LeasesCommand),
    /// Dead letters: list, show, retry, discard.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCommand),
    /// Projections (read models): list, status, rebuild from history, forget.
    #[command(subcommand)]
    Projections(ProjectionsCommand),
    /// Relay partitions: the count, and changing it on a live system.
    #[command(subcommand)]
    Partitions(PartitionsCommand),
    /// Print the SQL granting a converge role to a PostgreSQL role (run it as
    /// the schema's owner or a superuser).
    Grants {
        /// owner (migrates), app (appends), worker (relays, reconciles,
        /// sweeps), operator (the CLI's actions), viewer (reads).
        #[arg(long, value_name = "ROLE")]
        role: converge::Role,
        /// The PostgreSQL role to grant to (default: <app>_<role> with --app,
        /// else converge_<role>).
        #[arg(long, value_name = "PGROLE")]
        to: Option<String>,
    },
    /// Print the nats-server `permissions` block for a NATS user of an
    /// application's workers, operators or viewers.
    #[command(name = "nats-permissions")]
    NatsPermissions {
        /// worker, operator or viewer.
        #[arg(long, value_name = "ROLE")]
        role: converge::control::NatsRole,
        /// The application's stream.
        #[arg(long, value_name = "NAME")]
        stream: String,
        /// The events' subject prefix (the stream's subjects are PREFIX.>).
        #[arg(long, value_name = "PREFIX")]
        subject_prefix: String,
    },
    /// Serve the operations dashboard in the browser (overview, convergence
    /// over time, sweeps, dead letters with bulk actions, leases, audit).
    Dashboard(DashboardArgs),
    /// The audit log of operator actions.
    Audit {
        /// At most this many rows, newest first.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
}

/// Which outbox events.
#[derive(Debug, Clone, Args)]
pub(crate) struct EventFilter {
    /// Only this aggregate type.
    #[arg(long)]
    pub(crate) aggregate_type: Option<String>,
    /// Only this aggregate id.
    #[arg(long)]
    pub(crate) aggregate_id: Option<String>,
    /// Only this event type.
    #[arg(long)]
    pub(crate) event_type: Option<String>,
    /// Events that occurred at or after: RFC 3339 (2026-11-23T10:00:00Z) or ago (15m, 2h, 1d).
    #[arg(long, value_parser = parse_time_bound, value_name = "TIME")]
    pub(crate) since: Option<TimeBound>,
    /// Events that occurred before: RFC 3339 or ago (30s, 15m, 2h, 1d).
    #[arg(long, value_parser = parse_time_bound, value_name = "TIME")]
    pub(crate) until: Option<TimeBound>,
}

/// `converge dashboard`
#[derive(Debug, Clone, Args)]
pub(crate) struct DashboardArgs {
    /// Address to listen on. A loopback address is served to anyone on this
    /// host; any other needs --access-token.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8089")]
    pub(crate) listen: std::net::SocketAddr,
    /// Access token (at least 16 characters): every request must present it
    /// (`Authorization: Bearer`, or once as `/login?token=` which sets a
    /// cookie). Required off loopback; send it only over TLS (a proxy in
    /// front) on a network you do not trust.
    #[arg(
        long,
        env = "CONVERGE_DASHBOARD_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub(crate) access_token: Option<String>,
    /// Show everything, act on nothing, whatever the database role may do.
    #[arg(long)]
    pub(crate) read_only: bool,
}

/// `converge outbox …`
#[derive(Debug, Subcommand)]
pub(crate) enum OutboxCommand {
    /// The latest matching events, in (tx_order, id) order.
    List {
        /// Which events.
        #[command(flatten)]
        filter: EventFilter,
        /// Only events the relay has not published yet.
        #[arg(long)]
        unpublished: bool,
        /// At most this many (the latest).
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Publish matching events to the stream again, in (tx_order, id) order.
    Replay(ReplayArgs),
}

/// `converge outbox replay`
#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    /// Which events.
    #[command(flatten)]
    pub(crate) filter: EventFilter,
    /// Not accepted: unpublished events are never replayed ahead of the relay.
    #[arg(long, hide = true)]
    pub(crate) unpublished: bool,
    /// At most this many (the first in order).
    #[arg(long)]
    pub(crate) limit: Option<i64>,
    /// Print what would be sent; send nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Do not ask for confirmation of a large replay.
    #[arg(long)]
    pub(crate) yes: bool,
    /// The stream (default: the application's, from `converge.workers`).
    #[arg(long)]
    pub(crate) stream: Option<String>,
    /// The stream's subject prefix (default: from `converge.workers`).
    #[arg(long)]
    pub(crate) prefix: Option<String>,
    /// Publishes in flight at once.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) batch: u32,
}

/// `converge sweep …`
#[derive(Debug, Subcommand)]
pub(crate) enum SweepCommand {
    /// Sweeps with their next fire time, last run and convergence.
    List,
    /// Runs (`converge.sweep_runs`) and operator actions, newest first.
    History {
        /// Only this sweep.
        name: Option<String>,
        /// At most this many runs.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Run a sweep now through a worker (all candidates, or the given keys).
    Run {
        /// The sweep.
        name: String,
        /// Run these keys instead of the candidate query (repeatable).
        #[arg(short = 'k', long = "key", value_name = "K")]
        keys: Vec<String>,
        /// Only list the candidates.
        #[arg(long)]
        dry_run: bool,
        /// Wait for the run to end, showing progress.
        #[arg(short = 'w', long)]
        wait: bool,
        /// When another run holds the sweep's lease (or the overlap policy
        /// drops the request because the sweep is running), ask again until
        /// it is free, for up to SECS seconds (default 60). Implies --wait.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "60",
              value_parser = clap::value_parser!(u64).range(1..=86_400))]
        wait_for_lease: Option<u64>,
        /// With --wait: give up waiting after SECS seconds.
        #[arg(long, value_name = "SECS", default_value_t = 600)]
        timeout: u64,
    },
    /// Run an earlier run's sweep again (or only its failed keys).
    Replay {
        /// The run's id (`converge sweep history`).
        run_id: i64,
        /// Only the keys that failed in that run.
        #[arg(long)]
        failed_only: bool,
        /// Wait for the run to end, showing progress.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up waiting after SECS seconds.
        #[arg(long, value_name = "SECS", default_value_t = 600)]
        timeout: u64,
    },
}

/// `converge leases …`
#[derive(Debug, Subcommand)]
pub(crate) enum LeasesCommand {
    /// Every lease: holder, token, times, live or not.
    List,
    /// Free a lease (refuses a live one unless --force).
    Release {
        /// The lease's name.
        name: String,
        /// Release it even though its holder is live.
        #[arg(long)]
        force: bool,
    },
}

/// `converge partitions …`
#[derive(Debug, Subcommand)]
pub(crate) enum PartitionsCommand {
    /// The count new aggregates are hashed into, the partitions the relays
    /// serve (retired ones too), and aggregates not yet moved.
    Show,
    /// Change the count, with appends and relays running: new aggregates go
    /// to N partitions at once; each existing aggregate moves once none of
    /// its events is unpublished; partitions at or above N are retired and
    /// removed once empty. Run it again to finish a change that timed out.
    /// Connect as the converge schema's owner.
    Set {
        /// The new count, 1 to 1024.
        #[arg(value_parser = clap::value_parser!(i32).range(1..=1024))]
        count: i32,
        /// Give up after SECS seconds (exit 1; every step taken is whole).
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        timeout: u64,
        /// How long a step that locks converge.outbox_heads waits for the
        /// lock (appends wait behind it meanwhile).
        #[arg(long, value_name = "SECS", default_value_t = 5,
              value_parser = clap::value_parser!(u64).range(1..=600))]
        lock_timeout: u64,
        /// Heads read (and at most moved) per transaction.
        #[arg(long, value_name = "N", default_value_t = 1000,
              value_parser = clap::value_parser!(i64).range(1..=100_000))]
        batch: i64,
    },
}

/// `converge projections …`
#[derive(Debug, Subcommand)]
pub(crate) enum ProjectionsCommand {
    /// Every projection: mode, generation, events applied, lag, error, rebuild.
    List,
    /// One projection in detail.
    Status {
        /// The projection's name.
        name: String,
    },
    /// Rebuild a projection from history beside the live one, then swap it
    /// in (a worker running it does the work; writers never stop).
    Rebuild {
        /// The projection's name.
        name: String,
        /// Wait until the worker has swapped the rebuilt tables in.
        #[arg(short = 'w', long)]
        wait: bool,
        /// Seconds to wait with --wait.
        #[arg(long, value_name = "SECS", default_value_t = 600)]
        timeout: u64,
        /// Cancel the rebuild requested or under way instead (the live
        /// tables stay as they are).
        #[arg(long, conflicts_with = "wait")]
        cancel: bool,
    },
    /// Delete a projection's cursor and rebuild state (its tables stay).
    Forget {
        /// The projection's name.
        name: String,
        /// Yes, it starts over when registered again.
        #[arg(long)]
        yes: bool,
    },
}

/// `converge dead-letters …`
#[derive(Debug, Subcommand)]
pub(crate) enum DeadLettersCommand {
    /// Open dead letters, newest first.
    List {
        /// Only this reconciler's.
        #[arg(long)]
        reconciler: Option<String>,
        /// Resolved ones too.
        #[arg(long)]
        all: bool,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Everything about one dead letter, payload and headers included.
    Show {
        /// The dead letter's id.
        id: i64,
    },
    /// Run dead letters' keys again through a worker; each success resolves
    /// one. Name the ids, or select open letters with a filter
    /// (`--reconciler`, `--since`, `--error-like`): the count is shown and
    /// confirmed (`--yes`) before anything is done.
    Retry {
        /// Dead letter ids.
        ids: Vec<i64>,
        #[command(flatten)]
        bulk: BulkArgs,
        /// Give up waiting for a batch's results after SECS seconds (a worker
        /// takes 1,000 letters per request; more go in batches, one after
        /// the other).
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        timeout: u64,
    },
    /// Mark dead letters resolved without running them (resolution
    /// `discarded`): the ids, or the open letters matching a filter.
    Discard {
        /// Dead letter ids.
        ids: Vec<i64>,
        #[command(flatten)]
        bulk: BulkArgs,
    },
}

/// The filter of a bulk dead-letter action, and its confirmation.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct BulkArgs {
    /// Only this reconciler's open dead letters.
    #[arg(long, value_name = "NAME")]
    pub(crate) reconciler: Option<String>,
    /// Only letters that failed within this long (`90s`, `30m`, `2h`, `7d`).
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub(crate) since: Option<std::time::Duration>,
    /// Only letters that failed longer ago than this (`2h`, `7d`).
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub(crate) older_than: Option<std::time::Duration>,
    /// Only letters whose error contains TEXT (case-insensitive; `%` and `_`
    /// are plain characters).
    #[arg(long, value_name = "TEXT")]
    pub(crate) error_like: Option<String>,
    /// Show the matching letters and their count; do nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Act on every matching letter without asking (required when stdin is
    /// not a terminal).
    #[arg(long, short = 'y')]
    pub(crate) yes: bool,
    /// Every open letter matching the filter, without asking (as `--yes`;
    /// kept for scripts that ran `--reconciler R --all`).
    #[arg(long)]
    pub(crate) all: bool,
    /// At most this many letters, oldest first; the command says how many
    /// more match.
    #[arg(long, value_name = "N", default_value_t = 10_000,
          value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub(crate) limit: i64,
}

/// An age such as `90s`, `30m`, `2h` or `7d`.
fn parse_age(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{e}: write an age such as 90s, 30m, 2h or 7d"))
        .and_then(|d| {
            if d.is_zero() {
                Err("an age of zero matches nothing: write e.g. 30m".into())
            } else if d.as_secs() > 100 * 365 * 86_400 {
                Err("more than 100 years: write e.g. 3650d".into())
            } else {
                Ok(d)
            }
        })
}

/// A time filter: an instant, or a duration before the database's `now()`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum TimeBound {
    /// An instant.
    At(DateTime<Utc>),
    /// This long before now.
    Ago(Duration),
}

impl TimeBound {
    /// `(instant, seconds ago)`: one of them set, for SQL binding.
    pub(crate) fn sql(bound: Option<TimeBound>) -> (Option<DateTime<Utc>>, Option<f64>) {
        match bound {
            None => (None, None),
            Some(TimeBound::At(t)) => (Some(t), None),
            Some(TimeBound::Ago(d)) => (None, Some(d.as_secs_f64())),
        }
    }
}

/// Parses `2026-11-23T10:00:00Z` (RFC 3339) or `30s`, `15m`, `2h`, `1d`, `1w` (ago).
pub(crate) fn parse_time_bound(s: &str) -> Result<TimeBound, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(TimeBound::At(t.with_timezone(&Utc)));
    }
    let bad = || {
        format!(
            "{s:?} is neither an RFC 3339 time (2026-11-23T10:00:00Z) nor a relative time \
             (a whole number with s, m, h, d or w: 30s, 15m, 2h, 1d)"
        )
    };
    let unit_at = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (digits, unit) = s.split_at(unit_at);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(secs)
        .map(|s| TimeBound::Ago(Duration::from_secs(s)))
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn time_bounds_parse_or_say_why_not() {
        assert_eq!(
            parse_time_bound("15m"),
            Ok(TimeBound::Ago(Duration::from_secs(900)))
        );
        assert_eq!(
            parse_time_bound("1d"),
            Ok(TimeBound::Ago(Duration::from_secs(86_400)))
        );
        assert!(matches!(
            parse_time_bound("2026-11-23T10:00:00+01:00"),
            Ok(TimeBound::At(t)) if t.to_rfc3339() == "2026-11-23T09:00:00+00:00"
        ));
        for bad in [
            "",
            "15",
            "m",
            "15min",
            "-5m",
            "1.5h",
            "yesterday",
            "2026-11-23",
        ] {
            let e = parse_time_bound(bad).unwrap_err();
            assert!(e.contains("RFC 3339"), "{bad}: {e}");
        }
    }
}
