//! An explicit state machine for aggregates that move through intermediate
//! states, e.g. `SHIPPED → INVOICING → INVOICED`.
//!
//! The application owns the table; [`StateMachine`] only knows its name, its
//! columns, the declared transitions and which states are intermediate
//! (claimed, with a lease). Every transition is a compare-and-set in SQL, in
//! the caller's transaction; every time is taken from the database clock.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use sqlx::{PgConnection, PgExecutor, Row};

use crate::error::ReconcileError;

/// The longest identifier PostgreSQL keeps without truncating it (NAMEDATALEN - 1).
const MAX_IDENTIFIER_BYTES: usize = 63;

/// A state machine over an application's table: declared transitions, applied
/// as compare-and-set `UPDATE`s in the caller's transaction.
///
/// * A **transition** `from → to` must be declared with
///   [`transition`](Self::transition); any other is rejected with
///   [`StateError::InvalidTransition`] before any SQL runs.
/// * An **intermediate** state (declared with
///   [`intermediate`](Self::intermediate)) is *claimed*: entering it records
///   who claimed it (`claimed_by`) and when (`claimed_at`: the database's
///   `statement_timestamp()`, not the transaction's start `now()`, so a claim
///   made late in a long transaction is not born old).
///   Leaving it requires holding the claim, so a worker whose claim was taken
///   over cannot write its stale result. A claim older than the state's lease
///   belongs to a step that died half-way: [`expired_claims`](Self::expired_claims)
///   finds it and [`claim`](Self::claim) takes it over.
/// * Entering a state that is not intermediate clears `claimed_by` and
///   `claimed_at`.
///
/// The table needs a key column, a state column and — when the machine has
/// intermediate states — a `text` claimant column and a `timestamptz` claim
/// time column, e.g.
/// `orders(id bigint primary key, state text not null, claimed_by text, claimed_at timestamptz)`.
/// The sweeps read by `(state, key)`: an index on `(state, id)` keeps them cheap.
///
/// Identifiers are given unquoted, exactly as stored (`orders`, not
/// `"orders"`; `Orders` is another table than `orders`); the table may be
/// schema-qualified (`app.orders`). They are quoted as SQL identifiers. Keys
/// and states are passed as text and cast in SQL to the key type and the state
/// type (both `text` by default).
///
/// ```no_run
/// use std::time::Duration;
/// use converge_handlers::{Claim, StateMachine, Transition};
///
/// # async fn run(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let orders = StateMachine::new("app.orders", "id", "state")
///     .key_type("bigint")
///     .transition("SHIPPED", "INVOICING")
///     .transition("INVOICING", "INVOICED")
///     .intermediate("INVOICING", Duration::from_secs(60));
///
/// // Claim the step: from SHIPPED, or take over a claim older than 60 s.
/// let mut tx = pool.begin().await?;
/// match orders.claim(&mut tx, "42", "SHIPPED", "INVOICING", "worker-1").await? {
///     Claim::Claimed | Claim::Resumed { .. } => tx.commit().await?,
///     Claim::NotClaimable { .. } => return Ok(()), // someone else is on it, or it is done
/// }
///
/// // ... create the invoice (idempotently: the step may run again) ...
///
/// let mut tx = pool.begin().await?;
/// match orders.transition_to(&mut tx, "42", "INVOICING", "INVOICED", "worker-1").await? {
///     Transition::Applied => tx.commit().await?,
///     Transition::Conflict { .. } => tx.rollback().await?, // our claim was taken over
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct StateMachine {
    /// The table as given, for messages.
    table_name: String,
    table: String,
    key: String,
    state: String,
    claimed_by: String,
    claimed_at: String,
    key_type: String,
    state_type: String,
    transitions: BTreeMap<String, BTreeSet<String>>,
    intermediate: BTreeMap<String, Duration>,
}

/// The outcome of [`StateMachine::transition_to`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The row was in `from` (and, from an intermediate state, claimed by the
    /// caller's claimant): it is now in `to`.
    Applied,
    /// Nothing was written: the row is not in `from` (someone else moved it),
    /// the caller does not hold the intermediate state's claim, or the key does
    /// not exist (`current` is `None`). Not an error: re-read and decide.
    Conflict {
        /// The row's state now, `None` if the key does not exist.
        current: Option<String>,
        /// Who holds the row's claim now, if anyone.
        claimed_by: Option<String>,
    },
}

