//! The roles' side of a change of SHO (TR 33.812 5.1.3.7.4.2 steps 1, 3, 9-11) against the
//! real `mcim-roles all` (two SHOs) over mutual TLS, with a software device (its TLS key signs
//! what a TRE signs): the old SHO takes only the device's own signed notice for its own IMSI,
//! answers a repeated notice with the same acknowledgment; the DRF registers a change only at
//! an SHO that announced a contract; the DPF relays only the old SHO's genuine acknowledgment,
//! filtered. Every refusal leaves the roles' database as it was.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mcim_e2e::{Roles, db_rows};
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::ro::v1 as ro;
use mcim_proto::mcim::ro::v1::dpf_service_client::DpfServiceClient;
use mcim_proto::mcim::ro::v1::drf_service_client::DrfServiceClient;
use mcim_proto::mcim::sho::v1 as sho;
use mcim_proto::mcim::sho::v1::sho_service_client::ShoServiceClient;
use mcim_roles::authz::Role;
use p256::ecdsa::signature::Signer;
use tonic::Code;

const ME: &str = "001010000000077";
/// When the notices say the device discarded the MCIM (before the SHO acknowledges it).
const DISCARDED_AT: u64 = 1_700_000_000;

fn notice(imsi: &str, sho: &str) -> Vec<u8> {
    let mut nonce = [0u8; 16];
    rand::Rng::fill_bytes(&mut rand::rng(), &mut nonce);
    mcim_pki::discard::Notice {
        pcid: ME.into(),
        imsi: imsi.into(),
        sho: sho.into(),
        nonce: hex::encode(nonce),
        discarded_at: DISCARDED_AT,
    }
    .to_bytes()
    .unwrap()
}

