//! The TRE on a PKCS#11 token through cryptoki (a secure element or HSM; SoftHSM2 in tests).
//!
//! | object | label | what |
//! | --- | --- | --- |
//! | EC P-256 key pair, derive | `mcim.unwrap` | the storage key: MCIM secrets are wrapped to it (ECDH, then AES key wrap) |
//! | EC P-256 key pair, sign | `mcim.attestation` | signs attestation evidence |
//! | EC P-256 key pair, sign | `mcim.tls` | the TLS client key |
//! | data object | `mcim.identity` | the device identity (JSON), application `mcim` |
//! | generic secret, sign | `mcim.integrity` | HMAC key of the registry's integrity checks |
//! | data objects | `mcim.counter`, `mcim.audit-anchor` | rollback counter and audit anchor (see [`integrity`]: weaker than a TPM) |
//! | AES key; generic secret | `mcim.k`, `mcim.opc` (one CKA_ID per MCIM) | an MCIM's K (sensitive, encrypt only) and OPc |
//!
//! All are token objects; private keys are sensitive and never extractable. The user PIN
//! comes from the configuration (a file or an environment variable), is held in a
//! `SecretString` and never logged.

mod integrity;
mod keys;
mod mcim;

use std::path::PathBuf;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::MechanismType;
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use mcim_core::identity::DeviceIdentity;
use secrecy::SecretString;

use super::UnwrapScheme;
use mcim_core::aka::{DeviceResponse, MsSqnState};

use super::{
    AkaChallenge, AkaExecution, AuditAnchor, Capabilities, DevicePublic, InitOutcome,
    ProtectedSecrets, Tre, TreError, TreKind, WrappedSecrets,
};

/// How to reach the token.
#[derive(Clone)]
pub struct Pkcs11Config {
    /// The PKCS#11 module, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The token's label.
    pub token_label: String,
    /// The user PIN.
    pub pin: SecretString,
    /// Use RSA-OAEP for MCIM secrets even when the token has ECDH (for tokens whose ECDH is
    /// unusable, and to test the fallback on SoftHSM2). Otherwise RSA-OAEP is used only when
    /// ECDH or AES-KWP is missing.
    pub force_rsa_unwrap: bool,
}

impl std::fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin", &"(redacted)")
            .field("force_rsa_unwrap", &self.force_rsa_unwrap)
            .finish()
    }
}

/// A PKCS#11 token as the device's TRE.
pub struct Pkcs11Tre {
    session: Session,
    caps: Capabilities,
}

impl std::fmt::Debug for Pkcs11Tre {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Tre")
            .field("caps", &self.caps)
            .finish_non_exhaustive()
    }
}

/// Maps a cryptoki error of `function` to a [`TreError`].
pub(crate) fn ck(function: &'static str) -> impl Fn(CkError) -> TreError {
    move |e| TreError::Command {
        command: function,
        detail: e.to_string(),
    }
}

impl Pkcs11Tre {
    /// Loads the module, finds the token by label and logs in as the user. Each failure is
    /// its own clear error: a module that does not load, no such token, a wrong PIN, a locked
    /// PIN. Nothing on the token changes.
    pub fn open(config: &Pkcs11Config) -> Result<Self, TreError> {
        let target = format!("{} token {:?}", config.module.display(), config.token_label);
        let unavailable = |detail: String| TreError::Unavailable {
            target: target.clone(),
            detail,
        };
        let ctx = Pkcs11::new(&config.module)
            .map_err(|e| unavailable(format!("cannot load the PKCS#11 module: {e}")))?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            // Another TRE in this process already initialised the module: it is shared.
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(unavailable(format!("C_Initialize: {e}"))),
        }
        let slot = find_slot(&ctx, &config.token_label)?
            .ok_or_else(|| unavailable("no token with this label".into()))?;
        let session = ctx
            .open_rw_session(slot)
            .map_err(|e| unavailable(format!("C_OpenSession: {e}")))?;
        session
            .login(UserType::User, Some(&config.pin))
            .or_else(|e| match e {
                CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _) => Ok(()),
                e => Err(login_error(e)),
            })?;
        let mut caps = capabilities(&ctx, slot, config.force_rsa_unwrap)?;
        // A device initialised earlier keeps the scheme of the unwrap key it has.
        if let Some(existing) = keys::unwrap_key_scheme(&session)? {
            caps.unwrap = existing;
        }
        Ok(Self { session, caps })
    }
}

/// A refused C_Login, in the owner's terms.
fn login_error(e: CkError) -> TreError {
    match e {
        CkError::Pkcs11(RvError::PinIncorrect, _) => TreError::Login("wrong user PIN".into()),
        CkError::Pkcs11(RvError::PinLocked, _) => TreError::Login(
            "the user PIN is locked (too many wrong PINs); the token's SO must reset it".into(),
        ),
        CkError::Pkcs11(RvError::PinExpired, _) => {
            TreError::Login("the user PIN has expired; set a new one".into())
        }
        CkError::Pkcs11(RvError::UserPinNotInitialized, _) => {
            TreError::Login("the token's user PIN is not initialised".into())
        }
        e => TreError::Login(e.to_string()),
    }
}

