//! Resume windows made deterministic: the device's evidence reached the PVA, and its package
//! was installed in the TRE, before a restart, but the device never recorded either. Here the device's earlier incarnation is played by the
//! test (a certificate for the same PCID under the supplier root): it registers, takes the
//! attestation task, gets a real quote of the PVA's nonce from the device's own TPM through
//! `tred`, and submits it; then downloads the package and installs it through `tred`. Then
//! `tred` runs provisioning: the DRF hands it the same registration, the task stream replays
//! the attestation, the PVA answers "already decided" (the device must go on instead of
//! retrying until it gives up), the TRE already holds the IMSI from that SHO (the device must
//! count it as installed, once).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mcim_e2e::{Roles, Swtpm, Tred, mcimctl, output_text};
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::pva::v1 as pva;
use mcim_proto::mcim::pva::v1::pva_service_client::PvaServiceClient;
use mcim_proto::mcim::ro::v1 as ro;
use mcim_proto::mcim::ro::v1::dpf_service_client::DpfServiceClient;
use mcim_proto::mcim::ro::v1::drf_service_client::DrfServiceClient;
use mcim_proto::mcim::tre::v1 as pb;
use mcim_proto::mcim::vno::v1 as vno;
use mcim_proto::mcim::vno::v1::vno_service_client::VnoServiceClient;
use mcim_roles::authz::Role;

/// A device supplied (CCIF mode 2) and contracted at the SHO, with `tred` configured for the
/// RO and the VNO, all from the command line; nothing provisioned yet.
struct Setup {
    roles: Roles,
    _tpm: Swtpm,
    tred: Tred,
    socket: String,
    _work: tempfile::TempDir,
}

impl Setup {
    fn new(pcid: &str) -> Self {
        let work = tempfile::tempdir().unwrap();
        let roles = Roles::start(work.path());
        let url = |role: &str| roles.url(role);
        let pki = roles.pki.to_str().unwrap().to_string();
        let tpm = Swtpm::start();
        let tred = roles.tred(&tpm.tcti());
        let socket = tred.socket().to_str().unwrap().to_string();
        let params = work.path().join("device.json");
        let params = params.to_str().unwrap();
        for args in [
            vec![
                "supplier",
                "supply",
                "--socket",
                &socket,
                "--supplier-url",
                &url("supplier"),
                "--pva-url",
                &url("pva"),
                "--pki",
                &pki,
                "--device-id",
                "RES",
                "--pcid",
                pcid,
                "--model",
                "resume-model",
            ],
            vec![
                "device",
                "--socket",
                &socket,
                "parameters",
                "--out",
                params,
                "--for-subscriber",
                "subscriber.mcim.local",
                "--sho-id",
                "sho.mcim.local",
            ],
            vec![
                "subscriber",
                "register",
                "--device",
                params,
                "--sho-url",
                &url("sho"),
                "--pki",
                &pki,
            ],
        ] {
            ctl(&args);
        }
        Setup {
            roles,
            _tpm: tpm,
            tred,
            socket,
            _work: work,
        }
    }

    /// `mcimctl device --socket S <args>`; must succeed.
    fn device(&self, args: &[&str]) -> String {
        let mut all = vec!["device", "--socket", &self.socket];
        all.extend_from_slice(args);
        ctl(&all)
    }
}

