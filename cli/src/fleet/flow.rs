//! What one simulated device does on the wire, and the supplier's and subscriber's part before
//! it: supply time (5.1.3.3.4, CCIF mode 2 of 5.1.3.4.1), the contract (5.1.3.5.2), then
//! initial provisioning (5.1.3.6.2 steps 1-14) and an operational attach with the new MCIM
//! (5.1.3.3.2.2). Every call that a busy or unreachable role answers with "not now" is tried
//! again under the devices' own rule ([`mcim_telemetry::retry`]) for up to two minutes; any
//! other refusal fails the device, with the step and the status code as its reason.

use std::time::{Duration, Instant};

use mcim_pki::Role;
use mcim_pki::party::server_name;
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::pva::v1 as pva;
use mcim_proto::mcim::pva::v1::pva_service_client::PvaServiceClient;
use mcim_proto::mcim::ro::v1 as ro;
use mcim_proto::mcim::ro::v1::dpf_service_client::DpfServiceClient;
use mcim_proto::mcim::ro::v1::drf_service_client::DrfServiceClient;
use mcim_proto::mcim::sho::v1 as sho;
use mcim_proto::mcim::sho::v1::sho_service_client::ShoServiceClient;
use mcim_proto::mcim::supplier::v1 as sup;
use mcim_proto::mcim::supplier::v1::supplier_service_client::SupplierServiceClient;
use mcim_proto::mcim::vno::v1 as vno;
use mcim_proto::mcim::vno::v1::vno_service_client::VnoServiceClient;
use mcim_telemetry::Channel;
use rand::Rng;
use tonic::{Code, Status};

use super::device::{Answer, Credential, SimulatedDevice};

/// How long a step is retried while a role is unreachable or busy (as `tred`).
const RETRY_FOR: Duration = Duration::from_secs(120);

/// Why a device did not end provisioned: the step and what stopped it.
#[derive(Debug)]
pub struct Failure {
    /// Counted in the report: the step and the status code (or "device" for the device's own
    /// refusal), without ids, so that equal causes count together.
    pub reason: String,
    /// The whole message of the first one.
    pub detail: String,
    /// The roles kept answering "not now" (or not at all) for the whole retry time: the
    /// fleet stops starting devices.
    pub gave_up: bool,
}

fn failure(step: &str, s: &Status) -> Failure {
    Failure {
        reason: format!("{step}: {:?}", s.code()),
        detail: s.message().to_string(),
        gave_up: mcim_telemetry::retry::transient(s),
    }
}

fn refused(step: &str, why: impl Into<String>) -> Failure {
    Failure {
        reason: format!("{step}: refused by the device"),
        detail: why.into(),
        gave_up: false,
    }
}

/// Retries of one device (the report sums them).
#[derive(Default)]
pub struct Tries {
    /// How many.
    pub n: u64,
    /// How many by step and status code ("step 7 (RegisterDevice): Unavailable"), as the
    /// failures are counted.
    pub why: std::collections::BTreeMap<String, u64>,
}

impl Tries {
    /// One more retry of `step` after `s`.
    fn note(&mut self, step: &str, s: &Status) {
        self.n += 1;
        *self
            .why
            .entry(format!("{step}: {:?}", s.code()))
            .or_default() += 1;
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: Tries) {
        self.n += other.n;
        for (k, v) in other.why {
            *self.why.entry(k).or_default() += v;
        }
    }
}

/// `$call` (an expression making a gRPC call, evaluated again for each try) until it answers
/// something other than "not now", or [`RETRY_FOR`] has passed; counts the retries in
/// `$tries` ([`Tries`]) and names `$step` in a failure.
macro_rules! retry {
    ($tries:expr, $step:expr, $call:expr) => {{
        let until = Instant::now() + RETRY_FOR;
        let mut n = 0u32;
        loop {
            match $call.await {
                Ok(r) => break Ok(r.into_inner()),
                Err(s) if mcim_telemetry::retry::transient(&s) && Instant::now() < until => {
                    n += 1;
                    $tries.note($step, &s);
                    let p = mcim_telemetry::retry::pushback(&s);
                    tokio::time::sleep(mcim_telemetry::retry::wait(n, p)).await;
                }
                Err(s) => break Err(failure($step, &s)),
            }
        }
    }};
}

