//! `relay --instances 1,2,4`: N relay processes sharing the partitions of one
//! pre-filled outbox, against raw JetStream publishing in the same run, with
//! the stream read back and checked for per-aggregate order.
//!
//! One drain: a fresh database and streams; the raw baseline (one publisher,
//! `--window` acknowledgements in flight); the outbox filled by SQL; N
//! `relay-only` processes. By default the fill is held back from the relays
//! by an open transaction that took an xid before it (the relays read only
//! below the server's xmin), the relays start and settle their shares of the
//! 32 partitions, and the clock starts when that transaction commits (with a
//! `NOTIFY`, as an append sends). With `--include-handout` the relays start
//! on the readable outbox and the clock starts when they are spawned: process
//! start, connection, stream check and partition hand-out are measured too.
//! The clock stops when `relay_partitions.published` adds up to the events.

use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::{Executor, PgPool};

use crate::common::{
    child_json, delete_streams, emit, random_suffix, round2, round3, stream_messages, BoxError,
    Env, Result, TempDb,
};
use crate::order::{check_order, fill_versions, OrderReport};
use crate::relay::{aggregates, child_command, fill, publish_raw_replicated, RelayArgs};

/// Longest wait for N relays to settle their shares.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the parent looks at `relay_partitions`.
const POLL: Duration = Duration::from_millis(20);

/// What one drain is asked to do.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DrainSpec {
    /// Events in the outbox.
    pub(crate) events: u64,
    /// Relay processes.
    pub(crate) instances: usize,
    /// Replicas of both streams.
    pub(crate) replicas: usize,
    /// Acknowledgements in flight for the raw baseline.
    pub(crate) window: usize,
    /// `RelayConfig::batch_size`.
    pub(crate) batch_size: usize,
    /// Time process start and hand-out too.
    pub(crate) include_handout: bool,
}

/// What one drain measured.
#[derive(Debug, Clone)]
pub(crate) struct Drain {
    /// The request.
    pub(crate) spec: DrainSpec,
    /// Raw baseline, seconds.
    pub(crate) raw_secs: f64,
    /// The relays, seconds (see the module doc for when the clock starts).
    pub(crate) relay_secs: f64,
    /// Seconds from the clock's start until every instance held a fair
    /// share (0 when settled before the clock started).
    pub(crate) settled_secs: Option<f64>,
    /// Partitions per instance once settled, e.g. `16+16`.
    pub(crate) shares: String,
    /// Lease claims (epoch increments) between clock start and stop.
    pub(crate) claims_during: i64,
    /// The read-back of the relay stream.
    pub(crate) order: OrderReport,
}

impl Drain {
    /// Relay events/s, all instances together.
    pub(crate) fn rate(&self) -> f64 {
        self.spec.events as f64 / self.relay_secs
    }

    /// Raw publish messages/s.
    pub(crate) fn raw_rate(&self) -> f64 {
        self.spec.events as f64 / self.raw_secs
    }

    /// Relay ÷ raw.
    pub(crate) fn ratio(&self) -> f64 {
        self.rate() / self.raw_rate()
    }

    /// The JSON of this drain.
    pub(crate) fn json(&self) -> serde_json::Value {
        json!({
            "events": self.spec.events,
            "instances": self.spec.instances,
            "replicas": self.spec.replicas,
            "unit": "events/s",
            "rate": round2(self.rate()),
            "baseline_rate": round2(self.raw_rate()),
            "ratio": round3(self.ratio()),
            "relay_secs": round3(self.relay_secs),
            "baseline_secs": round3(self.raw_secs),
            "handout": if self.spec.include_handout { "measured" } else { "settled before" },
            "settled_secs": self.settled_secs.map(round3),
            "shares": self.shares,
            "claims_during": self.claims_during,
            "order_checked_messages": self.order.messages,
            "order_checked_aggregates": self.order.aggregates,
            "order_check_secs": round3(self.order.secs),
            "window": self.spec.window,
            "batch_size": self.spec.batch_size,
        })
    }
}

