//! Mutual TLS for every role connection (rustls): a role serves with its certificate from
//! the PKI directory on an acceptor of its own ([`server_config`], [`tls_incoming`]: handshakes
//! in tasks of their own with a timeout, a client chain bounded before webpki builds a path)
//! and accepts only clients whose certificates chain to an operator CA or the supplier root; a
//! client presents its role certificate (through tonic). Who a caller is and what it may do is
//! decided from its certificate by [`crate::gate`] and [`crate::authz`].

use std::path::Path;
use std::sync::Arc;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::authz::Role;
use mcim_pki::{PkiError, dev};

/// The roots a role accepts client certificates from: every operator's CA and the supplier
/// root. Which of them may vouch for the role a certificate claims is the gate's check
/// ([`crate::gate`], `mcim_pki::dev::trust_anchors`).
fn client_roots(pki: &Path) -> Result<Certificate, PkiError> {
    let mut roots = dev::ca_pem(pki)?;
    if let Ok(supplier) = dev::supplier_root_pem(pki) {
        roots.extend_from_slice(&supplier);
    }
    Ok(Certificate::from_pem(roots))
}

/// Server side: the identity in `<party>.pem` (a role's file, `sho2` for a second SHO),
/// client certificates required and verified by [`BoundedClientChain`]; HTTP/2 by ALPN.
pub fn server_config(pki: &Path, party: &str) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |e: &dyn std::fmt::Display| PkiError::Cert(e.to_string());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(client_roots(pki)?.get_ref()) {
        roots.add(ca.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    let webpki = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| bad(&e))?;
    let (cert, key) = dev::party_file_pem(pki, party)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&e))?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| bad(&e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_client_cert_verifier(Arc::new(BoundedClientChain(webpki)))
        .with_single_cert(chain, key)
        .map_err(|e| bad(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The client certificate verifier of every role's server: webpki's, after refusing a chain
/// with more intermediates than [`mcim_pki::party::MAX_CHAIN`] allows (the gate would refuse
/// it anyway). Found by an outside attack: a client with no valid certificate at all could
/// make webpki build paths through dozens of junk intermediates named like a trusted CA,
/// ~12 ms of CPU per handshake (25 times a plain refusal), before any gate runs.
#[derive(Debug)]
pub struct BoundedClientChain(pub Arc<dyn rustls::server::danger::ClientCertVerifier>);

impl rustls::server::danger::ClientCertVerifier for BoundedClientChain {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        if intermediates.len() >= mcim_pki::party::MAX_CHAIN {
            tracing::warn!(
                intermediates = intermediates.len(),
                "refused: a client certificate chain longer than {}",
                mcim_pki::party::MAX_CHAIN
            );
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ));
        }
        self.0.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }

    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

/// How long a client has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The mutual-TLS connections accepted on `tcp` with `config`, for
/// `Server::serve_with_incoming` (tonic reads the peer's certificates from them for the
/// gate, as from its own TLS). Each handshake runs in a task of its own, bounded by
/// [`HANDSHAKE_TIMEOUT`]: a slow or silent client holds up no other. A failed handshake is
/// logged at debug level and dropped; accepting stops when the server stops reading.
pub fn tls_incoming(
    mut tcp: tonic::transport::server::TcpIncoming,
    config: Arc<rustls::ServerConfig>,
) -> impl tokio_stream::Stream<
    Item = Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
> {
    use tokio_stream::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                _ = tx.closed() => break,
                next = tcp.next() => next,
            };
            let stream = match next {
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    tracing::debug!("accept: {e}");
                    continue;
                }
                None => break,
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!("TLS handshake: {e}"),
                    Err(_) => {
                        tracing::debug!("TLS handshake: no answer within {HANDSHAKE_TIMEOUT:?}")
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Client side: present `role`'s certificate to the server of `peer`, trusting only the CA
/// that issues `peer`'s certificates (another operator's CA cannot stand in for it).
pub fn client_tls(pki: &Path, role: Role, peer: Role) -> Result<ClientTlsConfig, PkiError> {
    client_tls_as(pki, role.as_str(), peer)
}

/// [`client_tls`] presenting the certificate in `<party>.pem` (a second SHO's).
pub fn client_tls_as(pki: &Path, party: &str, peer: Role) -> Result<ClientTlsConfig, PkiError> {
    let (cert, key) = dev::party_file_pem(pki, party)?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(dev::role_ca_pem(pki, peer)?))
        .identity(Identity::from_pem(cert, key))
        .domain_name(mcim_pki::party::server_name(peer)))
}

/// [`client_tls_as`] as a rustls configuration (HTTP/2 by ALPN), for channels that pick among
/// several addresses of a role themselves ([`mcim_telemetry::channel`]).
pub fn client_config_as(
    pki: &Path,
    party: &str,
    peer: Role,
) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = dev::party_file_pem(pki, party).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in
        CertificateDer::pem_slice_iter(&dev::role_ca_pem(pki, peer).map_err(|e| e.to_string())?)
    {
        roots
            .add(ca.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| e.to_string())?;
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
