//! The MCIM lifecycle (TR 33.812 5.1.1.1): one state machine, in one place.
//!
//! ```text
//! Installed --activate--> Activated --select--> Selected --end_session--> Activated
//! Activated --block--> Blocked --unblock--> Activated
//! Installed | Activated | Blocked --retire--> Retired
//! any state but Selected (and Deleted) --delete--> Deleted
//! ```
//!
//! "Only an activated MCIM can be selected"; "deletion may be applied to a MCIM that is in any
//! of the above lifecycle states except for the Selected state". Why an MCIM is Blocked is
//! kept ([`BlockReason`]): a PIN that ran out is unblocked with the PUK, an owner's block by
//! the owner, but an MCIM whose record failed its integrity check is never unblocked (its
//! contents cannot be trusted): it can only be deleted and provisioned again.
//!
//! "At most one MCIM can be active at any time" (5.1.3.7.2) is a rule across MCIMs and lives
//! in the registry, which asks [`may_select`] here.

use serde::{Deserialize, Serialize};

/// A lifecycle state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum McimState {
    /// Created, with an entry in the registry.
    Installed,
    /// Authorised for operational use.
    Activated,
    /// In a session; back to Activated when it ends.
    Selected,
    /// Temporarily de-activated.
    Blocked,
    /// Credentials gone; executables other MCIMs share are kept.
    Retired,
    /// Removed.
    Deleted,
}

/// Why an MCIM is Blocked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockReason {
    /// The application PIN's retry counter ran out (the seed's example); the PUK unblocks.
    PinBlocked,
    /// The owner or the SHO blocked it.
    Requested,
    /// Its record or blob failed the integrity check at start (5.1.2.3); never unblocked.
    Tampered,
    /// Its SHO blocked it by a remote instruction (5.1.1.3); only that SHO unblocks it.
    BySho,
}

/// A lifecycle operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleOp {
    /// Installed -> Activated.
    Activate,
    /// Activated -> Selected.
    Select,
    /// Selected -> Activated.
    EndSession,
    /// Activated -> Blocked (any reason); also Installed -> Blocked for a tampered record.
    Block(BlockReason),
    /// Blocked -> Activated (not for [`BlockReason::Tampered`]).
    Unblock,
    /// Installed | Activated | Blocked -> Retired.
    Retire,
    /// Any but Selected -> Deleted.
    Delete,
}

/// A refused transition. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    /// The seed does not allow this operation from this state.
    #[error("cannot {op:?} an MCIM that is {from:?}: {why}")]
    Forbidden {
        /// The state it was in.
        from: McimState,
        /// What was asked.
        op: LifecycleOp,
        /// The rule, in the seed's words.
        why: &'static str,
    },
}

/// The state after `op`, given the state and (when Blocked) why; or why not.
pub fn transition(
    from: McimState,
    blocked: Option<BlockReason>,
    op: LifecycleOp,
) -> Result<McimState, LifecycleError> {
    use LifecycleOp as O;
    use McimState as S;
    let no = |why| Err(LifecycleError::Forbidden { from, op, why });
    match (from, op) {
        (S::Deleted, _) => no("a deleted MCIM no longer exists"),
        (S::Installed, O::Activate) => Ok(S::Activated),
        (_, O::Activate) => no("only an installed MCIM is activated"),
        (S::Activated, O::Select) => Ok(S::Selected),
        (_, O::Select) => no("only an activated MCIM can be selected"),
        (S::Selected, O::EndSession) => Ok(S::Activated),
        (_, O::EndSession) => no("only a selected MCIM has a session to end"),
        (S::Activated, O::Block(_)) => Ok(S::Blocked),
        (S::Installed, O::Block(BlockReason::Tampered)) => Ok(S::Blocked),
        (S::Selected, O::Block(_)) => no("end the session first"),
        (_, O::Block(_)) => no("only an activated MCIM is blocked"),
        (S::Blocked, O::Unblock) if blocked == Some(BlockReason::Tampered) => {
            no("an MCIM that failed its integrity check is never unblocked; delete it")
        }
        (S::Blocked, O::Unblock) => Ok(S::Activated),
        (_, O::Unblock) => no("only a blocked MCIM is unblocked"),
        (S::Installed | S::Activated | S::Blocked, O::Retire) => Ok(S::Retired),
        (_, O::Retire) => no("a selected or retired MCIM cannot be retired"),
        (S::Selected, O::Delete) => no("deletion may be applied in any state except Selected"),
        (_, O::Delete) => Ok(S::Deleted),
    }
}

/// Whether an MCIM in `state` may be selected while `other_selected` MCIMs are in a session:
/// at most one MCIM is active at any time (5.1.3.7.2).
pub fn may_select(state: McimState, other_selected: usize) -> bool {
    state == McimState::Activated && other_selected == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use BlockReason as R;
    use LifecycleOp as O;
    use McimState as S;

    const STATES: [S; 6] = [
        S::Installed,
        S::Activated,
        S::Selected,
        S::Blocked,
        S::Retired,
        S::Deleted,
    ];
    const OPS: [O; 9] = [
        O::Activate,
        O::Select,
        O::EndSession,
        O::Block(R::PinBlocked),
        O::Block(R::Requested),
        O::Block(R::Tampered),
        O::Unblock,
        O::Retire,
        O::Delete,
    ];

    /// The whole table: every (state, op) pair, allowed ones with their target.
    #[test]
    fn the_table() {
        let allowed = |from: S, op: O| -> Option<S> {
            Some(match (from, op) {
                (S::Installed, O::Activate) => S::Activated,
                (S::Activated, O::Select) => S::Selected,
                (S::Selected, O::EndSession) => S::Activated,
                (S::Activated, O::Block(_)) => S::Blocked,
                (S::Installed, O::Block(R::Tampered)) => S::Blocked,
                (S::Blocked, O::Unblock) => S::Activated,
                (S::Installed | S::Activated | S::Blocked, O::Retire) => S::Retired,
                (S::Installed | S::Activated | S::Blocked | S::Retired, O::Delete) => S::Deleted,
                _ => return None,
            })
        };
        let mut count = 0;
        for from in STATES {
            for op in OPS {
                let got = transition(from, Some(R::PinBlocked), op).ok();
                assert_eq!(got, allowed(from, op), "{from:?} {op:?}");
                count += usize::from(got.is_some());
            }
        }
        assert_eq!(count, 15);
    }

    #[test]
    fn tampered_is_never_unblocked_but_can_be_deleted() {
        let e = transition(S::Blocked, Some(R::Tampered), O::Unblock);
        assert!(matches!(e, Err(LifecycleError::Forbidden { .. })));
        assert_eq!(
            transition(S::Blocked, Some(R::Tampered), O::Delete),
            Ok(S::Deleted)
        );
    }

    #[test]
    fn selected_is_never_deleted_and_errors_say_why() {
        let e = transition(S::Selected, None, O::Delete).unwrap_err();
        assert!(e.to_string().contains("except Selected"), "{e}");
    }

    #[test]
    fn one_session_at_a_time() {
        assert!(may_select(S::Activated, 0));
        assert!(!may_select(S::Activated, 1));
        assert!(!may_select(S::Installed, 0));
    }
}