/// The outcome of [`StateMachine::claim`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The row moved from `from` into the intermediate state, claimed by the caller.
    Claimed,
    /// The row was already in the intermediate state with a claim older than the
    /// lease: the caller took it over and must resume the step.
    Resumed {
        /// The claimant whose claim expired.
        previous: Option<String>,
    },
    /// Nothing was written: the row is neither in `from` nor in an expired claim
    /// of the intermediate state, or the key does not exist (`current` is `None`).
    NotClaimable {
        /// The row's state now, `None` if the key does not exist.
        current: Option<String>,
        /// Who holds the row's claim now, if anyone.
        claimed_by: Option<String>,
    },
}

/// Why a state machine operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The transition was not declared; nothing was written.
    #[error(
        "invalid state transition {from} -> {to}: {}",
        allowed_targets(from, allowed)
    )]
    InvalidTransition {
        /// The state the caller moves from.
        from: String,
        /// The state the caller moves to.
        to: String,
        /// The states declared as reachable from `from`, sorted.
        allowed: Vec<String>,
    },
    /// The operation needs an intermediate (claimed) state and this one is not declared as such.
    #[error(
        "state {state} is not an intermediate state: declare it with StateMachine::intermediate \
         to claim it or to look for expired claims"
    )]
    NotIntermediate {
        /// The state.
        state: String,
    },
    /// The state appears in no declared transition.
    #[error("unknown state {state}: it appears in no declared transition")]
    UnknownState {
        /// The state.
        state: String,
    },
    /// The database failed; with [`is_retryable`](Self::is_retryable), roll
    /// back and retry the transaction.
    #[error("state machine database error: {0}")]
    Database(#[from] sqlx::Error),
}

fn allowed_targets(from: &str, allowed: &[String]) -> String {
    if allowed.is_empty() {
        format!("no transition is declared from {from}")
    } else {
        format!("allowed from {from}: {}", allowed.join(", "))
    }
}

impl StateError {
    /// Whether retrying the transaction can succeed (a serialization failure,
    /// a deadlock, a lost connection, an exhausted pool).
    pub fn is_retryable(&self) -> bool {
        match self {
            StateError::Database(e) => converge_outbox::is_retryable_sqlx(e),
            _ => false,
        }
    }
}

impl From<StateError> for ReconcileError {
    fn from(error: StateError) -> Self {
        if error.is_retryable() {
            ReconcileError::retryable(error)
        } else {
            ReconcileError::permanent(error)
        }
    }
}

impl StateMachine {
    /// A state machine over `table` (optionally schema-qualified: `app.orders`),
    /// keyed by `key_column`, with its state in `state_column`. The claim columns
    /// default to `claimed_by` and `claimed_at`, the key type to `text`.
    ///
    /// # Panics
    ///
    /// If a name is empty, longer than 63 bytes, contains a NUL character, or the
    /// table has more than two dot-separated parts: identifiers come from code,
    /// so a bad one is a bug to fix, not a runtime condition.
    pub fn new(table: &str, key_column: &str, state_column: &str) -> Self {
        StateMachine {
            table_name: table.to_owned(),
            table: quote_table(table),
            key: quote_ident(key_column, "key column"),
            state: quote_ident(state_column, "state column"),
            claimed_by: quote_ident("claimed_by", "claimed_by column"),
            claimed_at: quote_ident("claimed_at", "claimed_at column"),
            key_type: "text".to_owned(),
            state_type: "text".to_owned(),
            transitions: BTreeMap::new(),
            intermediate: BTreeMap::new(),
        }
    }

    /// The SQL type of the key column (default `text`), e.g. `bigint` or `uuid`:
    /// keys are passed as text and cast to it. The keys returned by the sweeps
    /// are ordered in this type.
    ///
    /// # Panics
    ///
    /// If the type is not a plain type name: ASCII letters, digits, `_`, spaces
    /// and `.` (`bigint`, `uuid`, `character varying`, `app.order_id`).
    pub fn key_type(mut self, sql_type: &str) -> Self {
        self.key_type = checked_type(sql_type, "key type");
        self
    }

