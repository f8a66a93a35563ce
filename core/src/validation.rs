//! The PVA's validation result (5.1.3.6.2 step 10): signed by the PVA, bound to one device
//! (PCID), one validation and its nonce, and short-lived. The SHO relies on it before it builds
//! a package (step 11) and the RO's DPF checks it again before it lets a device download one.

use p256::ecdsa::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::signed::{self, SignedError};

/// The signed content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationResult {
    /// The PVA's validation.
    pub validation_id: String,
    /// The device validated.
    pub pcid: String,
    /// The nonce the device quoted, hex.
    pub nonce: String,
    /// "trusted": the PVA signs only positive results.
    pub verdict: String,
    /// Seconds since the epoch after which nobody may rely on it.
    pub expires_at: u64,
    /// Where the validated platform runs AKA: "in_tre" (K never leaves the TRE) or
    /// "unsealed_in_host" (a TPM without TPM2_EncryptDecrypt2: K unsealed into the validated
    /// daemon's memory for each authentication). Stated by the device's daemon, whose own
    /// integrity is what the PVA validated; the SHO picks the package's K form by it and
    /// refuses a subscription that requires AKA in the TRE.
    #[serde(default)]
    pub aka_execution: String,
}

/// [`ValidationResult::aka_execution`] for AKA inside the TRE.
pub const AKA_IN_TRE: &str = "in_tre";
/// [`ValidationResult::aka_execution`] for K unsealed into host memory.
pub const AKA_UNSEALED_IN_HOST: &str = "unsealed_in_host";

/// Why a result cannot be relied on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// Envelope or signature.
    #[error("validation result: {0}")]
    Signed(#[from] SignedError),
    /// Not a positive result.
    #[error("the validation result is not \"trusted\"")]
    NotTrusted,
    /// For another device.
    #[error("the validation result is for device {0}")]
    OtherDevice(String),
    /// Expired.
    #[error("the validation result expired at {expired_at} (now {now})")]
    Stale {
        /// its expiry
        expired_at: u64,
        /// the time of the check
        now: u64,
    },
}

/// Signs a positive result (the PVA's side).
pub fn sign<K: crate::es256::Es256Key + ?Sized>(
    key: &K,
    r: &ValidationResult,
) -> Result<Vec<u8>, ValidationError> {
    Ok(signed::sign(key, r, None)?)
}

/// Verifies a result with the PVA's key and checks it is positive, for `pcid`, and not
/// expired at `now` (seconds since the epoch).
pub fn verify(
    bytes: &[u8],
    pva: &VerifyingKey,
    pcid: &str,
    now: u64,
) -> Result<ValidationResult, ValidationError> {
    let r: ValidationResult = signed::open(bytes, pva)?;
    if r.verdict != "trusted" {
        return Err(ValidationError::NotTrusted);
    }
    if r.pcid != pcid {
        return Err(ValidationError::OtherDevice(r.pcid));
    }
    if now >= r.expires_at {
        return Err(ValidationError::Stale {
            expired_at: r.expires_at,
            now,
        });
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::elliptic_curve::Generate;

    #[test]
    fn a_result_is_relied_on_only_for_its_device_and_before_it_expires() {
        let key = SigningKey::generate_from_rng(&mut rand::rng());
        let vk = VerifyingKey::from(&key);
        let r = ValidationResult {
            aka_execution: AKA_IN_TRE.into(),
            validation_id: "v".into(),
            pcid: "001010000000001".into(),
            nonce: "00".into(),
            verdict: "trusted".into(),
            expires_at: 100,
        };
        let s = sign(&key, &r).unwrap_or_default();
        assert_eq!(verify(&s, &vk, "001010000000001", 99), Ok(r.clone()));
        assert_eq!(
            verify(&s, &vk, "001010000000001", 100),
            Err(ValidationError::Stale {
                expired_at: 100,
                now: 100
            })
        );
        assert!(matches!(
            verify(&s, &vk, "001010000000002", 99),
            Err(ValidationError::OtherDevice(_))
        ));
        let mut untrusted = r;
        untrusted.verdict = "untrusted".into();
        let s = sign(&key, &untrusted).unwrap_or_default();
        assert_eq!(
            verify(&s, &vk, "001010000000001", 1),
            Err(ValidationError::NotTrusted)
        );
    }
}
