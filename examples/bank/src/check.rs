//! The bank's convergence check, from the event log (the truth): every
//! account and transfer folded from its events; the books balance (the money
//! the accounts were opened with is in the balances or in flight); every
//! transfer finished; each debit, credit and refund in the log exactly once
//! for the transfers that call for it, for the transfer's amount; the read
//! models equal the folds. All of it read in one snapshot of the database
//! (a REPEATABLE READ, read-only transaction), folded from the events alone
//! (snapshots are not read: a wrong snapshot would hide the history it
//! stands for).

use std::collections::BTreeMap;
use std::fmt;

use converge::eventsourcing::{Repository, RepositoryConfig};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::domain::{Account, Transfer, TransferState};
use crate::error::BankError;

/// What the check found.
#[derive(Debug, Default, Clone, Serialize)]
pub struct CheckReport {
    /// Accounts.
    pub accounts: usize,
    /// Frozen accounts.
    pub frozen: usize,
    /// Transfers.
    pub transfers: usize,
    /// Transfers per state.
    pub states: BTreeMap<&'static str, usize>,
    /// The money the accounts were opened with (cents).
    pub opened: i64,
    /// The sum of the balances folded from the accounts' events.
    pub balances: i64,
    /// The money of transfers debited and not yet credited or refunded.
    pub in_flight: i64,
    /// Whether `balances + in_flight == opened`.
    pub balanced: bool,
    /// Transfers not finished (at most 10 named).
    pub unfinished: Vec<String>,
    /// Movements in the log more than once for one transfer.
    pub duplicates: Vec<String>,
    /// Movements a transfer's state calls for that are not in the log (or
    /// are there without it, on the wrong account or for another amount).
    pub missing: Vec<String>,
    /// Read-model rows that differ from the folds (at most 10 named).
    pub projection_mismatches: Vec<String>,
    /// Whether everything holds.
    pub converged: bool,
}

impl CheckReport {
    /// The problems, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.balanced {
            out.push(format!(
                "books off by {}: opened {} != balances {} + in flight {}",
                self.opened - self.balances - self.in_flight,
                self.opened,
                self.balances,
                self.in_flight
            ));
        }
        if !self.unfinished.is_empty() {
            out.push(format!("unfinished: {}", self.unfinished.join(", ")));
        }
        for (what, list) in [
            ("applied twice", &self.duplicates),
            ("missing", &self.missing),
            ("read model differs", &self.projection_mismatches),
        ] {
            if !list.is_empty() {
                out.push(format!("{what}: {}", list.join(", ")));
            }
        }
        out
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let states: Vec<String> = self
            .states
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect();
        writeln!(
            f,
            "transfers: {} ({}); accounts: {} ({} frozen)",
            self.transfers,
            states.join(", "),
            self.accounts,
            self.frozen
        )?;
        writeln!(
            f,
            "books: opened {} = balances {} + in flight {}: {}",
            self.opened,
            self.balances,
            self.in_flight,
            if self.balanced {
                "balanced"
            } else {
                "NOT balanced"
            }
        )?;
        write!(
            f,
            "duplicates: {}, missing movements: {}, read models: {}",
            self.duplicates.len(),
            self.missing.len(),
            if self.projection_mismatches.is_empty() {
                "equal to the event log".to_owned()
            } else {
                format!("{} rows differ", self.projection_mismatches.len())
            }
        )?;
        for problem in self.problems() {
            write!(f, "\n  problem: {problem}")?;
        }
        Ok(())
    }
}

fn push_limited(list: &mut Vec<String>, item: String) {
    if list.len() < 10 {
        list.push(item);
    }
}

/// Ids of the aggregates of `aggregate_type`, in order.
async fn ids(conn: &mut PgConnection, aggregate_type: &str) -> Result<Vec<String>, BankError> {
    sqlx::query_scalar(
        "SELECT aggregate_id FROM converge.outbox_heads WHERE aggregate_type = $1 ORDER BY 1",
    )
    .bind(aggregate_type)
    .fetch_all(conn)
    .await
    .map_err(BankError::db("listing aggregates"))
}

/// Repositories that read events only: no snapshots, no inline projection.
async fn readers(pool: &PgPool) -> Result<(Repository<Account>, Repository<Transfer>), BankError> {
    let mut config = RepositoryConfig::default();
    config.snapshot_every = None;
    let accounts = Repository::<Account>::builder(pool.clone())
        .config(config.clone())
        .start()
        .await?;
    let transfers = Repository::<Transfer>::builder(pool.clone())
        .config(config)
        .start()
        .await?;
    Ok((accounts, transfers))
}

