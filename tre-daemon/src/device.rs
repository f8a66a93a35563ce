//! The device façade: every operation `tred` offers on its TRE and MCIM registry, as typed
//! Rust calls (TR 33.812 5.1.2: the TRE's functions; 5.1.1.1: the MCIM lifecycle).
//!
//! The local gRPC API ([`crate::service`]) only converts protobuf to and from these types; the
//! provisioning run ([`crate::provision`]) calls them directly. Both hold the same [`Device`],
//! so both obey the same registry rules (lifecycle, PIN, lockdown). Every call runs on the one
//! thread that owns the TRE ([`crate::engine`]).
//!
//! ```text
//! service (protobuf <-> types) --\
//!                                 +--> Device --> EngineHandle --> Engine { Tre, Registry }
//! provision (the device's flows)-/
//! ```

use std::sync::Arc;

use mcim_core::aka::{Autn, Constants, DeviceResponse, Rand, SqnProfile};
use mcim_core::identity::{DeviceIdentity, Imsi};
use mcim_core::lifecycle::{BlockReason, LifecycleOp, McimState};
use mcim_core::package::McimPackagePayload;
use mcim_core::tpm::attest::{ClockInfo, TpmQuote, parse_quote};
use mcim_core::tpm::policy::PcrSelection;

use crate::certificates::{Certificates, DeviceCertificates};
use crate::engine::{Engine, EngineGone, EngineHandle, TreTime};
use crate::registry::audit::StoredEntry;
use crate::registry::record::{McimRecord, UsimRecord};
use crate::registry::{AuditVerdict, InstallRequest, RegistryError};
use crate::tre::{AkaExecution, Capabilities, DevicePublic, InitOutcome, TreError, WrappedSecrets};

/// Why a device operation did not happen. Nothing changed unless the registry's error says so.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The registry or the TRE refused (lifecycle, PIN, lockdown, the TRE's own refusal).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The TRE thread is not running (it failed or the daemon is stopping).
    #[error(transparent)]
    EngineGone(#[from] EngineGone),
    /// The request is malformed; nothing was done.
    #[error("{0}")]
    BadRequest(String),
    /// The device is not ready for this (no certificates yet, not configured).
    #[error("{0}")]
    NotReady(String),
    /// The supply-time certificates could not be read or written.
    #[error("device certificates: {0}")]
    Certificates(String),
}

impl From<TreError> for DeviceError {
    fn from(e: TreError) -> Self {
        DeviceError::Registry(e.into())
    }
}

/// An MCIM as the registry holds it, without its secrets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct McimView {
    /// The registry key (the operational IMSI; the PCID for the initial credential).
    pub id: String,
    /// The issuing SHO.
    pub sho: String,
    /// Where it is in its lifecycle (5.1.1.1).
    pub state: McimState,
    /// Why it is blocked, when it is.
    pub blocked: Option<BlockReason>,
    /// PIN tries left (0 when it has no PIN).
    pub pin_tries_left: u32,
    /// It has a PIN (and a PUK).
    pub has_pin: bool,
    /// It is the one the owner chose for connectivity.
    pub connectivity: bool,
    /// When it stops being valid (seconds since the epoch), if it has a lifetime.
    pub expires_at: Option<u64>,
    /// Its USIM data: the package's and the UE's updates.
    pub usim: UsimRecord,
}

impl McimView {
    fn of(r: &McimRecord, connectivity: Option<&str>) -> Self {
        Self {
            id: r.id.clone(),
            sho: r.sho.clone(),
            state: r.state,
            blocked: r.blocked,
            pin_tries_left: r.pin.as_ref().map_or(0, |p| u32::from(p.pin_tries_left)),
            has_pin: r.pin.is_some(),
            connectivity: connectivity == Some(r.id.as_str()),
            expires_at: r.expires_at,
            usim: r.usim.clone(),
        }
    }
}

