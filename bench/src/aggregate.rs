//! `aggregate`: what an event-sourced aggregate costs.
//!
//! - **Loading** an aggregate of `--events` events (1,000), one load after
//!   another on one connection, `--loads` times each way: folded from all
//!   of its events (no snapshot); from a snapshot 99 events behind (the
//!   most a load folds with a snapshot every 100 events); from a snapshot at
//!   its last event. The raw baseline reads the same rows with one `SELECT`
//!   of their payloads, decodes them into the same event type and folds
//!   them: the repository's own cost (paging, versions, upcasting) is the
//!   ratio to it.
//! - **Commands**: W writers each carry out commands (load, decide, save with
//!   the expected version, a snapshot every 100 events) on aggregates of
//!   their own for `--seconds`; the raw baseline is the same writers
//!   appending the same events with `Outbox::append`, one per transaction,
//!   to the same kind of aggregates. The ratio is commands/s ÷ appends/s.
//!
//! Prints a summary and, as the last line, one JSON object.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use converge::eventsourcing::{Aggregate, Repository, RepositoryConfig};
use converge::{Event, Outbox};
use serde_json::json;
use sqlx::PgPool;

use crate::common::{emit, round2, round3, with_cleanup, Env, Result, TempDb};

/// Options of the `aggregate` scenario.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct AggregateArgs {
    /// Events of the aggregate loaded.
    #[arg(long, default_value_t = 1_000)]
    events: u32,
    /// Loads measured each way.
    #[arg(long, default_value_t = 200)]
    loads: u32,
    /// Seconds each command variant runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent writers.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Aggregates per writer (commands go round them).
    #[arg(long, default_value_t = 20)]
    aggregates: usize,
}

/// A ledger: a balance and a count of postings.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Ledger {
    balance: i64,
    postings: u64,
}

