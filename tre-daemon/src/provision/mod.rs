//! The device's side of initial provisioning (TR 33.812 5.1.3.6.2 for 3GPP access, 5.1.3.6.3
//! for non-3GPP access): the driver of the typed run in [`run`] (states, events, the saved
//! form; the diagram is `flow.md` beside this file).
//!
//! The run is saved in the state directory (`provisioning.json`, replaced atomically) after
//! every step, and resumes where it stopped when `tred` restarts. The device only opens
//! outbound connections: steps 8 and 12 reach it over the task stream it opened at the RO's
//! DPF, which replays what the device has not acknowledged. Every TRE operation goes through
//! the device façade ([`crate::device::Device`]), the same one the local API serves, so the
//! flow obeys the registry's rules (lifecycle, lockdown) like every other caller.

pub mod instructions;
pub mod outbox;
pub mod renewal;
pub mod run;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mcim_core::aka::{Autn, DeviceResponse, Rand};
use mcim_core::lifecycle::{LifecycleOp, McimState};
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
use mcim_proto::mcim::vno::v1 as vno;
use mcim_proto::mcim::vno::v1::vno_service_client::VnoServiceClient;
use mcim_telemetry::Channel;
use tonic::{Code, Status};
use tracing::Instrument;

use crate::device::{Credential, Device, DeviceError, Installed, NewMcim, block16};
use crate::registry::files::{read_optional, write_atomic};
use crate::tls::{TreTlsKey, device_client_config};
use outbox::Outbox;
pub use run::{
    Access, Event, Flow, OldMcim, Registration, Run, RunState, StepRecord, flow_step_name,
    step_name,
};

/// How long a step is retried while a role is unreachable or busy before the run fails.
const RETRY_FOR: Duration = Duration::from_secs(120);

/// How many times a change of SHO tries to install the kept package before it gives up.
const INSTALL_ATTEMPTS: u32 = 3;

/// Where the device reaches the network.
#[derive(Clone, Debug)]
pub struct Network {
    /// The roles' CA, PEM.
    pub ca_pem: Vec<u8>,
    /// The CA(s) that issue SHO certificates, PEM: a package's signer must be theirs.
    pub sho_ca_pem: Vec<u8>,
    /// Per role, the CA that issues that role's certificates (PEM): the device trusts only it
    /// for that role's server. A role without one is trusted under `ca_pem`.
    pub role_cas: Vec<(Role, Vec<u8>)>,
    /// The RO (DRF, DPF).
    pub ro_url: String,
    /// The VNO, for 3GPP access.
    pub vno_url: Option<String>,
}

impl Network {
    /// From the configuration: `ca_file` (all the roles' CAs), `sho_ca_file` (package
    /// signers), and `ca_dir` (`ca-<role>.pem` per role, as `mcimctl pki init` writes them: each
    /// role's server is then trusted under its own CA only, and package signers under
    /// `ca-sho.pem` unless `sho_ca_file` says otherwise).
    pub fn load(
        ca_file: &std::path::Path,
        sho_ca_file: Option<&std::path::Path>,
        ca_dir: Option<&std::path::Path>,
        ro_url: String,
        vno_url: Option<String>,
    ) -> Result<Self, String> {
        let read =
            |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let mut role_cas = Vec::new();
        if let Some(dir) = ca_dir {
            for role in [Role::Ro, Role::Vno, Role::Pva, Role::Sho] {
                let f = dir.join(format!("ca-{}.pem", role.as_str()));
                if f.exists() {
                    role_cas.push((role, read(&f)?));
                }
            }
        }
        let ca_pem = read(ca_file)?;
        let sho_ca_pem = match sho_ca_file {
            Some(f) => read(f)?,
            None => role_cas
                .iter()
                .find(|(r, _)| *r == Role::Sho)
                .map(|(_, pem)| pem.clone())
                .unwrap_or_else(|| ca_pem.clone()),
        };
        Ok(Self {
            ca_pem,
            sho_ca_pem,
            role_cas,
            ro_url,
            vno_url,
        })
    }

    /// The CA(s) the device trusts for `role`'s server, PEM.
    pub fn server_ca(&self, role: Role) -> &[u8] {
        self.role_cas
            .iter()
            .find(|(r, _)| *r == role)
            .map_or(&self.ca_pem[..], |(_, pem)| &pem[..])
    }
}

/// Why the owner's request about provisioning was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// `tred`'s configuration or the device's supply state does not allow it.
    #[error("{0}")]
    NotReady(String),
    /// No run with that id.
    #[error("no such provisioning run")]
    NoSuchRun,
    /// The request is malformed; nothing was done.
    #[error("{0}")]
    BadRequest(String),
    /// The run could not be saved.
    #[error("cannot save the provisioning run: {0}")]
    Persist(String),
    /// The device refused.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A role refused or could not be reached.
    #[error("{0}")]
    Network(Status),
}

/// A completed operational attach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    /// The VNO's grant.
    pub grant_id: String,
    /// The IMSI attached with.
    pub imsi: String,
    /// When the grant expires.
    pub expires_at: Option<prost_types::Timestamp>,
}

/// Why a step did not complete.
enum Stop {
    /// A role is unreachable or busy: try again (after the pause it asked for, if any).
    Retry(String, Option<Duration>),
    /// Refused: the run fails at this step.
    Fail(u32, String),
}

impl Stop {
    /// Why, for a caller outside a run (the outbox, the listener, a renewal).
    fn reason(self) -> String {
        match self {
            Stop::Retry(w, _) | Stop::Fail(_, w) => w,
        }
    }
}

fn stop(step: u32) -> impl Fn(Status) -> Stop {
    move |s: Status| {
        if mcim_telemetry::retry::transient(&s) {
            Stop::Retry(
                format!("step {step}: {}", s.message()),
                mcim_telemetry::retry::pushback(&s),
            )
        } else {
            Stop::Fail(step, s.message().to_string())
        }
    }
}

/// The registration's package from the DPF (5.1.3.6.2 step 12; 5.1.3.7.4.2 step 7).
async fn fetch_package(
    dpf: &mut DpfServiceClient<Channel>,
    registration: &Registration,
    step: u32,
) -> Result<Vec<u8>, Stop> {
    Ok(dpf
        .download_package(ro::DownloadPackageRequest {
            registration_id: registration.id.clone(),
        })
        .await
        .map_err(stop(step))?
        .into_inner()
        .package
        .map(|p| p.cose_sign1)
        .unwrap_or_default())
}

/// A transition the driver asked for that does not apply: a bug, reported as a failed step.
fn apply(run: &mut Run, step: u32, event: Event) -> Result<(), Stop> {
    run.apply(event)
        .map_err(|e| Stop::Fail(step, e.to_string()))
}