/// The outcome of an install.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Installed {
    /// Installed now.
    New(McimView),
    /// The registry already holds this IMSI from this very SHO (a resumed install); nothing
    /// changed. An MCIM with the same IMSI from another SHO is a refusal instead.
    AlreadyFromSho(McimView),
}

/// What `tred` reports about itself (always answers, even in lockdown).
#[derive(Clone, Debug)]
pub struct DeviceStatus {
    /// What the TRE can do.
    pub capabilities: Capabilities,
    /// The identity, once supplied.
    pub identity: Option<DeviceIdentity>,
    /// Why the TRE is in lockdown, if it is.
    pub lockdown: Option<String>,
    /// The MCIM chosen for connectivity.
    pub connectivity: Option<String>,
    /// The rollback counter (0 before supply).
    pub rehabilitation_counter: u64,
    /// What the start-up check found.
    pub startup_findings: Vec<String>,
    /// The TRE thread's time so far.
    pub tre_time: TreTime,
    /// TPM commands sent so far (0 for a token).
    pub tpm_commands: u64,
}

/// What the owner hands to an SHO (5.1.3.5.2): identity, TRE, storage key, credential.
#[derive(Clone, Debug)]
pub struct DeviceParameters {
    /// The identity.
    pub identity: DeviceIdentity,
    /// What the TRE can do.
    pub capabilities: Capabilities,
    /// The storage key the SHO wraps to.
    pub storage_public: Vec<u8>,
    /// The platform credential (AK chain to the supplier root).
    pub platform_credential: Vec<Vec<u8>>,
}

/// Integrity evidence for the PVA (5.1.3.6.2 step 9).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EvidenceKind {
    /// A TPM quote by the restricted attestation key.
    TpmQuote(TpmQuote),
    /// A token's signature over the nonce and the daemon's measurement
    /// (`mcim_core::token_evidence`).
    TokenSignature {
        /// The signed payload.
        payload: Vec<u8>,
        /// ECDSA P-256, r || s.
        signature: Vec<u8>,
    },
}

/// Evidence with what goes with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evidence {
    /// The evidence.
    pub kind: EvidenceKind,
    /// How the device runs AKA.
    pub aka_execution: AkaExecution,
    /// The platform credential.
    pub platform_credential: Vec<Vec<u8>>,
    /// The TPM's clock at the quote (none for a token).
    pub clock: Option<ClockInfo>,
}

/// Proof of ownership (`mcim_pki::ownership`): the statement, its signature by the TRE's TLS
/// key (DER), and that key's certificate chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnershipProof {
    /// The statement.
    pub payload: Vec<u8>,
    /// ECDSA P-256 over SHA-256(payload), DER.
    pub signature: Vec<u8>,
    /// The TLS key's chain, DER, leaf first.
    pub tls_certificate: Vec<Vec<u8>>,
}

/// Which credential answers a challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// An installed MCIM, by id.
    Mcim(String),
    /// The initial connectivity credential (5.1.3.3.2.1): the MCIM installed at supply time
    /// under the PCID, selected for this one AKA only.
    Initial,
}

/// A new MCIM's data, as the local API or a package gives it.
#[derive(Debug)]
pub struct NewMcim {
    /// The operational IMSI.
    pub imsi: Imsi,
    /// The issuing SHO.
    pub sho: String,
    /// K and OPc wrapped for this TRE.
    pub wrapped: WrappedSecrets,
    /// MILENAGE constants.
    pub constants: Constants,
    /// PIN and PUK, when the MCIM has them.
    pub pin: Option<(String, String)>,
    /// When it stops being valid (the PCID's initial credential), if it has a lifetime.
    pub expires_at: Option<u64>,
    /// The USIM's data (the package's data part).
    pub usim: UsimRecord,
}

