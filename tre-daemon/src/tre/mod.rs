//! The Trusted Environment (TR 33.812 5.1.2) behind one trait, [`Tre`], with a backend per
//! kind of hardware, each behind its own cargo feature: `tpm` (TPM 2.0 through tss-esapi) and
//! `pkcs11` (any PKCS#11 token through cryptoki; SoftHSM2 in tests).
//!
//! Every operation has a default body that answers [`TreError::NotSupported`]; a backend
//! overrides what it can and says so in [`Tre::capabilities`], so callers ask instead of
//! guessing (the parsec provider model). One conformance suite (`tests/conformance.rs`) runs
//! against every backend on a real TRE (swtpm, SoftHSM2), each test with its own instance.
//!
//! Operations, by clause of the seed:
//! - supply-time initialisation and identity: [`Tre::init_device`], [`Tre::identity`]
//!   (5.1.2.2 pre-provisioning; 5.1.3.3.4 M2ME supply; 5.1.3.4.1 CCIF);
//! - randomness for nonces and ids: [`Tre::random`];
//! - MCIM secrets brought in wrapped ([`Tre::import_mcim_secrets`]; TPM2_Import, or C_UnwrapKey on a
//!   token) and MILENAGE with K inside the TRE ([`Tre::authenticate`], 5.1.2.2 "storage and execution
//!   of AKA functions");
//! - evidence for the PVA ([`Tre::quote`], or [`Tre::sign_evidence`] on a token), the TLS
//!   key's signatures ([`Tre::tls_sign`]);
//! - the rollback counter and the audit anchor the registry keeps in the TRE (5.1.2.2,
//!   5.1.2.3).

#[cfg(feature = "pkcs11")]
pub mod pkcs11;
#[cfg(feature = "tpm")]
pub mod tpm;

use mcim_core::aka::{Autn, Constants, DeviceResponse, MsSqnState, Rand, SqnProfile};
use mcim_core::identity::{DeviceIdentity, IdentityError};
use mcim_core::tpm::attest::TpmQuote;
use mcim_core::tpm::policy::PcrSelection;

/// The kind of TRE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreKind {
    /// TPM 2.0.
    Tpm2,
    /// PKCS#11 token.
    Pkcs11,
}

/// Where AKA's E_K runs (the device's evidence reports it; an SHO may refuse the weaker).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AkaExecution {
    /// K is a TRE key object; every E_K is a TRE command (TPM2_EncryptDecrypt2, C_Encrypt).
    InTre,
    /// The TRE lacks a usable cipher command: K is sealed and unsealed into zeroized host
    /// memory only for the computation.
    UnsealedInHost,
}

/// How MCIM secrets travel into the TRE (what an SHO must build).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnwrapScheme {
    /// TPM2 duplication blobs and TPM2_Import (`mcim_core::tpm::import`).
    TpmImport,
    /// ECDH P-256 + AES-KWP on a token (`mcim_core::token_wrap::wrap_for_token`).
    EcdhAesKwp,
    /// RSA-OAEP (SHA-1) to a token's RSA-2048 key, for tokens without ECDH
    /// (`mcim_core::token_wrap::wrap_for_token_rsa`).
    RsaOaep,
}

/// What a backend can do, found at start-up (TPM2_GetCapability, token mechanisms).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// TPM or PKCS#11.
    pub kind: TreKind,
    /// How MILENAGE runs.
    pub aka_execution: AkaExecution,
    /// TPM2_EncryptDecrypt2 is implemented (TOOLCHAIN gotcha 8: many hardware TPMs lack it).
    pub encrypt_decrypt2: bool,
    /// A quote with a restricted attestation key is available.
    pub quote: bool,
    /// A monotonic counter in the TRE guards against rollback of the state directory.
    pub monotonic_counter: bool,
    /// The manufacturer and firmware the TRE reports, for logs and evidence.
    pub vendor: String,
    /// How MCIM secrets must be wrapped for it.
    pub unwrap: UnwrapScheme,
}

