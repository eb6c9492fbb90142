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

mod apply;
mod outcome;
mod sql;
#[cfg(test)]
mod tests;

pub use outcome::{Claim, StateError, Transition};
use sql::{checked_type, quote_ident, quote_table};

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
}

impl StateMachine {
    pub(super) fn check_transition(&self, from: &str, to: &str) -> Result<(), StateError> {
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

    pub(super) fn lease_of(&self, state: &str) -> Result<Duration, StateError> {
        self.lease(state)
            .ok_or_else(|| StateError::NotIntermediate {
                state: state.to_owned(),
            })
    }

    pub(super) fn has_claims(&self) -> bool {
        !self.intermediate.is_empty()
    }

    pub(super) fn is_known(&self, state: &str) -> bool {
        self.intermediate.contains_key(state)
            || self
                .transitions
                .iter()
                .any(|(from, targets)| from == state || targets.contains(state))
    }
}