/// Where the roles are, and the CAs that issue their certificates.
pub struct Network {
    /// The supplier (CertifyDevice, the CCIF).
    pub supplier_url: String,
    /// The RO (DRF, DPF, ICF).
    pub ro_url: String,
    /// The VNO.
    pub vno_url: String,
    /// The SHO.
    pub sho_url: String,
    /// The PVA.
    pub pva_url: String,
    /// The CA that issues each role's certificates, PEM: supplier, RO, VNO, SHO, PVA.
    pub ca: std::collections::HashMap<Role, Vec<u8>>,
    /// The subscriber's name and the SHO's (what a proof of ownership names).
    pub subscriber: String,
    /// The SHO's name.
    pub sho_id: String,
    /// The RO whose ICF authenticates the PCIDs.
    pub ro_id: String,
}

impl Network {
    fn ca(&self, role: Role) -> &[u8] {
        self.ca.get(&role).map(Vec::as_slice).unwrap_or_default()
    }
}

/// The supplier's and the subscriber's channels (one each, shared by the whole fleet).
#[derive(Clone)]
pub struct Parties {
    /// As the supplier, to itself (CertifyDevice, the CCIF).
    pub supplier: Channel,
    /// As the subscriber, to the SHO.
    pub subscriber: Channel,
    /// As the supplier, to the PVA (the model's reference values).
    pub reference: Channel,
}

/// The supplier registers `model`'s reference values at the PVA (a token's measurement; a
/// supplier's part, 5.1.3.5.8), once per fleet, before any device.
pub async fn register_model(
    parties: &Parties,
    model: &str,
    tries: &mut Tries,
) -> Result<(), Failure> {
    let mut pva = PvaServiceClient::new(parties.reference.clone());
    let req = pva::RegisterReferenceValuesRequest {
        model: model.into(),
        pcr_bank: "sha256".into(),
        allow_pkcs11: true,
        pkcs11_measurement: super::device::measurement().to_vec(),
        ..Default::default()
    };
    retry!(
        tries,
        "set-up (RegisterReferenceValues)",
        pva.register_reference_values(req.clone())
    )?;
    Ok(())
}

/// Supply time and the contract for one device (not timed as provisioning): its keys
/// certified, its PCID's credential embedded and handed to the ICF, and its subscription at
/// the SHO with the owner's proof of ownership.
pub async fn supply_and_contract(
    d: &mut SimulatedDevice,
    net: &Network,
    parties: &Parties,
    tries: &mut Tries,
) -> Result<(), Failure> {
    // 5.1.3.3.4: the supplier certifies the keys.
    let mut supplier = SupplierServiceClient::new(parties.supplier.clone());
    let req = sup::CertifyDeviceRequest {
        identity: Some(d.identity.clone()),
        tre_kind: common::TreKind::Pkcs11 as i32,
        storage_public: d.storage_public(),
        attestation_public: d.attestation_public(),
        tls_public_spki: d.tls_public(),
    };
    let cert = retry!(
        tries,
        "supply (CertifyDevice)",
        supplier.certify_device(req.clone())
    )?;
    d.platform_credential = cert.platform_credential;
    d.tls_certificate = cert.tls_certificate;
    // 5.1.3.4.1 mode 2: the supplier embeds the PCID's credential and hands it to the ICF.
    let mut k = zeroize::Zeroizing::new([0u8; 16]);
    let mut opc = zeroize::Zeroizing::new([0u8; 16]);
    rand::rng().fill_bytes(&mut k[..]);
    rand::rng().fill_bytes(&mut opc[..]);
    let req = sup::RecordConnectivityCredentialsRequest {
        device_id: d.identity.device_id.clone(),
        pcid: d.identity.pcid.clone(),
        ro_id: net.ro_id.clone(),
        k: k.to_vec(),
        opc: opc.to_vec(),
        expires_at: None,
    };
    retry!(
        tries,
        "supply (RecordConnectivityCredentials)",
        supplier.record_connectivity_credentials(req.clone())
    )?;
    d.pcid_credential = Some(Credential::new(
        &mcim_core::aka::K::new(*k),
        mcim_core::aka::Opc::new(*opc),
        mcim_core::aka::Constants::default(),
    ));
    // 5.1.3.5.2 with annex x.2.3: the owner's proof, the subscriber's contract; a proof is
    // used once, so each try carries a new one (a try the SHO recorded before a crash or a
    // lost answer is then answered as the same contract, not refused as a replay).
    let mut sho = ShoServiceClient::new(parties.subscriber.clone());
    retry!(
        tries,
        "contract (CreateSubscription)",
        sho.create_subscription(contract(d, net)?)
    )?;
    Ok(())
}

