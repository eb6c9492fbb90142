//! Unit tests of the schedules: cron parsing, windows, planning.

use super::cron::fields;
use super::timing::grid_after;
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

#[test]
fn a_schedule_declares_itself_in_words_with_its_zone() {
    let cron = Timing::new(Schedule::cron("0 30 2 * * *", Berlin).unwrap());
    let d = Declared::of(&cron);
    assert_eq!(d.description, "`0 30 2 * * *` in Europe/Berlin");
    assert_eq!(d.cron.as_deref(), Some("0 30 2 * * *"));
    assert_eq!(d.time_zone.as_deref(), Some("Europe/Berlin"));
    let mut rate = Timing::new(Schedule::fixed_rate(Duration::from_secs(60)).unwrap());
    rate.window = Some(
        Window::new(
            NaiveTime::from_hms_opt(22, 0, 0).unwrap(),
            NaiveTime::from_hms_opt(6, 0, 0).unwrap(),
            Melbourne,
        )
        .unwrap(),
    );
    let d = Declared::of(&rate);
    assert_eq!(
        d.description,
        "every 60 s (fixed rate), inside 22:00–06:00 in Australia/Melbourne"
    );
    assert_eq!(d.cron, None);
    assert_eq!(d.time_zone.as_deref(), Some("Australia/Melbourne"));
    // Berlin's clocks go forward on the last Sunday of March.
    let changes = offset_changes(
        Berlin,
        utc("2027-03-01T00:00:00Z"),
        utc("2027-04-01T00:00:00Z"),
    );
    assert_eq!(changes, vec![utc("2027-03-28T01:00:00Z")]);
}
