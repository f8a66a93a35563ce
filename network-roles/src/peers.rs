//! How a role reaches the others: their addresses, and a gRPC channel over mutual TLS with the
//! calling role's certificate. Roles call each other only through these clients, even in one
//! process (`mcim-roles all`).

use std::path::Path;

use mcim_telemetry::Channel;

use crate::authz::Role;
use crate::error::RoleError;
use crate::tls::client_config_as;

/// A lazily connected channel from `me` to the `peer` role at `url` (`https://host:port`, or
/// several, comma-separated: replicas, spread and failed over by
/// [`mcim_telemetry::channel`]); its requests carry the caller's trace context.
pub fn channel(pki: &Path, me: Role, peer: Role, url: &str) -> Result<Channel, RoleError> {
    channel_as(pki, me.as_str(), peer, url)
}

/// [`channel`] as the party whose certificate is `<party>.pem` (a second SHO: `sho2`).
pub fn channel_as(pki: &Path, party: &str, peer: Role, url: &str) -> Result<Channel, RoleError> {
    let tls = client_config_as(pki, party, peer)
        .map_err(|e| RoleError::internal(format!("TLS to {peer}: {e}")))?;
    mcim_telemetry::channel::channel(
        std::sync::Arc::new(tls),
        url,
        &mcim_pki::party::server_name(peer),
    )
    .map_err(|e| RoleError::invalid(format!("{peer} address: {e}")))
}

/// The key a role signs statements with, from its certificate in the PKI directory (for
/// checking the PVA's results and the SHO's packages).
pub fn role_verifying_key(pki: &Path, role: Role) -> Result<p256::ecdsa::VerifyingKey, RoleError> {
    mcim_pki::dev::certificate_key(pki, role.as_str())
        .map_err(|e| RoleError::internal(e.to_string()))
}

/// Channels to peers of one role whose addresses arrive at run time (an SHO's URL from a
/// subscription, a DPF's from a registration), made once per address.
#[derive(Debug, Default)]
pub struct ChannelCache(tokio::sync::Mutex<std::collections::HashMap<String, Channel>>);

impl ChannelCache {
    /// The channel from `me` to `peer` at `url`, made on first use.
    pub async fn get(
        &self,
        pki: &Path,
        me: Role,
        peer: Role,
        url: &str,
    ) -> Result<Channel, RoleError> {
        self.get_as(pki, me.as_str(), peer, url).await
    }

    /// [`ChannelCache::get`] as the party whose certificate is `<party>.pem`.
    pub async fn get_as(
        &self,
        pki: &Path,
        party: &str,
        peer: Role,
        url: &str,
    ) -> Result<Channel, RoleError> {
        let mut m = self.0.lock().await;
        if let Some(c) = m.get(url) {
            return Ok(c.clone());
        }
        let c = channel_as(pki, party, peer, url)?;
        m.insert(url.to_string(), c.clone());
        Ok(c)
    }
}
