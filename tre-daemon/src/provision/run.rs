//! The provisioning run as data: one enum of states whose variants carry what they need
//! (TR 33.812 5.1.3.6.2 for 3GPP access, 5.1.3.6.3 for non-3GPP access), the events that move
//! it, and the one function that applies them ([`Run::apply`]). The diagram is in `flow.md`
//! beside this file.
//!
//! The run is saved after every step in a versioned form ([`SavedRun`]); a run saved by an
//! older `tred` (version 1, before the states carried their data) is read and converted, so a
//! device that is mid-provisioning when `tred` is upgraded resumes.

use serde::{Deserialize, Serialize};

/// How the device reaches the RO.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// 5.1.3.6.2: attach through a VNO with the PCID (steps 1-4), then steps 5-14.
    ThreeGpp,
    /// 5.1.3.6.3: direct IP to the DRF, no PCID AKA; steps 5-14.
    NonThreeGpp,
}

/// The RO's registration of the device at the SHO (step 7).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The RO's registration id.
    pub id: String,
    /// The SHO found at step 6.
    pub sho_id: String,
    /// The registration nonce the package must carry (annex x.2.3).
    #[serde(with = "hex_bytes")]
    pub nonce: Vec<u8>,
}

/// The MCIM a change of SHO leaves (5.1.3.7.4.2): the one that provided connectivity when
/// the owner instructed the change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OldMcim {
    /// Its registry id (its IMSI).
    pub id: String,
    /// The SHO it came from.
    pub sho_id: String,
}

/// Which of the seed's procedures the run follows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Flow {
    /// Initial provisioning, 5.1.3.6.2 (5.1.3.6.3 over non-3GPP access).
    #[default]
    Initial,
    /// Re-provisioning to a new SHO over the old SHO's connectivity, 5.1.3.7.4.2 steps 1-14.
    ChangeSho {
        /// The MCIM discarded at step 8.
        old: OldMcim,
        /// The SHO the subscriber moved the device to.
        new_sho: String,
    },
    /// A change of SHO by reverting to the pristine state, 5.1.3.7.4.3: the old MCIM is
    /// discarded first (step 3), then 5.1.3.6 runs with the PCID (step 4, numbered here as
    /// steps 4-17: 5.1.3.6.2's 1-14 plus 3).
    Pristine {
        /// The MCIM discarded at step 3.
        old: OldMcim,
        /// The SHO the subscriber moved the device to.
        new_sho: String,
    },
    /// The variant with both MCIMs present (end of 5.1.3.7.4.2; 5.1.3.7.2): as `ChangeSho` up
    /// to the download (steps 1-7), then the new MCIM is installed beside the old one, which
    /// stays (steps 8-10); the owner chooses which provides connectivity.
    Dual {
        /// The MCIM kept, whose connectivity the change uses.
        old: OldMcim,
        /// The SHO of the MCIM added.
        new_sho: String,
    },
}

impl Flow {
    /// Whether the run goes over the old MCIM's connectivity (5.1.3.7.4.2).
    pub fn over_old_connectivity(&self) -> bool {
        matches!(self, Flow::ChangeSho { .. } | Flow::Dual { .. })
    }

    /// The MCIM a change leaves and the SHO it changes to.
    pub fn change(&self) -> Option<(&OldMcim, &str)> {
        match self {
            Flow::Initial => None,
            Flow::ChangeSho { old, new_sho }
            | Flow::Pristine { old, new_sho }
            | Flow::Dual { old, new_sho } => Some((old, new_sho)),
        }
    }
}

/// How far 5.1.3.6.2's steps are shifted when a pristine revert (5.1.3.7.4.3 steps 1-3)
/// comes first.
pub const PRISTINE_OFFSET: u32 = 3;

