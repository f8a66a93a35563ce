//! Leaving lockdown with the supplier's rehabilitation token (5.1.2.2): verified, bound to
//! the TRE's counter, used once.

use super::store::tampered_stub;
use super::*;

impl Registry {
    /// Leaves lockdown with the supplier's token (5.1.2.2 "authorised rehabilitation"). The
    /// old audit record is kept beside the new one (`audit.log.lockdown-<counter>`); MCIM
    /// records that still verify against a header whose own MAC verifies are kept (Selected
    /// ones end their session); every other MCIM becomes Blocked (tampered). A new audit chain
    /// starts with the reason, and the TRE counter advances, so the token works once.
    pub fn rehabilitate(
        &mut self,
        token: &[u8],
        supplier: &p256::ecdsa::VerifyingKey,
    ) -> Result<(), RegistryError> {
        let Some(reason) = self.lockdown.clone() else {
            return Err(RegistryError::BadRequest(
                "the TRE is not in lockdown".into(),
            ));
        };
        let identity = self.tre.identity()?.ok_or(TreError::NotInitialised)?;
        let counter = self.tre.rollback_counter()?;
        mcim_core::rehabilitation::verify(token, supplier, &identity.pcid, counter)
            .map_err(|e| RegistryError::Unauthorised(e.to_string()))?;

        let kept_as = format!("{AUDIT_FILE}.lockdown-{counter}");
        match std::fs::rename(self.dir.join(AUDIT_FILE), self.dir.join(&kept_as)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let trusted = match files::read_optional(&self.dir.join(HEADER_FILE)).map_err(io)? {
            Some(b) => self.check_header(&b)?.ok(),
            None => None,
        };
        let ids: Vec<String> = match &trusted {
            Some(h) => h.mcims.keys().cloned().collect(),
            None => {
                let mut ids: Vec<String> = std::fs::read_dir(self.dir.join(MCIM_DIR))
                    .map_err(io)?
                    .flatten()
                    .filter_map(|f| {
                        let n = f.file_name().to_string_lossy().into_owned();
                        n.split('.').next().map(str::to_string)
                    })
                    .collect();
                ids.sort();
                ids.dedup();
                ids
            }
        };
        let mut changes = Vec::new();
        let mut kept = 0;
        for id in &ids {
            let checked = match trusted.as_ref().and_then(|h| h.mcims.get(id)) {
                Some(he) => self.check_record(id, he)?.into_result(),
                None => Err("no trusted header vouches for it".to_string()),
            };
            let rec = match checked {
                Ok(mut r) => {
                    kept += 1;
                    if r.state == McimState::Selected {
                        r.state = McimState::Activated;
                    }
                    r
                }
                Err(_) => tampered_stub(id, 0),
            };
            changes.push(Change::Put(Box::new(rec)));
        }
        if let Some(c) = trusted.as_ref().and_then(|h| h.connectivity.clone()) {
            changes.push(Change::Connectivity(Some(c)));
        }
        self.header = Header {
            format: FORMAT,
            counter,
            audit_head: hex::encode([0u8; 32]),
            ..Header::default()
        };
        self.records.clear();
        self.tail = (0, [0; 32]);
        self.tre_sync_pending = false;
        self.hybrid_sync_pending = false;
        self.anchor_pending = false;
        self.lockdown = None;
        let detail = format!(
            "rehabilitated from lockdown ({reason}); {kept} of {} MCIMs kept, the others blocked; previous audit record kept as {kept_as}",
            ids.len()
        );
        let done = self.commit(changes, "rehabilitation", None, detail);
        if let Err(e) = &done {
            self.lockdown = Some(format!("rehabilitation did not complete: {e}"));
        }
        self.startup.clear();
        done
    }
}