/// The subscriber's contract for `d` at the SHO, with a new proof of ownership the device
/// signed (5.1.3.5.2, annex x.2.3).
fn contract(d: &SimulatedDevice, net: &Network) -> Result<sho::CreateSubscriptionRequest, Failure> {
    let mut nonce = [0u8; 16];
    rand::rng().fill_bytes(&mut nonce);
    let payload = mcim_pki::ownership::Statement {
        pcid: d.identity.pcid.clone(),
        subscriber: net.subscriber.clone(),
        sho: net.sho_id.clone(),
        nonce: hex::encode(nonce),
        issued_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|t| t.as_secs())
            .unwrap_or(0),
    }
    .to_bytes()
    .map_err(|e| refused("contract", e.to_string()))?;
    Ok(sho::CreateSubscriptionRequest {
        subscriber: String::new(),
        device: Some(d.identity.clone()),
        tre_kind: common::TreKind::Pkcs11 as i32,
        storage_public: d.storage_public(),
        platform_credential: d.platform_credential.clone(),
        require_aka_in_tre: false,
        ownership_proof: Some(common::OwnershipProof {
            signature: d.tls_sign(&payload),
            payload,
            tls_certificate: d.tls_certificate.clone(),
        }),
    })
}

/// A device's channels to the roles it calls, over its own mutual TLS (made once, used for
/// every call of its run, as `tred` caches its channels).
struct Channels {
    vno: Channel,
    ro: Channel,
}

fn channel(d: &SimulatedDevice, net: &Network, role: Role, url: &str) -> Result<Channel, Failure> {
    let config = d.tls_config(net.ca(role)).map_err(|e| refused("TLS", e))?;
    mcim_telemetry::channel::channel(config, url, &server_name(role)).map_err(|e| refused("TLS", e))
}

/// Attach to the VNO as `identity`, answering its challenge with `credential` (and again after
/// a resynchronisation): the grant. A "not now" in the middle starts the attach again, after
/// the devices' pause.
async fn attach(
    vno: &mut VnoServiceClient<Channel>,
    identity: &str,
    credential: &mut Credential,
    step: &str,
    tries: &mut Tries,
) -> Result<vno::Grant, Failure> {
    let until = Instant::now() + RETRY_FOR;
    let mut again = 0u32;
    loop {
        match attach_once(vno, identity, credential, step, tries).await? {
            Ok(g) => return Ok(g),
            Err(s) if Instant::now() < until => {
                again += 1;
                tries.note(step, &s);
                let p = mcim_telemetry::retry::pushback(&s);
                tokio::time::sleep(mcim_telemetry::retry::wait(again, p)).await;
            }
            Err(s) => return Err(failure(step, &s)),
        }
    }
}

