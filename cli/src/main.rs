//! `converge`: the operator CLI of converge.
//!
//! Exit codes: 0 done; 1 failed (a service unreachable, work that failed);
//! 2 bad input (malformed options, unknown names), as clap's usage errors;
//! 77 refused by PostgreSQL's privileges or NATS's permissions (EX_NOPERM);
//! 130 interrupted by ctrl-c (the audit row records how far it got).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod args;
mod audit;
mod context;
mod control;
mod dashboard;
mod dead_letter_filter;
mod dead_letter_retry;
mod dead_letters;
mod error;
mod locks;
mod outbox;
mod output;
mod partitions;
mod projections;
mod replay;
mod replay_publish;
mod status;
mod status_view;
mod sweep;
mod sweep_run;
mod target;

use std::process::ExitCode;
use std::time::Duration;

use crate::output::outln;
use args::{
    Cli, Command, DeadLettersCommand, LeasesCommand, OutboxCommand, PartitionsCommand,
    ProjectionsCommand, SweepCommand,
};
use context::Ctx;
use error::{CliError, CliResult};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    let database_defaulted =
        matches.value_source("database_url") == Some(clap::parser::ValueSource::DefaultValue);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "converge",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    let ctx = Ctx::new(cli.global);
    match run(&ctx, cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("converge: {e}");
            if database_defaulted && matches!(e, CliError::SchemaMissing { .. }) {
                eprintln!(
                    "hint: DATABASE_URL is unset, so this was the default database \
                     {}; point --database-url / DATABASE_URL at the application's database",
                    ctx.global.database_url
                );
            }
            e.exit_code()
        }
    }
}

async fn run(ctx: &Ctx, command: Command) -> CliResult<ExitCode> {
    let done = |r: CliResult<()>| r.map(|()| ExitCode::SUCCESS);
    match command {
        Command::Completions { .. } => Ok(ExitCode::SUCCESS), // printed before connecting
        Command::Migrate => {
            let pool = ctx.pool().await?;
            let clock = "SELECT system_identifier, rebased_at FROM converge.outbox_clock";
            // Absent before the first migration: nothing to compare with.
            let before: Option<(i64, Option<chrono::DateTime<chrono::Utc>>)> =
                sqlx::query_as(clock)
                    .fetch_optional(pool)
                    .await
                    .ok()
                    .flatten();
            converge::migrate(pool)
                .await
                .map_err(|e| CliError::Failed(format!("migration failed: {e}")))?;
            outln!("the converge schema is up to date");
            let after: Option<(i64, Option<chrono::DateTime<chrono::Utc>>)> =
                sqlx::query_as(clock).fetch_optional(pool).await?;
            if let (Some(before), Some(after)) = (before, after) {
                if before != after {
                    outln!(
                        "re-based the outbox on this PostgreSQL cluster (system identifier {}, \
                         was {}): it was restored, moved or upgraded from another; events \
                         appended from now on sort after every stored one, and appends work again",
                        after.0,
                        before.0
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Grants { role, to } => {
            let grantee = match (to, &ctx.global.app) {
                (Some(to), _) => to,
                (None, Some(app)) => format!("{app}_{role}"),
                (None, None) => format!("converge_{role}"),
            };
            let sql = converge::grant_sql(role, &grantee)
                .map_err(|e| error::bad_input(format!("--to / --app: {e}")))?;
            outln!("{sql}");
            Ok(ExitCode::SUCCESS)
        }
        Command::NatsPermissions {
            role,
            stream,
            subject_prefix,
        } => {
            let app = ctx.global.app.clone().ok_or_else(|| {
                error::bad_input("nats-permissions needs --app APP (the application's name)")
            })?;
            let scope = converge::control::StreamScope::new(stream, subject_prefix);
            let block = converge::control::nats_permissions(&app, role, &scope)
                .map_err(|e| error::bad_input(e.to_string()))?;
            outln!("{block}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { watch } => done(status::status(ctx, watch).await),
        Command::Outbox(OutboxCommand::List {
            filter,
            unpublished,
            limit,
        }) => done(outbox::list(ctx, &filter, unpublished, limit).await),
        Command::Outbox(OutboxCommand::Replay(args)) => replay::replay(ctx, &args).await,
        Command::Sweep(SweepCommand::List) => done(sweep::list(ctx).await),
        Command::Sweep(SweepCommand::History { name, limit }) => {
            done(sweep::history(ctx, name.as_deref(), limit).await)
        }
        Command::Sweep(SweepCommand::Run {
            name,
            keys,
            dry_run,
            wait,
            wait_for_lease,
            timeout,
        }) => {
            sweep_run::run(
                ctx,
                &name,
                keys,
                dry_run,
                sweep_run::Waiting {
                    wait: wait || wait_for_lease.is_some(),
                    for_lease: wait_for_lease.map(Duration::from_secs),
                    timeout: Duration::from_secs(timeout),
                },
            )
            .await
        }
        Command::Sweep(SweepCommand::Replay {
            run_id,
            failed_only,
            wait,
            timeout,
        }) => {
            let waiting = sweep_run::Waiting {
                wait,
                for_lease: None,
                timeout: Duration::from_secs(timeout),
            };
            sweep_run::replay(ctx, run_id, failed_only, waiting).await
        }
        Command::Leases(LeasesCommand::List) => done(locks::list(ctx).await),
        Command::Leases(LeasesCommand::Release { name, force }) => {
            done(locks::release(ctx, &name, force).await)
        }
        Command::DeadLetters(DeadLettersCommand::List {
            reconciler,
            all,
            limit,
        }) => done(dead_letters::list(ctx, reconciler.as_deref(), all, limit).await),
        Command::DeadLetters(DeadLettersCommand::Show { id }) => {
            done(dead_letters::show(ctx, id).await)
        }
        Command::DeadLetters(DeadLettersCommand::Retry { ids, bulk, timeout }) => {
            dead_letter_retry::retry(ctx, ids, bulk, Duration::from_secs(timeout)).await
        }
        Command::DeadLetters(DeadLettersCommand::Discard { ids, bulk }) => {
            done(dead_letters::discard(ctx, ids, bulk).await)
        }
        Command::Partitions(PartitionsCommand::Show) => done(partitions::show(ctx).await),
        Command::Partitions(PartitionsCommand::Set {
            count,
            timeout,
            lock_timeout,
            batch,
        }) => {
            let options = partitions::SetOptions {
                timeout: Duration::from_secs(timeout),
                config: converge::PartitionChangeConfig {
                    batch_size: batch,
                    lock_timeout: Duration::from_secs(lock_timeout),
                },
            };
            done(partitions::set(ctx, count, options).await)
        }
        Command::Projections(ProjectionsCommand::List) => done(projections::list(ctx).await),
        Command::Projections(ProjectionsCommand::Status { name }) => {
            done(projections::status(ctx, &name).await)
        }
        Command::Projections(ProjectionsCommand::Rebuild {
            name, cancel: true, ..
        }) => done(projections::cancel_rebuild(ctx, &name).await),
        Command::Projections(ProjectionsCommand::Rebuild {
            name,
            wait,
            timeout,
            cancel: false,
        }) => projections::request_rebuild(ctx, &name, wait, Duration::from_secs(timeout)).await,
        Command::Projections(ProjectionsCommand::Forget { name, yes }) => {
            done(projections::forget(ctx, &name, yes).await)
        }
        Command::Dashboard(args) => done(dashboard::serve(ctx, args).await),
        Command::Audit { limit } => done(audit::list(ctx, limit).await),
    }
}