/// Where the run stands. Each state carries what the next steps need.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RunState {
    /// 5.1.3.7.4.3 steps 1-3: the old SHO's MCIM leaves the TRE, its notice goes into the
    /// outbox; then the run is an initial provisioning.
    Reverting,
    /// Steps 1-4 (3GPP access): attach to the VNO with the PCID, AKA in the TRE.
    Attaching,
    /// Steps 5-7: connect to the DRF, which finds the SHO and registers the device there.
    Registering {
        /// The VNO's grant (step 4); none over non-3GPP access.
        grant: Option<String>,
    },
    /// Steps 8-14, driven by the RO's tasks on the device's own stream.
    AwaitingTasks {
        /// The VNO's grant, detached once the MCIM is installed.
        grant: Option<String>,
        /// The registration the tasks are for.
        registration: Registration,
        /// The last task acknowledged.
        ack_seq: u64,
    },
    /// A change of SHO, 5.1.3.7.4.2 step 7 done: the new package is downloaded whole and
    /// verified (kept in the state directory); nothing on the device has changed yet. The
    /// order to discard the old MCIM follows on the task stream.
    Downloaded {
        /// The registration at the new SHO.
        registration: Registration,
        /// The last task acknowledged.
        ack_seq: u64,
    },
    /// Step 8 done: the old SHO's MCIM is gone from the TRE; its discard notice is in the
    /// outbox until the old SHO's acknowledgment verifies (steps 9-10), which then goes to the
    /// DPF (step 11).
    Discarded {
        /// The registration at the new SHO.
        registration: Registration,
    },
    /// Step 11 done: the new SHO knows the old credentials are gone. Steps 12-14: install from
    /// the kept package (retried from it, never downloaded again), report.
    Relayed {
        /// The registration at the new SHO.
        registration: Registration,
        /// Installs tried so far.
        attempts: u32,
    },
    /// Finished: the MCIM is installed and the SHO knows (step 14).
    Provisioned {
        /// The registration.
        registration: Registration,
        /// The MCIM installed.
        mcim_id: String,
    },
    /// Stopped at a step.
    Failed {
        /// The step that failed.
        step: u32,
        /// Why.
        reason: String,
        /// The registration, when step 7 was reached.
        registration: Option<Registration>,
    },
}

/// What moves a run from one state to the next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Step 4: the VNO granted initial connectivity.
    Attached {
        /// The grant.
        grant: String,
    },
    /// Step 7: registered at the SHO.
    Registered(Registration),
    /// A task up to `seq` was handled.
    Acknowledged(u64),
    /// Steps 13-14: the MCIM is installed and reported.
    Installed {
        /// Its id.
        mcim_id: String,
    },
    /// A change of SHO, step 7: the new package is downloaded and verified.
    Downloaded,
    /// Step 8: the old MCIM is discarded in the TRE.
    Discarded,
    /// Steps 9-11: the old SHO's acknowledgment verified and relayed to the new SHO.
    AckRelayed,
    /// Step 12: an install from the kept package failed; it is tried again.
    InstallFailed,
    /// 5.1.3.7.4.3 step 3: the device is back in the pristine state.
    Reverted,
    /// The variant with both MCIMs present: the old MCIM stays; on to the install.
    KeptOld,
    /// A step failed for good.
    Failed {
        /// The step.
        step: u32,
        /// Why.
        reason: String,
    },
}

/// An event that does not apply in the run's state (a bug in the driver, never input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("provisioning: {event} does not apply in state {state}")]
pub struct InvalidTransition {
    /// The state's name.
    pub state: &'static str,
    /// The event's name.
    pub event: &'static str,
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

/// A provisioning run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// The run's id.
    pub id: String,
    /// The procedure (initial provisioning when absent: runs saved before changes of SHO).
    #[serde(default)]
    pub flow: Flow,
    /// The access it uses.
    pub access: Access,
    /// Where it stands.
    pub state: RunState,
    /// The steps so far, as reported to the owner.
    pub steps: Vec<StepRecord>,
}