/// Public material of a device's keys, what the supplier certifies into the platform
/// credential (5.1.3.5.8 PfC) and what an SHO wraps MCIM secrets to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePublic {
    /// The storage key: a marshalled TPM2B_PUBLIC (TPM) or a DER SPKI (PKCS#11).
    pub storage_public: Vec<u8>,
    /// The attestation key, same encodings.
    pub attestation_public: Vec<u8>,
    /// The TLS client key as DER SubjectPublicKeyInfo.
    pub tls_public_spki: Vec<u8>,
}

/// Result of [`Tre::init_device`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitOutcome {
    /// False when the device already had exactly these keys and identity.
    pub created: bool,
    /// The identity as stored.
    pub identity: DeviceIdentity,
    /// The keys' public material.
    pub public: DevicePublic,
}

/// An MCIM's secrets as the SHO wrapped them for this TRE (5.1.3.6.2 step 12): for a TPM,
/// two `mcim_core::tpm::import::ImportBlob`s in their transport encoding. No plaintext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedSecrets {
    /// K: an AES-128 key object (AKA in the TRE) or sealed data (the fallback).
    pub k: Vec<u8>,
    /// OPc: sealed data.
    pub opc: Vec<u8>,
}

/// An MCIM's secrets as the TRE keeps them at rest: usable only by this TRE (for a TPM, the
/// public area and the private blob TPM2_Import returned, encrypted under the storage key).
/// Safe to store in the state directory; the registry integrity-protects it.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProtectedSecrets {
    /// How AKA runs with this K.
    pub aka_execution: AkaExecution,
    /// K, in the backend's at-rest form.
    #[serde(with = "hex_bytes")]
    pub k: Vec<u8>,
    /// OPc, in the backend's at-rest form.
    #[serde(with = "hex_bytes")]
    pub opc: Vec<u8>,
    /// K usable with the MCIM's PUK (a TPM object whose authValue is the PUK), present when
    /// `k` and `opc` are bound to the PIN ([`Tre::bind_pin`]); empty otherwise.
    #[serde(default, with = "hex_bytes", skip_serializing_if = "Vec::is_empty")]
    pub k_puk: Vec<u8>,
    /// OPc usable with the PUK, as `k_puk`.
    #[serde(default, with = "hex_bytes", skip_serializing_if = "Vec::is_empty")]
    pub opc_puk: Vec<u8>,
}

impl ProtectedSecrets {
    /// The TRE checks the MCIM's PIN and PUK itself: `k` and `opc` open only with the PIN,
    /// `k_puk` and `opc_puk` only with the PUK ([`Tre::bind_pin`]).
    pub fn pin_bound(&self) -> bool {
        !self.opc_puk.is_empty()
    }
}

/// An MCIM's PIN or PUK as the authorisation the TRE checks (TR 33.812 5.1.1.1
/// "PIN-protected"). Never printed.
#[derive(Clone, Copy)]
pub enum Authority<'a> {
    /// The PIN: opens the PIN-bound objects.
    Pin(&'a [u8]),
    /// The PUK: opens the PUK copies.
    Puk(&'a [u8]),
}

impl std::fmt::Debug for Authority<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Authority::Pin(_) => "Pin(..)",
            Authority::Puk(_) => "Puk(..)",
        })
    }
}

impl std::fmt::Debug for ProtectedSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtectedSecrets")
            .field("aka_execution", &self.aka_execution)
            .field("k_len", &self.k.len())
            .field("opc_len", &self.opc.len())
            .field("pin_bound", &self.pin_bound())
            .finish()
    }
}

/// DER SubjectPublicKeyInfo of an uncompressed P-256 point (RFC 5480), as both backends report
/// their device keys.
pub(crate) fn p256_spki(point: &[u8; 65]) -> Vec<u8> {
    let mut der = mcim_core::token_wrap::P256_SPKI_PREFIX.to_vec();
    der.extend_from_slice(point);
    der
}

/// The TRE's error for a refused or failed device-side AKA; `command` names the backend's
/// cipher command for a kernel failure.
pub(crate) fn aka_error<E: std::error::Error + Send + Sync + 'static>(
    command: &'static str,
) -> impl Fn(mcim_core::aka::device::DeviceAkaError<E>) -> TreError {
    use mcim_core::aka::device::DeviceAkaError as D;
    move |e| match e {
        D::MacFailure => TreError::MacFailure,
        D::Sqn(s) => TreError::Sqn(s),
        D::Kernel(k) => TreError::Command {
            command,
            detail: k.to_string(),
        },
    }
}

