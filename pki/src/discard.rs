//! The discard notice and its acknowledgment (TR 33.812 5.1.3.7.4.2 steps 8-11; 5.1.3.7.4.3
//! step 3).
//!
//! The device, having discarded an old SHO's MCIM from its TRE, signs in the TRE with its TLS
//! key (the key the supplier root certified for its PCID) a [`Notice`]; the old SHO checks it
//! ([`verify_notice`]), stops issuing vectors for the IMSI and answers a signed [`Ack`]
//! (COSE_Sign1 by the SHO's key, `mcim_core::signed`); the device checks that against the SHO
//! CA and relays it to the RO's DPF, which relays to the new SHO only a [`FilteredAck`]: that
//! the old credentials were discarded and when, nothing of the old subscription.
//!
//! The notice is six lines (no field may contain a line break):
//!
//! ```text
//! mcim-discard-v1
//! <PCID>
//! <IMSI of the discarded MCIM>
//! <old SHO>
//! <nonce, hex>
//! <discarded at, seconds since the epoch>
//! ```

use serde::{Deserialize, Serialize};

/// The notice's first line.
pub const DOMAIN: &str = "mcim-discard-v1";

/// What the device says it discarded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// The device.
    pub pcid: String,
    /// The discarded MCIM's IMSI.
    pub imsi: String,
    /// The SHO whose MCIM it was.
    pub sho: String,
    /// 16 random octets, lowercase hex.
    pub nonce: String,
    /// When the TRE discarded it.
    pub discarded_at: u64,
}

/// The old SHO's acknowledgment (the payload of its COSE_Sign1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Always "mcim-discard-ack-v1".
    pub kind: String,
    /// The device.
    pub pcid: String,
    /// The discarded MCIM's IMSI.
    pub imsi: String,
    /// The SHO acknowledging.
    pub sho: String,
    /// When the device discarded it (from the notice).
    pub discarded_at: u64,
    /// When the SHO received the notice.
    pub acknowledged_at: u64,
    /// SHA-256 of the notice's bytes, hex.
    pub notice_sha256: String,
}

/// [`Ack::kind`].
pub const ACK_KIND: &str = "mcim-discard-ack-v1";

/// What the new SHO learns (5.1.3.7.4.2 step 11, "privacy filtering"): no IMSI, no SHO.
/// Nothing else is accepted in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilteredAck {
    /// The new SHO's registration.
    pub registration_id: String,
    /// When the device discarded the old credentials.
    pub discarded_at: u64,
    /// When the old SHO acknowledged.
    pub acknowledged_at: u64,
}

/// Why a notice does not show that this device discarded this MCIM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscardError {
    /// Not in the notice's form.
    #[error("the discard notice is malformed: {0}")]
    Malformed(String),
    /// Not signed by the device's TRE.
    #[error("the discard notice is not signed by this device's TRE: {0}")]
    NotTheDevice(String),
    /// The signature does not verify.
    #[error("the discard notice's signature does not verify")]
    Signature,
    /// It names another device, IMSI or SHO.
    #[error("the discard notice is for another {0}")]
    Another(&'static str),
}

impl From<crate::lines::NotSigned> for DiscardError {
    fn from(e: crate::lines::NotSigned) -> Self {
        use crate::lines::NotSigned as N;
        match e {
            N::NoCertificate => DiscardError::Malformed("no certificate".into()),
            N::NotTheDevice(w) => DiscardError::NotTheDevice(w.into()),
            N::AnotherDevice => DiscardError::Another("device"),
            N::Signature => DiscardError::Signature,
        }
    }
}

impl Notice {
    /// The notice's bytes (what the device signs).
    pub fn to_bytes(&self) -> Result<Vec<u8>, DiscardError> {
        crate::lines::write(
            DOMAIN,
            &[&self.pcid, &self.imsi, &self.sho, &self.nonce],
            self.discarded_at,
        )
        .map_err(|w| DiscardError::Malformed(w.into()))
    }

