//! The TPM 2.0 backend of [`Tre`](super::Tre), over tss-esapi.
//!
//! Objects it keeps in the TPM (the tpm2-tools witness sees them with
//! `tpm2_getcap handles-persistent` and `tpm2_nvreadpublic`):
//!
//! | object | where | template |
//! | --- | --- | --- |
//! | storage key | persistent [`STORAGE_HANDLE`] | ECC P-256, restricted decrypt, AES-128-CFB (the parent MCIM secrets are imported under) |
//! | attestation key (AK) | persistent [`AK_HANDLE`] | ECC P-256, restricted sign, ECDSA-SHA256 |
//! | TLS client key | persistent [`TLS_HANDLE`] | ECC P-256, unrestricted sign, ECDSA-SHA256 |
//! | device identity | NV index [`NV_IDENTITY`] | owner read/write; JSON of the identity and the storage key's name |
//!
//! The identity record carries the storage key's name, so that a TPM whose owner hierarchy
//! was cleared (new keys) is detected rather than silently re-keyed.

mod integrity;
mod keys;
mod mcim;
mod nv;
mod quote;

pub use integrity::{NV_AUDIT_ANCHOR, NV_COUNTER};
pub use quote::MAX_NONCE;

use super::UnwrapScheme;
use super::{
    AkaChallenge, AkaExecution, AuditAnchor, Capabilities, DevicePublic, InitOutcome,
    ProtectedSecrets, Tre, TreError, TreKind, WrappedSecrets,
};
use mcim_core::aka::{DeviceResponse, MsSqnState};
use mcim_core::identity::DeviceIdentity;
use mcim_core::tpm::attest::TpmQuote;
use mcim_core::tpm::policy::PcrSelection;
use std::cell::Cell;
use std::str::FromStr;
use tss_esapi::constants::CapabilityType;
use tss_esapi::constants::tss::{TPM2_LOADED_SESSION_FIRST, TPM2_TRANSIENT_FIRST};
use tss_esapi::handles::{KeyHandle, ObjectHandle, TpmHandle};
use tss_esapi::structures::CapabilityData;
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::{Context, constants::CommandCode};

/// Persistent handle of the storage key.
pub const STORAGE_HANDLE: u32 = 0x8100_0100;
/// Persistent handle of the attestation key.
pub const AK_HANDLE: u32 = 0x8100_0101;
/// Persistent handle of the TLS client key.
pub const TLS_HANDLE: u32 = 0x8100_0102;
/// NV index of the device identity record.
pub const NV_IDENTITY: u32 = 0x0150_0100;

/// How to reach the TPM.
#[derive(Clone, Debug)]
pub struct TpmConfig {
    /// A TCTI string: `device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`, `tabrmd:`.
    pub tcti: String,
}

/// A TPM 2.0 as the device's TRE.
pub struct TpmTre {
    ctx: Context,
    caps: Capabilities,
    /// The ESYS handle of the storage key, opened on first use.
    storage: Option<KeyHandle>,
    /// The integrity key, created on first use.
    integrity: Option<KeyHandle>,
    /// ESYS handles of mcim's NV indices (counter, audit anchor), opened on first use.
    nv: std::collections::HashMap<u32, tss_esapi::handles::NvIndexHandle>,
    /// The salted session that carries secrets across the bus, started on first use.
    salted: Option<tss_esapi::interface_types::session_handles::AuthSession>,
    /// Parameter encryption on the bus (off only for the benchmark's baseline).
    bus_encryption: bool,
    /// TPM commands issued by mcim on this context.
    commands: Cell<u64>,
    /// Of those, the ones that write the TPM's NV memory (NV_DefineSpace, NV_Increment,
    /// NV_Write, EvictControl): what wears NV out and what real TPMs rate-limit.
    nv_writes: Cell<u64>,
    /// MAX_ORDERLY_COUNT, read on first use of the hybrid counter.
    orderly_mask: Option<u64>,
    /// The TPM's reset epoch, read on first use (`integrity.rs`).
    reset_epoch: Option<crate::tre::ResetEpoch>,
}

impl std::fmt::Debug for TpmTre {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmTre")
            .field("caps", &self.caps)
            .finish_non_exhaustive()
    }
}

/// Maps a tss-esapi error of `command` to a [`TreError`].
pub(crate) fn cmd(command: &'static str) -> impl Fn(tss_esapi::Error) -> TreError {
    move |e| TreError::Command {
        command,
        detail: e.to_string(),
    }
}