/// DER of an ECDSA P-256 signature from its scalars (big-endian, any length up to 32).
pub(crate) fn ecdsa_der(r: &[u8], s: &[u8]) -> Result<Vec<u8>, TreError> {
    let pad = |v: &[u8]| -> Result<[u8; 32], TreError> {
        if v.len() > 32 {
            return Err(TreError::Mismatch(
                "ECDSA scalar longer than 32 octets".into(),
            ));
        }
        let mut out = [0u8; 32];
        out[32 - v.len()..].copy_from_slice(v);
        Ok(out)
    };
    let sig = p256::ecdsa::Signature::from_scalars(pad(r)?, pad(s)?)
        .map_err(|_| TreError::Mismatch("not an ECDSA P-256 signature".into()))?;
    Ok(sig.to_der().as_bytes().to_vec())
}

/// Hex encoding for byte strings in JSON records.
pub(crate) mod hex_bytes {
    /// Serialises as a lower-case hex string.
    pub fn serialize<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }

    /// Parses a hex string.
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

/// Where the audit chain stood after the last committed transaction, kept in the TRE.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditAnchor {
    /// Sequence number of the last entry (0: none yet).
    pub seq: u64,
    /// Hash of the last entry (zeros: none yet).
    pub head: [u8; 32],
}

/// A hybrid monotonic counter (TPM 2.0 Part 1 §37.2.4, TPMA_NV_ORDERLY): incremented in the
/// TRE's RAM, written to NV only when its low bits roll over and at an orderly shutdown.
/// After a restart without TPM2_Shutdown the TRE sets the low bits (`orderly_mask`) of the
/// last value it saved, so the counter never goes back, but it may jump forward by up to
/// `orderly_mask`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HybridCount {
    /// The counter's value now.
    pub value: u64,
    /// MAX_ORDERLY_COUNT (TPM_PT_ORDERLY_COUNT): 2^N - 1; NV is written on the increment
    /// that clears these bits.
    pub orderly_mask: u64,
    /// Which reset of the TRE this is ([`ResetEpoch`]).
    pub reset_epoch: ResetEpoch,
}

/// A value that changes at every reset of the TRE and at nothing else: a TPM's
/// TPMS_CLOCK_INFO.resetCount, as a quote by the attestation key reports it, with that key.
/// Outside the endorsement hierarchy the count is obfuscated by a constant per key, so it is
/// compared only under the same key: another key at the attestation key's handle (a swap by
/// whoever has the owner's authorisation) changes the count without a reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResetEpoch {
    /// SHA-256 of the attestation key's TPM2B_PUBLIC.
    #[serde(with = "hex_array")]
    pub key: [u8; 32],
    /// The (obfuscated) resetCount under that key.
    pub count: u64,
}

mod hex_array {
    pub fn serialize<S: serde::Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&text, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

impl HybridCount {
    /// Whether a value `committed` with this counter, in the TRE's reset epoch
    /// `committed_epoch`, can have become `self.value` by a restart without orderly shutdown:
    /// the TRE was reset since (same attestation key, another count), and it set the low bits
    /// of a value saved at or before `committed`, in the same block.
    pub fn jumped_from(&self, committed: u64, committed_epoch: Option<&ResetEpoch>) -> bool {
        committed_epoch
            .is_some_and(|e| e.key == self.reset_epoch.key && e.count != self.reset_epoch.count)
            && committed < self.value
            && (committed | self.orderly_mask) == self.value
    }
}

/// One run of the USIM side of AKA (TS 33.102 6.3.3) inside the TRE.
#[derive(Debug)]
pub struct AkaChallenge<'a> {
    /// The MCIM's MILENAGE constants (the algorithm customisation in its package).
    pub constants: &'a Constants,
    /// The SQN scheme's parameters.
    pub profile: &'a SqnProfile,
    /// RAND from the network.
    pub rand: &'a Rand,
    /// AUTN from the network.
    pub autn: &'a Autn,
    /// The PIN of a selected MCIM whose objects are bound to it ([`Tre::bind_pin`]).
    pub pin: Option<Authority<'a>>,
}

