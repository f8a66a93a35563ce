//! MCIM secrets in the TPM: TPM2_Import of the SHO's duplication blobs, and AKA with K as a
//! TPM AES-128 key (every E_K one TPM2_EncryptDecrypt2 in ECB mode), or, on a TPM without
//! EncryptDecrypt2, K as sealed data unsealed into zeroized memory for the computation
//! (TR 33.812 5.1.2.2 "storage and execution of AKA functions").
//!
//! TPM commands per authentication (counted in [`TpmTre::commands_issued`]):
//! - in the TRE: Load(OPc), Unseal(OPc), FlushContext(OPc), Load(K), EncryptDecrypt2 x3
//!   (TEMP; OUT2..OUT5; OUT1), FlushContext(K): 8. OPc lives in host memory only for
//!   MILENAGE's XORs.
//! - sealed fallback: the same OPc part, plus Load(K), Unseal(K), FlushContext(K): 6.
//!
//! **Nothing secret crosses the TPM bus in clear.** Every command that carries a secret or a
//! value derived from one runs in one HMAC session salted to the storage key (its session key
//! is unknown to anyone watching the bus), started once per daemon (1 command more the first
//! time) and kept (`continueSession`), with parameter encryption (AES-128-CFB) set per
//! command: TPM2_EncryptDecrypt2 (RAND xor OPc, TEMP xor OPc xor c_i in; TEMP, OUT_i back:
//! `decrypt` and `encrypt`), TPM2_Unseal (OPc, a sealed K: `encrypt`), TPM2_Import (`decrypt`
//! on the inner key, `encrypt` on the returned private; the duplicate itself travels under the
//! SHO's outer wrapper, which only the storage key opens), TPM2_ObjectChangeAuth (`decrypt` on
//! the new authValue). The session's HMAC also protects those commands and answers from being
//! altered on the bus. Loads and flushes carry nothing secret (a TPM2B_PRIVATE is encrypted
//! under the storage key).
//!
//! **The PIN is the TPM's** (TR 33.812 5.1.1.1 "PIN-protected"): an MCIM with a PIN keeps K
//! and OPc as objects whose authValue is the PIN, and copies whose authValue is the PUK
//! ([`TpmTre::bind_pin_to`]: TPM2_ObjectChangeAuth from the imported, empty-auth objects, which
//! are not kept). The TPM compares the PIN (an HMAC authorisation in the bus session: the PIN
//! itself never crosses the bus) and counts wrong ones in its dictionary-attack logic; a
//! copy of the blobs is useless without the PIN. An AKA with such an MCIM costs no extra
//! command (`Esys_TR_SetAuth` is local).

use std::cell::{Cell, RefCell};

use mcim_core::aka::milenage::Block;
use mcim_core::aka::{DeviceResponse, K, Kernel, Milenage, MsSqnState, Opc, SoftKernel};
use mcim_core::tpm::alg;
use mcim_core::tpm::import::ImportBlob;
use mcim_core::tpm::policy::PcrSelection;
use mcim_core::tpm::public::attrs as public_attrs;
use mcim_core::tpm::wire::{Reader, Writer};
use tss_esapi::Context;
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{KeyHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SymmetricMode};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Auth, Digest, EncryptedSecret, InitialValue, MaxBuffer, Private, Public, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::traits::UnMarshall;
use zeroize::Zeroizing;

use super::{TpmTre, cmd};
use crate::tre::{
    AkaChallenge, AkaExecution, Authority, ProtectedSecrets, TreError, WrappedSecrets,
};

/// One imported object at rest: its public area and the private blob TPM2_Import returned
/// (encrypted and HMACed by the TPM under the storage key).
struct AtRest {
    public: Vec<u8>,
    private: Vec<u8>,
    /// The PCRs of its TPM2_PolicyPCR, when it is bound to platform state.
    policy_pcrs: Option<PcrSelection>,
}

impl AtRest {
    fn encode(&self) -> Result<Vec<u8>, TreError> {
        let mut w = Writer::new();
        w.tpm2b("public", &self.public)
            .and_then(|w| w.tpm2b("private", &self.private))
            .map_err(bad)?;
        if let Some(sel) = &self.policy_pcrs {
            w.bytes(&sel.marshal());
        }
        Ok(w.finish())
    }