impl TpmTre {
    /// Opens the TPM, flushes transient objects left by earlier clients (swtpm has no
    /// resource manager: TOOLCHAIN gotcha 1), and reads its capabilities.
    pub fn open(config: &TpmConfig) -> Result<Self, TreError> {
        let unavailable = |detail: String| TreError::Unavailable {
            target: config.tcti.clone(),
            detail,
        };
        let tcti = TctiNameConf::from_str(&config.tcti).map_err(|e| unavailable(e.to_string()))?;
        let mut ctx = Context::new(tcti).map_err(|e| unavailable(e.to_string()))?;
        flush_transients(&mut ctx).map_err(|e| never_started(e, &config.tcti))?;
        let caps = read_capabilities(&mut ctx)?;
        Ok(Self {
            ctx,
            caps,
            storage: None,
            integrity: None,
            salted: None,
            bus_encryption: true,
            nv: std::collections::HashMap::new(),
            commands: Cell::new(0),
            nv_writes: Cell::new(0),
            orderly_mask: None,
            reset_epoch: None,
        })
    }
}

impl TpmTre {
    /// Treats the TPM as lacking TPM2_EncryptDecrypt2 (`tpm_aka = "sealed"`): K must arrive
    /// as sealed data and AKA runs with K unsealed into zeroized host memory; the capabilities
    /// (and so the evidence the PVA sees) say so.
    pub fn with_sealed_k_only(mut self) -> Self {
        self.caps.encrypt_decrypt2 = false;
        self.caps.aka_execution = AkaExecution::UnsealedInHost;
        self
    }

    /// Runs every command with a plain password session, so that secrets cross the TPM bus in
    /// clear: the **benchmark's baseline** for the cost of bus encryption, and the control of
    /// the test that records the bus. Never reachable from `tred`'s configuration.
    #[doc(hidden)]
    pub fn without_bus_encryption_for_baseline(mut self) -> Self {
        self.bus_encryption = false;
        self
    }

    /// TPM commands mcim issued on this context so far (the benchmark and the tests read it).
    pub fn commands_issued(&self) -> u64 {
        self.commands.get()
    }

    /// Commands mcim issued on this context that write NV (see `nv_writes`).
    pub fn nv_writes_issued(&self) -> u64 {
        self.nv_writes.get()
    }

    /// Counts `n` NV-writing commands about to be issued (also counted by [`TpmTre::count`]).
    pub(crate) fn count_nv_write(&self, n: u64) {
        self.nv_writes.set(self.nv_writes.get() + n);
    }

    /// Counts `n` TPM commands about to be issued.
    pub(crate) fn count(&self, n: u64) {
        self.commands.set(self.commands.get() + n);
    }

    /// Drops the cached ESYS handles. ESYS hands out one ESYS_TR per TPM handle, so when
    /// `keys` or `nv` (whose NV listing opens and closes every index) close a handle, any
    /// copy cached here dies with it. Called after every such call.
    fn forget_handles(&mut self) {
        self.storage = None;
        self.nv.clear();
    }

    /// The storage key (the parent of imported MCIM secrets), opened once per context.
    pub(crate) fn storage_key(&mut self) -> Result<KeyHandle, TreError> {
        if let Some(h) = self.storage {
            return Ok(h);
        }
        self.count(1);
        let h = keys::open_persistent(&mut self.ctx, STORAGE_HANDLE)?
            .ok_or(TreError::NotInitialised)?;
        let h = KeyHandle::from(h);
        self.storage = Some(h);
        Ok(h)
    }
}

impl TpmTre {
    /// Supply-time initialisation; see [`Tre::init_device`].
    fn init_device_once(&mut self, identity: &DeviceIdentity) -> Result<InitOutcome, TreError> {
        let stored = nv::read_identity(&mut self.ctx)?;
        let existing_storage = keys::storage_name_if_present(&mut self.ctx)?;
        match (&stored, &existing_storage) {
            (Some(rec), Some(name)) => {
                if rec.storage_name != *name {
                    return Err(TreError::Mismatch(
                        "the storage key differs from the one recorded at supply time (was the TPM cleared?)".into(),
                    ));
                }
                if rec.identity != *identity {
                    return Err(TreError::AlreadyInitialised(format!(
                        "device {} with PCID {}",
                        rec.identity.device_id, rec.identity.pcid
                    )));
                }
            }
            (Some(_), None) => {
                return Err(TreError::Mismatch(
                    "an identity is recorded but the device keys are gone (was the TPM cleared?)"
                        .into(),
                ));
            }
            _ => {}
        }
        self.forget_handles();
        let made_persistent = keys::ensure_all(&mut self.ctx)?;
        self.count_nv_write(made_persistent);
        let created_keys = made_persistent > 0;
        let public = self.device_public()?;
        let storage_name = keys::storage_name_if_present(&mut self.ctx)?.ok_or(
            TreError::Mismatch("storage key missing right after creation".into()),
        )?;
        self.ensure_anchors()?;
        let created_identity = stored.is_none();
        if created_identity {
            // TPM2_NV_DefineSpace and TPM2_NV_Write.
            self.count_nv_write(2);
            nv::write_identity(
                &mut self.ctx,
                &nv::IdentityRecord {
                    identity: identity.clone(),
                    storage_name,
                },
            )?;
        }
        Ok(InitOutcome {
            created: created_keys || created_identity,
            identity: identity.clone(),
            public,
        })
    }
}

