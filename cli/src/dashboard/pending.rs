//! Confirmations waiting for their click: the exact letters a confirmation
//! counted, kept here under a single-use nonce, so the action takes those
//! and no others (no letter that joined the filter since, none twice on a
//! double submit).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::dead_letter_filter::DeadLetterFilter;

/// How long a confirmation stays valid.
pub(crate) const VALID_FOR: Duration = Duration::from_secs(15 * 60);
/// Confirmations kept at most; the oldest goes first.
const KEPT: usize = 64;

/// What a confirmation counted.
#[derive(Debug, Clone)]
pub(crate) struct Confirmed {
    /// `retry` or `discard`.
    pub(crate) action: String,
    /// The filter it was counted by.
    pub(crate) filter: DeadLetterFilter,
    /// The letters counted, in id order.
    pub(crate) ids: Vec<i64>,
    /// How many matched in all (more than `ids` past the limit).
    pub(crate) total: i64,
}

/// The confirmations shown and not yet used.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    waiting: Mutex<VecDeque<(String, Instant, Confirmed)>>,
}

impl Pending {
    /// Keeps `confirmed`; the nonce its form carries.
    pub(crate) fn keep(&self, confirmed: Confirmed) -> String {
        let nonce = super::access::random_token();
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.retain(|(_, at, _)| at.elapsed() < VALID_FOR);
        while waiting.len() >= KEPT {
            waiting.pop_front();
        }
        waiting.push_back((nonce.clone(), Instant::now(), confirmed));
        nonce
    }

    /// Takes the confirmation of `nonce`, once: `None` when it was used,
    /// expired, or never given.
    pub(crate) fn take(&self, nonce: &str) -> Option<Confirmed> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let at = waiting.iter().position(|(n, _, _)| n == nonce)?;
        let (_, shown, confirmed) = waiting.remove(at)?;
        (shown.elapsed() < VALID_FOR).then_some(confirmed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confirmation_is_taken_once() {
        let pending = Pending::default();
        let nonce = pending.keep(Confirmed {
            action: "retry".into(),
            filter: DeadLetterFilter::default(),
            ids: vec![1, 2],
            total: 2,
        });
        assert_eq!(pending.take(&nonce).map(|c| c.ids), Some(vec![1, 2]));
        assert!(
            pending.take(&nonce).is_none(),
            "a second submit finds nothing"
        );
        assert!(pending.take("forged").is_none());
    }
}