    fn decode(b: &[u8]) -> Result<Self, TreError> {
        let mut r = Reader::new("protected object", b);
        let public = r.tpm2b().map_err(bad)?.to_vec();
        let private = r.tpm2b().map_err(bad)?.to_vec();
        let rest = r.rest();
        let policy_pcrs = if rest.is_empty() {
            None
        } else {
            let mut p = Reader::new("policy PCR selection", rest);
            let sel = PcrSelection::parse(&mut p).map_err(bad)?;
            p.finish().map_err(bad)?;
            Some(sel)
        };
        Ok(Self {
            public,
            private,
            policy_pcrs,
        })
    }

    /// The object type (TPMT_PUBLIC.type).
    fn object_type(&self) -> Result<u16, TreError> {
        Reader::new("TPMT_PUBLIC", &self.public).u16().map_err(bad)
    }

    /// Whether its authValue can become the MCIM's PIN and be checked by the TPM: no policy,
    /// the USER and ADMIN roles authorised by the authValue (TPM2_ObjectChangeAuth needs
    /// ADMIN), and dictionary-attack protection.
    fn pin_bindable(&self) -> Result<bool, TreError> {
        let mut r = Reader::new("TPMT_PUBLIC", &self.public);
        let (_type, _name_alg) = (r.u16().map_err(bad)?, r.u16().map_err(bad)?);
        let a = r.u32().map_err(bad)?;
        Ok(self.policy_pcrs.is_none()
            && a & public_attrs::USER_WITH_AUTH != 0
            && a & (public_attrs::ADMIN_WITH_POLICY | public_attrs::NO_DA) == 0)
    }
}

/// What an authorisation refusal means: `Ok(())` a wrong PIN or PUK (counted by the TPM's
/// dictionary-attack logic); an error when the TPM refuses every try for now (lockout), or
/// for any other failure.
fn wrong_auth(e: tss_esapi::Error, command: &'static str) -> Result<(), TreError> {
    use tss_esapi::constants::response_code::Tss2ResponseCodeKind as Kind;
    match e {
        tss_esapi::Error::Tss2Error(rc) => match rc.kind() {
            Some(Kind::AuthFail | Kind::BadAuth) => Ok(()),
            Some(Kind::Lockout) => Err(TreError::Login(
                "the TPM is in dictionary-attack lockout: wrong PINs or PUKs ran out its tries; \
                 it recovers after its recovery time, or with TPM2_DictionaryAttackLockReset by \
                 the lockout hierarchy's owner"
                    .into(),
            )),
            _ => Err(cmd(command)(e)),
        },
        other => Err(cmd(command)(other)),
    }
}

/// A command's failure as a [`TreError`]: an authorisation refused (a wrong PIN: not to be
/// retried, the TPM counted it) is [`TreError::Login`], like the lockout.
fn refused(command: &'static str, e: tss_esapi::Error) -> TreError {
    match wrong_auth(e, command) {
        Ok(()) => TreError::Login(format!("{command}: the TPM refused the MCIM's PIN")),
        Err(e) => e,
    }
}

fn tpm_auth(value: &[u8]) -> Result<Auth, TreError> {
    Auth::try_from(value.to_vec()).map_err(|_| TreError::BadRequest("PIN or PUK too long".into()))
}

fn bad(e: impl std::fmt::Display) -> TreError {
    TreError::BadSecrets(e.to_string())
}

/// The TPM's answer for a command, with the command's name.
fn tpm_public(tpmt: &[u8]) -> Result<Public, TreError> {
    Public::unmarshall(tpmt).map_err(|e| bad(format!("public area: {e}")))
}

