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

/// The CA certificates in `ca_pem` as rustls roots.
fn roots(ca_pem: &[u8]) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(ca.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    Ok(roots)
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
    let roots = roots(ca_pem)?;
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

/// `config` that also requires the server's certificate to name the party `name` of `role`
/// (`urn:mcim:<role>:<name>`), after the usual checks against `ca_pem` for the role's server
/// name: every SHO answers to the role's server name, so this is what tells the old SHO from
/// another (the discard notice goes to the SHO whose MCIM was discarded, and to no other).
pub fn expect_party(
    mut config: rustls::ClientConfig,
    ca_pem: &[u8],
    role: mcim_pki::Role,
    name: &str,
) -> Result<rustls::ClientConfig, String> {
    let roots = roots(ca_pem)?;
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| e.to_string())?;
    config
        .dangerous()
        .set_certificate_verifier(Arc::new(PartyVerifier {
            inner,
            role,
            name: name.to_string(),
        }));
    Ok(config)
}

/// The roles' usual server check, then the party the certificate names.
#[derive(Debug)]
struct PartyVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    role: mcim_pki::Role,
    name: String,
}

impl rustls::client::danger::ServerCertVerifier for PartyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        match mcim_pki::party::caller_from_cert(end_entity) {
            Ok(c) if c.role == self.role && c.name == self.name => Ok(ok),
            Ok(c) => Err(rustls::Error::General(format!(
                "the server is {} {}, not {} {}",
                c.role, c.name, self.role, self.name
            ))),
            Err(e) => Err(rustls::Error::General(format!(
                "the server's certificate names no party: {e}"
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS server with the certificate in `<file>.pem` of the PKI `dir`; returns its port.
    async fn serve(dir: &std::path::Path, file: &str) -> u16 {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let (cert, key) = mcim_pki::dev::party_file_pem(dir, file).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(&cert).unwrap()],
            PrivateKeyDer::from_pem_slice(&key).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        port
    }

    /// Both SHOs answer to the role's server name; only the one the device expects passes
    /// [`expect_party`] (the discard notice goes to the old SHO, not to whoever the RO names).
    #[tokio::test]
    async fn only_the_expected_sho_passes_although_both_answer_to_the_roles_name() {
        let dir = tempfile::tempdir().unwrap();
        mcim_pki::dev::init(dir.path(), &mcim_pki::dev::LAB_PARTIES).unwrap();
        let ca = std::fs::read(dir.path().join("ca-sho.pem")).unwrap();
        let (device_cert, _) =
            mcim_pki::dev::issue_software_device(dir.path(), "001010000000001").unwrap();
        let chain = vec![
            rustls::pki_types::pem::PemObject::from_pem_slice(device_cert.as_bytes())
                .map(|c: rustls::pki_types::CertificateDer<'_>| c.to_vec())
                .unwrap(),
        ];
        let key = TreTlsKey::new(Arc::new(|_: &[u8]| {
            Err(TreError::BadRequest("unused".into()))
        }));
        let config = expect_party(
            device_client_config(&ca, chain, key).unwrap(),
            &ca,
            mcim_pki::Role::Sho,
            "sho.mcim.local",
        )
        .unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        for (file, ok) in [("sho", true), ("sho2", false)] {
            let port = serve(dir.path(), file).await;
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let name = rustls::pki_types::ServerName::try_from("sho.mcim.local").unwrap();
            let got = connector.connect(name, tcp).await;
            assert_eq!(got.is_ok(), ok, "{file}: {:?}", got.err());
        }
    }
}
