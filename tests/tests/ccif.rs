//! The CCIF's configuration modes (TR 33.812 5.1.3.4.1) against the real `mcim-roles all`:
//! mode 1, the CCIF issues a PCID's credentials once (a second issue changes nothing); mode 3,
//! the subscriber registers the credentials the supplier embedded with `mcimctl subscriber
//! register-pcid`, with delayed activation (annex x.1): the PCID cannot attach until
//! `activate-pcid`. The attaching device is a software device (AKA computed in the test):
//! these tests are about the roles, the lab runs the modes with a real TRE.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mcim_e2e::{Roles, mcimctl, output_text};
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::supplier::v1 as sup;
use mcim_proto::mcim::supplier::v1::supplier_service_client::SupplierServiceClient;
use mcim_proto::mcim::vno::v1 as vno;
use mcim_proto::mcim::vno::v1::vno_service_client::VnoServiceClient;
use mcim_roles::authz::Role;
use p256::elliptic_curve::Generate;
use p256::pkcs8::EncodePublicKey;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_1_issues_a_pcids_credentials_once() {
    let work = tempfile::tempdir().unwrap();
    let roles = Roles::start(work.path());
    let mut ccif = SupplierServiceClient::new(roles.channel(Role::Supplier, Role::Supplier).await);
    let storage = {
        let k = p256::ecdsa::SigningKey::generate_from_rng(&mut rand::rng());
        p256::ecdsa::VerifyingKey::from(&k)
            .to_public_key_der()
            .unwrap()
            .as_bytes()
            .to_vec()
    };
    let issue = |storage_public: Vec<u8>| sup::IssueConnectivityCredentialsRequest {
        device_id: "D-41".into(),
        ro_id: "ro.mcim.local".into(),
        pcid: "001010000000041".into(),
        tre_kind: common::TreKind::Pkcs11 as i32,
        storage_public,
        aka_execution: common::AkaExecution::InTre as i32,
        expires_at: None,
    };
    // A key nothing can be wrapped to: refused before the ICF hears anything.
    let before = roles.snapshot().await;
    let bad = ccif
        .issue_connectivity_credentials(issue(vec![1, 2, 3]))
        .await;
    assert_eq!(bad.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(roles.snapshot().await, before);

    let got = ccif
        .issue_connectivity_credentials(issue(storage.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.pcid, "001010000000041");
    assert!(!got.wrapped_k.is_empty() && !got.wrapped_opc.is_empty());
    assert_ne!(got.wrapped_k, got.wrapped_opc);
    let issued = roles.snapshot().await;
    assert_ne!(issued, before, "the ICF holds the PCID");
    // Once per PCID.
    let again = ccif
        .issue_connectivity_credentials(issue(storage))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
    assert_eq!(
        roles.snapshot().await,
        issued,
        "a refused issue changed nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_3_the_subscriber_registers_the_pcid_which_attaches_only_once_activated() {
    let work = tempfile::tempdir().unwrap();
    let roles = Roles::start(work.path());
    let ro_url = roles.url("ro");
    let pki = roles.pki.to_str().unwrap().to_string();
    let pcid = "001010000000042";
    let (k, opc) = ([0x42u8; 16], [0x24u8; 16]);
    let creds = work.path().join("pcid.json");
    // The supplier's voucher for these credentials, as `mcimctl supplier supply` writes it.
    let voucher = serde_json::json!({
        "signature": hex::encode(mcim_pki::voucher::sign(
            &mcim_pki::dev::signing_key(&roles.pki, "supplier").unwrap(),
            pcid,
            &k,
            &opc,
        )),
        "supplier_certificate": [hex::encode(mcim_pki::dev::ca_der(&roles.pki, "supplier").unwrap())],
    });
    let write_with = |k: &str, voucher: Option<&serde_json::Value>| {
        let mut v = serde_json::json!({"pcid": pcid, "k": k, "opc": hex::encode(opc)});
        if let Some(voucher) = voucher {
            v["voucher"] = voucher.clone();
        }
        std::fs::write(&creds, v.to_string()).unwrap();
    };
    let write = |k: &str| write_with(k, Some(&voucher));
    let register = || {
        mcimctl(&[
            "subscriber",
            "register-pcid",
            "--credentials",
            creds.to_str().unwrap(),
            "--delayed-activation",
            "--ro-url",
            &ro_url,
            "--pki",
            &pki,
        ])
    };
    // A malformed K is refused without echoing the secret, and nothing changes.
    let before = roles.snapshot().await;
    write("4242");
    let out = register();
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("k must be 16 octets"),
        "{}",
        output_text(&out)
    );
    assert!(
        !output_text(&out).contains("4242"),
        "the secret is not echoed"
    );
    assert_eq!(roles.snapshot().await, before);

    // Without the supplier's voucher: refused (anyone could claim the PCID first), nothing
    // changes.
    write_with(&hex::encode(k), None);
    let out = register();
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("no voucher"),
        "{}",
        output_text(&out)
    );
    assert_eq!(roles.snapshot().await, before);

    write(&hex::encode(k));
    let out = register();
    assert!(out.status.success(), "{}", output_text(&out));

    // Registered but not activated: the VNO cannot get vectors for it.
    let mut device = VnoServiceClient::new(roles.device_channel(pcid, Role::Vno).await);
    let attach = || vno::AttachRequest {
        identity: pcid.into(),
    };
    let early = device.attach(attach()).await.unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition, "{early:?}");
    assert!(early.message().contains("awaits activation"), "{early:?}");

    let out = mcimctl(&[
        "subscriber",
        "activate-pcid",
        pcid,
        "--ro-url",
        &ro_url,
        "--pki",
        &pki,
    ]);
    assert!(out.status.success(), "{}", output_text(&out));

    // Now the PCID attaches with the credentials the subscriber handed over.
    let a = device.attach(attach()).await.unwrap().into_inner();
    let rand = a.challenge.unwrap().rand;
    let res = {
        use mcim_core::aka::{Constants, K, Milenage, Opc, Rand, SoftKernel};
        Milenage::with_opc(
            SoftKernel::new(&K::new(k)),
            Opc::new(opc),
            Constants::default(),
        )
        .f2345(&Rand(rand.as_slice().try_into().unwrap()))
        .unwrap()
        .res
        .0
        .to_vec()
    };
    let done = device
        .complete_attach(vno::CompleteAttachRequest {
            attach_id: a.attach_id,
            answer: Some(vno::complete_attach_request::Answer::Res(res)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        done.result,
        Some(vno::complete_attach_response::Result::Grant(_))
    ));
}