/// Runs `relay --instances`.
pub(crate) async fn run_instances(env: &Env, args: &RelayArgs) -> Result<()> {
    let mut drains = Vec::new();
    for &instances in &args.instances {
        let spec = DrainSpec {
            events: args.events,
            instances: instances.max(1),
            replicas: 1,
            window: args.window,
            batch_size: args.batch_size,
            include_handout: args.include_handout,
        };
        let d = drain(env, spec).await?;
        println!(
            "relay x{} {:>8} events: {:>9.0} events/s ({:.2} s), raw JetStream {:>9.0} msgs/s \
             ({:.2} s), ratio {:.3}; hand-out {} (shares {}, settled at {}, {} claims while \
             draining); order checked: {} messages, {} aggregates, in version order once each",
            d.spec.instances,
            d.spec.events,
            d.rate(),
            d.relay_secs,
            d.raw_rate(),
            d.raw_secs,
            d.ratio(),
            if spec.include_handout {
                "measured"
            } else {
                "settled before the clock"
            },
            d.shares,
            d.settled_secs
                .map_or("never".into(), |s| format!("{s:.2} s")),
            d.claims_during,
            d.order.messages,
            d.order.aggregates,
        );
        drains.push(d);
    }
    let one = drains
        .iter()
        .find(|d| d.spec.instances == 1)
        .map(Drain::rate);
    let runs: Vec<serde_json::Value> = drains
        .iter()
        .map(|d| {
            let mut j = d.json();
            if let Some(one) = one {
                j["vs_one_instance"] = json!(round3(d.rate() / one));
            }
            j
        })
        .collect();
    emit(&json!({"scenario": "relay-instances", "runs": runs}));
    Ok(())
}

/// One drain on a fresh database and fresh streams, on `env`'s NATS.
pub(crate) async fn drain(env: &Env, spec: DrainSpec) -> Result<Drain> {
    let db = TempDb::create(env).await?;
    let database = db.name.clone();
    let client = env.nats().await?;
    let suffix = random_suffix();
    let relay_stream = format!("BENCH_SCALE_{suffix}");
    let relay_prefix = format!("bench_scale_{suffix}");
    let raw_stream = format!("BENCH_RAW_{suffix}");
    let raw_prefix = format!("bench_raw_{suffix}");
    let streams = [relay_stream.clone(), raw_stream.clone()];
    let tag = format!("x{} R{}", spec.instances, spec.replicas);
    let events = spec.events;

    let body = async {
        let pool = env.pool_for(&database, 3).await?;
        converge::migrate(&pool).await?;

        eprintln!(
            "[{tag}] baseline: raw JetStream publish, window {}",
            spec.window
        );
        let raw = publish_raw_replicated(
            &client,
            &raw_stream,
            &raw_prefix,
            events,
            spec.window,
            spec.replicas,
        )
        .await?;
        let raw_count = stream_messages(&client, &raw_stream).await?;
        if raw_count != events {
            return Err(format!("baseline stream holds {raw_count} messages, not {events}").into());
        }

        // Held back: a transaction with an xid older than every fill row.
        let mut hold = pool.begin().await?;
        if !spec.include_handout {
            hold.execute("SELECT txid_current()").await?;
        }
        eprintln!("[{tag}] filling the outbox of {database}");
        fill(&pool, events).await?;

        let spawn = |_| -> Result<tokio::task::JoinHandle<Result<serde_json::Value>>> {
            let mut command = child_command(
                &database,
                &relay_stream,
                &relay_prefix,
                events,
                spec.batch_size,
                spec.replicas,
            )?;
            command.env("NATS_URL", &env.nats_url);
            Ok(tokio::spawn(async move {
                child_json(&mut command, "relay-only").await
            }))
        };
        let (mut children, started, settled_secs, shares) = if spec.include_handout {
            hold.rollback().await?;
            eprintln!("[{tag}] {} relays on the filled outbox", spec.instances);
            let started = Instant::now();
            let children = Children((0..spec.instances).map(spawn).collect::<Result<_>>()?);
            (children, started, None, String::new())
        } else {
            eprintln!("[{tag}] {} relays, held back until settled", spec.instances);
            let mut children = Children((0..spec.instances).map(spawn).collect::<Result<_>>()?);
            let shares = settle(&pool, spec.instances, &mut children).await?;
            hold.execute("NOTIFY converge_outbox").await?;
            hold.commit().await?;
            (children, Instant::now(), Some(0.0), shares)
        };
        let epochs_before = epoch_sum(&pool).await?;
        let mut settled_secs = settled_secs;
        let mut shares = shares;
        loop {
            // Looked at before the count: a relay ends only once the count is full.
            let ended = children.any_ended();
            let published: i64 = sqlx::query_scalar(
                "SELECT coalesce(sum(published), 0)::bigint FROM converge.relay_partitions",
            )
            .fetch_one(&pool)
            .await?;
            if published >= events as i64 {
                break;
            }
            if settled_secs.is_none() {
                if let Some(s) = fair_shares(&pool, spec.instances).await? {
                    settled_secs = Some(started.elapsed().as_secs_f64());
                    shares = s;
                }
            }
            if started.elapsed() > Duration::from_secs(120 + events / 1_000) {
                return Err(format!("relays published {published} of {events} in time").into());
            }
            if ended {
                return Err(children.ended_error("before the outbox was drained").await);
            }
            tokio::time::sleep(POLL).await;
        }
        let relay_secs = started.elapsed().as_secs_f64();
        let claims_during = epoch_sum(&pool).await? - epochs_before;
        children.wait().await?;

        let rejects: i64 = sqlx::query_scalar("SELECT count(*) FROM converge.relay_rejects")
            .fetch_one(&pool)
            .await?;
        pool.close().await;
        if rejects != 0 {
            return Err(format!("relays rejected {rejects} events").into());
        }
        eprintln!("[{tag}] reading the relay stream back");
        let aggs = aggregates(events);
        let order =
            check_order(&client, &relay_stream, |id| fill_versions(id, events, aggs)).await?;
        if order.messages != events || order.aggregates != aggs {
            return Err(format!(
                "relay stream holds {} messages of {} aggregates, not {events} of {aggs}",
                order.messages, order.aggregates
            )
            .into());
        }
        Ok(Drain {
            spec,
            raw_secs: raw.as_secs_f64(),
            relay_secs,
            settled_secs,
            shares,
            claims_during,
            order,
        })
    };
    let cleanup = async {
        delete_streams(&client, &streams).await;
        db.drop_db().await
    };
    crate::common::with_cleanup(body, cleanup).await
}

