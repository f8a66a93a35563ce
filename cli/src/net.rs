//! Channels from the command line to the network roles, over mutual TLS with a development
//! PKI's certificates (`mcimctl pki init`): as a role or the subscriber, or as a software
//! device (a certificate under the supplier root, no TRE; the lab's impostor).

use std::path::Path;

use mcim_pki::Role;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::{CliError, fail};

/// `me` (its certificate in `pki`) calling the role `peer` at `url` (`https://host:port`).
pub async fn role_channel(
    pki: &Path,
    me: Role,
    peer: Role,
    url: &str,
) -> Result<Channel, CliError> {
    party_channel(pki, me.as_str(), peer, url).await
}

/// A role's address as every `--*-url` takes it: `https://host:port` (the roles speak only
/// mutual TLS). Checked when the command line is read, so that a wrong one is a usage error
/// naming the form, not a transport error later.
pub fn role_url(s: &str) -> Result<String, String> {
    let bad = || format!("a role's URL is https://host:port (mutual TLS), not {s:?}");
    let rest = s.strip_prefix("https://").ok_or_else(bad)?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty()
        && !host.contains(['/', '@', '?', '#', ' '])
        && (host.starts_with('[') == host.ends_with(']'));
    match port.parse::<u16>() {
        Ok(p) if p != 0 && host_ok => Ok(s.to_string()),
        _ => Err(bad()),
    }
}

/// One role address or several, comma-separated (a role's replicas, spread and failed over by
/// `mcim_telemetry::channel`), each as [`role_url`] checks it.
pub fn role_urls(s: &str) -> Result<String, String> {
    if s.split(',').count() > mcim_telemetry::channel::MAX_ADDRESSES {
        return Err(format!(
            "at most {} addresses for one role",
            mcim_telemetry::channel::MAX_ADDRESSES
        ));
    }
    for u in s.split(',') {
        role_url(u.trim())?;
    }
    Ok(s.to_string())
}

/// The party whose files in `pki` are `<file>.pem`/`.key` (a second SHO: `sho2`) calling
/// the role `peer` at `url`.
pub async fn party_channel(
    pki: &Path,
    file: &str,
    peer: Role,
    url: &str,
) -> Result<Channel, CliError> {
    let (cert, key) = mcim_pki::dev::party_file_pem(pki, file).map_err(fail)?;
    connect(peer, url, cert, key, pki).await
}

/// A lazily connected channel as the party `me` to `peer` at `urls` (one address or several,
/// comma-separated: a role's replicas, spread and failed over by [`mcim_telemetry::channel`]).
/// Nothing is connected until the first call, so an unreachable role is a call's transient
/// error, retried by the caller, not a failure to start.
pub fn lazy_role_channel(
    pki: &Path,
    me: Role,
    peer: Role,
    urls: &str,
) -> Result<mcim_telemetry::Channel, CliError> {
    let config = mcim_pki::dev::party_client_config(pki, me.as_str(), peer).map_err(fail)?;
    mcim_telemetry::channel::channel(
        std::sync::Arc::new(config),
        urls,
        &mcim_pki::party::server_name(peer),
    )
    .map_err(|e| CliError::Input(format!("the {peer}'s address: {e}")))
}

/// A software device `pcid` (a fresh certificate under the supplier root in `pki`) calling
/// `peer` at `url`.
pub async fn software_device_channel(
    pki: &Path,
    pcid: &str,
    peer: Role,
    url: &str,
) -> Result<Channel, CliError> {
    let (cert, key) = mcim_pki::dev::issue_software_device(pki, pcid).map_err(fail)?;
    connect(peer, url, cert, key, pki).await
}

/// Mutual TLS with `cert`/`key` (PEM) to `peer` at `url`, trusting only the CA in `pki` that
/// issues `peer`'s certificates.
async fn connect(
    peer: Role,
    url: &str,
    cert: impl AsRef<[u8]>,
    key: impl AsRef<[u8]>,
    pki: &Path,
) -> Result<Channel, CliError> {
    let ca = mcim_pki::dev::role_ca_pem(pki, peer).map_err(fail)?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name(mcim_pki::party::server_name(peer));
    Endpoint::from_shared(url.to_string())
        .map_err(|e| fail(format!("{url}: {e}")))?
        .tls_config(tls)
        .map_err(fail)?
        .connect()
        .await
        .map_err(|e| fail(format!("the {peer} at {url}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::role_url;

    #[test]
    fn a_role_url_is_https_host_port() {
        for ok in [
            "https://127.0.0.1:7402",
            "https://ro.example:7402/",
            "https://[::1]:7402",
        ] {
            assert_eq!(role_url(ok).as_deref(), Ok(ok), "{ok}");
        }
        for bad in [
            "notaurl",
            "http://127.0.0.1:7402",
            "https://127.0.0.1",
            "https://:7402",
            "https://127.0.0.1:0",
            "https://127.0.0.1:70000",
            "https://user@host:7402",
            "https://host:7402/path",
            "",
        ] {
            let e = role_url(bad).unwrap_err();
            assert!(e.contains("https://host:port"), "{bad}: {e}");
        }
    }
}
