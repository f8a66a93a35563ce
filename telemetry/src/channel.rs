//! gRPC channels over mutual TLS to a role that may run as several replicas (issue 16: "devices
//! and roles accept several addresses per role and spread and fail over between them").
//!
//! An address is `https://host:port`, or several separated by commas
//! (`https://ro-a:7402,https://ro-b:7402`). A channel connects lazily to one of them, chosen
//! at random when the channel is made (so a fleet spreads over the replicas); when that
//! connection cannot be made, or breaks, the next connection tries the addresses in turn from
//! the one after it. A call in flight on a connection that breaks fails (UNAVAILABLE) and the
//! caller retries, as it does for any unreachable role; the retry goes to a live replica.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tonic::transport::Endpoint;

use crate::Channel;

/// The most addresses one role may be given (a channel tries them in turn when connecting).
pub const MAX_ADDRESSES: usize = 64;

/// The `host:port` of each `https://` address in `urls` (comma-separated), in order; at most
/// [`MAX_ADDRESSES`].
pub fn authorities(urls: &str) -> Result<Vec<String>, String> {
    let list: Vec<String> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            let a = u
                .strip_prefix("https://")
                .ok_or_else(|| format!("{u:?}: an https:// address is required"))?
                .trim_end_matches('/');
            if a.is_empty() || a.contains('/') || a.contains('@') {
                return Err(format!("{u:?}: expected https://host:port"));
            }
            Ok(a.to_string())
        })
        .collect::<Result<_, _>>()?;
    if list.is_empty() {
        return Err("no address given".into());
    }
    if list.len() > MAX_ADDRESSES {
        return Err(format!(
            "{} addresses: at most {MAX_ADDRESSES} for one role",
            list.len()
        ));
    }
    Ok(list)
}

/// A lazily connected channel to the role whose certificate names `server_name`
/// (`<role>.mcim.local`) at any of `urls` (see the module), over TLS with `config` (which
/// carries the caller's client certificate); its requests carry the caller's trace context.
pub fn channel(
    config: Arc<rustls::ClientConfig>,
    urls: &str,
    server_name: &str,
) -> Result<Channel, String> {
    let authorities = Arc::new(authorities(urls)?);
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| format!("{server_name}: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    // The URI tonic is given is only a label: the connector picks the address.
    let endpoint = Endpoint::from_shared(format!("http://{}", authorities[0]))
        .map_err(|e| format!("{urls}: {e}"))?
        .connect_timeout(std::time::Duration::from_secs(5));
    let next = Arc::new(AtomicUsize::new(
        rand::random::<u32>() as usize % authorities.len(),
    ));
    Ok(crate::traced(endpoint.connect_with_connector_lazy(
        tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let (connector, name) = (connector.clone(), name.clone());
            let (authorities, next) = (authorities.clone(), next.clone());
            async move {
                let n = authorities.len();
                let first = next.load(Ordering::Relaxed) % n;
                let mut last = None;
                for i in 0..n {
                    let k = (first + i) % n;
                    let tcp = match tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        tokio::net::TcpStream::connect(authorities[k].as_str()),
                    )
                    .await
                    {
                        Ok(Ok(tcp)) => tcp,
                        Ok(Err(e)) => {
                            last = Some(e);
                            continue;
                        }
                        Err(_) => {
                            last = Some(std::io::ErrorKind::TimedOut.into());
                            continue;
                        }
                    };
                    // gRPC writes small frames and waits for answers: without this, Nagle's
                    // algorithm and the peer's delayed ACK hold a request back ~40 ms.
                    tcp.set_nodelay(true)?;
                    match connector.connect(name.clone(), tcp).await {
                        Ok(tls) => {
                            // The next connection (after this one breaks) starts at the next
                            // address.
                            next.store(k + 1, Ordering::Relaxed);
                            return Ok(hyper_util::rt::TokioIo::new(tls));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                next.store(first + 1, Ordering::Relaxed);
                Err::<hyper_util::rt::TokioIo<_>, _>(
                    last.unwrap_or_else(|| std::io::ErrorKind::NotConnected.into()),
                )
            }
        }),
    )))
}

#[cfg(test)]
mod tests {
    #[test]
    fn addresses_are_https_host_port_one_or_several() {
        assert_eq!(
            super::authorities("https://a:1, https://b:2/").ok(),
            Some(vec!["a:1".to_string(), "b:2".to_string()])
        );
        for bad in [
            "",
            ",",
            "http://a:1",
            "https://",
            "https://a:1/x",
            "https://u@a:1",
        ] {
            assert!(super::authorities(bad).is_err(), "{bad:?}");
        }
    }
}