/// The seed's steps of `flow`, numbered as in 5.1.3.6.2 or 5.1.3.7.4.2.
pub fn flow_step_name(flow: &Flow, step: u32) -> &'static str {
    match flow {
        Flow::Initial => step_name(step),
        Flow::ChangeSho { .. } => change_step_name(step),
        Flow::Dual { .. } => match step {
            8 => "the new MCIM is provisioned into the TRE beside the old one, kept apart",
            9 => change_step_name(13),
            10 => change_step_name(14),
            s => change_step_name(s),
        },
        Flow::Pristine { .. } => match step {
            1 => change_step_name(1),
            2 => change_step_name(2),
            3 => "the device removes the old SHO's MCIM: back to the pristine state",
            s => step_name(s.saturating_sub(PRISTINE_OFFSET)),
        },
    }
}

/// The steps of 5.1.3.7.4.2, re-provisioning using the old SHO's connectivity.
pub fn change_step_name(step: u32) -> &'static str {
    match step {
        1 => "the subscriber hands the device's parameters to the new SHO",
        2 => "the subscriber instructs the device to re-provision",
        3 => "the new SHO asks the PVA to validate the device",
        4 => "the PVA validates the device's integrity",
        5 => "the validation result reaches the new SHO",
        6 => "the new SHO sends its MCIM to the RO's DPF",
        7 => "the DPF sends the new MCIM over the old SHO's connectivity",
        8 => "the old SHO's credentials are discarded in the TRE",
        9 => "the device tells the old SHO it discarded them",
        10 => "the old SHO acknowledges",
        11 => "the DPF relays the acknowledgment to the new SHO (privacy-filtered)",
        12 => "the new MCIM is provisioned into the TRE",
        13 => "the DPF reports the status to the new SHO",
        14 => "the new SHO registers the device at the DRF",
        _ => "unknown step",
    }
}

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

impl RunState {
    /// The state's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            RunState::Reverting => "reverting",
            RunState::Attaching => "attaching",
            RunState::Registering { .. } => "registering",
            RunState::AwaitingTasks { .. } => "awaiting_tasks",
            RunState::Downloaded { .. } => "downloaded",
            RunState::Discarded { .. } => "discarded",
            RunState::Relayed { .. } => "relayed",
            RunState::Provisioned { .. } => "provisioned",
            RunState::Failed { .. } => "failed",
        }
    }

    /// The registration, from step 7 on.
    pub fn registration(&self) -> Option<&Registration> {
        match self {
            RunState::AwaitingTasks { registration, .. }
            | RunState::Downloaded { registration, .. }
            | RunState::Discarded { registration }
            | RunState::Relayed { registration, .. }
            | RunState::Provisioned { registration, .. } => Some(registration),
            RunState::Failed { registration, .. } => registration.as_ref(),
            RunState::Reverting | RunState::Attaching | RunState::Registering { .. } => None,
        }
    }

    /// The VNO's grant, while the run still holds it.
    pub fn grant(&self) -> Option<&str> {
        match self {
            RunState::Registering { grant } | RunState::AwaitingTasks { grant, .. } => {
                grant.as_deref()
            }
            _ => None,
        }
    }
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::Attached { .. } => "attached",
            Event::Registered(_) => "registered",
            Event::Acknowledged(_) => "acknowledged",
            Event::Installed { .. } => "installed",
            Event::Downloaded => "downloaded",
            Event::Discarded => "discarded",
            Event::AckRelayed => "ack_relayed",
            Event::InstallFailed => "install_failed",
            Event::Reverted => "reverted",
            Event::KeptOld => "kept_old",
            Event::Failed { .. } => "failed",
        }
    }
}

impl Run {
    /// A new run: attaching over 3GPP access, registering otherwise.
    pub fn new(id: String, access: Access) -> Self {
        Self::with_flow(id, access, Flow::Initial)
    }

