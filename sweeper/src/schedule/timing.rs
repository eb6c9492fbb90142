//! Planning runs: the due check, the next plan, misfires.

use super::*;

/// What to do when a planned fire time was missed by more than the grace
/// period (downtime, or a previous run that lasted past it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Misfire {
    /// Run once now (inside the window, if any: at its next opening), then
    /// continue with the first fire time after that run. However many fire
    /// times were missed, there is one catch-up run.
    #[default]
    RunOnce,
    /// Do not run for the missed fire times: wait for the first fire time that
    /// is not yet late. A fixed delay restarts from now.
    Skip,
}

/// What a sweep should do at `now` with its planned fire time
/// (see [`Timing::due`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Due {
    /// Run now: on time, or the single catch-up run of [`Misfire::RunOnce`]
    /// ([`Timing::is_misfire`] tells which).
    Now,
    /// Not yet: the planned fire time is this instant. Store it as the plan
    /// (it differs from the old plan after a misfire), sleep until then and ask
    /// again.
    At(DateTime<Utc>),
}

/// When a sweep runs: its schedule, window, misfire policy and start-up run.
///
/// All methods take the current time as an argument (an injected clock).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timing {
    /// What drives the fire times.
    pub schedule: Schedule,
    /// Only plan runs inside this daily window, if set.
    pub window: Option<Window>,
    /// What to do after a missed fire time.
    pub misfire: Misfire,
    /// Run once as soon as the process starts (inside the window, if any), in
    /// addition to the schedule.
    pub run_at_startup: bool,
    /// How late a run may start before its fire time counts as missed.
    /// Default: 60 s (Quartz's misfire threshold).
    pub misfire_grace: Duration,
}

impl Timing {
    /// The default misfire grace period.
    pub const DEFAULT_MISFIRE_GRACE: Duration = Duration::from_secs(60);

    /// A timing with no window, [`Misfire::RunOnce`], no start-up run and the
    /// default grace period.
    pub fn new(schedule: Schedule) -> Self {
        Self {
            schedule,
            window: None,
            misfire: Misfire::default(),
            run_at_startup: false,
            misfire_grace: Self::DEFAULT_MISFIRE_GRACE,
        }
    }

    /// Restricts runs to `window`.
    pub fn with_window(mut self, window: Window) -> Self {
        self.window = Some(window);
        self
    }

    /// Sets the misfire policy.
    pub fn with_misfire(mut self, misfire: Misfire) -> Self {
        self.misfire = misfire;
        self
    }

    /// Sets whether to run once at start-up.
    pub fn with_run_at_startup(mut self, run_at_startup: bool) -> Self {
        self.run_at_startup = run_at_startup;
        self
    }

    /// Sets how late a run may start before it counts as a misfire.
    pub fn with_misfire_grace(mut self, grace: Duration) -> Self {
        self.misfire_grace = grace;
        self
    }

    /// The planned fire time after a run that was planned for `planned` (if it
    /// was planned) and finished at `finished_at`, computed at `now`:
    ///
    /// * cron: the first fire time after both `now` and `planned`;
    /// * fixed rate: `planned + rate` (anchored to the plan, so no drift), or the
    ///   first `planned + k × rate` after `now` when the run or an outage lasted
    ///   longer: missed fire times are dropped, never run in a burst; without a
    ///   plan, `finished_at + rate`;
    /// * fixed delay: `finished_at + delay`.
    ///
    /// With a window, a cron plan is the first fire time inside the window and a
    /// fixed rate or delay plan outside it moves to the window's next opening.
    /// `None` when the schedule has no fire time any more.
    pub fn next_planned(
        &self,
        planned: Option<DateTime<Utc>>,
        finished_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        match &self.schedule {
            Schedule::Cron(cron) => {
                let after = planned.map_or(now, |planned| planned.max(now));
                self.cron_fire_after(cron, after)
            }
            Schedule::FixedRate(rate) => {
                let rate = period(*rate);
                let next = match planned {
                    Some(anchor) => grid_after(anchor, rate, now)?,
                    None => finished_at.checked_add_signed(rate)?,
                };
                self.in_window(next)
            }
            Schedule::FixedDelay(delay) => {
                self.in_window(finished_at.checked_add_signed(period(*delay))?)
            }
        }
    }

