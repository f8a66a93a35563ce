//! The MCIM registry (TR 33.812 5.1.1.1 "an entry in the M2ME's registry"), with the lifecycle
//! from `mcim_core::lifecycle`, per-MCIM PINs, AKA through the TRE, and the audit record.
//!
//! State directory layout:
//!
//! ```text
//! header.json          JSON header, then a line with its TRE MAC (hex): the commit point
//! mcims/<id>.<v>.json  one file per MCIM version; its TRE MAC is in the header
//! audit.log            append-only audit chain (see [`audit`])
//! ```
//!
//! A transaction writes the new record files under new names, appends its audit entry,
//! atomically replaces the header (commit point), then advances the TRE's monotonic counter
//! and moves the audit anchor. At start (5.1.2.3 "integrity check ... at boot"):
//! - a header that fails its MAC, an audit chain that does not verify, or an anchor that
//!   disagrees puts the registry into **lockdown** (5.1.2.2): only status answers;
//! - a header older than the TRE counter is a **rollback** (an older copy of the directory)
//!   and is refused the same way;
//! - an MCIM record that fails its MAC, is missing, or is an older version becomes
//!   **Blocked (tampered)**, with the reason in the audit record;
//! - a header exactly one ahead of the counter is a transaction cut short after its commit
//!   point, and is completed.

pub mod audit;
pub(crate) mod files;
pub mod record;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mcim_core::aka::{Autn, Constants, DeviceResponse, MsSqnState, Rand, SqnProfile};
use mcim_core::lifecycle::{self, BlockReason, LifecycleError, LifecycleOp, McimState};
use mcim_core::tpm::kdf::sha256;
use subtle::ConstantTimeEq;

use crate::tre::{AkaChallenge, AuditAnchor, Tre, TreError, WrappedSecrets};
use audit::AuditEntry;
use record::{ConstantsRecord, Header, HeaderEntry, McimRecord, PIN_TRIES, PUK_TRIES, PinRecord};

const HEADER_FILE: &str = "header.json";
const AUDIT_FILE: &str = "audit.log";
const MCIM_DIR: &str = "mcims";
const FORMAT: u32 = 1;
const HEADER_DOMAIN: &[u8] = b"mcim-header-v1";
const RECORD_DOMAIN: &[u8] = b"mcim-record-v1";
const PIN_DOMAIN: &[u8] = b"mcim-pin-v1";

/// Why a registry operation was refused. Nothing changed unless the variant says so.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The TRE is in lockdown (5.1.2.2); only status answers.
    #[error("the TRE is in lockdown: {0}")]
    Lockdown(String),
    /// No such MCIM.
    #[error("no MCIM {0}")]
    NotFound(String),
    /// An MCIM with this id exists.
    #[error("MCIM {0} is already installed")]
    AlreadyInstalled(String),
    /// The lifecycle forbids it.
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    /// Another MCIM is in a session: at most one MCIM is active at any time (5.1.3.7.2).
    #[error("MCIM {0} is selected: end its session first (one active MCIM at a time)")]
    AnotherSelected(String),
    /// The PIN was wrong; `tries_left` remain (0: the MCIM is now Blocked).
    #[error("wrong PIN, {tries_left} tries left")]
    WrongPin {
        /// tries left
        tries_left: u8,
    },
    /// The PUK was wrong.
    #[error("wrong PUK, {tries_left} tries left")]
    WrongPuk {
        /// tries left
        tries_left: u8,
    },
    /// The request is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The caller's authorisation (a rehabilitation token) was refused.
    #[error("not authorised: {0}")]
    Unauthorised(String),
    /// The TRE failed or refused.
    #[error(transparent)]
    Tre(#[from] TreError),
    /// The state directory could not be read or written.
    #[error("state directory: {0}")]
    Io(String),
    /// A record could not be encoded or decoded (JSON, hex).
    #[error("registry encoding: {0}")]
    Encoding(String),
    /// The TRE was initialised but the registry could not be opened over it; `tred` must be
    /// restarted.
    #[error("the registry could not be opened ({0}); restart tred")]
    EngineBroken(String),
}

fn io(e: std::io::Error) -> RegistryError {
    RegistryError::Io(e.to_string())
}

