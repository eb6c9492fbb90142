//! Looking at sweeps without running them: the candidates a run would visit
//! (an operator's dry run) and each sweep's convergence figure.

use chrono::{DateTime, Utc};

use crate::candidates::Backlog;
use crate::error::SweepError;
use crate::sweeper::SweeperHandle;

/// How long `converge.convergence_history` keeps a measurement: the
/// dashboard draws the last hours and days from it.
pub const HISTORY_RETENTION: std::time::Duration = std::time::Duration::from_secs(14 * 86_400);

/// One sweep's convergence figure, as [`SweeperHandle::measure`] recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Convergence {
    /// The sweep.
    pub sweep: String,
    /// Keys not converged.
    pub keys: i64,
    /// When the oldest of them started waiting.
    pub oldest: Option<DateTime<Utc>>,
}

impl Convergence {
    /// Age of the oldest key not converged at `now` (zero when none).
    pub fn oldest_age(&self, now: DateTime<Utc>) -> std::time::Duration {
        self.oldest
            .and_then(|o| (now - o).to_std().ok())
            .unwrap_or_default()
    }
}

impl SweeperHandle {
    /// The keys a run of `sweep` would visit now, in key order, at most
    /// `limit`; the flag says whether more exist. Nothing is reconciled.
    pub async fn candidates(
        &self,
        sweep: &str,
        limit: u64,
    ) -> Result<(Vec<String>, bool), SweepError> {
        let candidates = self
            .candidates
            .get(sweep)
            .ok_or_else(|| self.unknown(sweep))?;
        let mut keys: Vec<String> = Vec::new();
        let wanted = limit.saturating_add(1);
        while (keys.len() as u64) < wanted {
            let page_size = (wanted - keys.len() as u64).min(1000) as i64;
            let after = keys.last().cloned();
            let page = candidates
                .page(&self.pool, after.as_deref(), page_size)
                .await?;
            let done = (page.len() as i64) < page_size;
            keys.extend(page);
            if done {
                break;
            }
        }
        let truncated = keys.len() as u64 > limit;
        keys.truncate(limit as usize);
        Ok((keys, truncated))
    }

    /// Each sweep's convergence figure (for sweeps whose candidates can say,
    /// see [`Candidates::backlog`](crate::Candidates::backlog)), at most
    /// `every` old: one instance of the cluster measures a sweep per interval
    /// (it claims the measurement in `converge.sweep_schedules`), the others
    /// read what it recorded. A sweep whose query fails is logged and left
    /// out; the others are still measured.
    pub async fn measure(&self, every: std::time::Duration) -> Vec<Convergence> {
        let mut figures = Vec::new();
        for sweep in self.sweeps() {
            match self.measure_one(&sweep, every).await {
                Ok(Some(figure)) => figures.push(figure),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(sweep, error = %e, "measuring the convergence figure failed")
                }
            }
        }
        figures
    }

    async fn measure_one(
        &self,
        sweep: &str,
        every: std::time::Duration,
    ) -> Result<Option<Convergence>, SweepError> {
        // Claim this interval's measurement: only when the figures are due
        // and nobody is measuring (a claim older than ten intervals, or a
        // minute, was abandoned by a worker that died or stopped).
        let claimed: Option<i32> = sqlx::query_scalar(
            "UPDATE converge.sweep_schedules SET measure_claimed_at = now() \
             WHERE sweep = $1 \
               AND (measured_at IS NULL OR measured_at < now() - make_interval(secs => $2)) \
               AND (measure_claimed_at IS NULL \
                    OR measure_claimed_at < now() - make_interval(secs => $3)) \
             RETURNING 1",
        )
        .bind(sweep)
        .bind(every.as_secs_f64() * 0.9)
        .bind((every.as_secs_f64() * 10.0).max(60.0))
        .fetch_optional(&self.pool)
        .await?;
        if claimed.is_none() {
            let recorded: Option<(Option<i64>, Option<DateTime<Utc>>)> = sqlx::query_as(
                "SELECT unconverged_keys, oldest_unconverged_at FROM converge.sweep_schedules \
                 WHERE sweep = $1",
            )
            .bind(sweep)
            .fetch_optional(&self.pool)
            .await?;
            return Ok(match recorded {
                Some((Some(keys), oldest)) => Some(Convergence {
                    sweep: sweep.to_owned(),
                    keys,
                    oldest,
                }),
                _ => None,
            });
        }
        let Backlog { keys, oldest } = match self.candidates[sweep].backlog(&self.pool).await {
            Ok(Some(backlog)) => backlog,
            not_measured => {
                // Release the claim; `measured_at` keeps saying how old the figures are.
                sqlx::query(
                    "UPDATE converge.sweep_schedules SET measure_claimed_at = NULL WHERE sweep = $1",
                )
                .bind(sweep)
                .execute(&self.pool)
                .await?;
                // A failed query is the caller's to log; no figure is not an error.
                let _none = not_measured?;
                return Ok(None);
            }
        };
        // The figure, its history, and the history's retention, at once.
        sqlx::query(
            "WITH latest AS ( \
               UPDATE converge.sweep_schedules \
               SET unconverged_keys = $2, oldest_unconverged_at = $3, measured_at = now(), \
                   measure_claimed_at = NULL \
               WHERE sweep = $1 RETURNING sweep, measured_at), \
             added AS ( \
               INSERT INTO converge.convergence_history \
                 (sweep, measured_at, unconverged_keys, oldest_unconverged_at) \
               SELECT sweep, measured_at, $2, $3 FROM latest ON CONFLICT DO NOTHING) \
             DELETE FROM converge.convergence_history \
             WHERE sweep = $1 AND measured_at < now() - make_interval(secs => $4)",
        )
        .bind(sweep)
        .bind(keys)
        .bind(oldest)
        .bind(HISTORY_RETENTION.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(Some(Convergence {
            sweep: sweep.to_owned(),
            keys,
            oldest,
        }))
    }

    /// Who holds `sweep`'s lease now, if anyone (database clock).
    pub async fn lease_holder(&self, sweep: &str) -> Result<Option<String>, SweepError> {
        Ok(sqlx::query_scalar(
            "SELECT holder FROM converge.leases WHERE name = $1 AND lock_until > now()",
        )
        .bind(sweep)
        .fetch_optional(&self.pool)
        .await?
        .flatten())
    }
}