impl TpmTre {
    /// TPM2_Import of one blob under the storage key; returns the at-rest form.
    fn import_one(&mut self, blob: &[u8], what: &str) -> Result<AtRest, TreError> {
        let blob = ImportBlob::from_bytes(blob).map_err(|e| bad(format!("{what}: {e}")))?;
        let public = tpm_public(&blob.public)?;
        let duplicate = Private::try_from(blob.duplicate.clone())
            .map_err(|e| bad(format!("{what} duplicate: {e}")))?;
        let seed = EncryptedSecret::try_from(blob.in_sym_seed.clone())
            .map_err(|e| bad(format!("{what} seed: {e}")))?;
        let parent = self.storage_key()?;
        let attempt = |t: &mut Self| -> Result<Private, TreError> {
            let session = t.bus_session(Carry::InAndOut)?;
            t.count(1);
            t.ctx
                .execute_with_session(Some(session), |c| {
                    c.import(
                        parent.into(),
                        None,
                        public.clone(),
                        duplicate.clone(),
                        seed.clone(),
                        SymmetricDefinitionObject::Null,
                    )
                })
                .map_err(|e| TreError::BadSecrets(format!("TPM2_Import of {what} refused: {e}")))
        };
        // The kept bus session may be gone (flushed by another client of the TPM, a TPM
        // restart): a refusal is tried once more with a new session before it counts.
        let private = match attempt(self) {
            Ok(p) => p,
            Err(_) => {
                self.drop_bus_session();
                attempt(self)?
            }
        };
        Ok(AtRest {
            public: blob.public,
            private: private.value().to_vec(),
            policy_pcrs: blob.policy_pcrs,
        })
    }

