//! MCIM secrets on the token: unwrapped inside it (`C_DeriveKey` ECDH, then `C_UnwrapKey`
//! AES-KWP), and AKA with K as a sensitive, never-extractable AES key (every E_K one
//! `C_Encrypt` with CKM_AES_ECB; OUT2..OUT5 go in one call).
//!
//! K: CKK_AES, CKA_SENSITIVE, not CKA_EXTRACTABLE, CKA_ENCRYPT only. OPc: a private
//! CKK_GENERIC_SECRET object (readable only after login, like the TPM's sealed data), read into
//! zeroized memory for MILENAGE's XORs. Both carry the same random CKA_ID, which is what the
//! registry stores.

use std::cell::RefCell;

use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use mcim_core::aka::milenage::Block;
use mcim_core::aka::{DeviceResponse, Kernel, Milenage, MsSqnState, Opc};
use mcim_core::token_wrap::TokenBlob;
use zeroize::Zeroizing;

use super::keys::UNWRAP_LABEL;
use super::{Pkcs11Tre, ck};
use crate::tre::{
    AkaChallenge, AkaExecution, ProtectedSecrets, TreError, UnwrapScheme, WrappedSecrets,
};

/// Label of an MCIM's K object.
pub const K_LABEL: &str = "mcim.k";
/// Label of an MCIM's OPc object.
pub const OPC_LABEL: &str = "mcim.opc";

fn bad(e: impl std::fmt::Display) -> TreError {
    TreError::BadSecrets(e.to_string())
}

fn find_one(session: &Session, template: &[Attribute]) -> Result<Option<ObjectHandle>, TreError> {
    let found = session
        .find_objects(template)
        .map_err(ck("C_FindObjects"))?;
    Ok(found.first().copied())
}

