//! The device's side of the network: gRPC channels to the roles over mutual TLS whose client
//! key is the TRE's TLS key ([`crate::tls::TreTlsKey`]), and the check that a statement's
//! signer certificate (the SHO's, on a package) chains to the roles' CA and names the party
//! the device expects. Devices only open outbound connections.

use std::sync::Arc;

use mcim_telemetry::Channel;

/// A lazily connected channel to the role whose certificate names `server_name`
/// (`<role>.mcim.local`) at `url` (`https://host:port`, or several comma-separated: the role's
/// replicas, spread and failed over by [`mcim_telemetry::channel`]); its requests carry the
/// caller's trace context.
pub fn channel(
    config: Arc<rustls::ClientConfig>,
    url: &str,
    server_name: &str,
) -> Result<Channel, String> {
    mcim_telemetry::channel::channel(config, url, server_name)
}

pub use mcim_pki::party::verify_party;

#[cfg(test)]
mod tests {
    use super::*;
    use mcim_pki::Role;

    /// A package signer must be certified by a CA that issues SHO certificates: an "sho"
    /// certificate from another operator's CA, or the SHO's own for another name, is refused.
    #[test]
    fn only_the_sho_ca_vouches_for_a_package_signer() {
        let dir = tempfile::tempdir().unwrap();
        mcim_pki::dev::init(dir.path(), &mcim_pki::dev::LAB_PARTIES).unwrap();
        let sho_ca = std::fs::read(dir.path().join("ca-sho.pem")).unwrap();
        let real = mcim_pki::dev::ca_der(dir.path(), "sho").unwrap();
        assert!(verify_party(&sho_ca, &real, Role::Sho, "sho.mcim.local").is_ok());
        assert!(verify_party(&sho_ca, &real, Role::Sho, "another.sho").is_err());
        let (forged, _) =
            mcim_pki::dev::issue_party_under(dir.path(), "ca-vno", Role::Sho, "sho.mcim.local")
                .unwrap();
        let forged = rustls::pki_types::pem::PemObject::from_pem_slice(forged.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
            .unwrap();
        assert!(verify_party(&sho_ca, &forged, Role::Sho, "sho.mcim.local").is_err());
    }
}