    /// The SQL type of the state column (default `text`; `varchar` works as
    /// `text`), e.g. the name of an enum type: states are passed as text and
    /// cast to it.
    ///
    /// # Panics
    ///
    /// Like [`key_type`](Self::key_type).
    pub fn state_type(mut self, sql_type: &str) -> Self {
        self.state_type = checked_type(sql_type, "state type");
        self
    }

    /// The columns holding the claimant (`text`) and the claim time
    /// (`timestamptz`) of an intermediate state; default `claimed_by`, `claimed_at`.
    ///
    /// # Panics
    ///
    /// Like [`new`](Self::new).
    pub fn claim_columns(mut self, claimed_by: &str, claimed_at: &str) -> Self {
        self.claimed_by = quote_ident(claimed_by, "claimed_by column");
        self.claimed_at = quote_ident(claimed_at, "claimed_at column");
        self
    }

    /// Declares the transition `from → to`.
    ///
    /// # Panics
    ///
    /// If a state is empty or `from` equals `to`.
    pub fn transition(mut self, from: &str, to: &str) -> Self {
        assert!(
            !from.is_empty() && !to.is_empty(),
            "state machine on {}: a state name must not be empty",
            self.table_name
        );
        assert!(
            from != to,
            "state machine on {}: {from} -> {from} is not a transition \
             (an expired claim is taken over with StateMachine::claim)",
            self.table_name
        );
        self.transitions
            .entry(from.to_owned())
            .or_default()
            .insert(to.to_owned());
        self
    }

    /// Declares `state` an intermediate (claimed) state: entering it records the
    /// claimant and the time, and a claim older than `lease` may be taken over
    /// with [`claim`](Self::claim). Choose a lease longer than the step can take.
    ///
    /// # Panics
    ///
    /// If `state` is empty or `lease` is zero.
    pub fn intermediate(mut self, state: &str, lease: Duration) -> Self {
        assert!(
            !state.is_empty(),
            "state machine on {}: a state name must not be empty",
            self.table_name
        );
        assert!(
            !lease.is_zero(),
            "state machine on {}: the lease of {state} must be longer than zero",
            self.table_name
        );
        self.intermediate.insert(state.to_owned(), lease);
        self
    }

