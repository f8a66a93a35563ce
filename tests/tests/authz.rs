//! The authorization table over the wire (TR 33.812 annex x.3): every RPC of every role,
//! called by every role the table does not list for it, over mutual TLS against the real
//! `mcim-roles all`, is PERMISSION_DENIED, and the roles' database is unchanged afterwards; a
//! device that names another device is refused; and for the RPCs whose device is only known
//! from a stored object (an attach attempt, a grant), another device is refused and the
//! object still works for its own device. Devices here are software devices (certificates
//! under the supplier root): these tests are about the roles' rules, not the TRE.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;

use mcim_e2e::Roles;
use mcim_proto::mcim::ro::v1 as ro;
use mcim_proto::mcim::ro::v1::icf_service_client::IcfServiceClient;
use mcim_proto::mcim::vno::v1 as vno;
use mcim_proto::mcim::vno::v1::vno_service_client::VnoServiceClient;
use mcim_roles::authz::{ALL_ROLES, Owner, RULES, Role};
use prost::Message;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const ME: &str = "001010000000001";
const OTHER: &str = "001010000000002";

/// A request whose field 1 is a string naming a device (`pcid` / `device_id`).
#[derive(Clone, PartialEq, prost::Message)]
struct NamesDevice {
    #[prost(string, tag = "1")]
    device: String,
}

/// The RPCs whose request names the device in field 1 (the rest name a stored object).
const DEVICE_IN_FIELD_1: &[&str] = &[
    "/mcim.ro.v1.DrfService/GetBootstrap",
    "/mcim.ro.v1.DrfService/RegisterDevice",
    "/mcim.ro.v1.IcfService/RenewInitialCredentials",
    "/mcim.ro.v1.IcfService/ConfirmInitialCredentials",
];

/// Which role serves a package.
fn server_of(method: &str) -> Role {
    let package = method.trim_start_matches('/').split('.').nth(1).unwrap();
    Role::parse(package).unwrap()
}

/// Server-streaming RPCs, from the wire contract.
fn streaming() -> Vec<String> {
    let set = prost_types::FileDescriptorSet::decode(mcim_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut out = Vec::new();
    for f in &set.file {
        for s in &f.service {
            for m in &s.method {
                if m.server_streaming() {
                    out.push(format!("/{}.{}/{}", f.package(), s.name(), m.name()));
                }
            }
        }
    }
    out
}

/// Calls any RPC with a hand-made request; only the status matters.
async fn call<M: Message + Default + Clone + Send + Sync + 'static>(
    ch: Channel,
    method: &str,
    streaming: bool,
    req: M,
) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(method.to_string()).unwrap();
    let codec = tonic_prost::ProstCodec::<M, ()>::default();
    if streaming {
        grpc.server_streaming(Request::new(req), path, codec)
            .await
            .map(|_| ())
    } else {
        grpc.unary(Request::new(req), path, codec).await.map(|_| ())
    }
}

/// An RPC with the device named in field 1 where the request has one, else empty.
async fn probe(ch: Channel, method: &str, streaming: bool, device: &str) -> Result<(), Status> {
    if DEVICE_IN_FIELD_1.contains(&method) {
        let req = NamesDevice {
            device: device.into(),
        };
        call(ch, method, streaming, req).await
    } else {
        call(ch, method, streaming, ()).await
    }
}

struct Channels<'a> {
    roles: &'a Roles,
    cache: HashMap<(Role, Role, &'static str), Channel>,
}

impl Channels<'_> {
    /// `me` calling `peer`; a device caller is the software device `pcid`.
    async fn get(&mut self, me: Role, peer: Role, pcid: &'static str) -> Channel {
        if let Some(c) = self.cache.get(&(me, peer, pcid)) {
            return c.clone();
        }
        let c = if me == Role::Device {
            self.roles.device_channel(pcid, peer).await
        } else {
            self.roles.channel(me, peer).await
        };
        self.cache.insert((me, peer, pcid), c.clone());
        c
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_edge_refuses_every_role_it_does_not_list_and_changes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let roles = Roles::start(work.path());
    let streaming = streaming();
    let mut chans = Channels {
        roles: &roles,
        cache: HashMap::new(),
    };
    let before = roles.snapshot().await;
    assert!(before.contains_key("ro_registration"), "{before:?}");

    let mut refused = 0;
    for rule in RULES {
        let peer = server_of(rule.method);
        let is_stream = streaming.iter().any(|m| m == rule.method);
        for role in ALL_ROLES {
            if rule.callers.contains(&role) {
                continue;
            }
            let ch = chans.get(role, peer, ME).await;
            let got = probe(ch, rule.method, is_stream, ME).await;
            let code = got.err().map(|s| s.code());
            assert_eq!(
                code,
                Some(Code::PermissionDenied),
                "{role} calling {}",
                rule.method
            );
            refused += 1;
        }
        // A device naming another device.
        if rule.owner == Owner::Device && DEVICE_IN_FIELD_1.contains(&rule.method) {
            let ch = chans.get(Role::Device, peer, ME).await;
            let got = probe(ch, rule.method, is_stream, OTHER).await;
            assert_eq!(
                got.err().map(|s| s.code()),
                Some(Code::PermissionDenied),
                "device {ME} acting for {OTHER} on {}",
                rule.method
            );
            refused += 1;
        }
    }
    assert!(refused > 150, "{refused} refusals");
    assert_eq!(
        roles.snapshot().await,
        before,
        "a refused call changed state"
    );

    // The control: for every edge, a listed role gets past the table (whatever the handler
    // then says about the empty request), so the refusals above are the table's.
    for rule in RULES {
        let peer = server_of(rule.method);
        let is_stream = streaming.iter().any(|m| m == rule.method);
        let role = rule.callers[0];
        let ch = chans.get(role, peer, ME).await;
        let got = probe(ch, rule.method, is_stream, ME).await;
        if let Err(s) = got {
            assert!(
                !matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated),
                "{role} on {}: {s:?}",
                rule.method
            );
        }
    }
}

/// The RES the device with (k, opc) gives for `rand` (MILENAGE f2, TS 35.206).
fn res(k: [u8; 16], opc: [u8; 16], rand: &[u8]) -> Vec<u8> {
    use mcim_core::aka::{Constants, K, Milenage, Opc, Rand, SoftKernel};
    let m = Milenage::with_opc(
        SoftKernel::new(&K::new(k)),
        Opc::new(opc),
        Constants::default(),
    );
    let out = m.f2345(&Rand(rand.try_into().unwrap())).unwrap();
    out.res.0.to_vec()
}

