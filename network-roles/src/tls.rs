//! Mutual TLS for every role connection (rustls, through tonic): a role serves with its
//! certificate from the PKI directory and accepts only clients whose certificates chain to the
//! lab CA or the supplier root; a client presents its role certificate. Who a caller is comes
//! from its certificate ([`authorize`]), and what it may do from [`crate::authz`].

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

use crate::authz::{self, Caller, Role};
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

/// [`authorize`] for an RPC whose subject is the calling device itself (its task stream).
/// Also the first stage for an RPC whose device is only known from a stored object (an
/// attach attempt, a registration, a validation): the caller's role is checked before the
/// object is looked up, so a caller that may not call the RPC learns nothing about which
/// objects exist; [`authorize_for`] then checks the object's device.
pub fn authorize_self<T>(req: &Request<T>, method: &str) -> Result<Caller, Status> {
    let caller = peer(req)?;
    authorize(req, method, Some(&caller.name))
}

/// The second stage after [`authorize_self`]: the stored object's device must be the caller
/// when the rule says a device acts only for itself.
pub fn authorize_for(caller: &Caller, method: &str, device: &str) -> Result<(), Status> {
    authz::check(caller, method, Some(device)).map_err(|d| {
        tracing::warn!(role = %caller.role, name = %caller.name, method, "denied: {d}");
        Status::permission_denied(d.to_string())
    })
}

fn peer<T>(req: &Request<T>) -> Result<Caller, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    mcim_pki::party::caller_from_cert(leaf).map_err(|e| Status::unauthenticated(e.to_string()))
}

/// Who is calling, and whether the table lets them call `method` (for `device`, when the
/// request is about one). UNAUTHENTICATED without a usable certificate, PERMISSION_DENIED
/// when the table says no.
pub fn authorize<T>(
    req: &Request<T>,
    method: &str,
    device: Option<&str>,
) -> Result<Caller, Status> {
    let caller = peer(req)?;
    authz::check(&caller, method, device).map_err(|d| {
        tracing::warn!(role = %caller.role, name = %caller.name, method, "denied: {d}");
        Status::permission_denied(d.to_string())
    })?;
    tracing::info!(role = %caller.role, name = %caller.name, method, "call");
    Ok(caller)
}