/// One attach: the grant, or the "not now" that interrupted it.
async fn attach_once(
    vno: &mut VnoServiceClient<Channel>,
    identity: &str,
    credential: &mut Credential,
    step: &str,
    tries: &mut Tries,
) -> Result<Result<vno::Grant, Status>, Failure> {
    let req = vno::AttachRequest {
        identity: identity.to_string(),
    };
    let a = retry!(tries, step, vno.attach(req.clone()))?;
    let mut challenge = a.challenge;
    for _ in 0..3 {
        let ch = challenge
            .take()
            .ok_or_else(|| refused(step, "no challenge"))?;
        let answer = match credential
            .authenticate(&ch.rand, &ch.autn)
            .map_err(|e| refused(step, e))?
        {
            Answer::Res(r) => vno::complete_attach_request::Answer::Res(r),
            Answer::Auts(a) => vno::complete_attach_request::Answer::Auts(a),
        };
        let req = vno::CompleteAttachRequest {
            attach_id: a.attach_id.clone(),
            answer: Some(answer),
        };
        let done = match vno.complete_attach(req).await {
            Ok(d) => d.into_inner(),
            Err(s) if mcim_telemetry::retry::transient(&s) => return Ok(Err(s)),
            Err(s) => return Err(failure(step, &s)),
        };
        match done.result {
            Some(vno::complete_attach_response::Result::Grant(g)) => return Ok(Ok(g)),
            Some(vno::complete_attach_response::Result::Challenge(c)) => challenge = Some(c),
            None => return Err(refused(step, "empty answer from the VNO")),
        }
    }
    Err(refused(step, "resynchronisation did not converge"))
}