    /// A new run of `flow` (a change of SHO attaches with the old MCIM over 3GPP access).
    pub fn with_flow(id: String, access: Access, flow: Flow) -> Self {
        let state = match (&flow, access) {
            (Flow::Pristine { .. }, _) => RunState::Reverting,
            (_, Access::ThreeGpp) => RunState::Attaching,
            (_, Access::NonThreeGpp) => RunState::Registering { grant: None },
        };
        Self {
            id,
            flow,
            access,
            state,
            steps: Vec::new(),
        }
    }

    /// The one place a run changes state.
    pub fn apply(&mut self, event: Event) -> Result<(), InvalidTransition> {
        let invalid = InvalidTransition {
            state: self.state.name(),
            event: event.name(),
        };
        let next = match (&self.state, event) {
            (RunState::Reverting, Event::Reverted) => match self.access {
                Access::ThreeGpp => RunState::Attaching,
                Access::NonThreeGpp => RunState::Registering { grant: None },
            },
            (RunState::Attaching, Event::Attached { grant }) => {
                RunState::Registering { grant: Some(grant) }
            }
            (RunState::Registering { grant }, Event::Registered(registration)) => {
                RunState::AwaitingTasks {
                    grant: grant.clone(),
                    registration,
                    ack_seq: 0,
                }
            }
            (
                RunState::AwaitingTasks {
                    grant,
                    registration,
                    ack_seq,
                },
                Event::Acknowledged(seq),
            ) => RunState::AwaitingTasks {
                grant: grant.clone(),
                registration: registration.clone(),
                ack_seq: (*ack_seq).max(seq),
            },
            (RunState::AwaitingTasks { registration, .. }, Event::Installed { mcim_id })
                if !self.flow.over_old_connectivity() =>
            {
                RunState::Provisioned {
                    registration: registration.clone(),
                    mcim_id,
                }
            }
            // 5.1.3.7.4.2: download (7), discard (8), notice and acknowledgment (9-11),
            // install from the kept package (12-14).
            (
                RunState::AwaitingTasks {
                    registration,
                    ack_seq,
                    ..
                },
                Event::Downloaded,
            ) if self.flow.over_old_connectivity() => RunState::Downloaded {
                registration: registration.clone(),
                ack_seq: *ack_seq,
            },
            (
                RunState::Downloaded {
                    registration,
                    ack_seq,
                },
                Event::Acknowledged(seq),
            ) => RunState::Downloaded {
                registration: registration.clone(),
                ack_seq: (*ack_seq).max(seq),
            },
            (RunState::Downloaded { registration, .. }, Event::Discarded) => RunState::Discarded {
                registration: registration.clone(),
            },
            (RunState::Downloaded { registration, .. }, Event::KeptOld)
                if matches!(self.flow, Flow::Dual { .. }) =>
            {
                RunState::Relayed {
                    registration: registration.clone(),
                    attempts: 0,
                }
            }
            (RunState::Discarded { registration }, Event::AckRelayed) => RunState::Relayed {
                registration: registration.clone(),
                attempts: 0,
            },
            (
                RunState::Relayed {
                    registration,
                    attempts,
                },
                Event::InstallFailed,
            ) => RunState::Relayed {
                registration: registration.clone(),
                attempts: attempts.saturating_add(1),
            },
            (RunState::Relayed { registration, .. }, Event::Installed { mcim_id }) => {
                RunState::Provisioned {
                    registration: registration.clone(),
                    mcim_id,
                }
            }
            (s, Event::Failed { step, reason }) if !self.finished() => RunState::Failed {
                step,
                reason,
                registration: s.registration().cloned(),
            },
            _ => return Err(invalid),
        };
        let was_finished = self.finished();
        self.state = next;
        if !was_finished && self.finished() {
            mcim_telemetry::metrics::count(
                "provisioning_runs",
                "provisioning runs that ended (initial, change of SHO, pristine), by outcome",
                self.state.name(),
            );
        }
        Ok(())
    }

