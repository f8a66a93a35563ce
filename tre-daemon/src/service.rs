//! The local gRPC API `mcim.tre.v1.TreService` (TR 33.812 5.1.2) over the TRE thread.
//!
//! Every call is logged with the caller's peer credentials (uid, gid, pid of the Unix socket
//! peer). Errors map to gRPC codes in one place ([`status`]); none carries a secret.

use mcim_core::aka::{Autn, Constants, DeviceResponse, Rand, SqnProfile};
use mcim_core::identity::{DeviceIdentity, Imsi, Pcid};
use mcim_core::lifecycle::{BlockReason, LifecycleOp, McimState};
use mcim_core::tpm::attest::parse_quote;
use mcim_core::tpm::policy::PcrSelection;
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::tre::v1 as pb;
use mcim_proto::mcim::tre::v1::tre_service_server::TreService;
use tonic::{Request, Response, Status};

use crate::certificates::{Certificates, DeviceCertificates};
use crate::engine::{Engine, EngineHandle};
use crate::provision::Provisioner;
use crate::registry::record::McimRecord;
use crate::registry::{InstallRequest, RegistryError};
use crate::tre::{AkaExecution, TreError, TreKind, UnwrapScheme, WrappedSecrets};

/// The service.
#[derive(Clone)]
pub struct TreApi {
    engine: EngineHandle,
    quote_pcrs: Vec<u8>,
    rehabilitation_key: Option<p256::ecdsa::VerifyingKey>,
    measurement: std::sync::Arc<dyn Fn() -> [u8; 32] + Send + Sync>,
    certs: Option<Certificates>,
    provisioner: Option<std::sync::Arc<Provisioner>>,
}

impl std::fmt::Debug for TreApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TreApi")
            .field("quote_pcrs", &self.quote_pcrs)
            .finish_non_exhaustive()
    }
}

impl TreApi {
    /// Serves over the TRE thread; `quote_pcrs` is the default PCR set for Attest;
    /// `rehabilitation_key` the supplier's key that may lift a lockdown.
    /// `measurement` is what a TRE without quotes signs as the daemon's state (SHA-256 of
    /// its executable and configuration).
    pub fn new(
        engine: EngineHandle,
        quote_pcrs: Vec<u8>,
        rehabilitation_key: Option<p256::ecdsa::VerifyingKey>,
        measurement: std::sync::Arc<dyn Fn() -> [u8; 32] + Send + Sync>,
    ) -> Self {
        Self {
            engine,
            quote_pcrs,
            rehabilitation_key,
            measurement,
            certs: None,
            provisioner: None,
        }
    }

    /// Keeps the supplier's certificates in `certs` (InstallCertificates; evidence carries
    /// the platform credential).
    pub fn with_certificates(mut self, certs: Certificates) -> Self {
        self.certs = Some(certs);
        self
    }

    /// Serves StartProvisioning and WatchProvisioning with `p`.
    pub fn with_provisioner(mut self, p: std::sync::Arc<Provisioner>) -> Self {
        self.provisioner = Some(p);
        self
    }

    fn provisioner(&self) -> Result<&std::sync::Arc<Provisioner>, Status> {
        self.provisioner
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("provisioning is not configured in tred"))
    }

    fn platform_credential(&self) -> Vec<Vec<u8>> {
        self.certs
            .as_ref()
            .and_then(|c| c.load().ok().flatten())
            .map(|c| c.platform_credential)
            .unwrap_or_default()
    }

    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Engine) -> Result<R, RegistryError> + Send + 'static,
    ) -> Result<R, Status> {
        self.engine
            .call(f)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .map_err(status)
    }
}

/// Maps a refusal to its gRPC code.
pub fn status(e: RegistryError) -> Status {
    use RegistryError as R;
    let msg = e.to_string();
    match e {
        R::Lockdown(_) | R::Lifecycle(_) | R::AnotherSelected(_) => {
            Status::failed_precondition(msg)
        }
        R::NotFound(_) => Status::not_found(msg),
        R::AlreadyInstalled(_) => Status::already_exists(msg),
        R::WrongPin { .. } | R::WrongPuk { .. } | R::Unauthorised(_) => {
            Status::permission_denied(msg)
        }
        R::BadRequest(_) => Status::invalid_argument(msg),
        R::Io(_) => Status::internal(msg),
        R::Tre(t) => match t {
            TreError::MacFailure => Status::unauthenticated(msg),
            TreError::BadSecrets(_)
            | TreError::BadRequest(_)
            | TreError::Identity(_)
            | TreError::Sqn(_) => Status::invalid_argument(msg),
            TreError::NotInitialised | TreError::Mismatch(_) | TreError::PolicyFailed(_) => {
                Status::failed_precondition(msg)
            }
            TreError::AlreadyInitialised(_) => Status::already_exists(msg),
            TreError::NotSupported { .. } => Status::unimplemented(msg),
            TreError::Unavailable { .. } | TreError::Command { .. } | TreError::Login(_) => {
                Status::unavailable(msg)
            }
        },
    }
}

