//! TPM 2.0 structures built and checked in software, with no TPM: what a network role needs to
//! send secrets to a device's TPM and to judge what the TPM says back.
//!
//! - [`attest`]: TPM2_Quote evidence and its verification without a TPM (the PVA's side).
//! - [`import`]: TPM2 duplication blobs (TPM 2.0 Part 1, 23.3 "Duplication"): an SHO wraps the
//!   MCIM's K as an AES-128 key object, or OPc as a sealed data object, to the public area of
//!   the device's storage key; the device brings them in with `TPM2_Import`. The plaintext
//!   never exists on the device outside the TPM (TR 33.812 5.1.2.2, 5.1.3.6.2 step 12).
//! - [`policy`]: policy digests (TPM2_PolicyPCR) for objects bound to platform state.
//! - [`kdf`]: KDFa and KDFe of TPM 2.0 Part 1, 11.4.10 (SP 800-108 / SP 800-56A counter KDFs).
//! - [`public`]: the public areas (TPMT_PUBLIC) we build and parse, and object names.
//! - [`wire`]: the TPM's big-endian marshalling.
//!
//! Only SHA-256 name algorithms and ECC P-256 parents are supported: that is what `tred`
//! creates (its storage primary) and what every TPM 2.0 PC-client profile TPM implements.

pub mod attest;
pub mod import;
pub mod kdf;
pub mod policy;
pub mod public;
pub mod wire;

/// TPM_ALG_ID values used here (TPM 2.0 Part 2, 6.3).
pub mod alg {
    /// TPM_ALG_RSA.
    pub const RSA: u16 = 0x0001;
    /// TPM_ALG_HMAC.
    pub const HMAC: u16 = 0x0005;
    /// TPM_ALG_AES.
    pub const AES: u16 = 0x0006;
    /// TPM_ALG_KEYEDHASH.
    pub const KEYEDHASH: u16 = 0x0008;
    /// TPM_ALG_SHA256.
    pub const SHA256: u16 = 0x000B;
    /// TPM_ALG_NULL.
    pub const NULL: u16 = 0x0010;
    /// TPM_ALG_ECDSA.
    pub const ECDSA: u16 = 0x0018;
    /// TPM_ALG_ECC.
    pub const ECC: u16 = 0x0023;
    /// TPM_ALG_SYMCIPHER.
    pub const SYMCIPHER: u16 = 0x0025;
    /// TPM_ALG_CFB.
    pub const CFB: u16 = 0x0043;
    /// TPM_ALG_ECB.
    pub const ECB: u16 = 0x0044;
    /// TPM_ECC_NIST_P256 (a TPM_ECC_CURVE, not an algorithm, kept here with its peers).
    pub const ECC_NIST_P256: u16 = 0x0003;
}

/// Errors in building or parsing TPM structures. They name the structure and field, never a
/// secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TpmStructError {
    /// The input ended before the structure did.
    #[error("{0}: truncated")]
    Truncated(&'static str),
    /// Bytes left over after the structure.
    #[error("{what}: {extra} trailing bytes")]
    Trailing {
        /// The structure.
        what: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
    /// A size field that does not match what it sizes, or exceeds a TPM2B's 16 bits.
    #[error("{0}: bad size")]
    BadSize(&'static str),
    /// A well-formed structure we do not support (another algorithm, curve, ...).
    #[error("unsupported {what}: {detail}")]
    Unsupported {
        /// The field.
        what: &'static str,
        /// What it held.
        detail: String,
    },
    /// A value that breaks a rule of the TPM specification or of mcim.
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// The field.
        what: &'static str,
        /// Why it was refused.
        detail: String,
    },
}