    /// TPM2_Load of an at-rest object under the storage key, and the authValue ESYS uses for the loaded object's HMAC authorisations
    /// (the PIN or PUK of a PIN-bound object; it never crosses the bus: the bus session is
    /// an HMAC session).
    fn load_authorized(
        &mut self,
        obj: &AtRest,
        auth: Option<&[u8]>,
    ) -> Result<KeyHandle, TreError> {
        let public = tpm_public(&obj.public)?;
        let private = Private::try_from(obj.private.clone()).map_err(bad)?;
        let parent = self.storage_key()?;
        self.count(1);
        let handle = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.load(parent, private, public)
            })
            .map_err(cmd("TPM2_Load"))?;
        if let Some(auth) = auth {
            let set = tpm_auth(auth).and_then(|a| {
                self.ctx
                    .tr_set_auth(handle.into(), a)
                    .map_err(cmd("Esys_TR_SetAuth"))
            });
            if let Err(e) = set {
                let _ = self.flush(handle);
                return Err(e);
            }
        }
        Ok(handle)
    }

    fn flush(&mut self, h: impl Into<ObjectHandle>) -> Result<(), TreError> {
        self.count(1);
        self.ctx
            .flush_context(h.into())
            .map_err(cmd("TPM2_FlushContext"))
    }

    /// Loads a sealed data object, unseals it through a session salted to the storage key
    /// (the response is encrypted on the bus), flushes both. The bytes come back zeroizing.
    fn unseal(
        &mut self,
        obj: &AtRest,
        auth: Option<&[u8]>,
    ) -> Result<Zeroizing<Vec<u8>>, TreError> {
        let handle = self.load_authorized(obj, auth)?;
        let out = match &obj.policy_pcrs {
            None => self.unseal_loaded(handle),
            Some(sel) => self.unseal_under_pcr_policy(handle, sel),
        };
        let flushed = self.flush(handle);
        let out = out?;
        flushed?;
        Ok(out)
    }

    /// The session that carries secrets across the bus (see the module's doc): an HMAC
    /// session salted to the storage key, started once and kept (continueSession: starting
    /// one costs an ECDH on both sides, the most expensive step of an authentication), with
    /// its parameter encryption set for the command about to run (a local ESYS call, no TPM
    /// command). Without bus encryption (the benchmark's baseline only) it is the password
    /// session.
    fn bus_session(&mut self, carry: Carry) -> Result<AuthSession, TreError> {
        if !self.bus_encryption {
            return Ok(AuthSession::Password);
        }
        let session = match self.salted {
            Some(s) => s,
            None => {
                let s = self.start_salted(SessionType::Hmac, true)?;
                self.salted = Some(s);
                s
            }
        };
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_decrypt(carry == Carry::InAndOut)
            .with_encrypt(true)
            .with_continue_session(true)
            .build();
        self.ctx
            .tr_sess_set_attributes(session, attrs, mask)
            .map_err(cmd("Esys_TRSess_SetAttributes"))?;
        Ok(session)
    }

    /// Forgets the kept session after a command on it failed: it may be gone (TPM restarted,
    /// flushed by another client); the next command starts a new one.
    fn drop_bus_session(&mut self) {
        if let Some(session) = self.salted.take() {
            let _ = self.flush(SessionHandle::from(session));
        }
    }

    /// Starts a session salted to the storage key, with response encryption; `keep` sets
    /// continueSession.
    fn start_salted(&mut self, ty: SessionType, keep: bool) -> Result<AuthSession, TreError> {
        let parent = self.storage_key()?;
        self.count(1);
        let session = self
            .ctx
            .start_auth_session(
                Some(parent),
                None,
                None,
                ty,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(cmd("TPM2_StartAuthSession"))?
            .ok_or_else(|| TreError::Command {
                command: "TPM2_StartAuthSession",
                detail: "no session returned".into(),
            })?;
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_encrypt(true)
            .with_continue_session(keep)
            .build();
        if let Err(e) = self.ctx.tr_sess_set_attributes(session, attrs, mask) {
            let _ = self.flush(SessionHandle::from(session));
            return Err(cmd("Esys_TRSess_SetAttributes")(e));
        }
        Ok(session)
    }

    fn unseal_loaded(&mut self, handle: KeyHandle) -> Result<Zeroizing<Vec<u8>>, TreError> {
        self.unseal_in_session(handle)?
            .map_err(|e| refused("TPM2_Unseal", e))
    }

    /// TPM2_Unseal of a loaded object in the bus session. The inner result is the TPM's
    /// answer as it is, for the caller to read (a wrong authValue is an answer to a PIN
    /// check); the session is dropped after a refusal. The outer error: no session.
    fn unseal_in_session(
        &mut self,
        handle: KeyHandle,
    ) -> Result<Result<Zeroizing<Vec<u8>>, tss_esapi::Error>, TreError> {
        let session = self.bus_session(Carry::Out)?;
        self.count(1);
        let result = self
            .ctx
            .execute_with_session(Some(session), |c| c.unseal(handle.into()))
            .map(|data| Zeroizing::new(data.value().to_vec()));
        if result.is_err() {
            self.drop_bus_session();
        }
        Ok(result)
    }

    /// Unseals an object bound to PCRs: a policy session (salted, response-encrypted) that
    /// runs TPM2_PolicyPCR with the current values, then TPM2_Unseal. The TPM refuses when
    /// the platform is not in the state the SHO bound the object to.
    fn unseal_under_pcr_policy(
        &mut self,
        handle: KeyHandle,
        sel: &PcrSelection,
    ) -> Result<Zeroizing<Vec<u8>>, TreError> {
        let (_, list) = super::pcr_selection_list(sel)?;
        let session = self.start_salted(SessionType::Policy, false)?;
        let result = (|| {
            let policy = PolicySession::try_from(session).map_err(cmd("policy session"))?;
            self.count(1);
            self.ctx
                .policy_pcr(policy, Digest::default(), list)
                .map_err(cmd("TPM2_PolicyPCR"))?;
            self.count(1);
            self.ctx
                .execute_with_session(Some(session), |c| c.unseal(handle.into()))
                .map_err(|e| {
                    TreError::PolicyFailed(format!(
                        "the platform is not in the state the secret is bound to (PCRs {:?}): {e}",
                        sel.indices()
                    ))
                })
                .map(|d| Zeroizing::new(d.value().to_vec()))
        })();
        let _ = self.flush(SessionHandle::from(session));
        result
    }

    fn unseal_opc(
        &mut self,
        secrets: &ProtectedSecrets,
        pin: Option<&[u8]>,
    ) -> Result<Opc, TreError> {
        let obj = AtRest::decode(&secrets.opc)?;
        let bytes = self.unseal(&obj, pin)?;
        Opc::from_slice(&bytes).ok_or_else(|| bad("sealed OPc is not 16 octets"))
    }

    /// TPM2_ObjectChangeAuth: a new private blob of `obj` whose authValue is `new`,
    /// authorised (ADMIN role) by `old`, both carried in the bus session (`new` encrypted,
    /// `old` only in the HMAC). `None`: `old` was wrong (counted by the TPM). The blob `obj`
    /// itself stays valid with `old`: the caller keeps only the new one.
    fn change_auth(
        &mut self,
        obj: &AtRest,
        old: &[u8],
        new: &[u8],
    ) -> Result<Option<AtRest>, TreError> {
        let new_auth = tpm_auth(new)?;
        let parent = self.storage_key()?;
        let handle = self.load_authorized(obj, Some(old))?;
        let result = match self.bus_session(Carry::InAndOut) {
            Ok(session) => {
                self.count(1);
                self.ctx.execute_with_session(Some(session), |c| {
                    c.object_change_auth(handle.into(), parent.into(), new_auth)
                })
            }
            Err(e) => {
                let _ = self.flush(handle);
                return Err(e);
            }
        };
        let flushed = self.flush(handle);
        let private = match result {
            Ok(p) => p,
            Err(e) => {
                self.drop_bus_session();
                wrong_auth(e, "TPM2_ObjectChangeAuth")?;
                return Ok(None);
            }
        };
        flushed?;
        Ok(Some(AtRest {
            public: obj.public.clone(),
            private: private.value().to_vec(),
            policy_pcrs: None,
        }))
    }

    /// [`crate::tre::Tre::bind_pin`] on a TPM: four TPM2_ObjectChangeAuth from the imported
    /// (empty authValue) objects: K and OPc with the PIN, K and OPc with the PUK.
    pub(super) fn bind_pin_to(
        &mut self,
        secrets: &ProtectedSecrets,
        pin: &[u8],
        puk: &[u8],
    ) -> Result<Option<ProtectedSecrets>, TreError> {
        if secrets.pin_bound() {
            return Err(TreError::BadRequest(
                "the MCIM's objects are already bound to a PIN".into(),
            ));
        }
        let (k, opc) = (AtRest::decode(&secrets.k)?, AtRest::decode(&secrets.opc)?);
        if !k.pin_bindable()? || !opc.pin_bindable()? {
            return Ok(None);
        }
        let mut bound = Vec::with_capacity(4);
        for (obj, auth) in [(&k, pin), (&opc, pin), (&k, puk), (&opc, puk)] {
            let b = self.change_auth(obj, &[], auth)?.ok_or_else(|| {
                TreError::Mismatch("an imported object refused its empty authValue".into())
            })?;
            bound.push(b.encode()?);
        }
        let mut it = bound.into_iter();
        let mut next = || it.next().unwrap_or_default();
        Ok(Some(ProtectedSecrets {
            aka_execution: secrets.aka_execution,
            k: next(),
            opc: next(),
            k_puk: next(),
            opc_puk: next(),
        }))
    }

    /// [`crate::tre::Tre::check_pin`] on a TPM: TPM2_Unseal of OPc's PIN or PUK copy with the
    /// value as its authValue, through the bus session.
    pub(super) fn check_pin_with(
        &mut self,
        secrets: &ProtectedSecrets,
        auth: Authority<'_>,
    ) -> Result<bool, TreError> {
        let ((_, opc), value) = pin_copy(secrets, auth)?;
        let obj = AtRest::decode(opc)?;
        let handle = self.load_authorized(&obj, Some(value))?;
        let result = self.unseal_in_session(handle);
        let flushed = self.flush(handle);
        match result? {
            Ok(_opc) => {
                flushed?;
                Ok(true)
            }
            Err(e) => {
                wrong_auth(e, "TPM2_Unseal")?;
                Ok(false)
            }
        }
    }

    /// [`crate::tre::Tre::rebind_pin`] on a TPM: TPM2_ObjectChangeAuth of K and OPc, from the
    /// PIN copies with the old PIN or from the PUK copies with the PUK, to `new_pin`.
    pub(super) fn rebind_pin_to(
        &mut self,
        secrets: &ProtectedSecrets,
        auth: Authority<'_>,
        new_pin: &[u8],
    ) -> Result<Option<ProtectedSecrets>, TreError> {
        let ((k, opc), value) = pin_copy(secrets, auth)?;
        let Some(k) = self.change_auth(&AtRest::decode(k)?, value, new_pin)? else {
            return Ok(None);
        };
        let Some(opc) = self.change_auth(&AtRest::decode(opc)?, value, new_pin)? else {
            return Ok(None);
        };
        Ok(Some(ProtectedSecrets {
            aka_execution: secrets.aka_execution,
            k: k.encode()?,
            opc: opc.encode()?,
            k_puk: secrets.k_puk.clone(),
            opc_puk: secrets.opc_puk.clone(),
        }))
    }

    pub(super) fn import_secrets(
        &mut self,
        wrapped: &WrappedSecrets,
    ) -> Result<ProtectedSecrets, TreError> {
        let k_blob = ImportBlob::from_bytes(&wrapped.k).map_err(bad)?;
        if k_blob.policy_pcrs.is_some() {
            return Err(bad(
                "K under a PCR policy is not supported: bind OPc (sealed data) to the PCRs",
            ));
        }
        let k_type = Reader::new(
            "K public",
            &ImportBlob::from_bytes(&wrapped.k).map_err(bad)?.public,
        )
        .u16()
        .map_err(bad)?;
        let aka_execution = match k_type {
            alg::SYMCIPHER if self.caps.encrypt_decrypt2 => AkaExecution::InTre,
            alg::SYMCIPHER => {
                return Err(bad(
                    "K is an AES key but this TPM lacks TPM2_EncryptDecrypt2: wrap K as sealed data",
                ));
            }
            alg::KEYEDHASH => AkaExecution::UnsealedInHost,
            other => return Err(bad(format!("K has object type {other:#06x}"))),
        };
        let opc_type = Reader::new(
            "OPc public",
            &ImportBlob::from_bytes(&wrapped.opc).map_err(bad)?.public,
        )
        .u16()
        .map_err(bad)?;
        if opc_type != alg::KEYEDHASH {
            return Err(bad("OPc must be sealed data"));
        }
        let k = self.import_one(&wrapped.k, "K")?.encode()?;
        let opc = self.import_one(&wrapped.opc, "OPc")?.encode()?;
        Ok(ProtectedSecrets {
            aka_execution,
            k,
            opc,
            k_puk: Vec::new(),
            opc_puk: Vec::new(),
        })
    }

    pub(super) fn authenticate_with(
        &mut self,
        secrets: &ProtectedSecrets,
        sqn: &mut MsSqnState,
        ch: &AkaChallenge<'_>,
    ) -> Result<DeviceResponse, TreError> {
        let had_session = self.salted.is_some();
        match self.authenticate_once(secrets, sqn, ch) {
            // A TPM command failed: the kept bus session may be gone (flushed by another
            // client, a TPM restart). Once more with a new one; the SQN state changes only on
            // success, so the retry is safe. MAC and SQN refusals are answers, not retried.
            Err(TreError::Command { .. }) if had_session => {
                self.drop_bus_session();
                self.authenticate_once(secrets, sqn, ch)
            }
            other => other,
        }
    }

    fn authenticate_once(
        &mut self,
        secrets: &ProtectedSecrets,
        sqn: &mut MsSqnState,
        ch: &AkaChallenge<'_>,
    ) -> Result<DeviceResponse, TreError> {
        let k_obj = AtRest::decode(&secrets.k)?;
        let k_type = k_obj.object_type()?;
        let pin = match (secrets.pin_bound(), ch.pin) {
            (false, _) => None,
            (true, Some(Authority::Pin(pin))) => Some(pin),
            (true, _) => {
                return Err(TreError::Login(
                    "this MCIM's keys open only with its PIN: select it with the PIN".into(),
                ));
            }
        };
        match (secrets.aka_execution, k_type) {
            (AkaExecution::InTre, alg::SYMCIPHER) => {
                let opc = self.unseal_opc(secrets, pin)?;
                let key = self.load_authorized(&k_obj, pin)?;
                let session = match self.bus_session(Carry::InAndOut) {
                    Ok(session) => session,
                    Err(e) => {
                        let _ = self.flush(key);
                        return Err(e);
                    }
                };
                let kernel = TpmKernel {
                    ctx: RefCell::new(&mut self.ctx),
                    key,
                    session,
                    commands: &self.commands,
                };
                let m = Milenage::with_opc(kernel, opc, ch.constants.clone());
                let out = mcim_core::aka::authenticate(&m, sqn, ch.profile, ch.rand, ch.autn);
                drop(m);
                if matches!(out, Err(mcim_core::aka::device::DeviceAkaError::Kernel(_))) {
                    self.drop_bus_session();
                }
                let flushed = self.flush(key);
                let out = out.map_err(crate::tre::aka_error("TPM2_EncryptDecrypt2"))?;
                flushed?;
                Ok(out)
            }
            (AkaExecution::UnsealedInHost, alg::KEYEDHASH) => {
                let opc = self.unseal_opc(secrets, pin)?;
                let k_bytes = self.unseal(&k_obj, pin)?;
                let k = K::from_slice(&k_bytes).ok_or_else(|| bad("sealed K is not 16 octets"))?;
                drop(k_bytes);
                let m = Milenage::with_opc(SoftKernel::new(&k), opc, ch.constants.clone());
                mcim_core::aka::authenticate(&m, sqn, ch.profile, ch.rand, ch.autn)
                    .map_err(crate::tre::aka_error("TPM2_EncryptDecrypt2"))
            }
            (mode, ty) => Err(bad(format!(
                "record says {mode:?} but K has object type {ty:#06x}"
            ))),
        }
    }
}

