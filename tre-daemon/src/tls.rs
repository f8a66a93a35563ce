//! The device's TLS identity is its TRE key: a rustls [`SigningKey`] whose every signature is
//! made inside the TPM or token (`Tre::tls_sign`), so the TLS private key never exists in host
//! memory. The roles' mutual TLS then authenticates the device by a key bound to its TRE.

use std::fmt;
use std::sync::Arc;

use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};

use crate::tre::TreError;

/// Signs a TLS handshake message in the TRE; returns a DER ECDSA signature.
pub type TreSignFn = dyn Fn(&[u8]) -> Result<Vec<u8>, TreError> + Send + Sync;

/// The TRE's TLS key (ECDSA P-256, SHA-256) as a rustls signing key.
#[derive(Clone)]
pub struct TreTlsKey {
    sign: Arc<TreSignFn>,
}

impl TreTlsKey {
    /// A key whose signatures `sign` makes (for `tred`, a call onto its TRE thread).
    pub fn new(sign: Arc<TreSignFn>) -> Self {
        Self { sign }
    }
}

impl fmt::Debug for TreTlsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TreTlsKey(ECDSA P-256 in the TRE)")
    }
}

impl SigningKey for TreTlsKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Box::new(self.clone()) as Box<dyn Signer>)
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

impl Signer for TreTlsKey {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        (self.sign)(message).map_err(|e| rustls::Error::General(format!("TRE signing: {e}")))
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}
