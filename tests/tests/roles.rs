//! The network roles over mutual TLS: the real `mcim-roles` binary, certificates from
//! `mcimctl pki init`, and the authorization table deciding each call by the caller's
//! certificate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mcim_e2e::{Swtpm, workspace_bin};
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::supplier::v1 as pb;
use mcim_proto::mcim::supplier::v1::supplier_service_client::SupplierServiceClient;
use mcim_roles::authz::Role;
use mcim_tre::tre::Tre;
use tonic::transport::{Channel, Endpoint};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_supplier(pki: &std::path::Path) -> (Server, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(workspace_bin("mcim-roles"))
        .args([
            "supplier",
            "--pki",
            pki.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (server, port);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("mcim-roles supplier did not listen");
}

async fn client(
    pki: &std::path::Path,
    as_role: Role,
    port: u16,
) -> Result<SupplierServiceClient<Channel>, String> {
    let tls = mcim_roles::tls::client_tls(pki, as_role, "supplier.mcim.local").unwrap();
    let ch = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(SupplierServiceClient::new(ch))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supplier_certifies_a_real_device_and_the_table_decides_who_may_ask() {
    let work = tempfile::tempdir().unwrap();
    let pki = work.path().join("pki");
    let out = Command::new(workspace_bin("mcimctl"))
        .args(["pki", "init", "--dir", pki.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_server, port) = start_supplier(&pki);

    // A real device's public material (swtpm).
    let tpm = Swtpm::start();
    let public = {
        let mut t =
            mcim_tre::tre::tpm::TpmTre::open(&mcim_tre::tre::tpm::TpmConfig { tcti: tpm.tcti() })
                .unwrap();
        t.init_device(
            &mcim_core::identity::DeviceIdentity::new(
                "SN-R",
                mcim_core::identity::Pcid::new("001010000000123").unwrap(),
                "m",
            )
            .unwrap(),
        )
        .unwrap()
        .public
    };
    let request = |ak: Vec<u8>| pb::CertifyDeviceRequest {
        identity: Some(common::DeviceIdentity {
            device_id: "SN-R".into(),
            pcid: "001010000000123".into(),
            model: "m".into(),
        }),
        tre_kind: common::TreKind::Tpm2 as i32,
        storage_public: public.storage_public.clone(),
        attestation_public: ak,
        tls_public_spki: public.tls_public_spki.clone(),
    };

    // Anyone authenticated may read the supplier root; only the supplier certifies.
    let mut sho = client(&pki, Role::Sho, port).await.unwrap();
    let root = sho
        .get_supplier_root(pb::GetSupplierRootRequest {})
        .await
        .unwrap()
        .into_inner()
        .certificate;
    assert!(!root.is_empty());
    let denied = sho
        .certify_device(request(public.attestation_public.clone()))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied}");

    let mut supplier = client(&pki, Role::Supplier, port).await.unwrap();
    let r = supplier
        .certify_device(request(public.attestation_public.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.platform_credential.len(), 2);
    assert_eq!(
        r.platform_credential[1], root,
        "the chain ends at the supplier root"
    );
    // The TLS certificate names the device and carries the key its TPM holds.
    let caller = mcim_roles::pki::caller_from_cert(&r.tls_certificate[0]).unwrap();
    assert_eq!(
        (caller.role, caller.name.as_str()),
        (Role::Device, "001010000000123")
    );
    assert!(
        r.tls_certificate[0]
            .windows(65)
            .any(|w| w == &public.tls_public_spki[26..])
    );
    // The AK certificate carries the AK's point.
    let ak = mcim_core::tpm::public::EccPublic::from_tpm2b(&public.attestation_public).unwrap();
    assert!(r.platform_credential[0].windows(32).any(|w| w == ak.x));
    // Certified by the supplier root.
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, leaf) = X509Certificate::from_der(&r.platform_credential[0]).unwrap();
    let (_, ca) = X509Certificate::from_der(&root).unwrap();
    assert!(leaf.verify_signature(Some(ca.public_key())).is_ok());

    // An "attestation key" that is not a restricted signing key is refused: the storage key.
    let refused = supplier
        .certify_device(request(public.storage_public.clone()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");

    // Without a client certificate there is no connection at all.
    let bare = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(pki.join("ca.pem")).unwrap(),
        ))
        .domain_name("supplier.mcim.local");
    let ch = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(bare)
        .unwrap();
    let refused = match ch.connect().await {
        Err(_) => true,
        Ok(ch) => SupplierServiceClient::new(ch)
            .get_supplier_root(pb::GetSupplierRootRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate is refused");
}
