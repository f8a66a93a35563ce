//! Signed statements between the roles and the device: a COSE_Sign1 (RFC 9052, ES256) whose
//! payload is JSON, optionally carrying the signer's certificate in the protected header
//! (`x5chain`, RFC 9360 label 33) so the receiver can check it against its roots. The MCIM
//! package (annex x.2.3) and the PVA's validation result (5.1.3.6.2 step 10) are both this.

use coset::{CborSerializable, CoseSign1, CoseSign1Builder, HeaderBuilder, Label, iana};
use p256::ecdsa::VerifyingKey;

use crate::es256::{self, Es256Key};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// RFC 9360 `x5chain`.
const X5CHAIN: i64 = 33;

/// Why a signed statement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignedError {
    /// Not a COSE_Sign1 with an ES256 signature and a JSON payload of the expected shape.
    #[error("malformed signed statement: {0}")]
    Malformed(String),
    /// The signature does not verify with the key given.
    #[error("the signature does not verify")]
    BadSignature,
}

/// Signs `payload` as JSON with `key` (an [`es256::Signer`] or a `p256` key); `cert` (DER)
/// goes into the protected header.
pub fn sign<T: Serialize, K: Es256Key + ?Sized>(
    key: &K,
    payload: &T,
    cert: Option<&[u8]>,
) -> Result<Vec<u8>, SignedError> {
    sign_with(
        |m| {
            key.sign_es256(m)
                .map_err(|e| SignedError::Malformed(e.to_string()))
        },
        payload,
        cert,
    )
}

/// [`sign`] with a signer of its own: `signer` returns ES256's r || s (64 octets) over the
/// message it is given (a key held elsewhere, or a faster implementation).
pub fn sign_with<T: Serialize>(
    signer: impl FnOnce(&[u8]) -> Result<Vec<u8>, SignedError>,
    payload: &T,
    cert: Option<&[u8]>,
) -> Result<Vec<u8>, SignedError> {
    let body = serde_json::to_vec(payload).map_err(|e| SignedError::Malformed(e.to_string()))?;
    let mut header = HeaderBuilder::new().algorithm(iana::Algorithm::ES256);
    if let Some(c) = cert {
        header = header.value(X5CHAIN, ciborium_bytes(c));
    }
    CoseSign1Builder::new()
        .protected(header.build())
        .payload(body)
        .try_create_signature(&[], signer)?
        .build()
        .to_vec()
        .map_err(|e| SignedError::Malformed(e.to_string()))
}

fn ciborium_bytes(b: &[u8]) -> coset::cbor::Value {
    coset::cbor::Value::Bytes(b.to_vec())
}

fn parse(bytes: &[u8]) -> Result<CoseSign1, SignedError> {
    let s = CoseSign1::from_slice(bytes).map_err(|e| SignedError::Malformed(e.to_string()))?;
    if s.protected.header.alg
        != Some(coset::RegisteredLabelWithPrivate::Assigned(
            iana::Algorithm::ES256,
        ))
    {
        return Err(SignedError::Malformed("not ES256".into()));
    }
    Ok(s)
}

/// The signer's certificate from the protected header, NOT verified: the caller checks it
/// chains to a root it trusts, then verifies the statement with its key ([`open`]).
pub fn signer_certificate(bytes: &[u8]) -> Result<Vec<u8>, SignedError> {
    let s = parse(bytes)?;
    s.protected
        .header
        .rest
        .iter()
        .find_map(|(l, v)| match (l, v) {
            (Label::Int(X5CHAIN), coset::cbor::Value::Bytes(b)) => Some(b.clone()),
            _ => None,
        })
        .ok_or_else(|| SignedError::Malformed("no signer certificate".into()))
}

/// Verifies the signature with `key`, then parses the payload. Nothing unverified comes out.
pub fn open<T: DeserializeOwned>(bytes: &[u8], key: &VerifyingKey) -> Result<T, SignedError> {
    let s = parse(bytes)?;
    s.verify_signature(&[], |sig, m| {
        es256::verify(key, m, sig).map_err(|_| SignedError::BadSignature)
    })?;
    let payload = s
        .payload
        .as_deref()
        .ok_or_else(|| SignedError::Malformed("no payload".into()))?;
    serde_json::from_slice(payload).map_err(|e| SignedError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::elliptic_curve::Generate;

    #[derive(Serialize, serde::Deserialize, PartialEq, Debug)]
    struct P {
        a: u32,
    }

    #[test]
    fn opens_only_with_the_signers_key_and_carries_the_certificate() {
        let mut rng = rand::rng();
        let key = SigningKey::generate_from_rng(&mut rng);
        let other = SigningKey::generate_from_rng(&mut rng);
        let s = sign(&key, &P { a: 7 }, Some(b"cert")).unwrap_or_default();
        assert_eq!(open::<P>(&s, &VerifyingKey::from(&key)), Ok(P { a: 7 }));
        assert_eq!(
            open::<P>(&s, &VerifyingKey::from(&other)),
            Err(SignedError::BadSignature)
        );
        assert_eq!(signer_certificate(&s), Ok(b"cert".to_vec()));
        let mut bad = s.clone();
        if let Some(last) = bad.last_mut() {
            *last ^= 1;
        }
        assert!(open::<P>(&bad, &VerifyingKey::from(&key)).is_err());
        let plain = sign(&key, &P { a: 1 }, None).unwrap_or_default();
        assert!(signer_certificate(&plain).is_err());
    }
}
