//! ES256 (ECDSA over P-256 with SHA-256, signatures as r || s) on the hot paths of the roles
//! and the fleet simulator, through ring: the implementation rustls already builds, 3-4x the
//! `p256` crate's rate here (BENCHMARKS.md, "Where the roles' CPU goes"). Keys are still read,
//! written and generated with the `p256` crate; this module only signs and verifies.
//!
//! Every signature the seed's flows carry is this: the PVA's validation result
//! (TR 33.812 5.1.3.6.2 step 10), the SHO's MCIM package (step 12), a PKCS#11 TRE's evidence
//! (steps 8-10), the SHO's discard acknowledgment and instructions (5.1.3.7).

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};

/// Why signing or verifying failed. Never carries key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Es256Error {
    /// The signature does not verify with the key (or is not 64 octets, or the key is not a
    /// point on P-256).
    #[error("the signature does not verify")]
    BadSignature,
    /// The private key could not be taken (not a P-256 key).
    #[error("not a usable P-256 signing key")]
    BadKey,
    /// The system's random source failed while signing.
    #[error("ECDSA signing failed")]
    Signing,
}

/// Verifies an ES256 `signature` (r || s, 64 octets) of `message` by the P-256 public key
/// `point` (SEC1, uncompressed).
pub fn verify_point(point: &[u8], message: &[u8], signature: &[u8]) -> Result<(), Es256Error> {
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
        .verify(message, signature)
        .map_err(|_| Es256Error::BadSignature)
}

/// [`verify_point`] with the key as the `p256` crate holds it.
pub fn verify(
    key: &p256::ecdsa::VerifyingKey,
    message: &[u8],
    signature: &[u8],
) -> Result<(), Es256Error> {
    verify_point(key.to_sec1_point(false).as_bytes(), message, signature)
}

/// A P-256 signing key held by ring, for a party that signs on a hot path (the PVA's results,
/// the SHO's packages). Its `Debug` shows the public key only.
pub struct Signer {
    /// Boxed: ring's key pair is ~300 octets, and those who hold a signer are moved around.
    pair: Box<EcdsaKeyPair>,
    rng: SystemRandom,
}

impl Signer {
    /// The key `key` (read with the `p256` crate, e.g. `mcim_pki::dev::signing_key`).
    pub fn new(key: &p256::ecdsa::SigningKey) -> Result<Self, Es256Error> {
        let pkcs8 = zeroize::Zeroizing::new(
            p256::pkcs8::EncodePrivateKey::to_pkcs8_der(key)
                .map_err(|_| Es256Error::BadKey)?
                .as_bytes()
                .to_vec(),
        );
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .map(Box::new)
            .map_err(|_| Es256Error::BadKey)?;
        Ok(Self { pair, rng })
    }

    /// r || s of `message`.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Es256Error> {
        self.pair
            .sign(&self.rng, message)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| Es256Error::Signing)
    }

    /// The public key, SEC1 uncompressed.
    pub fn public_point(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }
}

/// Whatever makes ES256 signatures: a [`Signer`] on the hot paths, the `p256` crate's key in
/// tools and tests. [`crate::signed::sign`] takes either.
pub trait Es256Key {
    /// r || s of `message`.
    fn sign_es256(&self, message: &[u8]) -> Result<Vec<u8>, Es256Error>;
}

impl Es256Key for Signer {
    fn sign_es256(&self, message: &[u8]) -> Result<Vec<u8>, Es256Error> {
        self.sign(message)
    }
}

impl Es256Key for p256::ecdsa::SigningKey {
    fn sign_es256(&self, message: &[u8]) -> Result<Vec<u8>, Es256Error> {
        let s: p256::ecdsa::Signature = p256::ecdsa::signature::Signer::sign(self, message);
        Ok(s.to_bytes().to_vec())
    }
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("public", &hex::encode(self.public_point()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::{Signer as _, Verifier as _};
    use p256::elliptic_curve::Generate;

    fn key() -> p256::ecdsa::SigningKey {
        p256::ecdsa::SigningKey::generate_from_rng(&mut rand::rng())
    }

    #[test]
    fn ring_and_the_p256_crate_agree_both_ways() {
        let sk = key();
        let vk = p256::ecdsa::VerifyingKey::from(&sk);
        let signer = Signer::new(&sk).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(signer.public_point(), vk.to_sec1_point(false).as_bytes());
        // ring's signature verifies with the p256 crate ...
        let s = signer.sign(b"package").unwrap_or_else(|e| panic!("{e}"));
        let sig = p256::ecdsa::Signature::from_slice(&s).unwrap_or_else(|e| panic!("{e}"));
        assert!(vk.verify(b"package", &sig).is_ok());
        // ... and the p256 crate's with ring.
        let theirs: p256::ecdsa::Signature = sk.sign(b"result");
        assert_eq!(verify(&vk, b"result", &theirs.to_bytes()), Ok(()));
    }

    #[test]
    fn a_signature_of_another_message_key_or_length_is_refused() {
        let sk = key();
        let vk = p256::ecdsa::VerifyingKey::from(&sk);
        let signer = Signer::new(&sk).unwrap_or_else(|e| panic!("{e}"));
        let s = signer.sign(b"m").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(verify(&vk, b"m", &s), Ok(()));
        assert_eq!(verify(&vk, b"n", &s), Err(Es256Error::BadSignature));
        let other = p256::ecdsa::VerifyingKey::from(&key());
        assert_eq!(verify(&other, b"m", &s), Err(Es256Error::BadSignature));
        assert_eq!(verify(&vk, b"m", &s[..63]), Err(Es256Error::BadSignature));
        let mut flipped = s.clone();
        flipped[10] ^= 1;
        assert_eq!(verify(&vk, b"m", &flipped), Err(Es256Error::BadSignature));
        assert_eq!(
            verify_point(&[4u8; 65], b"m", &s),
            Err(Es256Error::BadSignature)
        );
    }

    #[test]
    fn debug_shows_the_public_key_only() {
        let sk = key();
        let signer = Signer::new(&sk).unwrap_or_else(|e| panic!("{e}"));
        let d = format!("{signer:?}");
        assert!(d.contains(&hex::encode(signer.public_point())));
        assert!(!d.contains(&hex::encode(sk.to_bytes())));
    }
}