/// What an MCIM needs to be installed (5.1.3.6.2 steps 12-13).
#[derive(Debug)]
pub struct InstallRequest {
    /// The operational IMSI, the registry key.
    pub imsi: mcim_core::identity::Imsi,
    /// The issuing SHO.
    pub sho: String,
    /// K and OPc wrapped for this TRE.
    pub wrapped: WrappedSecrets,
    /// MILENAGE constants.
    pub constants: Constants,
    /// SQN scheme.
    pub sqn_profile: SqnProfile,
    /// Application PIN and PUK, if the MCIM has them.
    pub pin: Option<(String, String)>,
}

/// The registry's answer to "status" (always available, even in lockdown).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Why the TRE is in lockdown, if it is.
    pub lockdown: Option<String>,
    /// Number of MCIMs.
    pub mcims: usize,
    /// Last committed audit sequence number.
    pub audit_seq: u64,
    /// What the start-up check found and did (tampered MCIMs, completed transactions).
    pub startup: Vec<String>,
}

/// The result of checking the audit record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditVerdict {
    /// The chain is intact and anchored in the TRE.
    pub ok: bool,
    /// Entries checked.
    pub entries: u64,
    /// The first entry that fails, when not ok.
    pub first_bad_seq: u64,
    /// For people.
    pub detail: String,
}

enum Change {
    Put(Box<McimRecord>),
    Remove(String),
    Connectivity(Option<String>),
}

/// The registry over a state directory and a TRE.
pub struct Registry {
    dir: PathBuf,
    tre: Box<dyn Tre>,
    header: Header,
    records: BTreeMap<String, McimRecord>,
    /// The last audit entry in the file (committed or not): what the next one chains to.
    tail: (u64, [u8; 32]),
    /// The TRE counter and anchor lag one committed transaction behind.
    tre_sync_pending: bool,
    lockdown: Option<String>,
    startup: Vec<String>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("dir", &self.dir)
            .field("mcims", &self.records.len())
            .field("lockdown", &self.lockdown)
            .finish_non_exhaustive()
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn record_file(id: &str, version: u64) -> String {
    format!("{id}.{version}.json")
}

impl Registry {
    /// Opens (or creates) the registry in `dir` and runs the start-up integrity check. A
    /// registry in lockdown opens successfully; see [`Registry::status`].
    pub fn open(dir: &Path, tre: Box<dyn Tre>) -> Result<Self, RegistryError> {
        std::fs::create_dir_all(dir.join(MCIM_DIR)).map_err(io)?;
        restrict(dir)?;
        let mut reg = Self {
            dir: dir.to_path_buf(),
            tre,
            header: Header::default(),
            records: BTreeMap::new(),
            tail: (0, [0; 32]),
            tre_sync_pending: false,
            lockdown: None,
            startup: Vec::new(),
        };
        if let Err(reason) = reg.load()? {
            reg.lockdown = Some(reason);
        }
        Ok(reg)
    }