/// What can go wrong in a TRE, in the caller's terms. Never carries secret bytes.
#[derive(Debug, thiserror::Error)]
pub enum TreError {
    /// The backend does not implement this operation; see [`Tre::capabilities`].
    #[error("the {backend} TRE does not support {operation}")]
    NotSupported {
        /// "tpm", "pkcs11"
        backend: &'static str,
        /// the operation asked for
        operation: &'static str,
    },
    /// The TRE could not be reached or opened (TCTI, device node, module).
    #[error("cannot open the TRE ({target}): {detail}")]
    Unavailable {
        /// what was tried, e.g. the TCTI string
        target: String,
        /// why it failed
        detail: String,
    },
    /// The device already holds a different identity or keys; nothing was changed. Re-keying
    /// a supplied device is never done silently (5.1.2.2, parsec's lesson).
    #[error("the TRE is already initialised with a different identity or keys: {0}")]
    AlreadyInitialised(String),
    /// The device has not been through supply-time initialisation.
    #[error("the TRE holds no device identity yet: run `mcimctl device init`")]
    NotInitialised,
    /// Stored state does not match what the TRE holds (e.g. the TPM was cleared): the TRE
    /// must go into lockdown (5.1.2.2).
    #[error("TRE state mismatch: {0}")]
    Mismatch(String),
    /// A wrapped secret or a protected record is malformed or not for this TRE; nothing was
    /// changed.
    #[error("refused MCIM secrets: {0}")]
    BadSecrets(String),
    /// The request is malformed (sizes, ranges); nothing was done.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A secret bound to platform state (TPM2_PolicyPCR) was refused: the platform is not in
    /// the state the SHO bound it to. Nothing changed.
    #[error("policy refused: {0}")]
    PolicyFailed(String),
    /// MAC-A did not verify (TS 33.102 6.3.3): the network does not know K or AUTN was altered.
    #[error("network authentication failed: MAC-A does not verify")]
    MacFailure,
    /// The SQN profile is unusable.
    #[error(transparent)]
    Sqn(#[from] mcim_core::aka::sqn::SqnError),
    /// The TRE refused the login (wrong or locked PIN); nothing changed.
    #[error("TRE login refused: {0}")]
    Login(String),
    /// An identity field is malformed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A command of the TRE failed.
    #[error("TRE command {command} failed: {detail}")]
    Command {
        /// the command, e.g. "TPM2_CreatePrimary"
        command: &'static str,
        /// the TRE's answer (response code text)
        detail: String,
    },
}

/// A Trusted Environment. One instance owns one TRE connection; callers serialise access
/// (the daemon gives it one owner, the TRE thread of [`crate::engine`], which runs the jobs
/// of every caller one at a time: a TPM context is not `Send`).
pub trait Tre {
    /// "tpm" or "pkcs11", for errors and logs.
    fn backend_name(&self) -> &'static str;

    /// What this TRE can do.
    fn capabilities(&self) -> &Capabilities;

    /// Supply-time initialisation (5.1.3.3.4; 5.1.2.2 "pre-provisioned in a secure,
    /// out-of-band facility"): creates the storage key, the attestation key (restricted
    /// signing) and the TLS client key, and writes `identity` into the TRE. Idempotent: the
    /// same identity on an initialised device returns `created: false` and the same public
    /// material; a different identity is [`TreError::AlreadyInitialised`] and changes nothing.
    fn init_device(&mut self, identity: &DeviceIdentity) -> Result<InitOutcome, TreError> {
        let _ = identity;
        Err(self.not_supported("init_device"))
    }

    /// The identity stored at supply time, `None` before it.
    fn identity(&mut self) -> Result<Option<DeviceIdentity>, TreError> {
        Err(self.not_supported("identity"))
    }

    /// The public material of the device keys, after [`Tre::init_device`].
    fn device_public(&mut self) -> Result<DevicePublic, TreError> {
        Err(self.not_supported("device_public"))
    }

    /// `n` random bytes from the TRE's generator (n ≤ 64).
    fn random(&mut self, n: usize) -> Result<Vec<u8>, TreError> {
        let _ = n;
        Err(self.not_supported("random"))
    }