/// Whether a persistent object or an NV index is at `raw` (TPM2_GetCapability(TPM_CAP_HANDLES)).
/// Asking before opening keeps ESYS from logging an ERROR for every handle that is, as
/// expected, absent (a device before supply, an index not defined yet).
pub(crate) fn handle_present(ctx: &mut Context, raw: u32) -> Result<bool, TreError> {
    let (data, _) = ctx
        .get_capability(CapabilityType::Handles, raw, 1)
        .map_err(cmd("TPM2_GetCapability(handles)"))?;
    Ok(match data {
        CapabilityData::Handles(list) => list.iter().any(|h| u32::from(*h) == raw),
        _ => false,
    })
}

/// The SHA-256 PCR selection as tss-esapi wants it: the slots and the selection list.
pub(crate) fn pcr_selection_list(
    sel: &mcim_core::tpm::policy::PcrSelection,
) -> Result<
    (
        Vec<tss_esapi::structures::PcrSlot>,
        tss_esapi::structures::PcrSelectionList,
    ),
    TreError,
> {
    let slots = sel
        .indices()
        .iter()
        .map(|&i| tss_esapi::structures::PcrSlot::try_from(1u32 << i).map_err(cmd("PCR slot")))
        .collect::<Result<Vec<_>, _>>()?;
    let list = tss_esapi::structures::PcrSelectionList::builder()
        .with_selection(
            tss_esapi::interface_types::algorithm::HashingAlgorithm::Sha256,
            &slots,
        )
        .build()
        .map_err(cmd("PCR selection"))?;
    Ok((slots, list))
}

/// The first command's refusal by a TPM that was never sent TPM2_Startup, with what to do.
fn never_started(e: TreError, tcti: &str) -> TreError {
    let text = e.to_string();
    if !text.contains("TPM2_Startup") {
        return e;
    }
    TreError::Unavailable {
        target: tcti.to_string(),
        detail: format!(
            "{text}: the TPM was never started. A swtpm needs `--flags not-need-init,startup-clear`, \
             or send TPM2_Startup once: `TPM2TOOLS_TCTI={tcti} tpm2_startup -c`; a kernel TPM is \
             started by the firmware"
        ),
    }
}

fn flush_transients(ctx: &mut Context) -> Result<(), TreError> {
    let (data, _) = ctx
        .get_capability(CapabilityType::Handles, TPM2_TRANSIENT_FIRST, 16)
        .map_err(cmd("TPM2_GetCapability(handles)"))?;
    if let CapabilityData::Handles(list) = data {
        for h in list.iter() {
            if let TpmHandle::Transient(_) = h {
                let obj: ObjectHandle = ctx
                    .execute_without_session(|c| c.tr_from_tpm_public(*h))
                    .map_err(cmd("Esys_TR_FromTPMPublic"))?;
                ctx.flush_context(obj).map_err(cmd("TPM2_FlushContext"))?;
            }
        }
    }
    // Sessions too: a daemon killed with SIGKILL leaves its long-lived session loaded, and a
    // TPM without a resource manager runs out of session slots after a few (TPM_RC_SESSION_
    // MEMORY at the next start). Best effort: a session that cannot be flushed is reported.
    let (data, _) = ctx
        .get_capability(CapabilityType::Handles, TPM2_LOADED_SESSION_FIRST, 16)
        .map_err(cmd("TPM2_GetCapability(sessions)"))?;
    if let CapabilityData::Handles(list) = data {
        for h in list.iter() {
            if matches!(
                h,
                TpmHandle::HmacSession(_)
                    | TpmHandle::LoadedSession(_)
                    | TpmHandle::PolicySession(_)
            ) {
                let flushed = ctx
                    .execute_without_session(|c| c.tr_from_tpm_public(*h))
                    .and_then(|o: ObjectHandle| ctx.flush_context(o));
                if let Err(e) = flushed {
                    tracing::warn!("a session left by an earlier client stays loaded: {e}");
                }
            }
        }
    }
    Ok(())
}

