//! The device's TLS key is its TRE key: a mutual-TLS handshake (rustls) where every client
//! signature is made by the TPM (swtpm) or the token (SoftHSM2), and the server, trusting only
//! the CA that certified that key, accepts it; a certificate for any other key is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;

use mcim_core::identity::{DeviceIdentity, Pcid};
use mcim_tre::engine::{Engine, EngineHandle};
use mcim_tre::tls::{TreSignFn, TreTlsKey};
use mcim_tre::tre::Tre;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The TRE's P-256 public key for rcgen (the point inside the SPKI tred reports).
struct TrePublic(Vec<u8>);

impl rcgen::PublicKeyData for TrePublic {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Starts the TRE on its own thread (as tred does), initialises it, and returns the handle,
/// the TLS key's SPKI, a signing function that calls onto that thread, its state directory
/// and the thread, which ends once every handle is dropped ([`TreThread::stop`]).
fn tre_thread(open: impl FnOnce() -> Box<dyn Tre> + Send + 'static) -> TreThread {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_path_buf();
    let (engine, thread) =
        EngineHandle::spawn(move || Engine::new(open(), dir).map_err(|e| e.to_string())).unwrap();
    let spki = engine
        .call_blocking(|e| {
            e.init_device(
                &DeviceIdentity::new("SN-TLS", Pcid::new("001010000000077").unwrap(), "m").unwrap(),
            )
            .map(|o| o.public.tls_public_spki)
        })
        .unwrap()
        .unwrap();
    let sign = engine.tls_signer();
    TreThread {
        engine,
        spki,
        sign,
        _state: state,
        thread,
    }
}

/// The TRE on its own thread ([`tre_thread`]).
struct TreThread {
    engine: EngineHandle,
    spki: Vec<u8>,
    sign: Arc<TreSignFn>,
    _state: tempfile::TempDir,
    thread: std::thread::JoinHandle<()>,
}

impl TreThread {
    /// Drops the handles and waits for the thread to close the TRE, as tred does before it
    /// exits: a test that returned while the thread was still finalising the PKCS#11 module
    /// raced SoftHSM2's own teardown at process exit (the test passed, then its process
    /// exited non-zero, once in a full run).
    fn stop(self) {
        drop((self.engine, self.sign));
        self.thread.join().unwrap();
    }
}

/// A handshake: server trusts `ca`; the client presents `device_cert` with the TRE key.
async fn handshake(
    sign: Arc<TreSignFn>,
    device_spki: &[u8],
    certify_spki: bool,
) -> Result<Vec<u8>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let device_params =
        rcgen::CertificateParams::new(vec!["device.mcim.local".to_string()]).unwrap();
    let device_cert = if certify_spki {
        device_params
            .signed_by(&TrePublic(device_spki[26..].to_vec()), &ca)
            .unwrap()
    } else {
        // A certificate for some other key: the TRE's signature will not match it.
        device_params
            .signed_by(&rcgen::KeyPair::generate().unwrap(), &ca)
            .unwrap()
    };
    let mut roots = RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let roots = Arc::new(roots);

    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .unwrap();
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![server_cert.der().clone()],
            PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        )
        .unwrap();
    // The device's client: what tred uses towards the roles.
    let client = mcim_tre::tls::device_client_config(
        ca.pem().as_bytes(),
        vec![device_cert.der().to_vec()],
        TreTlsKey::new(sign),
    )
    .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer: Vec<CertificateDer<'static>> = tls
            .get_ref()
            .1
            .peer_certificates()
            .unwrap_or_default()
            .to_vec();
        tls.write_all(b"hello device")
            .await
            .map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer.first().map(|c| c.to_vec()).unwrap_or_default())
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let client_side = async {
        let mut tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(buf)
    };
    let got = client_side.await;
    let peer = server_task.await.unwrap()?;
    assert_eq!(got?, b"hello device");
    assert_eq!(
        peer,
        device_cert.der().to_vec(),
        "the server saw the device's certificate"
    );
    Ok(peer)
}

#[cfg(feature = "tpm")]
mod tpm {
    use super::*;
    use mcim_tre::tre::tpm::{TpmConfig, TpmTre};
    use support::Swtpm;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mutual_tls_with_the_tpm_tls_key() {
        let s = Swtpm::start();
        let tcti = s.tcti();
        let tre = tre_thread(move || Box::new(TpmTre::open(&TpmConfig { tcti }).unwrap()));
        handshake(tre.sign.clone(), &tre.spki, true).await.unwrap();
        let refused = handshake(tre.sign.clone(), &tre.spki, false).await;
        assert!(
            refused.is_err(),
            "a certificate for another key must not pass"
        );
        tokio::task::spawn_blocking(|| tre.stop()).await.unwrap();
    }
}

#[cfg(feature = "pkcs11")]
mod pkcs11 {
    use super::*;
    use mcim_e2e::{SOFTHSM2_LABEL, SOFTHSM2_MODULE, SOFTHSM2_PIN, own_softhsm};
    use mcim_tre::tre::pkcs11::{Pkcs11Config, Pkcs11Tre};

    #[test]
    fn mutual_tls_with_the_token_tls_key() {
        let Some(_token) = own_softhsm("pkcs11::mutual_tls_with_the_token_tls_key") else {
            return;
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let tre = tre_thread(|| {
            Box::new(
                Pkcs11Tre::open(&Pkcs11Config {
                    module: SOFTHSM2_MODULE.into(),
                    token_label: SOFTHSM2_LABEL.into(),
                    pin: SOFTHSM2_PIN.to_string().into(),
                    force_rsa_unwrap: false,
                })
                .unwrap(),
            )
        });
        rt.block_on(async {
            handshake(tre.sign.clone(), &tre.spki, true).await.unwrap();
            assert!(handshake(tre.sign.clone(), &tre.spki, false).await.is_err());
        });
        drop(rt);
        tre.stop();
    }
}
