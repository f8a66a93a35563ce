//! MCIM secrets wrapped for a PKCS#11 token: the PKCS#11 TRE's counterpart of
//! [`crate::tpm::import`] (TR 33.812 5.1.3.6.2 step 12, "encrypted for the TRE").
//!
//! 1. an ephemeral P-256 key pair; Z = x(d_e · Q_token), where Q_token is the token's unwrap
//!    key (`mcim.unwrap`, CKA_DERIVE);
//! 2. KEK = Z as an AES-256 key: what `C_DeriveKey(CKM_ECDH1_DERIVE, kdf = CKD_NULL)` yields
//!    on the token with CKA_KEY_TYPE = CKK_AES, CKA_VALUE_LEN = 32 (CKD_NULL is the KDF every
//!    token implements; SoftHSM2 implements no other);
//! 3. the secret wrapped with AES key wrap with padding (RFC 5649, CKM_AES_KEY_WRAP_PAD).
//!
//! The device unwraps K into a sensitive, never-extractable CKK_AES object and runs MILENAGE
//! with CKM_AES_ECB on it; the plaintext K never leaves the token.
//!
//! Tokens without ECDH get an RSA-2048 unwrap key instead, and the secret is encrypted to it
//! with RSA-OAEP (CKM_RSA_PKCS_OAEP) with SHA-1 and MGF1-SHA-1: the one OAEP parameter set
//! every token implements (SoftHSM2 accepts no other), and OAEP's security does not rest on
//! SHA-1's collision resistance. The blob is then the bare OAEP ciphertext ([`RsaBlob`]).

use aes_kw::KwpAes256;
use rand::CryptoRng;
use zeroize::Zeroizing;

/// DER prefix of a P-256 SubjectPublicKeyInfo with an uncompressed point (RFC 5480).
pub const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// Why wrapping or parsing failed. Never carries secret bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenWrapError {
    /// The token's public key is not a P-256 SPKI with a point on the curve.
    #[error("the token's unwrap key is not a P-256 public key")]
    BadPublicKey,
    /// The token's RSA unwrap key's modulus is outside
    /// [`RSA_MODULUS_BITS`] (or the key does not parse).
    #[error("the token's RSA unwrap key must have a modulus of 2048 to 4096 bits")]
    BadRsaKey,
    /// The secret's length is not 1..=64 octets.
    #[error("a wrapped secret must be 1 to 64 octets")]
    BadLength,
    /// A blob that is too short or has a bad point.
    #[error("malformed token blob")]
    Malformed,
}

/// A secret wrapped for one token: the ephemeral public point and the AES-KWP ciphertext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBlob {
    /// The ephemeral public key, SEC1 uncompressed (what CKM_ECDH1_DERIVE's pPublicData takes).
    pub ephemeral_point: [u8; 65],
    /// AES-KWP(KEK, secret).
    pub wrapped: Vec<u8>,
}

impl TokenBlob {
    /// point || wrapped.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = self.ephemeral_point.to_vec();
        v.extend_from_slice(&self.wrapped);
        v
    }

    /// Parses [`TokenBlob::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Result<Self, TokenWrapError> {
        if b.len() < 65 + 16 || b[0] != 0x04 || !(b.len() - 65).is_multiple_of(8) {
            return Err(TokenWrapError::Malformed);
        }
        let mut ephemeral_point = [0u8; 65];
        ephemeral_point.copy_from_slice(&b[..65]);
        Ok(Self {
            ephemeral_point,
            wrapped: b[65..].to_vec(),
        })
    }
}

/// The P-256 point of a DER SPKI.
pub fn spki_point(spki: &[u8]) -> Result<p256::PublicKey, TokenWrapError> {
    let point = spki
        .strip_prefix(&P256_SPKI_PREFIX[..])
        .filter(|p| p.len() == 65)
        .ok_or(TokenWrapError::BadPublicKey)?;
    p256::PublicKey::from_sec1_bytes(point).map_err(|_| TokenWrapError::BadPublicKey)
}