/// E_K with K a loaded TPM AES-128 key: each call is one TPM2_EncryptDecrypt2 in ECB mode on
/// all the blocks given (MILENAGE's OUT2..OUT5 go in one command).
struct TpmKernel<'a> {
    ctx: RefCell<&'a mut Context>,
    key: KeyHandle,
    /// The bus session, with `decrypt` and `encrypt` set: the blocks go in and come back
    /// encrypted on the bus.
    session: AuthSession,
    commands: &'a Cell<u64>,
}

/// Which of a command's parameters a secret travels in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Carry {
    /// The first response parameter (TPM2_Unseal's outData).
    Out,
    /// The first command parameter and the first response parameter.
    InAndOut,
}

/// A TPM2_EncryptDecrypt2 failure inside MILENAGE.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct KernelError(String);

impl Kernel for TpmKernel<'_> {
    type Error = KernelError;

    fn encrypt_blocks(&self, blocks: &mut [Block]) -> Result<(), KernelError> {
        let mut input = Zeroizing::new(Vec::with_capacity(blocks.len() * 16));
        for b in blocks.iter() {
            input.extend_from_slice(b);
        }
        let data = MaxBuffer::try_from(input.to_vec()).map_err(|e| KernelError(e.to_string()))?;
        let mut ctx = self
            .ctx
            .try_borrow_mut()
            .map_err(|e| KernelError(e.to_string()))?;
        self.commands.set(self.commands.get() + 1);
        let (out, _) = ctx
            .execute_with_session(Some(self.session), |c| {
                c.encrypt_decrypt_2(
                    self.key,
                    false,
                    SymmetricMode::Ecb,
                    data,
                    InitialValue::default(),
                )
            })
            .map_err(|e| KernelError(e.to_string()))?;
        let out = out.value();
        if out.len() != blocks.len() * 16 {
            return Err(KernelError(format!(
                "{} octets back for {} blocks",
                out.len(),
                blocks.len()
            )));
        }
        for (b, chunk) in blocks.iter_mut().zip(out.chunks_exact(16)) {
            b.copy_from_slice(chunk);
        }
        Ok(())
    }
}

/// The PIN or PUK copies of K and OPc a value opens, with the value.
#[allow(clippy::type_complexity)]
fn pin_copy<'s, 'a>(
    secrets: &'s ProtectedSecrets,
    auth: Authority<'a>,
) -> Result<((&'s [u8], &'s [u8]), &'a [u8]), TreError> {
    if !secrets.pin_bound() {
        return Err(TreError::BadRequest(
            "the MCIM's objects are not bound to its PIN".into(),
        ));
    }
    Ok(match auth {
        Authority::Pin(v) => ((&secrets.k, &secrets.opc), v),
        Authority::Puk(v) => ((&secrets.k_puk, &secrets.opc_puk), v),
    })
}