    /// How far the steps the initial-provisioning driver numbers (5.1.3.6.2's) are shifted in
    /// this run: by [`PRISTINE_OFFSET`] once a pristine revert is done, else not.
    pub fn offset(&self) -> u32 {
        match (&self.flow, &self.state) {
            (Flow::Pristine { .. }, RunState::Reverting) => 0,
            (Flow::Pristine { .. }, _) => PRISTINE_OFFSET,
            _ => 0,
        }
    }

    /// Notes a step for the owner (and the log), numbered by the driver of the state the run
    /// is in (shifted by [`Run::offset`]).
    pub fn record(&mut self, step: u32, ok: bool, detail: impl Into<String>) {
        let step = step + self.offset();
        let detail = detail.into();
        let name = flow_step_name(&self.flow, step);
        if ok {
            tracing::info!(step, "provisioning: {name} ({detail})");
        } else {
            tracing::warn!(step, "provisioning failed: {name} ({detail})");
        }
        self.steps.push(StepRecord { step, ok, detail });
    }

    /// Whether `step` (numbered as in [`Run::record`]) has completed.
    pub fn done(&self, step: u32) -> bool {
        let step = step + self.offset();
        self.steps.iter().any(|s| s.step == step && s.ok)
    }

    /// Finished, one way or the other.
    pub fn finished(&self) -> bool {
        matches!(
            self.state,
            RunState::Provisioned { .. } | RunState::Failed { .. }
        )
    }

    /// The MCIM installed, once provisioned.
    pub fn mcim_id(&self) -> Option<&str> {
        match &self.state {
            RunState::Provisioned { mcim_id, .. } => Some(mcim_id),
            _ => None,
        }
    }
}

/// The current saved form's version.
pub const SAVED_VERSION: u32 = 2;

/// A run as saved in `provisioning.json`: `{"version": 2, "run": {...}}`.
#[derive(Debug, Serialize)]
pub struct SavedRun<'a> {
    /// [`SAVED_VERSION`].
    pub version: u32,
    /// The run.
    pub run: &'a Run,
}

/// Why a saved run cannot be read (`tred` refuses to start rather than lose it).
#[derive(Debug, thiserror::Error)]
pub enum SavedRunError {
    /// Not JSON of any known version.
    #[error("unreadable saved run: {0}")]
    Malformed(String),
    /// Written by a newer `tred`.
    #[error("saved run version {0} is newer than this tred understands ({SAVED_VERSION})")]
    TooNew(u64),
}

/// Serialises a run in the current saved form.
pub fn save(run: &Run) -> Result<Vec<u8>, SavedRunError> {
    serde_json::to_vec_pretty(&SavedRun {
        version: SAVED_VERSION,
        run,
    })
    .map_err(|e| SavedRunError::Malformed(e.to_string()))
}

/// Reads a saved run of any version this `tred` knows.
pub fn load(bytes: &[u8]) -> Result<Run, SavedRunError> {
    let bad = |e: serde_json::Error| SavedRunError::Malformed(e.to_string());
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(bad)?;
    match value.get("version").map(|v| v.as_u64()) {
        // Version 1 had no envelope.
        None => Ok(serde_json::from_value::<v1::Run>(value)
            .map_err(bad)?
            .into()),
        Some(Some(2)) => {
            #[derive(Deserialize)]
            struct Envelope {
                run: Run,
            }
            Ok(serde_json::from_value::<Envelope>(value).map_err(bad)?.run)
        }
        Some(Some(n)) if n > u64::from(SAVED_VERSION) => Err(SavedRunError::TooNew(n)),
        Some(_) => Err(SavedRunError::Malformed(
            "the version is not a known number".into(),
        )),
    }
}

/// The form `tred` saved before the typed states (a flat record whose empty strings meant
/// "not yet").
mod v1 {
    use serde::Deserialize;

    use super::{Access, Registration, RunState, StepRecord};

