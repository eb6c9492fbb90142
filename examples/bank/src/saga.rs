//! The transfer saga: one reconciler, keyed by transfer, that moves a
//! transfer one step at a time — each step one transaction over the two
//! aggregates it touches, both saved with the version they were loaded at.
//!
//! * `REQUESTED`: debit the source and mark the transfer `DEBITED` (or, when
//!   the debit is refused, `REJECTED`);
//! * `DEBITED`: credit the target and mark it `CREDITED` — or, when the
//!   credit is refused (a frozen account), refund the source and mark it
//!   `REFUNDED`.
//!
//! Between the two steps the money is in flight: the books balance as
//! `balances + in flight`. A crash between them leaves `DEBITED`, which the
//! next event or the sweep over the event log resumes.
//!
//! Each step is claimed on the transfer before any money moves: the
//! transfer's event is appended at the version the step's transaction read,
//! and the money moves only if that append decided an event. Of two runs
//! taking one step at once — the key lease rules that out, but a run outside
//! converge's (a `Context` built by hand) or a lost lease could not break it
//! — one waits on the transfer's head and fails with a version conflict,
//! retried: it then finds the step taken and moves nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use converge::eventsourcing::{Aggregate, CommandError, Repository};
use converge::handlers::{Context, Outcome, ReconcileError, Reconciler};
use converge::{transaction, CommitUnknown, Retryable, TransactionRetry};

use crate::domain::{
    Account, AccountCommand, AccountError, Transfer, TransferCommand, TransferError, TransferState,
};

/// The saga's two repositories, and how a step's transaction is retried.
#[derive(Debug, Clone)]
pub struct TransferSaga {
    accounts: Repository<Account>,
    transfers: Repository<Transfer>,
    retry: TransactionRetry,
    stats: Arc<SagaStats>,
}

