//! # mcim-pki: who the parties are
//!
//! TR 33.812 Alternative 1a is a system of parties (5.1.3.5: the M2ME and its supplier, the
//! RO, the VNO, the SHO, the PVA, the subscriber) that authenticate each other by certificate
//! (annex x.3, the trust model). This crate is the one place that says how:
//!
//! - [`party`]: the roles, the identity a certificate carries (a URI SAN
//!   `urn:mcim:<role>:<name>`), the server name a role serves under, certificate -> caller,
//!   the storage-key URI and platform credentials (5.1.3.5.8 PfC). Pure code, no files.
//! - [`ownership`]: the owner's proof that it controls a device (annex x.2.3), signed in the
//!   device's TRE, checked by the SHO.
//! - [`discard`]: the device's notice that it discarded an old SHO's MCIM, the old SHO's
//!   acknowledgment and what of it the new SHO may see (5.1.3.7.4.2 steps 8-11).
//! - [`voucher`]: the supplier's voucher for a PCID's initial credentials in CCIF mode 3.
//! - [`dev`]: the development PKI in a directory (`mcimctl pki init`, the lab, the tests):
//!   the CAs, a certificate per party, device certificates for keys held in a TRE. A
//!   production deployment brings its own CAs.
#![forbid(unsafe_code)]

pub mod dev;
pub mod discard;
pub mod instruction;
mod lines;
pub mod ownership;
pub mod party;
pub mod voucher;

pub use party::{ALL_ROLES, Caller, PlatformCredential, Role, TrustAnchors};

use std::path::PathBuf;

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file.
    #[error("{path}: {detail}")]
    File {
        /// the file
        path: PathBuf,
        /// why
        detail: String,
    },
    /// Certificate building or parsing.
    #[error("certificate: {0}")]
    Cert(String),
    /// A certificate that names no mcim identity.
    #[error("the certificate names no mcim identity (urn:mcim:<role>:<name>)")]
    NoIdentity,
}

pub(crate) fn cert_err(e: impl std::fmt::Display) -> PkiError {
    PkiError::Cert(e.to_string())
}
