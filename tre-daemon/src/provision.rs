//! The device's side of initial provisioning (TR 33.812 5.1.3.6.2 for 3GPP access, 5.1.3.6.3
//! for non-3GPP access) as one explicit state machine whose phases are the seed's steps:
//!
//! ```text
//! Attach (1-4, 3GPP only) -> Register (5-7) -> Tasks (8-14) -> Done
//!                                   any phase -> Failed (the step and why)
//! ```
//!
//! The run is persisted in the state directory (`provisioning.json`, replaced atomically) after
//! every step, and resumes where it stopped when `tred` restarts. The device only opens
//! outbound connections: steps 8 and 12 reach it over the task stream it opened at the RO's
//! DPF, which replays what the device has not acknowledged. Every TRE operation goes through
//! the same local API handlers the owner's tools use ([`crate::service::TreApi`]), so the
//! flow obeys the registry's rules (lifecycle, lockdown) like everyone else.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::pva::v1 as pva;
use mcim_proto::mcim::pva::v1::pva_service_client::PvaServiceClient;
use mcim_proto::mcim::ro::v1 as ro;
use mcim_proto::mcim::ro::v1::dpf_service_client::DpfServiceClient;
use mcim_proto::mcim::ro::v1::drf_service_client::DrfServiceClient;
use mcim_proto::mcim::tre::v1 as pb;
use mcim_proto::mcim::tre::v1::tre_service_server::TreService;
use mcim_proto::mcim::vno::v1 as vno;
use mcim_proto::mcim::vno::v1::vno_service_client::VnoServiceClient;
use mcim_telemetry::Channel;
use serde::{Deserialize, Serialize};
use tonic::{Code, Request, Status};
use tracing::Instrument;

use crate::certificates::Certificates;
use crate::engine::EngineHandle;
use crate::registry::files::{read_optional, write_atomic};
use crate::service::TreApi;
use crate::tls::{TreTlsKey, device_client_config};

/// How many times a step is retried when a role is unreachable (one second apart).
const RETRIES: u32 = 120;

/// The seed's steps, numbered as in 5.1.3.6.2.
pub fn step_name(step: u32) -> &'static str {
    match step {
        1 => "attach to the VNO with the PCID",
        2 => "the VNO contacts the RO's ICF",
        3 => "AVs from the ICF authenticate the PCID (AKA in the TRE)",
        4 => "the VNO provides IP connectivity to the RO",
        5 => "the device connects to the RO's DRF",
        6 => "the SHO is discovered",
        7 => "the RO registers the device at the SHO",
        8 => "the SHO asks the PVA to validate the device (via the RO)",
        9 => "the PVA validates the device's integrity",
        10 => "the validation result reaches the SHO",
        11 => "the SHO authorises the RO's DPF",
        12 => "the DPF downloads the MCIM to the device",
        13 => "the MCIM is provisioned into the TRE and reported to the DPF",
        14 => "the DPF reports the status to the SHO",
        _ => "unknown step",
    }
}

/// Where the device reaches the network.
#[derive(Clone, Debug)]
pub struct Network {
    /// The roles' CA, PEM.
    pub ca_pem: Vec<u8>,
    /// The RO (DRF, DPF).
    pub ro_url: String,
    /// The VNO, for 3GPP access.
    pub vno_url: Option<String>,
}

/// A phase of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Steps 1-4.
    Attach,
    /// Steps 5-7.
    Register,
    /// Steps 8-14, driven by the task stream.
    Tasks,
    /// Finished: the MCIM is installed and the SHO knows.
    Done,
    /// Stopped at a step.
    Failed,
}

/// One step as the device saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// 1-14.
    pub step: u32,
    /// Finished without error.
    pub ok: bool,
    /// What happened.
    pub detail: String,
}

/// A provisioning run, as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// The run's id.
    pub id: String,
    /// 3GPP (through the VNO) or not.
    pub three_gpp: bool,
    /// Where it stands.
    pub phase: Phase,
    /// The steps so far.
    pub steps: Vec<StepRecord>,
    /// The VNO's grant (step 4).
    pub grant_id: String,
    /// The RO's registration (step 7).
    pub registration_id: String,
    /// The SHO found (step 6).
    pub sho_id: String,
    /// The registration nonce, hex.
    pub nonce: String,
    /// The last task acknowledged.
    pub ack_seq: u64,
    /// The MCIM installed (step 13).
    pub mcim_id: String,
}

