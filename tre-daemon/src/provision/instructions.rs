//! Remote instructions on the device (TR 33.812 5.1.1.3 remote management by authorised
//! stakeholders; 5.1.2.4): an SHO's signed instruction about its own MCIM arrives on the task
//! stream the device keeps open at the RO's DPF (between runs through [`Provisioner::listen`],
//! during a run through the run's own stream), is verified against the trust roots `tred`
//! holds, executed through the device façade (so the registry's lifecycle rules and lockdown
//! apply as to any caller), and reported, signed in the TRE.
//!
//! What the device accepts: a COSE_Sign1 whose certificate the SHO CA issued (the RO's own
//! key, or anyone else's, is refused), naming the signer as the SHO, this device's PCID, an
//! MCIM this very SHO issued (another SHO's IMSI gets the same answer as an absent one), and a
//! sequence number above the last one of that SHO (a replayed or reordered instruction is
//! refused). Anything refused changes nothing.
//!
//! The ledger (`instructions.json` in the state directory, replaced atomically) keeps, per
//! SHO, the last instruction taken, written *before* it is executed: a crash in between
//! executes it again on replay (every action is idempotent from its own outcome), and a replay
//! of one already reported answers the same report. It also keeps the reports the DPF has not
//! taken yet, and how far the listener has read the task stream.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mcim_core::lifecycle::{BlockReason, LifecycleOp, McimState};
use mcim_pki::Role;
use mcim_pki::instruction::{self as ins, Action, Instruction, Report};
use mcim_proto::mcim::ro::v1 as ro;
use mcim_proto::mcim::ro::v1::dpf_service_client::DpfServiceClient;
use serde::{Deserialize, Serialize};

use super::{Provisioner, Stop};
use crate::device::{DeviceError, McimView};
use crate::registry::RegistryError;
use crate::registry::files::{read_optional, write_atomic};

/// The last instruction taken from one SHO.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Taken {
    seq: u64,
    instruction_sha256: String,
    /// The signed report, once made (hex); absent while the instruction is being executed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    report: Option<String>,
}

/// A report the DPF has not taken yet.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Unsent {
    instruction_id: String,
    /// The report's bytes, hex.
    report: String,
    /// The TRE's signature over them, hex.
    signature: String,
}

/// The ledger's saved form.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    /// Per SHO (its identity), the last instruction taken.
    #[serde(default)]
    taken: BTreeMap<String, Taken>,
    /// Reports not yet taken by the DPF.
    #[serde(default)]
    unsent: Vec<Unsent>,
    /// The last task the listener handled (acknowledged when it next opens the stream).
    #[serde(default)]
    ack_seq: u64,
    /// The MCIM that provided connectivity when its SHO blocked it: chosen again when that
    /// SHO unblocks it, unless the owner chose another since (the owner's choice, 5.1.3.7.2,
    /// interrupted by the block, not overridden).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    blocked_connectivity: Option<String>,
}

/// The device's ledger of remote instructions.
#[derive(Debug)]
pub struct Ledger {
    file: PathBuf,
    saved: std::sync::Mutex<Saved>,
    /// One instruction or renewal at a time (the listener and a run may both see one).
    pub(super) one: tokio::sync::Mutex<()>,
}