/// The provisioning side of `tred`.
pub struct Provisioner {
    device: Device,
    state_dir: PathBuf,
    state_file: PathBuf,
    /// Discard notices until the old SHO acknowledges them (5.1.3.7.4.2 steps 9-10).
    outbox: Outbox,
    /// A delivery task for the outbox is running.
    delivering: std::sync::atomic::AtomicBool,
    /// Remote instructions taken and reported (5.1.1.3).
    ledger: instructions::Ledger,
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
    /// The provisioner over `device`; resumes an unfinished run saved in `state_dir` (by this
    /// or an earlier version of `tred`).
    pub fn start(
        device: Device,
        state_dir: PathBuf,
        net: Option<Network>,
    ) -> Result<Arc<Self>, String> {
        let state_file = state_dir.join("provisioning.json");
        let saved = read_optional(&state_file)
            .map_err(|e| format!("{}: {e}", state_file.display()))?
            .map(|b| run::load(&b))
            .transpose()
            .map_err(|e| format!("{}: {e}", state_file.display()))?;
        let resume = saved.as_ref().is_some_and(|r| !r.finished());
        let (tx, _) = tokio::sync::watch::channel(saved);
        let outbox = Outbox::load(&state_dir)?;
        let undelivered = !outbox.deliverable().is_empty();
        let ledger = instructions::Ledger::load(&state_dir)?;
        let listen = net.is_some();
        let p = Arc::new(Self {
            device,
            state_file,
            state_dir,
            outbox,
            ledger,
            delivering: std::sync::atomic::AtomicBool::new(false),
            net,
            run: tx,
            start: tokio::sync::Mutex::new(()),
            channels: Default::default(),
        });
        if resume {
            tracing::info!("resuming the provisioning run");
            tokio::spawn(p.clone().drive());
        }
        if undelivered {
            tracing::info!("delivering the discard notices not yet acknowledged");
            p.clone().deliver_notices();
        }
        if listen {
            p.clone().listen();
        }
        Ok(p)
    }

    /// The discard notices the device sent, acknowledged or not (for the owner).
    pub fn discard_notices(&self) -> Vec<outbox::Notice> {
        self.outbox.all()
    }

    /// The owner instructs a change of SHO (5.1.3.7.4.2 step 2): re-provision from `new_sho`,
    /// where the subscriber contracted, over the connectivity of the MCIM in use now, which
    /// is discarded before the new one is installed; or, with `pristine` (5.1.3.7.4.3),
    /// discard it first and provision through 5.1.3.6 with the PCID. Returns the run, or the
    /// one in progress.
    pub async fn reprovision(
        self: &Arc<Self>,
        access: Access,
        new_sho: String,
        pristine: bool,
        keep_old: bool,
    ) -> Result<String, ProvisionError> {
        let _one = self.start.lock().await;
        if let Some(r) = self.run.borrow().as_ref()
            && !r.finished()
        {
            return Ok(r.id.clone());
        }
        if pristine && keep_old {
            return Err(ProvisionError::BadRequest(
                "a revert to the pristine state keeps no old MCIM (pristine or keep_old)".into(),
            ));
        }
        if new_sho.is_empty() || new_sho.contains(char::is_whitespace) {
            return Err(ProvisionError::BadRequest(
                "name the new SHO (its identity, e.g. sho2.mcim.local)".into(),
            ));
        }
        self.ready(access)?;
        let Some(old_id) = self.device.status().await?.connectivity else {
            // A revert to the pristine state that failed after it discarded the old MCIM
            // (5.1.3.7.4.3 step 3) is tried again with the same old MCIM and new SHO; nothing
            // else has an MCIM to change from.
            let retry = self.failed_revert(&new_sho, pristine).await?;
            let old = retry.ok_or_else(|| {
                ProvisionError::NotReady(
                    "no MCIM provides connectivity: nothing to change from (provision first)"
                        .into(),
                )
            })?;
            self.ensure_pcid_fresh().await?;
            return self
                .start_run(access, Flow::Pristine { old, new_sho })
                .await;
        };
        let old = self.device.get(&old_id).await?;
        if !matches!(old.state, McimState::Activated | McimState::Selected) {
            return Err(ProvisionError::NotReady(format!(
                "the MCIM in use ({}) is {:?}: a change needs its connectivity",
                old.id, old.state
            )));
        }
        if old.sho == new_sho {
            return Err(ProvisionError::BadRequest(format!(
                "{new_sho} already provides the MCIM in use"
            )));
        }
        // Both MCIMs present: the device already holds one of the new SHO's; it is chosen for
        // connectivity, not provisioned a second time (the SHO would reuse its IMSI).
        if let Some(held) = self
            .device
            .list()
            .await?
            .into_iter()
            .find(|m| m.sho == new_sho)
        {
            return Err(ProvisionError::NotReady(format!(
                "the device already holds MCIM {} of {new_sho}: choose it for connectivity \
                 (mcimctl device connectivity {}) instead of provisioning again",
                held.id, held.id
            )));
        }
        // The PCID's initial credential, which a device may need again after a change
        // (5.1.3.7.4.3), is renewed first when it is about to expire; an expired one that
        // cannot be renewed stops the change here, before anything changed.
        self.ensure_pcid_fresh().await?;
        let old = OldMcim {
            id: old.id,
            sho_id: old.sho,
        };
        let flow = if pristine {
            Flow::Pristine { old, new_sho }
        } else if keep_old {
            Flow::Dual { old, new_sho }
        } else {
            Flow::ChangeSho { old, new_sho }
        };
        self.start_run(access, flow).await
    }

    /// The old MCIM of the last run when it was a revert to the pristine state for `new_sho`
    /// that failed after the old MCIM left the TRE (and `pristine` is asked again).
    async fn failed_revert(
        &self,
        new_sho: &str,
        pristine: bool,
    ) -> Result<Option<OldMcim>, ProvisionError> {
        let last = self.run.borrow().clone();
        let Some(Run {
            flow: Flow::Pristine { old, new_sho: to },
            state: RunState::Failed { .. },
            ..
        }) = last
        else {
            return Ok(None);
        };
        if !pristine || to != new_sho {
            return Err(ProvisionError::NotReady(format!(
                "the revert to the pristine state for {to} failed after MCIM {} was discarded: \
                 try it again (reprovision --pristine --sho-id {to})",
                old.id
            )));
        }
        let held = self
            .device
            .list()
            .await?
            .into_iter()
            .any(|m| m.id == old.id);
        Ok((!held).then_some(old))
    }

