//! When a sweep runs: cron in an IANA time zone, fixed rate, fixed delay, time
//! windows and the misfire policy.
//!
//! Everything here is pure computation on instants ([`DateTime<Utc>`]); the
//! current time is always passed in (`now`), never read from a clock, so the
//! logic is tested without waiting and the runtime decides how to sleep.
//!
//! # Cron in a time zone
//!
//! Expressions have 6 fields (`sec min hour day-of-month month day-of-week`) or
//! 7 (`+ year`), as parsed by the [`cron`] crate; the shorthands `@hourly`,
//! `@daily`, `@weekly`, `@monthly` and `@yearly` are accepted too. A 5-field
//! (classic Unix) expression is rejected with a hint to prepend a seconds
//! field. Day-of-month and day-of-week must *both* match (the `cron` crate's
//! rule, unlike Vixie cron's "either").
//!
//! The expression is evaluated on the *wall clock* of the zone, and the
//! daylight-saving rules are those of Vixie cron. The expression is first
//! iterated over naive local date-times (a calendar without DST), then each
//! local date-time is mapped to real instants:
//!
//! * A local time that occurs once fires at that instant.
//! * **Wildcard schedules** — the minute or the hour field contains `*`, `?` or
//!   `/` (`@hourly` counts as one), i.e. sub-daily periodic jobs such as
//!   `0 */5 22-23,0-5 * * *` — run by real time: a local time that occurs
//!   twice (clocks go back) fires at *both* instants, a local time that does not
//!   exist (clocks go forward) does not fire. `0 */5 22-23,0-5 * * *` in
//!   `Australia/Melbourne` therefore fires every five real minutes from 22:00 to
//!   05:55 local time on every night, 108 times on the night the clocks go back
//!   and 84 times on the night they go forward.
//! * **Fixed-time schedules** — minute and hour are explicit values, lists or
//!   ranges, e.g. `0 30 2 * * *` — fire once per matching local time: a local
//!   time that occurs twice fires at the earlier instant only; a local time that
//!   does not exist fires at the first instant after the gap (02:30 on a night
//!   the clocks jump from 02:00 to 03:00 fires at 03:00), once even when several
//!   skipped times or a regular 03:00 fire map to that instant.
//!
//! Fire instants are strictly increasing and
//! [`CronSchedule::next_after`]`(t)` is the first one strictly after `t`. The
//! `cron` crate's own time-zone iteration is not used: it has no notion of these
//! rules. The tests check the fire times across DST changes against Python's
//! `zoneinfo` as an independent reference.
//!
//! # Planning runs
//!
//! A sweep keeps one *planned* fire time (persisted by the runtime).
//! [`Timing::due`] says what to do with it at `now` (run, sleep, or re-plan after
//! a misfire), [`Timing::next_planned`] computes the plan after a run, and
//! [`Timing::first_planned`] / [`Timing::on_startup`] the plan at start-up.
//! A sweep that missed many fire times (downtime, a run longer than the period)
//! runs at most once to catch up, never a burst.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, LocalResult, NaiveDateTime, NaiveTime, Offset, TimeDelta, TimeZone, Utc};
use chrono_tz::{GapInfo, Tz};

/// The shortest period of a fixed rate or delay used in computations; shorter
/// (zero) periods are rejected by the constructors and raised to this value if
/// built directly.
const MIN_PERIOD: TimeDelta = TimeDelta::milliseconds(1);

/// How far [`Timing`] searches for a cron fire time inside its window, in
/// window openings (roughly days) before it gives up.
const MAX_WINDOW_SEARCH: usize = 10_000;

/// Why a schedule, a time zone or a window could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError {
    /// The cron expression has 5 fields: it lacks the leading seconds field.
    #[error(
        "cron expression `{expression}` has 5 fields, but converge expects 6 fields \
         (sec min hour day-of-month month day-of-week) or 7 (+ year): prepend a seconds field, \
         e.g. `0 {expression}`"
    )]
    FiveFields {
        /// The expression as given.
        expression: String,
    },
    /// The cron expression could not be parsed.
    #[error(
        "invalid cron expression `{expression}`: {message}; expected 6 fields \
         (sec min hour day-of-month month day-of-week) or 7 (+ year), e.g. `0 */5 22-23,0-5 * * *`"
    )]
    InvalidCron {
        /// The expression as given.
        expression: String,
        /// What the `cron` crate reported, with the number of fields found.
        message: String,
    },
    /// The time-zone name is not an IANA time zone.
    #[error("unknown time zone `{name}`: expected an IANA name such as `Europe/Berlin` or `UTC`")]
    UnknownTimeZone {
        /// The name as given.
        name: String,
    },
    /// A fixed rate or delay of zero.
    #[error("a fixed rate or delay must be longer than zero")]
    ZeroPeriod,
    /// A duration too long to add to an instant.
    #[error("duration {0:?} is too long")]
    DurationTooLong(Duration),
    /// A window whose start equals its end.
    #[error(
        "window start and end are both {0}: a window needs two different times \
         (omit the window to allow all times)"
    )]
    EmptyWindow(NaiveTime),
}