    /// Parses a notice.
    pub fn parse(bytes: &[u8]) -> Result<Self, DiscardError> {
        let bad = |w: &str| DiscardError::Malformed(w.to_string());
        let (f, discarded_at) = crate::lines::read(bytes, DOMAIN, 4).map_err(bad)?;
        let [pcid, imsi, sho, nonce] = f.as_slice() else {
            return Err(bad("not six lines"));
        };
        if !crate::lines::nonce_ok(nonce) {
            return Err(bad("the nonce is not 16 octets in lowercase hex"));
        }
        Ok(Self {
            pcid: (*pcid).into(),
            imsi: (*imsi).into(),
            sho: (*sho).into(),
            nonce: (*nonce).into(),
            discarded_at,
        })
    }
}

/// Checks a notice: signed by the TLS key the supplier root (`supplier_root_der`) certified
/// for `pcid`, naming `pcid`, `imsi` and `sho`. Returns it.
pub fn verify_notice(
    supplier_root_der: &[u8],
    notice: &[u8],
    signature_der: &[u8],
    tls_chain: &[Vec<u8>],
    pcid: &str,
    imsi: &str,
    sho: &str,
) -> Result<Notice, DiscardError> {
    crate::lines::check_device_signature(
        supplier_root_der,
        notice,
        signature_der,
        tls_chain,
        pcid,
    )?;
    let n = Notice::parse(notice)?;
    if n.pcid != pcid {
        return Err(DiscardError::Another("device"));
    }
    if n.imsi != imsi {
        return Err(DiscardError::Another("IMSI"));
    }
    if n.sho != sho {
        return Err(DiscardError::Another("SHO"));
    }
    Ok(n)
}

/// SHA-256 of a notice, hex (what the acknowledgment names).
pub fn notice_digest(notice: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(notice))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip_and_malformed_ones_are_refused() {
        let n = Notice {
            pcid: "001010000000001".into(),
            imsi: "001020000000001".into(),
            sho: "sho.mcim.local".into(),
            nonce: "00112233445566778899aabbccddeeff".into(),
            discarded_at: 9,
        };
        let b = n.to_bytes().unwrap();
        assert_eq!(Notice::parse(&b), Ok(n.clone()));
        let mut bad = n.clone();
        bad.imsi = "1\n2".into();
        assert!(bad.to_bytes().is_err());
        assert!(Notice::parse(b"mcim-discard-v1\n1\n2").is_err());
        let text = String::from_utf8(b)
            .unwrap()
            .replace("mcim-discard-v1", "mcim-ownership-v1");
        assert!(Notice::parse(text.as_bytes()).is_err());
    }

    /// Only the device's own TRE key, for this PCID, IMSI and SHO.
    #[test]
    fn a_notice_verifies_only_for_the_device_and_what_it_names() {
        use p256::ecdsa::signature::Signer;
        let pcid = "001010000000042";
        let (_dir, key, chain, root) = crate::lines::test_device(pcid);
        let n = Notice {
            pcid: pcid.into(),
            imsi: "001020000000001".into(),
            sho: "sho.mcim.local".into(),
            nonce: "00112233445566778899aabbccddeeff".into(),
            discarded_at: 9,
        }
        .to_bytes()
        .unwrap();
        let sig: p256::ecdsa::Signature = key.sign(&n);
        let sig = sig.to_der().as_bytes().to_vec();
        let check = |pcid: &str, imsi: &str, sho: &str, sig: &[u8]| {
            verify_notice(&root, &n, sig, &chain, pcid, imsi, sho)
        };
        assert!(check(pcid, "001020000000001", "sho.mcim.local", &sig).is_ok());
        assert_eq!(
            check(pcid, "001020000000002", "sho.mcim.local", &sig),
            Err(DiscardError::Another("IMSI"))
        );
        assert_eq!(
            check(pcid, "001020000000001", "sho2.mcim.local", &sig),
            Err(DiscardError::Another("SHO"))
        );
        assert_eq!(
            check("001010000000043", "001020000000001", "sho.mcim.local", &sig),
            Err(DiscardError::Another("device"))
        );
        let other = p256::ecdsa::SigningKey::from_slice(&[8u8; 32]).unwrap();
        let forged: p256::ecdsa::Signature = other.sign(&n);
        assert_eq!(
            check(
                pcid,
                "001020000000001",
                "sho.mcim.local",
                forged.to_der().as_bytes()
            ),
            Err(DiscardError::Signature)
        );
    }
}