fn sign(key: &p256::ecdsa::SigningKey, bytes: &[u8]) -> Vec<u8> {
    let s: p256::ecdsa::Signature = key.sign(bytes);
    s.to_der().as_bytes().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_devices_own_notice_is_acknowledged_once_and_only_the_old_shos_ack_is_relayed_filtered()
 {
    let work = tempfile::tempdir().unwrap();
    let roles = Roles::start(work.path());
    let dev = roles.software_device(ME, "DISCARD-1").await;
    // The device's subscription at the first SHO.
    let sub = ShoServiceClient::new(roles.channel(Role::Subscriber, Role::Sho).await)
        .create_subscription(
            dev.subscription(Some(dev.proof("subscriber.mcim.local", "sho.mcim.local"))),
        )
        .await
        .unwrap()
        .into_inner();
    let imsi = sub.imsi;
    let mut old_sho = ShoServiceClient::new(roles.device_channel(ME, Role::Sho).await);
    let notify = |n: Vec<u8>, sig: Vec<u8>| sho::NotifyDiscardRequest {
        imsi: imsi.clone(),
        discard_statement: n,
        signature: sig,
        device_certificate: dev.tls_certificate.clone(),
    };

    // Refused, and nothing changes: a notice naming another SHO; one signed by another key;
    // one for an IMSI this SHO never gave.
    let before = roles.snapshot().await;
    let other = notice(&imsi, "sho2.mcim.local");
    let forger = p256::ecdsa::SigningKey::from_slice(&[9u8; 32]).unwrap();
    let right = notice(&imsi, "sho.mcim.local");
    for (what, req, code) in [
        (
            "another SHO",
            notify(other.clone(), sign(&dev.tls_key, &other)),
            Code::PermissionDenied,
        ),
        (
            "another key",
            notify(right.clone(), sign(&forger, &right)),
            Code::PermissionDenied,
        ),
        (
            "another IMSI",
            sho::NotifyDiscardRequest {
                imsi: "001029999999999".into(),
                ..notify(right.clone(), sign(&dev.tls_key, &right))
            },
            Code::NotFound,
        ),
    ] {
        let got = old_sho.notify_discard(req).await;
        assert_eq!(got.err().map(|s| s.code()), Some(code), "{what}");
    }
    assert_eq!(
        roles.snapshot().await,
        before,
        "a refused notice changed state"
    );

    // The device's own notice: a signed acknowledgment; again (a new notice): the same one.
    let ack = old_sho
        .notify_discard(notify(right.clone(), sign(&dev.tls_key, &right)))
        .await
        .unwrap()
        .into_inner()
        .discard_ack;
    let sho_key = mcim_pki::dev::certificate_key(&roles.pki, "sho").unwrap();
    let a: mcim_pki::discard::Ack = mcim_core::signed::open(&ack, &sho_key).unwrap();
    assert_eq!((a.pcid.as_str(), a.imsi.as_str()), (ME, imsi.as_str()));
    assert_eq!(a.notice_sha256, mcim_pki::discard::notice_digest(&right));
    let again = notice(&imsi, "sho.mcim.local");
    let ack2 = old_sho
        .notify_discard(notify(again.clone(), sign(&dev.tls_key, &again)))
        .await
        .unwrap()
        .into_inner()
        .discard_ack;
    assert_eq!(ack2, ack, "a repeated notice gets the acknowledgment kept");
    let kept = db_rows(&roles, "SELECT imsi FROM sho_discard").await;
    assert_eq!(kept, vec![vec![imsi.clone()]]);

    // Step 1: the subscriber contracts at the second SHO, which announces itself at the DRF.
    ShoServiceClient::new(roles.sho2_channel(Role::Subscriber).await)
        .create_subscription(
            dev.subscription(Some(dev.proof("subscriber.mcim.local", "sho2.mcim.local"))),
        )
        .await
        .unwrap();
    let offers = db_rows(&roles, "SELECT sho_id FROM ro_sho_offer").await;
    assert_eq!(offers, vec![vec!["sho2.mcim.local".to_string()]]);
    let served = db_rows(&roles, "SELECT sho_id FROM ro_subscription").await;
    assert_eq!(
        served,
        vec![vec!["sho.mcim.local".to_string()]],
        "no take-over"
    );

    // A change to an SHO that announced nothing: refused, nothing changes.
    let mut drf = DrfServiceClient::new(roles.device_channel(ME, Role::Ro).await);
    let register = |new_sho: &str| ro::RegisterDeviceRequest {
        pcid: ME.into(),
        access: common::AccessType::Non3gpp as i32,
        new_sho_id: new_sho.into(),
        ..Default::default()
    };
    let before = roles.snapshot().await;
    let got = drf.register_device(register("sho3.mcim.local")).await;
    assert_eq!(got.err().map(|s| s.code()), Some(Code::FailedPrecondition));
    assert_eq!(roles.snapshot().await, before);
    // The change registration at the second SHO.
    let reg = drf
        .register_device(register("sho2.mcim.local"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reg.sho_id, "sho2.mcim.local");

    // Step 11: only the old SHO's own acknowledgment, for this device, is relayed.
    let mut dpf = DpfServiceClient::new(roles.device_channel(ME, Role::Ro).await);
    let sho2_forged = mcim_core::signed::sign(
        &mcim_pki::dev::signing_key(&roles.pki, "sho2").unwrap(),
        &a,
        Some(&mcim_pki::dev::ca_der(&roles.pki, "sho2").unwrap()),
    )
    .unwrap();
    let before = roles.snapshot().await;
    for (what, bytes, code) in [
        ("garbage", b"not an ack".to_vec(), Code::InvalidArgument),
        ("signed by the new SHO", sho2_forged, Code::PermissionDenied),
    ] {
        let got = dpf
            .relay_discard_ack(ro::RelayDiscardAckRequest {
                registration_id: reg.registration_id.clone(),
                discard_ack: bytes,
            })
            .await;
        assert_eq!(got.err().map(|s| s.code()), Some(code), "{what}");
    }
    assert_eq!(
        roles.snapshot().await,
        before,
        "a refused relay changed state"
    );
    dpf.relay_discard_ack(ro::RelayDiscardAckRequest {
        registration_id: reg.registration_id.clone(),
        discard_ack: ack.clone(),
    })
    .await
    .unwrap();
    // What the new SHO holds: when, and nothing of the old subscription.
    let r = ShoServiceClient::new(roles.sho2_channel(Role::Subscriber).await)
        .get_registration(sho::GetRegistrationRequest {
            registration_id: reg.registration_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let f: mcim_pki::discard::FilteredAck = serde_json::from_slice(&r.discard_ack).unwrap();
    assert_eq!(f.registration_id, reg.registration_id);
    assert_eq!(f.discarded_at, DISCARDED_AT);
    let text = String::from_utf8_lossy(&r.discard_ack);
    assert!(
        !text.contains(&imsi) && !text.contains("sho.mcim.local"),
        "{text}"
    );
    // The new SHO keeps the filtered form only: a "filtered" acknowledgment that carries
    // more (an RO that filters nothing) is refused and changes nothing.
    let leaky = serde_json::json!({
        "registration_id": reg.registration_id,
        "discarded_at": 1,
        "acknowledged_at": 2,
        "imsi": imsi,
    });
    let before = roles.sho2_snapshot().await;
    let got = ShoServiceClient::new(roles.sho2_channel(Role::Ro).await)
        .receive_discard_ack(sho::ReceiveDiscardAckRequest {
            registration_id: reg.registration_id.clone(),
            filtered_ack: serde_json::to_vec(&leaky).unwrap(),
        })
        .await;
    assert_eq!(got.err().map(|s| s.code()), Some(Code::InvalidArgument));
    assert_eq!(roles.sho2_snapshot().await, before);
}