/// Parses an IANA time-zone name (`Australia/Melbourne`, `UTC`).
pub fn time_zone(name: &str) -> Result<Tz, ScheduleError> {
    Tz::from_str(name.trim()).map_err(|_| ScheduleError::UnknownTimeZone {
        name: name.to_owned(),
    })
}

/// A cron expression evaluated on the wall clock of an IANA time zone, with the
/// DST rules described in the [module documentation](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronSchedule {
    /// Boxed: the parsed fields are large and [`Schedule`] holds one inline.
    cron: Box<cron::Schedule>,
    tz: Tz,
    wildcard: bool,
    source: String,
}

impl CronSchedule {
    /// Parses a 6- or 7-field cron expression (or a shorthand such as `@daily`)
    /// to be evaluated in `tz`.
    pub fn parse(expression: &str, tz: Tz) -> Result<Self, ScheduleError> {
        let trimmed = expression.trim();
        let fields = fields(trimmed);
        let shorthand = trimmed.starts_with('@');
        if !shorthand && fields.len() == 5 {
            return Err(ScheduleError::FiveFields {
                expression: trimmed.to_owned(),
            });
        }
        let cron = cron::Schedule::from_str(trimmed).map_err(|error| {
            let count = if shorthand || (6..=7).contains(&fields.len()) {
                String::new()
            } else {
                format!(" (found {} fields)", fields.len())
            };
            ScheduleError::InvalidCron {
                expression: trimmed.to_owned(),
                message: format!("{error}{count}"),
            }
        })?;
        let wildcard = if shorthand {
            trimmed == "@hourly"
        } else {
            fields
                .iter()
                .skip(1)
                .take(2)
                .any(|field| field.contains(['*', '?', '/']))
        };
        Ok(Self {
            cron: Box::new(cron),
            tz,
            wildcard,
            source: trimmed.to_owned(),
        })
    }

    /// The time zone whose wall clock the expression is evaluated on.
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// The expression as given (trimmed).
    pub fn expression(&self) -> &str {
        &self.source
    }

    /// Whether the schedule is a wildcard (sub-daily periodic, runs by real
    /// time across DST changes) rather than a fixed-time schedule.
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// The first fire instant strictly after `after`, or `None` when the
    /// expression has no more matches (e.g. its year field has passed; the
    /// `cron` crate stops at 2100).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local_after = self.tz.from_utc_datetime(&after.naive_utc()).naive_local();
        // Local time only moves backwards when clocks go back. If `after` is the
        // earlier of two instants sharing its wall-clock time, the stretch of
        // wall-clock time that will repeat before it may still fire (wildcard
        // schedules fire at the repeated instants too): start the naive
        // iteration the depth of the fold earlier.
        let mut cursor = local_after;
        if self.wildcard {
            if let LocalResult::Ambiguous(earlier, later) =
                self.tz.from_local_datetime(&local_after)
            {
                if earlier.with_timezone(&Utc) == after {
                    cursor = local_after - (later - earlier);
                }
            }
        }
        let mut best: Option<DateTime<Utc>> = None;
        loop {
            let Some(next) = self.cron.after(&cursor.and_utc()).next() else {
                return best;
            };
            let naive = next.naive_utc();
            let found = self
                .instants(naive)
                .into_iter()
                .flatten()
                .filter(|instant| *instant > after)
                .min();
            match found {
                // Past `after`'s wall-clock time, local time increases with real
                // time up to the first match: no later match in naive order is
                // earlier in real time, except one from the repeated stretch.
                Some(instant) if naive > local_after => {
                    return Some(best.map_or(instant, |best| best.min(instant)));
                }
                // In the repeated stretch, matches fire in naive order: the first
                // is the earliest there. Continue from `after`'s wall-clock time.
                Some(instant) => {
                    best = Some(instant);
                    cursor = local_after;
                }
                None => cursor = naive,
            }
        }
    }

    /// The fire instants of a matching naive local time, by the DST rules.
    fn instants(&self, naive: NaiveDateTime) -> [Option<DateTime<Utc>>; 2] {
        match self.tz.from_local_datetime(&naive) {
            LocalResult::Single(instant) => [Some(instant.with_timezone(&Utc)), None],
            LocalResult::Ambiguous(earlier, later) => [
                Some(earlier.with_timezone(&Utc)),
                self.wildcard.then(|| later.with_timezone(&Utc)),
            ],
            LocalResult::None if self.wildcard => [None, None],
            LocalResult::None => [gap_end(self.tz, naive), None],
        }
    }

    /// The fire instants strictly after `after`, in increasing order.
    pub fn upcoming(&self, after: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        std::iter::successors(self.next_after(after), move |previous| {
            self.next_after(*previous)
        })
    }
}

