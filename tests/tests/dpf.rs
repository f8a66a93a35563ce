//! The DPF's refusals over the real `mcim-roles all` (TR 33.812 5.1.3.6.2 step 11): it takes a
//! package only from the SHO the device registered at, only with a fresh positive PVA result
//! for that very device; a refused authorisation queues nothing, and the device cannot
//! download anything. The device here is a software device (a certificate under the supplier
//! root, no TRE): these tests are about the roles' rules, not the TRE.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use mcim_e2e::Roles;
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::pva::v1 as pva;
use mcim_proto::mcim::pva::v1::pva_service_client::PvaServiceClient;
use mcim_proto::mcim::ro::v1 as ro;
use mcim_proto::mcim::ro::v1::dpf_service_client::DpfServiceClient;
use mcim_proto::mcim::ro::v1::drf_service_client::DrfServiceClient;
use mcim_roles::authz::Role;
use tonic::Code;

fn result(pki: &std::path::Path, pcid: &str, expires_at: u64) -> common::SignedValidationResult {
    let key = mcim_pki::dev::signing_key(pki, "pva").unwrap();
    common::SignedValidationResult {
        cose_sign1: mcim_core::validation::sign(
            &key,
            &mcim_core::validation::ValidationResult {
                validation_id: "v".into(),
                pcid: pcid.into(),
                nonce: "00".into(),
                verdict: "trusted".into(),
                expires_at,
                aka_execution: "in_tre".into(),
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
    let roles = Roles::start(work.path());
    let pki = roles.pki.clone();
    let pcid = "001010000000077";

    // A device certified by the supplier (software keys) and contracted at the SHO.
    roles.contract_software_device(pcid, "SW-77").await;
    // The device itself (a software key under the supplier root) registers over non-3GPP.
    let dev = roles.device_channel(pcid, Role::Ro).await;
    let reg = DrfServiceClient::new(dev.clone())
        .register_device(ro::RegisterDeviceRequest {
            pcid: pcid.into(),
            access: common::AccessType::Non3gpp as i32,
            grant_id: String::new(),
            platform_credential: Vec::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let mut dpf_as_sho = DpfServiceClient::new(roles.channel(Role::Sho, Role::Ro).await);
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
        let key = mcim_pki::dev::signing_key(&pki, "sho").unwrap();
        let mut r = result(&pki, pcid, now() + 60);
        r.cose_sign1 = mcim_core::validation::sign(
            &key,
            &mcim_core::validation::ValidationResult {
                validation_id: "v".into(),
                pcid: pcid.into(),
                nonce: "00".into(),
                verdict: "trusted".into(),
                expires_at: now() + 60,
                aka_execution: "in_tre".into(),
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
            Some(r) => roles.channel(r, Role::Ro).await,
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
    let Some(ro::watch_device_tasks_response::Task::Attest(attest)) = first.task.clone() else {
        panic!("the first task is the attestation: {first:?}");
    };
    let more = tokio::time::timeout(Duration::from_millis(500), tasks.message()).await;
    assert!(more.is_err(), "no other task was queued: {more:?}");

    // Another device may not download this registration's package.
    let other = roles.device_channel("001010000000078", Role::Ro).await;
    let denied = DpfServiceClient::new(other.clone())
        .download_package(ro::DownloadPackageRequest {
            registration_id: reg.registration_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    // Nor report its status, relay for it, or answer its validation; nothing changes.
    let before = roles.snapshot().await;
    let mut other_dpf = DpfServiceClient::new(other);
    let denied = other_dpf
        .report_provisioning_status(ro::ReportProvisioningStatusRequest {
            registration_id: reg.registration_id.clone(),
            status: common::ProvisioningStatus::Failed as i32,
            detail: "not mine".into(),
            mcim_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = other_dpf
        .relay_discard_ack(ro::RelayDiscardAckRequest {
            registration_id: reg.registration_id.clone(),
            discard_ack: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let denied = PvaServiceClient::new(roles.device_channel("001010000000078", Role::Pva).await)
        .submit_evidence(pva::SubmitEvidenceRequest {
            validation_id: attest.validation_id.clone(),
            evidence: None,
            clock: 0,
            reset_count: 0,
            restart_count: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert_eq!(
        roles.snapshot().await,
        before,
        "a refused call changed state"
    );

    // The device reconnects, acknowledging the attestation task (the DPF forgets it).
    drop(tasks);
    let mut tasks = dev_dpf
        .watch_device_tasks(ro::WatchDeviceTasksRequest { ack_seq: first.seq })
        .await
        .unwrap()
        .into_inner();

    // The control: a fresh, positive result for this device from the PVA is accepted.
    dpf_as_sho
        .authorize_provisioning(authorize(result(&pki, pcid, now() + 60)))
        .await
        .unwrap();
    // The download task reaches the reconnected stream: a new task's sequence number is above
    // every one the device has acknowledged, even once those are deleted.
    let next = tokio::time::timeout(Duration::from_secs(10), tasks.message())
        .await
        .expect("the download task arrives")
        .unwrap()
        .unwrap();
    assert!(next.seq > first.seq, "{} after {}", next.seq, first.seq);
    assert!(matches!(
        next.task,
        Some(ro::watch_device_tasks_response::Task::Download(_))
    ));
    let pkg = dev_dpf
        .download_package(ro::DownloadPackageRequest {
            registration_id: reg.registration_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pkg.package.unwrap().cose_sign1, b"package".to_vec());
}

/// A device acknowledges only tasks the DPF sent it: an acknowledgement beyond the last task
/// sent is INVALID_ARGUMENT and deletes nothing (before, it deleted tasks the device had never
/// seen); acknowledging what was sent works, and the task is then gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_acknowledges_only_tasks_it_was_sent() {
    let work = tempfile::tempdir().unwrap();
    let roles = Roles::start(work.path());
    let pcid = "001010000000079";
    roles.contract_software_device(pcid, "SW-79").await;
    let dev = roles.device_channel(pcid, Role::Ro).await;
    DrfServiceClient::new(dev.clone())
        .register_device(ro::RegisterDeviceRequest {
            pcid: pcid.into(),
            access: common::AccessType::Non3gpp as i32,
            grant_id: String::new(),
            platform_credential: Vec::new(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut dpf = DpfServiceClient::new(dev);
    // Before anything was sent, no acknowledgement is possible.
    let before = roles.snapshot().await;
    let early = dpf
        .watch_device_tasks(ro::WatchDeviceTasksRequest { ack_seq: 1 })
        .await
        .unwrap_err();
    assert_eq!(early.code(), Code::InvalidArgument, "{early:?}");
    assert_eq!(
        roles.snapshot().await,
        before,
        "a refused ack changed state"
    );
    // The attestation task is sent.
    let mut tasks = dpf
        .watch_device_tasks(ro::WatchDeviceTasksRequest { ack_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let first = tasks.message().await.unwrap().unwrap();
    assert!(matches!(
        first.task,
        Some(ro::watch_device_tasks_response::Task::Attest(_))
    ));
    drop(tasks);
    // One beyond it: refused, nothing deleted.
    let before = roles.snapshot().await;
    let beyond = dpf
        .watch_device_tasks(ro::WatchDeviceTasksRequest {
            ack_seq: first.seq + 1,
        })
        .await
        .unwrap_err();
    assert_eq!(beyond.code(), Code::InvalidArgument, "{beyond:?}");
    assert_eq!(
        roles.snapshot().await,
        before,
        "a refused ack changed state"
    );
    // The task itself: acknowledged and gone, not replayed.
    let mut tasks = dpf
        .watch_device_tasks(ro::WatchDeviceTasksRequest { ack_seq: first.seq })
        .await
        .unwrap()
        .into_inner();
    let next = tokio::time::timeout(Duration::from_millis(500), tasks.message()).await;
    assert!(next.is_err(), "an acknowledged task came again: {next:?}");
    assert_ne!(
        roles.snapshot().await,
        before,
        "the acknowledged task was deleted"
    );
}
