//! The registry's crash-safe store (5.1.2.3): loading and checking the state directory at
//! start (header MAC, record MACs, audit chain, rollback counter, anchor), and the one commit
//! path every transaction takes (record files, audit entry, header as the commit point, then
//! the TRE's counter and anchor, or for an AKA on a TPM the hybrid counter alone).

use super::*;

/// What a start-up check found: the thing intact, or why it cannot be trusted. A finding, not
/// an error: the registry goes on, in lockdown or with that MCIM blocked.
pub(super) enum Checked<T> {
    /// It verifies.
    Intact(T),
    /// It does not, for this reason.
    Untrusted(String),
}

impl<T> Checked<T> {
    /// The thing, when intact.
    pub(super) fn ok(self) -> Option<T> {
        match self {
            Checked::Intact(t) => Some(t),
            Checked::Untrusted(_) => None,
        }
    }

    /// As a result whose error is the reason.
    pub(super) fn into_result(self) -> Result<T, String> {
        match self {
            Checked::Intact(t) => Ok(t),
            Checked::Untrusted(why) => Err(why),
        }
    }
}

impl Registry {
    /// Loads and checks everything; [`Checked::Untrusted`] means lockdown.
    pub(super) fn load(&mut self) -> Result<Checked<()>, RegistryError> {
        let header_bytes = files::read_optional(&self.dir.join(HEADER_FILE)).map_err(io)?;
        let audit_bytes = files::read_optional(&self.dir.join(AUDIT_FILE)).map_err(io)?;
        let anchor = self.tre.audit_anchor()?;
        let counter = self.tre.rollback_counter()?;
        let hybrid = self.tre.hybrid_counter()?;
        self.hybrid = hybrid.is_some();
        self.reset_epoch = hybrid.map(|h| h.reset_epoch);
        let Some(header_bytes) = header_bytes else {
            if audit_bytes.is_some() || anchor.seq > 0 {
                return Ok(Checked::Untrusted("the registry header is missing".into()));
            }
            // A new registry.
            self.header = Header {
                format: FORMAT,
                counter,
                audit_head: hex::encode([0u8; 32]),
                ..Header::default()
            };
            self.commit(Vec::new(), "registry", None, "registry created".into())?;
            return Ok(Checked::Intact(()));
        };

        // The header: MAC, then the counter (rollback).
        let header = match self.check_header(&header_bytes)? {
            Checked::Intact(h) => h,
            Checked::Untrusted(why) => return Ok(Checked::Untrusted(why)),
        };
        if header.counter < counter {
            return Ok(Checked::Untrusted(format!(
                "rollback: the state directory is older than the TRE (header counter {}, TRE counter {counter})",
                header.counter
            )));
        }
        if header.counter > counter + 1 {
            return Ok(Checked::Untrusted(format!(
                "the header counter {} is ahead of the TRE counter {counter}",
                header.counter
            )));
        }
        self.tre_sync_pending = header.counter == counter + 1;
        // The hybrid counter (AKA commits), when the TRE has one.
        let mut hybrid_note = None;
        match (hybrid, header.hybrid_counter) {
            (None, None) => {}
            (None, Some(_)) => {
                return Ok(Checked::Untrusted(
                    "the registry header names a hybrid counter this TRE does not have".into(),
                ));
            }
            // A header from before the hybrid counter: the next durable commit adopts it.
            (Some(_), None) => {
                hybrid_note =
                    Some("AKA commits advance the TRE's hybrid counter from now on".into())
            }
            (Some(h), Some(a)) if a == h.value => {}
            (Some(h), Some(a)) if a == h.value + 1 => self.hybrid_sync_pending = true,
            (Some(h), Some(a)) if h.jumped_from(a, header.tpm_epoch.as_ref()) => {
                hybrid_note = Some(format!(
                    "the TPM restarted without TPM2_Shutdown: its hybrid counter jumped from {a} to {}; \
                     a state directory up to {} AKAs older could not have been told from this one",
                    h.value, h.orderly_mask
                ))
            }
            (Some(h), Some(a)) if a < h.value => {
                return Ok(Checked::Untrusted(format!(
                    "rollback: the state directory is older than the TRE (header hybrid counter {a}, TRE hybrid counter {})",
                    h.value
                )));
            }
            (Some(h), Some(a)) => {
                return Ok(Checked::Untrusted(format!(
                    "the header's hybrid counter {a} is ahead of the TRE's {}",
                    h.value
                )));
            }
        }

        // The audit chain.
        let entries = match audit::verify(self.tre.as_mut(), audit_bytes.as_deref().unwrap_or(&[]))
        {
            Ok(e) => e,
            Err(audit::VerifyError::Chain(e)) => {
                return Ok(Checked::Untrusted(format!("audit chain broken: {e}")));
            }
            Err(audit::VerifyError::Tre(e)) => return Err(e.into()),
        };
        let committed = entries
            .iter()
            .find(|s| s.entry.seq == header.audit_seq)
            .map(|s| s.hash);
        if committed.map(hex::encode).as_deref() != Some(header.audit_head.as_str()) {
            return Ok(Checked::Untrusted(format!(
                "the audit record lacks committed entry {}",
                header.audit_seq
            )));
        }
        let anchor_ok =
            anchor.seq == header.audit_seq && hex::encode(anchor.head) == header.audit_head;
        // The anchor may lag behind the committed head by AKA and UE-update entries (a frequent
        // commit moves no anchor), and by one more entry of any kind: a commit cut after its commit point,
        // before the TRE counter advanced or between the counter and the anchor.
        let lag: Option<Vec<&audit::StoredEntry>> = entries
            .iter()
            .position(|s| anchor.seq == s.entry.seq && anchor.head == s.hash)
            .map(|at| {
                entries[at + 1..]
                    .iter()
                    .filter(|s| s.entry.seq <= header.audit_seq)
                    .collect()
            });
        let anchor_behind = lag.as_ref().is_some_and(|lag| {
            lag.split_last().is_some_and(|(_, before)| {
                before
                    .iter()
                    .all(|s| self.hybrid && frequent_event(&s.entry.event))
            })
        });
        // The last entry past the anchor is not a frequent one: its commit was cut before its
        // anchor.
        let anchor_cut = anchor_behind
            && lag
                .as_ref()
                .and_then(|l| l.last())
                .is_some_and(|s| !(self.hybrid && frequent_event(&s.entry.event)));
        if !anchor_ok && !anchor_behind {
            return Ok(Checked::Untrusted(format!(
                "the audit record disagrees with the TRE's anchor (record {}, TRE {})",
                header.audit_seq, anchor.seq
            )));
        }
        self.tail = entries
            .last()
            .map_or((0, [0; 32]), |s| (s.entry.seq, s.hash));
        if self.tail.0 > header.audit_seq {
            self.startup.push(format!(
                "audit entries {}..={} belong to a transaction that did not commit",
                header.audit_seq + 1,
                self.tail.0
            ));
        }
        self.header = header;
        if self.tre_sync_pending {
            self.sync_tre()?;
            self.startup
                .push("completed a transaction cut short after its commit point".into());
        } else if anchor_cut {
            self.set_anchor()?;
            self.startup.push(
                "completed a transaction cut short between the TRE's counter and its anchor".into(),
            );
        }
        if self.hybrid_sync_pending {
            self.sync_hybrid()?;
            self.startup
                .push("completed an AKA's commit cut short after its commit point".into());
        }
        if let Some(h) = hybrid.filter(|_| hybrid_note.is_some()) {
            // Recorded by a durable commit (below), which also puts every older header behind
            // the rollback counter.
            self.header.hybrid_counter = self.header.hybrid_counter.map(|_| h.value);
        }

        // The records.
        let mut repairs = Vec::new();
        let entries: Vec<(String, HeaderEntry)> = self
            .header
            .mcims
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, he) in entries {
            let checked = match self.check_record(&id, &he)? {
                Checked::Intact(rec) => match &rec.secrets {
                    Some(s) if !self.tre.secrets_present(s)? => Err((
                        "its key objects are missing from the TRE".to_string(),
                        self.tre.held_refs_of(s),
                    )),
                    _ => Ok(rec),
                },
                Checked::Untrusted(why) => {
                    let refs = self.unverified_refs(&id, &he);
                    Err((why, refs))
                }
            };
            match checked {
                Ok(mut rec) => {
                    if rec.state == McimState::Selected {
                        rec.state =
                            lifecycle::transition(rec.state, rec.blocked, LifecycleOp::EndSession)?;
                        repairs.push((rec.clone(), "session ended by restart".to_string()));
                    }
                    self.records.insert(id, rec);
                }
                Err((why, refs)) => {
                    let mut stub = tampered_stub(&id, he.version);
                    stub.left_in_tre = self.still_held(refs)?;
                    self.startup.push(format!("MCIM {id} blocked: {why}"));
                    repairs.push((stub, format!("integrity check failed: {why}; blocked")));
                }
            }
        }
        self.remove_stale_files();
        // A transaction that let go of TRE objects and was cut before destroying them.
        self.destroy_doomed();
        // Objects in the TRE that no record refers to and none doomed: reported, not
        // destroyed here (they may be the only copy of something, e.g. of an MCIM whose record
        // was tampered with); `mcimctl device orphans --destroy` destroys them.
        let orphans: Vec<String> = self.orphans()?.iter().map(hex::encode).collect();
        if !orphans.is_empty() {
            self.startup.push(format!(
                "TRE objects no MCIM refers to (kept; `mcimctl device orphans --destroy` destroys them): {}",
                orphans.join(", ")
            ));
        }
        for (rec, why) in repairs {
            let id = rec.id.clone();
            let event = if why.starts_with("integrity") {
                "integrity"
            } else {
                "lifecycle"
            };
            self.commit(vec![Change::Put(Box::new(rec))], event, Some(&id), why)?;
        }
        if let Some(note) = hybrid_note {
            self.startup.push(note.clone());
            self.commit(Vec::new(), "integrity", None, note)?;
        }
        Ok(Checked::Intact(()))
    }

    pub(super) fn check_header(&mut self, bytes: &[u8]) -> Result<Checked<Header>, RegistryError> {
        let text = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        let Some(nl) = text.iter().rposition(|b| *b == b'\n') else {
            return Ok(Checked::Untrusted(
                "the registry header is malformed".into(),
            ));
        };
        let (body, mac_hex) = (&text[..nl], &text[nl + 1..]);
        let mac = self.tre.integrity_mac(&sha256(&[HEADER_DOMAIN, body]))?;
        if !bool::from(hex::encode(mac).as_bytes().ct_eq(mac_hex)) {
            return Ok(Checked::Untrusted(
                "the registry header fails its integrity check".into(),
            ));
        }
        Ok(match serde_json::from_slice::<Header>(body) {
            Ok(h) => Checked::Intact(h),
            Err(e) => Checked::Untrusted(format!("the registry header does not parse: {e}")),
        })
    }

    pub(super) fn check_record(
        &mut self,
        id: &str,
        he: &HeaderEntry,
    ) -> Result<Checked<McimRecord>, RegistryError> {
        let path = self.dir.join(MCIM_DIR).join(record_file(id, he.version));
        let Some(bytes) = files::read_optional(&path).map_err(io)? else {
            return Ok(Checked::Untrusted("its record is missing".into()));
        };
        let mac = self.tre.integrity_mac(&sha256(&[RECORD_DOMAIN, &bytes]))?;
        if !bool::from(hex::encode(mac).as_bytes().ct_eq(he.mac.as_bytes())) {
            return Ok(Checked::Untrusted(
                "its record fails the integrity check".into(),
            ));
        }
        match serde_json::from_slice::<McimRecord>(&bytes) {
            Ok(r) if r.id == id && r.version == he.version => Ok(Checked::Intact(r)),
            Ok(_) => Ok(Checked::Untrusted(
                "its record names another MCIM or version".into(),
            )),
            Err(e) => Ok(Checked::Untrusted(format!(
                "its record does not parse: {e}"
            ))),
        }
    }

    pub(super) fn remove_stale_files(&mut self) {
        let Ok(dir) = std::fs::read_dir(self.dir.join(MCIM_DIR)) else {
            return;
        };
        for f in dir.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let live = self
                .header
                .mcims
                .iter()
                .any(|(id, he)| record_file(id, he.version) == name);
            if !live {
                let _ = std::fs::remove_file(f.path());
            }
        }
    }

    /// Advances the TRE counter and anchor to the committed header.
    pub(super) fn sync_tre(&mut self) -> Result<(), RegistryError> {
        let now = self.tre.advance_rollback_counter()?;
        if now != self.header.counter {
            self.lockdown = Some(format!(
                "the TRE counter moved to {now}, expected {}",
                self.header.counter
            ));
            return Err(RegistryError::Lockdown(
                self.lockdown.clone().unwrap_or_default(),
            ));
        }
        // The counter moved: only the anchor is left (never advance the counter twice).
        self.tre_sync_pending = false;
        self.anchor_pending = true;
        self.set_anchor()
    }

    /// Advances the TRE's hybrid counter to the committed header (an AKA's commit).
    fn sync_hybrid(&mut self) -> Result<(), RegistryError> {
        let now = self.tre.advance_hybrid_counter()?;
        if Some(now) != self.header.hybrid_counter {
            let why = format!(
                "the TRE's hybrid counter moved to {now}, expected {:?}",
                self.header.hybrid_counter
            );
            self.lockdown = Some(why.clone());
            return Err(RegistryError::Lockdown(why));
        }
        self.hybrid_sync_pending = false;
        Ok(())
    }

    /// Moves the TRE's audit anchor to the committed header's audit head.
    fn set_anchor(&mut self) -> Result<(), RegistryError> {
        let mut head = [0u8; 32];
        hex::decode_to_slice(&self.header.audit_head, &mut head)
            .map_err(|e| RegistryError::Encoding(format!("the header's audit head: {e}")))?;
        self.tre.set_audit_anchor(&AuditAnchor {
            seq: self.header.audit_seq,
            head,
        })?;
        self.anchor_pending = false;
        Ok(())
    }

    /// One durable transaction (see the module documentation for the order of writes).
    pub(super) fn commit(
        &mut self,
        changes: Vec<Change>,
        event: &str,
        mcim: Option<&str>,
        detail: String,
    ) -> Result<(), RegistryError> {
        self.commit_as(Commit::Durable, changes, event, mcim, detail)
    }

    /// One transaction advancing the counter `kind` names (a [`Commit::Frequent`] is durable
    /// on a TRE without a hybrid counter).
    pub(super) fn commit_as(
        &mut self,
        kind: Commit,
        changes: Vec<Change>,
        event: &str,
        mcim: Option<&str>,
        detail: String,
    ) -> Result<(), RegistryError> {
        if let Some(why) = &self.lockdown {
            return Err(RegistryError::Lockdown(why.clone()));
        }
        if self.tre_sync_pending {
            self.sync_tre()?;
        } else if self.anchor_pending {
            self.set_anchor()?;
        }
        if self.hybrid_sync_pending {
            self.sync_hybrid()?;
        }
        let frequent =
            kind == Commit::Frequent && self.hybrid && self.header.hybrid_counter.is_some();
        let mut header = self.header.clone();
        if !frequent && self.hybrid && header.hybrid_counter.is_none() {
            // A new or rehabilitated registry, or one from before the hybrid counter.
            header.hybrid_counter = self.tre.hybrid_counter()?.map(|h| h.value);
        }
        let mut records = Vec::new();
        for change in changes {
            match change {
                Change::Put(rec) => {
                    let mut rec = *rec;
                    rec.version = header.mcims.get(&rec.id).map_or(1, |h| h.version + 1);
                    let bytes = serde_json::to_vec_pretty(&rec)
                        .map_err(|e| RegistryError::Encoding(e.to_string()))?;
                    let path = self
                        .dir
                        .join(MCIM_DIR)
                        .join(record_file(&rec.id, rec.version));
                    let _ = std::fs::remove_file(&path);
                    files::write_new(&path, &bytes).map_err(io)?;
                    let mac = self.tre.integrity_mac(&sha256(&[RECORD_DOMAIN, &bytes]))?;
                    header.mcims.insert(
                        rec.id.clone(),
                        HeaderEntry {
                            version: rec.version,
                            mac: hex::encode(mac),
                        },
                    );
                    records.push(Change::Put(Box::new(rec)));
                }
                Change::Remove(id) => {
                    header.mcims.remove(&id);
                    if header.connectivity.as_deref() == Some(id.as_str()) {
                        header.connectivity = None;
                    }
                    records.push(Change::Remove(id));
                }
                Change::Connectivity(c) => header.connectivity = c,
                Change::Doom(refs) => {
                    for r in refs.iter().map(hex::encode) {
                        if !header.doomed.contains(&r) {
                            header.doomed.push(r);
                        }
                    }
                }
            }
        }

        let entry = AuditEntry {
            seq: self.tail.0 + 1,
            at: now(),
            event: event.into(),
            mcim: mcim.map(str::to_string),
            detail,
            prev: hex::encode(self.tail.1),
        };
        let (line, hash) = audit::seal(self.tre.as_mut(), &entry)?;
        files::append_durable(&self.dir.join(AUDIT_FILE), &line).map_err(io)?;
        self.tail = (entry.seq, hash);

        if frequent {
            header.hybrid_counter = self.header.hybrid_counter.map(|c| c + 1);
        } else {
            header.counter = self.header.counter + 1;
        }
        header.tpm_epoch = self.reset_epoch;
        header.audit_seq = entry.seq;
        header.audit_head = hex::encode(hash);
        let mut body = serde_json::to_vec_pretty(&header)
            .map_err(|e| RegistryError::Encoding(e.to_string()))?;
        let mac = self.tre.integrity_mac(&sha256(&[HEADER_DOMAIN, &body]))?;
        body.push(b'\n');
        body.extend_from_slice(hex::encode(mac).as_bytes());
        body.push(b'\n');
        files::write_atomic(&self.dir.join(HEADER_FILE), &body).map_err(io)?;

        // Committed: memory follows the disk, then the TRE follows.
        self.header = header;
        for c in records {
            match c {
                Change::Put(rec) => {
                    self.records.insert(rec.id.clone(), *rec);
                }
                Change::Remove(id) => {
                    self.records.remove(&id);
                }
                Change::Connectivity(_) | Change::Doom(_) => {}
            }
        }
        // A session's PIN lives exactly as long as its MCIM stays Selected.
        if let Some((id, _)) = &self.session_pin
            && self.records.get(id).map(|r| r.state) != Some(McimState::Selected)
        {
            self.session_pin = None;
        }
        self.remove_stale_files();
        if frequent {
            self.hybrid_sync_pending = true;
            self.sync_hybrid()?;
        } else {
            self.tre_sync_pending = true;
            self.sync_tre()?;
        }
        self.destroy_doomed();
        Ok(())
    }
}