impl Pkcs11Tre {
    /// ECDH with the unwrap key, then AES-KWP unwrap into an object made from `template`.
    fn unwrap_into(
        &self,
        blob: &[u8],
        what: &str,
        template: &[Attribute],
    ) -> Result<ObjectHandle, TreError> {
        if self.caps.unwrap == UnwrapScheme::RsaOaep {
            return self.unwrap_rsa(blob, what, template);
        }
        let blob = TokenBlob::from_bytes(blob).map_err(|e| bad(format!("{what}: {e}")))?;
        let unwrap_key = find_one(
            &self.session,
            &[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(UNWRAP_LABEL.as_bytes().to_vec()),
            ],
        )?
        .ok_or(TreError::NotInitialised)?;
        let params = Ecdh1DeriveParams::new(EcKdf::null(), &blob.ephemeral_point);
        let kek = self
            .session
            .derive_key(
                &Mechanism::Ecdh1Derive(params),
                unwrap_key,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(false),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Unwrap(true),
                ],
            )
            .map_err(|e| bad(format!("{what}: C_DeriveKey(ECDH): {e}")))?;
        let out = self
            .session
            .unwrap_key(&Mechanism::AesKeyWrapPad, kek, &blob.wrapped, template)
            .map_err(|e| {
                bad(format!(
                    "{what}: C_UnwrapKey refused it (not for this token, or damaged): {e}"
                ))
            });
        let _ = self.session.destroy_object(kek);
        out
    }

    /// RSA-OAEP (SHA-1, MGF1-SHA-1: see `mcim_core::token_wrap`) unwrap with the RSA key.
    fn unwrap_rsa(
        &self,
        blob: &[u8],
        what: &str,
        template: &[Attribute],
    ) -> Result<ObjectHandle, TreError> {
        let unwrap_key = find_one(
            &self.session,
            &[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(UNWRAP_LABEL.as_bytes().to_vec()),
            ],
        )?
        .ok_or(TreError::NotInitialised)?;
        let params = PkcsOaepParams::new(
            MechanismType::SHA1,
            PkcsMgfType::MGF1_SHA1,
            PkcsOaepSource::empty(),
        );
        self.session
            .unwrap_key(&Mechanism::RsaPkcsOaep(params), unwrap_key, blob, template)
            .map_err(|e| {
                bad(format!(
                    "{what}: C_UnwrapKey(RSA-OAEP) refused it (not for this token, or damaged): {e}"
                ))
            })
    }

    pub(super) fn import_secrets(
        &mut self,
        w: &WrappedSecrets,
    ) -> Result<ProtectedSecrets, TreError> {
        if self.caps.aka_execution != AkaExecution::InTre {
            return Err(bad("this token lacks CKM_AES_ECB: AKA cannot run on it"));
        }
        let mut id = [0u8; 16];
        self.session
            .generate_random_slice(&mut id)
            .map_err(ck("C_GenerateRandom"))?;
        let common = |label: &str| {
            vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(id.to_vec()),
            ]
        };
        let mut k_template = common(K_LABEL);
        k_template.extend([
            Attribute::KeyType(KeyType::AES),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            // E_K only: no decryption, MACs, key wrapping or derivation with K.
            Attribute::Encrypt(true),
            Attribute::Decrypt(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
        ]);
        let mut opc_template = common(OPC_LABEL);
        opc_template.extend([
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            // Readable after login (CKA_VALUE needs both), like the TPM's sealed data.
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
            // Data, not a key: no use of its own, whatever the token's defaults (SoftHSM2
            // would otherwise give an unwrapped secret CKA_WRAP/CKA_UNWRAP and more).
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
        ]);
        let k = self.unwrap_into(&w.k, "K", &k_template)?;
        if let Err(e) = self.unwrap_into(&w.opc, "OPc", &opc_template) {
            let _ = self.session.destroy_object(k);
            return Err(e);
        }
        Ok(ProtectedSecrets {
            aka_execution: AkaExecution::InTre,
            k: id.to_vec(),
            opc: id.to_vec(),
            k_puk: Vec::new(),
            opc_puk: Vec::new(),
        })
    }

    fn object(&self, id: &[u8], label: &str) -> Result<ObjectHandle, TreError> {
        find_one(
            &self.session,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Id(id.to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
            ],
        )?
        .ok_or_else(|| {
            bad(format!(
                "the MCIM's {label} object is missing from the token"
            ))
        })
    }

    /// The CKA_IDs of every K and OPc object on the token.
    pub(super) fn held_ids(&self) -> Result<Vec<Vec<u8>>, TreError> {
        let mut ids = Vec::new();
        for label in [K_LABEL, OPC_LABEL] {
            for obj in self
                .session
                .find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Label(label.as_bytes().to_vec()),
                ])
                .map_err(ck("C_FindObjects"))?
            {
                let attrs = self
                    .session
                    .get_attributes(obj, &[AttributeType::Id])
                    .map_err(ck("C_GetAttributeValue"))?;
                if let Some(Attribute::Id(id)) = attrs.into_iter().next()
                    && !ids.contains(&id)
                {
                    ids.push(id);
                }
            }
        }
        Ok(ids)
    }

    /// Destroys every K and OPc object with this CKA_ID; none left is success.
    pub(super) fn destroy(&self, id: &[u8]) -> Result<(), TreError> {
        for label in [K_LABEL, OPC_LABEL] {
            for obj in self
                .session
                .find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Id(id.to_vec()),
                    Attribute::Label(label.as_bytes().to_vec()),
                ])
                .map_err(ck("C_FindObjects"))?
            {
                self.session
                    .destroy_object(obj)
                    .map_err(ck("C_DestroyObject"))?;
            }
        }
        Ok(())
    }

    /// Whether both objects of an MCIM are on the token (start-up reconciliation).
    pub(super) fn holds(&self, s: &ProtectedSecrets) -> Result<bool, TreError> {
        Ok(self.object(&s.k, K_LABEL).is_ok() && self.object(&s.opc, OPC_LABEL).is_ok())
    }

    pub(super) fn authenticate_with(
        &mut self,
        s: &ProtectedSecrets,
        sqn: &mut MsSqnState,
        ch: &AkaChallenge<'_>,
    ) -> Result<DeviceResponse, TreError> {
        let key = self.object(&s.k, K_LABEL)?;
        let opc_obj = self.object(&s.opc, OPC_LABEL)?;
        let attrs = self
            .session
            .get_attributes(opc_obj, &[AttributeType::Value])
            .map_err(ck("C_GetAttributeValue"))?;
        let opc = match attrs.into_iter().next() {
            Some(Attribute::Value(v)) => {
                let v = Zeroizing::new(v);
                Opc::from_slice(&v).ok_or_else(|| bad("the OPc object is not 16 octets"))?
            }
            _ => return Err(bad("the OPc object has no value")),
        };
        let kernel = TokenKernel {
            session: RefCell::new(&self.session),
            key,
        };
        let m = Milenage::with_opc(kernel, opc, ch.constants.clone());
        mcim_core::aka::authenticate(&m, sqn, ch.profile, ch.rand, ch.autn)
            .map_err(crate::tre::aka_error("C_Encrypt(CKM_AES_ECB)"))
    }
}

/// E_K with K a token AES key: one `C_Encrypt` (CKM_AES_ECB) per call.
struct TokenKernel<'a> {
    session: RefCell<&'a Session>,
    key: ObjectHandle,
}

/// A `C_Encrypt` failure inside MILENAGE.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct KernelError(String);

impl Kernel for TokenKernel<'_> {
    type Error = KernelError;

    fn encrypt_blocks(&self, blocks: &mut [Block]) -> Result<(), KernelError> {
        let mut input = Zeroizing::new(Vec::with_capacity(blocks.len() * 16));
        for b in blocks.iter() {
            input.extend_from_slice(b);
        }
        let session = self
            .session
            .try_borrow()
            .map_err(|e| KernelError(e.to_string()))?;
        let out = Zeroizing::new(
            session
                .encrypt(&Mechanism::AesEcb, self.key, &input)
                .map_err(|e| KernelError(e.to_string()))?,
        );
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