/// A PCID is its device's: another device attaching with it is refused; the same device
/// attaching again replaces its own attempt (a device that restarted mid-attach must not lock
/// itself out). CompleteAttach and Detach name only an attempt or a grant; the VNO looks up
/// which device it belongs to. Another device is refused, and the attempt (then the grant)
/// still works for the device that made it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_attach_per_pcid_and_another_device_can_neither_answer_nor_end_it() {
    let work = tempfile::tempdir().unwrap();
    let roles = Roles::start(work.path());
    let (k, opc) = ([0x11; 16], [0x22; 16]);
    IcfServiceClient::new(roles.channel(Role::Supplier, Role::Ro).await)
        .register_initial_credentials(ro::RegisterInitialCredentialsRequest {
            pcid: ME.into(),
            k: k.to_vec(),
            opc: opc.to_vec(),
            mode: ro::CredentialMode::SupplierGenerated as i32,
            expires_at: None,
            delayed_activation: false,
            supplier_voucher: None,
        })
        .await
        .unwrap();
    let mut me = VnoServiceClient::new(roles.device_channel(ME, Role::Vno).await);
    let mut other = VnoServiceClient::new(roles.device_channel(OTHER, Role::Vno).await);
    let attach = || vno::AttachRequest {
        identity: ME.into(),
    };
    // The device's answer to an attempt.
    let answer = |a: &vno::AttachResponse| vno::CompleteAttachRequest {
        attach_id: a.attach_id.clone(),
        answer: Some(vno::complete_attach_request::Answer::Res(res(
            k,
            opc,
            &a.challenge.as_ref().unwrap().rand,
        ))),
    };
    let first = me.attach(attach()).await.unwrap().into_inner();
    // The same device attaching again (it restarted and lost its attempt) replaces its own
    // attempt: the old one is gone.
    let attempt = me.attach(attach()).await.unwrap().into_inner();
    assert_ne!(attempt.attach_id, first.attach_id);
    let gone = me.complete_attach(answer(&first)).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    let before = roles.snapshot().await;
    // Another device attaching with this device's PCID is refused (a device attaches with the
    // PCID its certificate names), and changes nothing.
    let again = other.attach(attach()).await.unwrap_err();
    assert_eq!(again.code(), Code::PermissionDenied, "{again:?}");
    assert_eq!(
        roles.snapshot().await,
        before,
        "a refused attach changed state"
    );
    let denied = other.complete_attach(answer(&attempt)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    // An unknown attempt is refused by role before it is looked up: no existence oracle.
    let denied = VnoServiceClient::new(roles.channel(Role::Sho, Role::Vno).await)
        .complete_attach(vno::CompleteAttachRequest {
            attach_id: "no-such-attempt".into(),
            answer: None,
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert_eq!(
        roles.snapshot().await,
        before,
        "a refused answer changed state"
    );

    let grant = match me
        .complete_attach(answer(&attempt))
        .await
        .unwrap()
        .into_inner()
        .result
    {
        Some(vno::complete_attach_response::Result::Grant(g)) => g,
        other => panic!("no grant: {other:?}"),
    };
    assert!(!grant.operational);
    let before = roles.snapshot().await;
    let denied = other
        .detach(vno::DetachRequest {
            grant_id: grant.grant_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert_eq!(
        roles.snapshot().await,
        before,
        "a refused detach changed state"
    );
    // Attached: still nobody else's.
    let again = other
        .attach(vno::AttachRequest {
            identity: ME.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::PermissionDenied, "{again:?}");
    me.detach(vno::DetachRequest {
        grant_id: grant.grant_id.clone(),
    })
    .await
    .unwrap();
    assert_ne!(
        roles.snapshot().await,
        before,
        "the device's own detach ends the grant"
    );
    // Detached: the PCID may attach again.
    me.attach(vno::AttachRequest {
        identity: ME.into(),
    })
    .await
    .unwrap();
}

/// Every rule whose objects have an owner (a device's attempt, grant, registration or
/// validation; an SHO's registration or subscription), called by the right role but a wrong
/// owner (another device, a second SHO certified by the same CA), over mutual TLS against the
/// real `mcim-roles all`: PERMISSION_DENIED, and the roles' database is unchanged. The test
/// fails when the table gains an owned rule that has no wrong-owner case here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_owned_object_refuses_another_owner_and_changes_nothing() {
    use mcim_proto::mcim::common::v1 as common;
    use mcim_proto::mcim::pva::v1 as pva;
    use mcim_proto::mcim::pva::v1::pva_service_client::PvaServiceClient;
    use mcim_proto::mcim::ro::v1::dpf_service_client::DpfServiceClient;
    use mcim_proto::mcim::ro::v1::drf_service_client::DrfServiceClient;
    use mcim_proto::mcim::sho::v1 as sho;
    use mcim_proto::mcim::sho::v1::sho_service_client::ShoServiceClient;

    let work = tempfile::tempdir().unwrap();
    let roles = Roles::start(work.path());
    // Device ME: certified, contracted, with initial credentials at the ICF.
    roles.contract_software_device(ME, "OWN-1").await;
    let (k, opc) = ([0x31; 16], [0x42; 16]);
    IcfServiceClient::new(roles.channel(Role::Supplier, Role::Ro).await)
        .register_initial_credentials(ro::RegisterInitialCredentialsRequest {
            pcid: ME.into(),
            k: k.to_vec(),
            opc: opc.to_vec(),
            mode: ro::CredentialMode::SupplierGenerated as i32,
            expires_at: None,
            delayed_activation: false,
            supplier_voucher: None,
        })
        .await
        .unwrap();
    // Its objects: an attach attempt, a registration at the SHO, the PVA's validation.
    let mut me_vno = VnoServiceClient::new(roles.device_channel(ME, Role::Vno).await);
    let attempt = me_vno
        .attach(vno::AttachRequest {
            identity: ME.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let me_ro = roles.device_channel(ME, Role::Ro).await;
    let reg = DrfServiceClient::new(me_ro.clone())
        .register_device(ro::RegisterDeviceRequest {
            pcid: ME.into(),
            access: common::AccessType::Non3gpp as i32,
            grant_id: String::new(),
            platform_credential: Vec::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut tasks = DpfServiceClient::new(me_ro)
        .watch_device_tasks(ro::WatchDeviceTasksRequest { ack_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let Some(ro::watch_device_tasks_response::Task::Attest(validation)) =
        tasks.message().await.unwrap().unwrap().task
    else {
        panic!("the first task is the attestation");
    };
    drop(tasks);

    // The wrong owners: another device, a second SHO.
    let other_vno = VnoServiceClient::new(roles.device_channel(OTHER, Role::Vno).await);
    let other_ro = roles.device_channel(OTHER, Role::Ro).await;
    let other_pva = PvaServiceClient::new(roles.device_channel(OTHER, Role::Pva).await);
    let sho2 = roles
        .party_channel(Role::Sho, "sho2.mcim.local", Role::Ro)
        .await;
    let sho_id =
        mcim_pki::party::caller_from_cert(&mcim_pki::dev::ca_der(&roles.pki, "sho").unwrap())
            .unwrap()
            .name;

    // An instruction the SHO ME registered at queued for ME (5.1.1.3): its report and its
    // reading are ME's and that SHO's.
    let instruction = mcim_core::signed::sign(
        &mcim_pki::dev::signing_key(&roles.pki, "sho").unwrap(),
        &mcim_pki::instruction::Instruction {
            kind: mcim_pki::instruction::KIND.into(),
            pcid: ME.into(),
            imsi: "001020000000001".into(),
            sho: sho_id.clone(),
            seq: 1,
            action: mcim_pki::instruction::Action::Discover,
            issued_at: 1,
        },
        Some(&mcim_pki::dev::ca_der(&roles.pki, "sho").unwrap()),
    )
    .unwrap();
    let instruction_id = DpfServiceClient::new(roles.channel(Role::Sho, Role::Ro).await)
        .queue_instruction(ro::QueueInstructionRequest {
            pcid: ME.into(),
            instruction: instruction.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .instruction_id;

    let before = roles.snapshot().await;
    let mut tried: Vec<(&str, Result<(), Status>)> = Vec::new();
    // Remote instructions: a second SHO can neither queue for a device it never registered,
    // nor read another SHO's report, nor instruct or read through another SHO; another
    // device cannot report on ME's instruction.
    let mut sho2_dpf = DpfServiceClient::new(sho2.clone());
    tried.push((
        "/mcim.ro.v1.DpfService/QueueInstruction",
        unit(
            sho2_dpf
                .queue_instruction(ro::QueueInstructionRequest {
                    pcid: ME.into(),
                    instruction: instruction.clone(),
                })
                .await,
        ),
    ));
    tried.push((
        "/mcim.ro.v1.DpfService/GetInstructionReport",
        unit(
            sho2_dpf
                .get_instruction_report(ro::GetInstructionReportRequest {
                    instruction_id: instruction_id.clone(),
                })
                .await,
        ),
    ));
    tried.push((
        "/mcim.ro.v1.DpfService/ReportInstruction",
        unit(
            DpfServiceClient::new(other_ro.clone())
                .report_instruction(ro::ReportInstructionRequest {
                    instruction_id: instruction_id.clone(),
                    report: b"mcim-instruction-report-v1".to_vec(),
                    signature: Vec::new(),
                    device_certificate: Vec::new(),
                })
                .await,
        ),
    ));
    let mut sho2_at_sho = ShoServiceClient::new(
        roles
            .party_channel(Role::Sho, "sho2.mcim.local", Role::Sho)
            .await,
    );
    tried.push((
        "/mcim.sho.v1.ShoService/InstructDevice",
        unit(
            sho2_at_sho
                .instruct_device(sho::InstructDeviceRequest {
                    pcid: ME.into(),
                    action: sho::InstructionAction::Delete as i32,
                })
                .await,
        ),
    ));
    tried.push((
        "/mcim.sho.v1.ShoService/GetInstruction",
        unit(
            sho2_at_sho
                .get_instruction(sho::GetInstructionRequest {
                    instruction_id: instruction_id.clone(),
                })
                .await,
        ),
    ));
    tried.push((
        "/mcim.vno.v1.VnoService/CompleteAttach",
        other_vno
            .clone()
            .complete_attach(vno::CompleteAttachRequest {
                attach_id: attempt.attach_id.clone(),
                answer: Some(vno::complete_attach_request::Answer::Res(res(
                    k,
                    opc,
                    &attempt.challenge.as_ref().unwrap().rand,
                ))),
            })
            .await
            .map(|_| ()),
    ));
    tried.push((
        "/mcim.vno.v1.VnoService/Attach",
        unit(
            other_vno
                .clone()
                .attach(vno::AttachRequest {
                    identity: ME.into(),
                })
                .await,
        ),
    ));
    tried.push((
        "/mcim.ro.v1.DrfService/GetBootstrap",
        DrfServiceClient::new(other_ro.clone())
            .get_bootstrap(ro::GetBootstrapRequest {
                device_id: ME.into(),
            })
            .await
            .map(|_| ()),
    ));
    tried.push((
        "/mcim.ro.v1.DrfService/RegisterDevice",
        DrfServiceClient::new(other_ro.clone())
            .register_device(ro::RegisterDeviceRequest {
                pcid: ME.into(),
                access: common::AccessType::Non3gpp as i32,
                grant_id: String::new(),
                platform_credential: Vec::new(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
    ));
    // Another device cannot renew ME's initial credential, nor confirm a renewal of it.
    let mut other_icf = IcfServiceClient::new(other_ro.clone());
    tried.push((
        "/mcim.ro.v1.IcfService/RenewInitialCredentials",
        unit(
            other_icf
                .renew_initial_credentials(ro::RenewInitialCredentialsRequest {
                    pcid: ME.into(),
                    tre_kind: common::TreKind::Pkcs11 as i32,
                    nonce: vec![7; 16],
                    ..Default::default()
                })
                .await,
        ),
    ));
    tried.push((
        "/mcim.ro.v1.IcfService/ConfirmInitialCredentials",
        unit(
            other_icf
                .confirm_initial_credentials(ro::ConfirmInitialCredentialsRequest {
                    pcid: ME.into(),
                    nonce: vec![7; 16],
                })
                .await,
        ),
    ));
    let mut other_dpf = DpfServiceClient::new(other_ro.clone());
    tried.push((
        "/mcim.ro.v1.DpfService/DownloadPackage",
        unit(
            other_dpf
                .download_package(ro::DownloadPackageRequest {
                    registration_id: reg.registration_id.clone(),
                })
                .await,
        ),
    ));
    tried.push((
        "/mcim.ro.v1.DpfService/ReportProvisioningStatus",
        unit(
            other_dpf
                .report_provisioning_status(ro::ReportProvisioningStatusRequest {
                    registration_id: reg.registration_id.clone(),
                    status: common::ProvisioningStatus::Failed as i32,
                    detail: "not mine".into(),
                    mcim_id: String::new(),
                })
                .await,
        ),
    ));
    // Another device cannot tell the SHO that ME discarded ME's MCIM (the SHO's first IMSI),
    // nor learn that the IMSI is given: it is answered exactly as an IMSI nobody holds.
    let me_imsi = "001020000000001";
    assert!(
        before["sho_subscription"].contains(me_imsi),
        "ME's subscription holds {me_imsi}"
    );
    let other_sho = ShoServiceClient::new(roles.device_channel(OTHER, Role::Sho).await);
    let discard = |imsi: &str| {
        let mut c = other_sho.clone();
        let req = sho::NotifyDiscardRequest {
            imsi: imsi.into(),
            discard_statement: b"mcim-discard-v1".to_vec(),
            ..Default::default()
        };
        async move { c.notify_discard(req).await }
    };
    let mine = unit(discard(me_imsi).await);
    let nobodys = unit(discard("001029999999999").await);
    let (mine, nobodys) = (mine.unwrap_err(), nobodys.unwrap_err());
    assert_eq!(mine.code(), Code::NotFound, "{mine:?}");
    assert_eq!(
        (mine.code(), mine.message()),
        (nobodys.code(), nobodys.message()),
        "an IMSI oracle"
    );
    let mut answered_as_unknown = vec!["/mcim.sho.v1.ShoService/NotifyDiscard"];
    tried.push((
        "/mcim.ro.v1.DpfService/RelayDiscardAck",
        unit(
            other_dpf
                .relay_discard_ack(ro::RelayDiscardAckRequest {
                    registration_id: reg.registration_id.clone(),
                    discard_ack: b"ack".to_vec(),
                })
                .await,
        ),
    ));
    tried.push((
        "/mcim.pva.v1.PvaService/SubmitEvidence",
        unit(
            other_pva
                .clone()
                .submit_evidence(pva::SubmitEvidenceRequest {
                    validation_id: validation.validation_id.clone(),
                    evidence: None,
                    clock: 0,
                    reset_count: 0,
                    restart_count: 0,
                })
                .await,
        ),
    ));
    let mut sho2_dpf = DpfServiceClient::new(sho2.clone());
    tried.push((
        "/mcim.ro.v1.DpfService/AuthorizeProvisioning",
        unit(
            sho2_dpf
                .authorize_provisioning(ro::AuthorizeProvisioningRequest {
                    registration_id: reg.registration_id.clone(),
                    package: Some(common::McimPackage {
                        cose_sign1: b"package".to_vec(),
                    }),
                    validation: None,
                })
                .await,
        ),
    ));
    tried.push((
        "/mcim.ro.v1.DpfService/RefuseProvisioning",
        unit(
            sho2_dpf
                .refuse_provisioning(ro::RefuseProvisioningRequest {
                    registration_id: reg.registration_id.clone(),
                    reason: "not mine".into(),
                })
                .await,
        ),
    ));
    tried.push((
        "/mcim.ro.v1.DrfService/SetSubscription",
        unit(
            DrfServiceClient::new(sho2.clone())
                .set_subscription(ro::SetSubscriptionRequest {
                    pcid: ME.into(),
                    sho_id: sho_id.clone(),
                    sho_url: "https://127.0.0.1:1".into(),
                    change_of_sho: false,
                })
                .await,
        ),
    ));
    // A second SHO cannot take over a PCID the first serves, even in its own name.
    let taken_over = unit(
        DrfServiceClient::new(sho2.clone())
            .set_subscription(ro::SetSubscriptionRequest {
                pcid: ME.into(),
                sho_id: "sho2.mcim.local".into(),
                sho_url: "https://127.0.0.1:1".into(),
                change_of_sho: false,
            })
            .await,
    );
    assert_eq!(
        taken_over.err().map(|s| s.code()),
        Some(Code::PermissionDenied),
        "a second SHO took over the PCID"
    );
    // Another RO (its own certificate under the same RO CA) can neither report on the
    // registration the lab's RO made at the SHO, nor relay a discard acknowledgment to it,
    // nor learn it by registering under its id.
    let mut ro2_at_sho = ShoServiceClient::new(
        roles
            .party_channel(Role::Ro, "ro2.mcim.local", Role::Sho)
            .await,
    );
    tried.push((
        "/mcim.sho.v1.ShoService/ReportProvisioningStatus",
        unit(
            ro2_at_sho
                .report_provisioning_status(sho::ReportProvisioningStatusRequest {
                    registration_id: reg.registration_id.clone(),
                    status: common::ProvisioningStatus::Failed as i32,
                    detail: "not mine".into(),
                })
                .await,
        ),
    ));
    tried.push((
        "/mcim.sho.v1.ShoService/ReceiveDiscardAck",
        unit(
            ro2_at_sho
                .receive_discard_ack(sho::ReceiveDiscardAckRequest {
                    registration_id: reg.registration_id.clone(),
                    filtered_ack: format!(
                        r#"{{"registration_id":"{}","discarded_at":1,"acknowledged_at":2}}"#,
                        reg.registration_id
                    )
                    .into_bytes(),
                })
                .await,
        ),
    ));
    let taken = ro2_at_sho
        .register_device(sho::RegisterDeviceRequest {
            registration_id: reg.registration_id.clone(),
            pcid: ME.into(),
            registration_nonce: vec![9; 16],
            dpf_url: "https://127.0.0.1:1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");
    // The device's attempt becomes a grant; another device cannot end it.
    let after_attempts = roles.snapshot().await;
    assert_eq!(after_attempts, before, "a wrong owner changed state");
    // A second subscriber (its own certificate under the same CA) and a PCID the lab's
    // subscriber registered for delayed activation (CCIF mode 3).
    let voucher = |pcid: &str, k: &[u8], opc: &[u8]| ro::SupplierVoucher {
        signature: mcim_pki::voucher::sign(
            &mcim_pki::dev::signing_key(&roles.pki, "supplier").unwrap(),
            pcid,
            k,
            opc,
        ),
        supplier_certificate: vec![mcim_pki::dev::ca_der(&roles.pki, "supplier").unwrap()],
    };
    let register = |pcid: &str, k: [u8; 16], v: Option<ro::SupplierVoucher>| {
        ro::RegisterInitialCredentialsRequest {
            pcid: pcid.into(),
            k: k.to_vec(),
            opc: vec![0x66; 16],
            mode: ro::CredentialMode::ViaSubscriber as i32,
            expires_at: None,
            delayed_activation: true,
            supplier_voucher: v,
        }
    };
    // A subscriber registers a PCID's credentials only with the supplier's voucher for them:
    // without one, or with one for other credentials, PERMISSION_DENIED and nothing changed.
    let mut icf = IcfServiceClient::new(roles.channel(Role::Subscriber, Role::Ro).await);
    let unvouched = roles.snapshot().await;
    for (what, req) in [
        ("no voucher", register("001010000000005", [0x55; 16], None)),
        (
            "a voucher for another K",
            register(
                "001010000000005",
                [0x54; 16],
                Some(voucher("001010000000005", &[0x55; 16], &[0x66; 16])),
            ),
        ),
        (
            "a voucher for another PCID",
            register(
                "001010000000005",
                [0x55; 16],
                Some(voucher("001010000000006", &[0x55; 16], &[0x66; 16])),
            ),
        ),
    ] {
        let got = icf.register_initial_credentials(req).await.unwrap_err();
        assert_eq!(got.code(), Code::PermissionDenied, "{what}: {got:?}");
        assert_eq!(roles.snapshot().await, unvouched, "{what} changed state");
    }
    icf.register_initial_credentials(register(
        "001010000000005",
        [0x55; 16],
        Some(voucher("001010000000005", &[0x55; 16], &[0x66; 16])),
    ))
    .await
    .unwrap();
    let before = roles.snapshot().await;
    tried.push((
        "/mcim.ro.v1.IcfService/ActivatePcid",
        unit(
            IcfServiceClient::new(
                roles
                    .party_channel(Role::Subscriber, "mallory", Role::Ro)
                    .await,
            )
            .activate_pcid(ro::ActivatePcidRequest {
                pcid: "001010000000005".into(),
            })
            .await,
        ),
    ));
    let mallory_sho = roles
        .party_channel(Role::Subscriber, "mallory", Role::Sho)
        .await;
    tried.push((
        "/mcim.sho.v1.ShoService/GetRegistration",
        unit(
            ShoServiceClient::new(mallory_sho.clone())
                .get_registration(sho::GetRegistrationRequest {
                    registration_id: reg.registration_id.clone(),
                    ..Default::default()
                })
                .await,
        ),
    ));
    // Neither id, or both: refused as malformed, whoever asks.
    for request in [
        sho::GetRegistrationRequest::default(),
        sho::GetRegistrationRequest {
            registration_id: reg.registration_id.clone(),
            subscription_id: ME.into(),
        },
    ] {
        let got = ShoServiceClient::new(mallory_sho.clone())
            .get_registration(request)
            .await;
        assert_eq!(got.map(|_| ()).unwrap_err().code(), Code::InvalidArgument);
    }
    // The same registration by its subscription (the PCID, guessable) is no more another's
    // to read, and another's is answered as one nobody holds: no PCID enumeration.
    for pcid in [ME, "001019999999999"] {
        let got = ShoServiceClient::new(mallory_sho.clone())
            .get_registration(sho::GetRegistrationRequest {
                subscription_id: pcid.into(),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(got.code(), Code::NotFound, "{pcid}: {got:?}");
        assert_eq!(got.message(), "no such subscription of yours", "{pcid}");
    }
    tried.push((
        "/mcim.sho.v1.ShoService/CreateSubscription",
        unit(
            ShoServiceClient::new(mallory_sho)
                .create_subscription(sho::CreateSubscriptionRequest {
                    subscriber: "subscriber.mcim.local".into(),
                    ..Default::default()
                })
                .await,
        ),
    ));
    tried.push((
        "/mcim.pva.v1.PvaService/GetValidationResult",
        unit(
            PvaServiceClient::new(
                roles
                    .party_channel(Role::Sho, "sho2.mcim.local", Role::Pva)
                    .await,
            )
            .get_validation_result(pva::GetValidationResultRequest {
                validation_id: validation.validation_id.clone(),
                wait_ms: 0,
            })
            .await,
        ),
    ));
    assert_eq!(
        roles.snapshot().await,
        before,
        "a wrong owner changed state"
    );
    let grant = match me_vno
        .complete_attach(vno::CompleteAttachRequest {
            attach_id: attempt.attach_id.clone(),
            answer: Some(vno::complete_attach_request::Answer::Res(res(
                k,
                opc,
                &attempt.challenge.as_ref().unwrap().rand,
            ))),
        })
        .await
        .unwrap()
        .into_inner()
        .result
    {
        Some(vno::complete_attach_response::Result::Grant(g)) => g,
        other => panic!("no grant: {other:?}"),
    };
    let granted = roles.snapshot().await;
    tried.push((
        "/mcim.vno.v1.VnoService/Detach",
        unit(
            other_vno
                .clone()
                .detach(vno::DetachRequest {
                    grant_id: grant.grant_id.clone(),
                })
                .await,
        ),
    ));
    assert_eq!(
        roles.snapshot().await,
        granted,
        "a wrong owner changed state"
    );

    for (method, got) in &tried {
        assert_eq!(
            got.as_ref().err().map(|s| s.code()),
            Some(Code::PermissionDenied),
            "a wrong owner on {method}: {got:?}"
        );
    }
    // Every owned rule has its wrong-owner case.
    let owned: Vec<&str> = RULES
        .iter()
        .filter(|r| r.owner.role().is_some())
        .map(|r| r.method)
        .collect();
    let mut covered: Vec<&str> = tried.iter().map(|(m, _)| *m).collect();
    covered.append(&mut answered_as_unknown);
    covered.sort_unstable();
    let mut want = owned.clone();
    want.sort_unstable();
    assert_eq!(covered, want, "owned rules without a wrong-owner case");
}

/// A call's outcome without its answer.
fn unit<T>(r: Result<tonic::Response<T>, Status>) -> Result<(), Status> {
    r.map(|_| ())
}

/// A message field 1 as a number, where the real request has a string: not decodable.
#[derive(Clone, PartialEq, prost::Message)]
struct WrongWireType {
    #[prost(uint64, tag = "1")]
    field: u64,
}

/// Clean edges (issue 12 item 7): a request that cannot be decoded is INVALID_ARGUMENT (not
/// INTERNAL), changes nothing and the server goes on; reflection, v1 and v1alpha, lists on each
/// port only that port's services (and health).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_requests_are_invalid_and_reflection_lists_only_the_ports_services() {
    let work = tempfile::tempdir().unwrap();
    let roles = Roles::start(work.path());
    let before = roles.snapshot().await;
    let ch = roles.channel(Role::Vno, Role::Ro).await;
    let got = call(
        ch.clone(),
        "/mcim.ro.v1.IcfService/GetAuthVectors",
        false,
        WrongWireType { field: 7 },
    )
    .await
    .unwrap_err();
    assert_eq!(got.code(), Code::InvalidArgument, "{got:?}");
    assert!(!got.message().contains("GetAuthVectorsRequest"), "{got:?}");
    assert_eq!(roles.snapshot().await, before);
    // The server goes on: a decodable request reaches the handler.
    let unknown = IcfServiceClient::new(ch)
        .get_auth_vectors(ro::GetAuthVectorsRequest {
            pcid: ME.into(),
            count: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    let want = |role: Role| -> Vec<String> {
        let mut v: Vec<String> = match role {
            Role::Supplier => vec!["mcim.supplier.v1.SupplierService"],
            Role::Ro => vec![
                "mcim.ro.v1.IcfService",
                "mcim.ro.v1.DrfService",
                "mcim.ro.v1.DpfService",
            ],
            Role::Vno => vec!["mcim.vno.v1.VnoService"],
            Role::Sho => vec!["mcim.sho.v1.ShoService"],
            Role::Pva => vec!["mcim.pva.v1.PvaService"],
            _ => unreachable!(),
        }
        .into_iter()
        .map(String::from)
        .collect();
        v.push("grpc.health.v1.Health".into());
        v.sort();
        v
    };
    for role in [Role::Supplier, Role::Ro, Role::Vno, Role::Sho, Role::Pva] {
        let ch = roles.channel(Role::Subscriber, role).await;
        use tonic_reflection::pb::{v1, v1alpha};
        let mut s = v1::server_reflection_client::ServerReflectionClient::new(ch.clone())
            .server_reflection_info(tokio_stream::iter(vec![v1::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                    String::new(),
                )),
            }]))
            .await
            .unwrap()
            .into_inner();
        let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(l)) =
            s.message().await.unwrap().unwrap().message_response
        else {
            panic!("no v1 service list from the {role}");
        };
        let mut got: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
        got.sort();
        assert_eq!(got, want(role), "v1 reflection of the {role}");
        let mut s = v1alpha::server_reflection_client::ServerReflectionClient::new(ch)
            .server_reflection_info(tokio_stream::iter(vec![v1alpha::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(
                    v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
                ),
            }]))
            .await
            .unwrap()
            .into_inner();
        let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l)) =
            s.message().await.unwrap().unwrap().message_response
        else {
            panic!("no v1alpha service list from the {role}");
        };
        let mut got: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
        got.sort();
        assert_eq!(got, want(role), "v1alpha reflection of the {role}");
    }
}

/// Each root vouches only for the roles it may issue (issue 12 item 1): for every RPC and every
/// role the table lets call it, a certificate claiming that role from a root that may not
/// issue it (the supplier root claiming an operator, another operator's CA, an operator's CA
/// claiming a device) is UNAUTHENTICATED before any table lookup, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_the_wrong_root_is_refused_for_every_rpc_and_role() {
    let work = tempfile::tempdir().unwrap();
    let roles = Roles::start(work.path());
    let streaming = streaming();
    let before = roles.snapshot().await;
    let mut refused = 0;
    for rule in RULES {
        let peer = server_of(rule.method);
        let is_stream = streaming.iter().any(|m| m == rule.method);
        for &role in rule.callers {
            let wrong: &[&str] = match role {
                Role::Device => &["ca-vno", "ca-subscriber"],
                Role::Vno => &["supplier-root", "ca-sho"],
                _ => &["supplier-root", "ca-vno"],
            };
            let name = if role == Role::Device {
                ME
            } else {
                "forged.example"
            };
            for ca in wrong {
                let (cert, key) =
                    mcim_pki::dev::issue_party_under(&roles.pki, ca, role, name).unwrap();
                let ch = roles.channel_as(cert, key, peer).await;
                let got = probe(ch, rule.method, is_stream, ME).await;
                assert_eq!(
                    got.err().map(|s| s.code()),
                    Some(Code::Unauthenticated),
                    "{role} certified by {ca} calling {}",
                    rule.method
                );
                refused += 1;
            }
        }
    }
    assert!(refused >= 70, "{refused} refusals");
    assert_eq!(
        roles.snapshot().await,
        before,
        "a refused call changed state"
    );
}

/// Proof of ownership before a contract (issue 12 item 3; annex x.2.3): the SHO contracts a
/// device only with a statement the device signed (in its TRE, on its owner's request) for
/// this subscriber at this SHO. Without one, with another device's, one for another SHO or
/// another subscriber, one forged with a key the supplier did not certify, or a stale one:
/// PERMISSION_DENIED, nothing changed. With the right one: contracted; the same proof again is
/// refused (used once); a new one answers the same contract.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_needs_the_owners_proof_for_this_device_subscriber_and_sho() {
    use mcim_proto::mcim::sho::v1::sho_service_client::ShoServiceClient;
    let work = tempfile::tempdir().unwrap();
    let roles = Roles::start(work.path());
    let dev = roles.software_device(ME, "OWN-A").await;
    let other = roles.software_device(OTHER, "OWN-B").await;
    let mut sho = ShoServiceClient::new(roles.channel(Role::Subscriber, Role::Sho).await);
    let (me, sho_id) = ("subscriber.mcim.local", "sho.mcim.local");
    let before = roles.snapshot().await;
    let forged = {
        let mut p = dev.proof(me, sho_id);
        let stranger = SoftwareKey::new();
        p.signature = stranger.sign(&p.payload);
        p
    };
    let stale = {
        let mut p = dev.proof(me, sho_id);
        let text = String::from_utf8(p.payload.clone()).unwrap();
        let (head, _) = text.rsplit_once('\n').unwrap();
        p.payload = format!("{head}\n1000").into_bytes();
        p.signature = dev_sign(&dev, &p.payload);
        p
    };
    let other_device = {
        // The other device's genuine proof, for this subscriber and SHO.
        other.proof(me, sho_id)
    };
    for (what, proof) in [
        ("no proof", None),
        ("another device's proof", Some(other_device)),
        (
            "a proof for another SHO",
            Some(dev.proof(me, "sho2.mcim.local")),
        ),
        (
            "a proof for another subscriber",
            Some(dev.proof("mallory", sho_id)),
        ),
        (
            "a proof signed by a key the supplier did not certify",
            Some(forged),
        ),
        ("a stale proof", Some(stale)),
    ] {
        let got = sho
            .create_subscription(dev.subscription(proof))
            .await
            .unwrap_err();
        assert_eq!(got.code(), Code::PermissionDenied, "{what}: {got:?}");
        assert_eq!(roles.snapshot().await, before, "{what} changed state");
    }
    let proof = dev.proof(me, sho_id);
    let first = sho
        .create_subscription(dev.subscription(Some(proof.clone())))
        .await
        .unwrap()
        .into_inner();
    // The same proof again: used before, refused, nothing changed.
    let contracted = roles.snapshot().await;
    let reused = sho
        .create_subscription(dev.subscription(Some(proof)))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::PermissionDenied, "{reused:?}");
    assert_eq!(
        roles.snapshot().await,
        contracted,
        "a reused proof changed state"
    );
    // A new proof: the same contract, answered as before.
    let again = sho
        .create_subscription(dev.subscription(Some(dev.proof(me, sho_id))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.imsi, again.imsi);
}

/// A P-256 key the supplier never certified.
struct SoftwareKey(p256::ecdsa::SigningKey);

impl SoftwareKey {
    fn new() -> Self {
        use p256::elliptic_curve::Generate;
        Self(p256::ecdsa::SigningKey::generate_from_rng(&mut rand::rng()))
    }

    fn sign(&self, m: &[u8]) -> Vec<u8> {
        use p256::ecdsa::signature::Signer;
        let s: p256::ecdsa::Signature = self.0.sign(m);
        s.to_der().as_bytes().to_vec()
    }
}

/// `m` signed by the software device's TLS key.
fn dev_sign(dev: &mcim_e2e::SoftwareDevice, m: &[u8]) -> Vec<u8> {
    use p256::ecdsa::signature::Signer;
    let s: p256::ecdsa::Signature = dev.tls_key.sign(m);
    s.to_der().as_bytes().to_vec()
}

/// An operational IMSI answers only on the device its MCIM was provisioned to (TR 33.812
/// 5.1.3.3.2.2; the VNO hands the caller's PCID to the SHO): another certified device
/// attaching with it is answered exactly as for an IMSI nobody holds (NOT_FOUND, the same
/// message: no liveness oracle), gets no challenge, and changes nothing (no SQN handed out,
/// the owner's grant kept). The SHO asked directly as the VNO answers for the owner's PCID
/// only; the owner still attaches. The device is a real one (swtpm, `tred`).
#[test]
fn an_imsi_attaches_only_on_the_device_it_was_provisioned_to() {
    use mcim_proto::mcim::sho::v1 as sho;
    use mcim_proto::mcim::sho::v1::sho_service_client::ShoServiceClient;

    let d = mcim_e2e::CliDevice::provisioned(false, "001010000000071", &[], "3gpp");
    let attach_as_owner = || {
        let out = mcim_e2e::mcimctl(&["device", "--socket", &d.socket(), "attach"]);
        assert!(
            out.status.success(),
            "the owner's attach: {}",
            mcim_e2e::output_text(&out)
        );
    };
    attach_as_owner();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let before = d.roles.snapshot().await;
        assert!(
            before["vno_attach"].contains(&d.imsi),
            "the owner's operational grant is there: {}",
            before["vno_attach"]
        );
        let mut other = VnoServiceClient::new(d.roles.device_channel(OTHER, Role::Vno).await);
        let attach = |identity: String| vno::AttachRequest { identity };
        let stolen = other.attach(attach(d.imsi.clone())).await.unwrap_err();
        // An IMSI of the same SHO's range that nobody holds.
        let nobody = format!("{}99999", &d.imsi[..d.imsi.len() - 5]);
        assert_ne!(nobody, d.imsi);
        let unknown = other.attach(attach(nobody)).await.unwrap_err();
        assert_eq!(stolen.code(), Code::NotFound, "{stolen:?}");
        assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
        assert_eq!(stolen.message(), unknown.message(), "a liveness oracle");
        assert_eq!(
            d.roles.snapshot().await,
            before,
            "another device changed state"
        );

        // The SHO, asked as the VNO: for another PCID, or none, as for an unknown IMSI.
        let mut sho = ShoServiceClient::new(d.roles.channel(Role::Vno, Role::Sho).await);
        let ask = |pcid: &str| sho::GetAuthVectorsRequest {
            imsi: d.imsi.clone(),
            count: 1,
            pcid: pcid.into(),
            ..Default::default()
        };
        for pcid in [OTHER, ""] {
            let got = sho.get_auth_vectors(ask(pcid)).await.unwrap_err();
            assert_eq!(got.code(), Code::NotFound, "{pcid:?}: {got:?}");
            // The VNO relays the SHO's answer under the SHO's name.
            assert_eq!(
                format!("sho: {}", got.message()),
                unknown.message(),
                "{pcid:?}"
            );
        }
        assert_eq!(
            d.roles.snapshot().await,
            before,
            "a refused ask changed state"
        );
        let vectors = sho
            .get_auth_vectors(ask(&d.pcid))
            .await
            .unwrap()
            .into_inner()
            .vectors;
        assert_eq!(vectors.len(), 1, "the owner's PCID gets its vector");
    });
    // The owner attaches with it again (the SQN used above is behind it: no resync needed).
    attach_as_owner();
}

/// A client chain with more intermediates than the gate reads (`MAX_CHAIN`) is refused in
/// the TLS handshake, before webpki builds paths through them (found by an outside attack: a
/// client without any valid certificate made each handshake cost ~12 ms of CPU with junk
/// intermediates named like a trusted CA). A genuine leaf with fewer such certificates
/// behind it still connects and is answered; nothing changes either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_chain_with_too_many_intermediates_is_refused_at_the_handshake() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let work = tempfile::tempdir().unwrap();
    let roles = Roles::start(work.path());
    // Self-signed CAs named like the supplier root: junk a path builder must try.
    let junk = || {
        mcim_pki::dev::impostor_ca(&roles.pki, "supplier-root")
            .unwrap()
            .pem()
    };
    let (leaf, key) = mcim_pki::dev::issue_software_device(&roles.pki, ME).unwrap();
    let before = roles.snapshot().await;
    let health = |n: usize| {
        let chain: String = std::iter::once(leaf.clone())
            .chain((0..n).map(|_| junk()))
            .collect();
        let (roles, key) = (&roles, key.clone());
        async move {
            let ch = roles.channel_as(chain, key, Role::Ro).await;
            HealthClient::new(ch)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
        }
    };
    // Within the bound: connected, through the gate, answered.
    for n in [0, 2] {
        assert!(
            health(n).await.is_ok(),
            "{n} junk certificates behind a genuine leaf"
        );
    }
    // Beyond it: the handshake fails (a transport error, not the gate's UNAUTHENTICATED,
    // which the gate would answer such a chain if it got that far).
    let refused = health(mcim_pki::party::MAX_CHAIN).await.unwrap_err();
    assert!(
        matches!(
            refused.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ),
        "{refused:?}"
    );
    assert_eq!(roles.snapshot().await, before);
}

/// A device that reports its install again (a retry, or on purpose with other words) is
/// answered OK, and neither the DPF's nor the SHO's record of the first report changes: the
/// detail and MCIM id stay the first ones (found by an outside attack: a repeated report
/// overwrote the stored detail). The device is a real one (swtpm, `tred`).
#[test]
fn a_repeated_install_report_keeps_the_first_record() {
    use mcim_proto::mcim::common::v1 as common;
    use mcim_proto::mcim::ro::v1::dpf_service_client::DpfServiceClient;

    let d = mcim_e2e::CliDevice::provisioned(false, "001010000000072", &[], "3gpp");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let before = d.roles.snapshot().await;
        // The registration's id: the one 32-hex-digit word of the DPF's only registration.
        let rows = &before["ro_registration"];
        let id = rows
            .split(|c: char| !c.is_ascii_hexdigit())
            .find(|w| w.len() == 32)
            .unwrap_or_else(|| panic!("no registration id in {rows}"))
            .to_string();
        assert!(rows.contains("installed"), "installed first: {rows}");
        let mut dpf = DpfServiceClient::new(d.roles.device_channel(&d.pcid, Role::Ro).await);
        dpf.report_provisioning_status(ro::ReportProvisioningStatusRequest {
            registration_id: id.clone(),
            status: common::ProvisioningStatus::Installed as i32,
            detail: "rewritten by the device".into(),
            mcim_id: "another-mcim".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("the same outcome again is accepted: {e:?}"));
        let after = d.roles.snapshot().await;
        for table in ["ro_registration", "sho_registration"] {
            assert_eq!(after[table], before[table], "{table} changed");
        }
        assert!(!after["ro_registration"].contains("rewritten"));
    });
}

/// Two ROs registering the same new registration id at the SHO at the same moment (step 7):
/// one registration, the first RO's; the other RO is told ALREADY_EXISTS, as it is when it
/// comes second (found by an outside attack: the loser got UNAVAILABLE "database error").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ros_registering_one_new_id_at_once_make_one_registration() {
    use mcim_proto::mcim::sho::v1 as sho;
    use mcim_proto::mcim::sho::v1::sho_service_client::ShoServiceClient;

    let work = tempfile::tempdir().unwrap();
    let roles = Roles::start(work.path());
    roles.contract_software_device(ME, "OWN-1").await;
    let ro1 = ShoServiceClient::new(roles.channel(Role::Ro, Role::Sho).await);
    let ro2 = ShoServiceClient::new(
        roles
            .party_channel(Role::Ro, "ro2.mcim.local", Role::Sho)
            .await,
    );
    let register = |mut c: ShoServiceClient<Channel>, id: String| async move {
        c.register_device(sho::RegisterDeviceRequest {
            registration_id: id,
            pcid: ME.into(),
            registration_nonce: vec![7; 16],
            dpf_url: "https://127.0.0.1:1".into(),
        })
        .await
    };
    for round in 0..6 {
        let id = format!("race-{round}");
        let (a, b) = tokio::join!(
            register(ro1.clone(), id.clone()),
            register(ro2.clone(), id.clone())
        );
        let codes = [&a, &b].map(|r| r.as_ref().err().map(Status::code));
        assert!(
            codes == [None, Some(Code::AlreadyExists)]
                || codes == [Some(Code::AlreadyExists), None],
            "round {round}: {a:?} / {b:?}"
        );
        let rows = roles.snapshot().await["sho_registration"]
            .matches(id.as_str())
            .count();
        assert_eq!(rows, 1, "round {round}: registrations with the id");
    }
    // The winner asking again is a retry only with the same request: the same id with another
    // nonce is ALREADY_EXISTS (it was answered OK, the new nonce dropped), and changes nothing.
    let mut ro1 = ro1;
    let again = |nonce: u8| sho::RegisterDeviceRequest {
        registration_id: "again".into(),
        pcid: ME.into(),
        registration_nonce: vec![nonce; 16],
        dpf_url: "https://127.0.0.1:1".into(),
    };
    let first = ro1.register_device(again(7)).await.unwrap().into_inner();
    let before = roles.snapshot().await;
    let retry = ro1.register_device(again(7)).await.unwrap().into_inner();
    assert_eq!(
        retry.validation_id, first.validation_id,
        "a retry, the same answer"
    );
    let other = ro1.register_device(again(8)).await.unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists, "{other:?}");
    assert_eq!(
        roles.snapshot().await["sho_registration"],
        before["sho_registration"]
    );
}