impl Registry {
    /// What the TRE would hold for an MCIM according to its record file, read without
    /// trusting it (its check failed): none when it does not parse.
    fn unverified_refs(&self, id: &str, he: &HeaderEntry) -> Vec<Vec<u8>> {
        let path = self.dir.join(MCIM_DIR).join(record_file(id, he.version));
        files::read_optional(&path)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<McimRecord>(&b).ok())
            .and_then(|r| r.secrets)
            .map(|s| self.tre.held_refs_of(&s))
            .unwrap_or_default()
    }

    /// Of `refs`, those the TRE holds, hex: what an untrusted record may claim is checked
    /// against the TRE itself.
    fn still_held(&mut self, refs: Vec<Vec<u8>>) -> Result<Vec<String>, RegistryError> {
        if refs.is_empty() {
            return Ok(Vec::new());
        }
        let held = self.tre.held_secret_refs()?;
        Ok(refs
            .into_iter()
            .filter(|r| held.contains(r))
            .map(hex::encode)
            .collect())
    }
}

/// What is left of an MCIM whose record cannot be trusted: its id, Blocked (tampered).
pub(super) fn tampered_stub(id: &str, version: u64) -> McimRecord {
    McimRecord {
        id: id.to_string(),
        sho: String::new(),
        state: McimState::Blocked,
        blocked: Some(BlockReason::Tampered),
        secrets: None,
        constants: ConstantsRecord::from(&Constants::default()),
        sqn_profile: SqnProfile::default(),
        sqn: MsSqnState::new(&SqnProfile::default()),
        pin: None,
        expires_at: None,
        left_in_tre: Vec::new(),
        usim: Default::default(),
        version,
    }
}