impl Ledger {
    /// The ledger in `state_dir`.
    pub fn load(state_dir: &std::path::Path) -> Result<Self, String> {
        let file = state_dir.join("instructions.json");
        let saved = read_optional(&file)
            .map_err(|e| format!("{}: {e}", file.display()))?
            .map(|b| serde_json::from_slice::<Saved>(&b))
            .transpose()
            .map_err(|e| format!("{}: {e}", file.display()))?
            .unwrap_or_default();
        Ok(Self {
            file,
            saved: std::sync::Mutex::new(saved),
            one: tokio::sync::Mutex::new(()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Saved> {
        self.saved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes the ledger and saves it; nothing changes when it cannot be saved.
    fn change<T>(&self, f: impl FnOnce(&mut Saved) -> T) -> Result<T, String> {
        let mut saved = self.lock();
        let mut next = saved.clone();
        let out = f(&mut next);
        let json = serde_json::to_vec_pretty(&next).map_err(|e| e.to_string())?;
        write_atomic(&self.file, &json).map_err(|e| format!("{}: {e}", self.file.display()))?;
        *saved = next;
        Ok(out)
    }

    fn ack_seq(&self) -> u64 {
        self.lock().ack_seq
    }

    fn unsent(&self) -> Vec<Unsent> {
        self.lock().unsent.clone()
    }
}

/// What became of one instruction.
struct Outcome {
    state: String,
    refused: Option<&'static str>,
}

impl Outcome {
    fn done(state: McimState) -> Self {
        Self {
            state: state_name(Some(state)),
            refused: None,
        }
    }

    fn refused(reason: &'static str, state: Option<McimState>) -> Self {
        Self {
            state: state_name(state),
            refused: Some(reason),
        }
    }
}

fn state_name(s: Option<McimState>) -> String {
    match s {
        Some(s) => format!("{s:?}").to_lowercase(),
        None => ins::UNKNOWN.into(),
    }
}

/// The most reports kept for the DPF at once.
const MAX_UNSENT: usize = 64;

/// How long the listener waits before it opens the stream again after a failure.
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Provisioner {
    /// Keeps the device's task stream open while no provisioning run is in progress, so an
    /// SHO's instruction reaches the device at any time (a run reads the same stream itself).
    pub(super) fn listen(self: Arc<Self>) {
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let mut runs = self.run.subscribe();
                // Not during a run: it reads the stream.
                if runs
                    .wait_for(|r| r.as_ref().is_none_or(|r| r.finished()))
                    .await
                    .is_err()
                {
                    return;
                }
                let outcome = self.listen_once(&mut runs).await;
                match outcome {
                    Ok(()) => failures = 0,
                    Err(why) => {
                        failures = failures.saturating_add(1);
                        let wait = super::outbox::backoff(failures).min(LISTEN_BACKOFF_MAX);
                        tracing::debug!("task stream between runs: {why}; again in {wait:?}");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        });
    }

    /// One opening of the stream, until it ends, fails, or a run starts.
    async fn listen_once(
        &self,
        runs: &mut tokio::sync::watch::Receiver<Option<super::Run>>,
    ) -> Result<(), String> {
        if self
            .device
            .certificates()
            .map_err(|e| e.to_string())?
            .is_none()
        {
            return Err("the device has no certificates yet".into());
        }
        self.send_reports().await;
        self.finish_renewal().await;
        let url = self.net(0).map_err(Stop::reason)?.ro_url.clone();
        let mut dpf = DpfServiceClient::new(self.channel(&url, Role::Ro, 0).map_err(Stop::reason)?);
        let mut stream = dpf
            .watch_device_tasks(ro::WatchDeviceTasksRequest {
                ack_seq: self.ledger.ack_seq(),
            })
            .await
            .map_err(|s| format!("{}: {}", s.code(), s.message()))?
            .into_inner();
        loop {
            tokio::select! {
                m = stream.message() => {
                    let task = match m {
                        Ok(Some(t)) => t,
                        Ok(None) => return Err("the task stream ended".into()),
                        Err(s) => return Err(format!("{}: {}", s.code(), s.message())),
                    };
                    match &task.task {
                        Some(ro::watch_device_tasks_response::Task::Instruction(t)) => {
                            // Not acknowledged when it could not be handled now (the registry
                            // in lockdown, the TRE busy): the DPF gives it again later.
                            if !self.instruction(t).await {
                                return Err(format!("instruction task {} not handled yet", task.seq));
                            }
                        }
                        Some(ro::watch_device_tasks_response::Task::Renewal(_)) => {
                            self.renewal_offered(true).await;
                        }
                        // A run's task outside its run: an earlier run's, done with.
                        _ => tracing::debug!(seq = task.seq, "a provisioning task outside a run; ignored"),
                    }
                    let seq = task.seq;
                    self.ledger
                        .change(|s| s.ack_seq = s.ack_seq.max(seq))
                        .map_err(|e| format!("instruction ledger: {e}"))?;
                }
                changed = runs.changed() => {
                    if changed.is_err() || runs.borrow().as_ref().is_some_and(|r| !r.finished()) {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Verifies, executes and reports one instruction (a refusal is reported too). Returns
    /// false when it could not be handled now (the registry or the TRE failed): the task must
    /// not be acknowledged, so that it comes again.
    pub(super) async fn instruction(&self, t: &ro::InstructionTask) -> bool {
        let _one = self.ledger.one.lock().await;
        let digest = ins::digest(&t.instruction);
        let pcid = match self.device.pcid().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("an instruction, and no PCID to check it against: {e}");
                return false;
            }
        };
        let (report, again) = match self.verify_instruction(&t.instruction) {
            Err(reason) => (
                self.report(&pcid, None, &digest, Outcome::refused(reason, None)),
                None,
            ),
            Ok(i) if i.pcid != pcid => (
                self.report(
                    &pcid,
                    Some(&i),
                    &digest,
                    Outcome::refused(ins::REFUSED_ANOTHER_DEVICE, None),
                ),
                None,
            ),
            Ok(i) => {
                let taken = self.ledger.lock().taken.get(&i.sho).cloned();
                match taken {
                    // The same instruction again, reported already: the same report.
                    Some(l) if l.seq == i.seq && l.instruction_sha256 == digest => {
                        match l.report.and_then(|r| hex::decode(r).ok()) {
                            Some(r) => (Report::parse(&r).ok(), Some(r)),
                            // Taken, not reported: a crash in between; done again below.
                            None => (self.execute(&pcid, &i, &digest).await, None),
                        }
                    }
                    Some(l) if i.seq <= l.seq => (
                        self.report(
                            &pcid,
                            Some(&i),
                            &digest,
                            Outcome::refused(ins::REFUSED_REPLAYED, None),
                        ),
                        None,
                    ),
                    _ if i.seq > ins::MAX_SEQ => (
                        self.report(
                            &pcid,
                            Some(&i),
                            &digest,
                            Outcome::refused(ins::REFUSED_SEQ_RANGE, None),
                        ),
                        None,
                    ),
                    _ => (self.execute(&pcid, &i, &digest).await, None),
                }
            }
        };
        let Some(report) = report else {
            return false;
        };
        let bytes = match again {
            Some(b) => b,
            None => match report.to_bytes() {
                Ok(b) => b,
                Err(e) => {
                    // report() keeps every field in the form: this is a bug, not the input.
                    tracing::error!("instruction report: {e}");
                    return false;
                }
            },
        };
        tracing::info!(sho = %report.sho, seq = report.seq, outcome = %report.outcome, reason = %report.reason, state = %report.state, "remote instruction");
        let (signature, _) = match self.device.tls_signed(bytes.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("the TRE did not sign the instruction report: {e}");
                return false;
            }
        };
        let id = t.instruction_id.clone();
        let keep = self.ledger.change(|s| {
            if (report.outcome == ins::DONE || report.reason == ins::REFUSED_LIFECYCLE)
                && let Some(l) = s.taken.get_mut(&report.sho)
                && l.instruction_sha256 == digest
            {
                l.report = Some(hex::encode(&bytes));
            }
            s.unsent.retain(|u| u.instruction_id != id);
            // Bounded: the oldest goes first (its SHO reads it as not reported).
            while s.unsent.len() >= MAX_UNSENT {
                s.unsent.remove(0);
            }
            s.unsent.push(Unsent {
                instruction_id: id.clone(),
                report: hex::encode(&bytes),
                signature: hex::encode(&signature),
            });
        });
        if let Err(e) = keep {
            tracing::error!("instruction ledger: {e}");
            return false;
        }
        self.send_reports().await;
        true
    }

    /// The instruction, when an SHO under the SHO CA signed it as itself; else why not.
    fn verify_instruction(&self, signed: &[u8]) -> Result<Instruction, &'static str> {
        let cert =
            mcim_core::signed::signer_certificate(signed).map_err(|_| ins::REFUSED_SIGNATURE)?;
        let named = mcim_pki::party::caller_from_cert(&cert).map_err(|_| ins::REFUSED_SIGNATURE)?;
        let key = self
            .sho_key(signed, &named.name)
            .map_err(|_| ins::REFUSED_SIGNATURE)?;
        let i: Instruction = mcim_core::signed::open(signed, &key).map_err(|e| match e {
            mcim_core::signed::SignedError::BadSignature => ins::REFUSED_SIGNATURE,
            _ => ins::REFUSED_MALFORMED,
        })?;
        if i.kind != ins::KIND || i.sho != named.name {
            return Err(ins::REFUSED_SIGNATURE);
        }
        Ok(i)
    }

    /// Takes `i` into the ledger, then carries it out on the SHO's own MCIM.
    async fn execute(&self, pcid: &str, i: &Instruction, digest: &str) -> Option<Report> {
        let held = match self.device.list().await {
            Ok(l) => l.into_iter().find(|m| m.id == i.imsi && m.sho == i.sho),
            Err(e) => {
                tracing::warn!("an instruction, and the registry unreadable: {e}");
                return None;
            }
        };
        let taken = self.ledger.lock().taken.get(&i.sho).cloned();
        let resumed = taken
            .as_ref()
            .is_some_and(|l| l.seq == i.seq && l.instruction_sha256 == digest);
        let Some(m) = held else {
            // Deleted before a crash kept its report: done.
            if resumed && i.action == Action::Delete {
                return self.report(pcid, Some(i), digest, Outcome::done(McimState::Deleted));
            }
            return self.report(
                pcid,
                Some(i),
                digest,
                Outcome::refused(ins::REFUSED_NOT_YOURS, None),
            );
        };
        // Taken before anything changes: the sequence number is spent even if we crash.
        if !resumed
            && let Err(e) = self.ledger.change(|s| {
                s.taken.insert(
                    i.sho.clone(),
                    Taken {
                        seq: i.seq,
                        instruction_sha256: digest.to_string(),
                        report: None,
                    },
                );
            })
        {
            tracing::error!("instruction ledger: {e}");
            return None;
        }
        let outcome = match self.act(&m, i.action).await {
            Ok(state) => Outcome::done(state),
            Err(DeviceError::Registry(RegistryError::Lifecycle(e))) => {
                tracing::info!("instruction refused by the lifecycle: {e}");
                Outcome::refused(ins::REFUSED_LIFECYCLE, Some(m.state))
            }
            Err(e) => {
                tracing::warn!("instruction not carried out: {e}");
                let now = self.device.get(&m.id).await.ok().map(|v| v.state);
                Outcome::refused(ins::REFUSED_DEVICE, now)
            }
        };
        self.report(pcid, Some(i), digest, outcome)
    }

    /// The action on MCIM `m`; idempotent (an MCIM already where the action leads is done).
    /// The SHO's block is `BySho`: the owner cannot lift it, and the SHO lifts only its own.
    /// Returns the state after it.
    async fn act(&self, m: &McimView, action: Action) -> Result<McimState, DeviceError> {
        let (id, state) = (m.id.as_str(), m.state);
        let d = &self.device;
        let end_session = async {
            if state == McimState::Selected {
                d.apply(id, LifecycleOp::EndSession).await?;
            }
            Ok::<(), DeviceError>(())
        };
        match (action, state) {
            (Action::Discover, s)
            | (Action::Block, s @ McimState::Blocked)
            | (Action::Unblock, s @ (McimState::Activated | McimState::Selected))
            | (Action::Retire, s @ McimState::Retired) => Ok(s),
            (Action::Block, _) => {
                let connects = d.status().await?.connectivity.as_deref() == Some(id);
                end_session.await?;
                if connects {
                    self.ledger
                        .change(|s| s.blocked_connectivity = Some(id.to_string()))
                        .map_err(DeviceError::NotReady)?;
                }
                d.apply(id, LifecycleOp::Block(BlockReason::BySho)).await?;
                Ok(McimState::Blocked)
            }
            (Action::Unblock, _) => {
                d.sho_unblock(id).await?;
                let held = self.ledger.lock().blocked_connectivity.clone();
                if held.as_deref() == Some(id) {
                    if d.status().await?.connectivity.is_none() {
                        d.set_connectivity(id).await?;
                    }
                    self.ledger
                        .change(|s| s.blocked_connectivity = None)
                        .map_err(DeviceError::NotReady)?;
                }
                Ok(McimState::Activated)
            }
            (Action::Retire, _) => {
                end_session.await?;
                d.apply(id, LifecycleOp::Retire).await?;
                Ok(McimState::Retired)
            }
            (Action::Delete, _) => {
                d.discard(id).await?;
                Ok(McimState::Deleted)
            }
        }
    }

    fn report(
        &self,
        pcid: &str,
        i: Option<&Instruction>,
        digest: &str,
        o: Outcome,
    ) -> Option<Report> {
        // A field the SHO signed may still not fit the report's line form.
        let field = |s: &str| {
            if s.is_empty() || s.contains('\n') || s.len() > 256 {
                ins::UNKNOWN.to_string()
            } else {
                s.to_string()
            }
        };
        Some(Report {
            pcid: pcid.to_string(),
            imsi: i.map_or_else(|| ins::UNKNOWN.into(), |i| field(&i.imsi)),
            sho: i.map_or_else(|| ins::UNKNOWN.into(), |i| field(&i.sho)),
            seq: i.map_or(0, |i| i.seq),
            instruction_sha256: digest.to_string(),
            outcome: if o.refused.is_some() {
                ins::REFUSED
            } else {
                ins::DONE
            }
            .into(),
            state: o.state,
            reason: o.refused.unwrap_or(ins::NO_REASON).into(),
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        })
    }

    /// Hands the DPF the reports it has not taken (a report for an instruction the DPF does
    /// not know is dropped: nobody asked for it there).
    async fn send_reports(&self) {
        let unsent = self.ledger.unsent();
        if unsent.is_empty() {
            return;
        }
        let Some(url) = self.net.as_ref().map(|n| n.ro_url.clone()) else {
            return;
        };
        let Ok(chan) = self.channel(&url, Role::Ro, 0) else {
            return;
        };
        let chain = match self.device.certificates() {
            Ok(Some(c)) => c.tls_certificate,
            _ => return,
        };
        let mut dpf = DpfServiceClient::new(chan);
        for u in unsent {
            let (Ok(report), Ok(signature)) = (hex::decode(&u.report), hex::decode(&u.signature))
            else {
                continue;
            };
            let sent = dpf
                .report_instruction(ro::ReportInstructionRequest {
                    instruction_id: u.instruction_id.clone(),
                    report,
                    signature,
                    device_certificate: chain.clone(),
                })
                .await;
            let gone = match sent {
                Ok(_) => true,
                // Refused for good (an instruction the DPF does not know, or not this
                // device's): nobody asked for this report there.
                Err(s)
                    if !matches!(
                        s.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::Unknown
                            | tonic::Code::Cancelled
                            | tonic::Code::ResourceExhausted
                            | tonic::Code::Aborted
                    ) =>
                {
                    tracing::info!(instruction = %u.instruction_id, "the DPF refused this report ({}); dropped", s.message());
                    true
                }
                Err(s) => {
                    tracing::debug!(instruction = %u.instruction_id, "instruction report not taken yet: {}", s.message());
                    false
                }
            };
            if gone
                && let Err(e) = self
                    .ledger
                    .change(|s| s.unsent.retain(|x| x.instruction_id != u.instruction_id))
            {
                tracing::error!("instruction ledger: {e}");
            }
        }
    }
}
