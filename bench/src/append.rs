//! `append`: what appending one event costs a short business transaction.
//!
//! W writers loop `BEGIN; UPDATE bench_orders ...; COMMIT` for S seconds
//! (the baseline), then the same with `Outbox::append` of one event, with
//! `notify` on (the default) and off, and, for reference, with a plain
//! `INSERT` of a similar row into a bare table (the floor of any row insert).
//! The variants alternate, `--rounds` times, and each keeps its best run.

use std::time::{Duration, Instant};

use converge::{DomainEvent, Outbox, OutboxConfig};
use serde_json::json;
use sqlx::PgPool;

use crate::common::{emit, peak_rss_kib, round2, round3, with_cleanup, Env, Result, TempDb};

/// Appending must not slow the transaction down by more than this factor.
const TARGET_RATIO: f64 = 1.15;
/// Padding that brings the event's JSON payload to about 200 bytes.
const NOTE: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\
                    xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\
                    xxxxxxxx";

/// Options of the `append` scenario.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct AppendArgs {
    /// Seconds each variant runs, per round.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent writers (the pool has two more connections).
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// Rows of `bench_orders`.
    #[arg(long, default_value_t = 100_000)]
    rows: u64,
    /// Times the variants are run in turn; each keeps its best.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Seconds of unmeasured warm-up (baseline transactions) before the rounds.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
}

/// What a writer does in its transaction besides the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// Nothing: the baseline.
    Baseline,
    /// `Outbox::append` with the default configuration (`notify` on).
    OutboxNotify,
    /// `Outbox::append` with `notify` off.
    OutboxNoNotify,
    /// A plain `INSERT` of a similar row into a table with only a bigserial key.
    PlainInsert,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::Baseline,
        Variant::OutboxNotify,
        Variant::OutboxNoNotify,
        Variant::PlainInsert,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::Baseline => "baseline",
            Variant::OutboxNotify => "outbox_notify",
            Variant::OutboxNoNotify => "outbox_no_notify",
            Variant::PlainInsert => "plain_insert",
        }
    }

    fn outbox(self) -> Outbox {
        let mut config = OutboxConfig::default();
        config.notify = self != Variant::OutboxNoNotify;
        Outbox::new(config)
    }
}

/// The event appended: one order's counter moved.
#[derive(Debug, serde::Serialize)]
struct OrderIncremented {
    order_id: i64,
    delta: i64,
    note: &'static str,
}

impl DomainEvent for OrderIncremented {
    fn aggregate_type(&self) -> &str {
        "order"
    }
    fn aggregate_id(&self) -> String {
        self.order_id.to_string()
    }
    fn event_type(&self) -> &str {
        "OrderIncremented"
    }
}

/// One measured run of one variant.
#[derive(Debug, Clone)]
struct Run {
    variant: Variant,
    round: usize,
    commits: u64,
    errors: u64,
    secs: f64,
}

impl Run {
    fn tps(&self) -> f64 {
        self.commits as f64 / self.secs
    }
}

/// Runs the `append` scenario.
pub(crate) async fn run(env: &Env, args: &AppendArgs) -> Result<()> {
    let db = TempDb::create(env).await?;
    let database = db.name.clone();
    let body = async {
        let size = u32::try_from(args.writers + 2)?;
        let pool = env.pool_for(&database, size).await?;
        converge::migrate(&pool).await?;
        setup(&pool, args.rows).await?;
        // Open every connection before measuring anything.
        let mut conns = Vec::new();
        for _ in 0..args.writers {
            conns.push(pool.acquire().await?);
        }
        drop(conns);
        if args.warmup > 0 {
            measure(
                &pool,
                args,
                Variant::Baseline,
                Duration::from_secs(args.warmup),
                0,
            )
            .await?;
        }
        let mut runs = Vec::new();
        for round in 1..=args.rounds.max(1) {
            for variant in Variant::ALL {
                let _ = sqlx::query("CHECKPOINT").execute(&pool).await;
                let run = measure(
                    &pool,
                    args,
                    variant,
                    Duration::from_secs(args.seconds),
                    round,
                )
                .await?;
                println!(
                    "append round {round} {:<17} {:>9.1} tx/s ({} commits in {:.2} s, {} errors)",
                    variant.name(),
                    run.tps(),
                    run.commits,
                    run.secs,
                    run.errors
                );
                runs.push(run);
            }
        }
        let appended: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.outbox")
            .fetch_one(&pool)
            .await?;
        pool.close().await;
        Ok((runs, appended))
    };
    let (runs, appended) = with_cleanup(body, db.drop_db()).await?;

    let best = |v: Variant| {
        runs.iter()
            .filter(|r| r.variant == v)
            .map(Run::tps)
            .fold(0.0_f64, f64::max)
    };
    let baseline = best(Variant::Baseline);
    let notify = best(Variant::OutboxNotify);
    let no_notify = best(Variant::OutboxNoNotify);
    let plain = best(Variant::PlainInsert);
    let ratio = |tps: f64| {
        if tps > 0.0 {
            baseline / tps
        } else {
            f64::INFINITY
        }
    };
    println!(
        "append {} writers, best of {}: baseline {baseline:.1} tx/s; with event (notify) {notify:.1} \
         tx/s, slowdown x{:.3}; with event (no notify) {no_notify:.1} tx/s, x{:.3}; plain insert \
         {plain:.1} tx/s, x{:.3}; target <= x{TARGET_RATIO}; {appended} events appended",
        args.writers,
        args.rounds.max(1),
        ratio(notify),
        ratio(no_notify),
        ratio(plain),
    );
    let errors: u64 = runs.iter().map(|r| r.errors).sum();
    emit(&json!({
        "scenario": "append",
        "unit": "tx/s",
        "rate": round2(notify),
        "baseline_rate": round2(baseline),
        "ratio": round3(ratio(notify)),
        "tps_baseline": round2(baseline),
        "tps_outbox_notify": round2(notify),
        "tps_outbox_no_notify": round2(no_notify),
        "tps_plain_insert": round2(plain),
        "ratio_notify": round3(ratio(notify)),
        "ratio_no_notify": round3(ratio(no_notify)),
        "ratio_plain_insert": round3(ratio(plain)),
        "target_ratio": TARGET_RATIO,
        "within_target_notify": ratio(notify) <= TARGET_RATIO,
        "within_target_no_notify": ratio(no_notify) <= TARGET_RATIO,
        "writers": args.writers,
        "seconds": args.seconds,
        "rounds": args.rounds.max(1),
        "rows": args.rows,
        "errors": errors,
        "events_appended": appended,
        "runs": runs.iter().map(|r| json!({
            "variant": r.variant.name(),
            "round": r.round,
            "tps": round2(r.tps()),
            "commits": r.commits,
            "errors": r.errors,
            "secs": round3(r.secs),
        })).collect::<Vec<_>>(),
        "peak_rss_kib": peak_rss_kib(),
    }));
    Ok(())
}