/// Initial provisioning (5.1.3.6.2 steps 1-14) and an operational attach with the new MCIM:
/// the MCIM's IMSI.
pub async fn provision(
    d: &mut SimulatedDevice,
    net: &Network,
    tries: &mut Tries,
) -> Result<String, Failure> {
    let ch = Channels {
        vno: channel(d, net, Role::Vno, &net.vno_url)?,
        ro: channel(d, net, Role::Ro, &net.ro_url)?,
    };
    let mut pcid_credential = d
        .pcid_credential
        .take()
        .ok_or_else(|| refused("steps 1-4", "the device has no PCID credential"))?;
    // Steps 1-4: attach with the PCID; the VNO routes it to the RO's ICF.
    let mut vno = VnoServiceClient::new(ch.vno.clone());
    let grant = attach(
        &mut vno,
        &d.identity.pcid.clone(),
        &mut pcid_credential,
        "steps 1-4 (attach with the PCID)",
        tries,
    )
    .await;
    d.pcid_credential = Some(pcid_credential);
    let grant = grant?;
    // Steps 5-7: registration at the DRF, which finds the SHO.
    let mut drf = DrfServiceClient::new(ch.ro.clone());
    let req = ro::RegisterDeviceRequest {
        pcid: d.identity.pcid.clone(),
        access: common::AccessType::AccessType3gpp as i32,
        grant_id: grant.grant_id.clone(),
        platform_credential: d.platform_credential.clone(),
        ..Default::default()
    };
    let r = retry!(
        tries,
        "steps 5-7 (RegisterDevice)",
        drf.register_device(req.clone())
    )?;
    // Steps 8-13, as the RO's tasks arrive on the device's stream.
    let mut dpf = DpfServiceClient::new(ch.ro.clone());
    let mut pva: Option<PvaServiceClient<Channel>> = None;
    let mut ack_seq = 0u64;
    let until = Instant::now() + RETRY_FOR;
    let (imsi, mut credential) = 'tasks: loop {
        let req = ro::WatchDeviceTasksRequest { ack_seq };
        let mut stream = retry!(
            tries,
            "step 8 (WatchDeviceTasks)",
            dpf.watch_device_tasks(req)
        )?;
        loop {
            let task = match stream.message().await {
                Ok(Some(t)) => t,
                // The stream ended or broke: watch again from the last task handled.
                Ok(None) => break,
                Err(s) if mcim_telemetry::retry::transient(&s) && Instant::now() < until => {
                    tries.note("step 8 (task stream)", &s);
                    tokio::time::sleep(mcim_telemetry::retry::wait(1, None)).await;
                    break;
                }
                Err(s) => return Err(failure("step 8 (task stream)", &s)),
            };
            match task.task {
                Some(ro::watch_device_tasks_response::Task::Attest(a))
                    if a.registration_id.is_empty() || a.registration_id == r.registration_id =>
                {
                    // Steps 8-9: evidence for the PVA's nonce.
                    if pva.is_none() {
                        let url = if a.pva_url.is_empty() {
                            net.pva_url.clone()
                        } else {
                            a.pva_url.clone()
                        };
                        pva = Some(PvaServiceClient::new(channel(d, net, Role::Pva, &url)?));
                    }
                    let Some(client) = pva.as_mut() else {
                        return Err(refused("step 9", "no PVA"));
                    };
                    let req = pva::SubmitEvidenceRequest {
                        validation_id: a.validation_id.clone(),
                        evidence: Some(d.evidence(&a.nonce)),
                        ..Default::default()
                    };
                    match client.submit_evidence(req.clone()).await {
                        Ok(v) => {
                            let v = v.into_inner();
                            if pva::Verdict::try_from(v.verdict) != Ok(pva::Verdict::Trusted) {
                                return Err(Failure {
                                    reason: "step 9: the PVA refused the device".into(),
                                    detail: v.reason,
                                    gave_up: false,
                                });
                            }
                        }
                        // Decided already (sent before a broken stream): the SHO acts on it.
                        Err(s) if s.code() == Code::FailedPrecondition => {}
                        Err(s) if mcim_telemetry::retry::transient(&s) => {
                            retry!(
                                tries,
                                "step 9 (SubmitEvidence)",
                                client.submit_evidence(req.clone())
                            )?;
                        }
                        Err(s) => return Err(failure("step 9 (SubmitEvidence)", &s)),
                    }
                }
                Some(ro::watch_device_tasks_response::Task::Download(t))
                    if t.registration_id == r.registration_id =>
                {
                    // Steps 12-13: download, open, report.
                    let req = ro::DownloadPackageRequest {
                        registration_id: r.registration_id.clone(),
                    };
                    let package = retry!(
                        tries,
                        "step 12 (DownloadPackage)",
                        dpf.download_package(req.clone())
                    )?
                    .package
                    .map(|p| p.cose_sign1)
                    .unwrap_or_default();
                    let opened = d.open_package(
                        &package,
                        net.ca(Role::Sho),
                        &r.sho_id,
                        &r.registration_id,
                        &r.registration_nonce,
                    );
                    let (status, detail, imsi) = match &opened {
                        Ok((imsi, _)) => (
                            common::ProvisioningStatus::Installed,
                            String::new(),
                            imsi.clone(),
                        ),
                        Err(why) => (
                            common::ProvisioningStatus::Failed,
                            why.clone(),
                            String::new(),
                        ),
                    };
                    let req = ro::ReportProvisioningStatusRequest {
                        registration_id: r.registration_id.clone(),
                        status: status as i32,
                        detail,
                        mcim_id: imsi,
                    };
                    retry!(
                        tries,
                        "step 13 (ReportProvisioningStatus)",
                        dpf.report_provisioning_status(req.clone())
                    )?;
                    match opened {
                        Ok(m) => break 'tasks m,
                        Err(why) => return Err(refused("step 13", why)),
                    }
                }
                Some(ro::watch_device_tasks_response::Task::Refused(t))
                    if t.registration_id == r.registration_id =>
                {
                    return Err(Failure {
                        reason: "step 10: the SHO refused the device".into(),
                        detail: t.reason,
                        gave_up: false,
                    });
                }
                _ => {}
            }
            ack_seq = task.seq;
        }
    };
    // Step 14 done; the initial connectivity is no longer needed.
    let _ = vno
        .detach(vno::DetachRequest {
            grant_id: grant.grant_id,
        })
        .await;
    // 5.1.3.3.2.2: an operational attach with the new MCIM, AKA against the SHO's vectors.
    attach(
        &mut vno,
        &imsi,
        &mut credential,
        "operational attach",
        tries,
    )
    .await?;
    Ok(imsi)
}
