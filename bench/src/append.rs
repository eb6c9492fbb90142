//! `append`: what appending one event costs a short business transaction.
//!
//! W writers loop `BEGIN; UPDATE bench_orders ...; COMMIT` for S seconds (the
//! baseline), then the same transaction with one more statement:
//!
//! - `outbox`: `Outbox::append` with the default configuration and no armed
//!   relay. This is what appends cost while the relay is busy (under load): a
//!   busy relay is disarmed, so the append only checks
//!   `converge.relay_instances` and does not notify. The headline ratio.
//! - `outbox_idle_relay`: the same, with a live, armed row in
//!   `converge.relay_instances` (and a connection listening on the channel, as
//!   an idle relay has) for the duration of the variant: every append
//!   notifies, and PostgreSQL serialises the commits of notifying
//!   transactions.
//! - `outbox_no_notify`: `Outbox::append` with `OutboxConfig::notify` off.
//! - `plain_insert`: a plain `INSERT` of a similar row into a bare table, the
//!   floor of any row insert.
//!
//! The variants alternate, `--rounds` times, and each keeps its best run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use converge::{DomainEvent, Outbox, OutboxConfig, NOTIFY_CHANNEL};
use serde_json::json;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::common::{emit, peak_rss_kib, round2, round3, with_cleanup, Env, Result, TempDb};

/// Appending must not slow the transaction down by more than this factor.
const TARGET_RATIO: f64 = 1.15;
/// An append may cost at most this much more than the cheapest extra row:
/// tx/s with a plain INSERT ÷ tx/s with `Outbox::append`, same run.
const TARGET_VS_PLAIN_INSERT: f64 = 1.10;
/// Padding that brings the event's JSON payload to about 200 bytes.
const NOTE: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\
                    xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\
                    xxxxxxxx";
/// How often the stand-in idle relay refreshes its heartbeat (appends only
/// notify while the heartbeat is under a minute old).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
/// Pause after a run so that its last notifications reach the listener.
const NOTIFICATION_SETTLE: Duration = Duration::from_millis(200);

/// Options of the `append` scenario.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct AppendArgs {
    /// Seconds each variant runs, per round.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent writers (the pool has three more connections: the listener,
    /// the heartbeat and set-up).
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
    /// `Outbox::append`, default configuration, no armed relay (busy relay).
    Outbox,
    /// `Outbox::append`, default configuration, an armed relay (idle relay):
    /// every append notifies.
    OutboxIdleRelay,
    /// `Outbox::append` with `notify` off.
    OutboxNoNotify,
    /// A plain `INSERT` of a similar row into a table with only a bigserial key.
    PlainInsert,
}

impl Variant {
    const ALL: [Variant; 5] = [
        Variant::Baseline,
        Variant::Outbox,
        Variant::OutboxIdleRelay,
        Variant::OutboxNoNotify,
        Variant::PlainInsert,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::Baseline => "baseline",
            Variant::Outbox => "outbox",
            Variant::OutboxIdleRelay => "outbox_idle_relay",
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
    /// Notifications the listener received during the run (and just after).
    notifications: u64,
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
        let size = u32::try_from(args.writers + 3)?;
        let pool = env.pool_for(&database, size).await?;
        converge::migrate(&pool).await?;
        setup(&pool, args.rows).await?;
        // Open every connection before measuring anything.
        let mut conns = Vec::new();
        for _ in 0..args.writers {
            conns.push(pool.acquire().await?);
        }
        drop(conns);
        let listener = Listener::start(&pool).await?;
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
                let received_before = listener.received();
                let relay = match variant {
                    Variant::OutboxIdleRelay => Some(IdleRelay::register(&pool).await?),
                    _ => None,
                };
                let measured = measure(
                    &pool,
                    args,
                    variant,
                    Duration::from_secs(args.seconds),
                    round,
                )
                .await;
                if let Some(relay) = relay {
                    relay.remove(&pool).await?;
                }
                let mut run = measured?;
                tokio::time::sleep(NOTIFICATION_SETTLE).await;
                run.notifications = listener.received() - received_before;
                println!(
                    "append round {round} {:<17} {:>9.1} tx/s ({} commits in {:.2} s, {} errors, \
                     {} notifications)",
                    variant.name(),
                    run.tps(),
                    run.commits,
                    run.secs,
                    run.errors,
                    run.notifications,
                );
                runs.push(run);
            }
        }
        listener.stop().await;
        let appended: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.outbox")
            .fetch_one(&pool)
            .await?;
        pool.close().await;
        Ok((runs, appended))
    };
    let (runs, appended) = with_cleanup(body, db.drop_db()).await?;
    report(args, &runs, appended);
    Ok(())
}

