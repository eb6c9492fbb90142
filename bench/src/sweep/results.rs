//! The sweep benchmark's variants and what one run of each measured.

use super::*;

/// How the pool of an attribution run differs from the default one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum PoolVariant {
    /// sqlx defaults (a connection is pinged when taken from the idle set).
    Default,
    /// Sessions with `synchronous_commit = off`: commits do not wait for the
    /// WAL flush (the baseline flushes once per batch).
    AsyncCommit,
    /// `test_before_acquire(false)`: no ping round trip per checkout.
    NoPing,
}

impl PoolVariant {
    /// The variants measured in the attribution, besides the default.
    pub(super) const ATTRIBUTION: [PoolVariant; 2] =
        [PoolVariant::AsyncCommit, PoolVariant::NoPing];

    pub(super) fn label(self) -> &'static str {
        match self {
            PoolVariant::Default => "default",
            PoolVariant::AsyncCommit => "async-commit",
            PoolVariant::NoPing => "no-ping",
        }
    }

    /// A pool of `size` connections to `database`, of this variant.
    pub(super) async fn pool(self, env: &Env, database: &str, size: u32) -> Result<PgPool> {
        let mut options = env.options_for(database)?;
        if self == PoolVariant::AsyncCommit {
            options = options.options([("synchronous_commit", "off")]);
        }
        Ok(PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(Duration::from_secs(30))
            .test_before_acquire(self != PoolVariant::NoPing)
            .connect_with(options)
            .await?)
    }
}

/// The per-key UPDATEs alone and the sweep, with one pool variant.
#[derive(Debug, Clone)]
pub(super) struct VariantRun {
    pub(super) variant: PoolVariant,
    pub(super) per_key_updates_secs: f64,
    pub(super) sweep: SweepRun,
}

/// One sweep run, as the child reported it.
#[derive(Debug, Clone)]
pub(super) struct SweepRun {
    pub(super) batch_size: i64,
    pub(super) concurrency: usize,
    pub(super) secs: f64,
    pub(super) child: serde_json::Value,
}

impl SweepRun {
    pub(super) fn rate(&self, keys: u64) -> f64 {
        keys as f64 / self.secs
    }

    pub(super) fn peak_rss_kib(&self) -> Option<u64> {
        self.child.get("peak_rss_kib").and_then(|v| v.as_u64())
    }

    pub(super) fn child_f64(&self, key: &str) -> f64 {
        self.child
            .get(key)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or_default()
    }

    pub(super) fn json(&self, keys: u64, baseline_rate: f64) -> serde_json::Value {
        let updates = self.child_f64("update_secs_total");
        let acquires = self.child_f64("acquire_secs_total");
        json!({
            "batch_size": self.batch_size,
            "concurrency": self.concurrency,
            "pool_size": self.concurrency as u32 + POOL_SLACK,
            "keys_per_sec": round2(self.rate(keys)),
            "ratio": round3(self.rate(keys) / baseline_rate),
            "secs": round3(self.secs),
            "us_per_key": round2(self.secs * 1e6 / keys as f64),
            "update_round_trip_us_mean": round2(updates * 1e6 / keys as f64),
            "checkout_us_mean": round2(acquires * 1e6 / keys as f64),
            "slots_busy_in_update": round3(updates / (self.secs * self.concurrency as f64)),
            "sweep_process_cpu_us_per_key": round2(self.child_f64("cpu_secs") * 1e6 / keys as f64),
            "peak_rss_kib": self.peak_rss_kib(),
            "rss_before_sweep_kib": self.child.get("rss_before_sweep_kib"),
            "start_secs": self.child.get("start_secs"),
            "status": self.child.get("status"),
            "scanned": self.child.get("scanned"),
            "reconciled": self.child.get("reconciled"),
        })
    }
}

/// The pieces of a sweep measured alone, at one setting. Its
/// `sweeper_overhead_us_per_key` is the sweep's time per key less those of
/// the pieces measured apart; on a busy machine it can come out negative.
#[derive(Debug, Clone)]
pub(super) struct Attribution {
    pub(super) batch_size: i64,
    pub(super) concurrency: usize,
    pub(super) pages_secs: f64,
    pub(super) locks_secs: f64,
    pub(super) per_key_updates_secs: f64,
    /// The same single-key UPDATEs and the same sweep with other pools.
    pub(super) variants: Vec<VariantRun>,
}