impl fmt::Display for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` in {}", self.source, self.tz)
    }
}

/// The whitespace-separated fields of an expression, with whitespace inside a
/// list, range or step (`1, 2`, which the `cron` crate accepts) removed.
fn fields(expression: &str) -> Vec<String> {
    let mut joined = String::with_capacity(expression.len());
    let mut pending_space = false;
    for c in expression.chars() {
        if c.is_whitespace() {
            pending_space = true;
            continue;
        }
        let glue = |c: char| matches!(c, ',' | '-' | '/');
        if pending_space && !joined.is_empty() && !glue(c) && !joined.ends_with(glue) {
            joined.push(' ');
        }
        pending_space = false;
        joined.push(c);
    }
    joined.split_whitespace().map(str::to_owned).collect()
}

/// The first instant after the DST gap that contains the naive local time.
fn gap_end(tz: Tz, naive: NaiveDateTime) -> Option<DateTime<Utc>> {
    GapInfo::new(&naive, &tz)?
        .end
        .map(|end| end.with_timezone(&Utc))
}

/// The UTC offset of `tz` at an instant, in seconds.
fn offset_seconds(tz: Tz, instant: DateTime<Utc>) -> i32 {
    tz.offset_from_utc_datetime(&instant.naive_utc())
        .fix()
        .local_minus_utc()
}

/// The instants in `(from, to]` at which the UTC offset of `tz` changes.
/// Probes hourly, so two changes within an hour of each other are missed (no
/// zone has them).
fn transitions(tz: Tz, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let mut found = Vec::new();
    let mut a = from;
    let mut offset_a = offset_seconds(tz, a);
    while a < to {
        let b = (a + TimeDelta::hours(1)).min(to);
        let offset_b = offset_seconds(tz, b);
        if offset_b != offset_a {
            // The offset is `offset_a` at `lo` and differs at `hi`.
            let (mut lo, mut hi) = (a.timestamp(), b.timestamp());
            if b.timestamp_subsec_nanos() > 0 {
                hi += 1;
            }
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                let at = DateTime::from_timestamp(mid, 0).unwrap_or(a);
                if offset_seconds(tz, at) == offset_a {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            if let Some(at) = DateTime::from_timestamp(hi, 0) {
                if at > from && at <= to {
                    found.push(at);
                }
            }
        }
        a = b;
        offset_a = offset_b;
    }
    found
}

/// A daily time window on the wall clock of a time zone, e.g. 22:00–06:00:
/// runs are only planned inside it.
///
/// The window contains an instant when the instant's local time `t` satisfies
/// `start <= t < end`; when `start > end` the window wraps midnight
/// (`t >= start || t < end`). On DST nights the window is as long as the wall
/// clock says: 22:00–06:00 lasts 7 real hours when the clocks go forward, 9 when
/// they go back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    start: NaiveTime,
    end: NaiveTime,
    tz: Tz,
}

impl Window {
    /// The window from `start` (inclusive) to `end` (exclusive) local time in
    /// `tz`; `start > end` wraps midnight. Equal times are rejected.
    pub fn new(start: NaiveTime, end: NaiveTime, tz: Tz) -> Result<Self, ScheduleError> {
        if start == end {
            return Err(ScheduleError::EmptyWindow(start));
        }
        Ok(Self { start, end, tz })
    }

    /// The local time at which the window opens.
    pub fn start(&self) -> NaiveTime {
        self.start
    }

    /// The local time at which the window closes.
    pub fn end(&self) -> NaiveTime {
        self.end
    }

    /// The time zone of the window's wall clock.
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// Whether the window is open at `instant`.
    pub fn contains(&self, instant: DateTime<Utc>) -> bool {
        let local = self
            .tz
            .from_utc_datetime(&instant.naive_utc())
            .naive_local()
            .time();
        if self.start < self.end {
            self.start <= local && local < self.end
        } else {
            local >= self.start || local < self.end
        }
    }

    /// The first instant at or after `at` at which the window is open: `at`
    /// itself when the window is open then. An opening time that does not exist
    /// (clocks go forward over it) opens the window at the end of the gap; a
    /// repeated one opens it at its first occurrence. `None` only past the end of
    /// the representable calendar.
    pub fn next_open(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.contains(at) {
            return Some(at);
        }
        // The window opens when the wall clock reaches `start`, or when a DST
        // change makes it jump into the window. Search chunk by chunk.
        let chunk = TimeDelta::days(3);
        let mut from = at;
        for _ in 0..MAX_WINDOW_SEARCH {
            let to = from.checked_add_signed(chunk)?;
            let local_date = self.tz.from_utc_datetime(&from.naive_utc()).date_naive();
            let mut candidates = transitions(self.tz, from, to);
            for days in -1..=4 {
                let Some(date) = local_date.checked_add_signed(TimeDelta::days(days)) else {
                    continue;
                };
                let naive = date.and_time(self.start);
                match self.tz.from_local_datetime(&naive) {
                    LocalResult::Single(instant) => candidates.push(instant.with_timezone(&Utc)),
                    LocalResult::Ambiguous(earlier, later) => {
                        candidates.push(earlier.with_timezone(&Utc));
                        candidates.push(later.with_timezone(&Utc));
                    }
                    LocalResult::None => candidates.extend(gap_end(self.tz, naive)),
                }
            }
            let open = candidates
                .into_iter()
                .filter(|instant| *instant > from && self.contains(*instant))
                .min();
            if open.is_some() {
                return open;
            }
            from = to;
        }
        None
    }
}

/// What drives a sweep's fire times.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Schedule {
    /// A cron expression in a time zone.
    Cron(CronSchedule),
    /// Every period, anchored to the plan (not to the run's start), so runs do
    /// not drift; fire times missed during a long run or downtime are skipped.
    /// Build it with [`Schedule::fixed_rate`]; periods under 1 ms count as 1 ms.
    FixedRate(Duration),
    /// The period after the end of the previous run. Build it with
    /// [`Schedule::fixed_delay`]; periods under 1 ms count as 1 ms.
    FixedDelay(Duration),
}

impl Schedule {
    /// A cron schedule: see [`CronSchedule::parse`].
    pub fn cron(expression: &str, tz: Tz) -> Result<Self, ScheduleError> {
        CronSchedule::parse(expression, tz).map(Self::Cron)
    }

    /// A fixed rate; zero is rejected.
    pub fn fixed_rate(period: Duration) -> Result<Self, ScheduleError> {
        check_period(period).map(|()| Self::FixedRate(period))
    }

    /// A fixed delay after the end of each run; zero is rejected.
    pub fn fixed_delay(period: Duration) -> Result<Self, ScheduleError> {
        check_period(period).map(|()| Self::FixedDelay(period))
    }
}

fn check_period(period: Duration) -> Result<(), ScheduleError> {
    if period.is_zero() {
        return Err(ScheduleError::ZeroPeriod);
    }
    TimeDelta::from_std(period).map_err(|_| ScheduleError::DurationTooLong(period))?;
    Ok(())
}

/// A period as a [`TimeDelta`], at least [`MIN_PERIOD`].
fn period(duration: Duration) -> TimeDelta {
    TimeDelta::from_std(duration)
        .unwrap_or(TimeDelta::MAX)
        .max(MIN_PERIOD)
}

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
fn grid_after(
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;
    use chrono_tz::Australia::Melbourne;
    use chrono_tz::Europe::Berlin;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn fields_glue_lists_ranges_and_steps() {
        assert_eq!(
            fields("0  */5 22-23, 0-5 * * *"),
            ["0", "*/5", "22-23,0-5", "*", "*", "*"]
        );
        assert_eq!(fields("0 1 - 3 2 * * *").len(), 6);
    }

    #[test]
    fn wildcard_classification() {
        let wild = |e: &str| CronSchedule::parse(e, Berlin).unwrap().is_wildcard();
        assert!(wild("0 */5 22-23,0-5 * * *"));
        assert!(wild("0 0 * * * *"));
        assert!(wild("0 0-59/10 2 * * *"));
        assert!(wild("@hourly"));
        assert!(!wild("0 30 2 * * *"));
        assert!(!wild("*/10 30 2 * * *"));
        assert!(!wild("0 0,30 1-3 * * MON"));
        assert!(!wild("@daily"));
    }

    #[test]
    fn transitions_are_found_to_the_second() {
        let found = transitions(
            Berlin,
            utc("2026-03-28T00:00:00Z"),
            utc("2026-03-30T00:00:00Z"),
        );
        assert_eq!(found, [utc("2026-03-29T01:00:00Z")]);
        let none = transitions(
            Berlin,
            utc("2026-05-01T00:00:00Z"),
            utc("2026-05-03T00:00:00Z"),
        );
        assert!(none.is_empty());
    }

    #[test]
    fn next_after_inside_a_fold_sees_the_repeat() {
        // Berlin, 2026-10-25: 03:00 CEST -> 02:00 CET. 02:55 CEST is 00:55Z.
        let cron = CronSchedule::parse("0 */5 * * * *", Berlin).unwrap();
        assert_eq!(
            cron.next_after(utc("2026-10-25T00:55:00Z")),
            Some(utc("2026-10-25T01:00:00Z"))
        );
        // Between two marks inside the first pass of the fold.
        assert_eq!(
            cron.next_after(utc("2026-10-25T00:12:30Z")),
            Some(utc("2026-10-25T00:15:00Z"))
        );
        // Hourly at minute 30, at 02:40 CEST: the next is 02:30 CET.
        let cron = CronSchedule::parse("0 30 * * * *", Berlin).unwrap();
        assert_eq!(
            cron.next_after(utc("2026-10-25T00:40:00Z")),
            Some(utc("2026-10-25T01:30:00Z"))
        );
        // Fixed-time: 02:30 fires once, at CEST.
        let cron = CronSchedule::parse("0 30 2 * * *", Berlin).unwrap();
        assert_eq!(
            cron.next_after(utc("2026-10-24T12:00:00Z")),
            Some(utc("2026-10-25T00:30:00Z"))
        );
        assert_eq!(
            cron.next_after(utc("2026-10-25T00:30:00Z")),
            Some(utc("2026-10-26T01:30:00Z"))
        );
    }

    #[test]
    fn fixed_time_in_a_gap_fires_at_the_gap_end_once() {
        // Berlin, 2026-03-29: 02:00 CET -> 03:00 CEST (01:00Z).
        let cron = CronSchedule::parse("0 0,30 2,3 * * *", Berlin).unwrap();
        let fires: Vec<_> = cron.upcoming(utc("2026-03-28T23:00:00Z")).take(3).collect();
        assert_eq!(
            fires,
            [
                utc("2026-03-29T01:00:00Z"),
                utc("2026-03-29T01:30:00Z"),
                utc("2026-03-30T00:00:00Z")
            ]
        );
    }

    #[test]
    fn window_next_open_handles_gaps_and_folds() {
        let at = |h, m| NaiveTime::from_hms_opt(h, m, 0).unwrap();
        // Opening time inside the spring-forward gap: opens at 03:00 CEST.
        let window = Window::new(at(2, 30), at(5, 0), Berlin).unwrap();
        assert_eq!(
            window.next_open(utc("2026-03-28T12:00:00Z")),
            Some(utc("2026-03-29T01:00:00Z"))
        );
        // A window that closes inside the repeated hour reopens when the clock goes back.
        let window = Window::new(at(22, 0), at(2, 30), Berlin).unwrap();
        let closed = utc("2026-10-25T00:45:00Z"); // 02:45 CEST
        assert!(!window.contains(closed));
        assert_eq!(window.next_open(closed), Some(utc("2026-10-25T01:00:00Z")));
        assert!(Window::new(at(1, 0), at(1, 0), Berlin).is_err());
        let date = NaiveDate::from_ymd_opt(2026, 7, 1).unwrap();
        let noon = Melbourne
            .from_local_datetime(&date.and_time(at(12, 0)))
            .unwrap();
        let window = Window::new(at(22, 0), at(6, 0), Melbourne).unwrap();
        assert_eq!(
            window.next_open(noon.with_timezone(&Utc)),
            Some(utc("2026-07-01T22:00:00+10:00"))
        );
    }

    #[test]
    fn grid_skips_forward_without_drift() {
        let anchor = utc("2026-01-01T00:00:00Z");
        let rate = TimeDelta::minutes(10);
        assert_eq!(
            grid_after(anchor, rate, anchor),
            Some(utc("2026-01-01T00:10:00Z"))
        );
        assert_eq!(
            grid_after(anchor, rate, utc("2026-01-01T03:00:00Z")),
            Some(utc("2026-01-01T03:10:00Z"))
        );
        assert_eq!(
            grid_after(anchor, rate, utc("2026-01-01T03:04:59.5Z")),
            Some(utc("2026-01-01T03:10:00Z"))
        );
    }
}