/// Logs the call with the Unix peer's credentials.
fn log_call<T>(rpc: &'static str, req: &Request<T>) {
    let cred = req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|i| i.peer_cred);
    match cred {
        Some(c) => tracing::info!(rpc, uid = c.uid(), gid = c.gid(), pid = c.pid(), "call"),
        None => tracing::info!(rpc, "call (no peer credentials)"),
    }
}

fn state_pb(s: McimState) -> common::McimState {
    match s {
        McimState::Installed => common::McimState::Installed,
        McimState::Activated => common::McimState::Activated,
        McimState::Selected => common::McimState::Selected,
        McimState::Blocked => common::McimState::Blocked,
        McimState::Retired => common::McimState::Retired,
        McimState::Deleted => common::McimState::Deleted,
    }
}

fn aka_pb(a: AkaExecution) -> common::AkaExecution {
    match a {
        AkaExecution::InTre => common::AkaExecution::InTre,
        AkaExecution::UnsealedInHost => common::AkaExecution::UnsealedInHost,
    }
}

fn mcim_pb(r: &McimRecord, connectivity: Option<&str>) -> pb::Mcim {
    pb::Mcim {
        mcim_id: r.id.clone(),
        imsi: r.id.clone(),
        sho_id: r.sho.clone(),
        state: state_pb(r.state) as i32,
        blocked_reason: r
            .blocked
            .map(|b| match b {
                BlockReason::PinBlocked => "pin_blocked",
                BlockReason::Requested => "requested",
                BlockReason::Tampered => "tampered",
            })
            .unwrap_or_default()
            .into(),
        pin_retries_left: r.pin.as_ref().map_or(0, |p| u32::from(p.pin_tries_left)),
        connectivity: connectivity == Some(r.id.as_str()),
        installed_at: None,
    }
}

fn identity_pb(i: &DeviceIdentity) -> common::DeviceIdentity {
    common::DeviceIdentity {
        device_id: i.device_id.clone(),
        pcid: i.pcid.as_str().to_string(),
        model: i.model.clone(),
    }
}

/// The entry after an operation.
fn entry(e: &mut Engine, id: &str) -> Result<pb::Mcim, RegistryError> {
    let r = e.registry()?;
    let c = r.connectivity().map(str::to_string);
    Ok(mcim_pb(r.get(id)?, c.as_deref()))
}

fn lifecycle(e: &mut Engine, id: &str, op: LifecycleOp) -> Result<pb::Mcim, RegistryError> {
    e.registry()?.apply(id, op)?;
    entry(e, id)
}

fn block16(what: &str, b: &[u8]) -> Result<[u8; 16], Status> {
    b.try_into()
        .map_err(|_| Status::invalid_argument(format!("{what} must be 16 octets, got {}", b.len())))
}

fn constants(c: &[Vec<u8>], r: &[u32]) -> Result<Constants, Status> {
    match (c.len(), r.len()) {
        (0, 0) => Ok(Constants::default()),
        (5, 5) => {
            let mut blocks = [[0u8; 16]; 5];
            for (out, v) in blocks.iter_mut().zip(c) {
                *out = block16("a MILENAGE constant", v)?;
            }
            let mut rs = [0u32; 5];
            rs.copy_from_slice(r);
            Constants::new(blocks, rs).map_err(|e| Status::invalid_argument(e.to_string()))
        }
        _ => Err(Status::invalid_argument(
            "give all five MILENAGE c and r values, or none",
        )),
    }
}

type WatchStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::WatchProvisioningResponse, Status>> + Send>,
>;