fn read_capabilities(ctx: &mut Context) -> Result<Capabilities, TreError> {
    let code: u32 = CommandCode::EncryptDecrypt2.into();
    let (data, _) = ctx
        .get_capability(CapabilityType::Command, code, 1)
        .map_err(cmd("TPM2_GetCapability(commands)"))?;
    let encrypt_decrypt2 = match data {
        CapabilityData::Commands(list) => list
            .iter()
            .any(|a| u32::from(a.command_index()) == code & 0xFFFF),
        _ => false,
    };
    let vendor = tss_esapi::utils::get_tpm_vendor(ctx).unwrap_or_default();
    Ok(Capabilities {
        kind: TreKind::Tpm2,
        aka_execution: if encrypt_decrypt2 {
            AkaExecution::InTre
        } else {
            AkaExecution::UnsealedInHost
        },
        encrypt_decrypt2,
        quote: true,
        monotonic_counter: true,
        vendor,
        unwrap: UnwrapScheme::TpmImport,
    })
}

impl Tre for TpmTre {
    fn backend_name(&self) -> &'static str {
        "tpm"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn init_device(&mut self, identity: &DeviceIdentity) -> Result<InitOutcome, TreError> {
        let r = self.init_device_once(identity);
        self.forget_handles();
        r
    }

    fn identity(&mut self) -> Result<Option<DeviceIdentity>, TreError> {
        let r = nv::read_identity(&mut self.ctx);
        self.forget_handles();
        Ok(r?.map(|r| r.identity))
    }

    fn device_public(&mut self) -> Result<DevicePublic, TreError> {
        let r = keys::device_public(&mut self.ctx);
        self.forget_handles();
        r
    }

    fn import_mcim_secrets(
        &mut self,
        wrapped: &WrappedSecrets,
    ) -> Result<ProtectedSecrets, TreError> {
        self.import_secrets(wrapped)
    }

    fn bind_pin(
        &mut self,
        secrets: &ProtectedSecrets,
        pin: &[u8],
        puk: &[u8],
    ) -> Result<Option<ProtectedSecrets>, TreError> {
        self.bind_pin_to(secrets, pin, puk)
    }

    fn check_pin(
        &mut self,
        secrets: &ProtectedSecrets,
        auth: crate::tre::Authority<'_>,
    ) -> Result<bool, TreError> {
        self.check_pin_with(secrets, auth)
    }

    fn rebind_pin(
        &mut self,
        secrets: &ProtectedSecrets,
        auth: crate::tre::Authority<'_>,
        new_pin: &[u8],
    ) -> Result<Option<ProtectedSecrets>, TreError> {
        self.rebind_pin_to(secrets, auth, new_pin)
    }

    fn authenticate(
        &mut self,
        secrets: &ProtectedSecrets,
        sqn: &mut MsSqnState,
        challenge: &AkaChallenge<'_>,
    ) -> Result<DeviceResponse, TreError> {
        self.authenticate_with(secrets, sqn, challenge)
    }

    fn command_count(&self) -> Option<u64> {
        Some(self.commands_issued())
    }

    fn nv_write_count(&self) -> Option<u64> {
        Some(self.nv_writes_issued())
    }

    fn integrity_mac(&mut self, digest: &[u8; 32]) -> Result<[u8; 32], TreError> {
        self.mac_digest(digest)
    }

    fn rollback_counter(&mut self) -> Result<u64, TreError> {
        self.read_counter()
    }

    fn advance_rollback_counter(&mut self) -> Result<u64, TreError> {
        self.increment_counter()
    }

    fn hybrid_counter(&mut self) -> Result<Option<crate::tre::HybridCount>, TreError> {
        self.read_hybrid_counter().map(Some)
    }

    fn advance_hybrid_counter(&mut self) -> Result<u64, TreError> {
        self.increment_hybrid_counter()
    }

    fn audit_anchor(&mut self) -> Result<AuditAnchor, TreError> {
        self.read_anchor()
    }

    fn set_audit_anchor(&mut self, anchor: &AuditAnchor) -> Result<(), TreError> {
        self.write_anchor(anchor)
    }

    fn tls_sign(&mut self, message: &[u8]) -> Result<Vec<u8>, TreError> {
        self.sign_tls(message)
    }

    fn quote(&mut self, nonce: &[u8], pcrs: &PcrSelection) -> Result<TpmQuote, TreError> {
        self.quote_pcrs(nonce, pcrs)
    }

    fn random(&mut self, n: usize) -> Result<Vec<u8>, TreError> {
        if n > 64 {
            return Err(TreError::Command {
                command: "TPM2_GetRandom",
                detail: format!("{n} bytes asked, at most 64"),
            });
        }
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let d = self
                .ctx
                .get_random(n - out.len())
                .map_err(cmd("TPM2_GetRandom"))?;
            out.extend_from_slice(d.value());
        }
        Ok(out)
    }
}

/// Errors that tss-esapi raises outside a named command (starting the null-auth session).
impl From<tss_esapi::Error> for TreError {
    fn from(e: tss_esapi::Error) -> Self {
        TreError::Command {
            command: "TPM2_StartAuthSession",
            detail: e.to_string(),
        }
    }
}