/// What the saga did, for the demo's summary.
#[derive(Debug, Default)]
pub struct SagaStats {
    /// Steps taken on the event path.
    pub by_event: AtomicU64,
    /// Steps taken by a sweep.
    pub by_sweep: AtomicU64,
    /// Steps taken by an operator's run.
    pub by_hand: AtomicU64,
    /// Transfers refunded.
    pub refunded: AtomicU64,
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Account(#[from] CommandError<AccountError>),
    #[error(transparent)]
    Transfer(#[from] CommandError<TransferError>),
    #[error(transparent)]
    Load(#[from] converge::eventsourcing::RepositoryError),
    #[error(transparent)]
    Fence(ReconcileError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    CommitUnknown(#[from] CommitUnknown),
    #[error("an account changed while the step was taken; taking it again")]
    Raced,
}

impl Retryable for StepError {
    fn is_retryable(&self) -> bool {
        match self {
            StepError::Account(e) => e.is_retryable(),
            StepError::Transfer(e) => e.is_retryable(),
            StepError::Load(e) => e.is_retryable(),
            StepError::Fence(e) => e.is_retryable(),
            StepError::Database(e) => converge::is_retryable_sqlx(e),
            StepError::CommitUnknown(_) => false,
            StepError::Raced => true,
        }
    }
}

impl From<StepError> for ReconcileError {
    fn from(error: StepError) -> Self {
        match error {
            StepError::Fence(e) => e,
            other if other.is_retryable() => ReconcileError::retryable(other),
            other => ReconcileError::permanent(other),
        }
    }
}

impl TransferSaga {
    /// The saga over these repositories.
    pub fn new(
        accounts: Repository<Account>,
        transfers: Repository<Transfer>,
        stats: Arc<SagaStats>,
    ) -> Self {
        let mut retry = TransactionRetry::default();
        // Transfers share accounts: a step often finds one saved by another
        // transfer since it loaded it, and simply runs again.
        retry.max_attempts = 12;
        TransferSaga {
            accounts,
            transfers,
            retry,
            stats,
        }
    }

    /// Takes the next step of transfer `id`, in one transaction; the state it
    /// reached, or `None` when there was nothing to do.
    async fn step(&self, ctx: &Context, id: &str) -> Result<Option<TransferState>, StepError> {
        transaction(ctx.pool(), self.retry.clone(), |tx| {
            Box::pin(async move {
                // The run still holds the transfer's lease, and keeps it
                // until this transaction ends.
                ctx.check_fence(tx).await.map_err(StepError::Fence)?;
                let transfer = self.transfers.load_in(tx, id).await?.state;
                let t = &transfer;
                // The step is claimed on the transfer first: its event is
                // appended at the version this transaction read, so of two
                // runs taking the same step one waits on the transfer's head
                // and then fails (a version conflict, retried: it finds the
                // step done); a run that finds it done moves no money.
                let (claim, movement, reached) = match t.state {
                    TransferState::Requested => {
                        let debit = AccountCommand::Debit {
                            transfer: id.to_owned(),
                            amount: t.amount,
                        };
                        let source = self.accounts.load_in(tx, &t.from).await?.state;
                        match source.decide(&debit) {
                            Ok(_) => (
                                TransferCommand::MarkDebited,
                                Some((&t.from, debit)),
                                TransferState::Debited,
                            ),
                            Err(refusal) => {
                                let reason = refusal.to_string();
                                (
                                    TransferCommand::Reject { reason },
                                    None,
                                    TransferState::Rejected,
                                )
                            }
                        }
                    }
                    TransferState::Debited => {
                        let credit = AccountCommand::Credit {
                            transfer: id.to_owned(),
                            amount: t.amount,
                        };
                        let target = self.accounts.load_in(tx, &t.to).await?.state;
                        match target.decide(&credit) {
                            Ok(_) => (
                                TransferCommand::MarkCredited,
                                Some((&t.to, credit)),
                                TransferState::Credited,
                            ),
                            Err(refusal) => {
                                let refund = AccountCommand::Refund {
                                    transfer: id.to_owned(),
                                    amount: t.amount,
                                };
                                let reason = refusal.to_string();
                                (
                                    TransferCommand::MarkRefunded { reason },
                                    Some((&t.from, refund)),
                                    TransferState::Refunded,
                                )
                            }
                        }
                    }
                    _ => return Ok(None),
                };
                let claimed = match self.transfers.execute_in(tx, id, &claim).await {
                    Ok(claimed) => claimed,
                    // The claim reloads the transfer: a run that committed
                    // since this one read it (READ COMMITTED) may have moved
                    // it past this step. Taken again on fresh state, the
                    // step finds it done.
                    Err(CommandError::Rejected(TransferError::OutOfOrder { .. })) => {
                        return Err(StepError::Raced)
                    }
                    Err(e) => return Err(e.into()),
                };
                if claimed.events.is_empty() {
                    return Ok(None); // another run took this step
                }
                if let Some((account, command)) = movement {
                    match self.accounts.execute_in(tx, account, &command).await {
                        Ok(_) => {}
                        // The account changed since it was read (another
                        // transfer): the whole step again, on fresh state.
                        Err(CommandError::Rejected(_)) => return Err(StepError::Raced),
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(Some(reached))
            })
        })
        .await
    }
}

impl Reconciler for TransferSaga {
    async fn reconcile(&self, ctx: &Context, key: &str) -> Result<Outcome, ReconcileError> {
        let mut outcome = Outcome::Unchanged;
        while let Some(reached) = self.step(ctx, key).await? {
            outcome = Outcome::Changed;
            let counter = match ctx.trigger().path() {
                "event" => &self.stats.by_event,
                "sweep" => &self.stats.by_sweep,
                _ => &self.stats.by_hand,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if reached == TransferState::Refunded {
                self.stats.refunded.fetch_add(1, Ordering::Relaxed);
            }
            if reached.is_final() {
                break;
            }
            // Committed: debited, not yet credited. A crash here leaves the
            // transfer DEBITED for the next event or sweep.
            ctx.step("debited")?;
        }
        Ok(outcome)
    }
}