    /// Loads and checks everything; `Ok(Err(reason))` means lockdown.
    fn load(&mut self) -> Result<Result<(), String>, RegistryError> {
        let header_bytes = files::read_optional(&self.dir.join(HEADER_FILE)).map_err(io)?;
        let audit_bytes = files::read_optional(&self.dir.join(AUDIT_FILE)).map_err(io)?;
        let anchor = self.tre.audit_anchor()?;
        let counter = self.tre.rollback_counter()?;
        let Some(header_bytes) = header_bytes else {
            if audit_bytes.is_some() || anchor.seq > 0 {
                return Ok(Err("the registry header is missing".into()));
            }
            // A new registry.
            self.header = Header {
                format: FORMAT,
                counter,
                audit_head: hex::encode([0u8; 32]),
                ..Header::default()
            };
            self.commit(Vec::new(), "registry", None, "registry created".into())?;
            return Ok(Ok(()));
        };

        // The header: MAC, then the counter (rollback).
        let header = match self.check_header(&header_bytes)? {
            Ok(h) => h,
            Err(why) => return Ok(Err(why)),
        };
        if header.counter < counter {
            return Ok(Err(format!(
                "rollback: the state directory is older than the TRE (header counter {}, TRE counter {counter})",
                header.counter
            )));
        }
        if header.counter > counter + 1 {
            return Ok(Err(format!(
                "the header counter {} is ahead of the TRE counter {counter}",
                header.counter
            )));
        }
        self.tre_sync_pending = header.counter == counter + 1;

        // The audit chain.
        let entries = match audit::verify(self.tre.as_mut(), audit_bytes.as_deref().unwrap_or(&[]))
        {
            Ok(e) => e,
            Err(audit::VerifyError::Chain(e)) => {
                return Ok(Err(format!("audit chain broken: {e}")));
            }
            Err(audit::VerifyError::Tre(e)) => return Err(e.into()),
        };
        let committed = entries
            .iter()
            .find(|s| s.entry.seq == header.audit_seq)
            .map(|s| s.hash);
        if committed.map(hex::encode).as_deref() != Some(header.audit_head.as_str()) {
            return Ok(Err(format!(
                "the audit record lacks committed entry {}",
                header.audit_seq
            )));
        }
        let anchor_ok =
            anchor.seq == header.audit_seq && hex::encode(anchor.head) == header.audit_head;
        let anchor_one_behind = self.tre_sync_pending
            && entries
                .iter()
                .find(|s| s.entry.seq + 1 == header.audit_seq)
                .is_some_and(|s| anchor.seq == s.entry.seq && anchor.head == s.hash);
        if !anchor_ok && !anchor_one_behind {
            return Ok(Err(format!(
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
                Ok(rec) => match &rec.secrets {
                    Some(s) if !self.tre.secrets_present(s)? => {
                        Err("its key objects are missing from the TRE".to_string())
                    }
                    _ => Ok(rec),
                },
                Err(why) => Err(why),
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
                Err(why) => {
                    let stub = tampered_stub(&id, he.version);
                    self.startup.push(format!("MCIM {id} blocked: {why}"));
                    repairs.push((stub, format!("integrity check failed: {why}; blocked")));
                }
            }
        }
        self.remove_stale_files();
        // Objects in the TRE that no record refers to: reported, never deleted (they may be
        // the only copy of something; an operator decides).
        let referenced: Vec<&[u8]> = self
            .records
            .values()
            .filter_map(|r| r.secrets.as_ref())
            .flat_map(|s| [s.k.as_slice(), s.opc.as_slice()])
            .collect();
        let orphans: Vec<String> = self
            .tre
            .held_secret_refs()?
            .into_iter()
            .filter(|id| !referenced.contains(&id.as_slice()))
            .map(hex::encode)
            .collect();
        if !orphans.is_empty() {
            self.startup.push(format!(
                "TRE objects no MCIM refers to (kept, not deleted): {}",
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
        Ok(Ok(()))
    }

    fn check_header(&mut self, bytes: &[u8]) -> Result<Result<Header, String>, RegistryError> {
        let text = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        let Some(nl) = text.iter().rposition(|b| *b == b'\n') else {
            return Ok(Err("the registry header is malformed".into()));
        };
        let (body, mac_hex) = (&text[..nl], &text[nl + 1..]);
        let mac = self.tre.integrity_mac(&sha256(&[HEADER_DOMAIN, body]))?;
        if !bool::from(hex::encode(mac).as_bytes().ct_eq(mac_hex)) {
            return Ok(Err("the registry header fails its integrity check".into()));
        }
        Ok(serde_json::from_slice::<Header>(body)
            .map_err(|e| format!("the registry header does not parse: {e}")))
    }

    fn check_record(
        &mut self,
        id: &str,
        he: &HeaderEntry,
    ) -> Result<Result<McimRecord, String>, RegistryError> {
        let path = self.dir.join(MCIM_DIR).join(record_file(id, he.version));
        let Some(bytes) = files::read_optional(&path).map_err(io)? else {
            return Ok(Err("its record is missing".into()));
        };
        let mac = self.tre.integrity_mac(&sha256(&[RECORD_DOMAIN, &bytes]))?;
        if !bool::from(hex::encode(mac).as_bytes().ct_eq(he.mac.as_bytes())) {
            return Ok(Err("its record fails the integrity check".into()));
        }
        match serde_json::from_slice::<McimRecord>(&bytes) {
            Ok(r) if r.id == id && r.version == he.version => Ok(Ok(r)),
            Ok(_) => Ok(Err("its record names another MCIM or version".into())),
            Err(e) => Ok(Err(format!("its record does not parse: {e}"))),
        }
    }

    fn remove_stale_files(&mut self) {
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
    fn sync_tre(&mut self) -> Result<(), RegistryError> {
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
        let mut head = [0u8; 32];
        hex::decode_to_slice(&self.header.audit_head, &mut head)
            .map_err(|e| RegistryError::Encoding(format!("the header's audit head: {e}")))?;
        self.tre.set_audit_anchor(&AuditAnchor {
            seq: self.header.audit_seq,
            head,
        })?;
        self.tre_sync_pending = false;
        Ok(())
    }

    /// One transaction (see the module documentation for the order of writes).
    fn commit(
        &mut self,
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
        }
        let mut header = self.header.clone();
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

        header.counter = self.header.counter + 1;
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
                Change::Connectivity(_) => {}
            }
        }
        self.remove_stale_files();
        self.tre_sync_pending = true;
        self.sync_tre()
    }

    fn live(&self) -> Result<(), RegistryError> {
        match &self.lockdown {
            Some(why) => Err(RegistryError::Lockdown(why.clone())),
            None => Ok(()),
        }
    }

    fn record(&self, id: &str) -> Result<&McimRecord, RegistryError> {
        self.live()?;
        self.records
            .get(id)
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))
    }

    /// Status; answers even in lockdown.
    pub fn status(&self) -> Status {
        Status {
            lockdown: self.lockdown.clone(),
            mcims: self.records.len(),
            audit_seq: self.header.audit_seq,
            startup: self.startup.clone(),
        }
    }

    /// Every MCIM.
    pub fn list(&self) -> Result<Vec<&McimRecord>, RegistryError> {
        self.live()?;
        Ok(self.records.values().collect())
    }

    /// One MCIM.
    pub fn get(&self, id: &str) -> Result<&McimRecord, RegistryError> {
        self.record(id)
    }

    /// The TRE, for what the registry does not wrap (device identity, quotes).
    pub fn tre(&mut self) -> &mut dyn Tre {
        self.tre.as_mut()
    }

    /// Gives the TRE back (the registry is closed).
    pub fn into_tre(self) -> Box<dyn Tre> {
        self.tre
    }

    /// Installs an MCIM (5.1.3.6.2 step 13): K and OPc go into the TRE, the record is
    /// Installed.
    pub fn install(&mut self, req: InstallRequest) -> Result<(), RegistryError> {
        self.live()?;
        let id = req.imsi.as_str().to_string();
        if self.records.contains_key(&id) {
            return Err(RegistryError::AlreadyInstalled(id));
        }
        req.sqn_profile.validate().map_err(TreError::from)?;
        let pin = match &req.pin {
            Some((pin, puk)) => Some(self.new_pin_record(&id, pin, puk)?),
            None => None,
        };
        let secrets = self.tre.import_mcim_secrets(&req.wrapped)?;
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
            version: 0,
        };
        self.commit(
            vec![Change::Put(Box::new(rec))],
            "install",
            Some(&id),
            format!("installed from SHO {} (AKA {mode:?})", req.sho),
        )
    }