    /// Brings an MCIM's wrapped secrets into the TRE (TPM2_Import; C_UnwrapKey) and returns
    /// their at-rest form. K never exists in plaintext outside the TRE when the result's
    /// `aka_execution` is [`AkaExecution::InTre`].
    fn import_mcim_secrets(
        &mut self,
        wrapped: &WrappedSecrets,
    ) -> Result<ProtectedSecrets, TreError> {
        let _ = wrapped;
        Err(self.not_supported("import_mcim_secrets"))
    }

    /// Binds an MCIM's imported objects to its PIN and PUK (TR 33.812 5.1.1.1 "PIN-protected"):
    /// returns at-rest objects usable only with the PIN (`k`, `opc`) or only with the PUK
    /// (`k_puk`, `opc_puk`), the TRE counting wrong ones (a TPM's dictionary-attack
    /// protection). The unbound objects are not returned and must not be kept. `None`: these
    /// objects cannot be bound (the backend, or a template that forbids it: a PCR policy,
    /// TPMA_OBJECT_ADMIN_WITH_POLICY, TPMA_OBJECT_NO_DA), and the PIN stays `tred`'s to check.
    fn bind_pin(
        &mut self,
        secrets: &ProtectedSecrets,
        pin: &[u8],
        puk: &[u8],
    ) -> Result<Option<ProtectedSecrets>, TreError> {
        let _ = (secrets, pin, puk);
        Ok(None)
    }

    /// Whether `auth` opens PIN-bound objects ([`ProtectedSecrets::pin_bound`]): the PIN the
    /// PIN copies, the PUK the PUK copies. A wrong one is counted by the TRE; a TRE that
    /// refuses every try for now (dictionary-attack lockout) is [`TreError::Login`].
    fn check_pin(
        &mut self,
        secrets: &ProtectedSecrets,
        auth: Authority<'_>,
    ) -> Result<bool, TreError> {
        let _ = (secrets, auth);
        Err(self.not_supported("check_pin"))
    }

    /// Binds the PIN copies to `new_pin`, authorised by the old PIN (from the PIN copies) or by
    /// the PUK (from the PUK copies; UNBLOCK PIN). `None`: `auth` was wrong (counted by the
    /// TRE), nothing changed.
    fn rebind_pin(
        &mut self,
        secrets: &ProtectedSecrets,
        auth: Authority<'_>,
        new_pin: &[u8],
    ) -> Result<Option<ProtectedSecrets>, TreError> {
        let _ = (secrets, auth, new_pin);
        Err(self.not_supported("rebind_pin"))
    }

    /// Whether the TRE still holds what `secrets` refers to (start-up reconciliation: a token
    /// whose key objects were deleted behind the daemon's back). A TPM's at-rest blobs are
    /// self-contained, so the default is yes.
    fn secrets_present(&mut self, secrets: &ProtectedSecrets) -> Result<bool, TreError> {
        let _ = secrets;
        Ok(true)
    }

    /// References (at-rest `k`/`opc` values) of every MCIM secret the TRE itself holds, for
    /// start-up reconciliation. A TPM holds none (its at-rest blobs live in the state
    /// directory), so the default is an empty list.
    fn held_secret_refs(&mut self) -> Result<Vec<Vec<u8>>, TreError> {
        Ok(Vec::new())
    }

    /// The references (values of [`Tre::held_secret_refs`]) under which the TRE itself holds
    /// objects for these secrets: what must be destroyed when the registry lets go of them.
    /// A TPM holds nothing for an MCIM between commands (its at-rest blobs live in the
    /// registry's records), so the default is none.
    fn held_refs_of(&self, secrets: &ProtectedSecrets) -> Vec<Vec<u8>> {
        let _ = secrets;
        Vec::new()
    }

    /// Destroys every object the TRE holds under `reference` (one of
    /// [`Tre::held_secret_refs`]), once the registry no longer refers to it (retire, delete,
    /// renewal, the discard of 5.1.3.7.4.2 step 8): a token's K and OPc objects
    /// (C_DestroyObject). Nothing left under it is success, so it can be repeated.
    fn destroy_held_secret(&mut self, reference: &[u8]) -> Result<(), TreError> {
        let _ = reference;
        Ok(())
    }

