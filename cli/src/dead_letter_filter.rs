//! Which open dead letters a bulk action takes: the filter (`--reconciler`,
//! `--since`, `--older-than`, `--error-like`) shared by the CLI and the
//! dashboard, and the CLI's count-and-confirm step before acting.

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;

use crate::args::BulkArgs;
use crate::error::{bad_input, CliResult};
use crate::output::outln;

/// Open dead letters matching every condition that is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DeadLetterFilter {
    /// Of this reconciler.
    pub(crate) reconciler: Option<String>,
    /// Failed within this long.
    pub(crate) since: Option<Duration>,
    /// Failed longer ago than this.
    pub(crate) older_than: Option<Duration>,
    /// Whose error contains this text (case-insensitive, no wildcards).
    pub(crate) error_like: Option<String>,
    /// Only the letter with this id (the dashboard's action on one letter).
    pub(crate) id: Option<i64>,
}

/// The open letters a filter matched: at most the limit's ids, oldest
/// first, and how many match in all.
#[derive(Debug, Clone, Default)]
pub(crate) struct Matches {
    /// The ids acted on, in id order.
    pub(crate) ids: Vec<i64>,
    /// How many open letters match in all (more than `ids` at the limit).
    pub(crate) total: i64,
}

/// The conditions, in SQL: `$1` reconciler, `$2` since (seconds), `$3` older
/// than (seconds), `$4` error text, `$5` id. `strpos` on lowered text: the operator's
/// `%` and `_` are plain characters, not LIKE wildcards.
pub(crate) const FILTER_SQL: &str = "resolved_at IS NULL \
    AND ($1::text IS NULL OR reconciler = $1) \
    AND ($2::float8 IS NULL OR failed_at >= now() - make_interval(secs => $2)) \
    AND ($3::float8 IS NULL OR failed_at < now() - make_interval(secs => $3)) \
    AND ($4::text IS NULL OR strpos(lower(error), lower($4)) > 0) \
    AND ($5::bigint IS NULL OR id = $5)";

impl DeadLetterFilter {
    /// The filter of the command line's options (empty strings unset).
    pub(crate) fn from_args(args: &BulkArgs) -> DeadLetterFilter {
        let text = |s: &Option<String>| s.clone().filter(|s| !s.trim().is_empty());
        DeadLetterFilter {
            reconciler: text(&args.reconciler),
            since: args.since,
            older_than: args.older_than,
            error_like: text(&args.error_like),
            id: None,
        }
    }

    /// No condition set: it would match every open letter.
    pub(crate) fn is_empty(&self) -> bool {
        *self == DeadLetterFilter::default()
    }

    /// Binds the five parameters of [`FILTER_SQL`] to `query`.
    pub(crate) fn bind<'q, O>(
        &'q self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        query
            .bind(self.reconciler.as_deref())
            .bind(self.since.map(|d| d.as_secs_f64()))
            .bind(self.older_than.map(|d| d.as_secs_f64()))
            .bind(self.error_like.as_deref())
            .bind(self.id)
    }

    /// The matching open letters, oldest first, at most `limit`.
    pub(crate) async fn matching(&self, pool: &PgPool, limit: i64) -> CliResult<Matches> {
        let rows: Vec<(i64, i64)> = self
            .bind(sqlx::query_as(&format!(
                "SELECT id, count(*) OVER () FROM converge.dead_letters WHERE {FILTER_SQL} \
                 ORDER BY id LIMIT $6"
            )))
            .bind(limit)
            .fetch_all(pool)
            .await?;
        Ok(Matches {
            total: rows.first().map_or(0, |r| r.1),
            ids: rows.into_iter().map(|r| r.0).collect(),
        })
    }

    /// In words, for messages and confirmations.
    pub(crate) fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(id) = self.id {
            parts.push(format!("with id {id}"));
        }
        if let Some(r) = &self.reconciler {
            parts.push(format!("of reconciler {r}"));
        }
        if let Some(d) = self.since {
            parts.push(format!("failed in the last {}", age(d)));
        }
        if let Some(d) = self.older_than {
            parts.push(format!("failed more than {} ago", age(d)));
        }
        if let Some(e) = &self.error_like {
            parts.push(format!("with an error containing {e:?}"));
        }
        if parts.is_empty() {
            "(no filter)".into()
        } else {
            parts.join(", ")
        }
    }

    /// For the audit row's details.
    pub(crate) fn details(&self) -> Value {
        json!({
            "reconciler": self.reconciler,
            "since_secs": self.since.map(|d| d.as_secs()),
            "older_than_secs": self.older_than.map(|d| d.as_secs()),
            "error_like": self.error_like,
            "id": self.id,
        })
    }

    /// A reconciler named by the filter that no dead letter and no worker
    /// knows is a typo: exit 2 naming the known ones.
    pub(crate) async fn check_reconciler(&self, pool: &PgPool) -> CliResult<()> {
        let Some(wanted) = &self.reconciler else {
            return Ok(());
        };
        let known: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT reconciler FROM converge.dead_letters \
             UNION SELECT DISTINCT unnest(reconcilers) FROM converge.workers ORDER BY 1",
        )
        .fetch_all(pool)
        .await?;
        if known.is_empty() || known.contains(wanted) {
            return Ok(());
        }
        Err(bad_input(format!(
            "--reconciler {wanted:?}: no dead letter and no registered worker has this \
             reconciler; known: {}",
            known.join(", ")
        )))
    }
}