    /// Saves and starts a new run of `flow`.
    async fn start_run(
        self: &Arc<Self>,
        access: Access,
        flow: Flow,
    ) -> Result<String, ProvisionError> {
        let mut id = [0u8; 8];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut id);
        let run = Run::with_flow(hex::encode(id), access, flow);
        self.save(&run).map_err(ProvisionError::Persist)?;
        self.cached_channels().clear();
        let id = run.id.clone();
        self.run.send_replace(Some(run));
        tokio::spawn(self.clone().drive());
        Ok(id)
    }

    /// What every run needs before it starts: the network and the supplier's certificates.
    fn ready(&self, access: Access) -> Result<(), ProvisionError> {
        let net = self.net.as_ref().ok_or_else(|| {
            ProvisionError::NotReady("tred has no network configured (ca_file, ro_url)".into())
        })?;
        if access == Access::ThreeGpp && net.vno_url.is_none() {
            return Err(ProvisionError::NotReady(
                "3GPP access needs vno_url in tred's configuration".into(),
            ));
        }
        if self.device.certificates()?.is_none() {
            return Err(ProvisionError::NotReady(
                "the device has no certificates yet (InstallCertificates at supply time)".into(),
            ));
        }
        Ok(())
    }

    /// Starts a run, or returns the one in progress.
    pub async fn begin(self: &Arc<Self>, access: Access) -> Result<String, ProvisionError> {
        let _one = self.start.lock().await;
        if let Some(r) = self.run.borrow().as_ref()
            && !r.finished()
        {
            return Ok(r.id.clone());
        }
        self.ready(access)?;
        // After a revert to the pristine state failed past its discard, an initial
        // provisioning would go to the old SHO, which still counts its MCIM as held.
        if self.device.status().await?.connectivity.is_none() {
            self.failed_revert("", false).await?;
        }
        self.start_run(access, Flow::Initial).await
    }

    /// Follows the run `id`.
    pub fn watch(
        &self,
        id: &str,
    ) -> Result<tokio::sync::watch::Receiver<Option<Run>>, ProvisionError> {
        let rx = self.run.subscribe();
        match rx.borrow().as_ref() {
            Some(r) if r.id == id => {}
            _ => return Err(ProvisionError::NoSuchRun),
        }
        Ok(rx)
    }

    fn save(&self, run: &Run) -> Result<(), String> {
        let json = run::save(run).map_err(|e| e.to_string())?;
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
            access = match run.access {
                Access::ThreeGpp => "3gpp",
                Access::NonThreeGpp => "non-3gpp",
            },
        );
        self.drive_run(run).instrument(span).await;
    }

    async fn drive_run(self: &Arc<Self>, mut run: Run) {
        let mut tries = 0;
        let mut retrying_since: Option<std::time::Instant> = None;
        while !run.finished() {
            let result = match &run.state {
                RunState::Reverting => {
                    self.revert(&mut run)
                        .instrument(tracing::info_span!("revert", steps = "1-3"))
                        .await
                }
                RunState::Attaching => {
                    self.attach(&mut run)
                        .instrument(tracing::info_span!("attach", steps = "1-4"))
                        .await
                }
                RunState::Registering { .. } => {
                    self.register(&mut run)
                        .instrument(tracing::info_span!("register", steps = "5-7"))
                        .await
                }
                RunState::AwaitingTasks { .. } | RunState::Downloaded { .. } => {
                    self.tasks(&mut run)
                        .instrument(tracing::info_span!("tasks"))
                        .await
                }
                RunState::Discarded { .. } => {
                    self.acknowledged(&mut run)
                        .instrument(tracing::info_span!("discard_notice", steps = "9-11"))
                        .await
                }
                RunState::Relayed { .. } => {
                    self.install_kept(&mut run)
                        .instrument(tracing::info_span!("install", steps = "12-14"))
                        .await
                }
                RunState::Provisioned { .. } | RunState::Failed { .. } => break,
            };
            let failed = match result {
                Ok(()) => {
                    tries = 0;
                    retrying_since = None;
                    None
                }
                Err(Stop::Retry(why, asked)) => {
                    tries += 1;
                    let since = *retrying_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > RETRY_FOR {
                        let step = run
                            .steps
                            .last()
                            .map(|s| s.step.saturating_sub(run.offset()) + 1)
                            .unwrap_or(1)
                            .min(14);
                        Some((step, format!("gave up: {why}")))
                    } else {
                        let wait = mcim_telemetry::retry::wait(tries, asked);
                        tracing::info!("provisioning: {why}; retrying in {} ms", wait.as_millis());
                        tokio::time::sleep(wait).await;
                        None
                    }
                }
                Err(Stop::Fail(step, why)) => Some((step, why)),
            };
            if let Some((step, reason)) = failed {
                run.record(step, false, reason.clone());
                if let Err(e) = run.apply(Event::Failed { step, reason }) {
                    tracing::error!("{e}");
                    break;
                }
            }
            self.publish(&run);
        }
    }

    fn tls(&self, role: Role, step: u32) -> Result<Arc<rustls::ClientConfig>, Stop> {
        let certs = self
            .device
            .certificates()
            .map_err(|e| Stop::Fail(step, e.to_string()))?
            .ok_or_else(|| Stop::Fail(step, "no device certificate".into()))?;
        let key = TreTlsKey::new(self.device.engine().tls_signer());
        device_client_config(self.net(step)?.server_ca(role), certs.tls_certificate, key)
            .map(Arc::new)
            .map_err(|e| Stop::Fail(step, format!("the device's TLS configuration: {e}")))
    }

    fn channel(&self, url: &str, role: Role, step: u32) -> Result<Channel, Stop> {
        let key = format!("{role} {url}");
        if let Some(c) = self.cached_channels().get(&key) {
            return Ok(c.clone());
        }
        let c = crate::net::channel(self.tls(role, step)?, url, &server_name(role))
            .map_err(|e| Stop::Fail(step, e))?;
        self.cached_channels().insert(key, c.clone());
        Ok(c)
    }

    /// [`Provisioner::channel`] to the server of the party `name` of `role` only
    /// ([`crate::tls::expect_party`]).
    fn party_channel(&self, url: &str, role: Role, name: &str, step: u32) -> Result<Channel, Stop> {
        let key = format!("{role} {name} {url}");
        if let Some(c) = self.cached_channels().get(&key) {
            return Ok(c.clone());
        }
        let config = crate::tls::expect_party(
            Arc::unwrap_or_clone(self.tls(role, step)?),
            self.net(step)?.server_ca(role),
            role,
            name,
        )
        .map_err(|e| Stop::Fail(step, format!("the device's TLS configuration: {e}")))?;
        let c = crate::net::channel(Arc::new(config), url, &server_name(role))
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

    fn net(&self, step: u32) -> Result<&Network, Stop> {
        self.net
            .as_ref()
            .ok_or_else(|| Stop::Fail(step, "no network configured".into()))
    }

    async fn pcid(&self, step: u32) -> Result<String, Stop> {
        self.device.pcid().await.map_err(|e| match e {
            DeviceError::EngineGone(_) => Stop::Retry(e.to_string(), None),
            _ => Stop::Fail(step, format!("the device has no identity: {e}")),
        })
    }

    /// Steps 1-4: attach with the PCID, AKA in the TRE with the initial credential.
    async fn attach(&self, run: &mut Run) -> Result<(), Stop> {
        // A change of SHO uses the old SHO's connectivity (5.1.3.7.4.2): an operational
        // attach with the MCIM in use (steps 2-7 then run over it).
        if run.flow.over_old_connectivity()
            && let Some((old, _)) = run.flow.change()
        {
            let old = old.id.clone();
            let m = self
                .device
                .get(&old)
                .await
                .map_err(|e| Stop::Fail(2, format!("the MCIM in use: {e}")))?;
            if m.state != McimState::Selected {
                self.device
                    .select(&old, None)
                    .await
                    .map_err(|e| Stop::Fail(2, format!("the MCIM in use: {e}")))?;
            }
            let g = self
                .attach_with(&old, Credential::Mcim(old.clone()))
                .await
                .map_err(|s| match s {
                    Stop::Fail(_, why) => Stop::Fail(2, format!("attach with {old}: {why}")),
                    r => r,
                })?;
            tracing::info!(imsi = %old, grant = %g.grant_id, "attached over the old SHO's MCIM");
            return apply(run, 2, Event::Attached { grant: g.grant_id });
        }
        let pcid = self.pcid(1).await?;
        let g = self.attach_with(&pcid, Credential::Initial).await?;
        run.record(1, true, format!("PCID {pcid}"));
        run.record(2, true, "the VNO routed the PCID to its RO's ICF");
        run.record(3, true, "RES from the TRE matched the ICF's XRES");
        run.record(4, true, format!("grant {}", g.grant_id));
        apply(run, 4, Event::Attached { grant: g.grant_id })
    }

    /// Attach to the VNO as `identity` and answer its challenge with `credential` in the TRE
    /// (resynchronising when the TRE answers AUTS).
    async fn attach_with(
        &self,
        identity: &str,
        credential: Credential,
    ) -> Result<vno::Grant, Stop> {
        let url = self
            .net(1)?
            .vno_url
            .clone()
            .ok_or_else(|| Stop::Fail(1, "no vno_url configured".into()))?;
        let mut vno = VnoServiceClient::new(self.channel(&url, Role::Vno, 1)?);
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
            let refused = |e: String| Stop::Fail(3, format!("the TRE refused the challenge: {e}"));
            let rand = Rand(block16("RAND", &ch.rand).map_err(|e| refused(e.to_string()))?);
            let autn = Autn(block16("AUTN", &ch.autn).map_err(|e| refused(e.to_string()))?);
            let answer = match self
                .device
                .authenticate(credential.clone(), rand, autn)
                .await
                .map_err(|e| refused(e.to_string()))?
            {
                DeviceResponse::Success { res, .. } => {
                    vno::complete_attach_request::Answer::Res(res.0.to_vec())
                }
                DeviceResponse::SyncFailure { auts, .. } => {
                    vno::complete_attach_request::Answer::Auts(auts.0.to_vec())
                }
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
    pub async fn network_attach(&self, mcim_id: &str) -> Result<Attached, ProvisionError> {
        let id = if mcim_id.is_empty() {
            self.device.status().await?.connectivity.unwrap_or_default()
        } else {
            mcim_id.to_string()
        };
        if id.is_empty() {
            return Err(ProvisionError::NotReady(
                "no MCIM is chosen for connectivity".into(),
            ));
        }
        let m = self.device.get(&id).await?;
        if m.state != McimState::Selected {
            self.device.select(&id, None).await?;
        }
        let g = self
            .attach_with(&m.id, Credential::Mcim(id))
            .await
            .map_err(|s| {
                ProvisionError::Network(match s {
                    Stop::Retry(w, _) => Status::unavailable(w),
                    Stop::Fail(_, w) => Status::failed_precondition(w),
                })
            })?;
        Ok(Attached {
            grant_id: g.grant_id,
            imsi: m.id,
            expires_at: g.expires_at,
        })
    }

    /// Steps 5-7: connect to the DRF, which finds the SHO and registers the device there.
    async fn register(self: &Arc<Self>, run: &mut Run) -> Result<(), Stop> {
        let pcid = self.pcid(5).await?;
        let certs = self
            .device
            .certificates()
            .map_err(|e| Stop::Fail(5, e.to_string()))?
            .unwrap_or_default();
        let url = self.net(5)?.ro_url.clone();
        let (new_sho_id, refused_at, pristine, keep_old) = match &run.flow {
            Flow::Initial => (String::new(), 6, false, false),
            Flow::ChangeSho { new_sho, .. } => (new_sho.clone(), 1, false, false),
            Flow::Dual { new_sho, .. } => (new_sho.clone(), 1, false, true),
            Flow::Pristine { new_sho, .. } => (new_sho.clone(), 6, true, false),
        };
        let r = DrfServiceClient::new(self.channel(&url, Role::Ro, 5)?)
            .register_device(ro::RegisterDeviceRequest {
                pcid,
                access: match run.access {
                    Access::ThreeGpp => common::AccessType::AccessType3gpp,
                    Access::NonThreeGpp => common::AccessType::Non3gpp,
                } as i32,
                grant_id: run.state.grant().unwrap_or_default().to_string(),
                platform_credential: certs.platform_credential,
                new_sho_id,
                pristine,
                keep_old,
            })
            .await
            .map_err(|s| match s.code() {
                Code::FailedPrecondition | Code::NotFound => {
                    Stop::Fail(refused_at, s.message().to_string())
                }
                _ => stop(5)(s),
            })?
            .into_inner();
        // A revert to the pristine state: the old SHO's address for the discard notice.
        if let Flow::Pristine { old, .. } = &run.flow
            && !r.old_sho_url.is_empty()
        {
            if let Err(e) = self.outbox.set_url(&old.id, &r.old_sho_url) {
                tracing::error!("discard outbox: {e}");
            }
            self.clone().deliver_notices();
        }
        if run.flow.over_old_connectivity()
            && let Some((old, new_sho)) = run.flow.change()
        {
            let (old, new_sho) = (old.clone(), new_sho.to_string());
            run.record(
                1,
                true,
                format!("{new_sho} holds a contract for the device"),
            );
            run.record(
                2,
                true,
                match run.state.grant() {
                    Some(g) => format!(
                        "from {}: over the connectivity of MCIM {} (grant {g})",
                        old.sho_id, old.id
                    ),
                    None => format!("from {}: over non-3GPP access", old.sho_id),
                },
            );
            run.record(3, true, format!("registration {}", r.registration_id));
            return apply(
                run,
                3,
                Event::Registered(Registration {
                    id: r.registration_id,
                    sho_id: r.sho_id,
                    nonce: r.registration_nonce,
                }),
            );
        }
        run.record(
            5,
            true,
            match run.access {
                Access::ThreeGpp => "under the VNO's grant",
                Access::NonThreeGpp => "over non-3GPP access, by the device's TLS identity",
            },
        );
        run.record(6, true, format!("SHO {}", r.sho_id));
        run.record(7, true, format!("registration {}", r.registration_id));
        apply(
            run,
            7,
            Event::Registered(Registration {
                id: r.registration_id,
                sho_id: r.sho_id,
                nonce: r.registration_nonce,
            }),
        )
    }

    /// Steps 8-14 (5.1.3.6.2), or 3-8 of a change (5.1.3.7.4.2), as the RO's tasks arrive on
    /// the device's own stream.
    async fn tasks(&self, run: &mut Run) -> Result<(), Stop> {
        let (registration, ack_seq) = match &run.state {
            RunState::AwaitingTasks {
                registration,
                ack_seq,
                ..
            }
            | RunState::Downloaded {
                registration,
                ack_seq,
            } => (registration.clone(), *ack_seq),
            _ => return Ok(()),
        };
        let change = run.flow.over_old_connectivity();
        let url = self.net(8)?.ro_url.clone();
        let chan = self.channel(&url, Role::Ro, 8)?;
        let mut dpf = DpfServiceClient::new(chan);
        let mut stream = dpf
            .watch_device_tasks(ro::WatchDeviceTasksRequest { ack_seq })
            .await
            .map_err(stop(8))?
            .into_inner();
        loop {
            let task = match stream.message().await {
                Ok(Some(t)) => t,
                Ok(None) => return Err(Stop::Retry("the task stream ended".into(), None)),
                Err(s) => return Err(stop(8)(s)),
            };
            match task.task {
                Some(ro::watch_device_tasks_response::Task::Attest(a))
                    if !a.registration_id.is_empty() && a.registration_id != registration.id =>
                {
                    tracing::info!(registration = %a.registration_id, "an attestation task of an earlier registration; ignored");
                }
                Some(ro::watch_device_tasks_response::Task::Attest(a))
                    if !run.done(if change { 4 } else { 9 }) =>
                {
                    self.attest(run, &a).await?;
                }
                Some(ro::watch_device_tasks_response::Task::Attest(_)) => {}
                Some(ro::watch_device_tasks_response::Task::Download(d)) => {
                    if d.registration_id != registration.id {
                        tracing::warn!(registration = %d.registration_id, "a download for another registration; ignored");
                    } else if change {
                        if matches!(run.state, RunState::AwaitingTasks { .. }) {
                            self.download_kept(run, &registration, &mut dpf).await?;
                            // Both MCIMs present: nothing to discard, no order to wait for.
                            if matches!(run.flow, Flow::Dual { .. }) {
                                apply(run, 8, Event::Acknowledged(task.seq))?;
                                apply(run, 8, Event::KeptOld)?;
                            }
                        }
                    } else {
                        self.download(run, &registration, &mut dpf).await?;
                    }
                }
                Some(ro::watch_device_tasks_response::Task::Refused(r)) => {
                    if r.registration_id == registration.id {
                        return Err(Stop::Fail(
                            if change { 5 } else { 10 },
                            format!("the SHO refused to provision the device: {}", r.reason),
                        ));
                    }
                    tracing::info!(registration = %r.registration_id, "a refusal of an earlier registration; ignored");
                }
                Some(ro::watch_device_tasks_response::Task::Discard(d)) => {
                    if d.registration_id == registration.id
                        && matches!(run.state, RunState::Downloaded { .. })
                    {
                        apply(run, 8, Event::Acknowledged(task.seq))?;
                        self.discard_old(run, &d).await?;
                        self.publish(run);
                        return Ok(());
                    }
                    tracing::warn!(registration = %d.registration_id, "an order to discard outside a change of SHO in progress; ignored");
                }
                // Not acknowledged when it could not be handled now: it comes again.
                Some(ro::watch_device_tasks_response::Task::Instruction(t)) => {
                    self.instruction(&t).await.then_some(()).ok_or_else(|| {
                        Stop::Retry("an instruction could not be handled now".into(), None)
                    })?
                }
                // Not in the middle of a run (it may be using the PCID): before the next change.
                Some(ro::watch_device_tasks_response::Task::Renewal(_)) => {
                    self.renewal_offered(false).await;
                }
                None => {}
            }
            if matches!(
                run.state,
                RunState::AwaitingTasks { .. } | RunState::Downloaded { .. }
            ) {
                apply(run, 8, Event::Acknowledged(task.seq))?;
            }
            self.publish(run);
            if !matches!(
                run.state,
                RunState::AwaitingTasks { .. } | RunState::Downloaded { .. }
            ) {
                return Ok(());
            }
        }
    }

    /// Steps 8-9: evidence for the PVA's nonce.
    async fn attest(&self, run: &mut Run, a: &ro::AttestationTask) -> Result<(), Stop> {
        // 5.1.3.6.2 steps 8-9; 5.1.3.7.4.2 steps 3-4 (step 3 was recorded at registration).
        let (asked, validated) = if !run.flow.over_old_connectivity() {
            (8, 9)
        } else {
            (3, 4)
        };
        if !run.done(asked) {
            run.record(asked, true, format!("validation {}", a.validation_id));
        }
        let ev = self
            .device
            .attest(a.nonce.clone(), None)
            .await
            .map_err(|e| Stop::Fail(validated, format!("the TRE gave no evidence: {e}")))?;
        let clock = ev.clock.unwrap_or(mcim_core::tpm::attest::ClockInfo {
            clock: 0,
            reset_count: 0,
            restart_count: 0,
            safe: false,
        });
        let mut pva_client =
            PvaServiceClient::new(self.channel(&a.pva_url, Role::Pva, validated)?);
        let v = pva_client
            .submit_evidence(pva::SubmitEvidenceRequest {
                validation_id: a.validation_id.clone(),
                evidence: Some(crate::wire::evidence(ev)),
                clock: clock.clock,
                reset_count: clock.reset_count,
                restart_count: clock.restart_count,
            })
            .await;
        let v = match v {
            Ok(v) => v.into_inner(),
            // Decided already: this run submitted before a restart and did not save it. The
            // SHO acts on that verdict: a download or a refusal follows on the task stream.
            Err(s) if s.code() == Code::FailedPrecondition => {
                run.record(
                    validated,
                    true,
                    "the PVA had decided already (evidence sent before a restart)",
                );
                return Ok(());
            }
            Err(s) => return Err(stop(validated)(s)),
        };
        match pva::Verdict::try_from(v.verdict) {
            Ok(pva::Verdict::Trusted) => {
                run.record(validated, true, "trusted");
                Ok(())
            }
            _ => Err(Stop::Fail(
                validated,
                format!("the PVA refused the device: {}", v.reason),
            )),
        }
    }

    /// Steps 10-14: download, verify, install, report.
    async fn download(
        &self,
        run: &mut Run,
        registration: &Registration,
        dpf: &mut DpfServiceClient<Channel>,
    ) -> Result<(), Stop> {
        if !run.done(10) {
            run.record(10, true, "the SHO received a positive result");
            run.record(11, true, "the DPF holds the SHO's authorisation");
        }
        let package = fetch_package(dpf, registration, 12).await?;
        if !run.done(12) {
            run.record(12, true, format!("{} octets", package.len()));
        }
        let (status, detail, mcim_id) = match self.install(registration, &package).await {
            Ok(mcim_id) => (
                common::ProvisioningStatus::Installed,
                String::new(),
                mcim_id,
            ),
            Err(why) => (common::ProvisioningStatus::Failed, why, String::new()),
        };
        let reported = dpf
            .report_provisioning_status(ro::ReportProvisioningStatusRequest {
                registration_id: registration.id.clone(),
                status: status as i32,
                detail: detail.clone(),
                mcim_id: mcim_id.clone(),
            })
            .await;
        if status == common::ProvisioningStatus::Failed {
            // The device's refusal is the outcome whether or not the DPF took the report: a
            // DPF that served a package before the SHO authorised one (a compromised RO) gets
            // the report refused by the SHO, and that must not replace the reason.
            return Err(Stop::Fail(
                13,
                match reported {
                    Ok(_) => detail,
                    Err(e) => format!(
                        "{detail} (the DPF did not take the report: {})",
                        e.message()
                    ),
                },
            ));
        }
        reported.map_err(stop(13))?;
        run.record(
            13,
            true,
            format!("MCIM {mcim_id} installed, activated and reported"),
        );
        run.record(14, true, "the SHO knows the MCIM is provisioned");
        let grant = run.state.grant().map(str::to_string);
        apply(run, 13, Event::Installed { mcim_id })?;
        // The initial connectivity is no longer needed.
        if let Some(grant_id) = grant
            && let Some(url) = self.net(14)?.vno_url.clone()
            && let Ok(c) = self.channel(&url, Role::Vno, 14)
        {
            let _ = VnoServiceClient::new(c)
                .detach(vno::DetachRequest { grant_id })
                .await;
        }
        Ok(())
    }

    /// The key of the SHO `sho_id` that signed `signed` (a package, a discard acknowledgment):
    /// its certificate, carried in the statement, issued by the SHO CA and naming `sho_id`.
    fn sho_key(&self, signed: &[u8], sho_id: &str) -> Result<p256::ecdsa::VerifyingKey, String> {
        let net = self.net.as_ref().ok_or("no network")?;
        let cert = mcim_core::signed::signer_certificate(signed).map_err(|e| e.to_string())?;
        crate::net::verify_party(&net.sho_ca_pem, &cert, Role::Sho, sho_id)
    }

    /// Verifies the package: signed by the SHO we registered at, for this device, this
    /// registration and its nonce, and holding an MCIM the TRE can take. Nothing changes.
    async fn verify_package(
        &self,
        registration: &Registration,
        package: &[u8],
    ) -> Result<(NewMcim, bool), String> {
        let sho = self.sho_key(package, &registration.sho_id)?;
        let pcid = self
            .device
            .pcid()
            .await
            .map_err(|e| format!("no identity: {e}"))?;
        let p =
            mcim_core::package::open(package, &sho, &pcid, &registration.id, &registration.nonce)
                .map_err(|e| e.to_string())?;
        let new = NewMcim::from_package(&p).map_err(|e| e.to_string())?;
        Ok((new, p.policy.use_for_connectivity))
    }

    /// Verifies the package ([`Provisioner::verify_package`]) and installs it; an MCIM already
    /// installed from this very package counts as installed.
    async fn install(&self, registration: &Registration, package: &[u8]) -> Result<String, String> {
        self.install_as(registration, package, true).await
    }

    /// [`Provisioner::install`]; the package's wish to provide connectivity is followed only
    /// when `may_connect` (with both MCIMs present the owner chooses).
    async fn install_as(
        &self,
        registration: &Registration,
        package: &[u8],
        may_connect: bool,
    ) -> Result<String, String> {
        let (new, connectivity) = self.verify_package(registration, package).await?;
        let connectivity = connectivity && may_connect;
        let refused = |e: DeviceError| format!("the TRE refused the MCIM: {e}");
        // A resumed run (installed before a restart, maybe before the run was saved): the
        // registry already holds this IMSI from this SHO. The package is this registration's
        // (checked above), so it is the same MCIM.
        let m = match self.device.install(new).await.map_err(refused)? {
            Installed::New(m) | Installed::AlreadyFromSho(m) => m,
        };
        if m.state == McimState::Installed {
            self.device
                .apply(&m.id, LifecycleOp::Activate)
                .await
                .map_err(refused)?;
        }
        if connectivity {
            self.device.set_connectivity(&m.id).await.map_err(refused)?;
        }
        Ok(m.id)
    }

    /// Where a change of SHO keeps its downloaded package (5.1.3.7.4.2 step 7) until it is
    /// installed: signed and wrapped to the TRE, nothing in it is readable outside the TRE.
    fn kept_package(&self, registration: &Registration) -> PathBuf {
        self.state_dir
            .join(format!("package-{}.cose", registration.id))
    }

    /// 5.1.3.7.4.3 steps 1-3: the old SHO's MCIM leaves the TRE and its notice, signed in the
    /// TRE, goes into the outbox (delivered once the DRF names the old SHO's address, at the
    /// registration); the device is then in the pristine state and provisions as in 5.1.3.6.
    async fn revert(&self, run: &mut Run) -> Result<(), Stop> {
        let Flow::Pristine { old, new_sho } = &run.flow else {
            return Ok(());
        };
        let (old, new_sho) = (old.clone(), new_sho.clone());
        self.discard_into_outbox(&old, "", 3).await?;
        run.record(
            1,
            true,
            format!("{new_sho} holds the device's parameters (checked at step 9)"),
        );
        run.record(
            2,
            true,
            format!("from {} by reverting to the pristine state", old.sho_id),
        );
        run.record(
            3,
            true,
            format!(
                "MCIM {} of {} is gone from the TRE; its notice waits in the outbox",
                old.id, old.sho_id
            ),
        );
        apply(run, 3, Event::Reverted)
    }

    /// Discards `old` in the TRE and puts its notice, signed in the TRE, into the outbox
    /// (`sho_url` may be empty until known); `step` names the step a failure belongs to.
    async fn discard_into_outbox(
        &self,
        old: &OldMcim,
        sho_url: &str,
        step: u32,
    ) -> Result<(), Stop> {
        let gone = |e: DeviceError| match e {
            DeviceError::EngineGone(_) => Stop::Retry(e.to_string(), None),
            e => Stop::Fail(step, format!("the TRE did not discard {}: {e}", old.id)),
        };
        self.device.discard(&old.id).await.map_err(gone)?;
        let (notice, signature, chain) = self
            .device
            .discard_notice(old.id.clone(), old.sho_id.clone())
            .await
            .map_err(gone)?;
        self.outbox
            .put(outbox::Notice {
                imsi: old.id.clone(),
                sho_id: old.sho_id.clone(),
                sho_url: sho_url.to_string(),
                notice,
                signature,
                chain,
                ack: None,
                acknowledged_at: 0,
                attempts: 0,
            })
            .map_err(|e| Stop::Fail(step, format!("cannot keep the discard notice: {e}")))
    }

    /// 5.1.3.7.4.2 steps 5-7: the new SHO's package, downloaded whole over the old SHO's
    /// connectivity, verified and kept; nothing on the device changes.
    async fn download_kept(
        &self,
        run: &mut Run,
        registration: &Registration,
        dpf: &mut DpfServiceClient<Channel>,
    ) -> Result<(), Stop> {
        if !run.done(5) {
            run.record(5, true, "the new SHO received a positive result");
            run.record(6, true, "the DPF holds the new SHO's MCIM");
        }
        let package = fetch_package(dpf, registration, 7).await?;
        if let Err(why) = self.verify_package(registration, &package).await {
            // Nothing was discarded: the old MCIM stays in use; both SHOs hear of it.
            let _ = dpf
                .report_provisioning_status(ro::ReportProvisioningStatusRequest {
                    registration_id: registration.id.clone(),
                    status: common::ProvisioningStatus::Failed as i32,
                    detail: why.clone(),
                    mcim_id: String::new(),
                })
                .await;
            return Err(Stop::Fail(
                7,
                format!("the new package does not verify (the old MCIM stays): {why}"),
            ));
        }
        write_atomic(&self.kept_package(registration), &package)
            .map_err(|e| Stop::Fail(7, format!("cannot keep the package: {e}")))?;
        run.record(
            7,
            true,
            format!("{} octets, verified whole and kept", package.len()),
        );
        apply(run, 7, Event::Downloaded)
    }

    /// Step 8: the old SHO's MCIM leaves the TRE; its discard notice, signed in the TRE, goes
    /// into the outbox before the run moves on.
    async fn discard_old(&self, run: &mut Run, d: &ro::DiscardTask) -> Result<(), Stop> {
        let Flow::ChangeSho { old, .. } = &run.flow else {
            return Ok(());
        };
        let old = old.clone();
        // The RO names what it thinks is installed; the device discards only what its owner
        // named, and refuses an order for anything else.
        if !d.mcim_id.is_empty() && d.mcim_id != old.id {
            return Err(Stop::Fail(
                8,
                format!(
                    "the RO ordered the discard of {}, not of the MCIM in use ({})",
                    d.mcim_id, old.id
                ),
            ));
        }
        if !d.old_sho_url.starts_with("https://") {
            return Err(Stop::Fail(
                8,
                "the old SHO's address is not https://".into(),
            ));
        }
        self.discard_into_outbox(&old, &d.old_sho_url, 8).await?;
        run.record(
            8,
            true,
            format!("MCIM {} of {} is gone from the TRE", old.id, old.sho_id),
        );
        apply(run, 8, Event::Discarded)
    }

    /// Steps 9-11: wait for the outbox to deliver the notice and verify the old SHO's
    /// acknowledgment (steps 9-10, retried with backoff, across restarts), then relay it to
    /// the DPF, which filters it for the new SHO (11).
    async fn acknowledged(self: &Arc<Self>, run: &mut Run) -> Result<(), Stop> {
        let (Flow::ChangeSho { old, .. }, Some(registration)) =
            (&run.flow, run.state.registration())
        else {
            return Ok(());
        };
        let (imsi, registration) = (old.id.clone(), registration.clone());
        let mut changed = self.outbox.subscribe();
        let n = loop {
            match self.outbox.get(&imsi) {
                Some(n) if n.ack.is_some() => break n,
                Some(_) => {}
                None => {
                    return Err(Stop::Fail(9, "the discard notice is missing".into()));
                }
            }
            self.clone().deliver_notices();
            // Woken by the delivery; looked at again now and then in any case.
            let _ = tokio::time::timeout(Duration::from_secs(5), changed.changed()).await;
        };
        let ack = n.ack.unwrap_or_default();
        if !run.done(9) {
            run.record(
                9,
                true,
                format!(
                    "notice delivered to {} after {} failed tries",
                    n.sho_id, n.attempts
                ),
            );
            run.record(
                10,
                true,
                format!("signed acknowledgment verified (at {})", n.acknowledged_at),
            );
        }
        let url = self.net(11)?.ro_url.clone();
        DpfServiceClient::new(self.channel(&url, Role::Ro, 11)?)
            .relay_discard_ack(ro::RelayDiscardAckRequest {
                registration_id: registration.id.clone(),
                discard_ack: ack,
            })
            .await
            .map_err(stop(11))?;
        run.record(11, true, "the new SHO knows the old credentials are gone");
        apply(run, 11, Event::AckRelayed)
    }

    /// Steps 12-14: install the kept package (a failure is tried again from it, never
    /// downloaded again), report; the new SHO registers at the DRF before the report returns.
    async fn install_kept(&self, run: &mut Run) -> Result<(), Stop> {
        let (registration, attempts) = match &run.state {
            RunState::Relayed {
                registration,
                attempts,
            } => (registration.clone(), *attempts),
            _ => return Ok(()),
        };
        let dual = matches!(run.flow, Flow::Dual { .. });
        // 5.1.3.7.4.2 steps 12-14; with both MCIMs present, 8-10.
        let (installed, reported, registered) = if dual { (8, 9, 10) } else { (12, 13, 14) };
        let file = self.kept_package(&registration);
        let package = read_optional(&file)
            .map_err(|e| Stop::Fail(installed, format!("{}: {e}", file.display())))?
            .ok_or_else(|| Stop::Fail(installed, "the kept package is missing".into()))?;
        let url = self.net(installed)?.ro_url.clone();
        let mut dpf = DpfServiceClient::new(self.channel(&url, Role::Ro, installed)?);
        let (status, detail, mcim_id) = match self.install_as(&registration, &package, !dual).await
        {
            Ok(id) => (common::ProvisioningStatus::Installed, String::new(), id),
            Err(why) if attempts + 1 < INSTALL_ATTEMPTS => {
                tracing::warn!(
                    attempt = attempts + 1,
                    "install from the kept package failed: {why}"
                );
                apply(run, installed, Event::InstallFailed)?;
                return Err(Stop::Retry(format!("step {installed}: {why}"), None));
            }
            Err(why) => (common::ProvisioningStatus::Failed, why, String::new()),
        };
        dpf.report_provisioning_status(ro::ReportProvisioningStatusRequest {
            registration_id: registration.id.clone(),
            status: status as i32,
            detail: detail.clone(),
            mcim_id: mcim_id.clone(),
        })
        .await
        .map_err(stop(reported))?;
        if status == common::ProvisioningStatus::Failed {
            return Err(Stop::Fail(
                installed,
                format!("{detail} (tried {INSTALL_ATTEMPTS} times from the kept package)"),
            ));
        }
        run.record(
            installed,
            true,
            if dual {
                format!("MCIM {mcim_id} installed and activated; the owner chooses which connects")
            } else {
                format!("MCIM {mcim_id} installed and activated")
            },
        );
        run.record(reported, true, "the new SHO knows");
        run.record(registered, true, "the DRF routes the device to the new SHO");
        apply(run, installed, Event::Installed { mcim_id })?;
        let _ = std::fs::remove_file(&file);
        Ok(())
    }

    /// Delivers the outbox's notices until each is acknowledged (one task at a time; started
    /// again by whoever adds a notice or waits for one).
    fn deliver_notices(self: Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.delivering.swap(true, Ordering::SeqCst) {
            return;
        }
        tokio::spawn(async move {
            let mut next: std::collections::HashMap<String, tokio::time::Instant> =
                Default::default();
            loop {
                let pending = self.outbox.deliverable();
                if pending.is_empty() {
                    self.delivering.store(false, Ordering::SeqCst);
                    // A notice put in between would wait for the next caller: look again.
                    if self.outbox.deliverable().is_empty()
                        || self.delivering.swap(true, Ordering::SeqCst)
                    {
                        return;
                    }
                    continue;
                }
                let now = tokio::time::Instant::now();
                for n in pending {
                    if next.get(&n.imsi).is_some_and(|t| *t > now) {
                        continue;
                    }
                    let outcome = self.deliver_one(&n).await;
                    let recorded = match outcome {
                        Ok(ack) => {
                            tracing::info!(imsi = %n.imsi, sho = %n.sho_id, "the old SHO acknowledged the discard");
                            self.outbox.record(&n.imsi, Some(ack))
                        }
                        Err(why) => {
                            let wait = outbox::backoff(n.attempts);
                            tracing::warn!(imsi = %n.imsi, sho = %n.sho_id, "discard notice not acknowledged ({why}); again in {wait:?}");
                            next.insert(n.imsi.clone(), tokio::time::Instant::now() + wait);
                            self.outbox.record(&n.imsi, None)
                        }
                    };
                    if let Err(e) = recorded {
                        tracing::error!("discard outbox: {e}");
                    }
                }
                let soonest = next.values().min().copied();
                match soonest {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
    }

    /// One delivery (step 9) and the check of the answer (step 10): the old SHO's signature
    /// under the SHO CA, for this very notice. Returns the acknowledgment and when it was made.
    async fn deliver_one(&self, n: &outbox::Notice) -> Result<(Vec<u8>, u64), String> {
        // The old SHO itself, by the identity its certificate names: not merely "an SHO" (a
        // malicious RO naming another SHO's address would otherwise learn it the notice).
        let chan = self
            .party_channel(&n.sho_url, Role::Sho, &n.sho_id, 9)
            .map_err(Stop::reason)?;
        let r = ShoServiceClient::new(chan)
            .notify_discard(sho::NotifyDiscardRequest {
                imsi: n.imsi.clone(),
                discard_statement: n.notice.clone(),
                signature: n.signature.clone(),
                device_certificate: n.chain.clone(),
            })
            .await
            .map_err(|s| format!("{}: {}", s.code(), s.message()))?
            .into_inner();
        let key = self.sho_key(&r.discard_ack, &n.sho_id)?;
        let a: mcim_pki::discard::Ack =
            mcim_core::signed::open(&r.discard_ack, &key).map_err(|e| e.to_string())?;
        if a.kind != mcim_pki::discard::ACK_KIND
            || a.imsi != n.imsi
            || a.sho != n.sho_id
            || a.notice_sha256 != mcim_pki::discard::notice_digest(&n.notice)
        {
            return Err("the acknowledgment is not for this notice".into());
        }
        Ok((r.discard_ack, a.acknowledged_at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With per-role CAs, each role's server is trusted under its own CA only (never the
    /// bundle, so another operator's CA cannot stand in for it), and package signers under the
    /// SHO's; without them, under the bundle.
    #[test]
    fn each_roles_server_is_trusted_under_its_own_ca() {
        let dir = tempfile::tempdir().unwrap();
        mcim_pki::dev::init(dir.path(), &mcim_pki::dev::LAB_PARTIES).unwrap();
        let file = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
        let ca = dir.path().join("ca.pem");
        let net = Network::load(&ca, None, Some(dir.path()), "https://x".into(), None).unwrap();
        for role in [Role::Ro, Role::Vno, Role::Pva, Role::Sho] {
            assert_eq!(
                net.server_ca(role),
                &file(&format!("ca-{}.pem", role.as_str()))[..],
                "{role}"
            );
        }
        assert_eq!(net.sho_ca_pem, file("ca-sho.pem"));
        assert_ne!(net.server_ca(Role::Ro), &file("ca.pem")[..]);
        let plain = Network::load(&ca, None, None, "https://x".into(), None).unwrap();
        assert_eq!(plain.server_ca(Role::Ro), &file("ca.pem")[..]);
        assert_eq!(plain.sho_ca_pem, file("ca.pem"));
    }
}
