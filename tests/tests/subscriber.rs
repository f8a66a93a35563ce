//! The subscriber's side at the command line (5.1.3.5.2): the owner exports a real device's
//! parameters from `tred` (swtpm), the subscriber hands them to the SHO of the real
//! `mcim-roles all` with `mcimctl subscriber register`, and follows a registration with
//! `mcimctl subscriber status`. Refusals change nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mcim_e2e::{Roles, Swtpm, Tred, mcimctl, output_text};
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::supplier::v1 as sup;
use mcim_proto::mcim::supplier::v1::supplier_service_client::SupplierServiceClient;
use mcim_proto::mcim::tre::v1 as pb;
use mcim_roles::authz::Role;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_registers_a_real_device_at_the_sho_from_its_exported_parameters() {
    let work = tempfile::tempdir().unwrap();
    let roles = Roles::start(work.path());
    let tpm = Swtpm::start();
    let tred = Tred::start(&tpm.tcti());
    let socket = tred.socket();
    let socket = socket.to_str().unwrap();
    let mut dev = tred.client().await;
    let identity = common::DeviceIdentity {
        device_id: "SUB-1".into(),
        pcid: "001010000000031".into(),
        model: "m1".into(),
    };
    let init = dev
        .init_device(pb::InitDeviceRequest {
            identity: Some(identity.clone()),
        })
        .await
        .unwrap()
        .into_inner();

    // Before supply is complete there is nothing to hand over.
    let early = mcimctl(&["device", "--socket", socket, "parameters"]);
    assert!(!early.status.success());
    assert!(
        output_text(&early).contains("no platform credential"),
        "{}",
        output_text(&early)
    );

    let cert = SupplierServiceClient::new(roles.channel(Role::Supplier, Role::Supplier).await)
        .certify_device(sup::CertifyDeviceRequest {
            identity: Some(identity.clone()),
            tre_kind: common::TreKind::Tpm2 as i32,
            storage_public: init.storage_public.clone(),
            attestation_public: init.attestation_public.clone(),
            tls_public_spki: init.tls_public_spki.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    dev.install_certificates(pb::InstallCertificatesRequest {
        platform_credential: cert.platform_credential.clone(),
        tls_certificate: cert.tls_certificate.clone(),
    })
    .await
    .unwrap();

    // The owner exports; the file holds the TRE's real storage key and the credential.
    let file = work.path().join("device.json");
    let out = mcimctl(&[
        "device",
        "--socket",
        socket,
        "parameters",
        "--out",
        file.to_str().unwrap(),
        "--for-subscriber",
        "subscriber.mcim.local",
        "--sho-id",
        "sho.mcim.local",
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    let p: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(p["pcid"], "001010000000031");
    assert_eq!(p["tre_kind"], "tpm2");
    assert_eq!(p["aka_execution"], "in_tre");
    assert_eq!(p["storage_public"], hex::encode(&init.storage_public));
    assert_eq!(
        p["platform_credential"][0],
        hex::encode(&cert.platform_credential[0])
    );

    let sho_url = roles.url("sho");
    let pki = roles.pki.to_str().unwrap().to_string();
    // A second subscriber: its own certificate under the same CA (a PKI directory of its own).
    let mallory_pki = work.path().join("mallory-pki");
    std::fs::create_dir_all(&mallory_pki).unwrap();
    std::fs::copy(roles.pki.join("ca.pem"), mallory_pki.join("ca.pem")).unwrap();
    let (cert, key) = mcim_pki::dev::issue_party(&roles.pki, Role::Subscriber, "mallory").unwrap();
    std::fs::write(mallory_pki.join("subscriber.pem"), cert).unwrap();
    std::fs::write(mallory_pki.join("subscriber.key"), key).unwrap();
    let mallory = mallory_pki.to_str().unwrap().to_string();
    let register_as = |device: &str, pki: &str, account: Option<&str>| {
        let mut args = vec![
            "subscriber",
            "register",
            "--device",
            device,
            "--sho-url",
            &sho_url,
            "--pki",
            pki,
            "--json",
        ];
        if let Some(a) = account {
            args.extend(["--account", a]);
        }
        mcimctl(&args)
    };
    let register = |device: &str, _: &str| register_as(device, &pki, None);
    let before = roles.snapshot().await;
    // A tampered file is refused before anything is sent.
    let mut bad = p.clone();
    bad["storage_public"] = Value::from("not hex");
    let bad_file = work.path().join("bad.json");
    std::fs::write(&bad_file, bad.to_string()).unwrap();
    let refused = register(bad_file.to_str().unwrap(), "alice");
    assert!(!refused.status.success());
    assert!(
        output_text(&refused).contains("storage_public: not hex"),
        "{}",
        output_text(&refused)
    );
    // Another device's credential under this PCID: the SHO refuses it.
    let mut foreign = p.clone();
    foreign["pcid"] = Value::from("001010000000032");
    std::fs::write(&bad_file, foreign.to_string()).unwrap();
    let refused = register(bad_file.to_str().unwrap(), "alice");
    assert!(!refused.status.success());
    assert!(
        output_text(&refused).contains("another device's"),
        "{}",
        output_text(&refused)
    );
    // The subscriber's own key (a software P-256 key, as if the TRE were a token) in place of
    // the TRE's storage key: the MCIM would be wrapped to a key outside the TRE. The SHO
    // accepts only the key the supplier certified in the platform credential.
    let mut own_key = p.clone();
    own_key["tre_kind"] = Value::from("pkcs11");
    own_key["storage_public"] = Value::from(hex::encode({
        use p256::elliptic_curve::Generate;
        use p256::pkcs8::EncodePublicKey;
        let k = p256::ecdsa::SigningKey::generate_from_rng(&mut rand::rng());
        p256::ecdsa::VerifyingKey::from(&k)
            .to_public_key_der()
            .unwrap()
            .as_bytes()
            .to_vec()
    }));
    std::fs::write(&bad_file, own_key.to_string()).unwrap();
    let refused = register(bad_file.to_str().unwrap(), "alice");
    assert!(!refused.status.success());
    assert!(
        output_text(&refused).contains("not the one the supplier certified"),
        "{}",
        output_text(&refused)
    );
    assert_eq!(
        roles.snapshot().await,
        before,
        "a refusal changed the SHO or the RO"
    );

    let ok = register(file.to_str().unwrap(), "alice");
    assert!(ok.status.success(), "{}", output_text(&ok));
    let r: Value = serde_json::from_slice(&ok.stdout).unwrap();
    let imsi = r["imsi"].as_str().unwrap().to_string();
    assert!(imsi.starts_with("00102") && imsi.len() == 15, "{imsi}");
    // The proof of ownership in the file is used once: the same file again is refused.
    let reused = register(file.to_str().unwrap(), "alice");
    assert!(!reused.status.success());
    assert!(
        output_text(&reused).contains("used before"),
        "{}",
        output_text(&reused)
    );
    // With a new proof from the device: the same contract, answered as before.
    let fresh = work.path().join("device-2.json");
    let out = mcimctl(&[
        "device",
        "--socket",
        socket,
        "parameters",
        "--out",
        fresh.to_str().unwrap(),
        "--for-subscriber",
        "subscriber.mcim.local",
        "--sho-id",
        "sho.mcim.local",
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    let again = register(fresh.to_str().unwrap(), "alice");
    let r2: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(r2["imsi"], imsi.as_str());
    // Another subscriber may not take the device.
    let after = roles.snapshot().await;
    let taken = register_as(file.to_str().unwrap(), &mallory, None);
    assert!(!taken.status.success());
    assert!(
        output_text(&taken).contains("another subscriber"),
        "{}",
        output_text(&taken)
    );
    // Nor in the first subscriber's name: the name is the certificate's.
    let posing = register_as(
        file.to_str().unwrap(),
        &mallory,
        Some("subscriber.mcim.local"),
    );
    assert!(!posing.status.success());
    assert!(
        output_text(&posing).contains("permission denied"),
        "{}",
        output_text(&posing)
    );
    assert_eq!(roles.snapshot().await, after);

    // No registration yet: the SHO says so.
    let status = mcimctl(&[
        "subscriber",
        "status",
        "no-such-registration",
        "--sho-url",
        &sho_url,
        "--pki",
        &pki,
    ]);
    assert!(!status.status.success());
    assert!(
        output_text(&status).to_lowercase().contains("no such"),
        "{}",
        output_text(&status)
    );
}
