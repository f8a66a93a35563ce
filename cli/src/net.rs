//! Channels from the command line to the network roles, over mutual TLS with a development
//! PKI's certificates (`mcimctl pki init`): as a role or the subscriber, or as a software
//! device (a certificate under the supplier root, no TRE; the lab's impostor).

use std::path::Path;

use mcim_roles::authz::Role;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::device::DeviceError;

fn fail(what: impl std::fmt::Display) -> DeviceError {
    DeviceError::Input(what.to_string())
}

/// `me` (its certificate in `pki`) calling the role `peer` at `url` (`https://host:port`).
pub async fn role_channel(
    pki: &Path,
    me: Role,
    peer: Role,
    url: &str,
) -> Result<Channel, DeviceError> {
    let tls = mcim_roles::tls::client_tls(pki, me, &mcim_roles::peers::server_name(peer))
        .map_err(fail)?;
    connect(peer, url, tls).await
}

/// A software device `pcid` (a fresh certificate under the supplier root in `pki`) calling
/// `peer` at `url`.
pub async fn software_device_channel(
    pki: &Path,
    pcid: &str,
    peer: Role,
    url: &str,
) -> Result<Channel, DeviceError> {
    let (cert, key) = mcim_roles::pki::issue_software_device(pki, pcid).map_err(fail)?;
    let ca = std::fs::read(pki.join("ca.pem")).map_err(|e| fail(format!("ca.pem: {e}")))?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name(mcim_roles::peers::server_name(peer));
    connect(peer, url, tls).await
}

async fn connect(peer: Role, url: &str, tls: ClientTlsConfig) -> Result<Channel, DeviceError> {
    Endpoint::from_shared(url.to_string())
        .map_err(|e| fail(format!("{url}: {e}")))?
        .tls_config(tls)
        .map_err(fail)?
        .connect()
        .await
        .map_err(|e| fail(format!("the {peer} at {url}: {e}")))
}