    /// What to do at `now` with the plan `planned`:
    ///
    /// * before `planned`: [`Due::At`]`(planned)`;
    /// * up to the grace period late: [`Due::Now`];
    /// * later, a misfire ([`Self::is_misfire`]): with [`Misfire::RunOnce`]
    ///   [`Due::Now`], or [`Due::At`] the window's next opening when the window
    ///   is closed now; with [`Misfire::Skip`] the first fire time that is not
    ///   late (which may be [`Due::Now`] when one is within the grace period),
    ///   for a fixed delay `now + delay`.
    ///
    /// Should a skipped schedule have no later fire time at all (a cron year
    /// field has passed), the answer is [`Due::Now`]: one last run, after which
    /// [`Self::next_planned`] returns `None`.
    ///
    /// A [`Due::At`] different from `planned` is the new plan: store it.
    ///
    /// After a run, [`Self::next_planned`] continues after `now`, so a misfire
    /// causes at most one catch-up run.
    pub fn due(&self, planned: DateTime<Utc>, now: DateTime<Utc>) -> Due {
        if planned > now {
            return Due::At(planned);
        }
        let on_time_from = self.on_time_from(now);
        if planned >= on_time_from {
            return Due::Now;
        }
        let next = match self.misfire {
            Misfire::RunOnce => match self.window {
                Some(window) if !window.contains(now) => window.next_open(now),
                _ => return Due::Now,
            },
            Misfire::Skip => match &self.schedule {
                Schedule::Cron(cron) => {
                    self.cron_fire_after(cron, on_time_from - TimeDelta::nanoseconds(1))
                }
                Schedule::FixedRate(rate) => grid_after(
                    planned,
                    period(*rate),
                    on_time_from - TimeDelta::nanoseconds(1),
                )
                .and_then(|next| self.in_window(next)),
                Schedule::FixedDelay(delay) => now
                    .checked_add_signed(period(*delay))
                    .and_then(|next| self.in_window(next)),
            },
        };
        match next {
            Some(next) if next > now => Due::At(next),
            _ => Due::Now,
        }
    }

    /// Whether a run planned for `planned` and starting at `now` is a misfire:
    /// later than the grace period ([`Self::misfire_grace`]).
    pub fn is_misfire(&self, planned: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        planned < self.on_time_from(now)
    }

    /// The earliest plan that is still on time at `now`.
    fn on_time_from(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let grace = TimeDelta::from_std(self.misfire_grace).unwrap_or(TimeDelta::MAX);
        now.checked_sub_signed(grace)
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// The first plan of a sweep that has none yet (a fresh deployment): `now`
    /// (or the window's next opening) with [`Self::run_at_startup`], otherwise
    /// the first fire time after `now` — for a fixed rate or delay, `now + period`.
    pub fn first_planned(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.run_at_startup {
            return self.in_window(now);
        }
        match &self.schedule {
            Schedule::Cron(cron) => self.cron_fire_after(cron, now),
            Schedule::FixedRate(every) | Schedule::FixedDelay(every) => {
                self.in_window(now.checked_add_signed(period(*every))?)
            }
        }
    }

    /// The plan when a process starts, given the persisted plan (if any):
    /// with [`Self::run_at_startup`] a run now (or at the window's next
    /// opening), otherwise the persisted plan — to be passed to [`Self::due`],
    /// which handles a plan missed during downtime — or, without one,
    /// [`Self::first_planned`].
    pub fn on_startup(
        &self,
        persisted: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        match persisted {
            Some(planned) if !self.run_at_startup => Some(planned),
            _ => self.first_planned(now),
        }
    }

    /// `instant`, or the window's next opening when it is outside the window.
    fn in_window(&self, instant: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self.window {
            Some(window) => window.next_open(instant),
            None => Some(instant),
        }
    }

    /// The first cron fire time strictly after `after` inside the window.
    fn cron_fire_after(&self, cron: &CronSchedule, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut fire = cron.next_after(after)?;
        let Some(window) = self.window else {
            return Some(fire);
        };
        for _ in 0..MAX_WINDOW_SEARCH {
            if window.contains(fire) {
                return Some(fire);
            }
            let open = window.next_open(fire)?;
            fire = cron.next_after(open - TimeDelta::nanoseconds(1))?;
        }
        None
    }
}

/// The first `anchor + k × rate` (k ≥ 1) strictly after `bound`.
pub(super) fn grid_after(
    anchor: DateTime<Utc>,
    rate: TimeDelta,
    bound: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let first = anchor.checked_add_signed(rate)?;
    if first > bound {
        return Some(first);
    }
    let nanos = |delta: TimeDelta| {
        i128::from(delta.num_seconds()) * 1_000_000_000 + i128::from(delta.subsec_nanos())
    };
    let rate_nanos = nanos(rate).max(1);
    let steps = nanos(bound - anchor) / rate_nanos + 1;
    let offset = steps * rate_nanos;
    let seconds = i64::try_from(offset / 1_000_000_000).ok()?;
    let subsec = i64::try_from(offset % 1_000_000_000).ok()?;
    let delta = TimeDelta::try_seconds(seconds)? + TimeDelta::nanoseconds(subsec);
    anchor.checked_add_signed(delta)
}