/// The relay processes of one drain; aborting a task kills its child.
struct Children(Vec<tokio::task::JoinHandle<Result<serde_json::Value>>>);

impl Children {
    /// Whether a relay process has ended (or failed to start).
    fn any_ended(&self) -> bool {
        self.0.iter().any(tokio::task::JoinHandle::is_finished)
    }

    /// The error of a relay process that ended, or one saying it ended `when`.
    async fn ended_error(&mut self, when: &str) -> BoxError {
        for handle in &mut self.0 {
            if handle.is_finished() {
                match handle.await {
                    Ok(Err(e)) => return e,
                    Err(e) => return e.into(),
                    Ok(Ok(_)) => {}
                }
            }
        }
        format!("a relay process ended {when}").into()
    }

    /// Waits for every relay process and fails if one did.
    async fn wait(mut self) -> Result<()> {
        for handle in std::mem::take(&mut self.0) {
            handle.await??;
        }
        Ok(())
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for handle in &self.0 {
            handle.abort();
        }
    }
}

/// Waits until `instances` relays hold fair shares; returns them (`16+16`).
async fn settle(pool: &PgPool, instances: usize, children: &mut Children) -> Result<String> {
    let started = Instant::now();
    loop {
        if let Some(shares) = fair_shares(pool, instances).await? {
            eprintln!(
                "[scale] shares {shares} settled after {:.2} s",
                started.elapsed().as_secs_f64()
            );
            return Ok(shares);
        }
        if started.elapsed() > SETTLE_TIMEOUT {
            return Err(format!(
                "{instances} relays did not settle their partition shares within {SETTLE_TIMEOUT:?}"
            )
            .into());
        }
        if children.any_ended() {
            return Err(children.ended_error("before its partitions settled").await);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The shares if every partition is held, by exactly `instances` owners, none
/// holding more than one partition over another.
async fn fair_shares(pool: &PgPool, instances: usize) -> Result<Option<String>> {
    let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT owner_name, count(*) FROM converge.relay_partitions \
         GROUP BY owner_name ORDER BY count(*) DESC, owner_name",
    )
    .fetch_all(pool)
    .await?;
    let counts: Vec<i64> = rows.iter().map(|r| r.1).collect();
    let fair = rows.len() == instances
        && rows.iter().all(|r| r.0.is_some())
        && counts
            .iter()
            .max()
            .zip(counts.iter().min())
            .is_some_and(|(a, b)| a - b <= 1);
    Ok(fair.then(|| {
        counts
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join("+")
    }))
}

/// Sum of the partitions' lease epochs (one more per claim).
async fn epoch_sum(pool: &PgPool) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT coalesce(sum(epoch), 0)::bigint FROM converge.relay_partitions")
            .fetch_one(pool)
            .await?,
    )
}