    /// The states declared as reachable from `from`, sorted.
    pub fn allowed_from(&self, from: &str) -> Vec<&str> {
        self.transitions
            .get(from)
            .map(|targets| targets.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// The lease of an intermediate state, `None` if `state` is not intermediate.
    pub fn lease(&self, state: &str) -> Option<Duration> {
        self.intermediate.get(state).copied()
    }

    /// The intermediate states and their leases, sorted by state.
    pub fn intermediate_states(&self) -> impl Iterator<Item = (&str, Duration)> + '_ {
        self.intermediate.iter().map(|(s, l)| (s.as_str(), *l))
    }

    /// Moves `key` from `from` to `to` if, and only if, it is in `from` now: a
    /// compare-and-set `UPDATE` on `conn` (pass `&mut tx` to run it in the
    /// caller's transaction, which keeps the row locked until it ends).
    ///
    /// * When `from` is intermediate, the caller must hold its claim
    ///   (`claimed_by = claimant`); otherwise the claimant is not checked.
    /// * When `to` is intermediate, the claim is set to `claimant` at the
    ///   database's current time; otherwise the claim columns are cleared.
    ///
    /// Concurrent callers cannot both apply it: the second waits for the first
    /// transaction's row lock and then finds the row moved ([`Transition::Conflict`]
    /// under `READ COMMITTED`, a retryable serialization failure under
    /// `REPEATABLE READ` / `SERIALIZABLE`). An undeclared transition is
    /// rejected before any SQL runs.
    pub async fn transition_to(
        &self,
        conn: &mut PgConnection,
        key: &str,
        from: &str,
        to: &str,
        claimant: &str,
    ) -> Result<Transition, StateError> {
        self.check_transition(from, to)?;
        let fenced = self.intermediate.contains_key(from);
        let claims_to = self.intermediate.contains_key(to);
        let mut sql = format!(
            "UPDATE {t} SET {state} = CAST($3 AS {st})",
            t = self.table,
            state = self.state,
            st = self.state_type,
        );
        if claims_to {
            let _ = write!(
                sql,
                ", {by} = $4, {at} = statement_timestamp()",
                by = self.claimed_by,
                at = self.claimed_at
            );
        } else if self.has_claims() {
            let _ = write!(
                sql,
                ", {by} = NULL, {at} = NULL",
                by = self.claimed_by,
                at = self.claimed_at
            );
        }
        let _ = write!(
            sql,
            " WHERE {key} = CAST($1 AS {kt}) AND {state} = CAST($2 AS {st})",
            key = self.key,
            kt = self.key_type,
            state = self.state,
            st = self.state_type,
        );
        if fenced {
            let _ = write!(sql, " AND {by} = $4", by = self.claimed_by);
        }
        let mut query = sqlx::query(&sql).bind(key).bind(from).bind(to);
        if claims_to || fenced {
            query = query.bind(claimant);
        }
        let done = query.execute(&mut *conn).await?;
        if done.rows_affected() > 0 {
            return Ok(Transition::Applied);
        }
        let (current, claimed_by) = self.read(conn, key).await?;
        Ok(Transition::Conflict {
            current,
            claimed_by,
        })
    }

    /// Claims the intermediate state `to` for `claimant`: moves `key` from `from`
    /// into `to` ([`Claim::Claimed`]), or, when `key` is already in `to` with a
    /// claim older than `to`'s lease (or none), takes the claim over
    /// ([`Claim::Resumed`]: the step died half-way, resume it). Otherwise nothing
    /// is written ([`Claim::NotClaimable`]). The lease is measured on the
    /// database clock. When `from` is itself intermediate, the caller must hold
    /// its claim.
    ///
    /// Runs on `conn` (pass `&mut tx` for the caller's transaction); concurrent
    /// claims of one key cannot both succeed, as with
    /// [`transition_to`](Self::transition_to).
    pub async fn claim(
        &self,
        conn: &mut PgConnection,
        key: &str,
        from: &str,
        to: &str,
        claimant: &str,
    ) -> Result<Claim, StateError> {
        let lease = self.lease_of(to)?;
        self.check_transition(from, to)?;
        let fence = if self.intermediate.contains_key(from) {
            format!(" AND {by} = $4", by = self.claimed_by)
        } else {
            String::new()
        };
        // The sub-select locks the row only when it is claimable (re-checked on
        // the newest row version after waiting for a concurrent writer) and
        // hands the previous claimant to RETURNING.
        let sql = format!(
            "UPDATE {t} AS cur \
             SET {state} = CAST($3 AS {st}), {by} = $4, {at} = statement_timestamp() \
             FROM (SELECT {key} AS k, {state}::text AS s, {by}::text AS b FROM {t} \
                   WHERE {key} = CAST($1 AS {kt}) \
                     AND (({state} = CAST($2 AS {st}){fence}) \
                          OR ({state} = CAST($3 AS {st}) \
                              AND ({at} IS NULL \
                                   OR {at} < statement_timestamp() - make_interval(secs => $5)))) \
                   FOR UPDATE) AS prev \
             WHERE cur.{key} = prev.k \
             RETURNING prev.s, prev.b",
            t = self.table,
            key = self.key,
            kt = self.key_type,
            state = self.state,
            st = self.state_type,
            by = self.claimed_by,
            at = self.claimed_at,
        );
        let row = sqlx::query(&sql)
            .bind(key)
            .bind(from)
            .bind(to)
            .bind(claimant)
            .bind(lease.as_secs_f64())
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(row) = row {
            let previous_state: Option<String> = row.try_get(0)?;
            return Ok(if previous_state.as_deref() == Some(to) {
                Claim::Resumed {
                    previous: row.try_get(1)?,
                }
            } else {
                Claim::Claimed
            });
        }
        let (current, claimed_by) = self.read(conn, key).await?;
        Ok(Claim::NotClaimable {
            current,
            claimed_by,
        })
    }

    /// The state of `key`, `None` if the key does not exist.
    pub async fn current<'e>(
        &self,
        executor: impl PgExecutor<'e>,
        key: &str,
    ) -> Result<Option<String>, StateError> {
        let sql = format!(
            "SELECT {state}::text FROM {t} WHERE {key} = CAST($1 AS {kt})",
            t = self.table,
            key = self.key,
            kt = self.key_type,
            state = self.state,
        );
        let state = sqlx::query_scalar::<_, Option<String>>(&sql)
            .bind(key)
            .fetch_optional(executor)
            .await?;
        Ok(state.flatten())
    }

