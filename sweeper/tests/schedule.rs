//! The sweeper's schedule logic: cron across DST changes (checked against
//! Python's `zoneinfo`), fixed rate and delay, windows, misfires, start-up
//! runs and parse errors. Pure computation on an injected clock: nothing sleeps.

use std::process::Command;
use std::time::Duration;

use chrono::{DateTime, NaiveTime, TimeDelta, TimeZone, Timelike, Utc};
use chrono_tz::Australia::Melbourne;
use chrono_tz::Europe::Berlin;
use chrono_tz::Tz;
use converge_sweeper::schedule::{
    time_zone, CronSchedule, Due, Misfire, Schedule, ScheduleError, Timing, Window,
};

const WILDCARD: &str = "0 */5 22-23,0-5 * * *";
const FIXED: &str = "0 30 2 * * *";

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("bad instant {s}: {e}"))
        .with_timezone(&Utc)
}

fn hm(hour: u32, minute: u32) -> NaiveTime {
    NaiveTime::from_hms_opt(hour, minute, 0).unwrap()
}

fn local(tz: Tz, instant: DateTime<Utc>) -> String {
    instant
        .with_timezone(&tz)
        .format("%Y-%m-%d %H:%M:%S %Z")
        .to_string()
}

/// The fire instants in `(start, end]` according to `tests/dst_reference.py`.
fn python_reference(kind: &str, tz: &str, start: &str, end: &str) -> Vec<DateTime<Utc>> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dst_reference.py");
    let output = match Command::new("python3")
        .args([script, kind, tz, start, end])
        .output()
    {
        Ok(output) => output,
        Err(e) => panic!(
            "could not run `python3 {script}` ({e}): python3 (3.9+, with the standard \
             `zoneinfo` module) is needed as the independent DST reference"
        ),
    };
    assert!(
        output.status.success(),
        "python3 {script} {kind} {tz} {start} {end} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(utc)
        .collect()
}

fn rust_fires(expr: &str, tz: Tz, start: &str, end: &str) -> Vec<DateTime<Utc>> {
    let cron = CronSchedule::parse(expr, tz).unwrap();
    let end = utc(end);
    cron.upcoming(utc(start))
        .take_while(|t| *t <= end)
        .collect()
}

fn compare_with_reference(kind: &str, tz: Tz, start: &str, end: &str) -> Vec<DateTime<Utc>> {
    let expr = if kind == "wildcard" { WILDCARD } else { FIXED };
    let expected = python_reference(kind, tz.name(), start, end);
    let actual = rust_fires(expr, tz, start, end);
    let show = |v: &[DateTime<Utc>]| v.iter().map(|t| local(tz, *t)).collect::<Vec<_>>();
    assert!(!expected.is_empty(), "the reference found no fire times");
    assert_eq!(
        show(&actual),
        show(&expected),
        "`{expr}` in {tz} over ({start}, {end}] differs from Python zoneinfo"
    );
    actual
}

/// (zone, span start, span end, what changes)
const SPANS: [(Tz, &str, &str); 4] = [
    // First Sunday of April 2026 (5th): 03:00 AEDT -> 02:00 AEST.
    (Melbourne, "2026-04-02T12:00:00Z", "2026-04-06T12:00:00Z"),
    // First Sunday of October 2026 (4th): 02:00 AEST -> 03:00 AEDT.
    (Melbourne, "2026-10-01T12:00:00Z", "2026-10-05T12:00:00Z"),
    // Last Sunday of March 2026 (29th): 02:00 CET -> 03:00 CEST.
    (Berlin, "2026-03-27T00:00:00Z", "2026-03-31T00:00:00Z"),
    // Last Sunday of October 2026 (25th): 03:00 CEST -> 02:00 CET.
    (Berlin, "2026-10-23T00:00:00Z", "2026-10-27T00:00:00Z"),
];

#[test]
fn wildcard_fire_times_match_zoneinfo_across_dst_changes() {
    for (tz, start, end) in SPANS {
        compare_with_reference("wildcard", tz, start, end);
    }
}