impl Attribution {
    pub(super) fn json(&self, keys: u64, sweep_secs: f64, baseline_rate: f64) -> serde_json::Value {
        let us = |secs: f64| round2(secs * 1e6 / keys as f64);
        json!({
            "batch_size": self.batch_size,
            "concurrency": self.concurrency,
            "sweep_us_per_key": us(sweep_secs),
            "candidate_pages_us_per_key": us(self.pages_secs),
            "batch_locks_us_per_key": us(self.locks_secs),
            "per_key_updates_alone_us_per_key": us(self.per_key_updates_secs),
            "per_key_updates_alone_per_sec": round2(keys as f64 / self.per_key_updates_secs),
            "pool_variants": self.variants.iter().map(|v| json!({
                "pool": v.variant.label(),
                "per_key_updates_alone_us_per_key": us(v.per_key_updates_secs),
                "per_key_updates_alone_per_sec": round2(keys as f64 / v.per_key_updates_secs),
                "sweep_us_per_key": us(v.sweep.secs),
                "sweep_keys_per_sec": round2(v.sweep.rate(keys)),
                "sweep_ratio": round3(v.sweep.rate(keys) / baseline_rate),
                "sweep_peak_rss_kib": v.sweep.peak_rss_kib(),
                "sweep_update_round_trip_us_mean":
                    round2(v.sweep.child_f64("update_secs_total") * 1e6 / keys as f64),
                "sweep_checkout_us_mean":
                    round2(v.sweep.child_f64("acquire_secs_total") * 1e6 / keys as f64),
                "sweep_process_cpu_us_per_key":
                    round2(v.sweep.child_f64("cpu_secs") * 1e6 / keys as f64),
            })).collect::<Vec<_>>(),
            "sweeper_overhead_us_per_key":
                us(sweep_secs - self.per_key_updates_secs - self.pages_secs - self.locks_secs),
        })
    }
}

/// What one size measured.
#[derive(Debug)]
pub(super) struct SizeResult {
    pub(super) keys: u64,
    pub(super) fill_secs: f64,
    pub(super) baseline_secs: Vec<f64>,
    pub(super) sweeps: Vec<SweepRun>,
    pub(super) attribution: Option<Attribution>,
}

impl SizeResult {
    pub(super) fn baseline_rate(&self) -> f64 {
        let best = self
            .baseline_secs
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        self.keys as f64 / best
    }

    pub(super) fn best(&self) -> &SweepRun {
        self.sweeps
            .iter()
            .min_by(|a, b| a.secs.total_cmp(&b.secs))
            .expect("at least one sweep run")
    }

    pub(super) fn json(&self) -> serde_json::Value {
        let best = self.best();
        let baseline = self.baseline_rate();
        let rate = best.rate(self.keys);
        json!({
            "keys": self.keys,
            "unit": "keys/s",
            "rate": round2(rate),
            "baseline_rate": round2(baseline),
            "ratio": round3(rate / baseline),
            "target_ratio": TARGET_RATIO,
            "meets_target": rate / baseline >= TARGET_RATIO,
            "best_batch_size": best.batch_size,
            "best_concurrency": best.concurrency,
            "peak_rss_kib": best.peak_rss_kib(),
            "sweep_secs": round3(best.secs),
            "baseline_rows_per_sec_each":
                self.baseline_secs.iter().map(|s| round2(self.keys as f64 / s)).collect::<Vec<_>>(),
            "baseline_batch_secs_each":
                self.baseline_secs.iter().map(|s| round3(*s)).collect::<Vec<_>>(),
            "fill_secs": round3(self.fill_secs),
            "settings": self.sweeps.iter().map(|s| s.json(self.keys, baseline)).collect::<Vec<_>>(),
            "attribution": self.attribution.as_ref().map(|a| a.json(self.keys, best.secs, baseline)),
        })
    }
}
