//! The MCIM lifecycle on the registry (5.1.1.1): install, the lifecycle operations of
//! `mcim_core::lifecycle`, selection (one MCIM in a session at a time) and the owner's choice
//! of the MCIM that provides connectivity (5.1.3.7.2).

use super::*;

impl Registry {
    /// Installs an MCIM (5.1.3.6.2 step 13): K and OPc go into the TRE, the record is
    /// Installed.
    pub fn install(&mut self, req: InstallRequest) -> Result<(), RegistryError> {
        self.live()?;
        let id = req.imsi.as_str().to_string();
        if self.records.contains_key(&id) {
            return Err(RegistryError::AlreadyInstalled(id));
        }
        req.sqn_profile.validate().map_err(TreError::from)?;
        check_sho_id(&req.sho)?;
        req.usim
            .check()
            .map_err(|e| RegistryError::BadRequest(format!("USIM data: {e}")))?;
        if !req.usim.ue_files.is_empty() {
            return Err(RegistryError::BadRequest(
                "USIM data: a new MCIM has no UE writes".into(),
            ));
        }
        if let Some((pin, puk)) = &req.pin {
            pin::check_digits("PIN", pin, 4, 8)?;
            pin::check_digits("PUK", puk, 8, 8)?;
        }
        let mut secrets = self.tre.import_mcim_secrets(&req.wrapped)?;
        // TR 33.812 5.1.1.1 "PIN-protected": where the TRE can, the PIN and PUK become the
        // authValues of the MCIM's objects, and the unbound ones are never stored.
        let pin = match &req.pin {
            Some((pin, puk)) => match self
                .tre
                .bind_pin(&secrets, pin.as_bytes(), puk.as_bytes())?
            {
                Some(bound) => {
                    secrets = bound;
                    Some(PinRecord::in_tre())
                }
                None => Some(self.new_pin_record(&id, pin, puk)?),
            },
            None => None,
        };
        let mode = secrets.aka_execution;
        let rec = McimRecord {
            id: id.clone(),
            sho: req.sho.clone(),
            state: McimState::Installed,
            blocked: None,
            secrets: Some(secrets),
            constants: ConstantsRecord::from(&req.constants),
            sqn_profile: req.sqn_profile,
            sqn: MsSqnState::new(&req.sqn_profile),
            pin,
            expires_at: req.expires_at,
            left_in_tre: Vec::new(),
            usim: req.usim,
            version: 0,
        };
        self.commit(
            vec![Change::Put(Box::new(rec))],
            "install",
            Some(&id),
            format!("installed from SHO {} (AKA {mode:?})", req.sho),
        )
    }

    /// Renews a credential in place (5.1.3.7.4.3: the PCID's initial credential): the new K
    /// and OPc are imported into the TRE, the SQN state starts afresh, the new lifetime is
    /// recorded, in one commit; then what the TRE held for the old secrets goes. Only an
    /// Installed or Activated credential with no session open is renewed.
    pub fn renew(
        &mut self,
        id: &str,
        wrapped: &WrappedSecrets,
        expires_at: Option<u64>,
    ) -> Result<(), RegistryError> {
        self.live()?;
        let rec = self.record(id)?.clone();
        if rec.pin.as_ref().is_some_and(|p| p.in_tre) {
            return Err(RegistryError::BadRequest(format!(
                "MCIM {id}'s keys open only with its PIN: a credential with a PIN is replaced, not renewed"
            )));
        }
        if !matches!(rec.state, McimState::Installed | McimState::Activated) {
            return Err(RegistryError::BadRequest(format!(
                "MCIM {id} is {:?}: only an installed or activated credential is renewed",
                rec.state
            )));
        }
        let secrets = self.tre.import_mcim_secrets(wrapped)?;
        let mut next = rec.clone();
        next.secrets = Some(secrets);
        next.sqn = MsSqnState::new(&rec.sqn_profile);
        next.expires_at = expires_at;
        // What the TRE held for the old secrets goes, in the same commit.
        self.commit(
            vec![Change::Put(Box::new(next)), self.doom(&rec)],
            "renew",
            Some(id),
            format!("credential renewed (expires at {expires_at:?})"),
        )
    }

    /// A lifecycle operation other than Select (see [`Registry::select`]). Unblocking here is
    /// for MCIMs blocked on request; a PIN-blocked MCIM needs [`Registry::unblock_pin`], one
    /// its SHO blocked [`Registry::sho_unblock`].
    pub fn apply(&mut self, id: &str, op: LifecycleOp) -> Result<McimState, RegistryError> {
        let rec = self.record(id)?.clone();
        if op == LifecycleOp::Select {
            return Err(RegistryError::BadRequest("use select".into()));
        }
        if op == LifecycleOp::Unblock && rec.blocked == Some(BlockReason::PinBlocked) {
            return Err(RegistryError::BadRequest(
                "the PIN is blocked: unblock with the PUK".into(),
            ));
        }
        if op == LifecycleOp::Unblock && rec.blocked == Some(BlockReason::BySho) {
            return Err(RegistryError::BadRequest(
                "its SHO blocked it by a remote instruction: only that SHO unblocks it".into(),
            ));
        }
        self.transition(rec, op)
    }