#[test]
fn fixed_time_fire_times_match_zoneinfo_across_dst_changes() {
    for (tz, start, end) in SPANS {
        let fires = compare_with_reference("fixed", tz, start, end);
        assert_eq!(fires.len(), 4, "one fire per local date in {tz}: {fires:?}");
    }
    // The fire times on the change days, spelled out.
    let on = |tz: Tz, start: &str, end: &str| rust_fires(FIXED, tz, start, end);
    // Melbourne, 5 April: 02:30 happens twice; the first (AEDT) fires.
    assert_eq!(
        on(Melbourne, "2026-04-04T12:00:00Z", "2026-04-05T12:00:00Z"),
        [utc("2026-04-05T02:30:00+11:00")]
    );
    // Melbourne, 4 October: 02:30 does not exist; 03:00 AEDT fires.
    assert_eq!(
        on(Melbourne, "2026-10-03T12:00:00Z", "2026-10-04T12:00:00Z"),
        [utc("2026-10-04T03:00:00+11:00")]
    );
    // Berlin, 29 March: 02:30 does not exist; 03:00 CEST fires.
    assert_eq!(
        on(Berlin, "2026-03-28T12:00:00Z", "2026-03-29T12:00:00Z"),
        [utc("2026-03-29T03:00:00+02:00")]
    );
    // Berlin, 25 October: 02:30 happens twice; the first (CEST) fires.
    assert_eq!(
        on(Berlin, "2026-10-24T12:00:00Z", "2026-10-25T12:00:00Z"),
        [utc("2026-10-25T02:30:00+02:00")]
    );
}

/// The headline claim: on both Melbourne change nights,
/// `0 */5 22-23,0-5 * * *` fires every five (real) minutes from 22:00 to 05:55
/// local time, at every local 5-minute mark that exists, and nowhere else.
#[test]
fn melbourne_fires_every_five_minutes_all_night_on_both_change_nights() {
    // (noon before the night, noon after, repeated hour, skipped hour, fires)
    let nights = [
        (
            "2026-04-04T12:00:00+11:00",
            "2026-04-05T12:00:00+10:00",
            Some(2),
            None,
            108,
        ),
        (
            "2026-10-03T12:00:00+10:00",
            "2026-10-04T12:00:00+11:00",
            None,
            Some(2),
            84,
        ),
    ];
    for (from, to, repeated, skipped, count) in nights {
        let fires = rust_fires(WILDCARD, Melbourne, from, to);
        assert_eq!(fires.len(), count, "fires on the night after {from}");
        let first = fires[0].with_timezone(&Melbourne);
        let last = fires[fires.len() - 1].with_timezone(&Melbourne);
        assert_eq!((first.hour(), first.minute()), (22, 0));
        assert_eq!((last.hour(), last.minute()), (5, 55));
        for pair in fires.windows(2) {
            assert_eq!(
                pair[1] - pair[0],
                TimeDelta::minutes(5),
                "gap between {} and {}",
                local(Melbourne, pair[0]),
                local(Melbourne, pair[1])
            );
        }
        let marks: Vec<(u32, u32)> = [22, 23, 0, 1, 2, 3, 4, 5]
            .into_iter()
            .flat_map(|h| (0..60).step_by(5).map(move |m| (h, m)))
            .collect();
        for (h, m) in marks {
            let times = fires
                .iter()
                .map(|t| t.with_timezone(&Melbourne))
                .filter(|t| (t.hour(), t.minute(), t.second()) == (h, m, 0))
                .count();
            let expected = if Some(h) == repeated {
                2
            } else if Some(h) == skipped {
                0
            } else {
                1
            };
            assert_eq!(times, expected, "fires at local {h:02}:{m:02} after {from}");
        }
    }
}

