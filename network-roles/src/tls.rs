//! Mutual TLS for every role connection (rustls, through tonic): a role serves with its
//! certificate from the PKI directory and accepts only clients whose certificates chain to the
//! lab CA or the supplier root; a client presents its role certificate. Who a caller is and
//! what it may do is decided from its certificate by [`crate::gate`] and [`crate::authz`].

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::authz::Role;
use mcim_pki::{PkiError, dev};

/// The roots a role accepts client certificates from: the lab CA and the supplier root.
fn client_roots(pki: &Path) -> Result<Certificate, PkiError> {
    let mut roots = dev::ca_pem(pki)?;
    if let Ok(supplier) = dev::supplier_root_pem(pki) {
        roots.extend_from_slice(&supplier);
    }
    Ok(Certificate::from_pem(roots))
}

/// Server side: `role`'s identity, client certificates required.
pub fn server_tls(pki: &Path, role: Role) -> Result<ServerTlsConfig, PkiError> {
    let (cert, key) = dev::party_pem(pki, role)?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(client_roots(pki)?))
}

/// Client side: present `role`'s certificate, trust the lab CA, expect `server_name`.
pub fn client_tls(pki: &Path, role: Role, server_name: &str) -> Result<ClientTlsConfig, PkiError> {
    let (cert, key) = dev::party_pem(pki, role)?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(dev::ca_pem(pki)?))
        .identity(Identity::from_pem(cert, key))
        .domain_name(server_name))
}