impl Run {
    fn record(&mut self, step: u32, ok: bool, detail: impl Into<String>) {
        let detail = detail.into();
        if ok {
            tracing::info!(step, "provisioning: {} ({detail})", step_name(step));
        } else {
            tracing::warn!(step, "provisioning failed: {} ({detail})", step_name(step));
        }
        self.steps.push(StepRecord { step, ok, detail });
    }

    fn done(&self, step: u32) -> bool {
        self.steps.iter().any(|s| s.step == step && s.ok)
    }

    /// The step records as the local API streams them.
    pub fn responses(&self) -> Vec<pb::WatchProvisioningResponse> {
        self.steps
            .iter()
            .map(|s| pb::WatchProvisioningResponse {
                step: s.step,
                name: step_name(s.step).into(),
                ok: s.ok,
                detail: s.detail.clone(),
                mcim_id: if s.step == 13 && s.ok {
                    self.mcim_id.clone()
                } else {
                    String::new()
                },
                registration_id: if s.step >= 7 {
                    self.registration_id.clone()
                } else {
                    String::new()
                },
            })
            .collect()
    }

    /// Finished, one way or the other.
    pub fn finished(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::Failed)
    }
}

/// Why a step did not complete.
enum Stop {
    /// A role is unreachable or busy: try again.
    Retry(String),
    /// Refused: the run fails at this step.
    Fail(u32, String),
}

fn stop(step: u32) -> impl Fn(Status) -> Stop {
    move |s: Status| match s.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => {
            Stop::Retry(format!("step {step}: {}", s.message()))
        }
        _ => Stop::Fail(step, s.message().to_string()),
    }
}

/// The provisioning side of `tred`.
pub struct Provisioner {
    api: TreApi,
    engine: EngineHandle,
    state_file: PathBuf,
    certs: Certificates,
    net: Option<Network>,
    run: tokio::sync::watch::Sender<Option<Run>>,
    start: tokio::sync::Mutex<()>,
    /// One channel (one TLS session, one TRE signature) per role address, kept across steps;
    /// emptied when a run begins, so new certificates take effect.
    channels: std::sync::Mutex<std::collections::HashMap<String, Channel>>,
}

impl std::fmt::Debug for Provisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provisioner")
            .field("state_file", &self.state_file)
            .finish_non_exhaustive()
    }
}

impl Provisioner {
    /// The provisioner over the local API `api`; resumes an unfinished run.
    pub fn start(
        api: TreApi,
        engine: EngineHandle,
        state_dir: PathBuf,
        certs: Certificates,
        net: Option<Network>,
    ) -> Result<Arc<Self>, String> {
        let state_file = state_dir.join("provisioning.json");
        let saved = read_optional(&state_file)
            .map_err(|e| format!("{}: {e}", state_file.display()))?
            .map(|b| serde_json::from_slice::<Run>(&b))
            .transpose()
            .map_err(|e| format!("{}: {e}", state_file.display()))?;
        let resume = saved.as_ref().is_some_and(|r| !r.finished());
        let (tx, _) = tokio::sync::watch::channel(saved);
        let p = Arc::new(Self {
            api,
            engine,
            state_file,
            certs,
            net,
            run: tx,
            start: tokio::sync::Mutex::new(()),
            channels: Default::default(),
        });
        if resume {
            tracing::info!("resuming the provisioning run");
            tokio::spawn(p.clone().drive());
        }
        Ok(p)
    }

