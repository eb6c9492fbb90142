//! Output: aligned tables for people, JSON for machines, and the small
//! formatting helpers (times, ages, partition ranges).

use std::fmt::Display;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::{CliError, CliResult};

/// A table printed with aligned columns.
pub(crate) struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub(crate) fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (one cell per header).
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    /// Whether it has no rows.
    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, each line indented by `indent` spaces.
    pub(crate) fn render(&self, indent: usize) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut text = " ".repeat(indent);
            for (i, (cell, w)) in cells.zip(&widths).enumerate() {
                if i > 0 {
                    text.push_str("  ");
                }
                text.push_str(cell);
                text.push_str(&" ".repeat(w - cell.chars().count()));
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&mut self.headers.iter().copied());
        for row in &self.rows {
            line(&mut row.iter().map(String::as_str));
        }
        out
    }

    /// Prints the table, or `empty` when it has no rows.
    pub(crate) fn print_or(&self, empty: &str) {
        if self.is_empty() {
            emit(&format!("{empty}\n"));
        } else {
            emit(&self.render(0));
        }
    }
}

/// Prints `value` as pretty JSON on stdout.
pub(crate) fn print_json<T: Serialize + ?Sized>(value: &T) -> CliResult<()> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::Failed(format!("cannot write JSON: {e}")))?;
    text.push('\n');
    emit(&text);
    Ok(())
}

/// Prints `value` as one line of JSON on stdout.
pub(crate) fn print_json_line<T: Serialize + ?Sized>(value: &T) -> CliResult<()> {
    let mut text = serde_json::to_string(value)
        .map_err(|e| CliError::Failed(format!("cannot write JSON: {e}")))?;
    text.push('\n');
    emit(&text);
    Ok(())
}

/// Asks `question` on the terminal (`[y/N]`). Without a terminal on stdin
/// and stderr, refuses with `refusal` (exit 2); any answer but yes is
/// `not_confirmed` (exit 1).
pub(crate) fn confirm(question: &str, refusal: String, not_confirmed: &str) -> CliResult<()> {
    use std::io::{IsTerminal, Write};
    if !(std::io::stdin().is_terminal() && std::io::stderr().is_terminal()) {
        return Err(CliError::BadInput(refusal));
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .map_err(|e| CliError::Failed(format!("cannot read the answer: {e}")))?;
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(CliError::Failed(not_confirmed.into()))
    }
}

/// Writes `text` to stdout. A closed pipe (`| head`) or a full disk drops the
/// output quietly: the work goes on, its audit outcome is still recorded and
/// the exit code still says how it went (`println!` would panic instead).
pub(crate) fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// `println!` through [`emit`]: never panics on a closed stdout.
macro_rules! outln {
    () => {
        $crate::output::emit("\n")
    };
    ($($arg:tt)*) => {
        $crate::output::emit(&format!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use outln;

/// A time as `2026-11-23 10:00:00Z`.
pub(crate) fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%SZ").to_string()
}

/// An optional time, `-` when absent.
pub(crate) fn opt_time(t: Option<DateTime<Utc>>) -> String {
    t.map(time).unwrap_or_else(|| "-".into())
}

/// An optional value, `-` when absent.
pub(crate) fn opt<T: Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// A length of time, concise: `850ms`, `42s`, `3m05s`, `2h10m`, `3d04h`.
pub(crate) fn span(d: chrono::TimeDelta) -> String {
    let ms = d.num_milliseconds();
    if ms < 0 {
        return format!("-{}", span(-d));
    }
    let s = ms / 1000;
    match s {
        _ if ms < 1000 => format!("{ms}ms"),
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// How long before `now` `t` was: `3m05s ago`, or `in 42s` for a future time.
pub(crate) fn relative(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let d = now - t;
    if d < chrono::TimeDelta::zero() {
        format!("in {}", span(-d))
    } else {
        format!("{} ago", span(d))
    }
}

/// An optional time relative to `now`, `-` when absent.
pub(crate) fn opt_relative(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    t.map(|t| relative(t, now)).unwrap_or_else(|| "-".into())
}

/// Sorted partition numbers as ranges: `0-7,9,12-15`.
pub(crate) fn ranges(numbers: &[i32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < numbers.len() {
        let start = numbers[i];
        let mut end = start;
        while i + 1 < numbers.len() && numbers[i + 1] == end + 1 {
            i += 1;
            end = numbers[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

/// `text` cut to `max` characters, with `…` when cut; newlines become spaces.
pub(crate) fn cut(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        flat
    } else {
        let mut s: String = flat.chars().take(max.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let mut t = Table::new(&["NAME", "N"]);
        t.row(vec!["a".into(), "1000".into()]);
        t.row(vec!["longer".into(), "2".into()]);
        assert_eq!(t.render(0), "NAME    N\na       1000\nlonger  2\n");
    }

    #[test]
    fn spans_and_ranges_are_concise() {
        assert_eq!(span(chrono::TimeDelta::milliseconds(850)), "850ms");
        assert_eq!(span(chrono::TimeDelta::seconds(185)), "3m05s");
        assert_eq!(span(chrono::TimeDelta::seconds(7800)), "2h10m");
        assert_eq!(
            span(chrono::TimeDelta::seconds(3 * 86_400 + 4 * 3600)),
            "3d04h"
        );
        assert_eq!(ranges(&[0, 1, 2, 3, 5, 7, 8]), "0-3,5,7-8");
        assert_eq!(ranges(&[]), "-");
        assert_eq!(cut("SELECT\n 1234567", 8), "SELECT …");
    }
}
