//! Attestation evidence of a PKCS#11 TRE (TR 33.812 5.1.3.6.2 steps 8-10), which has no
//! quote: the token's attestation key signs the verifier's nonce together with a measurement
//! the daemon made of itself (SHA-256 of its executable and configuration). It is weaker than
//! a TPM quote: nothing below the daemon (boot chain, kernel) is measured, and the
//! measurement is the daemon's own word. The PVA's policy decides whether that is enough.

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::token_wrap::spki_point;

/// The payload's domain string.
pub const DOMAIN: &str = "mcim-pkcs11-evidence-v1";

/// What the token signs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidencePayload {
    /// [`DOMAIN`].
    pub domain: String,
    /// The device's PCID.
    pub pcid: String,
    /// The verifier's nonce, hex.
    pub nonce: String,
    /// SHA-256 of the daemon's executable and configuration, hex.
    pub measurement: String,
}

impl EvidencePayload {
    /// A payload for `nonce`.
    pub fn new(pcid: &str, nonce: &[u8], measurement: &[u8; 32]) -> Self {
        Self {
            domain: DOMAIN.into(),
            pcid: pcid.into(),
            nonce: hex::encode(nonce),
            measurement: hex::encode(measurement),
        }
    }

    /// The bytes that are signed.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Why evidence was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EvidenceError {
    /// The attestation key is not a P-256 SPKI.
    #[error("the attestation key is not a P-256 public key")]
    BadKey,
    /// Not our payload.
    #[error("malformed evidence payload")]
    Malformed,
    /// The signature does not verify.
    #[error("the evidence signature does not verify")]
    BadSignature,
    /// Another nonce.
    #[error("the evidence does not carry our nonce")]
    WrongNonce,
}

/// Verifies the token's evidence against its attestation key (DER SPKI) and our nonce.
pub fn verify(
    ak_spki: &[u8],
    payload: &[u8],
    signature: &[u8],
    nonce: &[u8],
) -> Result<EvidencePayload, EvidenceError> {
    // The token signed SHA-256(payload) (CKM_ECDSA over the digest): ES256 of the payload.
    let key = spki_point(ak_spki).map_err(|_| EvidenceError::BadKey)?;
    let point = p256::elliptic_curve::sec1::ToSec1Point::to_sec1_point(&key, false);
    crate::es256::verify_point(point.as_bytes(), payload, signature)
        .map_err(|_| EvidenceError::BadSignature)?;
    let p: EvidencePayload =
        serde_json::from_slice(payload).map_err(|_| EvidenceError::Malformed)?;
    if p.domain != DOMAIN {
        return Err(EvidenceError::Malformed);
    }
    let want = hex::encode(nonce);
    if !bool::from(p.nonce.as_bytes().ct_eq(want.as_bytes())) {
        return Err(EvidenceError::WrongNonce);
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tpm::kdf::sha256;
    use p256::ecdsa::signature::hazmat::PrehashSigner;
    use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
    use p256::elliptic_curve::Generate;

    #[test]
    fn verifies_and_refuses() {
        let sk = SigningKey::generate_from_rng(&mut rand::rng());
        let mut spki = crate::token_wrap::P256_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(VerifyingKey::from(&sk).to_sec1_point(false).as_bytes());
        let p = EvidencePayload::new("001010000000001", b"nonce-nonce-nonce", &[7; 32]).to_bytes();
        let sig: Signature = sk
            .sign_prehash(&sha256(&[&p]))
            .unwrap_or_else(|e| panic!("{e}"));
        let sig = sig.to_bytes();
        assert!(verify(&spki, &p, &sig, b"nonce-nonce-nonce").is_ok());
        assert_eq!(
            verify(&spki, &p, &sig, b"other"),
            Err(EvidenceError::WrongNonce)
        );
        let mut bad = p.clone();
        bad[5] ^= 1;
        assert_eq!(
            verify(&spki, &bad, &sig, b"nonce-nonce-nonce"),
            Err(EvidenceError::BadSignature)
        );
    }
}
