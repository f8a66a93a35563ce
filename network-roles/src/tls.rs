//! Mutual TLS for every role connection (rustls, through tonic): a role serves with its
//! certificate from the PKI directory and accepts only clients whose certificates chain to the
//! lab CA or the supplier root; a client presents its role certificate. Who a caller is and
//! what it may do is decided from its certificate by [`crate::gate`] and [`crate::authz`].

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

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
/// client certificates required.
pub fn server_tls(pki: &Path, party: &str) -> Result<ServerTlsConfig, PkiError> {
    let (cert, key) = dev::party_file_pem(pki, party)?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(client_roots(pki)?))
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
