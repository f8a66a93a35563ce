//! An MCIM's PIN and PUK (5.1.1.1 "PIN-protected"): tries counted and committed before the
//! comparison, Blocked when the PIN runs out, unblocked with the PUK. Where the TRE can
//! (`Tre::bind_pin`: a TPM), the PIN and PUK are the authValues of the MCIM's objects and the
//! TRE itself compares them and counts wrong ones (`PinRecord::in_tre`); elsewhere they are
//! kept as TRE MACs and compared here.

use super::*;
use crate::tre::Authority;

impl Registry {
    /// Changes the PIN: the old one is verified like [`Registry::verify_pin`] (and counts
    /// as a try).
    pub fn change_pin(&mut self, id: &str, old: &str, new: &str) -> Result<(), RegistryError> {
        check_digits("PIN", new, 4, 8)?;
        self.verify_pin(id, old)?;
        let mut next = self.record(id)?.clone();
        if next.pin.as_ref().is_some_and(|p| p.in_tre) {
            let secrets = next.secrets.as_ref().ok_or_else(no_secrets)?;
            let rebound = self
                .tre
                .rebind_pin(secrets, Authority::Pin(old.as_bytes()), new.as_bytes())?
                .ok_or_else(|| {
                    TreError::Mismatch("the TRE refused the PIN it had just accepted".into())
                })?;
            next.secrets = Some(rebound);
        } else {
            let tag = hex::encode(self.pin_tag(id, "pin", new)?);
            if let Some(p) = next.pin.as_mut() {
                p.pin_tag = tag;
            }
        }
        self.commit(
            vec![Change::Put(Box::new(next))],
            "pin",
            Some(id),
            "PIN changed".into(),
        )?;
        if let Some((sid, pin)) = self.session_pin.as_mut()
            && sid == id
        {
            *pin = zeroize::Zeroizing::new(new.as_bytes().to_vec());
        }
        Ok(())
    }

    /// Gives an MCIM without a PIN a PIN and a PUK (ETSI TS 102 221 ENABLE PIN). Where the
    /// TRE can, they become the authValues of the MCIM's objects ([`Tre::bind_pin`]) and the
    /// unbound objects leave the record; elsewhere they are kept as TRE MACs. Refused for an
    /// MCIM that has a PIN, is selected, or has no credentials; nothing changes then.
    pub fn enable_pin(&mut self, id: &str, pin: &str, puk: &str) -> Result<(), RegistryError> {
        check_digits("PIN", pin, 4, 8)?;
        check_digits("PUK", puk, 8, 8)?;
        let rec = self.record(id)?.clone();
        if rec.pin.is_some() {
            return Err(RegistryError::BadRequest(format!(
                "MCIM {id} has a PIN already: change it, or unblock it with the PUK"
            )));
        }
        if rec.state == McimState::Selected {
            return Err(RegistryError::BadRequest(format!(
                "MCIM {id} is selected: end its session first"
            )));
        }
        let secrets = rec.secrets.as_ref().ok_or_else(no_secrets)?;
        let mut next = rec.clone();
        match self.tre.bind_pin(secrets, pin.as_bytes(), puk.as_bytes())? {
            Some(bound) => {
                next.secrets = Some(bound);
                next.pin = Some(PinRecord::in_tre());
            }
            None => next.pin = Some(self.new_pin_record(id, pin, puk)?),
        }
        let checked_by = if next.pin.as_ref().is_some_and(|p| p.in_tre) {
            "the TRE"
        } else {
            "tred"
        };
        self.commit(
            vec![Change::Put(Box::new(next))],
            "pin",
            Some(id),
            format!("PIN enabled (checked by {checked_by})"),
        )
    }

    pub(super) fn pin_tag(
        &mut self,
        id: &str,
        kind: &str,
        value: &str,
    ) -> Result<[u8; 32], RegistryError> {
        Ok(self.tre.integrity_mac(&sha256(&[
            PIN_DOMAIN,
            kind.as_bytes(),
            &[0],
            id.as_bytes(),
            &[0],
            value.as_bytes(),
        ]))?)
    }

    pub(super) fn new_pin_record(
        &mut self,
        id: &str,
        pin: &str,
        puk: &str,
    ) -> Result<PinRecord, RegistryError> {
        check_digits("PIN", pin, 4, 8)?;
        check_digits("PUK", puk, 8, 8)?;
        Ok(PinRecord {
            in_tre: false,
            pin_tag: hex::encode(self.pin_tag(id, "pin", pin)?),
            pin_tries_left: PIN_TRIES,
            puk_tag: hex::encode(self.pin_tag(id, "puk", puk)?),
            puk_tries_left: PUK_TRIES,
        })
    }

