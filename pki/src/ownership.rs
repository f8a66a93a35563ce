//! Proof of ownership (TR 33.812 annex x.2.3: "device-specific authentication tokens provided
//! to the SHO by the M2ME user"; 5.1.2.4: an MCIM is provisioned only to an M2ME that acts on
//! behalf of the subscriber who registered). The device signs, in its TRE, with its TLS key, a
//! statement that names one subscriber and one SHO; only whoever may use the device's
//! owner-only local API can obtain one. The SHO checks the signature against the key the
//! supplier root certified for the PCID, and that the statement names this contract.
//!
//! The statement is six lines (no field may contain a line break):
//!
//! ```text
//! mcim-ownership-v1
//! <PCID>
//! <subscriber>
//! <SHO>
//! <nonce, hex>
//! <issued at, seconds since the epoch>
//! ```

/// The first line.
pub const DOMAIN: &str = "mcim-ownership-v1";

/// How long a proof is good for after it was made.
pub const MAX_AGE_SECS: u64 = 24 * 3600;

/// What a proof says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    /// The device.
    pub pcid: String,
    /// The subscriber it may be contracted by.
    pub subscriber: String,
    /// The SHO it may be contracted at.
    pub sho: String,
    /// A random value, hex: the proof is used once.
    pub nonce: String,
    /// When the device made it.
    pub issued_at: u64,
}

/// Why a proof does not show ownership of this device for this contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnershipError {
    /// No proof, or not in the statement's form.
    #[error("the ownership proof is malformed: {0}")]
    Malformed(String),
    /// The signing key's certificate is not the supplier's for this PCID.
    #[error("the ownership proof is not signed by this device's TRE: {0}")]
    NotTheDevice(String),
    /// The signature does not verify.
    #[error("the ownership proof's signature does not verify")]
    Signature,
    /// It names another device, subscriber or SHO.
    #[error("the ownership proof is for another {0}")]
    Another(&'static str),
    /// Too old, or from the future.
    #[error("the ownership proof is not fresh (made {issued_at}, now {now})")]
    Stale {
        /// when it was made
        issued_at: u64,
        /// now
        now: u64,
    },
}

impl Statement {
    /// The statement's bytes (what the device signs).
    pub fn to_bytes(&self) -> Result<Vec<u8>, OwnershipError> {
        crate::lines::write(
            DOMAIN,
            &[&self.pcid, &self.subscriber, &self.sho, &self.nonce],
            self.issued_at,
        )
        .map_err(|w| OwnershipError::Malformed(w.into()))
    }

    /// Parses a statement.
    pub fn parse(bytes: &[u8]) -> Result<Self, OwnershipError> {
        let bad = |w: &str| OwnershipError::Malformed(w.to_string());
        let (f, issued_at) = crate::lines::read(bytes, DOMAIN, 4).map_err(bad)?;
        let [pcid, subscriber, sho, nonce] = f.as_slice() else {
            return Err(bad("not six lines"));
        };
        if !crate::lines::nonce_ok(nonce) {
            return Err(bad("the nonce is not 16 octets in lowercase hex"));
        }
        Ok(Self {
            pcid: (*pcid).into(),
            subscriber: (*subscriber).into(),
            sho: (*sho).into(),
            nonce: (*nonce).into(),
            issued_at,
        })
    }
}

/// A proof as it travels (`mcim.common.v1.OwnershipProof`).
#[derive(Clone, Copy, Debug)]
pub struct Proof<'a> {
    /// The statement's bytes.
    pub payload: &'a [u8],
    /// ECDSA P-256 over SHA-256(payload), DER.
    pub signature: &'a [u8],
    /// The signing key's certificate chain, DER, leaf first.
    pub tls_chain: &'a [Vec<u8>],
}

/// The contract a proof must name.
#[derive(Clone, Copy, Debug)]
pub struct Contract<'a> {
    /// The device.
    pub pcid: &'a str,
    /// The subscriber contracting.
    pub subscriber: &'a str,
    /// The SHO.
    pub sho: &'a str,
}

impl From<crate::lines::NotSigned> for OwnershipError {
    fn from(e: crate::lines::NotSigned) -> Self {
        use crate::lines::NotSigned as N;
        match e {
            N::NoCertificate => OwnershipError::Malformed("no certificate".into()),
            N::NotTheDevice(w) => OwnershipError::NotTheDevice(w.into()),
            N::AnotherDevice => OwnershipError::Another("device"),
            N::Signature => OwnershipError::Signature,
        }
    }
}

/// Checks `proof` for `contract`: the statement is signed by the TLS key the supplier root
/// (`supplier_root_der`) certified for the PCID, names this contract, and was made within
/// [`MAX_AGE_SECS`] of `now`. Returns the statement.
pub fn verify(
    supplier_root_der: &[u8],
    proof: &Proof<'_>,
    contract: &Contract<'_>,
    now: u64,
) -> Result<Statement, OwnershipError> {
    let Proof {
        payload,
        signature: signature_der,
        tls_chain,
    } = *proof;
    let Contract {
        pcid,
        subscriber,
        sho,
    } = *contract;
    crate::lines::check_device_signature(
        supplier_root_der,
        payload,
        signature_der,
        tls_chain,
        pcid,
    )?;
    let st = Statement::parse(payload)?;
    if st.pcid != pcid {
        return Err(OwnershipError::Another("device"));
    }
    if st.subscriber != subscriber {
        return Err(OwnershipError::Another("subscriber"));
    }
    if st.sho != sho {
        return Err(OwnershipError::Another("SHO"));
    }
    if st.issued_at > now + 300 || now.saturating_sub(st.issued_at) > MAX_AGE_SECS {
        return Err(OwnershipError::Stale {
            issued_at: st.issued_at,
            now,
        });
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_round_trip_and_malformed_ones_are_refused() {
        let st = Statement {
            pcid: "001010000000001".into(),
            subscriber: "s".into(),
            sho: "sho.example".into(),
            nonce: "00112233445566778899aabbccddeeff".into(),
            issued_at: 7,
        };
        let b = st.to_bytes().unwrap();
        assert_eq!(Statement::parse(&b), Ok(st.clone()));
        let mut bad = st.clone();
        bad.subscriber = "a\nb".into();
        assert!(bad.to_bytes().is_err());
        assert!(Statement::parse(b"mcim-ownership-v1\n1\n2").is_err());
        // The nonce is 16 octets of lowercase hex: not empty, not short, not upper case.
        for nonce in ["", "00ff", "00112233445566778899AABBCCDDEEFF"] {
            let mut n = st.clone();
            n.nonce = nonce.into();
            let text = format!(
                "mcim-ownership-v1\n{}\n{}\n{}\n{}\n{}",
                n.pcid, n.subscriber, n.sho, n.nonce, n.issued_at
            );
            assert!(Statement::parse(text.as_bytes()).is_err(), "{nonce:?}");
        }
        assert!(Statement::parse(&b.replace_first()).is_err());
    }

    trait ReplaceFirst {
        fn replace_first(&self) -> Vec<u8>;
    }
    impl ReplaceFirst for Vec<u8> {
        fn replace_first(&self) -> Vec<u8> {
            let mut v = self.clone();
            v[0] = b'x';
            v
        }
    }
}