/// `2h`, `30m`, `90s`, `7d`: the largest unit that divides the age.
pub(crate) fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

impl BulkArgs {
    /// Ids were named: the filter and its confirmation options make no
    /// sense with them (exit 2 rather than guess which was meant).
    pub(crate) fn refuse_with_ids(&self) -> CliResult<()> {
        let set =
            !DeadLetterFilter::from_args(self).is_empty() || self.dry_run || self.yes || self.all;
        if set {
            return Err(bad_input(
                "name dead letter ids or a filter (--reconciler, --since, --older-than, \
                 --error-like, with --dry-run / --yes / --all), not both",
            ));
        }
        Ok(())
    }
}

/// What a bulk command acts on, once counted and confirmed.
#[derive(Debug)]
pub(crate) struct Selection {
    /// The filter.
    pub(crate) filter: DeadLetterFilter,
    /// What it matched.
    pub(crate) matches: Matches,
}

impl Selection {
    /// The audit row's details: the filter, the count and the ids.
    pub(crate) fn details(&self) -> Value {
        json!({
            "filter": self.filter.details(),
            "count": self.matches.ids.len(),
            "matched": self.matches.total,
            "ids": self.matches.ids,
        })
    }

    /// The audit row's target.
    pub(crate) fn target(&self) -> String {
        format!(
            "{} dead letters {}",
            self.matches.ids.len(),
            self.filter.describe()
        )
    }

    /// A line saying how many more match than were taken, if any.
    pub(crate) fn more_note(&self) -> Option<String> {
        let more = self.matches.total - self.matches.ids.len() as i64;
        (more > 0).then(|| {
            format!(
                "{more} more dead letters match beyond --limit {}; run the command again for them",
                self.matches.ids.len()
            )
        })
    }
}

/// The CLI's bulk step: checks the options, counts the matching letters,
/// shows them on `--dry-run` and asks for confirmation unless `--yes`.
/// `Ok(None)`: nothing to do (none match, a dry run); exit 0.
pub(crate) async fn select(
    pool: &PgPool,
    args: &BulkArgs,
    verb: &str,
    json: bool,
) -> CliResult<Option<Selection>> {
    let filter = DeadLetterFilter::from_args(args);
    if filter.is_empty() {
        return Err(bad_input(format!(
            "name dead letter ids, or select open ones with --reconciler, --since, --older-than \
             or --error-like (e.g. `converge dead-letters {verb} --reconciler invoicing --since 2h`)"
        )));
    }
    filter.check_reconciler(pool).await?;
    let matches = filter.matching(pool, args.limit).await?;
    if matches.total == 0 {
        if json {
            crate::output::print_json(&json!({ "matched": 0, "filter": filter.details() }))?;
        } else {
            outln!(
                "no open dead letters {}; nothing was done",
                filter.describe()
            );
        }
        return Ok(None);
    }
    let selection = Selection { filter, matches };
    if args.dry_run {
        crate::dead_letters::print_ids(pool, &selection.matches.ids, json).await?;
        if !json {
            outln!(
                "dry run: {} open dead letters {}; would {verb} {}; nothing was done",
                selection.matches.total,
                selection.filter.describe(),
                selection.matches.ids.len()
            );
        }
        return Ok(None);
    }
    if !(args.yes || args.all) {
        confirm(&selection, verb)?;
    }
    Ok(Some(selection))
}

fn confirm(selection: &Selection, verb: &str) -> CliResult<()> {
    let n = selection.matches.ids.len();
    let what = selection.filter.describe();
    crate::output::confirm(
        &format!("{verb} {n} open dead letters {what}?"),
        format!(
            "{n} open dead letters {what}: refusing to {verb} them without confirmation\n\
             hint: pass --yes, or --dry-run to list them"
        ),
        "not confirmed; nothing was done",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_written() {
        assert_eq!(age(Duration::from_secs(7200)), "2h");
        assert_eq!(age(Duration::from_secs(90)), "90s");
        assert_eq!(age(Duration::from_secs(1800)), "30m");
        assert_eq!(age(Duration::from_secs(7 * 86_400)), "7d");
    }

    #[test]
    fn the_filter_says_what_it_takes() {
        let f = DeadLetterFilter {
            reconciler: Some("invoicing".into()),
            since: Some(Duration::from_secs(7200)),
            older_than: None,
            error_like: Some("50%_off".into()),
            id: None,
        };
        assert_eq!(
            f.describe(),
            "of reconciler invoicing, failed in the last 2h, with an error containing \"50%_off\""
        );
        assert!(!f.is_empty());
        assert!(DeadLetterFilter::default().is_empty());
    }
}
