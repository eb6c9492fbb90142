//! Cron expressions in an IANA time zone, with Vixie cron's DST rules.

use super::*;

/// A cron expression evaluated on the wall clock of an IANA time zone, with the
/// DST rules described in the [module documentation](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronSchedule {
    /// Boxed: the parsed fields are large and [`Schedule`] holds one inline.
    cron: Box<::cron::Schedule>,
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
        let cron = ::cron::Schedule::from_str(trimmed).map_err(|error| {
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
pub(super) fn fields(expression: &str) -> Vec<String> {
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
pub(super) fn gap_end(tz: Tz, naive: NaiveDateTime) -> Option<DateTime<Utc>> {
    GapInfo::new(&naive, &tz)?
        .end
        .map(|end| end.with_timezone(&Utc))
}

/// The UTC offset of `tz` at an instant, in seconds.
pub(super) fn offset_seconds(tz: Tz, instant: DateTime<Utc>) -> i32 {
    tz.offset_from_utc_datetime(&instant.naive_utc())
        .fix()
        .local_minus_utc()
}

/// The instants in `(from, to]` at which the UTC offset of `tz` changes.
/// Probes hourly, so two changes within an hour of each other are missed (no
/// zone has them).
pub(super) fn transitions(tz: Tz, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
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