    /// Runs the USIM side of AKA with an MCIM's secrets: RES, CK, IK on success, AUTS on a
    /// synchronisation failure, [`TreError::MacFailure`] when AUTN is not genuine. `sqn`
    /// changes only on success (TS 33.102 6.3.3, Annex C).
    fn authenticate(
        &mut self,
        secrets: &ProtectedSecrets,
        sqn: &mut MsSqnState,
        challenge: &AkaChallenge<'_>,
    ) -> Result<DeviceResponse, TreError> {
        let _ = (secrets, sqn, challenge);
        Err(self.not_supported("authenticate"))
    }

    /// Signs a TLS handshake message with the device's TLS key (ECDSA P-256 over
    /// SHA-256(message); DER, as TLS wants it): the device's TLS identity lives in the TRE and
    /// the private key never leaves it (`crate::tls::TreTlsKey`).
    fn tls_sign(&mut self, message: &[u8]) -> Result<Vec<u8>, TreError> {
        let _ = message;
        Err(self.not_supported("tls_sign"))
    }

    /// Signs attestation evidence with the attestation key (a TRE without quotes:
    /// `mcim_core::token_evidence`): ECDSA P-256 over SHA-256(payload), r || s.
    fn sign_evidence(&mut self, payload: &[u8]) -> Result<Vec<u8>, TreError> {
        let _ = payload;
        Err(self.not_supported("sign_evidence"))
    }

    /// HMAC-SHA-256 of a digest with a key that never leaves the TRE: what protects every
    /// record the daemon stores outside it (5.1.2.3 integrity check at start).
    fn integrity_mac(&mut self, digest: &[u8; 32]) -> Result<[u8; 32], TreError> {
        let _ = digest;
        Err(self.not_supported("integrity_mac"))
    }

    /// The TRE's monotonic counter (rollback detection of the state directory).
    fn rollback_counter(&mut self) -> Result<u64, TreError> {
        Err(self.not_supported("rollback_counter"))
    }

    /// Advances the monotonic counter by one; returns the new value.
    fn advance_rollback_counter(&mut self) -> Result<u64, TreError> {
        Err(self.not_supported("advance_rollback_counter"))
    }

    /// The TRE's hybrid counter for frequent commits (the SQN state after each AKA, TS
    /// 33.102 6.3.3): monotonic without an NV write per increment. `None`: the backend has
    /// none, and every commit advances [`Tre::advance_rollback_counter`].
    fn hybrid_counter(&mut self) -> Result<Option<HybridCount>, TreError> {
        Ok(None)
    }

    /// Advances the hybrid counter by one; returns the new value.
    fn advance_hybrid_counter(&mut self) -> Result<u64, TreError> {
        Err(self.not_supported("advance_hybrid_counter"))
    }

    /// The audit chain's anchor in the TRE (5.1.2.2 audit record).
    fn audit_anchor(&mut self) -> Result<AuditAnchor, TreError> {
        Err(self.not_supported("audit_anchor"))
    }

    /// Moves the audit anchor to a new head.
    fn set_audit_anchor(&mut self, anchor: &AuditAnchor) -> Result<(), TreError> {
        let _ = anchor;
        Err(self.not_supported("set_audit_anchor"))
    }

    /// Integrity evidence (5.1.3.6.2 step 8): a quote by the attestation key over the selected
    /// SHA-256 PCRs with the verifier's nonce, and the PCR values. Verified with
    /// `mcim_core::tpm::attest::verify_quote`.
    fn quote(&mut self, nonce: &[u8], pcrs: &PcrSelection) -> Result<TpmQuote, TreError> {
        let _ = (nonce, pcrs);
        Err(self.not_supported("quote"))
    }

    /// TRE commands issued so far, when the backend counts them (benchmarks, diagnostics).
    fn command_count(&self) -> Option<u64> {
        None
    }

    /// Of those, the commands that wrote the TRE's non-volatile memory (NV wear), when the
    /// backend counts them.
    fn nv_write_count(&self) -> Option<u64> {
        None
    }

    /// The error for an operation this backend lacks.
    fn not_supported(&self, operation: &'static str) -> TreError {
        TreError::NotSupported {
            backend: self.backend_name(),
            operation,
        }
    }
}
