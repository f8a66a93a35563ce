//! The key derivation functions of TPM 2.0 Part 1, 11.4.10, with SHA-256.
//!
//! KDFa (11.4.10.2, SP 800-108 counter mode with HMAC) derives the symmetric and HMAC keys of
//! a protected object from its seed; KDFe (11.4.10.3, SP 800-56A concatenation KDF) turns an
//! ECDH shared secret into the seed. Labels are ASCII and end with one zero octet, added here.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// KDFa(SHA-256, key, label, contextU, contextV, bits): `bits / 8` octets (bits a multiple of 8).
pub fn kdfa_sha256(
    key: &[u8],
    label: &str,
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Zeroizing<Vec<u8>> {
    let len = (bits / 8) as usize;
    let mut out = Zeroizing::new(Vec::with_capacity(len + 32));
    let mut counter: u32 = 1;
    while out.len() < len {
        // HMAC accepts keys of any length, so `new_from_slice` cannot fail here.
        let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(key) else {
            break;
        };
        mac.update(&counter.to_be_bytes());
        mac.update(label.as_bytes());
        mac.update(&[0]);
        mac.update(context_u);
        mac.update(context_v);
        mac.update(&bits.to_be_bytes());
        out.extend_from_slice(&mac.finalize().into_bytes());
        counter += 1;
    }
    out.truncate(len);
    out
}

/// KDFe(SHA-256, Z, label, partyUInfo, partyVInfo, bits): `bits / 8` octets.
pub fn kdfe_sha256(
    z: &[u8],
    label: &str,
    party_u: &[u8],
    party_v: &[u8],
    bits: u32,
) -> Zeroizing<Vec<u8>> {
    let len = (bits / 8) as usize;
    let mut out = Zeroizing::new(Vec::with_capacity(len + 32));
    let mut counter: u32 = 1;
    while out.len() < len {
        let mut h = Sha256::new();
        h.update(counter.to_be_bytes());
        h.update(z);
        h.update(label.as_bytes());
        h.update([0]);
        h.update(party_u);
        h.update(party_v);
        out.extend_from_slice(&h.finalize());
        counter += 1;
    }
    out.truncate(len);
    out
}

/// HMAC-SHA-256 over the concatenation of `parts`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut out = [0u8; 32];
    if let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(key) {
        for p in parts {
            mac.update(p);
        }
        out.copy_from_slice(&mac.finalize().into_bytes());
    }
    out
}

/// SHA-256 over the concatenation of `parts`.
pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_is_counter_mode_hmac_with_terminated_label() {
        // One block computed by hand from the definition.
        let key = [7u8; 32];
        let mut m = Vec::new();
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(b"STORAGE\0");
        m.extend_from_slice(b"ctx");
        m.extend_from_slice(&128u32.to_be_bytes());
        let expect = hmac_sha256(&key, &[&m]);
        assert_eq!(
            &kdfa_sha256(&key, "STORAGE", b"ctx", b"", 128)[..],
            &expect[..16]
        );
        // Longer than one block: the second block uses counter 2.
        let long = kdfa_sha256(&key, "X", b"", b"", 512);
        assert_eq!(long.len(), 64);
        assert_ne!(long[..32], long[32..]);
    }

    #[test]
    fn kdfe_is_concatenation_kdf() {
        let mut m = Vec::new();
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(b"zz");
        m.extend_from_slice(b"DUPLICATE\0");
        m.extend_from_slice(b"uv");
        assert_eq!(
            &kdfe_sha256(b"zz", "DUPLICATE", b"u", b"v", 256)[..],
            &sha256(&[&m])[..]
        );
    }
}
