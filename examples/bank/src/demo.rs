//! The end-to-end demo: accounts opened (three of them frozen), W workers in
//! this process (every second one failing a fifth of its runs and stopping a
//! tenth of them between the debit and the credit), N transfers requested
//! from four tasks, the balances projection rebuilt half-way, and the books
//! checked at every instant until every transfer is finished.

use std::io::IsTerminal as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use converge::WorkerHandle;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use sqlx::PgPool;

use crate::check::{books, check, progress, CheckReport};
use crate::domain::{AccountCommand, TransferCommand};
use crate::error::{connect_nats, connect_postgres, BankError};
use crate::faults::Faults;
use crate::saga::SagaStats;
use crate::schema::{migrate, reset};
use crate::worker::{self, repositories, WorkerOptions};

/// Cents every account is opened with.
pub const INITIAL: i64 = 1_000_000;

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// PostgreSQL.
    pub database_url: String,
    /// NATS.
    pub nats_url: String,
    /// The stream (deleted and created again: the demo starts clean).
    pub stream: String,
    /// The converge application.
    pub app: String,
    /// Transfers to request.
    pub transfers: usize,
    /// Accounts to open.
    pub accounts: usize,
    /// Workers to start.
    pub workers: usize,
    /// How long to wait for convergence.
    pub timeout: Duration,
}

/// How the demo ended.
#[derive(Debug, Clone)]
pub struct DemoOutcome {
    /// Whether everything converged in time with the books balanced.
    pub converged: bool,
    /// The final check.
    pub report: CheckReport,
    /// Instants at which the books did not balance (none expected).
    pub unbalanced_instants: usize,
}

/// The id of account `i`.
pub fn account_id(i: usize) -> String {
    format!("a{i:03}")
}

/// Opens `count` accounts with [`INITIAL`] cents and freezes every
/// `frozen_every`-th (transfers to them are refunded).
pub async fn open_accounts(
    pool: &PgPool,
    count: usize,
    frozen_every: usize,
) -> Result<(), BankError> {
    let (accounts, _) = repositories(pool).await?;
    for i in 0..count {
        let id = account_id(i);
        accounts
            .execute(&id, &AccountCommand::Open { initial: INITIAL })
            .await?;
        if frozen_every > 0 && i % frozen_every == frozen_every - 1 {
            accounts.execute(&id, &AccountCommand::Freeze).await?;
        }
    }
    Ok(())
}

/// Requests `count` transfers `t00001`… between random accounts of the
/// first `accounts`, from `tasks` tasks at once.
pub async fn request_transfers(
    pool: &PgPool,
    count: usize,
    accounts: usize,
    tasks: usize,
) -> Result<(), BankError> {
    let (_, transfers) = repositories(pool).await?;
    let mut running = Vec::new();
    for task in 0..tasks {
        let transfers = transfers.clone();
        running.push(tokio::spawn(async move {
            for n in (task..count).step_by(tasks) {
                let (from, to, amount) = {
                    let mut rng = rand::rng();
                    let from = rng.random_range(0..accounts);
                    let to = (from + rng.random_range(1..accounts)) % accounts;
                    (from, to, rng.random_range(1..=10_000))
                };
                let request = TransferCommand::Request {
                    from: account_id(from),
                    to: account_id(to),
                    amount,
                };
                transfers
                    .execute(&format!("t{:05}", n + 1), &request)
                    .await?;
            }
            Ok::<_, BankError>(())
        }));
    }
    for task in running {
        task.await.map_err(|e| BankError::InvalidArgument {
            option: "demo",
            message: format!("a requesting task failed: {e}"),
        })??;
    }
    Ok(())
}