    /// Keys in the intermediate `state` whose claim is older than its lease (or
    /// missing): steps that died half-way, to resume with [`claim`](Self::claim).
    ///
    /// Keyset-paginated: the keys after `after` (`None` for the first page), in
    /// key order (of the key type), at most `limit`; pass the last key of a page
    /// as `after` for the next one. Keys are returned as text.
    pub async fn expired_claims<'e>(
        &self,
        executor: impl PgExecutor<'e>,
        state: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<String>, StateError> {
        let lease = self.lease_of(state)?;
        self.page(executor, state, Some(lease), after, limit).await
    }

    /// Keys in `state` (typically a state that is not intermediate, e.g. the
    /// `SHIPPED` orders still to invoice), keyset-paginated like
    /// [`expired_claims`](Self::expired_claims).
    pub async fn keys_in<'e>(
        &self,
        executor: impl PgExecutor<'e>,
        state: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<String>, StateError> {
        if !self.is_known(state) {
            return Err(StateError::UnknownState {
                state: state.to_owned(),
            });
        }
        self.page(executor, state, None, after, limit).await
    }

    async fn page<'e>(
        &self,
        executor: impl PgExecutor<'e>,
        state: &str,
        expired_after: Option<Duration>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<String>, StateError> {
        let mut sql = format!(
            "SELECT r.{key}::text FROM {t} AS r WHERE r.{state} = CAST($1 AS {st})",
            t = self.table,
            key = self.key,
            state = self.state,
            st = self.state_type,
        );
        let mut next = 2;
        if expired_after.is_some() {
            let _ = write!(
                sql,
                " AND (r.{at} IS NULL OR r.{at} < statement_timestamp() - make_interval(secs => $2))",
                at = self.claimed_at
            );
            next += 1;
        }
        if after.is_some() {
            let _ = write!(
                sql,
                " AND r.{key} > CAST(${next} AS {kt})",
                key = self.key,
                kt = self.key_type
            );
            next += 1;
        }
        // Qualified: a bare name would sort by the text output column of that name.
        let _ = write!(sql, " ORDER BY r.{key} LIMIT ${next}", key = self.key);
        let mut query = sqlx::query_scalar::<_, String>(&sql).bind(state);
        if let Some(lease) = expired_after {
            query = query.bind(lease.as_secs_f64());
        }
        if let Some(after) = after {
            query = query.bind(after);
        }
        Ok(query.bind(limit.max(0)).fetch_all(executor).await?)
    }

    /// The row's state and claimant, `(None, None)` if the key does not exist.
    async fn read(
        &self,
        conn: &mut PgConnection,
        key: &str,
    ) -> Result<(Option<String>, Option<String>), StateError> {
        let claimed_by = if self.has_claims() {
            format!("{}::text", self.claimed_by)
        } else {
            "NULL::text".to_owned()
        };
        let sql = format!(
            "SELECT {state}::text, {claimed_by} FROM {t} WHERE {key} = CAST($1 AS {kt})",
            t = self.table,
            key = self.key,
            kt = self.key_type,
            state = self.state,
        );
        let row = sqlx::query(&sql).bind(key).fetch_optional(conn).await?;
        match row {
            Some(row) => Ok((row.try_get(0)?, row.try_get(1)?)),
            None => Ok((None, None)),
        }
    }

    fn check_transition(&self, from: &str, to: &str) -> Result<(), StateError> {
        if self
            .transitions
            .get(from)
            .is_some_and(|targets| targets.contains(to))
        {
            Ok(())
        } else {
            Err(StateError::InvalidTransition {
                from: from.to_owned(),
                to: to.to_owned(),
                allowed: self
                    .allowed_from(from)
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
            })
        }
    }

    fn lease_of(&self, state: &str) -> Result<Duration, StateError> {
        self.lease(state)
            .ok_or_else(|| StateError::NotIntermediate {
                state: state.to_owned(),
            })
    }

    fn has_claims(&self) -> bool {
        !self.intermediate.is_empty()
    }

    fn is_known(&self, state: &str) -> bool {
        self.intermediate.contains_key(state)
            || self
                .transitions
                .iter()
                .any(|(from, targets)| from == state || targets.contains(state))
    }
}

