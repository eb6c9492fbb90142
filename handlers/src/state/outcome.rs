//! What a transition or a claim found, and why one failed.

use super::*;

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