fn find_slot(ctx: &Pkcs11, label: &str) -> Result<Option<Slot>, TreError> {
    for slot in ctx.get_slots_with_token().map_err(ck("C_GetSlotList"))? {
        let info = ctx.get_token_info(slot).map_err(ck("C_GetTokenInfo"))?;
        if info.label().trim_end() == label {
            return Ok(Some(slot));
        }
    }
    Ok(None)
}

fn capabilities(ctx: &Pkcs11, slot: Slot, force_rsa: bool) -> Result<Capabilities, TreError> {
    let mechs = ctx
        .get_mechanism_list(slot)
        .map_err(ck("C_GetMechanismList"))?;
    let has = |m: MechanismType| mechs.contains(&m);
    let ecdh = has(MechanismType::ECDH1_DERIVE) && has(MechanismType::AES_KEY_WRAP_PAD);
    let rsa = has(MechanismType::RSA_PKCS_OAEP) && has(MechanismType::RSA_PKCS_KEY_PAIR_GEN);
    let unwrap = match (force_rsa, ecdh, rsa) {
        (true, _, true) | (false, false, true) => UnwrapScheme::RsaOaep,
        (false, true, _) => UnwrapScheme::EcdhAesKwp,
        _ => {
            return Err(TreError::Unavailable {
                target: "PKCS#11 token".into(),
                detail: "the token has neither ECDH with AES key wrap nor RSA-OAEP (or RSA-OAEP was required and is missing)".into(),
            });
        }
    };
    let info = ctx.get_token_info(slot).map_err(ck("C_GetTokenInfo"))?;
    Ok(Capabilities {
        kind: TreKind::Pkcs11,
        aka_execution: if has(MechanismType::AES_ECB) {
            AkaExecution::InTre
        } else {
            AkaExecution::UnsealedInHost
        },
        encrypt_decrypt2: false,
        quote: false,
        // A counter kept as a token object is not a hardware monotonic counter.
        monotonic_counter: false,
        vendor: format!(
            "{} {}",
            info.manufacturer_id().trim_end(),
            info.model().trim_end()
        ),
        unwrap,
    })
}

impl Tre for Pkcs11Tre {
    fn backend_name(&self) -> &'static str {
        "pkcs11"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn init_device(&mut self, identity: &DeviceIdentity) -> Result<InitOutcome, TreError> {
        let out = keys::init_device(&self.session, identity, self.caps.unwrap)?;
        integrity::ensure(&self.session)?;
        Ok(out)
    }

    fn tls_sign(&mut self, message: &[u8]) -> Result<Vec<u8>, TreError> {
        keys::sign_tls(&self.session, message)
    }

    fn sign_evidence(&mut self, payload: &[u8]) -> Result<Vec<u8>, TreError> {
        keys::sign_evidence(&self.session, payload)
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

    fn audit_anchor(&mut self) -> Result<AuditAnchor, TreError> {
        self.read_anchor()
    }

    fn set_audit_anchor(&mut self, anchor: &AuditAnchor) -> Result<(), TreError> {
        self.write_anchor(anchor)
    }

    fn identity(&mut self) -> Result<Option<DeviceIdentity>, TreError> {
        keys::read_identity(&self.session)
    }

    fn device_public(&mut self) -> Result<DevicePublic, TreError> {
        keys::device_public(&self.session)
    }

    fn import_mcim_secrets(&mut self, w: &WrappedSecrets) -> Result<ProtectedSecrets, TreError> {
        self.import_secrets(w)
    }

    fn held_secret_refs(&mut self) -> Result<Vec<Vec<u8>>, TreError> {
        self.held_ids()
    }

    fn secrets_present(&mut self, secrets: &ProtectedSecrets) -> Result<bool, TreError> {
        self.holds(secrets)
    }

    fn held_refs_of(&self, secrets: &ProtectedSecrets) -> Vec<Vec<u8>> {
        let mut refs = vec![secrets.k.clone()];
        if secrets.opc != secrets.k {
            refs.push(secrets.opc.clone());
        }
        refs
    }

    fn destroy_held_secret(&mut self, reference: &[u8]) -> Result<(), TreError> {
        self.destroy(reference)
    }

    fn authenticate(
        &mut self,
        secrets: &ProtectedSecrets,
        sqn: &mut MsSqnState,
        challenge: &AkaChallenge<'_>,
    ) -> Result<DeviceResponse, TreError> {
        self.authenticate_with(secrets, sqn, challenge)
    }

    fn random(&mut self, n: usize) -> Result<Vec<u8>, TreError> {
        if n > 64 {
            return Err(TreError::Command {
                command: "C_GenerateRandom",
                detail: format!("{n} bytes asked, at most 64"),
            });
        }
        let mut out = vec![0u8; n];
        self.session
            .generate_random_slice(&mut out)
            .map_err(ck("C_GenerateRandom"))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::context::Function;

    /// SoftHSM2 never locks a PIN, so the locked case is checked here, at the mapping.
    #[test]
    fn login_refusals_are_clear() {
        let m = |rv| login_error(CkError::Pkcs11(rv, Function::Login)).to_string();
        assert!(m(RvError::PinIncorrect).contains("wrong user PIN"));
        assert!(m(RvError::PinLocked).contains("locked"));
        assert!(m(RvError::PinLocked).contains("SO must reset"));
        assert!(m(RvError::PinExpired).contains("expired"));
    }
}
