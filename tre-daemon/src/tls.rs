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

/// The device's side of mutual TLS towards a role: a rustls client configuration that trusts
/// the roles' CA (`ca_pem`), presents the device's certificate chain (DER, leaf first: what the
/// supplier's CertifyDevice returned) and signs with the TRE, offering HTTP/2 for gRPC.
pub fn device_client_config(
    ca_pem: &[u8],
    chain: Vec<Vec<u8>>,
    key: TreTlsKey,
) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    #[derive(Debug)]
    struct One(Arc<rustls::sign::CertifiedKey>);
    impl rustls::client::ResolvesClientCert for One {
        fn resolve(
            &self,
            _: &[&[u8]],
            _: &[SignatureScheme],
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(self.0.clone())
        }
        fn has_certs(&self) -> bool {
            true
        }
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(ca.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let certified = rustls::sign::CertifiedKey::new(
        chain.into_iter().map(CertificateDer::from).collect(),
        Arc::new(key),
    );
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(One(Arc::new(certified))));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