#[test]
fn next_after_is_strict_and_upcoming_increases() {
    let cron = CronSchedule::parse(WILDCARD, Melbourne).unwrap();
    let fire = utc("2026-04-05T02:55:00+11:00");
    assert_eq!(cron.next_after(fire - TimeDelta::seconds(1)), Some(fire));
    assert_eq!(
        cron.next_after(fire),
        Some(utc("2026-04-05T02:00:00+10:00"))
    );
    let fires: Vec<_> = cron
        .upcoming(utc("2026-01-01T00:00:00Z"))
        .take(5_000)
        .collect();
    assert!(fires.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(cron.timezone(), Melbourne);
    assert!(cron.is_wildcard());
}

// ---------------------------------------------------------------- parsing

#[test]
fn five_field_expressions_are_rejected_with_a_hint() {
    let err = CronSchedule::parse("*/5 * * * *", Berlin).unwrap_err();
    assert!(matches!(err, ScheduleError::FiveFields { .. }), "{err:?}");
    let message = err.to_string();
    for part in [
        "`*/5 * * * *`",
        "5 fields",
        "6 fields",
        "7 (+ year)",
        "`0 */5 * * * *`",
    ] {
        assert!(message.contains(part), "{message:?} lacks {part:?}");
    }
}

#[test]
fn garbage_is_rejected_with_the_expression_and_the_expected_format() {
    for expr in ["every night", "0 61 * * * *", "0 0 0 * * * * *", ""] {
        let err = CronSchedule::parse(expr, Berlin).unwrap_err();
        assert!(
            matches!(err, ScheduleError::InvalidCron { .. }),
            "{expr}: {err:?}"
        );
        let message = err.to_string();
        assert!(message.contains(&format!("`{expr}`")), "{message}");
        assert!(message.contains("6 fields (sec min hour day-of-month month day-of-week)"));
        assert!(message.contains("7 (+ year)"), "{message}");
    }
    let err = CronSchedule::parse("0 0 0 * * * * *", Berlin).unwrap_err();
    assert!(err.to_string().contains("found 8 fields"), "{err}");
    let err = time_zone("Mars/Olympus_Mons").unwrap_err();
    assert!(err.to_string().contains("`Mars/Olympus_Mons`"), "{err}");
    assert_eq!(time_zone("Australia/Melbourne").unwrap(), Melbourne);
    assert_eq!(
        Schedule::fixed_rate(Duration::ZERO),
        Err(ScheduleError::ZeroPeriod)
    );
    assert_eq!(
        Schedule::fixed_delay(Duration::ZERO),
        Err(ScheduleError::ZeroPeriod)
    );
}

#[test]
fn seven_fields_with_a_year_work() {
    let cron = CronSchedule::parse("0 30 2 * * * 2027", Berlin).unwrap();
    assert_eq!(
        cron.next_after(utc("2026-06-01T00:00:00Z")),
        Some(utc("2027-01-01T02:30:00+01:00"))
    );
    let once = CronSchedule::parse("0 0 12 1 1 * 2026", Berlin).unwrap();
    assert_eq!(
        once.next_after(utc("2025-12-31T00:00:00Z")),
        Some(utc("2026-01-01T12:00:00+01:00"))
    );
    assert_eq!(once.next_after(utc("2026-01-01T11:00:00Z")), None);
    let timing = Timing::new(Schedule::Cron(once));
    let now = utc("2026-02-01T00:00:00Z");
    assert_eq!(timing.next_planned(None, now, now), None);
    assert_eq!(timing.first_planned(now), None);
}

// ---------------------------------------------------------------- planning

/// Drives a timing on a virtual clock from `start` to `end`, the way the
/// sweeper's loop does: ask `due`, store a new plan, "sleep" to it, run for
/// `run_for`, plan the next fire. The process is down during `outage`.
/// Returns the start instants of the runs.
fn simulate(
    timing: &Timing,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    run_for: TimeDelta,
    outage: Option<(DateTime<Utc>, DateTime<Utc>)>,
) -> Vec<DateTime<Utc>> {
    let mut now = start;
    let mut planned = timing.on_startup(None, now);
    let mut runs = Vec::new();
    while let Some(plan) = planned {
        if now > end {
            break;
        }
        if let Some((down, up)) = outage {
            if now >= down && now < up {
                now = up;
                continue;
            }
        }
        match timing.due(plan, now) {
            Due::At(at) => {
                planned = Some(at);
                now = match outage {
                    // Asleep when the process dies: it comes back at `up`.
                    Some((down, up)) if now < down && at >= down => up,
                    _ => at,
                };
            }
            Due::Now => {
                runs.push(now);
                now += run_for;
                planned = timing.next_planned(Some(plan), now, now);
            }
            _ => unreachable!(),
        }
    }
    runs
}

#[test]
fn fixed_rate_is_anchored_to_the_plan_without_drift() {
    let timing = Timing::new(Schedule::fixed_rate(Duration::from_secs(600)).unwrap());
    let planned = utc("2026-06-01T10:00:00Z");
    // A 7-second run does not push the next fire back.
    let finished = planned + TimeDelta::seconds(7);
    assert_eq!(
        timing.next_planned(Some(planned), finished, finished),
        Some(utc("2026-06-01T10:10:00Z"))
    );
    // A day of runs that start 0.5 to 3 s late and last 7 s: the plans stay on
    // the 10-minute grid (a timer restarted after each run would drift by
    // 7.5 to 10 s per run, 3 minutes over the day).
    let mut plan = planned;
    let mut plans = Vec::new();
    for i in 0..144 {
        let started = plan + TimeDelta::milliseconds(500 + (i % 6) * 500);
        assert_eq!(timing.due(plan, started), Due::Now);
        plans.push(plan);
        let finished = started + TimeDelta::seconds(7);
        plan = timing.next_planned(Some(plan), finished, finished).unwrap();
    }
    for (i, plan) in plans.iter().enumerate() {
        assert_eq!(*plan, planned + TimeDelta::minutes(10 * i as i64));
    }
    assert_eq!(plan, utc("2026-06-02T10:00:00Z"));
}

#[test]
fn fixed_rate_skips_missed_fires_after_a_long_run_or_outage() {
    let timing = Timing::new(Schedule::fixed_rate(Duration::from_secs(600)).unwrap());
    let planned = utc("2026-06-01T10:00:00Z");
    // A run that lasted 3 h 5 min: the next fire is the next grid point, once.
    let finished = utc("2026-06-01T13:05:00Z");
    assert_eq!(
        timing.next_planned(Some(planned), finished, finished),
        Some(utc("2026-06-01T13:10:00Z"))
    );
    // A 3-hour outage: one catch-up run, then the grid — never a burst.
    let runs = simulate(
        &timing,
        utc("2026-06-01T09:00:00Z"),
        utc("2026-06-01T14:00:00Z"),
        TimeDelta::seconds(30),
        Some((utc("2026-06-01T10:25:00Z"), utc("2026-06-01T13:25:00Z"))),
    );
    let expected: Vec<_> = [
        "09:10", "09:20", "09:30", "09:40", "09:50", "10:00", "10:10", "10:20",
        "13:25", // the one catch-up run
        "13:30", "13:40", "13:50", "14:00",
    ]
    .iter()
    .map(|hm| utc(&format!("2026-06-01T{hm}:00Z")))
    .collect();
    assert_eq!(runs, expected);
}

#[test]
fn fixed_delay_counts_from_the_end_of_the_run() {
    let timing = Timing::new(Schedule::fixed_delay(Duration::from_secs(300)).unwrap());
    let planned = utc("2026-06-01T10:00:00Z");
    let finished = utc("2026-06-01T10:00:42Z");
    assert_eq!(
        timing.next_planned(Some(planned), finished, finished),
        Some(utc("2026-06-01T10:05:42Z"))
    );
    assert_eq!(
        timing.next_planned(None, finished, finished),
        Some(utc("2026-06-01T10:05:42Z"))
    );
    let runs = simulate(
        &timing,
        utc("2026-06-01T10:00:00Z"),
        utc("2026-06-01T10:30:00Z"),
        TimeDelta::seconds(60),
        None,
    );
    // Every 5 min + 1 min of run.
    let expected: Vec<_> = (1..=5)
        .map(|i| utc("2026-06-01T10:00:00Z") + TimeDelta::minutes(6 * i - 1))
        .collect();
    assert_eq!(runs, expected);
}

#[test]
fn window_keeps_fire_times_between_22_and_06() {
    let window = Window::new(hm(22, 0), hm(6, 0), Berlin).unwrap();
    assert!(window.contains(utc("2026-06-01T22:00:00+02:00")));
    assert!(window.contains(utc("2026-06-02T05:59:59+02:00")));
    assert!(!window.contains(utc("2026-06-02T06:00:00+02:00")));
    assert!(!window.contains(utc("2026-06-01T21:59:59+02:00")));
    let noon = utc("2026-06-01T12:00:00+02:00");
    assert_eq!(
        window.next_open(noon),
        Some(utc("2026-06-01T22:00:00+02:00"))
    );
    let inside = utc("2026-06-02T01:00:00+02:00");
    assert_eq!(window.next_open(inside), Some(inside));

    // An hourly cron inside the window: the first fire time inside it.
    let hourly = Timing::new(Schedule::cron("0 0 * * * *", Berlin).unwrap()).with_window(window);
    assert_eq!(
        hourly.next_planned(None, noon, noon),
        Some(utc("2026-06-01T22:00:00+02:00"))
    );
    let five = utc("2026-06-02T05:00:00+02:00");
    assert_eq!(
        hourly.next_planned(Some(five), five, five),
        Some(utc("2026-06-02T22:00:00+02:00"))
    );
    // A fixed rate moves to the window's opening.
    let rate =
        Timing::new(Schedule::fixed_rate(Duration::from_secs(3600)).unwrap()).with_window(window);
    assert_eq!(
        rate.next_planned(Some(noon), noon, noon),
        Some(utc("2026-06-01T22:00:00+02:00"))
    );
    assert_eq!(
        rate.first_planned(noon),
        Some(utc("2026-06-01T22:00:00+02:00"))
    );
}

#[test]
fn window_holds_across_dst_nights() {
    let window = Window::new(hm(22, 0), hm(6, 0), Berlin).unwrap();
    let timing = Timing::new(Schedule::cron("0 0 * * * *", Berlin).unwrap()).with_window(window);
    let hours = |start: &str, end: &str| -> Vec<String> {
        simulate(&timing, utc(start), utc(end), TimeDelta::seconds(10), None)
            .into_iter()
            .map(|t| t.with_timezone(&Berlin).format("%H:%M %Z").to_string())
            .collect()
    };
    // Clocks go back at 03:00: 02:00 happens twice, the night has 9 hours.
    assert_eq!(
        hours("2026-10-24T12:00:00Z", "2026-10-25T12:00:00Z"),
        [
            "22:00 CEST",
            "23:00 CEST",
            "00:00 CEST",
            "01:00 CEST",
            "02:00 CEST",
            "02:00 CET",
            "03:00 CET",
            "04:00 CET",
            "05:00 CET"
        ]
    );
    // Clocks go forward at 02:00: no 02:00, the night has 7 hours.
    assert_eq!(
        hours("2026-03-28T12:00:00Z", "2026-03-29T12:00:00Z"),
        [
            "22:00 CET",
            "23:00 CET",
            "00:00 CET",
            "01:00 CET",
            "03:00 CEST",
            "04:00 CEST",
            "05:00 CEST"
        ]
    );
    // A fixed rate of 90 minutes anchored at the window's opening, on the
    // Melbourne spring-forward night: 22:00 AEST ... then outside until 22:00.
    let window = Window::new(hm(22, 0), hm(6, 0), Melbourne).unwrap();
    let timing = Timing::new(Schedule::fixed_rate(Duration::from_secs(90 * 60)).unwrap())
        .with_window(window);
    let runs: Vec<_> = simulate(
        &timing,
        utc("2026-10-03T12:00:00+10:00"),
        utc("2026-10-04T23:45:00+11:00"),
        TimeDelta::seconds(10),
        None,
    )
    .into_iter()
    .map(|t| local(Melbourne, t))
    .collect();
    assert_eq!(
        runs,
        [
            "2026-10-03 22:00:00 AEST",
            "2026-10-03 23:30:00 AEST",
            "2026-10-04 01:00:00 AEST",
            "2026-10-04 03:30:00 AEDT", // 01:00 AEST + 90 real minutes
            "2026-10-04 05:00:00 AEDT",
            "2026-10-04 22:00:00 AEDT", // 06:30 is outside: the next opening
            "2026-10-04 23:30:00 AEDT",
        ]
    );
}

#[test]
fn misfire_run_once_runs_once_then_plans_the_future() {
    let timing = Timing::new(Schedule::cron("0 */5 * * * *", Berlin).unwrap());
    assert_eq!(timing.misfire, Misfire::RunOnce);
    let now = utc("2026-06-01T13:02:10Z");
    let planned = now - TimeDelta::hours(3);
    assert!(timing.is_misfire(planned, now));
    assert_eq!(timing.due(planned, now), Due::Now);
    let finished = now + TimeDelta::seconds(20);
    let next = timing
        .next_planned(Some(planned), finished, finished)
        .unwrap();
    assert_eq!(next, utc("2026-06-01T13:05:00Z"));
    assert_eq!(timing.due(next, finished), Due::At(next));

    // Within the grace period it is simply on time.
    let late = utc("2026-06-01T13:00:30Z");
    assert!(!timing.is_misfire(utc("2026-06-01T13:00:00Z"), late));
    assert_eq!(timing.due(utc("2026-06-01T13:00:00Z"), late), Due::Now);
    // Not yet due.
    assert_eq!(
        timing.due(next, next - TimeDelta::seconds(1)),
        Due::At(next)
    );

    // Simulated 3-hour outage: one catch-up run at restart, then every 5 min.
    let runs = simulate(
        &timing,
        utc("2026-06-01T09:58:00Z"),
        utc("2026-06-01T13:20:00Z"),
        TimeDelta::seconds(5),
        Some((utc("2026-06-01T10:07:00Z"), utc("2026-06-01T13:07:00Z"))),
    );
    let expected: Vec<_> = ["10:00", "10:05", "13:07", "13:10", "13:15", "13:20"]
        .iter()
        .map(|hm| utc(&format!("2026-06-01T{hm}:00Z")))
        .collect();
    assert_eq!(runs, expected);
}

#[test]
fn misfire_skip_waits_for_the_next_fire_time() {
    let cron =
        Timing::new(Schedule::cron("0 */5 * * * *", Berlin).unwrap()).with_misfire(Misfire::Skip);
    let now = utc("2026-06-01T13:02:10Z");
    let planned = now - TimeDelta::hours(3);
    assert_eq!(cron.due(planned, now), Due::At(utc("2026-06-01T13:05:00Z")));
    // A fire time that is late by less than the grace period still runs.
    assert_eq!(cron.due(planned, utc("2026-06-01T13:05:30Z")), Due::Now);

    let rate = Timing::new(Schedule::fixed_rate(Duration::from_secs(600)).unwrap())
        .with_misfire(Misfire::Skip);
    let anchor = utc("2026-06-01T10:00:00Z");
    assert_eq!(rate.due(anchor, now), Due::At(utc("2026-06-01T13:10:00Z")));

    let delay = Timing::new(Schedule::fixed_delay(Duration::from_secs(600)).unwrap())
        .with_misfire(Misfire::Skip);
    assert_eq!(
        delay.due(anchor, now),
        Due::At(now + TimeDelta::minutes(10))
    );

    let runs = simulate(
        &cron,
        utc("2026-06-01T09:58:00Z"),
        utc("2026-06-01T13:20:00Z"),
        TimeDelta::seconds(5),
        Some((utc("2026-06-01T10:07:00Z"), utc("2026-06-01T13:07:00Z"))),
    );
    let expected: Vec<_> = ["10:00", "10:05", "13:10", "13:15", "13:20"]
        .iter()
        .map(|hm| utc(&format!("2026-06-01T{hm}:00Z")))
        .collect();
    assert_eq!(runs, expected);
}

#[test]
fn misfire_catch_up_waits_for_the_window() {
    let window = Window::new(hm(22, 0), hm(6, 0), Berlin).unwrap();
    let timing = Timing::new(Schedule::cron("0 */5 * * * *", Berlin).unwrap()).with_window(window);
    // Down from 05:00 to 09:00: the catch-up run waits for 22:00.
    let planned = utc("2026-06-02T05:00:00+02:00");
    let now = utc("2026-06-02T09:00:00+02:00");
    assert_eq!(
        timing.due(planned, now),
        Due::At(utc("2026-06-02T22:00:00+02:00"))
    );
    // Down from 01:00 to 03:00: catch up now.
    let planned = utc("2026-06-02T01:00:00+02:00");
    let now = utc("2026-06-02T03:00:00+02:00");
    assert_eq!(timing.due(planned, now), Due::Now);
}

#[test]
fn run_at_startup() {
    let now = utc("2026-06-01T12:34:56Z");
    let cron = Schedule::cron("0 0 3 * * *", Berlin).unwrap();
    let plain = Timing::new(cron.clone());
    assert_eq!(
        plain.first_planned(now),
        Some(utc("2026-06-02T03:00:00+02:00"))
    );
    let eager = Timing::new(cron).with_run_at_startup(true);
    assert_eq!(eager.first_planned(now), Some(now));
    assert_eq!(eager.due(now, now), Due::Now);

    // A persisted plan is kept unless the sweep runs at start-up.
    let persisted = Some(utc("2026-06-02T01:00:00Z"));
    assert_eq!(plain.on_startup(persisted, now), persisted);
    assert_eq!(plain.on_startup(None, now), plain.first_planned(now));
    assert_eq!(eager.on_startup(persisted, now), Some(now));

    // Fixed rate: the first run one period after start, or at once.
    let rate = Timing::new(Schedule::fixed_rate(Duration::from_secs(60)).unwrap());
    assert_eq!(rate.first_planned(now), Some(now + TimeDelta::seconds(60)));
    assert_eq!(rate.with_run_at_startup(true).first_planned(now), Some(now));

    // Inside a window only.
    let window = Window::new(hm(22, 0), hm(6, 0), Berlin).unwrap();
    let windowed = Timing::new(Schedule::fixed_delay(Duration::from_secs(60)).unwrap())
        .with_window(window)
        .with_run_at_startup(true);
    assert_eq!(
        windowed.first_planned(now),
        Some(utc("2026-06-01T22:00:00+02:00"))
    );
}

#[test]
fn timing_defaults() {
    let timing = Timing::new(Schedule::fixed_delay(Duration::from_secs(1)).unwrap());
    assert_eq!(timing.misfire, Misfire::RunOnce);
    assert!(!timing.run_at_startup);
    assert!(timing.window.is_none());
    assert_eq!(timing.misfire_grace, Duration::from_secs(60));
    let fast = timing.with_misfire_grace(Duration::from_secs(1));
    assert!(fast.is_misfire(utc("2026-06-01T00:00:00Z"), utc("2026-06-01T00:00:02Z")));
    assert!(Window::new(hm(1, 0), hm(1, 0), Berlin).is_err());
    let tz_name = Melbourne
        .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .unwrap()
        .timezone()
        .name();
    assert_eq!(tz_name, "Australia/Melbourne");
}