    #[derive(Clone, Copy, Debug, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Phase {
        Attach,
        Register,
        Tasks,
        Done,
        Failed,
    }

    #[derive(Debug, Deserialize)]
    pub struct Run {
        pub id: String,
        pub three_gpp: bool,
        pub phase: Phase,
        pub steps: Vec<StepRecord>,
        pub grant_id: String,
        pub registration_id: String,
        pub sho_id: String,
        pub nonce: String,
        pub ack_seq: u64,
        pub mcim_id: String,
    }

    fn some(s: String) -> Option<String> {
        (!s.is_empty()).then_some(s)
    }

    impl From<Run> for super::Run {
        fn from(r: Run) -> Self {
            let registration = (!r.registration_id.is_empty()).then(|| Registration {
                id: r.registration_id.clone(),
                sho_id: r.sho_id.clone(),
                // v1 wrote the nonce as hex; a nonce that does not decode fails the package
                // check at step 13 (the run then fails there, as v1 would have).
                nonce: hex::decode(&r.nonce).unwrap_or_default(),
            });
            let grant = some(r.grant_id);
            let state = match (r.phase, registration) {
                (Phase::Attach, _) => RunState::Attaching,
                (Phase::Register, _) => RunState::Registering { grant },
                (Phase::Tasks, Some(registration)) => RunState::AwaitingTasks {
                    grant,
                    registration,
                    ack_seq: r.ack_seq,
                },
                (Phase::Done, Some(registration)) => RunState::Provisioned {
                    registration,
                    mcim_id: r.mcim_id,
                },
                // A run in the task phase without its registration cannot go on: register
                // again (the DRF replaces the device's earlier registration).
                (Phase::Tasks, None) => RunState::Registering { grant },
                (Phase::Done, None) | (Phase::Failed, _) => {
                    let last = r.steps.iter().rev().find(|s| !s.ok);
                    RunState::Failed {
                        step: last.map_or(0, |s| s.step),
                        reason: last.map_or_else(
                            || "failed before this tred was upgraded".to_string(),
                            |s| s.detail.clone(),
                        ),
                        registration: None,
                    }
                }
            };
            super::Run {
                id: r.id,
                flow: super::Flow::Initial,
                access: if r.three_gpp {
                    Access::ThreeGpp
                } else {
                    Access::NonThreeGpp
                },
                state,
                steps: r.steps,
            }
        }
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run saved by tred before this version, mid-way (after step 7), as it wrote it.
    const V1_TASKS: &str = r#"{
  "id": "5c1d0e9a7b3f2a10",
  "three_gpp": true,
  "phase": "tasks",
  "steps": [
    {"step": 1, "ok": true, "detail": "PCID 001010000000001"},
    {"step": 2, "ok": true, "detail": "the VNO routed the PCID to its RO's ICF"},
    {"step": 3, "ok": true, "detail": "RES from the TRE matched the ICF's XRES"},
    {"step": 4, "ok": true, "detail": "grant g-1"},
    {"step": 5, "ok": true, "detail": "under the VNO's grant"},
    {"step": 6, "ok": true, "detail": "SHO sho.example"},
    {"step": 7, "ok": true, "detail": "registration r-1"}
  ],
  "grant_id": "g-1",
  "registration_id": "r-1",
  "sho_id": "sho.example",
  "nonce": "00112233445566778899aabbccddeeff",
  "ack_seq": 3,
  "mcim_id": ""
}"#;

    fn registration() -> Registration {
        Registration {
            id: "r-1".into(),
            sho_id: "sho.example".into(),
            nonce: hex::decode("00112233445566778899aabbccddeeff").unwrap_or_default(),
        }
    }

    #[test]
    fn a_version_1_run_mid_tasks_resumes_with_its_data() {
        let run = load(V1_TASKS.as_bytes()).expect("v1 reads");
        assert_eq!(run.id, "5c1d0e9a7b3f2a10");
        assert_eq!(run.access, Access::ThreeGpp);
        assert_eq!(
            run.state,
            RunState::AwaitingTasks {
                grant: Some("g-1".into()),
                registration: registration(),
                ack_seq: 3,
            }
        );
        assert_eq!(run.steps.len(), 7);
        assert!(!run.finished());
    }

    #[test]
    fn version_1_phases_map_to_their_states() {
        let with = |phase: &str, three_gpp: bool, grant: &str, reg: &str, mcim: &str| {
            let v = V1_TASKS
                .replace("\"tasks\"", &format!("\"{phase}\""))
                .replace(
                    "\"three_gpp\": true",
                    &format!("\"three_gpp\": {three_gpp}"),
                )
                .replace(
                    "\"grant_id\": \"g-1\"",
                    &format!("\"grant_id\": \"{grant}\""),
                )
                .replace(
                    "\"registration_id\": \"r-1\"",
                    &format!("\"registration_id\": \"{reg}\""),
                )
                .replace("\"mcim_id\": \"\"", &format!("\"mcim_id\": \"{mcim}\""));
            load(v.as_bytes()).expect("v1 reads").state
        };
        assert_eq!(with("attach", true, "", "", ""), RunState::Attaching);
        assert_eq!(
            with("register", false, "", "", ""),
            RunState::Registering { grant: None }
        );
        assert_eq!(
            with("register", true, "g-1", "", ""),
            RunState::Registering {
                grant: Some("g-1".into())
            }
        );
        assert_eq!(
            with("done", true, "g-1", "r-1", "001020000000001"),
            RunState::Provisioned {
                registration: registration(),
                mcim_id: "001020000000001".into()
            }
        );
        assert!(matches!(
            with("failed", true, "g-1", "r-1", ""),
            RunState::Failed { .. }
        ));
    }

    #[test]
    fn the_current_form_round_trips_and_is_versioned() {
        let mut run = Run::new("ab".into(), Access::NonThreeGpp);
        run.apply(Event::Registered(registration()))
            .expect("registers");
        run.apply(Event::Acknowledged(4)).expect("acks");
        let bytes = save(&run).expect("saves");
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(v["version"], 2);
        assert_eq!(v["run"]["state"]["state"], "awaiting_tasks");
        assert_eq!(load(&bytes).expect("loads"), run);
    }

    #[test]
    fn a_newer_or_broken_saved_run_is_refused() {
        assert!(matches!(
            load(br#"{"version": 3, "run": {}}"#),
            Err(SavedRunError::TooNew(3))
        ));
        assert!(matches!(
            load(b"not json"),
            Err(SavedRunError::Malformed(_))
        ));
        assert!(matches!(
            load(br#"{"version": "two"}"#),
            Err(SavedRunError::Malformed(_))
        ));
    }

    #[test]
    fn transitions_follow_the_flow_and_nothing_else() {
        let mut run = Run::new("a".into(), Access::ThreeGpp);
        assert!(run.apply(Event::Registered(registration())).is_err());
        assert_eq!(run.state, RunState::Attaching);
        run.apply(Event::Attached { grant: "g".into() })
            .expect("attaches");
        run.apply(Event::Registered(registration()))
            .expect("registers");
        run.apply(Event::Acknowledged(2)).expect("acks");
        run.apply(Event::Acknowledged(1)).expect("acks");
        assert!(matches!(
            run.state,
            RunState::AwaitingTasks { ack_seq: 2, .. }
        ));
        run.apply(Event::Installed {
            mcim_id: "m".into(),
        })
        .expect("installs");
        assert_eq!(run.mcim_id(), Some("m"));
        // Finished runs stay finished.
        let before = run.clone();
        assert!(
            run.apply(Event::Failed {
                step: 9,
                reason: "x".into()
            })
            .is_err()
        );
        assert_eq!(run, before);
    }

    #[test]
    fn a_failure_keeps_the_registration() {
        let mut run = Run::new("a".into(), Access::NonThreeGpp);
        run.apply(Event::Registered(registration()))
            .expect("registers");
        run.apply(Event::Failed {
            step: 10,
            reason: "refused".into(),
        })
        .expect("fails");
        assert_eq!(run.state.registration(), Some(&registration()));
        assert!(run.finished());
    }
}