impl NewMcim {
    /// The MCIM a verified package carries (5.1.3.6.2 step 13).
    pub fn from_package(p: &McimPackagePayload) -> Result<Self, DeviceError> {
        let hexd = |what: &str, s: &str| {
            hex::decode(s).map_err(|e| DeviceError::BadRequest(format!("package {what}: {e}")))
        };
        let constants = p
            .constants()
            .map_err(|e| DeviceError::BadRequest(e.to_string()))?;
        Ok(Self {
            imsi: Imsi::new(p.imsi.clone()).map_err(|e| DeviceError::BadRequest(e.to_string()))?,
            sho: p.sho_id.clone(),
            wrapped: WrappedSecrets {
                k: hexd("wrapped_k", &p.wrapped_k)?,
                opc: hexd("wrapped_opc", &p.wrapped_opc)?,
            },
            constants,
            pin: None,
            expires_at: None,
            usim: usim_of(p)?,
        })
    }
}

/// The USIM data a package's data part gives (TS 31.102): the MNC's length from the home
/// PLMN, which the IMSI must begin with; the name, forbidden PLMNs and search period as given.
fn usim_of(p: &McimPackagePayload) -> Result<UsimRecord, DeviceError> {
    let bad = |e: String| DeviceError::BadRequest(format!("package usim: {e}"));
    let u = &p.usim;
    let mnc_len = match crate::registry::record::plmn(&u.home_plmn) {
        Some((mcc, mnc)) if p.imsi.starts_with(&format!("{mcc}{mnc}")) => {
            u8::try_from(mnc.len()).ok()
        }
        Some(_) => {
            return Err(bad(format!(
                "the IMSI does not begin with the home PLMN {:?}",
                u.home_plmn
            )));
        }
        None => return Err(bad(format!("home PLMN {:?} is not MCC-MNC", u.home_plmn))),
    };
    let usim = UsimRecord {
        mnc_len,
        spn: u.service_provider_name.clone(),
        forbidden_plmns: u.forbidden_plmns.clone(),
        hpplmn_period: u.hpplmn_period,
        ue_files: Default::default(),
    };
    usim.check().map_err(bad)?;
    Ok(usim)
}

/// A 16-octet block, or a refusal naming `what`.
pub fn block16(what: &str, b: &[u8]) -> Result<[u8; 16], DeviceError> {
    b.try_into()
        .map_err(|_| DeviceError::BadRequest(format!("{what} must be 16 octets, got {}", b.len())))
}

/// MILENAGE's constants from their wire form: all five c and r values, or none for the
/// TS 35.206 defaults.
pub fn constants(c: &[Vec<u8>], r: &[u32]) -> Result<Constants, DeviceError> {
    match (c.len(), r.len()) {
        (0, 0) => Ok(Constants::default()),
        (5, 5) => {
            let mut blocks = [[0u8; 16]; 5];
            for (out, v) in blocks.iter_mut().zip(c) {
                *out = block16("a MILENAGE constant", v)?;
            }
            let mut rs = [0u32; 5];
            rs.copy_from_slice(r);
            Constants::new(blocks, rs).map_err(|e| DeviceError::BadRequest(e.to_string()))
        }
        _ => Err(DeviceError::BadRequest(
            "give all five MILENAGE c and r values, or none".into(),
        )),
    }
}

/// What a TRE without quotes signs as the daemon's state (SHA-256 of its executable and
/// configuration), computed by the daemon.
pub type Measurement = Arc<dyn Fn() -> [u8; 32] + Send + Sync>;

/// The device: its TRE, registry and supply-time certificates. Cheap to clone.
#[derive(Clone)]
pub struct Device {
    engine: EngineHandle,
    quote_pcrs: Vec<u8>,
    rehabilitation_key: Option<p256::ecdsa::VerifyingKey>,
    measurement: Measurement,
    certs: Certificates,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("quote_pcrs", &self.quote_pcrs)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// The device over the TRE thread `engine`; `quote_pcrs` is the default PCR set for
    /// [`Device::attest`]; `rehabilitation_key` the supplier's key that may lift a lockdown;
    /// `certs` where the supplier's certificates are kept.
    pub fn new(
        engine: EngineHandle,
        quote_pcrs: Vec<u8>,
        rehabilitation_key: Option<p256::ecdsa::VerifyingKey>,
        measurement: Measurement,
        certs: Certificates,
    ) -> Self {
        Self {
            engine,
            quote_pcrs,
            rehabilitation_key,
            measurement,
            certs,
        }
    }

