//! The two event-sourced aggregates: accounts (money in, money out, frozen)
//! and transfers (the saga's state: `REQUESTED → DEBITED → CREDITED`, or
//! `REFUNDED` when the credit is refused, or `REJECTED` when the debit is).
//! Their state is the fold of their events; nothing else is stored.

use converge::eventsourcing::Aggregate;

/// An account's state.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Account {
    /// Opened.
    pub opened: bool,
    /// Its balance, in cents.
    pub balance: i64,
    /// A frozen account takes no credit (transfers to it are refunded).
    pub frozen: bool,
}

/// What happens to an account. Every movement names its transfer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AccountEvent {
    /// Opened with an initial balance (the money the books start with).
    Opened {
        /// Cents.
        initial: i64,
    },
    /// Money out, for a transfer.
    Debited {
        /// The transfer.
        transfer: String,
        /// Cents.
        amount: i64,
    },
    /// Money in, for a transfer.
    Credited {
        /// The transfer.
        transfer: String,
        /// Cents.
        amount: i64,
    },
    /// A debit given back, for a transfer whose credit was refused.
    Refunded {
        /// The transfer.
        transfer: String,
        /// Cents.
        amount: i64,
    },
    /// No more credits.
    Frozen,
}

/// What an account is asked.
#[derive(Debug, Clone)]
pub enum AccountCommand {
    /// Open it with `initial` cents (nothing if open).
    Open {
        /// Cents.
        initial: i64,
    },
    /// Take `amount` out for `transfer`.
    Debit {
        /// The transfer.
        transfer: String,
        /// Cents.
        amount: i64,
    },
    /// Put `amount` in for `transfer`.
    Credit {
        /// The transfer.
        transfer: String,
        /// Cents.
        amount: i64,
    },
    /// Give back `transfer`'s debit of `amount`.
    Refund {
        /// The transfer.
        transfer: String,
        /// Cents.
        amount: i64,
    },
    /// Refuse credits from now on.
    Freeze,
}

/// Why an account refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// It was never opened.
    #[error("the account is not open")]
    NotOpen,
    /// Not enough money.
    #[error("insufficient funds: {balance} cents, {asked} asked")]
    InsufficientFunds {
        /// The balance.
        balance: i64,
        /// The amount asked.
        asked: i64,
    },
    /// It is frozen and takes no credit.
    #[error("the account is frozen")]
    Frozen,
    /// Amounts are positive.
    #[error("{0} is not a positive amount")]
    BadAmount(i64),
}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Event = AccountEvent;
    type Command = AccountCommand;
    type Error = AccountError;

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { initial } => {
                self.opened = true;
                self.balance = *initial;
            }
            AccountEvent::Debited { amount, .. } => self.balance -= amount,
            AccountEvent::Credited { amount, .. } | AccountEvent::Refunded { amount, .. } => {
                self.balance += amount
            }
            AccountEvent::Frozen => self.frozen = true,
        }
    }

    fn decide(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        use AccountCommand as C;
        match command {
            C::Open { .. } if self.opened => Ok(vec![]),
            C::Open { initial } if *initial < 0 => Err(AccountError::BadAmount(*initial)),
            C::Open { initial } => Ok(vec![AccountEvent::Opened { initial: *initial }]),
            _ if !self.opened => Err(AccountError::NotOpen),
            C::Debit { amount, .. } | C::Credit { amount, .. } | C::Refund { amount, .. }
                if *amount <= 0 =>
            {
                Err(AccountError::BadAmount(*amount))
            }
            C::Debit { amount, .. } if *amount > self.balance => {
                Err(AccountError::InsufficientFunds {
                    balance: self.balance,
                    asked: *amount,
                })
            }
            C::Debit { transfer, amount } => Ok(vec![AccountEvent::Debited {
                transfer: transfer.clone(),
                amount: *amount,
            }]),
            C::Credit { .. } if self.frozen => Err(AccountError::Frozen),
            C::Credit { transfer, amount } => Ok(vec![AccountEvent::Credited {
                transfer: transfer.clone(),
                amount: *amount,
            }]),
            // A refund goes back even to a frozen account: it is its money.
            C::Refund { transfer, amount } => Ok(vec![AccountEvent::Refunded {
                transfer: transfer.clone(),
                amount: *amount,
            }]),
            C::Freeze if self.frozen => Ok(vec![]),
            C::Freeze => Ok(vec![AccountEvent::Frozen]),
        }
    }
}

/// Where a transfer stands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TransferState {
    /// Not requested (no events).
    #[default]
    None,
    /// Requested: nothing moved yet.
    Requested,
    /// The source account is debited; the money is in flight.
    Debited,
    /// The target account is credited: done.
    Credited,
    /// The credit was refused and the debit given back: done.
    Refunded,
    /// The debit was refused: nothing moved, done.
    Rejected,
}

impl TransferState {
    /// `CREDITED`, `REFUNDED` or `REJECTED`.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TransferState::Credited | TransferState::Refunded | TransferState::Rejected
        )
    }

    /// The state's name as the check and the demo print it.
    pub fn name(self) -> &'static str {
        match self {
            TransferState::None => "NONE",
            TransferState::Requested => "REQUESTED",
            TransferState::Debited => "DEBITED",
            TransferState::Credited => "CREDITED",
            TransferState::Refunded => "REFUNDED",
            TransferState::Rejected => "REJECTED",
        }
    }
}

/// A transfer's state.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Transfer {
    /// Where it stands.
    pub state: TransferState,
    /// The account debited.
    pub from: String,
    /// The account credited.
    pub to: String,
    /// Cents.
    pub amount: i64,
}

