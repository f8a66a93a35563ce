//! TPM2_Quote with the attestation key over SHA-256 PCRs and the verifier's nonce (TR 33.812
//! 5.1.3.6.2 step 8: the device's integrity evidence for the PVA).

use mcim_core::tpm::attest::TpmQuote;
use mcim_core::tpm::policy::PcrSelection;
use tss_esapi::abstraction::pcr;
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{Data, HashScheme, SignatureScheme};
use tss_esapi::traits::Marshall;

use super::{AK_HANDLE, TpmTre, cmd, keys};
use crate::tre::TreError;

/// The largest nonce TPM2_Quote takes (TPM2B_DATA of a SHA-256 TPM).
pub const MAX_NONCE: usize = 64;

impl TpmTre {
    /// TPM2_Sign with the (unrestricted) TLS key over SHA-256(message), a null ticket.
    pub(super) fn sign_tls(&mut self, message: &[u8]) -> Result<Vec<u8>, TreError> {
        use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
        use tss_esapi::structures::{Digest, HashcheckTicket, Signature};
        use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;

        let digest = Digest::try_from(mcim_core::tpm::kdf::sha256(&[message]).to_vec())
            .map_err(cmd("digest"))?;
        let ticket = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: Default::default(),
        })
        .map_err(cmd("null ticket"))?;
        self.count(1);
        let mut key = keys::open_persistent(&mut self.ctx, super::TLS_HANDLE)?
            .ok_or(TreError::NotInitialised)?;
        self.count(1);
        let signed = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.sign(
                    KeyHandle::from(key),
                    digest,
                    SignatureScheme::EcDsa {
                        hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
                    },
                    ticket,
                )
                .map_err(cmd("TPM2_Sign"))
            });
        let closed = self.ctx.tr_close(&mut key).map_err(cmd("Esys_TR_Close"));
        let signed = signed?;
        closed?;
        match signed {
            Signature::EcDsa(sig) => {
                crate::tre::ecdsa_der(sig.signature_r().value(), sig.signature_s().value())
            }
            _ => Err(TreError::Mismatch(
                "TLS key returned a non-ECDSA signature".into(),
            )),
        }
    }

    pub(super) fn quote_pcrs(
        &mut self,
        nonce: &[u8],
        pcrs: &PcrSelection,
    ) -> Result<TpmQuote, TreError> {
        if nonce.is_empty() || nonce.len() > MAX_NONCE {
            return Err(TreError::BadRequest(format!(
                "nonce of {} octets (1..={MAX_NONCE})",
                nonce.len()
            )));
        }
        if pcrs.indices().is_empty() {
            return Err(TreError::BadRequest("no PCR selected".into()));
        }
        let (slots, list) = super::pcr_selection_list(pcrs)?;
        let qualifying = Data::try_from(nonce.to_vec()).map_err(cmd("nonce"))?;

        self.count(1);
        let mut ak =
            keys::open_persistent(&mut self.ctx, AK_HANDLE)?.ok_or(TreError::NotInitialised)?;
        self.count(1);
        let quoted = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.quote(
                    KeyHandle::from(ak),
                    qualifying,
                    SignatureScheme::EcDsa {
                        hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
                    },
                    list.clone(),
                )
                .map_err(cmd("TPM2_Quote"))
            });
        let closed = self.ctx.tr_close(&mut ak).map_err(cmd("Esys_TR_Close"));
        let (attest, signature) = quoted?;
        closed?;

        // TPM2_PCR_Read returns at most 8 digests per command.
        self.count(pcrs.indices().len().div_ceil(8) as u64);
        let data = self
            .ctx
            .execute_without_session(|c| pcr::read_all(c, list).map_err(cmd("TPM2_PCR_Read")))?;
        let bank = data
            .pcr_bank(HashingAlgorithm::Sha256)
            .ok_or_else(|| TreError::Command {
                command: "TPM2_PCR_Read",
                detail: "no SHA-256 bank".into(),
            })?;
        let mut pcr_values = Vec::with_capacity(slots.len());
        for slot in &slots {
            let d = bank.get_digest(*slot).ok_or_else(|| TreError::Command {
                command: "TPM2_PCR_Read",
                detail: format!("{slot:?} not read"),
            })?;
            let v: [u8; 32] = d.value().try_into().map_err(|_| TreError::Command {
                command: "TPM2_PCR_Read",
                detail: "digest is not 32 octets".into(),
            })?;
            pcr_values.push(v);
        }
        Ok(TpmQuote {
            attest: attest.marshall().map_err(cmd("marshal TPMS_ATTEST"))?,
            signature: signature
                .marshall()
                .map_err(cmd("marshal TPMT_SIGNATURE"))?,
            pcrs: pcrs.indices().to_vec(),
            pcr_values,
        })
    }
}