    /// Starts a run, or returns the one in progress.
    pub async fn begin(self: &Arc<Self>, access: common::AccessType) -> Result<String, Status> {
        let _one = self.start.lock().await;
        if let Some(r) = self.run.borrow().as_ref()
            && !r.finished()
        {
            return Ok(r.id.clone());
        }
        let net = self.net.as_ref().ok_or_else(|| {
            Status::failed_precondition("tred has no network configured (ca_file, ro_url)")
        })?;
        let three_gpp = match access {
            common::AccessType::AccessType3gpp => true,
            common::AccessType::Non3gpp => false,
            common::AccessType::Unspecified => {
                return Err(Status::invalid_argument("name the access type"));
            }
        };
        if three_gpp && net.vno_url.is_none() {
            return Err(Status::failed_precondition(
                "3GPP access needs vno_url in tred's configuration",
            ));
        }
        if self.certs.load().map_err(Status::internal)?.is_none() {
            return Err(Status::failed_precondition(
                "the device has no certificates yet (InstallCertificates at supply time)",
            ));
        }
        let mut id = [0u8; 8];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut id);
        let run = Run {
            id: hex::encode(id),
            three_gpp,
            phase: if three_gpp {
                Phase::Attach
            } else {
                Phase::Register
            },
            steps: Vec::new(),
            grant_id: String::new(),
            registration_id: String::new(),
            sho_id: String::new(),
            nonce: String::new(),
            ack_seq: 0,
            mcim_id: String::new(),
        };
        self.save(&run).map_err(Status::internal)?;
        self.cached_channels().clear();
        let id = run.id.clone();
        self.run.send_replace(Some(run));
        tokio::spawn(self.clone().drive());
        Ok(id)
    }

    /// Follows the run `id`.
    pub fn watch(&self, id: &str) -> Result<tokio::sync::watch::Receiver<Option<Run>>, Status> {
        let rx = self.run.subscribe();
        match rx.borrow().as_ref() {
            Some(r) if r.id == id => {}
            _ => return Err(Status::not_found("no such provisioning run")),
        }
        Ok(rx)
    }

    fn save(&self, run: &Run) -> Result<(), String> {
        let json = serde_json::to_vec_pretty(run).map_err(|e| e.to_string())?;
        write_atomic(&self.state_file, &json)
            .map_err(|e| format!("{}: {e}", self.state_file.display()))
    }

    fn publish(&self, run: &Run) {
        if let Err(e) = self.save(run) {
            tracing::error!("cannot persist the provisioning run: {e}");
        }
        self.run.send_replace(Some(run.clone()));
    }

    /// Runs the run to its end, as one trace: the `provisioning` span is the root of every
    /// call the device makes for it, and the roles' spans join it (trace context in the gRPC
    /// metadata).
    async fn drive(self: Arc<Self>) {
        let Some(run) = self.run.borrow().clone() else {
            return;
        };
        let span = tracing::info_span!(
            "provisioning",
            run = %run.id,
            access = if run.three_gpp { "3gpp" } else { "non-3gpp" },
        );
        self.drive_run(run).instrument(span).await;
    }

    async fn drive_run(&self, mut run: Run) {
        let mut tries = 0;
        while !run.finished() {
            let result = match run.phase {
                Phase::Attach => {
                    self.attach(&mut run)
                        .instrument(tracing::info_span!("attach", steps = "1-4"))
                        .await
                }
                Phase::Register => {
                    self.register(&mut run)
                        .instrument(tracing::info_span!("register", steps = "5-7"))
                        .await
                }
                Phase::Tasks => {
                    self.tasks(&mut run)
                        .instrument(tracing::info_span!("tasks", steps = "8-14"))
                        .await
                }
                Phase::Done | Phase::Failed => break,
            };
            match result {
                Ok(()) => tries = 0,
                Err(Stop::Retry(why)) => {
                    tries += 1;
                    if tries > RETRIES {
                        let step = run.steps.last().map(|s| s.step + 1).unwrap_or(1).min(14);
                        run.record(step, false, format!("gave up: {why}"));
                        run.phase = Phase::Failed;
                    } else {
                        tracing::info!("provisioning: {why}; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                Err(Stop::Fail(step, why)) => {
                    run.record(step, false, why);
                    run.phase = Phase::Failed;
                }
            }
            self.publish(&run);
        }
    }

    fn tls(&self) -> Result<Arc<rustls::ClientConfig>, Stop> {
        let certs = self
            .certs
            .load()
            .map_err(|e| Stop::Fail(5, e))?
            .ok_or_else(|| Stop::Fail(5, "no device certificate".into()))?;
        let key = TreTlsKey::new(self.engine.tls_signer());
        let ca = &self
            .net
            .as_ref()
            .ok_or_else(|| Stop::Fail(5, "no network".into()))?
            .ca_pem;
        device_client_config(ca, certs.tls_certificate, key)
            .map(Arc::new)
            .map_err(|e| Stop::Fail(5, e))
    }

    fn channel(&self, url: &str, role: &str, step: u32) -> Result<Channel, Stop> {
        let key = format!("{role} {url}");
        if let Some(c) = self.cached_channels().get(&key) {
            return Ok(c.clone());
        }
        let c = crate::net::channel(self.tls()?, url, &format!("{role}.mcim.local"))
            .map_err(|e| Stop::Fail(step, e))?;
        self.cached_channels().insert(key, c.clone());
        Ok(c)
    }

    fn cached_channels(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Channel>> {
        // A panic elsewhere while holding the lock leaves a usable map.
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn net(&self) -> Result<&Network, Stop> {
        self.net
            .as_ref()
            .ok_or_else(|| Stop::Fail(1, "no network configured".into()))
    }

    async fn pcid(&self) -> Result<String, Stop> {
        let st = self
            .api
            .get_status(Request::new(pb::GetStatusRequest {}))
            .await
            .map_err(stop(1))?
            .into_inner();
        st.identity
            .map(|i| i.pcid)
            .ok_or_else(|| Stop::Fail(1, "the device is not initialised".into()))
    }

    /// Steps 1-4: attach with the PCID, AKA in the TRE with the initial credential.
    async fn attach(&self, run: &mut Run) -> Result<(), Stop> {
        let pcid = self.pcid().await?;
        let g = self
            .attach_with(&pcid, pb::authenticate_request::Credential::Initial(true))
            .await?;
        run.record(1, true, format!("PCID {pcid}"));
        run.record(2, true, "the VNO routed the PCID to its RO's ICF");
        run.record(3, true, "RES from the TRE matched the ICF's XRES");
        run.record(4, true, format!("grant {}", g.grant_id));
        run.grant_id = g.grant_id;
        run.phase = Phase::Register;
        Ok(())
    }

    /// Attach to the VNO as `identity` and answer its challenge with `credential` in the TRE
    /// (resynchronising when the TRE answers AUTS).
    async fn attach_with(
        &self,
        identity: &str,
        credential: pb::authenticate_request::Credential,
    ) -> Result<vno::Grant, Stop> {
        let url = self
            .net()?
            .vno_url
            .clone()
            .ok_or_else(|| Stop::Fail(1, "no vno_url configured".into()))?;
        let mut vno = VnoServiceClient::new(self.channel(&url, "vno", 1)?);
        let a = vno
            .attach(vno::AttachRequest {
                identity: identity.to_string(),
            })
            .await
            .map_err(stop(1))?
            .into_inner();
        let mut challenge = a.challenge;
        for _ in 0..3 {
            let ch = challenge
                .take()
                .ok_or_else(|| Stop::Fail(3, "no challenge".into()))?;
            let answer = self
                .api
                .authenticate(Request::new(pb::AuthenticateRequest {
                    credential: Some(credential.clone()),
                    challenge: Some(ch),
                }))
                .await
                .map_err(|s| {
                    Stop::Fail(3, format!("the TRE refused the challenge: {}", s.message()))
                })?
                .into_inner();
            let answer = match answer.result {
                Some(pb::authenticate_response::Result::Success(s)) => {
                    vno::complete_attach_request::Answer::Res(s.res)
                }
                Some(pb::authenticate_response::Result::Auts(auts)) => {
                    vno::complete_attach_request::Answer::Auts(auts)
                }
                None => return Err(Stop::Fail(3, "no answer from the TRE".into())),
            };
            let done = vno
                .complete_attach(vno::CompleteAttachRequest {
                    attach_id: a.attach_id.clone(),
                    answer: Some(answer),
                })
                .await
                .map_err(stop(3))?
                .into_inner();
            match done.result {
                Some(vno::complete_attach_response::Result::Grant(g)) => return Ok(g),
                Some(vno::complete_attach_response::Result::Challenge(c)) => {
                    tracing::info!("the VNO resynchronised the SQN; answering again");
                    challenge = Some(c);
                }
                None => return Err(Stop::Fail(3, "empty answer from the VNO".into())),
            }
        }
        Err(Stop::Fail(3, "resynchronisation did not converge".into()))
    }

    /// Operational attach with an installed MCIM (5.1.3.3.2.2): select it (it stays Selected
    /// for the session), attach with its IMSI, AKA in the TRE against the SHO's vectors.
    #[tracing::instrument(name = "network_attach", skip(self))]
    pub async fn network_attach(&self, mcim_id: &str) -> Result<pb::NetworkAttachResponse, Status> {
        let id = if mcim_id.is_empty() {
            self.api
                .get_status(Request::new(pb::GetStatusRequest {}))
                .await?
                .into_inner()
                .connectivity_mcim_id
        } else {
            mcim_id.to_string()
        };
        if id.is_empty() {
            return Err(Status::failed_precondition(
                "no MCIM is chosen for connectivity",
            ));
        }
        let m = self
            .api
            .get_mcim(Request::new(pb::GetMcimRequest {
                mcim_id: id.clone(),
            }))
            .await?
            .into_inner()
            .mcim
            .ok_or_else(|| Status::not_found("no such MCIM"))?;
        if m.state != common::McimState::Selected as i32 {
            self.api
                .select_mcim(Request::new(pb::SelectMcimRequest {
                    mcim_id: id.clone(),
                    pin: String::new(),
                }))
                .await?;
        }
        let g = self
            .attach_with(&m.imsi, pb::authenticate_request::Credential::McimId(id))
            .await
            .map_err(|s| match s {
                Stop::Retry(w) => Status::unavailable(w),
                Stop::Fail(_, w) => Status::failed_precondition(w),
            })?;
        Ok(pb::NetworkAttachResponse {
            grant_id: g.grant_id,
            imsi: m.imsi,
            expires_at: g.expires_at,
        })
    }

    /// Steps 5-7: connect to the DRF, which finds the SHO and registers the device there.
    async fn register(&self, run: &mut Run) -> Result<(), Stop> {
        let pcid = self.pcid().await?;
        let certs = self
            .certs
            .load()
            .map_err(|e| Stop::Fail(5, e))?
            .unwrap_or_default();
        let url = self.net()?.ro_url.clone();
        let r = DrfServiceClient::new(self.channel(&url, "ro", 5)?)
            .register_device(ro::RegisterDeviceRequest {
                pcid,
                access: if run.three_gpp {
                    common::AccessType::AccessType3gpp
                } else {
                    common::AccessType::Non3gpp
                } as i32,
                grant_id: run.grant_id.clone(),
                platform_credential: certs.platform_credential,
            })
            .await
            .map_err(|s| match s.code() {
                Code::FailedPrecondition | Code::NotFound => Stop::Fail(6, s.message().to_string()),
                _ => stop(5)(s),
            })?
            .into_inner();
        run.record(
            5,
            true,
            if run.three_gpp {
                "under the VNO's grant"
            } else {
                "over non-3GPP access, by the device's TLS identity"
            },
        );
        run.record(6, true, format!("SHO {}", r.sho_id));
        run.record(7, true, format!("registration {}", r.registration_id));
        run.registration_id = r.registration_id;
        run.sho_id = r.sho_id;
        run.nonce = hex::encode(r.registration_nonce);
        run.phase = Phase::Tasks;
        Ok(())
    }

    /// Steps 8-14, as the RO's tasks arrive on the device's own stream.
    async fn tasks(&self, run: &mut Run) -> Result<(), Stop> {
        let url = self.net()?.ro_url.clone();
        let chan = self.channel(&url, "ro", 8)?;
        let mut dpf = DpfServiceClient::new(chan);
        let mut stream = dpf
            .watch_device_tasks(ro::WatchDeviceTasksRequest {
                ack_seq: run.ack_seq,
            })
            .await
            .map_err(stop(8))?
            .into_inner();
        loop {
            let task = match stream.message().await {
                Ok(Some(t)) => t,
                Ok(None) => return Err(Stop::Retry("the task stream ended".into())),
                Err(s) => return Err(stop(8)(s)),
            };
            match task.task {
                Some(ro::watch_device_tasks_response::Task::Attest(a)) => {
                    if !run.done(9) {
                        self.attest(run, &a).await?;
                    }
                }
                Some(ro::watch_device_tasks_response::Task::Download(d)) => {
                    if d.registration_id == run.registration_id {
                        self.download(run, &mut dpf).await?;
                    } else {
                        tracing::warn!(registration = %d.registration_id, "a download for another registration; ignored");
                    }
                }
                Some(ro::watch_device_tasks_response::Task::Refused(r)) => {
                    if r.registration_id == run.registration_id {
                        return Err(Stop::Fail(
                            10,
                            format!("the SHO refused to provision the device: {}", r.reason),
                        ));
                    }
                    tracing::info!(registration = %r.registration_id, "a refusal of an earlier registration; ignored");
                }
                Some(ro::watch_device_tasks_response::Task::Discard(_)) | None => {}
            }
            run.ack_seq = run.ack_seq.max(task.seq);
            self.publish(run);
            if run.finished() {
                return Ok(());
            }
        }
    }

    /// Steps 8-9: evidence for the PVA's nonce.
    async fn attest(&self, run: &mut Run, a: &ro::AttestationTask) -> Result<(), Stop> {
        if !run.done(8) {
            run.record(8, true, format!("validation {}", a.validation_id));
        }
        let ev = self
            .api
            .attest(Request::new(pb::AttestRequest {
                nonce: a.nonce.clone(),
                pcrs: Vec::new(),
            }))
            .await
            .map_err(|s| Stop::Fail(9, format!("the TRE gave no evidence: {}", s.message())))?
            .into_inner();
        let mut pva_client = PvaServiceClient::new(self.channel(&a.pva_url, "pva", 9)?);
        let v = pva_client
            .submit_evidence(pva::SubmitEvidenceRequest {
                validation_id: a.validation_id.clone(),
                evidence: ev.evidence,
                clock: ev.clock,
                reset_count: ev.reset_count,
                restart_count: ev.restart_count,
            })
            .await;
        let v = match v {
            Ok(v) => v.into_inner(),
            // Decided already: this run submitted before a restart and did not save it. The
            // SHO acts on that verdict: a download or a refusal follows on the task stream.
            Err(s) if s.code() == Code::FailedPrecondition => {
                run.record(
                    9,
                    true,
                    "the PVA had decided already (evidence sent before a restart)",
                );
                return Ok(());
            }
            Err(s) => return Err(stop(9)(s)),
        };
        match pva::Verdict::try_from(v.verdict) {
            Ok(pva::Verdict::Trusted) => {
                run.record(9, true, "trusted");
                Ok(())
            }
            _ => Err(Stop::Fail(
                9,
                format!("the PVA refused the device: {}", v.reason),
            )),
        }
    }

    /// Steps 10-14: download, verify, install, report.
    async fn download(
        &self,
        run: &mut Run,
        dpf: &mut DpfServiceClient<Channel>,
    ) -> Result<(), Stop> {
        if !run.done(10) {
            run.record(10, true, "the SHO received a positive result");
            run.record(11, true, "the DPF holds the SHO's authorisation");
        }
        let package = dpf
            .download_package(ro::DownloadPackageRequest {
                registration_id: run.registration_id.clone(),
            })
            .await
            .map_err(stop(12))?
            .into_inner()
            .package
            .map(|p| p.cose_sign1)
            .unwrap_or_default();
        if !run.done(12) {
            run.record(12, true, format!("{} octets", package.len()));
        }
        let (status, detail) = match self.install(run, &package).await {
            Ok(mcim_id) => {
                run.mcim_id = mcim_id;
                (common::ProvisioningStatus::Installed, String::new())
            }
            Err(why) => (common::ProvisioningStatus::Failed, why),
        };
        dpf.report_provisioning_status(ro::ReportProvisioningStatusRequest {
            registration_id: run.registration_id.clone(),
            status: status as i32,
            detail: detail.clone(),
            mcim_id: run.mcim_id.clone(),
        })
        .await
        .map_err(stop(13))?;
        if status == common::ProvisioningStatus::Failed {
            return Err(Stop::Fail(13, detail));
        }
        run.record(
            13,
            true,
            format!("MCIM {} installed, activated and reported", run.mcim_id),
        );
        run.record(14, true, "the SHO knows the MCIM is provisioned");
        run.phase = Phase::Done;
        // The initial connectivity is no longer needed.
        if !run.grant_id.is_empty()
            && let Some(url) = self.net()?.vno_url.clone()
            && let Ok(c) = self.channel(&url, "vno", 14)
        {
            let _ = VnoServiceClient::new(c)
                .detach(vno::DetachRequest {
                    grant_id: run.grant_id.clone(),
                })
                .await;
        }
        Ok(())
    }

    /// Whether the registry holds an MCIM with this IMSI from this SHO.
    async fn holds(&self, imsi: &str, sho_id: &str) -> bool {
        self.api
            .get_mcim(Request::new(pb::GetMcimRequest {
                mcim_id: imsi.to_string(),
            }))
            .await
            .ok()
            .and_then(|r| r.into_inner().mcim)
            .is_some_and(|m| m.imsi == imsi && m.sho_id == sho_id)
    }

    /// Verifies the package (the SHO we registered at, this device, this registration) and
    /// installs it; an MCIM already installed from this very package counts as installed.
    async fn install(&self, run: &Run, package: &[u8]) -> Result<String, String> {
        let net = self.net.as_ref().ok_or("no network")?;
        let cert = mcim_core::signed::signer_certificate(package).map_err(|e| e.to_string())?;
        let sho = crate::net::verify_party(&net.ca_pem, &cert, "sho", &run.sho_id)?;
        let nonce = hex::decode(&run.nonce).map_err(|e| e.to_string())?;
        let pcid = self.pcid().await.map_err(|_| "no identity".to_string())?;
        let p = mcim_core::package::open(package, &sho, &pcid, &run.registration_id, &nonce)
            .map_err(|e| e.to_string())?;
        let hexd = |s: &str| hex::decode(s).map_err(|e| format!("package: {e}"));
        let c: Vec<Vec<u8>> = p
            .milenage_c
            .iter()
            .map(|c| hexd(c))
            .collect::<Result<_, _>>()?;
        let installed = self
            .api
            .install_mcim(Request::new(pb::InstallMcimRequest {
                imsi: p.imsi.clone(),
                sho_id: p.sho_id.clone(),
                wrapped_k: hexd(&p.wrapped_k)?,
                wrapped_opc: hexd(&p.wrapped_opc)?,
                milenage_c: c,
                milenage_r: p.milenage_r.clone(),
                pin: String::new(),
                puk: String::new(),
            }))
            .await;
        match installed {
            Ok(_) => {}
            // A resumed run (installed before a restart, maybe before the run was saved): the
            // registry already holds this IMSI from this SHO. The package is this
            // registration's (checked above), so it is the same MCIM.
            Err(s) if s.code() == Code::AlreadyExists && self.holds(&p.imsi, &p.sho_id).await => {}
            Err(s) => return Err(format!("the TRE refused the MCIM: {}", s.message())),
        }
        let id = p.imsi.clone();
        let st = self
            .api
            .get_mcim(Request::new(pb::GetMcimRequest {
                mcim_id: id.clone(),
            }))
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner()
            .mcim
            .map(|m| m.state)
            .unwrap_or(0);
        if st == common::McimState::Installed as i32 {
            self.api
                .activate_mcim(Request::new(pb::ActivateMcimRequest {
                    mcim_id: id.clone(),
                }))
                .await
                .map_err(|s| s.message().to_string())?;
        }
        if p.policy.use_for_connectivity {
            self.api
                .set_connectivity_mcim(Request::new(pb::SetConnectivityMcimRequest {
                    mcim_id: id.clone(),
                }))
                .await
                .map_err(|s| s.message().to_string())?;
        }
        Ok(id)
    }
}