/// What happens to a transfer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TransferEvent {
    /// Asked for.
    Requested {
        /// From this account.
        from: String,
        /// To this one.
        to: String,
        /// Cents.
        amount: i64,
    },
    /// The source was debited.
    Debited,
    /// The target was credited.
    Credited,
    /// The credit was refused; the source got its money back.
    Refunded {
        /// Why the credit was refused.
        reason: String,
    },
    /// The debit was refused.
    Rejected {
        /// Why.
        reason: String,
    },
}

/// What a transfer is asked.
#[derive(Debug, Clone)]
pub enum TransferCommand {
    /// Request it (nothing if requested with the same terms).
    Request {
        /// From this account.
        from: String,
        /// To this one.
        to: String,
        /// Cents.
        amount: i64,
    },
    /// Record the debit.
    MarkDebited,
    /// Record the credit.
    MarkCredited,
    /// Record the refund.
    MarkRefunded {
        /// Why the credit was refused.
        reason: String,
    },
    /// Record the refused debit.
    Reject {
        /// Why.
        reason: String,
    },
}

/// Why a transfer refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// Requested already, with other terms.
    #[error("transfer already requested with other terms")]
    Conflicting,
    /// From and to are the same account, or the amount is not positive.
    #[error("a transfer moves a positive amount between two accounts")]
    Invalid,
    /// The step does not follow from the state.
    #[error("a transfer in state {} cannot become {to}", .from.name())]
    OutOfOrder {
        /// Where it is.
        from: TransferState,
        /// Where it was asked to go.
        to: &'static str,
    },
}

impl Aggregate for Transfer {
    const TYPE: &'static str = "transfer";
    type Event = TransferEvent;
    type Command = TransferCommand;
    type Error = TransferError;

    fn apply(&mut self, event: &TransferEvent) {
        self.state = match event {
            TransferEvent::Requested { from, to, amount } => {
                self.from.clone_from(from);
                self.to.clone_from(to);
                self.amount = *amount;
                TransferState::Requested
            }
            TransferEvent::Debited => TransferState::Debited,
            TransferEvent::Credited => TransferState::Credited,
            TransferEvent::Refunded { .. } => TransferState::Refunded,
            TransferEvent::Rejected { .. } => TransferState::Rejected,
        }
    }

    fn decide(&self, command: &TransferCommand) -> Result<Vec<TransferEvent>, TransferError> {
        use TransferCommand as C;
        use TransferState as S;
        let step = |from: S, to: S, event: TransferEvent, name: &'static str| {
            if self.state == from {
                Ok(vec![event])
            } else if self.state == to {
                Ok(vec![]) // already there: a repeated step changes nothing
            } else {
                Err(TransferError::OutOfOrder {
                    from: self.state,
                    to: name,
                })
            }
        };
        match command {
            C::Request { from, to, amount } if from == to || *amount <= 0 => {
                Err(TransferError::Invalid)
            }
            C::Request { from, to, amount } => match self.state {
                S::None => Ok(vec![TransferEvent::Requested {
                    from: from.clone(),
                    to: to.clone(),
                    amount: *amount,
                }]),
                _ if (&self.from, &self.to, self.amount) == (from, to, *amount) => Ok(vec![]),
                _ => Err(TransferError::Conflicting),
            },
            C::MarkDebited => step(S::Requested, S::Debited, TransferEvent::Debited, "DEBITED"),
            C::MarkCredited => step(S::Debited, S::Credited, TransferEvent::Credited, "CREDITED"),
            C::MarkRefunded { reason } => step(
                S::Debited,
                S::Refunded,
                TransferEvent::Refunded {
                    reason: reason.clone(),
                },
                "REFUNDED",
            ),
            C::Reject { reason } => step(
                S::Requested,
                S::Rejected,
                TransferEvent::Rejected {
                    reason: reason.clone(),
                },
                "REJECTED",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fold<A: Aggregate>(events: &[A::Event]) -> A {
        let mut a = A::default();
        for e in events {
            a.apply(e);
        }
        a
    }

    #[test]
    fn a_transfer_moves_through_its_states_and_repeats_change_nothing() {
        let mut t = Transfer::default();
        let request = TransferCommand::Request {
            from: "a".into(),
            to: "b".into(),
            amount: 5,
        };
        for command in [
            &request,
            &TransferCommand::MarkDebited,
            &TransferCommand::MarkCredited,
        ] {
            for e in t.decide(command).unwrap() {
                t.apply(&e);
            }
            // The same command again decides nothing.
            assert!(t.decide(command).unwrap().is_empty());
        }
        assert_eq!(t.state, TransferState::Credited);
        assert!(t
            .decide(&TransferCommand::MarkRefunded { reason: "x".into() })
            .is_err());
    }

    #[test]
    fn accounts_refuse_what_they_cannot_do() {
        let a: Account = fold(&[AccountEvent::Opened { initial: 10 }, AccountEvent::Frozen]);
        let debit = |amount| AccountCommand::Debit {
            transfer: "t".into(),
            amount,
        };
        assert!(matches!(
            a.decide(&debit(11)),
            Err(AccountError::InsufficientFunds { .. })
        ));
        assert_eq!(a.decide(&debit(10)).unwrap().len(), 1);
        assert_eq!(
            a.decide(&AccountCommand::Credit {
                transfer: "t".into(),
                amount: 1
            }),
            Err(AccountError::Frozen)
        );
        assert_eq!(
            Account::default().decide(&debit(1)),
            Err(AccountError::NotOpen)
        );
    }
}
