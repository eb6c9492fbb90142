//! `identity-sync next-runs` and the command line's errors.

use std::process::{Command, Output};

fn identity_sync(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_identity-sync"))
        .args(args)
        .output()
        .expect("run identity-sync")
}

fn stdout_lines(output: &Output) -> Vec<String> {
    assert!(
        output.status.success(),
        "exit {:?}, stderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone())
        .expect("utf-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn next_runs_end_of_night_and_start_of_next() {
    let out = identity_sync(&[
        "next-runs",
        "--count",
        "3",
        "--from",
        "2026-11-23T05:50:00+11:00",
    ]);
    assert_eq!(
        stdout_lines(&out),
        [
            "2026-11-23T05:55:00+11:00 2026-11-22T18:55:00Z",
            "2026-11-23T22:00:00+11:00 2026-11-23T11:00:00Z",
            "2026-11-23T22:05:00+11:00 2026-11-23T11:05:00Z",
        ]
    );
}

#[test]
fn next_runs_across_dst_start_skip_the_missing_hour() {
    // Sunday 4 October 2026: clocks go from 02:00 AEST to 03:00 AEDT.
    let out = identity_sync(&[
        "next-runs",
        "--count",
        "3",
        "--from",
        "2026-10-04T01:50:00+10:00",
    ]);
    assert_eq!(
        stdout_lines(&out),
        [
            "2026-10-04T01:55:00+10:00 2026-10-03T15:55:00Z",
            "2026-10-04T03:00:00+11:00 2026-10-03T16:00:00Z",
            "2026-10-04T03:05:00+11:00 2026-10-03T16:05:00Z",
        ]
    );
}

#[test]
fn next_runs_across_dst_end_run_the_repeated_hour_twice() {
    // Sunday 5 April 2026: clocks go from 03:00 AEDT back to 02:00 AEST.
    let out = identity_sync(&[
        "next-runs",
        "--count",
        "3",
        "--from",
        "2026-04-05T02:50:00+11:00",
    ]);
    assert_eq!(
        stdout_lines(&out),
        [
            "2026-04-05T02:55:00+11:00 2026-04-04T15:55:00Z",
            "2026-04-05T02:00:00+10:00 2026-04-04T16:00:00Z",
            "2026-04-05T02:05:00+10:00 2026-04-04T16:05:00Z",
        ]
    );
}

#[test]
fn next_runs_defaults_to_now() {
    let out = identity_sync(&["next-runs", "--count", "2"]);
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 2);
    let first = lines[0].split(' ').nth(1).expect("a UTC column");
    let first = chrono::DateTime::parse_from_rfc3339(first).expect("RFC 3339");
    assert!(first > chrono::Utc::now());
}

#[test]
fn next_runs_rejects_a_bad_instant() {
    let out = identity_sync(&["next-runs", "--count", "3", "--from", "yesterday"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--from"), "{stderr}");
    assert!(stderr.contains("RFC 3339"), "{stderr}");
}

#[test]
fn unreachable_database_names_what_to_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_identity-sync"))
        .args(["demo", "--users", "1"])
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/postgres")
        .output()
        .expect("run identity-sync");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot connect to PostgreSQL at 127.0.0.1:1/postgres"),
        "{stderr}"
    );
    assert!(stderr.contains("start PostgreSQL"), "{stderr}");
}