    /// Unblocks an MCIM its SHO blocked (5.1.1.3), on that SHO's verified instruction; an
    /// MCIM blocked for another reason is refused.
    pub fn sho_unblock(&mut self, id: &str) -> Result<McimState, RegistryError> {
        let rec = self.record(id)?.clone();
        if rec.blocked != Some(BlockReason::BySho) {
            return Err(RegistryError::Lifecycle(LifecycleError::Forbidden {
                from: rec.state,
                op: LifecycleOp::Unblock,
                why: "its SHO did not block it",
            }));
        }
        self.transition(rec, LifecycleOp::Unblock)
    }

    fn transition(&mut self, rec: McimRecord, op: LifecycleOp) -> Result<McimState, RegistryError> {
        let id = rec.id.as_str();
        let to = lifecycle::transition(rec.state, rec.blocked, op)?;
        let detail = format!("{:?} -> {to:?} ({op:?})", rec.state);
        let mut changes = Vec::new();
        if matches!(to, McimState::Blocked | McimState::Retired) && self.connectivity() == Some(id)
        {
            changes.push(Change::Connectivity(None));
        }
        let change = if to == McimState::Deleted {
            Change::Remove(id.to_string())
        } else {
            let mut next = rec.clone();
            next.state = to;
            next.blocked = match op {
                LifecycleOp::Block(r) => Some(r),
                LifecycleOp::Unblock => None,
                _ => rec.blocked,
            };
            if to == McimState::Retired {
                // The credentials go; the TRE objects were only ever usable through them.
                next.secrets = None;
                next.pin = None;
                next.left_in_tre = Vec::new();
            }
            Change::Put(Box::new(next))
        };
        changes.push(change);
        // The registry no longer refers to the secrets: what the TRE holds for them (a
        // token's objects) is doomed in the same commit and destroyed right after it, or at
        // the next start after a crash.
        if matches!(to, McimState::Retired | McimState::Deleted) {
            changes.push(self.doom(&rec));
        }
        self.commit(changes, "lifecycle", Some(id), detail)?;
        Ok(to)
    }

    /// Selects an MCIM (a session; "only an activated MCIM can be selected"), checking its
    /// PIN when it has one. At most one MCIM is selected at a time.
    pub fn select(&mut self, id: &str, pin: Option<&str>) -> Result<(), RegistryError> {
        let rec = self.record(id)?.clone();
        let other = self
            .records
            .values()
            .find(|r| r.state == McimState::Selected && r.id != id)
            .map(|r| r.id.clone());
        lifecycle::transition(rec.state, rec.blocked, LifecycleOp::Select)?;
        if !lifecycle::may_select(rec.state, usize::from(other.is_some())) {
            return Err(RegistryError::AnotherSelected(other.unwrap_or_default()));
        }
        if let Some(c) = self.header.connectivity.as_deref().filter(|c| *c != id) {
            return Err(RegistryError::BadRequest(format!(
                "MCIM {c} is the one chosen for connectivity; choose {id} first"
            )));
        }
        let mut session_pin = None;
        if let Some(p) = &rec.pin {
            let pin =
                pin.ok_or_else(|| RegistryError::BadRequest("this MCIM needs its PIN".into()))?;
            self.verify_pin(id, pin)?;
            if p.in_tre {
                session_pin = Some(zeroize::Zeroizing::new(pin.as_bytes().to_vec()));
            }
        }
        let mut next = self.record(id)?.clone();
        next.state = McimState::Selected;
        self.commit(
            vec![Change::Put(Box::new(next))],
            "lifecycle",
            Some(id),
            "Activated -> Selected".into(),
        )?;
        self.session_pin = session_pin.map(|p| (id.to_string(), p));
        Ok(())
    }

    /// The MCIM the owner chose for connectivity, if any.
    pub fn connectivity(&self) -> Option<&str> {
        self.header.connectivity.as_deref()
    }

    /// The owner chooses the one MCIM used for connectivity (5.1.3.7.2: "the owner of the
    /// device should control which MCIM in the device is used to provide connectivity"). It
    /// must be Activated or Selected, and no other MCIM may be in a session.
    pub fn set_connectivity(&mut self, id: &str) -> Result<(), RegistryError> {
        let rec = self.record(id)?;
        if rec.state != McimState::Activated && rec.state != McimState::Selected {
            return Err(RegistryError::BadRequest(format!(
                "only an activated MCIM provides connectivity; {id} is {:?}",
                rec.state
            )));
        }
        if let Some(other) = self
            .records
            .values()
            .find(|r| r.state == McimState::Selected && r.id != id)
        {
            return Err(RegistryError::AnotherSelected(other.id.clone()));
        }
        self.commit(
            vec![Change::Connectivity(Some(id.to_string()))],
            "connectivity",
            Some(id),
            "chosen for connectivity".into(),
        )
    }
}

/// An SHO's id as the registry and the audit record keep it: 1 to 253 visible ASCII
/// characters (a domain name, a URN), so that it cannot forge lines in what shows it.
fn check_sho_id(sho: &str) -> Result<(), RegistryError> {
    if sho.is_empty() || sho.len() > 253 || !sho.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(RegistryError::BadRequest(
            "the SHO id must be 1 to 253 visible ASCII characters".into(),
        ));
    }
    Ok(())
}