/// Runs the demo: progress on stderr, the result on stdout, ending with
/// `converged: <n> transfers, books balanced, 0 duplicates in <s> s`, or
/// `not converged after …` and why.
pub async fn run(opts: &DemoOptions) -> Result<DemoOutcome, BankError> {
    if opts.accounts < 2 {
        return Err(BankError::InvalidArgument {
            option: "--accounts",
            message: "a transfer needs two accounts: give at least 2".into(),
        });
    }
    let pool = connect_postgres(&opts.database_url, 8).await?;
    let nats = connect_nats(&opts.nats_url).await?;
    migrate(&pool).await?;
    reset(&pool).await?;
    let js = async_nats::jetstream::new(nats.clone());
    if js.get_stream(&opts.stream).await.is_ok() {
        js.delete_stream(&opts.stream)
            .await
            .map_err(|e| BankError::JetStream {
                action: "deleting the demo's stream",
                message: e.to_string(),
            })?;
    }
    open_accounts(&pool, opts.accounts, 16).await?;
    eprintln!(
        "demo: {} transfers between {} accounts (every 16th frozen: its transfers are refunded), \
         {} workers, stream {}",
        opts.transfers, opts.accounts, opts.workers, opts.stream
    );

    let stats = Arc::new(SagaStats::default());
    let mut workers: Vec<WorkerHandle> = Vec::new();
    let mut pools = Vec::new();
    for i in 1..=opts.workers {
        let worker_pool = connect_postgres(&opts.database_url, 16).await?;
        let mut options = WorkerOptions::new(opts.app.clone(), opts.stream.clone());
        options.instance = Some(format!("bank-demo-{i}"));
        options.sweep_every = Duration::from_secs(2);
        options.max_attempts = 3;
        options.stats = stats.clone();
        if i % 2 == 0 {
            options.faults = Faults {
                fail_rate: 0.2,
                stop_after_debit: 0.1,
                abort: false,
            };
        }
        match worker::start(&worker_pool, &nats, &options).await {
            Ok(handle) => workers.push(handle),
            Err(e) => {
                stop(workers).await;
                return Err(e);
            }
        }
        eprintln!(
            "worker bank-demo-{i} started{}",
            if i % 2 == 0 {
                " (fails 20 % of its runs, stops 10 % between debit and credit)"
            } else {
                ""
            }
        );
        pools.push(worker_pool);
    }

    let started = Instant::now();
    let requesting = {
        let (pool, count, accounts) = (pool.clone(), opts.transfers, opts.accounts);
        tokio::spawn(async move { request_transfers(&pool, count, accounts, 4).await })
    };
    let waited = wait(&pool, opts, requesting, started).await;
    let elapsed = started.elapsed();
    stop(workers).await;
    for p in pools {
        p.close().await;
    }
    let (requested, unbalanced) = waited?;
    let report = check(&pool).await?;
    let rebuild: Option<(i32, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT generation, rebuild_state, rebuild_error FROM converge.projections \
         WHERE name = 'bank-balances'",
    )
    .fetch_optional(&pool)
    .await
    .map_err(BankError::db("reading the rebuild"))?;
    let rebuilt = matches!(rebuild, Some((2, None, None)));
    let (letters, resolved): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE resolved_at IS NOT NULL) \
         FROM converge.dead_letters WHERE reconciler = $1",
    )
    .bind(worker::RECONCILER)
    .fetch_one(&pool)
    .await
    .map_err(BankError::db("counting dead letters"))?;
    pool.close().await;
    let converged = requested
        && report.converged
        && report.transfers == opts.transfers
        && unbalanced == 0
        && rebuilt;
    println!("{report}");
    println!(
        "bank-balances rebuilt from history while transfers went on: {}",
        match &rebuild {
            Some((2, None, None)) => "yes, swapped in (generation 2)".to_owned(),
            Some((_, state, error)) => format!("no (state {state:?}, error {error:?})"),
            None => "no (not registered)".to_owned(),
        }
    );
    println!(
        "steps by event: {}, by sweep: {}; refunded: {}; dead-lettered after 3 attempts: \
         {letters} ({resolved} finished since, by the sweep); instants with the books off: \
         {unbalanced}",
        stats.by_event.load(Ordering::Relaxed),
        stats.by_sweep.load(Ordering::Relaxed),
        stats.refunded.load(Ordering::Relaxed),
    );
    if converged {
        println!(
            "converged: {} transfers, books balanced, {} duplicates in {:.1} s",
            report.transfers,
            report.duplicates.len(),
            elapsed.as_secs_f64()
        );
    } else {
        let mut why = report.problems();
        if !requested {
            why.insert(0, "requesting did not finish".into());
        }
        if report.transfers != opts.transfers {
            why.push(format!(
                "{} of {} transfers exist",
                report.transfers, opts.transfers
            ));
        }
        if unbalanced > 0 {
            why.push(format!("the books were off at {unbalanced} instants"));
        }
        if !rebuilt {
            why.push("the balances projection's rebuild did not finish".into());
        }
        if elapsed >= opts.timeout {
            why.insert(0, format!("timed out after {:?}", opts.timeout));
        }
        println!(
            "not converged after {:.1} s: {}",
            elapsed.as_secs_f64(),
            why.join("; ")
        );
    }
    Ok(DemoOutcome {
        converged,
        report,
        unbalanced_instants: unbalanced,
    })
}

