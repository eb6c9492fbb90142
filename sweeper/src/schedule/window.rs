//! Time windows a sweep may run in.

use super::*;

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

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}–{} in {}",
            self.start.format("%H:%M"),
            self.end.format("%H:%M"),
            self.tz
        )
    }
}