/// Which read models the check compares with the event log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadModels {
    /// Both: `bank.balances` (inline) and `bank.transfers` (asynchronous:
    /// only equal once a worker has caught up).
    All,
    /// `bank.balances` only: where no worker runs the asynchronous one.
    InlineOnly,
}

/// Runs the check, with every read model.
pub async fn check(pool: &PgPool) -> Result<CheckReport, BankError> {
    check_with(pool, ReadModels::All).await
}

/// Runs the check, comparing `read_models` with the event log.
pub async fn check_with(pool: &PgPool, read_models: ReadModels) -> Result<CheckReport, BankError> {
    let (accounts, transfers) = readers(pool).await?;
    let mut tx = pool
        .begin()
        .await
        .map_err(BankError::db("starting the check"))?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(BankError::db("starting the check"))?;
    let conn: &mut PgConnection = &mut tx;
    let mut report = CheckReport::default();

    // Accounts, folded.
    let mut folded_accounts = BTreeMap::new();
    for id in ids(&mut *conn, "account").await? {
        let a = accounts.load_in(&mut *conn, &id).await?.state;
        report.balances += a.balance;
        report.frozen += usize::from(a.frozen);
        folded_accounts.insert(id, a);
    }
    report.accounts = folded_accounts.len();
    report.opened = sqlx::query_scalar(
        "SELECT coalesce(sum((payload->>'initial')::bigint), 0)::bigint FROM converge.outbox \
         WHERE aggregate_type = 'account' AND event_type = 'Opened'",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(BankError::db("summing the opening balances"))?;

    // Transfers, folded.
    let mut folded_transfers = BTreeMap::new();
    for id in ids(&mut *conn, "transfer").await? {
        let t = transfers.load_in(&mut *conn, &id).await?.state;
        *report.states.entry(t.state.name()).or_default() += 1;
        if t.state == TransferState::Debited {
            report.in_flight += t.amount;
        }
        if !t.state.is_final() {
            push_limited(&mut report.unfinished, format!("{id} {}", t.state.name()));
        }
        folded_transfers.insert(id, t);
    }
    report.transfers = folded_transfers.len();
    report.balanced = report.balances + report.in_flight == report.opened;

    // Each movement in the log, counted per transfer, account and kind.
    let movements: Vec<(String, String, String, i64, Vec<i64>)> = sqlx::query_as(
        "SELECT payload->>'transfer', aggregate_id, event_type, count(*), \
                array_agg(DISTINCT (payload->>'amount')::bigint) FROM converge.outbox \
         WHERE aggregate_type = 'account' AND event_type IN ('Debited', 'Credited', 'Refunded') \
         GROUP BY 1, 2, 3",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(BankError::db("counting movements"))?;
    let mut seen: BTreeMap<(String, String, String), (i64, Vec<i64>)> = BTreeMap::new();
    for (transfer, account, kind, n, amounts) in movements {
        if n > 1 {
            push_limited(
                &mut report.duplicates,
                format!("{kind} of {transfer} on {account} ×{n}"),
            );
        }
        seen.insert((transfer, account, kind), (n, amounts));
    }
    for (id, t) in &folded_transfers {
        use TransferState as S;
        let expected = [
            (
                "Debited",
                &t.from,
                matches!(t.state, S::Debited | S::Credited | S::Refunded),
            ),
            ("Credited", &t.to, t.state == S::Credited),
            ("Refunded", &t.from, t.state == S::Refunded),
        ];
        for (kind, account, wanted) in expected {
            let key = (id.clone(), account.clone(), kind.to_owned());
            let (found, amounts) = seen.remove(&key).unwrap_or_default();
            if found > 0 && amounts != [t.amount] {
                push_limited(
                    &mut report.missing,
                    format!(
                        "{kind} of {id} on {account} for {amounts:?} cents, the transfer is for {}",
                        t.amount
                    ),
                );
            }
            if wanted && found == 0 {
                push_limited(&mut report.missing, format!("{kind} of {id} on {account}"));
            }
            if !wanted && found > 0 {
                push_limited(
                    &mut report.missing,
                    format!(
                        "{kind} of {id} on {account} without the transfer being {}",
                        t.state.name()
                    ),
                );
            }
        }
    }
    for (transfer, account, kind) in seen.keys() {
        push_limited(
            &mut report.missing,
            format!("{kind} of {transfer} on {account}: no such movement for that transfer"),
        );
    }

    // The read models.
    let balances: Vec<(String, i64, bool)> =
        sqlx::query_as("SELECT account, balance, frozen FROM bank.balances ORDER BY account")
            .fetch_all(&mut *conn)
            .await
            .map_err(BankError::db("reading bank.balances"))?;
    let projected: BTreeMap<String, (i64, bool)> =
        balances.into_iter().map(|(a, b, f)| (a, (b, f))).collect();
    for (id, a) in &folded_accounts {
        if projected.get(id) != Some(&(a.balance, a.frozen)) {
            push_limited(
                &mut report.projection_mismatches,
                format!(
                    "bank.balances {id}: {:?}, folded ({}, {})",
                    projected.get(id),
                    a.balance,
                    a.frozen
                ),
            );
        }
    }
    if projected.len() != folded_accounts.len() {
        push_limited(
            &mut report.projection_mismatches,
            format!(
                "bank.balances has {} accounts, the log {}",
                projected.len(),
                folded_accounts.len()
            ),
        );
    }
    if read_models == ReadModels::InlineOnly {
        report.converged = report.problems().is_empty();
        return Ok(report);
    }
    let states: Vec<(String, String)> =
        sqlx::query_as("SELECT id, state FROM bank.transfers ORDER BY id")
            .fetch_all(&mut *conn)
            .await
            .map_err(BankError::db("reading bank.transfers"))?;
    let projected: BTreeMap<String, String> = states.into_iter().collect();
    for (id, t) in &folded_transfers {
        if projected.get(id).map(String::as_str) != Some(t.state.name()) {
            push_limited(
                &mut report.projection_mismatches,
                format!(
                    "bank.transfers {id}: {:?}, folded {}",
                    projected.get(id),
                    t.state.name()
                ),
            );
        }
    }
    report.converged = report.problems().is_empty();
    tx.commit()
        .await
        .map_err(BankError::db("ending the check"))?;
    Ok(report)
}

/// The books at one instant, in one snapshot: the inline balances plus the
/// money in flight (debited, not credited or refunded, by the event log)
/// against the money opened. Every step commits its account events, the
/// balances and the transfer's event together, so this holds at every
/// instant, not only at the end. Returns `(opened, balances, in_flight)`.
pub async fn books(pool: &PgPool) -> Result<(i64, i64, i64), BankError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(BankError::db("reading the books"))?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(BankError::db("reading the books"))?;
    let row: (i64, i64, i64) = sqlx::query_as(
        "SELECT \
           (SELECT coalesce(sum((payload->>'initial')::bigint), 0)::bigint FROM converge.outbox \
            WHERE aggregate_type = 'account' AND event_type = 'Opened'), \
           (SELECT coalesce(sum(balance), 0)::bigint FROM bank.balances), \
           (SELECT coalesce(sum((r.payload->>'amount')::bigint), 0)::bigint \
            FROM converge.outbox r \
            WHERE r.aggregate_type = 'transfer' AND r.event_type = 'Requested' \
              AND EXISTS (SELECT 1 FROM converge.outbox d WHERE d.aggregate_type = 'transfer' \
                          AND d.aggregate_id = r.aggregate_id AND d.event_type = 'Debited') \
              AND NOT EXISTS (SELECT 1 FROM converge.outbox e WHERE e.aggregate_type = 'transfer' \
                              AND e.aggregate_id = r.aggregate_id \
                              AND e.event_type IN ('Credited', 'Refunded')))",
    )
    .fetch_one(&mut *tx)
    .await
    .map_err(BankError::db("reading the books"))?;
    tx.commit()
        .await
        .map_err(BankError::db("reading the books"))?;
    Ok(row)
}

/// Transfers requested and transfers finished, from the event log.
pub async fn progress(pool: &PgPool) -> Result<(i64, i64), BankError> {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE EXISTS ( \
             SELECT 1 FROM converge.outbox o WHERE o.aggregate_type = 'transfer' \
               AND o.aggregate_id = h.aggregate_id AND o.version = h.version \
               AND o.event_type IN ('Credited', 'Refunded', 'Rejected'))) \
         FROM converge.outbox_heads h WHERE h.aggregate_type = 'transfer'",
    )
    .fetch_one(pool)
    .await
    .map_err(BankError::db("reading progress"))
}
