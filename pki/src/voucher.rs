//! The supplier's voucher for a PCID's initial credentials (TR 33.812 5.1.3.4.1, CCIF mode 3:
//! the supplier embeds them and they reach the RO's ICF through the subscriber). The supplier
//! signs {PCID, SHA-256(K || OPc)} with its own key when it writes the subscriber's credentials
//! file; the ICF takes a subscriber's registration only with a voucher that verifies against
//! the CA that issues the supplier's certificates, for that PCID and those very K and OPc. So a
//! subscriber without the supplier's file cannot claim a PCID first, or choose its K.

use crate::party::Role;

/// The statement's first line.
pub const DOMAIN: &str = "mcim-pcid-voucher-v1";

/// Why a voucher does not vouch for these credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VoucherError {
    /// Its certificate is not a supplier's under the supplier CA.
    #[error("the voucher is not the supplier's: {0}")]
    NotTheSupplier(String),
    /// The signature does not verify for this PCID, K and OPc.
    #[error("the voucher is not for this PCID and these credentials")]
    Mismatch,
}

/// What the supplier signs: the domain, the PCID and SHA-256(K || OPc), hex.
pub fn statement(pcid: &str, k: &[u8], opc: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(k);
    h.update(opc);
    format!("{DOMAIN}\n{pcid}\n{}", hex::encode(h.finalize())).into_bytes()
}

/// The supplier's signature (ECDSA P-256, DER) over [`statement`].
pub fn sign(key: &p256::ecdsa::SigningKey, pcid: &str, k: &[u8], opc: &[u8]) -> Vec<u8> {
    use p256::ecdsa::signature::Signer;
    let sig: p256::ecdsa::Signature = key.sign(&statement(pcid, k, opc));
    sig.to_der().as_bytes().to_vec()
}

/// Checks a voucher: `chain`'s leaf names a supplier and is issued by `supplier_ca_der`, and
/// `signature` is its signature over [`statement`] of `pcid`, `k`, `opc`.
pub fn verify(
    supplier_ca_der: &[u8],
    chain: &[Vec<u8>],
    signature: &[u8],
    pcid: &str,
    k: &[u8],
    opc: &[u8],
) -> Result<(), VoucherError> {
    let not = |w: &str| VoucherError::NotTheSupplier(w.to_string());
    let leaf_der = chain.first().ok_or_else(|| not("no certificate"))?;
    let (key, caller) = crate::party::leaf_key_under(supplier_ca_der, leaf_der).map_err(not)?;
    if caller.role != Role::Supplier {
        return Err(not("the certificate names no supplier"));
    }
    let sig = p256::ecdsa::Signature::from_der(signature).map_err(|_| VoucherError::Mismatch)?;
    use p256::ecdsa::signature::Verifier;
    key.verify(&statement(pcid, k, opc), &sig)
        .map_err(|_| VoucherError::Mismatch)
}