/// Wraps `secret` (K, OPc) for the token whose unwrap key is `token_spki`: ECDH + AES-KWP for
/// a P-256 key (an RSA key needs [`wrap_for_token_rsa`]). The ephemeral key comes from the
/// system's random source and is used once (ring's ECDH, the SHO's hot path: two wraps per
/// MCIM).
pub fn wrap_for_token(token_spki: &[u8], secret: &[u8]) -> Result<TokenBlob, TokenWrapError> {
    use ring::agreement::{ECDH_P256, EphemeralPrivateKey, UnparsedPublicKey, agree_ephemeral};
    if secret.is_empty() || secret.len() > 64 {
        return Err(TokenWrapError::BadLength);
    }
    let q = token_spki
        .strip_prefix(&P256_SPKI_PREFIX[..])
        .filter(|p| p.len() == 65)
        .ok_or(TokenWrapError::BadPublicKey)?;
    let rng = ring::rand::SystemRandom::new();
    let eph = EphemeralPrivateKey::generate(&ECDH_P256, &rng)
        .map_err(|_| TokenWrapError::BadPublicKey)?;
    let mut ephemeral_point = [0u8; 65];
    let public = eph
        .compute_public_key()
        .map_err(|_| TokenWrapError::BadPublicKey)?;
    if public.as_ref().len() != 65 {
        return Err(TokenWrapError::BadPublicKey);
    }
    ephemeral_point.copy_from_slice(public.as_ref());
    // Z = x(d_e · Q_token), 32 octets: the KEK (CKD_NULL). ring refuses a point off the curve.
    let kw = agree_ephemeral(eph, &UnparsedPublicKey::new(&ECDH_P256, q), |z| {
        <KwpAes256 as aes_kw::KeyInit>::new_from_slice(z).map_err(|_| TokenWrapError::BadPublicKey)
    })
    .map_err(|_| TokenWrapError::BadPublicKey)??;
    let mut buf = vec![0u8; secret.len() + 16];
    let n = kw
        .wrap_key(secret, &mut buf)
        .map_err(|_| TokenWrapError::BadLength)?
        .len();
    buf.truncate(n);
    Ok(TokenBlob {
        ephemeral_point,
        wrapped: buf,
    })
}

/// The RSA unwrap key sizes accepted, in bits of the modulus: 2048 at least (NIST SP 800-57's
/// floor for 112-bit security; what `tred` makes), 4096 at most (the largest key tokens
/// commonly make; a larger one only makes each wrap cost the SHO more).
pub const RSA_MODULUS_BITS: std::ops::RangeInclusive<u32> = 2048..=4096;

/// A secret RSA-OAEP-encrypted to a token's RSA unwrap key (the fallback for tokens
/// without ECDH).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RsaBlob(pub Vec<u8>);

/// Whether `spki` is an RSA public key (the token's fallback unwrap key).
pub fn is_rsa_spki(spki: &[u8]) -> bool {
    use rsa::pkcs8::DecodePublicKey;
    rsa::PublicKey::from_public_key_der(spki).is_ok()
}

/// Encrypts `secret` to the token's RSA unwrap key with RSA-OAEP (SHA-1, MGF1-SHA-1).
pub fn wrap_for_token_rsa<R: CryptoRng + ?Sized>(
    token_spki: &[u8],
    secret: &[u8],
    rng: &mut R,
) -> Result<RsaBlob, TokenWrapError> {
    use rsa::pkcs8::DecodePublicKey;
    use rsa::traits::PublicKeyParts;
    if secret.is_empty() || secret.len() > 64 {
        return Err(TokenWrapError::BadLength);
    }
    let key =
        rsa::PublicKey::from_public_key_der(token_spki).map_err(|_| TokenWrapError::BadRsaKey)?;
    // The modulus's own bit length: `size()` rounds up to octets, so 2041 bits would pass.
    if !RSA_MODULUS_BITS.contains(&key.n().bit_width()) {
        return Err(TokenWrapError::BadRsaKey);
    }
    key.encrypt(rng, rsa::Oaep::<sha1::Sha1>::new(), secret)
        .map(RsaBlob)
        .map_err(|_| TokenWrapError::BadLength)
}

