//! An MCIM's PIN and PUK (5.1.1.1 "PIN-protected"): kept as TRE MACs, tries counted and
//! committed before the comparison, Blocked when the PIN runs out, unblocked with the PUK.

use super::*;

impl Registry {
    /// Changes the PIN: the old one is verified like [`Registry::verify_pin`] (and counts
    /// as a try).
    pub fn change_pin(&mut self, id: &str, old: &str, new: &str) -> Result<(), RegistryError> {
        check_digits("PIN", new, 4, 8)?;
        self.verify_pin(id, old)?;
        let mut next = self.record(id)?.clone();
        let tag = hex::encode(self.pin_tag(id, "pin", new)?);
        if let Some(p) = next.pin.as_mut() {
            p.pin_tag = tag;
        }
        self.commit(
            vec![Change::Put(Box::new(next))],
            "pin",
            Some(id),
            "PIN changed".into(),
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
        let tag = self.pin_tag(id, "pin", pin)?;
        if bool::from(hex::encode(tag).as_bytes().ct_eq(p.pin_tag.as_bytes())) {
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
        let tag = self.pin_tag(id, "puk", puk)?;
        if !bool::from(hex::encode(tag).as_bytes().ct_eq(p.puk_tag.as_bytes())) {
            return Err(RegistryError::WrongPuk { tries_left });
        }
        let mut ok = rec.clone();
        ok.pin = Some(PinRecord {
            pin_tag: hex::encode(self.pin_tag(id, "pin", new_pin)?),
            pin_tries_left: PIN_TRIES,
            puk_tag: p.puk_tag,
            puk_tries_left: PUK_TRIES,
        });
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