    /// The TRE thread (for the TLS signer and timing).
    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Engine) -> Result<R, RegistryError> + Send + 'static,
    ) -> Result<R, DeviceError> {
        Ok(self.engine.call(f).await??)
    }

    /// The supplier's certificates, once installed.
    pub fn certificates(&self) -> Result<Option<DeviceCertificates>, DeviceError> {
        self.certs.load().map_err(DeviceError::Certificates)
    }

    fn platform_credential(&self) -> Vec<Vec<u8>> {
        self.certs
            .load()
            .ok()
            .flatten()
            .map(|c| c.platform_credential)
            .unwrap_or_default()
    }

    /// Status (5.1.2.2); answers in lockdown too.
    pub async fn status(&self) -> Result<DeviceStatus, DeviceError> {
        let tre_time = self.engine.tre_time();
        self.run(move |e| {
            let capabilities = e.tre()?.capabilities().clone();
            let identity = e.tre()?.identity()?;
            let (lockdown, connectivity, startup_findings) = match e.registry() {
                Ok(r) => {
                    let st = r.status();
                    (
                        st.lockdown,
                        r.connectivity().map(str::to_string),
                        st.startup,
                    )
                }
                Err(_) => (None, None, Vec::new()),
            };
            let rehabilitation_counter = if identity.is_some() {
                e.tre()?.rollback_counter().unwrap_or(0)
            } else {
                0
            };
            Ok(DeviceStatus {
                capabilities,
                identity,
                lockdown,
                connectivity,
                rehabilitation_counter,
                startup_findings,
                tre_time,
                tpm_commands: e.tre()?.command_count().unwrap_or(0),
            })
        })
        .await
    }

    /// The device's PCID, once supplied.
    pub async fn pcid(&self) -> Result<String, DeviceError> {
        self.run(|e| {
            Ok(e.tre()?
                .identity()?
                .ok_or(TreError::NotInitialised)?
                .pcid
                .as_str()
                .to_string())
        })
        .await
    }

    /// The parameters the owner hands to an SHO (5.1.3.5.2).
    pub async fn parameters(&self) -> Result<DeviceParameters, DeviceError> {
        let platform_credential = self.platform_credential();
        if platform_credential.is_empty() {
            return Err(DeviceError::NotReady(
                "the device has no platform credential yet (InstallCertificates at supply time)"
                    .into(),
            ));
        }
        self.run(move |e| {
            let tre = e.tre()?;
            let capabilities = tre.capabilities().clone();
            let identity = tre.identity()?.ok_or(TreError::NotInitialised)?;
            let DevicePublic { storage_public, .. } = tre.device_public()?;
            Ok(DeviceParameters {
                identity,
                capabilities,
                storage_public,
                platform_credential,
            })
        })
        .await
    }

    /// Proof of ownership for the contract of this device by `subscriber` at `sho` (annex
    /// x.2.3): the statement of `mcim_pki::ownership`, signed in the TRE with the device's TLS
    /// key, and that key's certificate chain. The local API gives it to owners only.
    pub async fn prove_ownership(
        &self,
        subscriber: String,
        sho: String,
    ) -> Result<OwnershipProof, DeviceError> {
        let chain = self
            .certificates()?
            .ok_or_else(|| {
                DeviceError::NotReady(
                    "the device has no certificates yet (InstallCertificates at supply time)"
                        .into(),
                )
            })?
            .tls_certificate;
        let pcid = self.pcid().await?;
        let mut nonce = [0u8; 16];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut nonce);
        let issued_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let payload = mcim_pki::ownership::Statement {
            pcid,
            subscriber,
            sho,
            nonce: hex::encode(nonce),
            issued_at,
        }
        .to_bytes()
        .map_err(|e| DeviceError::BadRequest(e.to_string()))?;
        let signed = payload.clone();
        let signature = self.run(move |e| Ok(e.tre()?.tls_sign(&signed)?)).await?;
        Ok(OwnershipProof {
            payload,
            signature,
            tls_certificate: chain,
        })
    }

    /// Discards an MCIM for good (5.1.3.7.4.2 step 8; 5.1.3.7.4.3 step 3): its session ends,
    /// it is retired (its secrets leave the registry and the TRE: a token's objects are
    /// destroyed) and deleted, each step one committed transition. Repeating it after a crash
    /// finishes what is left; an MCIM already gone is `Ok(false)`.
    pub async fn discard(&self, id: &str) -> Result<bool, DeviceError> {
        let id = id.to_string();
        self.run(move |e| {
            let r = e.registry()?;
            let Some(state) = r.list()?.into_iter().find(|m| m.id == id).map(|m| m.state) else {
                return Ok(false);
            };
            if state == McimState::Selected {
                r.apply(&id, LifecycleOp::EndSession)?;
            }
            if matches!(
                state,
                McimState::Installed
                    | McimState::Activated
                    | McimState::Blocked
                    | McimState::Selected
            ) {
                r.apply(&id, LifecycleOp::Retire)?;
            }
            r.apply(&id, LifecycleOp::Delete)?;
            Ok(true)
        })
        .await
    }

    /// The notice that this device discarded the MCIM `imsi` of `sho`
    /// (`mcim_pki::discard`), signed in the TRE with the device's TLS key: (notice,
    /// signature, certificate chain).
    pub async fn discard_notice(
        &self,
        imsi: String,
        sho: String,
    ) -> Result<(Vec<u8>, Vec<u8>, Vec<Vec<u8>>), DeviceError> {
        let mut nonce = [0u8; 16];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut nonce);
        let notice = mcim_pki::discard::Notice {
            pcid: self.pcid().await?,
            imsi,
            sho,
            nonce: hex::encode(nonce),
            discarded_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
        .to_bytes()
        .map_err(|e| DeviceError::BadRequest(e.to_string()))?;
        let (signature, chain) = self.tls_signed(notice.clone()).await?;
        Ok((notice, signature, chain))
    }

    /// A statement the device makes (`mcim_pki`'s line form: a discard notice, an
    /// instruction report), signed in the TRE with its TLS key: (signature, certificate chain).
    pub async fn tls_signed(
        &self,
        statement: Vec<u8>,
    ) -> Result<(Vec<u8>, Vec<Vec<u8>>), DeviceError> {
        let chain = self
            .certificates()?
            .ok_or_else(|| DeviceError::NotReady("the device has no certificates".into()))?
            .tls_certificate;
        let signature = self
            .run(move |e| Ok(e.tre()?.tls_sign(&statement)?))
            .await?;
        Ok((signature, chain))
    }

    /// Keeps the supplier's certificates; the TLS chain's leaf must certify the TRE's own TLS
    /// key.
    pub async fn install_certificates(&self, c: DeviceCertificates) -> Result<(), DeviceError> {
        let leaf =
            c.tls_certificate.first().cloned().ok_or_else(|| {
                DeviceError::BadRequest("the TLS certificate chain is empty".into())
            })?;
        let spki = self
            .run(|e| Ok(e.tre()?.device_public()?.tls_public_spki))
            .await?;
        if !crate::certificates::certifies(&leaf, &spki) {
            return Err(DeviceError::BadRequest(
                "the TLS certificate is not for this TRE's TLS key".into(),
            ));
        }
        self.certs.store(&c).map_err(DeviceError::BadRequest)
    }

    /// Supply-time initialisation: keys and identity in the TRE.
    pub async fn init(&self, identity: DeviceIdentity) -> Result<InitOutcome, DeviceError> {
        self.run(move |e| e.init_device(&identity)).await
    }

    /// Every MCIM in the registry.
    pub async fn list(&self) -> Result<Vec<McimView>, DeviceError> {
        self.run(|e| {
            let r = e.registry()?;
            let c = r.connectivity().map(str::to_string);
            Ok(r.list()?
                .into_iter()
                .map(|m| McimView::of(m, c.as_deref()))
                .collect())
        })
        .await
    }

    /// One MCIM.
    pub async fn get(&self, id: &str) -> Result<McimView, DeviceError> {
        let id = id.to_string();
        self.run(move |e| view(e, &id)).await
    }

    /// Installs an MCIM (5.1.3.6.2 step 13). The same IMSI from the same SHO again is
    /// [`Installed::AlreadyFromSho`] and changes nothing.
    pub async fn install(&self, m: NewMcim) -> Result<Installed, DeviceError> {
        let id = m.imsi.as_str().to_string();
        let sho = m.sho.clone();
        let req = InstallRequest {
            imsi: m.imsi,
            sho: m.sho,
            wrapped: m.wrapped,
            constants: m.constants,
            sqn_profile: SqnProfile::default(),
            pin: m.pin,
            expires_at: m.expires_at,
            usim: m.usim,
        };
        self.run(move |e| {
            let reg = e.registry()?;
            match reg.install(req) {
                Ok(()) => Ok(Installed::New(view(e, &id)?)),
                Err(RegistryError::AlreadyInstalled(x)) => {
                    let held = view(e, &id)?;
                    if held.sho == sho {
                        Ok(Installed::AlreadyFromSho(held))
                    } else {
                        Err(RegistryError::AlreadyInstalled(x))
                    }
                }
                Err(other) => Err(other),
            }
        })
        .await
    }

    /// Unblocks an MCIM its SHO blocked, on that SHO's verified instruction (5.1.1.3).
    pub async fn sho_unblock(&self, id: &str) -> Result<McimView, DeviceError> {
        let id = id.to_string();
        self.run(move |e| {
            e.registry()?.sho_unblock(&id)?;
            view(e, &id)
        })
        .await
    }

    /// Renews the credential `id` in place with `wrapped` (5.1.3.7.4.3), lasting until
    /// `expires_at`.
    pub async fn renew(
        &self,
        id: &str,
        wrapped: WrappedSecrets,
        expires_at: Option<u64>,
    ) -> Result<McimView, DeviceError> {
        let id = id.to_string();
        self.run(move |e| {
            e.registry()?.renew(&id, &wrapped, expires_at)?;
            view(e, &id)
        })
        .await
    }

    /// A lifecycle step (5.1.1.1) on one MCIM; the MCIM after it (none after Delete).
    pub async fn apply(&self, id: &str, op: LifecycleOp) -> Result<Option<McimView>, DeviceError> {
        let id = id.to_string();
        self.run(move |e| {
            e.registry()?.apply(&id, op)?;
            if op == LifecycleOp::Delete {
                Ok(None)
            } else {
                view(e, &id).map(Some)
            }
        })
        .await
    }

    /// Opens a session with an MCIM (Activated -> Selected), with its PIN when it has one.
    pub async fn select(&self, id: &str, pin: Option<String>) -> Result<McimView, DeviceError> {
        let id = id.to_string();
        self.run(move |e| {
            e.registry()?.select(&id, pin.as_deref())?;
            view(e, &id)
        })
        .await
    }

    /// Chooses the MCIM that provides connectivity.
    pub async fn set_connectivity(&self, id: &str) -> Result<McimView, DeviceError> {
        let id = id.to_string();
        self.run(move |e| {
            e.registry()?.set_connectivity(&id)?;
            view(e, &id)
        })
        .await
    }

    /// The USIM side of AKA (TS 33.102 6.3.3) inside the TRE.
    pub async fn authenticate(
        &self,
        credential: Credential,
        rand: Rand,
        autn: Autn,
    ) -> Result<DeviceResponse, DeviceError> {
        let answered = self
            .run(move |e| match credential {
                Credential::Mcim(id) => e.registry()?.authenticate(&id, &rand, &autn),
                Credential::Initial => {
                    let pcid = e.tre()?.identity()?.ok_or(TreError::NotInitialised)?.pcid;
                    let id = pcid.as_str().to_string();
                    let r = e.registry()?;
                    r.get(&id).map_err(|_| {
                        RegistryError::BadRequest(
                            "no initial connectivity credential is installed for the PCID".into(),
                        )
                    })?;
                    r.select(&id, None)?;
                    let answered = r.authenticate(&id, &rand, &autn);
                    r.apply(&id, LifecycleOp::EndSession)?;
                    answered
                }
            })
            .await;
        mcim_telemetry::metrics::count(
            "aka_runs",
            "AKA runs in the TRE (tred's own and the USIM's), by outcome",
            match &answered {
                Ok(DeviceResponse::Success { .. }) => "success",
                Ok(DeviceResponse::SyncFailure { .. }) => "sync_failure",
                Err(DeviceError::Registry(RegistryError::Tre(TreError::MacFailure))) => {
                    "mac_failure"
                }
                Err(_) => "refused",
            },
        );
        answered
    }

    /// Keeps the UE's update of one of the MCIM's USIM files (`record::UE_PERSISTED`)
    /// across card sessions and restarts.
    pub async fn update_usim_file(
        &self,
        id: &str,
        fid: u16,
        body: Vec<u8>,
    ) -> Result<(), DeviceError> {
        let id = id.to_string();
        self.run(move |e| e.registry()?.update_usim_file(&id, fid, &body))
            .await
    }

    /// Checks an MCIM's PIN; the tries left.
    pub async fn verify_pin(&self, id: &str, pin: String) -> Result<u32, DeviceError> {
        let id = id.to_string();
        self.run(move |e| {
            let reg = e.registry()?;
            reg.verify_pin(&id, &pin)?;
            Ok(reg
                .get(&id)?
                .pin
                .as_ref()
                .map_or(0, |p| u32::from(p.pin_tries_left)))
        })
        .await
    }

    /// Changes an MCIM's PIN.
    pub async fn change_pin(&self, id: &str, old: String, new: String) -> Result<(), DeviceError> {
        let id = id.to_string();
        self.run(move |e| e.registry()?.change_pin(&id, &old, &new))
            .await
    }

    /// Unblocks an MCIM's PIN with its PUK.
    pub async fn unblock_pin(
        &self,
        id: &str,
        puk: String,
        new_pin: String,
    ) -> Result<McimView, DeviceError> {
        let id = id.to_string();
        self.run(move |e| {
            e.registry()?.unblock_pin(&id, &puk, &new_pin)?;
            view(e, &id)
        })
        .await
    }

    /// Gives a PIN-less MCIM a PIN and a PUK (5.1.1.1 "PIN-protected").
    pub async fn enable_pin(
        &self,
        id: &str,
        pin: String,
        puk: String,
    ) -> Result<McimView, DeviceError> {
        let id = id.to_string();
        self.run(move |e| {
            e.registry()?.enable_pin(&id, &pin, &puk)?;
            view(e, &id)
        })
        .await
    }

    /// Evidence for `nonce` (16-64 octets) over `pcrs` (the configured set when `None`): a
    /// quote from a TPM, a signed measurement from a token. None in lockdown.
    pub async fn attest(
        &self,
        nonce: Vec<u8>,
        pcrs: Option<Vec<u8>>,
    ) -> Result<Evidence, DeviceError> {
        if nonce.len() < 16 || nonce.len() > 64 {
            return Err(DeviceError::BadRequest(
                "the nonce must be 16 to 64 octets".into(),
            ));
        }
        let pcrs = pcrs.unwrap_or_else(|| self.quote_pcrs.clone());
        let selection =
            PcrSelection::sha256(&pcrs).map_err(|e| DeviceError::BadRequest(e.to_string()))?;
        let measurement = self.measurement.clone();
        let platform_credential = self.platform_credential();
        self.run(move |e| {
            // A TRE in lockdown gives no evidence: a quote would vouch for a platform whose
            // MCIM store has been tampered with.
            if let Ok(r) = e.registry()
                && let Some(why) = r.status().lockdown
            {
                return Err(RegistryError::Lockdown(why));
            }
            let aka_execution = e.tre()?.capabilities().aka_execution;
            if !e.tre()?.capabilities().quote {
                let pcid = e.tre()?.identity()?.ok_or(TreError::NotInitialised)?.pcid;
                let payload = mcim_core::token_evidence::EvidencePayload::new(
                    pcid.as_str(),
                    &nonce,
                    &measurement(),
                )
                .to_bytes();
                let signature = e.tre()?.sign_evidence(&payload)?;
                return Ok(Evidence {
                    kind: EvidenceKind::TokenSignature { payload, signature },
                    aka_execution,
                    platform_credential,
                    clock: None,
                });
            }
            let q = e.tre()?.quote(&nonce, &selection)?;
            let info = parse_quote(&q.attest).map_err(|x| TreError::Command {
                command: "TPM2_Quote",
                detail: format!("the TPM returned an unreadable quote: {x}"),
            })?;
            Ok(Evidence {
                kind: EvidenceKind::TpmQuote(q),
                aka_execution,
                platform_credential,
                clock: Some(info.clock),
            })
        })
        .await
    }

    /// The audit record from `from_seq`, at most `limit` entries (all when `None`).
    pub async fn audit_log(
        &self,
        from_seq: u64,
        limit: Option<usize>,
    ) -> Result<Vec<StoredEntry>, DeviceError> {
        self.run(move |e| {
            Ok(e.registry()?
                .audit_chain()?
                .into_iter()
                .filter(|s| s.entry.seq >= from_seq)
                .take(limit.unwrap_or(usize::MAX))
                .collect())
        })
        .await
    }

    /// Checks the audit record against its anchor in the TRE.
    pub async fn verify_audit(&self) -> Result<AuditVerdict, DeviceError> {
        self.run(|e| e.registry()?.verify_audit()).await
    }

    /// The TRE objects no MCIM refers to (hex references), destroyed unless `dry_run`.
    pub async fn destroy_orphans(&self, dry_run: bool) -> Result<Vec<String>, DeviceError> {
        self.run(move |e| {
            let r = e.registry()?;
            let refs = if dry_run {
                r.orphans()?
            } else {
                r.destroy_orphans()?
            };
            Ok(refs.iter().map(hex::encode).collect())
        })
        .await
    }

    /// Leaves lockdown with the supplier's rehabilitation token; whether still in lockdown.
    pub async fn rehabilitate(&self, token: Vec<u8>) -> Result<bool, DeviceError> {
        let key = self.rehabilitation_key.ok_or_else(|| {
            DeviceError::NotReady("tred has no rehabilitation_key configured".into())
        })?;
        self.run(move |e| {
            let r = e.registry()?;
            r.rehabilitate(&token, &key)?;
            tracing::warn!("left lockdown with the supplier's rehabilitation token");
            Ok(r.status().lockdown.is_some())
        })
        .await
    }
}

/// The MCIM `id` as it stands.
fn view(e: &mut Engine, id: &str) -> Result<McimView, RegistryError> {
    let r = e.registry()?;
    let c = r.connectivity().map(str::to_string);
    Ok(McimView::of(r.get(id)?, c.as_deref()))
}