/// A stream fed by a task that sends into a channel.
fn async_stream<F, Fut>(f: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::WatchProvisioningResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl TreService for TreApi {
    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        log_call("GetStatus", &req);
        let time = self.engine.tre_time();
        self.run(move |e| {
            let caps = e.tre()?.capabilities().clone();
            let identity = e.tre()?.identity()?;
            let (lockdown, connectivity, findings) = match e.registry() {
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
            let counter = if identity.is_some() {
                e.tre()?.rollback_counter().unwrap_or(0)
            } else {
                0
            };
            Ok(pb::GetStatusResponse {
                tre_kind: match caps.kind {
                    TreKind::Tpm2 => common::TreKind::Tpm2,
                    TreKind::Pkcs11 => common::TreKind::Pkcs11,
                } as i32,
                capabilities: Some(pb::Capabilities {
                    aka_execution: aka_pb(caps.aka_execution) as i32,
                    quote: caps.quote,
                    monotonic_counter: caps.monotonic_counter,
                    ecdh_unwrap: caps.unwrap != UnwrapScheme::RsaOaep,
                    rsa_oaep_unwrap: caps.unwrap == UnwrapScheme::RsaOaep,
                }),
                identity: identity.as_ref().map(identity_pb),
                lockdown: lockdown.is_some(),
                lockdown_reason: lockdown.unwrap_or_default(),
                connectivity_mcim_id: connectivity.unwrap_or_default(),
                rehabilitation_counter: counter,
                startup_findings: findings,
                tre_busy_micros: time.busy_micros,
                tpm_commands: e.tre()?.command_count().unwrap_or(0),
            })
        })
        .await
        .map(Response::new)
    }

    async fn get_device_parameters(
        &self,
        req: Request<pb::GetDeviceParametersRequest>,
    ) -> Result<Response<pb::GetDeviceParametersResponse>, Status> {
        log_call("GetDeviceParameters", &req);
        let platform_credential = self.platform_credential();
        if platform_credential.is_empty() {
            return Err(Status::failed_precondition(
                "the device has no platform credential yet (InstallCertificates at supply time)",
            ));
        }
        self.run(move |e| {
            let tre = e.tre()?;
            let caps = tre.capabilities().clone();
            let identity = tre.identity()?.ok_or(TreError::NotInitialised)?;
            let public = tre.device_public()?;
            Ok(pb::GetDeviceParametersResponse {
                identity: Some(identity_pb(&identity)),
                tre_kind: match caps.kind {
                    TreKind::Tpm2 => common::TreKind::Tpm2,
                    TreKind::Pkcs11 => common::TreKind::Pkcs11,
                } as i32,
                storage_public: public.storage_public,
                platform_credential,
                aka_execution: aka_pb(caps.aka_execution) as i32,
            })
        })
        .await
        .map(Response::new)
    }

    async fn install_certificates(
        &self,
        req: Request<pb::InstallCertificatesRequest>,
    ) -> Result<Response<pb::InstallCertificatesResponse>, Status> {
        log_call("InstallCertificates", &req);
        let r = req.into_inner();
        let certs = self
            .certs
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("tred keeps no certificates"))?;
        // The TLS certificate must be for the TRE's own TLS key.
        let leaf = r
            .tls_certificate
            .first()
            .cloned()
            .ok_or_else(|| Status::invalid_argument("the TLS certificate chain is empty"))?;
        let spki = self
            .run(|e| Ok(e.tre()?.device_public()?.tls_public_spki))
            .await?;
        if !crate::certificates::certifies(&leaf, &spki) {
            return Err(Status::invalid_argument(
                "the TLS certificate is not for this TRE's TLS key",
            ));
        }
        certs
            .store(&DeviceCertificates {
                platform_credential: r.platform_credential,
                tls_certificate: r.tls_certificate,
            })
            .map_err(Status::invalid_argument)?;
        Ok(Response::new(pb::InstallCertificatesResponse {}))
    }

    async fn init_device(
        &self,
        req: Request<pb::InitDeviceRequest>,
    ) -> Result<Response<pb::InitDeviceResponse>, Status> {
        log_call("InitDevice", &req);
        let i = req
            .into_inner()
            .identity
            .ok_or_else(|| Status::invalid_argument("identity is required"))?;
        let pcid = Pcid::new(i.pcid).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let identity = DeviceIdentity::new(i.device_id, pcid, i.model)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.run(move |e| {
            let out = e.init_device(&identity)?;
            Ok(pb::InitDeviceResponse {
                created: out.created,
                storage_public: out.public.storage_public,
                attestation_public: out.public.attestation_public,
                tls_public_spki: out.public.tls_public_spki,
                identity: Some(identity_pb(&out.identity)),
            })
        })
        .await
        .map(Response::new)
    }

    async fn list_mcims(
        &self,
        req: Request<pb::ListMcimsRequest>,
    ) -> Result<Response<pb::ListMcimsResponse>, Status> {
        log_call("ListMcims", &req);
        self.run(|e| {
            let r = e.registry()?;
            let c = r.connectivity().map(str::to_string);
            Ok(pb::ListMcimsResponse {
                mcims: r
                    .list()?
                    .into_iter()
                    .map(|m| mcim_pb(m, c.as_deref()))
                    .collect(),
            })
        })
        .await
        .map(Response::new)
    }

    async fn get_mcim(
        &self,
        req: Request<pb::GetMcimRequest>,
    ) -> Result<Response<pb::GetMcimResponse>, Status> {
        log_call("GetMcim", &req);
        let id = req.into_inner().mcim_id;
        self.run(move |e| {
            Ok(pb::GetMcimResponse {
                mcim: Some(entry(e, &id)?),
            })
        })
        .await
        .map(Response::new)
    }

    async fn install_mcim(
        &self,
        req: Request<pb::InstallMcimRequest>,
    ) -> Result<Response<pb::InstallMcimResponse>, Status> {
        log_call("InstallMcim", &req);
        let r = req.into_inner();
        let imsi = Imsi::new(r.imsi).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let constants = constants(&r.milenage_c, &r.milenage_r)?;
        let pin = match (r.pin.is_empty(), r.puk.is_empty()) {
            (true, true) => None,
            (false, false) => Some((r.pin, r.puk)),
            _ => {
                return Err(Status::invalid_argument(
                    "a PIN needs a PUK and a PUK a PIN",
                ));
            }
        };
        let id = imsi.as_str().to_string();
        let install = InstallRequest {
            imsi,
            sho: r.sho_id,
            wrapped: WrappedSecrets {
                k: r.wrapped_k,
                opc: r.wrapped_opc,
            },
            constants,
            sqn_profile: SqnProfile::default(),
            pin,
        };
        self.run(move |e| {
            e.registry()?.install(install)?;
            Ok(pb::InstallMcimResponse {
                mcim: Some(entry(e, &id)?),
            })
        })
        .await
        .map(Response::new)
    }

    async fn activate_mcim(
        &self,
        req: Request<pb::ActivateMcimRequest>,
    ) -> Result<Response<pb::ActivateMcimResponse>, Status> {
        log_call("ActivateMcim", &req);
        let id = req.into_inner().mcim_id;
        self.run(move |e| {
            Ok(pb::ActivateMcimResponse {
                mcim: Some(lifecycle(e, &id, LifecycleOp::Activate)?),
            })
        })
        .await
        .map(Response::new)
    }

    async fn select_mcim(
        &self,
        req: Request<pb::SelectMcimRequest>,
    ) -> Result<Response<pb::SelectMcimResponse>, Status> {
        log_call("SelectMcim", &req);
        let r = req.into_inner();
        self.run(move |e| {
            let pin = (!r.pin.is_empty()).then_some(r.pin.as_str());
            e.registry()?.select(&r.mcim_id, pin)?;
            Ok(pb::SelectMcimResponse {
                mcim: Some(entry(e, &r.mcim_id)?),
            })
        })
        .await
        .map(Response::new)
    }

    async fn end_mcim_session(
        &self,
        req: Request<pb::EndMcimSessionRequest>,
    ) -> Result<Response<pb::EndMcimSessionResponse>, Status> {
        log_call("EndMcimSession", &req);
        let id = req.into_inner().mcim_id;
        self.run(move |e| {
            Ok(pb::EndMcimSessionResponse {
                mcim: Some(lifecycle(e, &id, LifecycleOp::EndSession)?),
            })
        })
        .await
        .map(Response::new)
    }

    async fn block_mcim(
        &self,
        req: Request<pb::BlockMcimRequest>,
    ) -> Result<Response<pb::BlockMcimResponse>, Status> {
        log_call("BlockMcim", &req);
        let id = req.into_inner().mcim_id;
        self.run(move |e| {
            Ok(pb::BlockMcimResponse {
                mcim: Some(lifecycle(
                    e,
                    &id,
                    LifecycleOp::Block(BlockReason::Requested),
                )?),
            })
        })
        .await
        .map(Response::new)
    }

    async fn unblock_mcim(
        &self,
        req: Request<pb::UnblockMcimRequest>,
    ) -> Result<Response<pb::UnblockMcimResponse>, Status> {
        log_call("UnblockMcim", &req);
        let id = req.into_inner().mcim_id;
        self.run(move |e| {
            Ok(pb::UnblockMcimResponse {
                mcim: Some(lifecycle(e, &id, LifecycleOp::Unblock)?),
            })
        })
        .await
        .map(Response::new)
    }

    async fn retire_mcim(
        &self,
        req: Request<pb::RetireMcimRequest>,
    ) -> Result<Response<pb::RetireMcimResponse>, Status> {
        log_call("RetireMcim", &req);
        let id = req.into_inner().mcim_id;
        self.run(move |e| {
            Ok(pb::RetireMcimResponse {
                mcim: Some(lifecycle(e, &id, LifecycleOp::Retire)?),
            })
        })
        .await
        .map(Response::new)
    }

    async fn delete_mcim(
        &self,
        req: Request<pb::DeleteMcimRequest>,
    ) -> Result<Response<pb::DeleteMcimResponse>, Status> {
        log_call("DeleteMcim", &req);
        let id = req.into_inner().mcim_id;
        self.run(move |e| {
            e.registry()?.apply(&id, LifecycleOp::Delete)?;
            Ok(pb::DeleteMcimResponse {})
        })
        .await
        .map(Response::new)
    }

    async fn set_connectivity_mcim(
        &self,
        req: Request<pb::SetConnectivityMcimRequest>,
    ) -> Result<Response<pb::SetConnectivityMcimResponse>, Status> {
        log_call("SetConnectivityMcim", &req);
        let id = req.into_inner().mcim_id;
        self.run(move |e| {
            e.registry()?.set_connectivity(&id)?;
            Ok(pb::SetConnectivityMcimResponse {
                mcim: Some(entry(e, &id)?),
            })
        })
        .await
        .map(Response::new)
    }

    async fn authenticate(
        &self,
        req: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        log_call("Authenticate", &req);
        let r = req.into_inner();
        // The initial connectivity credential (5.1.3.3.2.1) is the MCIM installed at supply
        // time under the PCID; it is selected for this one AKA only.
        let (id, initial) = match r.credential {
            Some(pb::authenticate_request::Credential::McimId(id)) => (id, false),
            Some(pb::authenticate_request::Credential::Initial(true)) => (String::new(), true),
            _ => return Err(Status::invalid_argument("name the MCIM")),
        };
        let ch = r
            .challenge
            .ok_or_else(|| Status::invalid_argument("challenge is required"))?;
        let rand = Rand(block16("RAND", &ch.rand)?);
        let autn = Autn(block16("AUTN", &ch.autn)?);
        self.run(move |e| {
            let id = if initial {
                let pcid = e.tre()?.identity()?.ok_or(TreError::NotInitialised)?.pcid;
                pcid.as_str().to_string()
            } else {
                id
            };
            let answered = if initial {
                let r = e.registry()?;
                r.get(&id).map_err(|_| {
                    RegistryError::BadRequest(
                        "no initial connectivity credential is installed for the PCID".into(),
                    )
                })?;
                r.select(&id, None)?;
                let answered = r.authenticate(&id, &rand, &autn);
                r.apply(&id, LifecycleOp::EndSession)?;
                answered?
            } else {
                e.registry()?.authenticate(&id, &rand, &autn)?
            };
            let result = match answered {
                DeviceResponse::Success { res, ck, ik } => {
                    pb::authenticate_response::Result::Success(pb::AkaSuccess {
                        res: res.0.to_vec(),
                        ck: ck.expose().to_vec(),
                        ik: ik.expose().to_vec(),
                    })
                }
                DeviceResponse::SyncFailure { auts, .. } => {
                    pb::authenticate_response::Result::Auts(auts.0.to_vec())
                }
            };
            Ok(pb::AuthenticateResponse {
                result: Some(result),
            })
        })
        .await
        .map(Response::new)
    }

    async fn verify_pin(
        &self,
        req: Request<pb::VerifyPinRequest>,
    ) -> Result<Response<pb::VerifyPinResponse>, Status> {
        log_call("VerifyPin", &req);
        let r = req.into_inner();
        self.run(move |e| {
            let reg = e.registry()?;
            reg.verify_pin(&r.mcim_id, &r.pin)?;
            let left = reg
                .get(&r.mcim_id)?
                .pin
                .as_ref()
                .map_or(0, |p| u32::from(p.pin_tries_left));
            Ok(pb::VerifyPinResponse { retries_left: left })
        })
        .await
        .map(Response::new)
    }

    async fn change_pin(
        &self,
        req: Request<pb::ChangePinRequest>,
    ) -> Result<Response<pb::ChangePinResponse>, Status> {
        log_call("ChangePin", &req);
        let r = req.into_inner();
        self.run(move |e| {
            e.registry()?
                .change_pin(&r.mcim_id, &r.old_pin, &r.new_pin)?;
            Ok(pb::ChangePinResponse {})
        })
        .await
        .map(Response::new)
    }

    async fn unblock_pin(
        &self,
        req: Request<pb::UnblockPinRequest>,
    ) -> Result<Response<pb::UnblockPinResponse>, Status> {
        log_call("UnblockPin", &req);
        let r = req.into_inner();
        self.run(move |e| {
            e.registry()?.unblock_pin(&r.mcim_id, &r.puk, &r.new_pin)?;
            Ok(pb::UnblockPinResponse {
                mcim: Some(entry(e, &r.mcim_id)?),
            })
        })
        .await
        .map(Response::new)
    }

    async fn attest(
        &self,
        req: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        log_call("Attest", &req);
        let r = req.into_inner();
        if r.nonce.len() < 16 || r.nonce.len() > 64 {
            return Err(Status::invalid_argument(
                "the nonce must be 16 to 64 octets",
            ));
        }
        let pcrs: Vec<u8> = if r.pcrs.is_empty() {
            self.quote_pcrs.clone()
        } else {
            r.pcrs
                .iter()
                .map(|p| u8::try_from(*p))
                .collect::<Result<_, _>>()
                .map_err(|_| Status::invalid_argument("PCR index out of range"))?
        };
        let selection =
            PcrSelection::sha256(&pcrs).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let nonce = r.nonce;
        let measurement = self.measurement.clone();
        let credential = self.platform_credential();
        self.run(move |e| {
            // A TRE in lockdown gives no evidence: a quote would vouch for a platform whose
            // MCIM store has been tampered with.
            if let Ok(r) = e.registry()
                && let Some(why) = r.status().lockdown
            {
                return Err(RegistryError::Lockdown(why));
            }
            let mode = e.tre()?.capabilities().aka_execution;
            if !e.tre()?.capabilities().quote {
                let pcid = e.tre()?.identity()?.ok_or(TreError::NotInitialised)?.pcid;
                let payload = mcim_core::token_evidence::EvidencePayload::new(
                    pcid.as_str(),
                    &nonce,
                    &measurement(),
                )
                .to_bytes();
                let signature = e.tre()?.sign_evidence(&payload)?;
                return Ok(pb::AttestResponse {
                    evidence: Some(common::Evidence {
                        kind: Some(common::evidence::Kind::Pkcs11Signature(
                            common::Pkcs11Signature { payload, signature },
                        )),
                        aka_execution: aka_pb(mode) as i32,
                        platform_credential: credential.clone(),
                    }),
                    clock: 0,
                    reset_count: 0,
                    restart_count: 0,
                    safe: false,
                });
            }
            let q = e.tre()?.quote(&nonce, &selection)?;
            let info = parse_quote(&q.attest).map_err(|x| TreError::Mismatch(x.to_string()))?;
            Ok(pb::AttestResponse {
                evidence: Some(common::Evidence {
                    kind: Some(common::evidence::Kind::TpmQuote(common::TpmQuote {
                        attest: q.attest,
                        signature: q.signature,
                        pcrs: q
                            .pcrs
                            .iter()
                            .zip(&q.pcr_values)
                            .map(|(i, v)| common::PcrValue {
                                index: u32::from(*i),
                                digest: v.to_vec(),
                            })
                            .collect(),
                        pcr_bank: "sha256".into(),
                    })),
                    aka_execution: aka_pb(mode) as i32,
                    platform_credential: credential,
                }),
                clock: info.clock.clock,
                reset_count: info.clock.reset_count,
                restart_count: info.clock.restart_count,
                safe: info.clock.safe,
            })
        })
        .await
        .map(Response::new)
    }

    async fn get_audit_log(
        &self,
        req: Request<pb::GetAuditLogRequest>,
    ) -> Result<Response<pb::GetAuditLogResponse>, Status> {
        log_call("GetAuditLog", &req);
        let r = req.into_inner();
        self.run(move |e| {
            let chain = e.registry()?.audit_chain()?;
            let limit = if r.limit == 0 {
                usize::MAX
            } else {
                r.limit as usize
            };
            Ok(pb::GetAuditLogResponse {
                entries: chain
                    .into_iter()
                    .filter(|s| s.entry.seq >= r.from_seq)
                    .take(limit)
                    .map(|s| pb::AuditEntry {
                        seq: s.entry.seq,
                        at: Some(prost_types::Timestamp {
                            seconds: i64::try_from(s.entry.at).unwrap_or(i64::MAX),
                            nanos: 0,
                        }),
                        event: s.entry.event,
                        mcim_id: s.entry.mcim.unwrap_or_default(),
                        detail: s.entry.detail,
                        prev_hash: hex::decode(&s.entry.prev).unwrap_or_default(),
                        hash: s.hash.to_vec(),
                    })
                    .collect(),
            })
        })
        .await
        .map(Response::new)
    }

    async fn verify_audit_log(
        &self,
        req: Request<pb::VerifyAuditLogRequest>,
    ) -> Result<Response<pb::VerifyAuditLogResponse>, Status> {
        log_call("VerifyAuditLog", &req);
        self.run(|e| {
            let v = e.registry()?.verify_audit()?;
            Ok(pb::VerifyAuditLogResponse {
                ok: v.ok,
                entries: v.entries,
                first_bad_seq: v.first_bad_seq,
                detail: v.detail,
            })
        })
        .await
        .map(Response::new)
    }

    async fn start_provisioning(
        &self,
        req: Request<pb::StartProvisioningRequest>,
    ) -> Result<Response<pb::StartProvisioningResponse>, Status> {
        log_call("StartProvisioning", &req);
        let access = common::AccessType::try_from(req.get_ref().access)
            .unwrap_or(common::AccessType::Unspecified);
        let id = self.provisioner()?.begin(access).await?;
        Ok(Response::new(pb::StartProvisioningResponse {
            provisioning_id: id,
        }))
    }

    async fn network_attach(
        &self,
        req: Request<pb::NetworkAttachRequest>,
    ) -> Result<Response<pb::NetworkAttachResponse>, Status> {
        log_call("NetworkAttach", &req);
        let id = req.into_inner().mcim_id;
        self.provisioner()?
            .network_attach(&id)
            .await
            .map(Response::new)
    }

    type WatchProvisioningStream = WatchStream;

    async fn watch_provisioning(
        &self,
        req: Request<pb::WatchProvisioningRequest>,
    ) -> Result<Response<Self::WatchProvisioningStream>, Status> {
        log_call("WatchProvisioning", &req);
        let mut rx = self.provisioner()?.watch(&req.get_ref().provisioning_id)?;
        let stream = async_stream(move |tx| async move {
            let mut sent = 0;
            loop {
                let (steps, finished) = match rx.borrow_and_update().as_ref() {
                    Some(r) => (r.responses(), r.finished()),
                    None => (Vec::new(), true),
                };
                for s in steps.into_iter().skip(sent) {
                    sent += 1;
                    if tx.send(Ok(s)).await.is_err() {
                        return;
                    }
                }
                if finished || rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn reprovision(
        &self,
        req: Request<pb::ReprovisionRequest>,
    ) -> Result<Response<pb::ReprovisionResponse>, Status> {
        log_call("Reprovision", &req);
        Err(Status::unimplemented(
            "re-provisioning arrives with the network roles",
        ))
    }

    async fn rehabilitate(
        &self,
        req: Request<pb::RehabilitateRequest>,
    ) -> Result<Response<pb::RehabilitateResponse>, Status> {
        log_call("Rehabilitate", &req);
        let key = self.rehabilitation_key.ok_or_else(|| {
            Status::failed_precondition("tred has no rehabilitation_key configured")
        })?;
        let token = req.into_inner().token;
        self.run(move |e| {
            let r = e.registry()?;
            r.rehabilitate(&token, &key)?;
            tracing::warn!("left lockdown with the supplier's rehabilitation token");
            Ok(pb::RehabilitateResponse {
                lockdown: r.status().lockdown.is_some(),
            })
        })
        .await
        .map(Response::new)
    }
}
