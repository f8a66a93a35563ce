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
//!
//! On a TRE with a hybrid counter (a TPM: `Tre::hybrid_counter`), an AKA's commit (its SQN
//! state and audit entry, [`Commit::Frequent`]) advances the hybrid counter instead, and
//! moves no anchor, so an AKA writes no NV. The header carries both counters; the checks above
//! apply to each, except that a hybrid counter ahead of the header by a jump a restart without
//! TPM2_Shutdown explains is accepted (and audited): see `docs/architecture.md` §3 "NV wear".
//!
//! One file per job: `store.rs` (loading, the start-up checks and the one commit path),
//! `transitions.rs` (install, lifecycle operations, selection, connectivity), `pin.rs` (PIN
//! and PUK), `aka.rs` (AKA with the selected MCIM), `rehabilitation.rs` (leaving lockdown),
//! `audit_log.rs` (reading and verifying the audit record; the entry format is [`audit`]),
//! `doomed.rs` (destroying what the TRE holds for secrets no record refers to),
//! `record.rs` (the files' formats), `files.rs` (atomic writes).

mod aka;
pub mod audit;
mod audit_log;
mod doomed;
pub(crate) mod files;
mod pin;
pub mod record;
mod rehabilitation;
mod store;
mod transitions;
mod usim;

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

/// Which counter a transaction advances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Commit {
    /// The rollback counter and the audit anchor: every transaction but an AKA's.
    Durable,
    /// The hybrid counter alone, when the TRE has one: the SQN state and audit entry of an AKA,
    /// committed after every authentication.
    Frequent,
}

/// The audit event of an AKA.
const AKA_EVENT: &str = "aka";
/// The audit event of a UE's update of a USIM file (`usim.rs`).
const USIM_EVENT: &str = "usim";

/// The events committed with [`Commit::Frequent`] (an AKA's SQN, a UE's file update): the
/// only entries that may lie past the TRE's audit anchor, which a frequent commit does not
/// move.
fn frequent_event(event: &str) -> bool {
    event == AKA_EVENT || event == USIM_EVENT
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
    /// When the credential stops being valid, if it has a lifetime.
    pub expires_at: Option<u64>,
    /// The USIM's data from the package (TS 31.102); default: the card's defaults.
    pub usim: record::UsimRecord,
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
    /// TRE objects to destroy once committed (see `Header::doomed`).
    Doom(Vec<Vec<u8>>),
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
    /// The counter caught up, the anchor still lags (its write failed).
    anchor_pending: bool,
    /// The TRE's hybrid counter lags one committed AKA behind.
    hybrid_sync_pending: bool,
    /// The TRE has a hybrid counter (read at load): AKA commits advance it, not the
    /// rollback counter, and move no anchor.
    hybrid: bool,
    /// The TRE's reset epoch read at load, written into every header.
    reset_epoch: Option<crate::tre::ResetEpoch>,
    /// The selected MCIM's PIN while its session lasts, when its objects open only with it
    /// (`PinRecord::in_tre`): what the AKA's loads need. Dropped (zeroized) when the MCIM
    /// leaves Selected.
    session_pin: Option<(String, zeroize::Zeroizing<Vec<u8>>)>,
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

/// An id as an error names it: a caller's megabyte-long id is not echoed back whole.
fn shown_id(id: &str) -> String {
    const MAX: usize = 64;
    if id.chars().count() <= MAX {
        return id.to_string();
    }
    let head: String = id.chars().take(MAX).collect();
    format!("{head}... ({} octets)", id.len())
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
            anchor_pending: false,
            hybrid_sync_pending: false,
            hybrid: false,
            reset_epoch: None,
            session_pin: None,
            lockdown: None,
            startup: Vec::new(),
        };
        if let store::Checked::Untrusted(reason) = reg.load()? {
            reg.lockdown = Some(reason);
        }
        Ok(reg)
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
            .ok_or_else(|| RegistryError::NotFound(shown_id(id)))
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
