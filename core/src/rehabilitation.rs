//! Rehabilitation tokens (TR 33.812 5.1.2.2): the equipment supplier's authorisation to bring
//! one device's TRE out of lockdown, after tampering was detected.
//!
//! A token is a COSE_Sign1 (RFC 9052, ES256) by the supplier's rehabilitation key over
//! `{"domain": "mcim-rehabilitate-v1", "pcid": ..., "counter": ...}`. It names the device
//! (PCID) and the TRE's monotonic counter at the time of the request, so it works once, on
//! one device: rehabilitating advances the counter.

use coset::{CborSerializable, CoseSign1, CoseSign1Builder, HeaderBuilder, iana};
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::identity::Pcid;

/// The payload's domain string.
pub const DOMAIN: &str = "mcim-rehabilitate-v1";

#[derive(Serialize, Deserialize)]
struct Payload {
    domain: String,
    pcid: String,
    counter: u64,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RehabError {
    /// Not a COSE_Sign1 with an ES256 signature and our payload.
    #[error("malformed rehabilitation token: {0}")]
    Malformed(String),
    /// The signature is not the supplier's.
    #[error("the rehabilitation token is not signed by the supplier's key")]
    BadSignature,
    /// For another device.
    #[error("the rehabilitation token is for device {0}")]
    OtherDevice(String),
    /// For another counter value: used already, or made for an older state.
    #[error("the rehabilitation token is for counter {token}, the TRE is at {tre}")]
    Stale {
        /// in the token
        token: u64,
        /// in the TRE
        tre: u64,
    },
}

/// Signs a token for `pcid` at `counter` (the supplier's side).
pub fn issue(key: &SigningKey, pcid: &Pcid, counter: u64) -> Result<Vec<u8>, RehabError> {
    let payload = serde_json::to_vec(&Payload {
        domain: DOMAIN.into(),
        pcid: pcid.as_str().into(),
        counter,
    })
    .map_err(|e| RehabError::Malformed(e.to_string()))?;
    let protected = HeaderBuilder::new()
        .algorithm(iana::Algorithm::ES256)
        .build();
    CoseSign1Builder::new()
        .protected(protected)
        .payload(payload)
        .create_signature(&[], |m| {
            let s: Signature = key.sign(m);
            s.to_bytes().to_vec()
        })
        .build()
        .to_vec()
        .map_err(|e| RehabError::Malformed(e.to_string()))
}

/// Checks a token against the supplier's key, this device's PCID and the TRE's counter.
pub fn verify(
    token: &[u8],
    supplier: &VerifyingKey,
    pcid: &Pcid,
    counter: u64,
) -> Result<(), RehabError> {
    let sign1 = CoseSign1::from_slice(token).map_err(|e| RehabError::Malformed(e.to_string()))?;
    if sign1.protected.header.alg
        != Some(coset::RegisteredLabelWithPrivate::Assigned(
            iana::Algorithm::ES256,
        ))
    {
        return Err(RehabError::Malformed("not ES256".into()));
    }
    sign1.verify_signature(&[], |sig, m| {
        let sig = Signature::from_slice(sig).map_err(|_| RehabError::BadSignature)?;
        supplier
            .verify(m, &sig)
            .map_err(|_| RehabError::BadSignature)
    })?;
    let payload = sign1
        .payload
        .as_deref()
        .ok_or_else(|| RehabError::Malformed("no payload".into()))?;
    let p: Payload =
        serde_json::from_slice(payload).map_err(|e| RehabError::Malformed(e.to_string()))?;
    if p.domain != DOMAIN {
        return Err(RehabError::Malformed(format!("domain {}", p.domain)));
    }
    if p.pcid != pcid.as_str() {
        return Err(RehabError::OtherDevice(p.pcid));
    }
    if p.counter != counter {
        return Err(RehabError::Stale {
            token: p.counter,
            tre: counter,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::elliptic_curve::Generate;

    #[test]
    fn a_token_works_for_its_device_and_counter_only() {
        let mut rng = rand::rng();
        let key = SigningKey::generate_from_rng(&mut rng);
        let other = SigningKey::generate_from_rng(&mut rng);
        let pcid = Pcid::new("001010000000001").unwrap_or_else(|e| panic!("{e}"));
        let t = issue(&key, &pcid, 7).unwrap_or_default();
        let vk = VerifyingKey::from(&key);
        assert_eq!(verify(&t, &vk, &pcid, 7), Ok(()));
        assert_eq!(
            verify(&t, &vk, &pcid, 8),
            Err(RehabError::Stale { token: 7, tre: 8 })
        );
        let p2 = Pcid::new("001010000000002").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            verify(&t, &vk, &p2, 7),
            Err(RehabError::OtherDevice(_))
        ));
        assert_eq!(
            verify(&t, &VerifyingKey::from(&other), &pcid, 7),
            Err(RehabError::BadSignature)
        );
        let mut bad = t.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(verify(&bad, &vk, &pcid, 7), Err(RehabError::BadSignature));
        assert!(matches!(
            verify(&[1, 2, 3], &vk, &pcid, 7),
            Err(RehabError::Malformed(_))
        ));
    }
}
