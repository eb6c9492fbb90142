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

mod cron;
mod timing;
mod window;

pub use cron::CronSchedule;
use cron::{gap_end, transitions};
pub use timing::{Due, Misfire, Timing};
pub use window::Window;

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

/// A schedule as a sweep's workers record it in `converge.sweep_schedules`
/// (`schedule`, `cron`, `time_zone`), for the dashboard and `sweep list`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Declared {
    /// In words: "`0 0 2 * * *` in Europe/Berlin", "every 60 s (fixed rate)".
    pub description: String,
    /// The cron expression, for a cron schedule.
    pub cron: Option<String>,
    /// The IANA zone of the cron expression, else of the run window.
    pub time_zone: Option<String>,
}

impl Declared {
    /// What `timing` declares.
    pub fn of(timing: &Timing) -> Declared {
        let seconds = |d: &Duration| {
            let s = d.as_secs_f64();
            if s.fract() == 0.0 {
                format!("{s:.0} s")
            } else {
                format!("{s} s")
            }
        };
        let (mut description, cron, zone) = match &timing.schedule {
            Schedule::Cron(c) => (
                c.to_string(),
                Some(c.expression().to_owned()),
                Some(c.timezone()),
            ),
            Schedule::FixedRate(d) => (format!("every {} (fixed rate)", seconds(d)), None, None),
            Schedule::FixedDelay(d) => (
                format!("{} after each run (fixed delay)", seconds(d)),
                None,
                None,
            ),
        };
        if let Some(w) = &timing.window {
            description.push_str(&format!(", inside {w}"));
        }
        let zone = zone.or(timing.window.as_ref().map(Window::timezone));
        Declared {
            description,
            cron,
            time_zone: zone.map(|z| z.name().to_owned()),
        }
    }
}

/// The instants in `(from, to]` at which the UTC offset of `tz` changes
/// (daylight-saving changes, and changes of a zone's standard offset).
pub fn offset_changes(tz: Tz, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    transitions(tz, from, to)
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

#[cfg(test)]
mod tests;