/// Quotes one SQL identifier: double quotes around it, embedded quotes doubled.
fn quote_ident(name: &str, what: &str) -> String {
    assert!(!name.is_empty(), "state machine: the {what} name is empty");
    assert!(
        name.len() <= MAX_IDENTIFIER_BYTES,
        "state machine: the {what} name {name:?} is longer than {MAX_IDENTIFIER_BYTES} bytes \
         (PostgreSQL would truncate it)"
    );
    assert!(
        !name.contains('\0'),
        "state machine: the {what} name {name:?} contains a NUL character"
    );
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a table name, `table` or `schema.table`.
fn quote_table(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    assert!(
        parts.len() <= 2,
        "state machine: the table {name:?} has more than two dot-separated parts \
         (expected `table` or `schema.table`)"
    );
    parts
        .iter()
        .map(|part| quote_ident(part, "table"))
        .collect::<Vec<_>>()
        .join(".")
}

/// A type name safe to splice into `CAST($n AS <type>)`.
fn checked_type(sql_type: &str, what: &str) -> String {
    let ok = sql_type.len() <= 2 * MAX_IDENTIFIER_BYTES + 1
        && sql_type
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && !sql_type.ends_with(' ')
        && sql_type
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ' ' | '.'));
    assert!(
        ok,
        "state machine: the {what} {sql_type:?} is not a plain SQL type name \
         (ASCII letters, digits, `_`, spaces and `.`, e.g. `bigint`, `uuid`)"
    );
    sql_type.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orders() -> StateMachine {
        StateMachine::new("app.orders", "id", "state")
            .key_type("bigint")
            .transition("SHIPPED", "INVOICING")
            .transition("SHIPPED", "CANCELLED")
            .transition("INVOICING", "INVOICED")
            .intermediate("INVOICING", Duration::from_secs(30))
    }

    #[test]
    fn identifiers_are_quoted() {
        let m = StateMachine::new("app.orders", "id", "we\"ird").claim_columns("by", "at");
        assert_eq!(m.table, "\"app\".\"orders\"");
        assert_eq!(m.key, "\"id\"");
        assert_eq!(m.state, "\"we\"\"ird\"");
        assert_eq!(m.claimed_by, "\"by\"");
        assert_eq!(m.claimed_at, "\"at\"");
    }

    #[test]
    fn invalid_transition_names_allowed_targets() {
        let m = orders();
        let e = m.check_transition("SHIPPED", "INVOICED").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid state transition SHIPPED -> INVOICED: allowed from SHIPPED: CANCELLED, INVOICING"
        );
        assert!(!e.is_retryable());
        let e = m.check_transition("INVOICED", "SHIPPED").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid state transition INVOICED -> SHIPPED: no transition is declared from INVOICED"
        );
        assert!(m.check_transition("SHIPPED", "INVOICING").is_ok());
        assert_eq!(m.allowed_from("SHIPPED"), ["CANCELLED", "INVOICING"]);
        assert_eq!(m.lease("INVOICING"), Some(Duration::from_secs(30)));
        assert_eq!(m.lease("SHIPPED"), None);
        assert!(m.is_known("INVOICED") && !m.is_known("PAID"));
        let e: ReconcileError = StateError::NotIntermediate {
            state: "SHIPPED".into(),
        }
        .into();
        assert!(!e.is_retryable());
        let e: ReconcileError = StateError::Database(sqlx::Error::PoolTimedOut).into();
        assert!(e.is_retryable());
    }

    #[test]
    fn type_names_are_checked() {
        assert_eq!(checked_type("bigint", "t"), "bigint");
        assert_eq!(checked_type("character varying", "t"), "character varying");
        assert_eq!(checked_type("app.order_id", "t"), "app.order_id");
        for bad in [
            "",
            " bigint",
            "bigint ",
            "int)",
            "text; drop",
            "int'",
            "int--",
            "1int",
        ] {
            let result = std::panic::catch_unwind(|| checked_type(bad, "t"));
            assert!(result.is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    #[should_panic(expected = "more than two dot-separated parts")]
    fn three_part_table_is_rejected() {
        let _ = StateMachine::new("db.app.orders", "id", "state");
    }

    #[test]
    #[should_panic(expected = "is not a transition")]
    fn self_transition_is_rejected() {
        let _ = orders().transition("SHIPPED", "SHIPPED");
    }

    #[test]
    #[should_panic(expected = "longer than zero")]
    fn zero_lease_is_rejected() {
        let _ = orders().intermediate("INVOICING", Duration::ZERO);
    }
}