    /// Checks the PIN. The retry counter is decremented and committed before the comparison,
    /// so cutting the power cannot buy free guesses; the last wrong guess Blocks the MCIM.
    pub fn verify_pin(&mut self, id: &str, pin: &str) -> Result<(), RegistryError> {
        let rec = self.record(id)?.clone();
        // A malformed PIN cannot be right: refused without costing a try.
        check_digits("PIN", pin, 4, 8)?;
        let Some(p) = rec.pin.clone() else {
            return Err(RegistryError::BadRequest("this MCIM has no PIN".into()));
        };
        if rec.state == McimState::Blocked || p.pin_tries_left == 0 {
            return Err(RegistryError::Lifecycle(LifecycleError::Forbidden {
                from: rec.state,
                op: LifecycleOp::Select,
                why: "the MCIM is blocked",
            }));
        }
        let mut attempt = rec.clone();
        let tries_left = p.pin_tries_left - 1;
        if let Some(ap) = attempt.pin.as_mut() {
            ap.pin_tries_left = tries_left;
        }
        let exhausted = tries_left == 0;
        if exhausted {
            // Provisional: reverted below if this last try is right.
            attempt.state = lifecycle::transition(
                rec.state,
                rec.blocked,
                LifecycleOp::Block(BlockReason::PinBlocked),
            )
            .unwrap_or(rec.state);
            if attempt.state == McimState::Blocked {
                attempt.blocked = Some(BlockReason::PinBlocked);
            }
        }
        self.commit(
            vec![Change::Put(Box::new(attempt))],
            "pin",
            Some(id),
            format!("PIN attempt ({tries_left} left if wrong)"),
        )?;
        let right = if p.in_tre {
            let secrets = rec.secrets.as_ref().ok_or_else(no_secrets)?;
            match self.tre.check_pin(secrets, Authority::Pin(pin.as_bytes())) {
                Ok(right) => right,
                Err(e) => return Err(self.untried(rec, e)),
            }
        } else {
            let tag = self.pin_tag(id, "pin", pin)?;
            bool::from(hex::encode(tag).as_bytes().ct_eq(p.pin_tag.as_bytes()))
        };
        if right {
            let mut ok = rec;
            if let Some(op) = ok.pin.as_mut() {
                op.pin_tries_left = PIN_TRIES;
            }
            self.commit(
                vec![Change::Put(Box::new(ok))],
                "pin",
                Some(id),
                "PIN verified".into(),
            )?;
            Ok(())
        } else {
            if exhausted {
                let _ = self.commit(
                    Vec::new(),
                    "pin",
                    Some(id),
                    "PIN blocked: MCIM Blocked".into(),
                );
            }
            Err(RegistryError::WrongPin { tries_left })
        }
    }

    /// Unblocks a PIN-blocked MCIM with the PUK and sets a new PIN (TS 31.102 UNBLOCK PIN).
    pub fn unblock_pin(&mut self, id: &str, puk: &str, new_pin: &str) -> Result<(), RegistryError> {
        let rec = self.record(id)?.clone();
        let Some(p) = rec.pin.clone() else {
            return Err(RegistryError::BadRequest("this MCIM has no PIN".into()));
        };
        check_digits("PIN", new_pin, 4, 8)?;
        check_digits("PUK", puk, 8, 8)?;
        if p.puk_tries_left == 0 {
            return Err(RegistryError::WrongPuk { tries_left: 0 });
        }
        let mut attempt = rec.clone();
        let tries_left = p.puk_tries_left - 1;
        if let Some(ap) = attempt.pin.as_mut() {
            ap.puk_tries_left = tries_left;
        }
        self.commit(
            vec![Change::Put(Box::new(attempt))],
            "pin",
            Some(id),
            format!("PUK attempt ({tries_left} left if wrong)"),
        )?;
        let mut ok = rec.clone();
        if p.in_tre {
            // The PUK copies open only with the PUK: the TRE compares it, and the new PIN
            // copies come from them.
            let secrets = rec.secrets.as_ref().ok_or_else(no_secrets)?;
            let rebound = match self.tre.rebind_pin(
                secrets,
                Authority::Puk(puk.as_bytes()),
                new_pin.as_bytes(),
            ) {
                Ok(Some(s)) => s,
                Ok(None) => return Err(RegistryError::WrongPuk { tries_left }),
                Err(e) => return Err(self.untried(rec, e)),
            };
            ok.secrets = Some(rebound);
            ok.pin = Some(PinRecord::in_tre());
        } else {
            let tag = self.pin_tag(id, "puk", puk)?;
            if !bool::from(hex::encode(tag).as_bytes().ct_eq(p.puk_tag.as_bytes())) {
                return Err(RegistryError::WrongPuk { tries_left });
            }
            ok.pin = Some(PinRecord {
                in_tre: false,
                pin_tag: hex::encode(self.pin_tag(id, "pin", new_pin)?),
                pin_tries_left: PIN_TRIES,
                puk_tag: p.puk_tag,
                puk_tries_left: PUK_TRIES,
            });
        }
        if rec.blocked == Some(BlockReason::PinBlocked) {
            ok.state = lifecycle::transition(rec.state, rec.blocked, LifecycleOp::Unblock)?;
            ok.blocked = None;
        }
        self.commit(
            vec![Change::Put(Box::new(ok))],
            "pin",
            Some(id),
            "PIN unblocked with the PUK".into(),
        )
    }
}

impl Registry {
    /// A try the TRE could not evaluate (it failed, or refuses every try for now: a TPM in
    /// dictionary-attack lockout): the record goes back to what it was before the try was
    /// counted, and the TRE's error is the answer.
    fn untried(&mut self, before: McimRecord, e: TreError) -> RegistryError {
        let id = before.id.clone();
        match self.commit(
            vec![Change::Put(Box::new(before))],
            "pin",
            Some(&id),
            format!("the TRE could not check the try, not counted: {e}"),
        ) {
            Ok(()) => e.into(),
            Err(commit) => commit,
        }
    }
}

fn no_secrets() -> RegistryError {
    RegistryError::BadRequest("the MCIM has no credentials".into())
}

pub(super) fn check_digits(
    what: &str,
    v: &str,
    min: usize,
    max: usize,
) -> Result<(), RegistryError> {
    if v.len() < min || v.len() > max || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RegistryError::BadRequest(format!(
            "{what} must be {min} to {max} digits"
        )));
    }
    Ok(())
}