/// `mcimctl <args>`; must succeed.
fn ctl(args: &[&str]) -> String {
    let out = mcimctl(args);
    assert!(out.status.success(), "{args:?}: {}", output_text(&out));
    output_text(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evidence_and_an_install_done_before_a_restart_do_not_stop_the_device() {
    let pcid = "001010000000061";
    let setup = Setup::new(pcid);
    let (roles, tred) = (&setup.roles, &setup.tred);

    // The device's earlier incarnation: register, take the attestation task, submit a real
    // quote from this device's TPM.
    let reg = DrfServiceClient::new(roles.device_channel(pcid, Role::Ro).await)
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
    let mut tasks = DpfServiceClient::new(roles.device_channel(pcid, Role::Ro).await)
        .watch_device_tasks(ro::WatchDeviceTasksRequest { ack_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let Some(ro::watch_device_tasks_response::Task::Attest(task)) =
        tasks.message().await.unwrap().unwrap().task
    else {
        panic!("the first task is the attestation");
    };
    drop(tasks);
    let quote = tred
        .client()
        .await
        .attest(pb::AttestRequest {
            nonce: task.nonce.clone(),
            pcrs: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let verdict = PvaServiceClient::new(roles.device_channel(pcid, Role::Pva).await)
        .submit_evidence(pva::SubmitEvidenceRequest {
            validation_id: task.validation_id.clone(),
            evidence: quote.evidence,
            clock: quote.clock,
            reset_count: quote.reset_count,
            restart_count: quote.restart_count,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        verdict.verdict,
        pva::Verdict::Trusted as i32,
        "{}",
        verdict.reason
    );

    // ... and it downloaded the package and installed it into the TRE before the restart.
    let mut tasks = DpfServiceClient::new(roles.device_channel(pcid, Role::Ro).await)
        .watch_device_tasks(ro::WatchDeviceTasksRequest { ack_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    loop {
        let t = tasks.message().await.unwrap().unwrap();
        if matches!(
            t.task,
            Some(ro::watch_device_tasks_response::Task::Download(_))
        ) {
            break;
        }
    }
    drop(tasks);
    let package = DpfServiceClient::new(roles.device_channel(pcid, Role::Ro).await)
        .download_package(ro::DownloadPackageRequest {
            registration_id: reg.registration_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .package
        .unwrap()
        .cose_sign1;
    let sho_key = mcim_pki::dev::certificate_key(&roles.pki, "sho").unwrap();
    let p = mcim_core::package::open(
        &package,
        &sho_key,
        pcid,
        &reg.registration_id,
        &reg.registration_nonce,
    )
    .unwrap();
    tred.client()
        .await
        .install_mcim(pb::InstallMcimRequest {
            imsi: p.imsi.clone(),
            sho_id: p.sho_id.clone(),
            wrapped_k: hex::decode(&p.wrapped_k).unwrap(),
            wrapped_opc: hex::decode(&p.wrapped_opc).unwrap(),
            ..Default::default()
        })
        .await
        .unwrap();

    // Now the device itself: same registration, the PVA has decided; it must go on.
    let out = setup.device(&["provision", "--access", "non-3gpp"]);
    assert!(
        out.contains(&format!("registration  {}", reg.registration_id)),
        "{out}"
    );
    assert!(out.contains("the PVA had decided already"), "{out}");
    assert!(out.contains("step 14"), "{out}");
    assert!(!out.contains("FAILED"), "{out}");
    // The MCIM installed before the restart is the one provisioned, once.
    assert!(out.contains(&format!("mcim          {}", p.imsi)), "{out}");
    let listed = setup.device(&["list"]);
    assert_eq!(listed.matches(&p.imsi).count(), 1, "{listed}");
}

/// The same for the first exchange: the device's earlier incarnation attached with its PCID
/// (the VNO holds its challenge) and never answered. The device re-attaching replaces its own
/// attempt, where another device is refused; provisioning completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attach_left_open_by_a_restart_does_not_lock_the_device_out() {
    let pcid = "001010000000062";
    let setup = Setup::new(pcid);
    VnoServiceClient::new(setup.roles.device_channel(pcid, Role::Vno).await)
        .attach(vno::AttachRequest {
            identity: pcid.into(),
        })
        .await
        .unwrap();
    let out = setup.device(&["provision", "--access", "3gpp"]);
    assert!(out.contains("step 14"), "{out}");
    assert!(!out.contains("FAILED"), "{out}");
}

/// An upgrade in the middle of provisioning: `tred` stopped with a run saved by the previous
/// version (version 1, the flat record: registered nowhere yet, non-3GPP access, no grant).
/// The new `tred` reads it, resumes it at step 5 and provisions; the file is then saved in the
/// current, versioned form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_saved_by_the_previous_tred_resumes_after_an_upgrade() {
    let pcid = "001010000000063";
    let mut setup = Setup::new(pcid);
    const V1_REGISTER: &str = r#"{
  "id": "0a1b2c3d4e5f6071",
  "three_gpp": false,
  "phase": "register",
  "steps": [],
  "grant_id": "",
  "registration_id": "",
  "sho_id": "",
  "nonce": "",
  "ack_seq": 0,
  "mcim_id": ""
}"#;
    setup.tred.restart_after(|state| {
        std::fs::write(state.join("provisioning.json"), V1_REGISTER).unwrap();
    });
    let file = setup.tred.state_dir().join("provisioning.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let saved = loop {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap_or_default();
        let state = v["run"]["state"]["state"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if state == "provisioned" || state == "failed" {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the resumed run did not finish: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(saved["version"], 2, "{saved}");
    assert_eq!(saved["run"]["id"], "0a1b2c3d4e5f6071", "{saved}");
    assert_eq!(saved["run"]["state"]["state"], "provisioned", "{saved}");
    let steps: Vec<u64> = saved["run"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (5..=14).collect::<Vec<u64>>(), "{saved}");
    let imsi = saved["run"]["state"]["mcim_id"].as_str().unwrap();
    let listed = setup.device(&["list"]);
    assert_eq!(listed.matches(imsi).count(), 1, "{listed}");
}

/// Nobody holds a device's operational IMSI without its K: another (certified) device that
/// attaches with the IMSI gets no challenge at all (NOT_FOUND: the SHO answers only for the
/// device it provisioned the IMSI to), so it can neither lock the device out nor displace its
/// attempt; the device attaches (AKA in its TRE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_attempt_of_another_device_does_not_lock_the_device_out() {
    let pcid = "001010000000064";
    let setup = Setup::new(pcid);
    let out = setup.device(&["provision", "--access", "non-3gpp"]);
    let imsi = out
        .lines()
        .find_map(|l| l.strip_prefix("mcim"))
        .map(|l| l.trim().to_string())
        .unwrap();
    assert_eq!(imsi.len(), 15, "{out}");
    // Another device cannot start an attempt for the IMSI.
    let refused = VnoServiceClient::new(
        setup
            .roles
            .device_channel("001010000000065", Role::Vno)
            .await,
    )
    .attach(vno::AttachRequest {
        identity: imsi.clone(),
    })
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    // The device attaches all the same.
    let attached = setup.device(&["attach"]);
    assert!(attached.contains(&imsi), "{attached}");
}