    /// A lifecycle operation other than Select (see [`Registry::select`]). Unblocking here is
    /// for MCIMs blocked on request; a PIN-blocked MCIM needs [`Registry::unblock_pin`].
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
            }
            Change::Put(Box::new(next))
        };
        changes.push(change);
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
        if rec.pin.is_some() {
            let pin =
                pin.ok_or_else(|| RegistryError::BadRequest("this MCIM needs its PIN".into()))?;
            self.verify_pin(id, pin)?;
        }
        let mut next = self.record(id)?.clone();
        next.state = McimState::Selected;
        self.commit(
            vec![Change::Put(Box::new(next))],
            "lifecycle",
            Some(id),
            "Activated -> Selected".into(),
        )
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

    fn pin_tag(&mut self, id: &str, kind: &str, value: &str) -> Result<[u8; 32], RegistryError> {
        Ok(self.tre.integrity_mac(&sha256(&[
            PIN_DOMAIN,
            kind.as_bytes(),
            &[0],
            id.as_bytes(),
            &[0],
            value.as_bytes(),
        ]))?)
    }

    fn new_pin_record(
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

    /// AKA with the selected MCIM (TS 33.102 6.3.3) inside the TRE; the SQN state is committed
    /// on success, and every outcome is audited.
    pub fn authenticate(
        &mut self,
        id: &str,
        rand: &Rand,
        autn: &Autn,
    ) -> Result<DeviceResponse, RegistryError> {
        let rec = self.record(id)?.clone();
        if rec.state != McimState::Selected {
            return Err(RegistryError::BadRequest(format!(
                "AKA needs a selected MCIM; {id} is {:?}",
                rec.state
            )));
        }
        let secrets = rec
            .secrets
            .clone()
            .ok_or_else(|| RegistryError::BadRequest("the MCIM has no credentials".into()))?;
        let constants = rec
            .constants
            .to_constants()
            .map_err(RegistryError::BadRequest)?;
        let mut sqn = rec.sqn.clone();
        let ch = AkaChallenge {
            constants: &constants,
            profile: &rec.sqn_profile,
            rand,
            autn,
        };
        match self.tre.authenticate(&secrets, &mut sqn, &ch) {
            Ok(resp @ DeviceResponse::Success { .. }) => {
                let mut next = rec;
                next.sqn = sqn;
                self.commit(
                    vec![Change::Put(Box::new(next))],
                    "aka",
                    Some(id),
                    "authenticated".into(),
                )?;
                Ok(resp)
            }
            Ok(resp @ DeviceResponse::SyncFailure { .. }) => {
                self.commit(
                    Vec::new(),
                    "aka",
                    Some(id),
                    "synchronisation failure: AUTS sent".into(),
                )?;
                Ok(resp)
            }
            Err(TreError::MacFailure) => {
                self.commit(
                    Vec::new(),
                    "aka",
                    Some(id),
                    "MAC failure: network not authenticated".into(),
                )?;
                Err(TreError::MacFailure.into())
            }
            Err(e) => Err(e.into()),
        }
    }

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
                Some(he) => self.check_record(id, he)?,
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

    /// The whole audit record, verified entry by entry.
    pub fn audit(&mut self) -> Result<Vec<AuditEntry>, RegistryError> {
        Ok(self.audit_chain()?.into_iter().map(|s| s.entry).collect())
    }

    /// The audit record with each entry's hash, verified entry by entry.
    pub fn audit_chain(&mut self) -> Result<Vec<audit::StoredEntry>, RegistryError> {
        let bytes = files::read_optional(&self.dir.join(AUDIT_FILE))
            .map_err(io)?
            .unwrap_or_default();
        audit::verify(self.tre.as_mut(), &bytes).map_err(|e| match e {
            audit::VerifyError::Tre(t) => RegistryError::Tre(t),
            audit::VerifyError::Chain(c) => {
                RegistryError::Lockdown(format!("audit chain broken: {c}"))
            }
        })
    }

    /// Checks the audit record against the TRE's anchor (`mcimctl audit verify`). Answers
    /// in lockdown too: it is how an operator sees why.
    pub fn verify_audit(&mut self) -> Result<AuditVerdict, RegistryError> {
        let bytes = files::read_optional(&self.dir.join(AUDIT_FILE))
            .map_err(io)?
            .unwrap_or_default();
        let entries = match audit::verify(self.tre.as_mut(), &bytes) {
            Ok(e) => e,
            Err(audit::VerifyError::Tre(t)) => return Err(t.into()),
            Err(audit::VerifyError::Chain(c)) => {
                let seq = match c {
                    audit::ChainError::BadMac { seq } | audit::ChainError::Broken { seq } => seq,
                    audit::ChainError::Malformed { .. } => 0,
                };
                return Ok(AuditVerdict {
                    ok: false,
                    entries: 0,
                    first_bad_seq: seq,
                    detail: c.to_string(),
                });
            }
        };
        let anchor = self.tre.audit_anchor()?;
        let anchored = entries
            .iter()
            .find(|e| e.entry.seq == anchor.seq)
            .is_some_and(|e| e.hash == anchor.head);
        let n = entries.len() as u64;
        Ok(if anchored {
            AuditVerdict {
                ok: true,
                entries: n,
                first_bad_seq: 0,
                detail: format!("{n} entries; entry {} is anchored in the TRE", anchor.seq),
            }
        } else {
            AuditVerdict {
                ok: false,
                entries: n,
                first_bad_seq: anchor.seq,
                detail: format!(
                    "the TRE anchors entry {}, which the record does not hold",
                    anchor.seq
                ),
            }
        })
    }
}

/// What is left of an MCIM whose record cannot be trusted: its id, Blocked (tampered).
fn tampered_stub(id: &str, version: u64) -> McimRecord {
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
        version,
    }
}

fn check_digits(what: &str, v: &str, min: usize, max: usize) -> Result<(), RegistryError> {
    if v.len() < min || v.len() > max || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RegistryError::BadRequest(format!(
            "{what} must be {min} to {max} digits"
        )));
    }
    Ok(())
}

#[cfg(unix)]
fn restrict(dir: &Path) -> Result<(), RegistryError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)
}

#[cfg(not(unix))]
fn restrict(_dir: &Path) -> Result<(), RegistryError> {
    Ok(())
}