/// What a token does with a [`TokenBlob`] (C_DeriveKey with CKM_ECDH1_DERIVE, then
/// C_UnwrapKey with CKM_AES_KEY_WRAP_PAD), in software, with the unwrap key in process memory:
/// for the fleet benchmark's simulated devices (`mcimctl fleet run`) and tests, never for a
/// device, whose key stays in its token.
pub fn unwrap_in_software(
    unwrap_key: &p256::SecretKey,
    blob: &TokenBlob,
) -> Result<Zeroizing<Vec<u8>>, TokenWrapError> {
    let q = p256::PublicKey::from_sec1_bytes(&blob.ephemeral_point)
        .map_err(|_| TokenWrapError::Malformed)?;
    let z = p256::ecdh::diffie_hellman(unwrap_key.to_nonzero_scalar(), q.as_affine());
    let kw = <KwpAes256 as aes_kw::KeyInit>::new_from_slice(z.raw_secret_bytes().as_slice())
        .map_err(|_| TokenWrapError::Malformed)?;
    let mut out = Zeroizing::new(vec![0u8; blob.wrapped.len()]);
    let n = kw
        .unwrap_key(&blob.wrapped, &mut out)
        .map_err(|_| TokenWrapError::Malformed)?
        .len();
    out.truncate(n);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::elliptic_curve::Generate;
    use p256::elliptic_curve::sec1::ToSec1Point;

    fn unwrap(sk: &p256::SecretKey, b: &TokenBlob) -> Vec<u8> {
        unwrap_in_software(sk, b)
            .map(|v| v.to_vec())
            .unwrap_or_default()
    }

    /// The SPKI of an RSA public key whose modulus has exactly `bits` bits (2^(bits-1) + 1:
    /// odd, not a product of two primes, which encryption does not care about).
    fn rsa_spki_of_bits(bits: u32) -> Vec<u8> {
        use rsa::pkcs8::EncodePublicKey;
        let mut n = vec![0u8; bits.div_ceil(8) as usize];
        n[0] = 1 << ((bits - 1) % 8);
        if let Some(last) = n.last_mut() {
            *last |= 1;
        }
        let key = rsa::PublicKey::new_with_size_limits(
            rsa::BoxedUint::from_be_slice_vartime(&n),
            rsa::BoxedUint::from(65537u32),
            1024..=16384,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        key.to_public_key_der()
            .unwrap_or_else(|e| panic!("{e}"))
            .as_bytes()
            .to_vec()
    }

    #[test]
    fn an_rsa_unwrap_key_must_have_2048_to_4096_bits() {
        let mut rng = rand::rng();
        for bits in [2048, 3072, 4096] {
            let spki = rsa_spki_of_bits(bits);
            assert!(is_rsa_spki(&spki), "{bits}");
            let blob = wrap_for_token_rsa(&spki, &[7u8; 16], &mut rng);
            assert_eq!(blob.map(|b| b.0.len()), Ok(bits as usize / 8), "{bits}");
        }
        // 2041 bits is 256 octets: counting octets let it through.
        for bits in [1024, 2041, 2047, 4097, 8192] {
            let spki = rsa_spki_of_bits(bits);
            assert_eq!(
                wrap_for_token_rsa(&spki, &[7u8; 16], &mut rng),
                Err(TokenWrapError::BadRsaKey),
                "{bits}"
            );
        }
        // Not RSA at all: the RSA error, not the P-256 one.
        assert_eq!(
            wrap_for_token_rsa(&[0x30, 0x00], &[7u8; 16], &mut rng),
            Err(TokenWrapError::BadRsaKey)
        );
        assert!(
            TokenWrapError::BadRsaKey.to_string().contains("RSA"),
            "the message names the key's kind"
        );
    }

    #[test]
    fn round_trip_and_refusals() {
        let mut rng = rand::rng();
        let sk = p256::SecretKey::generate_from_rng(&mut rng);
        let mut spki = P256_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(sk.public_key().to_sec1_point(false).as_bytes());
        let b = wrap_for_token(&spki, &[7u8; 16]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.wrapped.len(), 24);
        assert_eq!(TokenBlob::from_bytes(&b.to_bytes()), Ok(b.clone()));
        assert_eq!(unwrap(&sk, &b), vec![7u8; 16]);
        // A fresh ephemeral key each time.
        let again = wrap_for_token(&spki, &[7u8; 16]).unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(again.ephemeral_point, b.ephemeral_point);
        assert_eq!(unwrap(&sk, &again), vec![7u8; 16]);
        assert_eq!(
            wrap_for_token(&spki[1..], &[1]),
            Err(TokenWrapError::BadPublicKey)
        );
        assert_eq!(wrap_for_token(&spki, &[]), Err(TokenWrapError::BadLength));
        assert_eq!(
            wrap_for_token(&spki, &[1; 65]),
            Err(TokenWrapError::BadLength)
        );
        // A point off the curve (y changed) is refused, not used.
        let mut off = spki.clone();
        let last = off.len() - 1;
        off[last] ^= 1;
        assert_eq!(
            wrap_for_token(&off, &[1]),
            Err(TokenWrapError::BadPublicKey)
        );
        assert!(TokenBlob::from_bytes(&[4; 70]).is_err());
    }
}