/// Prints the summary and the JSON result line.
fn report(args: &AppendArgs, runs: &[Run], appended: i64) {
    let best = |v: Variant| {
        runs.iter()
            .filter(|r| r.variant == v)
            .map(Run::tps)
            .fold(0.0_f64, f64::max)
    };
    let baseline = best(Variant::Baseline);
    let ratio = |tps: f64| {
        if tps > 0.0 {
            baseline / tps
        } else {
            f64::INFINITY
        }
    };
    let outbox = best(Variant::Outbox);
    let plain = best(Variant::PlainInsert);
    let vs_plain = if outbox > 0.0 {
        plain / outbox
    } else {
        f64::INFINITY
    };
    let rounds = args.rounds.max(1);
    // The same ratio within each round (plain and outbox run back to back),
    // then the median over rounds: steadier than best-of on a noisy machine.
    let mut per_round: Vec<f64> = (1..=rounds)
        .filter_map(|round| {
            let tps = |v: Variant| {
                runs.iter()
                    .find(|r| r.round == round && r.variant == v)
                    .map(Run::tps)
            };
            Some(tps(Variant::PlainInsert)? / tps(Variant::Outbox)?)
        })
        .collect();
    per_round.sort_by(f64::total_cmp);
    let vs_plain_median = per_round
        .get(per_round.len() / 2)
        .copied()
        .unwrap_or(f64::NAN);

    let mut summary = format!(
        "append {} writers, best of {rounds}: baseline {baseline:.1} tx/s",
        args.writers
    );
    let mut result = serde_json::Map::new();
    for (key, value) in [
        ("scenario", json!("append")),
        ("unit", json!("tx/s")),
        ("rate", json!(round2(outbox))),
        ("baseline_rate", json!(round2(baseline))),
        ("ratio", json!(round3(ratio(outbox)))),
        ("ratio_vs_plain_insert", json!(round3(vs_plain))),
        (
            "ratio_vs_plain_insert_median_of_rounds",
            json!(round3(vs_plain_median)),
        ),
        (
            "ratio_vs_plain_insert_by_round",
            json!(per_round.iter().map(|r| round3(*r)).collect::<Vec<_>>()),
        ),
        (
            "target_ratio_vs_plain_insert",
            json!(TARGET_VS_PLAIN_INSERT),
        ),
        (
            "within_target_vs_plain_insert",
            json!(vs_plain <= TARGET_VS_PLAIN_INSERT),
        ),
    ] {
        result.insert(key.into(), value);
    }
    for variant in Variant::ALL {
        result.insert(
            format!("tps_{}", variant.name()),
            json!(round2(best(variant))),
        );
    }
    for variant in &Variant::ALL[1..] {
        let (tps, slowdown) = (best(*variant), ratio(best(*variant)));
        summary.push_str(&format!(
            "; {} {tps:.1} tx/s, x{slowdown:.3}",
            variant.name()
        ));
        result.insert(format!("ratio_{}", variant.name()), json!(round3(slowdown)));
    }
    println!(
        "{summary}; outbox vs plain insert x{vs_plain:.3} best-of, x{vs_plain_median:.3} median of \
         rounds (target <= x{TARGET_VS_PLAIN_INSERT}); {appended} events appended"
    );

    let errors: u64 = runs.iter().map(|r| r.errors).sum();
    for (key, value) in [
        ("target_ratio", json!(TARGET_RATIO)),
        ("within_target", json!(ratio(outbox) <= TARGET_RATIO)),
        ("writers", json!(args.writers)),
        ("seconds", json!(args.seconds)),
        ("rounds", json!(rounds)),
        ("rows", json!(args.rows)),
        ("errors", json!(errors)),
        ("events_appended", json!(appended)),
        (
            "runs",
            runs.iter()
                .map(|r| {
                    json!({
                        "variant": r.variant.name(),
                        "round": r.round,
                        "tps": round2(r.tps()),
                        "commits": r.commits,
                        "errors": r.errors,
                        "secs": round3(r.secs),
                        "notifications": r.notifications,
                    })
                })
                .collect(),
        ),
        ("peak_rss_kib", json!(peak_rss_kib())),
    ] {
        result.insert(key.into(), value);
    }
    emit(&result.into());
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

/// A stand-in for an idle relay: a live, armed row in
/// `converge.relay_instances`, its heartbeat kept fresh until removed.
struct IdleRelay {
    instance_id: Uuid,
    heartbeat: JoinHandle<()>,
}

impl IdleRelay {
    /// Inserts the row; from now on appends with `notify` on notify.
    async fn register(pool: &PgPool) -> Result<Self> {
        let instance_id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO converge.relay_instances (instance_id, name, heartbeat_at, armed) \
             VALUES ($1, 'converge-bench idle relay', now(), true)",
        )
        .bind(instance_id)
        .execute(pool)
        .await?;
        let pool = pool.clone();
        let heartbeat = tokio::spawn(async move {
            let mut every = tokio::time::interval_at(
                tokio::time::Instant::now() + HEARTBEAT_EVERY,
                HEARTBEAT_EVERY,
            );
            loop {
                every.tick().await;
                let beat = sqlx::query(
                    "UPDATE converge.relay_instances SET heartbeat_at = now() \
                     WHERE instance_id = $1",
                )
                .bind(instance_id)
                .execute(&pool)
                .await;
                if let Err(error) = beat {
                    eprintln!("append idle relay heartbeat failed: {error}");
                }
            }
        });
        Ok(IdleRelay {
            instance_id,
            heartbeat,
        })
    }

    /// Stops the heartbeat and deletes the row; appends stop notifying.
    async fn remove(self, pool: &PgPool) -> Result<()> {
        self.heartbeat.abort();
        let _ = self.heartbeat.await;
        sqlx::query("DELETE FROM converge.relay_instances WHERE instance_id = $1")
            .bind(self.instance_id)
            .execute(pool)
            .await?;
        Ok(())
    }
}

/// A connection that listens on the outbox channel, as a relay does, and
/// counts the notifications it receives.
struct Listener {
    received: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Listener {
    /// Connects and starts listening.
    async fn start(pool: &PgPool) -> Result<Self> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        let received = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&received);
        let task = tokio::spawn(async move {
            loop {
                match listener.recv().await {
                    Ok(_) => {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => {
                        eprintln!("append listener failed: {error}");
                        return;
                    }
                }
            }
        });
        Ok(Listener { received, task })
    }

    /// Notifications received so far.
    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Stops listening and gives the connection back to the pool.
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
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
        notifications: 0,
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
        Variant::Outbox | Variant::OutboxIdleRelay | Variant::OutboxNoNotify => {
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
