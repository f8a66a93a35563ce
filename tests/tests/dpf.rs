//! The DPF's refusals over the real `mcim-roles all` (TR 33.812 5.1.3.6.2 step 11): it takes a
//! package only from the SHO the device registered at, only with a fresh positive PVA result
//! for that very device; a refused authorisation queues nothing, and the device cannot
//! download anything. The device here is a software device (a certificate under the supplier
//! root, no TRE): these tests are about the roles' rules, not the TRE.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mcim_e2e::workspace_bin;
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::ro::v1 as ro;
use mcim_proto::mcim::ro::v1::dpf_service_client::DpfServiceClient;
use mcim_proto::mcim::ro::v1::drf_service_client::DrfServiceClient;
use mcim_proto::mcim::sho::v1 as sho;
use mcim_proto::mcim::sho::v1::sho_service_client::ShoServiceClient;
use mcim_proto::mcim::supplier::v1 as sup;
use mcim_proto::mcim::supplier::v1::supplier_service_client::SupplierServiceClient;
use mcim_roles::authz::Role;
use p256::elliptic_curve::Generate;
use p256::pkcs8::EncodePublicKey;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_all(work: &std::path::Path) -> (Server, u16) {
    let pki = work.join("pki");
    assert!(
        Command::new(workspace_bin("mcimctl"))
            .args(["pki", "init", "--dir", pki.to_str().unwrap()])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
    );
    let base = loop {
        let p = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if p < 65000 && (0..5).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            break p;
        }
    };
    let child = Command::new(workspace_bin("mcim-roles"))
        .args(["all", "--pki", pki.to_str().unwrap(), "--db"])
        .arg(format!("sqlite://{}", work.join("roles.db").display()))
        .args(["--base-port", &base.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while (0..5).any(|i| std::net::TcpStream::connect(("127.0.0.1", base + i)).is_err()) {
        assert!(Instant::now() < deadline, "mcim-roles all did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    (server, base)
}

async fn connect(port: u16, server: &str, ca: Vec<u8>, id: Identity) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(id)
        .domain_name(server);
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn as_role(pki: &std::path::Path, me: Role, peer: Role, port: u16) -> Channel {
    let tls =
        mcim_roles::tls::client_tls(pki, me, &format!("{}.mcim.local", peer.as_str())).unwrap();
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn spki() -> Vec<u8> {
    let k = p256::ecdsa::SigningKey::generate_from_rng(&mut rand::rng());
    p256::ecdsa::VerifyingKey::from(&k)
        .to_public_key_der()
        .unwrap()
        .as_bytes()
        .to_vec()
}

fn result(pki: &std::path::Path, pcid: &str, expires_at: u64) -> common::SignedValidationResult {
    let key = mcim_roles::pki::signing_key(pki, "pva").unwrap();
    common::SignedValidationResult {
        cose_sign1: mcim_core::validation::sign(
            &key,
            &mcim_core::validation::ValidationResult {
                validation_id: "v".into(),
                pcid: pcid.into(),
                nonce: "00".into(),
                verdict: "trusted".into(),
                expires_at,
            },
        )
        .unwrap(),
        expires_at: None,
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dpf_refuses_stale_or_foreign_results_and_wrong_callers_and_queues_nothing() {
    let work = tempfile::tempdir().unwrap();
    let (_server, base) = start_all(work.path());
    let pki = work.path().join("pki");
    let ca = std::fs::read(pki.join("ca.pem")).unwrap();
    let (sup_p, ro_p, sho_p) = (base, base + 1, base + 3);
    let pcid = "001010000000077";

    // A device certified by the supplier (software keys; PKCS#11-shaped public material).
    let identity = common::DeviceIdentity {
        device_id: "SW-77".into(),
        pcid: pcid.into(),
        model: "sw".into(),
    };
    let storage = spki();
    let cert =
        SupplierServiceClient::new(as_role(&pki, Role::Supplier, Role::Supplier, sup_p).await)
            .certify_device(sup::CertifyDeviceRequest {
                identity: Some(identity.clone()),
                tre_kind: common::TreKind::Pkcs11 as i32,
                storage_public: storage.clone(),
                attestation_public: spki(),
                tls_public_spki: spki(),
            })
            .await
            .unwrap()
            .into_inner();
    ShoServiceClient::new(as_role(&pki, Role::Subscriber, Role::Sho, sho_p).await)
        .create_subscription(sho::CreateSubscriptionRequest {
            subscriber: "s".into(),
            device: Some(identity),
            tre_kind: common::TreKind::Pkcs11 as i32,
            storage_public: storage,
            platform_credential: cert.platform_credential,
            require_aka_in_tre: false,
        })
        .await
        .unwrap();
    // The device itself (a software key under the supplier root) registers over non-3GPP.
    let (dev_cert, dev_key) = mcim_roles::pki::issue_software_device(&pki, pcid).unwrap();
    let dev = connect(
        ro_p,
        "ro.mcim.local",
        ca.clone(),
        Identity::from_pem(&dev_cert, &dev_key),
    )
    .await;
    let reg = DrfServiceClient::new(dev.clone())
        .register_device(ro::RegisterDeviceRequest {
            pcid: pcid.into(),
            access: common::AccessType::Non3gpp as i32,
            grant_id: String::new(),
            platform_credential: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();

    let mut dpf_as_sho = DpfServiceClient::new(as_role(&pki, Role::Sho, Role::Ro, ro_p).await);
    let authorize = |validation| ro::AuthorizeProvisioningRequest {
        registration_id: reg.registration_id.clone(),
        package: Some(common::McimPackage {
            cose_sign1: b"package".to_vec(),
        }),
        validation: Some(validation),
    };
    // A stale result.
    let stale = dpf_as_sho
        .authorize_provisioning(authorize(result(&pki, pcid, now() - 1)))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert!(stale.message().contains("expired"), "{stale:?}");
    // A result for another device.
    let foreign = dpf_as_sho
        .authorize_provisioning(authorize(result(&pki, "001010000000078", now() + 60)))
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::FailedPrecondition, "{foreign:?}");
    // A result not signed by the PVA (the SHO's own key).
    let forged = {
        let key = mcim_roles::pki::signing_key(&pki, "sho").unwrap();
        let mut r = result(&pki, pcid, now() + 60);
        r.cose_sign1 = mcim_core::validation::sign(
            &key,
            &mcim_core::validation::ValidationResult {
                validation_id: "v".into(),
                pcid: pcid.into(),
                nonce: "00".into(),
                verdict: "trusted".into(),
                expires_at: now() + 60,
            },
        )
        .unwrap();
        r
    };
    let forged = dpf_as_sho
        .authorize_provisioning(authorize(forged))
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::FailedPrecondition, "{forged:?}");
    // Wrong callers: the device itself, the subscriber.
    for (me, who) in [(None, "device"), (Some(Role::Subscriber), "subscriber")] {
        let ch = match me {
            None => dev.clone(),
            Some(r) => as_role(&pki, r, Role::Ro, ro_p).await,
        };
        let denied = DpfServiceClient::new(ch)
            .authorize_provisioning(authorize(result(&pki, pcid, now() + 60)))
            .await
            .unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "{who}: {denied:?}");
    }

    // Nothing was authorised: no package to download, only the attestation task queued.
    let mut dev_dpf = DpfServiceClient::new(dev.clone());
    let none = dev_dpf
        .download_package(ro::DownloadPackageRequest {
            registration_id: reg.registration_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::FailedPrecondition, "{none:?}");
    let mut tasks = dev_dpf
        .watch_device_tasks(ro::WatchDeviceTasksRequest { ack_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let first = tasks.message().await.unwrap().unwrap();
    assert!(matches!(
        first.task,
        Some(ro::watch_device_tasks_response::Task::Attest(_))
    ));
    let more = tokio::time::timeout(Duration::from_millis(500), tasks.message()).await;
    assert!(more.is_err(), "no other task was queued: {more:?}");

    // Another device may not download this registration's package.
    let (other_cert, other_key) =
        mcim_roles::pki::issue_software_device(&pki, "001010000000078").unwrap();
    let other = connect(
        ro_p,
        "ro.mcim.local",
        ca,
        Identity::from_pem(&other_cert, &other_key),
    )
    .await;
    let denied = DpfServiceClient::new(other)
        .download_package(ro::DownloadPackageRequest {
            registration_id: reg.registration_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // The control: a fresh, positive result for this device from the PVA is accepted.
    dpf_as_sho
        .authorize_provisioning(authorize(result(&pki, pcid, now() + 60)))
        .await
        .unwrap();
    let pkg = dev_dpf
        .download_package(ro::DownloadPackageRequest {
            registration_id: reg.registration_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pkg.package.unwrap().cose_sign1, b"package".to_vec());
}