/// Creates and fills `bench_orders`, and the bare table of the plain-insert variant.
async fn setup(pool: &PgPool, rows: u64) -> Result<()> {
    sqlx::query("CREATE TABLE bench_orders (id bigint PRIMARY KEY, n bigint NOT NULL)")
        .execute(pool)
        .await?;
    sqlx::query("INSERT INTO bench_orders SELECT g, 0 FROM generate_series(1, $1::bigint) AS g")
        .bind(rows.max(1) as i64)
        .execute(pool)
        .await?;
    sqlx::query(
        "CREATE TABLE bench_plain_events ( \
             id bigserial PRIMARY KEY, \
             aggregate_type text NOT NULL, \
             aggregate_id text NOT NULL, \
             event_type text NOT NULL, \
             occurred_at timestamptz NOT NULL DEFAULT now(), \
             headers jsonb NOT NULL DEFAULT '{}'::jsonb, \
             payload json NOT NULL)",
    )
    .execute(pool)
    .await?;
    sqlx::query("VACUUM ANALYZE bench_orders")
        .execute(pool)
        .await?;
    Ok(())
}

/// Runs `variant` with every writer for `duration`.
async fn measure(
    pool: &PgPool,
    args: &AppendArgs,
    variant: Variant,
    duration: Duration,
    round: usize,
) -> Result<Run> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..args.writers {
        let pool = pool.clone();
        let seed = (round as u64) << 32 | (w as u64) << 8 | variant as u64;
        tasks.spawn(writer(pool, variant, deadline, seed, args.rows.max(1)));
    }
    let (mut commits, mut errors) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        let (c, e) = result?;
        commits += c;
        errors += e;
    }
    Ok(Run {
        variant,
        round,
        commits,
        errors,
        secs: started.elapsed().as_secs_f64(),
    })
}

/// One writer: transactions until `deadline`; returns (commits, errors).
async fn writer(
    pool: PgPool,
    variant: Variant,
    deadline: Instant,
    seed: u64,
    rows: u64,
) -> (u64, u64) {
    let outbox = variant.outbox();
    let mut rng = SplitMix64(seed);
    let (mut commits, mut errors) = (0, 0);
    while Instant::now() < deadline {
        let id = (rng.next() % rows) as i64 + 1;
        match transaction(&pool, &outbox, variant, id).await {
            Ok(()) => commits += 1,
            Err(error) => {
                if errors == 0 {
                    eprintln!("append {} writer error: {error}", variant.name());
                }
                errors += 1;
            }
        }
    }
    (commits, errors)
}

/// One business transaction of `variant` on order `id`.
async fn transaction(pool: &PgPool, outbox: &Outbox, variant: Variant, id: i64) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("UPDATE bench_orders SET n = n + 1 WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let event = OrderIncremented {
        order_id: id,
        delta: 1,
        note: NOTE,
    };
    match variant {
        Variant::Baseline => {}
        Variant::OutboxNotify | Variant::OutboxNoNotify => {
            outbox.append(&mut tx, &event).await?;
        }
        Variant::PlainInsert => {
            let payload = serde_json::to_string(&event)?;
            sqlx::query(
                "INSERT INTO bench_plain_events (aggregate_type, aggregate_id, event_type, payload) \
                 VALUES ($1, $2, $3, $4::json)",
            )
            .bind(event.aggregate_type())
            .bind(event.aggregate_id())
            .bind(event.event_type())
            .bind(payload)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// A tiny PRNG (SplitMix64): no extra dependency for picking rows.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
