//! The numbers Rust and SQL share: the `code` of a transition function's `outcome` row and the
//! `state` of a row of `records`. The SQL files use the same numbers (with a comment naming them);
//! this is the one place the Rust side names them, and the differential test checks that both
//! sides mean the same by them.

/// What a transition function decided (`outcome.code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i16)]
pub(crate) enum OutcomeCode {
    /// Claim: acquired; Complete, Renew, Release: done.
    Done = 1,
    /// Claim: another caller holds a valid lease.
    InProgress = 2,
    /// Claim: the response is stored.
    Completed = 3,
    /// Complete: retried by the token that completed the key; the first result stands.
    AlreadyCompletedByThisToken = 4,
    /// Claim: the key is bound to another fingerprint.
    FingerprintMismatch = 10,
    /// Claim: a new key while the store is full.
    StoreFull = 11,
    /// Complete, Renew, Release: the token does not hold the key.
    LeaseLost = 12,
    /// Renew, Release: refused, the key is completed by this token.
    AlreadyCompleted = 13,
    /// The key is absent.
    NotFound = 14,
    /// Claim: a new key in a namespace holding its quota.
    NamespaceFull = 15,
}

impl OutcomeCode {
    /// The code a function returned, if it is one of these.
    pub(crate) fn from_sql(code: i16) -> Option<OutcomeCode> {
        use OutcomeCode::*;
        [
            Done,
            InProgress,
            Completed,
            AlreadyCompletedByThisToken,
            FingerprintMismatch,
            StoreFull,
            LeaseLost,
            AlreadyCompleted,
            NotFound,
            NamespaceFull,
        ]
        .into_iter()
        .find(|known| *known as i16 == code)
    }
}

/// Where a key stands (`records.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i16)]
pub(crate) enum StateCode {
    /// A caller holds (or held, if the lease lapsed) the key.
    Held = 1,
    /// The holder released the key.
    Released = 2,
    /// The response is stored.
    Completed = 3,
}

impl StateCode {
    /// The state a row holds, if it is one of these.
    pub(crate) fn from_sql(state: i16) -> Option<StateCode> {
        [StateCode::Held, StateCode::Released, StateCode::Completed].into_iter().find(|known| *known as i16 == state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_read_back_and_unknown_ones_are_refused() {
        for code in 0..20 {
            if let Some(outcome) = OutcomeCode::from_sql(code) {
                assert_eq!(outcome as i16, code);
            }
        }
        assert_eq!(OutcomeCode::from_sql(12), Some(OutcomeCode::LeaseLost));
        assert_eq!(OutcomeCode::from_sql(5), None);
        assert_eq!(StateCode::from_sql(3), Some(StateCode::Completed));
        assert_eq!(StateCode::from_sql(0), None);
    }
}