async fn stop(workers: Vec<WorkerHandle>) {
    for handle in workers {
        let instance = handle.instance().to_owned();
        if let Err(e) = handle.shutdown().await {
            eprintln!("worker {instance} did not stop cleanly: {e}");
        }
    }
}

/// Polls until every transfer is finished and the check agrees, checking
/// the books at every poll; requests a rebuild of the balances projection
/// half-way. Returns whether requesting finished and at how many polls the
/// books did not balance.
async fn wait(
    pool: &PgPool,
    opts: &DemoOptions,
    mut requesting: tokio::task::JoinHandle<Result<(), BankError>>,
    started: Instant,
) -> Result<(bool, usize), BankError> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(opts.transfers as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed:>4} [{bar:40.cyan/blue}] {pos}/{len} finished {msg}",
            )
            .expect("a valid progress template")
            .progress_chars("=> "),
        );
        bar
    });
    let mut requested = false;
    let mut rebuilt = false;
    let mut unbalanced = 0;
    let mut last_line = Instant::now();
    let total = opts.transfers as i64;
    loop {
        if !requested && requesting.is_finished() {
            (&mut requesting)
                .await
                .map_err(|e| BankError::InvalidArgument {
                    option: "demo",
                    message: format!("requesting failed: {e}"),
                })??;
            requested = true;
        }
        let (opened, balances, in_flight) = books(pool).await?;
        if balances + in_flight != opened {
            unbalanced += 1;
            eprintln!("books off: opened {opened} != balances {balances} + in flight {in_flight}");
        }
        let (existing, finished) = progress(pool).await?;
        if !rebuilt && finished * 2 >= total {
            // The inline projection, rebuilt while the saga keeps saving.
            converge::eventsourcing::request_rebuild(pool, "bank-balances", "bank demo", None)
                .await
                .map_err(BankError::db("requesting a rebuild"))?;
            rebuilt = true;
            eprintln!("half-way: rebuilding the bank-balances projection while transfers go on");
        }
        if let Some(bar) = &bar {
            bar.set_position(finished.max(0) as u64);
            bar.set_message(format!(
                "({existing} requested, {in_flight} cents in flight)"
            ));
        } else if last_line.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "progress: {finished}/{total} finished ({existing} requested) after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            last_line = Instant::now();
        }
        if requested
            && finished >= total
            && rebuild_done(pool).await?
            && check(pool).await?.converged
        {
            break;
        }
        if started.elapsed() >= opts.timeout {
            if !requested {
                requesting.abort();
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok((requested, unbalanced))
}

/// Whether the half-way rebuild of the balances projection has been swapped in.
async fn rebuild_done(pool: &PgPool) -> Result<bool, BankError> {
    sqlx::query_scalar(
        "SELECT coalesce((SELECT rebuild_state IS NULL AND rebuilt_at IS NOT NULL \
                          FROM converge.projections WHERE name = 'bank-balances'), false)",
    )
    .fetch_one(pool)
    .await
    .map_err(BankError::db("reading the rebuild"))
}