/// Its one event type.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
enum LedgerEvent {
    Posted { amount: i64, memo: String },
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Aggregate for Ledger {
    const TYPE: &'static str = "ledger";
    type Event = LedgerEvent;
    type Command = i64;
    type Error = Never;

    fn apply(&mut self, LedgerEvent::Posted { amount, .. }: &LedgerEvent) {
        self.balance += amount;
        self.postings += 1;
    }

    fn decide(&self, amount: &i64) -> Result<Vec<LedgerEvent>, Never> {
        Ok(vec![posted(*amount)])
    }
}

fn posted(amount: i64) -> LedgerEvent {
    LedgerEvent::Posted {
        amount,
        memo: "monthly fee, account 0000-1111-2222".into(),
    }
}

/// The raw baseline's event: the same payload, appended with `Outbox::append`.
#[derive(serde::Serialize, serde::Deserialize)]
struct Posted {
    #[serde(skip)]
    ledger: String,
    amount: i64,
    memo: String,
}

impl Event for Posted {
    const AGGREGATE_TYPE: &'static str = "rawledger";
    const EVENT_TYPE: &'static str = "Posted";
    fn aggregate_id(&self) -> String {
        self.ledger.clone()
    }
}

fn repository_config(snapshot_every: Option<u32>) -> RepositoryConfig {
    let mut config = RepositoryConfig::default();
    config.snapshot_every = snapshot_every;
    config
}

async fn repository(pool: &PgPool, snapshot_every: Option<u32>) -> Result<Repository<Ledger>> {
    Ok(Repository::<Ledger>::builder(pool.clone())
        .config(repository_config(snapshot_every))
        .start()
        .await?)
}

/// Median milliseconds of `runs` calls of `f`.
async fn median_ms<F, Fut>(runs: u32, mut f: F) -> Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut times = Vec::with_capacity(runs as usize);
    for _ in 0..runs {
        let started = Instant::now();
        f().await?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// The raw read: every payload of `id` in one statement, decoded and folded.
async fn raw_load(pool: &PgPool, id: &str) -> Result<Ledger> {
    let payloads: Vec<String> = sqlx::query_scalar(
        "SELECT payload::text FROM converge.outbox \
         WHERE aggregate_type = 'ledger' AND aggregate_id = $1 ORDER BY version",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    let mut ledger = Ledger::default();
    for p in payloads {
        let LedgerEvent::Posted { amount, memo } =
            serde_json::from_str::<LedgerEvent>(&format!("{{\"Posted\":{p}}}"))?;
        ledger.apply(&LedgerEvent::Posted { amount, memo });
    }
    Ok(ledger)
}

struct Loads {
    raw_ms: f64,
    full_ms: f64,
    snapshot_99_ms: f64,
    snapshot_0_ms: f64,
}

async fn loads(pool: &PgPool, args: &AggregateArgs) -> Result<Loads> {
    let events = args.events.max(100);
    // Three aggregates of `events` events each: one without a snapshot, one
    // with a snapshot 99 events before its end, one with one at its end.
    let plain = repository(pool, None).await?;
    for id in ["full", "snap99", "snap0"] {
        let mut tx = pool.begin().await?;
        for _ in 0..events {
            plain.execute_in(&mut tx, id, &1).await?;
        }
        tx.commit().await?;
    }
    let snapshots = repository(pool, Some(1)).await?;
    for (id, back) in [("snap99", 99), ("snap0", 0)] {
        // A snapshot at `events - back`: written as a command at that version would.
        let state = Ledger {
            balance: i64::from(events - back),
            postings: u64::from(events - back),
        };
        sqlx::query(
            "INSERT INTO converge.snapshots (aggregate_type, aggregate_id, shape_version, version, state) \
             VALUES ('ledger', $1, 1, $2, $3::json)",
        )
        .bind(id)
        .bind(i64::from(events - back))
        .bind(serde_json::to_string(&state)?)
        .execute(pool)
        .await?;
    }
    let check = |l: Ledger| {
        if l.postings != u64::from(events) {
            return Err(format!("a load folded {} of {events} events", l.postings).into());
        }
        Ok(())
    };
    let raw_ms = median_ms(args.loads, || async {
        check(raw_load(pool, "full").await?)
    })
    .await?;
    let full_ms = median_ms(args.loads, || async {
        check(plain.load(pool, "full").await?.state)
    })
    .await?;
    let snapshot_99_ms = median_ms(args.loads, || async {
        let loaded = snapshots.load(pool, "snap99").await?;
        if loaded.folded != 99 {
            return Err(format!("folded {} after the snapshot", loaded.folded).into());
        }
        check(loaded.state)
    })
    .await?;
    let snapshot_0_ms = median_ms(args.loads, || async {
        check(snapshots.load(pool, "snap0").await?.state)
    })
    .await?;
    Ok(Loads {
        raw_ms,
        full_ms,
        snapshot_99_ms,
        snapshot_0_ms,
    })
}

/// Commands (or raw appends) per second over `seconds`, `writers` at once.
async fn throughput(pool: &PgPool, args: &AggregateArgs, raw: bool) -> Result<f64> {
    let repo = repository(pool, Some(100)).await?;
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for w in 0..args.writers {
        let (pool, repo, done) = (pool.clone(), repo.clone(), done.clone());
        let per_writer = args.aggregates.max(1);
        tasks.push(tokio::spawn(async move {
            let outbox = Outbox::default();
            let mut n = 0usize;
            while Instant::now() < deadline {
                let id = format!("w{w}-{}", n % per_writer);
                if raw {
                    let mut tx = pool.begin().await?;
                    let event = Posted {
                        ledger: id,
                        amount: 1,
                        memo: "monthly fee, account 0000-1111-2222".into(),
                    };
                    outbox.append(&mut tx, &event).await?;
                    tx.commit().await?;
                } else {
                    repo.execute(&id, &1).await?;
                }
                n += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, crate::common::BoxError>(())
        }));
    }
    let started = Instant::now();
    for task in tasks {
        task.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Runs the scenario.
pub(crate) async fn run(env: &Env, args: &AggregateArgs) -> Result<()> {
    let db = TempDb::create(env).await?;
    let database = db.name.clone();
    let body = async {
        let pool = env.pool_for(&database, (args.writers + 2) as u32).await?;
        converge::migrate(&pool).await?;
        eprintln!("[aggregate] loading an aggregate of {} events", args.events);
        let l = loads(&pool, args).await?;
        println!(
            "load of {} events: raw read {:.2} ms; repository {:.2} ms (×{:.2} of raw), from a \
             snapshot 99 events back {:.2} ms ({:.1}× faster), from a snapshot at the end {:.2} ms",
            args.events,
            l.raw_ms,
            l.full_ms,
            l.full_ms / l.raw_ms,
            l.snapshot_99_ms,
            l.full_ms / l.snapshot_99_ms,
            l.snapshot_0_ms
        );
        eprintln!("[aggregate] raw appends, {} writers", args.writers);
        let raw = throughput(&pool, args, true).await?;
        eprintln!("[aggregate] commands, {} writers", args.writers);
        let commands = throughput(&pool, args, false).await?;
        println!(
            "commands (load, decide, save): {commands:.0}/s against raw appends of the same events \
             {raw:.0}/s: ratio {:.3}",
            commands / raw
        );
        emit(&json!({
            "scenario": "aggregate",
            "events": args.events,
            "load_raw_ms": round3(l.raw_ms),
            "load_no_snapshot_ms": round3(l.full_ms),
            "load_no_snapshot_vs_raw": round3(l.full_ms / l.raw_ms),
            "load_snapshot_99_back_ms": round3(l.snapshot_99_ms),
            "load_snapshot_at_end_ms": round3(l.snapshot_0_ms),
            "snapshot_speedup": round2(l.full_ms / l.snapshot_99_ms),
            "writers": args.writers,
            "commands_per_sec": round2(commands),
            "raw_appends_per_sec": round2(raw),
            "commands_vs_raw_appends": round3(commands / raw),
        }));
        pool.close().await;
        Ok(())
    };
    with_cleanup(body, db.drop_db()).await
}
