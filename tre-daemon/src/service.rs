//! The local gRPC API `mcim.tre.v1.TreService` (TR 33.812 5.1.2): protobuf in, a call of the
//! device façade ([`crate::device::Device`]) or the provisioner, protobuf out.
//!
//! Every call is logged with the caller's peer credentials (uid, gid, pid of the Unix socket
//! peer). Errors map to gRPC codes in one place ([`status`], [`provision_status`]); none
//! carries a secret.

use std::sync::Arc;

use mcim_core::aka::{Autn, DeviceResponse, Rand};
use mcim_core::identity::{DeviceIdentity, Imsi, Pcid};
use mcim_core::lifecycle::{BlockReason, LifecycleOp};
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::tre::v1 as pb;
use mcim_proto::mcim::tre::v1::tre_service_server::TreService;
use tonic::{Request, Response, Status};

use crate::certificates::DeviceCertificates;
use crate::device::{Credential, Device, DeviceError, Installed, NewMcim, block16, constants};
use crate::provision::{Access, Flow, ProvisionError, Provisioner, Run, flow_step_name};
use crate::registry::RegistryError;
use crate::tre::{TreError, UnwrapScheme, WrappedSecrets};
use crate::wire;

/// The service.
#[derive(Clone)]
pub struct TreApi {
    device: Device,
    provisioner: Option<Arc<Provisioner>>,
}

impl std::fmt::Debug for TreApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TreApi")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl TreApi {
    /// Serves `device`; StartProvisioning, WatchProvisioning and NetworkAttach with
    /// `provisioner` when there is one.
    pub fn new(device: Device, provisioner: Option<Arc<Provisioner>>) -> Self {
        Self {
            device,
            provisioner,
        }
    }

    fn provisioner(&self) -> Result<&Arc<Provisioner>, Status> {
        self.provisioner
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("provisioning is not configured in tred"))
    }
}

/// Maps a refusal of the device to its gRPC code.
pub fn status(e: DeviceError) -> Status {
    use RegistryError as R;
    let msg = e.to_string();
    match e {
        DeviceError::BadRequest(_) => Status::invalid_argument(msg),
        DeviceError::NotReady(_) => Status::failed_precondition(msg),
        DeviceError::EngineGone(_) => Status::unavailable(msg),
        DeviceError::Certificates(_) => Status::internal(msg),
        DeviceError::Registry(r) => match r {
            R::Lockdown(_) | R::Lifecycle(_) | R::AnotherSelected(_) => {
                Status::failed_precondition(msg)
            }
            R::NotFound(_) => Status::not_found(msg),
            R::AlreadyInstalled(_) => Status::already_exists(msg),
            R::WrongPin { .. } | R::WrongPuk { .. } | R::Unauthorised(_) => {
                Status::permission_denied(msg)
            }
            R::BadRequest(_) => Status::invalid_argument(msg),
            R::Io(_) | R::Encoding(_) => Status::internal(msg),
            R::EngineBroken(_) => Status::unavailable(msg),
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
        },
    }
}

/// Maps a refusal of the provisioner to its gRPC code.
pub fn provision_status(e: ProvisionError) -> Status {
    match e {
        ProvisionError::NotReady(m) => Status::failed_precondition(m),
        ProvisionError::NoSuchRun => Status::not_found(e.to_string()),
        ProvisionError::BadRequest(m) => Status::invalid_argument(m),
        ProvisionError::Persist(_) => Status::internal(e.to_string()),
        ProvisionError::Device(d) => status(d),
        ProvisionError::Network(s) => s,
    }
}

fn bad(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
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

/// A run's steps as WatchProvisioning streams them.
fn responses(run: &Run) -> Vec<pb::WatchProvisioningResponse> {
    let registration = run
        .state
        .registration()
        .map(|r| r.id.clone())
        .unwrap_or_default();
    // The step that reports the MCIM installed, and the first that has the registration.
    let (reported, registered) = match run.flow {
        Flow::Initial => (13, 7),
        Flow::ChangeSho { .. } => (12, 3),
        Flow::Pristine { .. } => (16, 10),
        Flow::Dual { .. } => (8, 3),
    };
    run.steps
        .iter()
        .map(|s| pb::WatchProvisioningResponse {
            step: s.step,
            name: flow_step_name(&run.flow, s.step).into(),
            ok: s.ok,
            detail: s.detail.clone(),
            mcim_id: if s.step == reported && s.ok {
                run.mcim_id().unwrap_or_default().to_string()
            } else {
                String::new()
            },
            registration_id: if s.step >= registered {
                registration.clone()
            } else {
                String::new()
            },
        })
        .collect()
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

impl TreApi {
    async fn lifecycle(&self, id: &str, op: LifecycleOp) -> Result<Option<pb::Mcim>, Status> {
        Ok(self
            .device
            .apply(id, op)
            .await
            .map_err(status)?
            .as_ref()
            .map(wire::mcim))
    }
}

#[tonic::async_trait]
impl TreService for TreApi {
    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        log_call("GetStatus", &req);
        let s = self.device.status().await.map_err(status)?;
        let caps = s.capabilities;
        Ok(Response::new(pb::GetStatusResponse {
            tre_kind: wire::tre_kind(caps.kind) as i32,
            capabilities: Some(pb::Capabilities {
                aka_execution: wire::aka_execution(caps.aka_execution) as i32,
                quote: caps.quote,
                monotonic_counter: caps.monotonic_counter,
                ecdh_unwrap: caps.unwrap != UnwrapScheme::RsaOaep,
                rsa_oaep_unwrap: caps.unwrap == UnwrapScheme::RsaOaep,
            }),
            identity: s.identity.as_ref().map(wire::identity),
            lockdown: s.lockdown.is_some(),
            lockdown_reason: s.lockdown.unwrap_or_default(),
            connectivity_mcim_id: s.connectivity.unwrap_or_default(),
            rehabilitation_counter: s.rehabilitation_counter,
            startup_findings: s.startup_findings,
            tre_busy_micros: s.tre_time.busy_micros,
            tpm_commands: s.tpm_commands,
            discard_notices: self
                .provisioner
                .as_ref()
                .map(|p| p.discard_notices())
                .unwrap_or_default()
                .into_iter()
                .map(|n| pb::DiscardNotice {
                    acknowledged: n.ack.is_some(),
                    imsi: n.imsi,
                    sho_id: n.sho_id,
                    acknowledged_at: n.acknowledged_at,
                    failed_attempts: n.attempts,
                    sho_url: n.sho_url,
                })
                .collect(),
        }))
    }

    async fn get_device_parameters(
        &self,
        req: Request<pb::GetDeviceParametersRequest>,
    ) -> Result<Response<pb::GetDeviceParametersResponse>, Status> {
        log_call("GetDeviceParameters", &req);
        let p = self.device.parameters().await.map_err(status)?;
        Ok(Response::new(pb::GetDeviceParametersResponse {
            identity: Some(wire::identity(&p.identity)),
            tre_kind: wire::tre_kind(p.capabilities.kind) as i32,
            storage_public: p.storage_public,
            platform_credential: p.platform_credential,
            aka_execution: wire::aka_execution(p.capabilities.aka_execution) as i32,
        }))
    }

    async fn install_certificates(
        &self,
        req: Request<pb::InstallCertificatesRequest>,
    ) -> Result<Response<pb::InstallCertificatesResponse>, Status> {
        log_call("InstallCertificates", &req);
        let r = req.into_inner();
        self.device
            .install_certificates(DeviceCertificates {
                platform_credential: r.platform_credential,
                tls_certificate: r.tls_certificate,
            })
            .await
            .map_err(status)?;
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
        let pcid = Pcid::new(i.pcid).map_err(bad)?;
        let identity = DeviceIdentity::new(i.device_id, pcid, i.model).map_err(bad)?;
        let out = self.device.init(identity).await.map_err(status)?;
        Ok(Response::new(pb::InitDeviceResponse {
            created: out.created,
            storage_public: out.public.storage_public,
            attestation_public: out.public.attestation_public,
            tls_public_spki: out.public.tls_public_spki,
            identity: Some(wire::identity(&out.identity)),
        }))
    }

    async fn list_mcims(
        &self,
        req: Request<pb::ListMcimsRequest>,
    ) -> Result<Response<pb::ListMcimsResponse>, Status> {
        log_call("ListMcims", &req);
        let mcims = self.device.list().await.map_err(status)?;
        Ok(Response::new(pb::ListMcimsResponse {
            mcims: mcims.iter().map(wire::mcim).collect(),
        }))
    }

    async fn get_mcim(
        &self,
        req: Request<pb::GetMcimRequest>,
    ) -> Result<Response<pb::GetMcimResponse>, Status> {
        log_call("GetMcim", &req);
        let m = self
            .device
            .get(&req.into_inner().mcim_id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::GetMcimResponse {
            mcim: Some(wire::mcim(&m)),
        }))
    }

    async fn install_mcim(
        &self,
        req: Request<pb::InstallMcimRequest>,
    ) -> Result<Response<pb::InstallMcimResponse>, Status> {
        log_call("InstallMcim", &req);
        let r = req.into_inner();
        let imsi = Imsi::new(r.imsi).map_err(bad)?;
        let constants = constants(&r.milenage_c, &r.milenage_r).map_err(status)?;
        let pin = match (r.pin.is_empty(), r.puk.is_empty()) {
            (true, true) => None,
            (false, false) => Some((r.pin, r.puk)),
            _ => {
                return Err(Status::invalid_argument(
                    "a PIN needs a PUK and a PUK a PIN",
                ));
            }
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let expires_at = match r.expires_at {
            None => None,
            Some(t) if t.seconds > 0 && (0..1_000_000_000).contains(&t.nanos) => {
                match u64::try_from(t.seconds) {
                    Ok(s) if s > now => Some(s),
                    _ => {
                        return Err(Status::invalid_argument(
                            "expires_at: the credential would be expired already",
                        ));
                    }
                }
            }
            Some(_) => {
                return Err(Status::invalid_argument(
                    "expires_at: not a valid time after 1970",
                ));
            }
        };
        let installed = self
            .device
            .install(NewMcim {
                imsi,
                sho: r.sho_id,
                wrapped: WrappedSecrets {
                    k: r.wrapped_k,
                    opc: r.wrapped_opc,
                },
                constants,
                pin,
                expires_at,
                usim: Default::default(),
            })
            .await
            .map_err(status)?;
        match installed {
            Installed::New(m) => Ok(Response::new(pb::InstallMcimResponse {
                mcim: Some(wire::mcim(&m)),
            })),
            // The local API installs once: the owner hears that it is there already.
            Installed::AlreadyFromSho(m) => Err(status(DeviceError::Registry(
                RegistryError::AlreadyInstalled(m.id),
            ))),
        }
    }

    async fn activate_mcim(
        &self,
        req: Request<pb::ActivateMcimRequest>,
    ) -> Result<Response<pb::ActivateMcimResponse>, Status> {
        log_call("ActivateMcim", &req);
        let mcim = self
            .lifecycle(&req.into_inner().mcim_id, LifecycleOp::Activate)
            .await?;
        Ok(Response::new(pb::ActivateMcimResponse { mcim }))
    }

    async fn select_mcim(
        &self,
        req: Request<pb::SelectMcimRequest>,
    ) -> Result<Response<pb::SelectMcimResponse>, Status> {
        log_call("SelectMcim", &req);
        let r = req.into_inner();
        let pin = (!r.pin.is_empty()).then_some(r.pin);
        let m = self.device.select(&r.mcim_id, pin).await.map_err(status)?;
        Ok(Response::new(pb::SelectMcimResponse {
            mcim: Some(wire::mcim(&m)),
        }))
    }

    async fn end_mcim_session(
        &self,
        req: Request<pb::EndMcimSessionRequest>,
    ) -> Result<Response<pb::EndMcimSessionResponse>, Status> {
        log_call("EndMcimSession", &req);
        let mcim = self
            .lifecycle(&req.into_inner().mcim_id, LifecycleOp::EndSession)
            .await?;
        Ok(Response::new(pb::EndMcimSessionResponse { mcim }))
    }

    async fn block_mcim(
        &self,
        req: Request<pb::BlockMcimRequest>,
    ) -> Result<Response<pb::BlockMcimResponse>, Status> {
        log_call("BlockMcim", &req);
        let mcim = self
            .lifecycle(
                &req.into_inner().mcim_id,
                LifecycleOp::Block(BlockReason::Requested),
            )
            .await?;
        Ok(Response::new(pb::BlockMcimResponse { mcim }))
    }

    async fn unblock_mcim(
        &self,
        req: Request<pb::UnblockMcimRequest>,
    ) -> Result<Response<pb::UnblockMcimResponse>, Status> {
        log_call("UnblockMcim", &req);
        let mcim = self
            .lifecycle(&req.into_inner().mcim_id, LifecycleOp::Unblock)
            .await?;
        Ok(Response::new(pb::UnblockMcimResponse { mcim }))
    }

    async fn retire_mcim(
        &self,
        req: Request<pb::RetireMcimRequest>,
    ) -> Result<Response<pb::RetireMcimResponse>, Status> {
        log_call("RetireMcim", &req);
        let mcim = self
            .lifecycle(&req.into_inner().mcim_id, LifecycleOp::Retire)
            .await?;
        Ok(Response::new(pb::RetireMcimResponse { mcim }))
    }

    async fn delete_mcim(
        &self,
        req: Request<pb::DeleteMcimRequest>,
    ) -> Result<Response<pb::DeleteMcimResponse>, Status> {
        log_call("DeleteMcim", &req);
        self.lifecycle(&req.into_inner().mcim_id, LifecycleOp::Delete)
            .await?;
        Ok(Response::new(pb::DeleteMcimResponse {}))
    }

    async fn set_connectivity_mcim(
        &self,
        req: Request<pb::SetConnectivityMcimRequest>,
    ) -> Result<Response<pb::SetConnectivityMcimResponse>, Status> {
        log_call("SetConnectivityMcim", &req);
        let m = self
            .device
            .set_connectivity(&req.into_inner().mcim_id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::SetConnectivityMcimResponse {
            mcim: Some(wire::mcim(&m)),
        }))
    }

    async fn authenticate(
        &self,
        req: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        log_call("Authenticate", &req);
        let r = req.into_inner();
        let credential = match r.credential {
            Some(pb::authenticate_request::Credential::McimId(id)) => Credential::Mcim(id),
            Some(pb::authenticate_request::Credential::Initial(true)) => Credential::Initial,
            _ => return Err(Status::invalid_argument("name the MCIM")),
        };
        let ch = r
            .challenge
            .ok_or_else(|| Status::invalid_argument("challenge is required"))?;
        let rand = Rand(block16("RAND", &ch.rand).map_err(status)?);
        let autn = Autn(block16("AUTN", &ch.autn).map_err(status)?);
        let result = match self
            .device
            .authenticate(credential, rand, autn)
            .await
            .map_err(status)?
        {
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
        Ok(Response::new(pb::AuthenticateResponse {
            result: Some(result),
        }))
    }

    async fn verify_pin(
        &self,
        req: Request<pb::VerifyPinRequest>,
    ) -> Result<Response<pb::VerifyPinResponse>, Status> {
        log_call("VerifyPin", &req);
        let r = req.into_inner();
        let left = self
            .device
            .verify_pin(&r.mcim_id, r.pin)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::VerifyPinResponse { retries_left: left }))
    }

    async fn change_pin(
        &self,
        req: Request<pb::ChangePinRequest>,
    ) -> Result<Response<pb::ChangePinResponse>, Status> {
        log_call("ChangePin", &req);
        let r = req.into_inner();
        self.device
            .change_pin(&r.mcim_id, r.old_pin, r.new_pin)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ChangePinResponse {}))
    }

    async fn unblock_pin(
        &self,
        req: Request<pb::UnblockPinRequest>,
    ) -> Result<Response<pb::UnblockPinResponse>, Status> {
        log_call("UnblockPin", &req);
        let r = req.into_inner();
        let m = self
            .device
            .unblock_pin(&r.mcim_id, r.puk, r.new_pin)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::UnblockPinResponse {
            mcim: Some(wire::mcim(&m)),
        }))
    }

    async fn enable_pin(
        &self,
        req: Request<pb::EnablePinRequest>,
    ) -> Result<Response<pb::EnablePinResponse>, Status> {
        log_call("EnablePin", &req);
        let r = req.into_inner();
        let m = self
            .device
            .enable_pin(&r.mcim_id, r.pin, r.puk)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::EnablePinResponse {
            mcim: Some(wire::mcim(&m)),
        }))
    }

    async fn attest(
        &self,
        req: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        log_call("Attest", &req);
        let r = req.into_inner();
        let pcrs = if r.pcrs.is_empty() {
            None
        } else {
            Some(
                r.pcrs
                    .iter()
                    .map(|p| u8::try_from(*p))
                    .collect::<Result<Vec<u8>, _>>()
                    .map_err(|_| Status::invalid_argument("PCR index out of range"))?,
            )
        };
        let ev = self.device.attest(r.nonce, pcrs).await.map_err(status)?;
        let clock = ev.clock;
        Ok(Response::new(pb::AttestResponse {
            evidence: Some(wire::evidence(ev)),
            clock: clock.map_or(0, |c| c.clock),
            reset_count: clock.map_or(0, |c| c.reset_count),
            restart_count: clock.map_or(0, |c| c.restart_count),
            safe: clock.is_some_and(|c| c.safe),
        }))
    }

    async fn get_audit_log(
        &self,
        req: Request<pb::GetAuditLogRequest>,
    ) -> Result<Response<pb::GetAuditLogResponse>, Status> {
        log_call("GetAuditLog", &req);
        let r = req.into_inner();
        let limit = (r.limit != 0).then_some(r.limit as usize);
        let chain = self
            .device
            .audit_log(r.from_seq, limit)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::GetAuditLogResponse {
            entries: chain
                .into_iter()
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
        }))
    }

    async fn verify_audit_log(
        &self,
        req: Request<pb::VerifyAuditLogRequest>,
    ) -> Result<Response<pb::VerifyAuditLogResponse>, Status> {
        log_call("VerifyAuditLog", &req);
        let v = self.device.verify_audit().await.map_err(status)?;
        Ok(Response::new(pb::VerifyAuditLogResponse {
            ok: v.ok,
            entries: v.entries,
            first_bad_seq: v.first_bad_seq,
            detail: v.detail,
        }))
    }

    async fn start_provisioning(
        &self,
        req: Request<pb::StartProvisioningRequest>,
    ) -> Result<Response<pb::StartProvisioningResponse>, Status> {
        log_call("StartProvisioning", &req);
        let access = match common::AccessType::try_from(req.get_ref().access) {
            Ok(common::AccessType::AccessType3gpp) => Access::ThreeGpp,
            Ok(common::AccessType::Non3gpp) => Access::NonThreeGpp,
            _ => return Err(Status::invalid_argument("name the access type")),
        };
        let id = self
            .provisioner()?
            .begin(access)
            .await
            .map_err(provision_status)?;
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
        let a = self
            .provisioner()?
            .network_attach(&id)
            .await
            .map_err(provision_status)?;
        Ok(Response::new(pb::NetworkAttachResponse {
            grant_id: a.grant_id,
            imsi: a.imsi,
            expires_at: a.expires_at,
        }))
    }

    type WatchProvisioningStream = WatchStream;

    async fn watch_provisioning(
        &self,
        req: Request<pb::WatchProvisioningRequest>,
    ) -> Result<Response<Self::WatchProvisioningStream>, Status> {
        log_call("WatchProvisioning", &req);
        let mut rx = self
            .provisioner()?
            .watch(&req.get_ref().provisioning_id)
            .map_err(provision_status)?;
        let stream = async_stream(move |tx| async move {
            let mut sent = 0;
            loop {
                let (steps, finished) = match rx.borrow_and_update().as_ref() {
                    Some(r) => (responses(r), r.finished()),
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
        let r = req.into_inner();
        let access = match common::AccessType::try_from(r.access) {
            Ok(common::AccessType::AccessType3gpp) => Access::ThreeGpp,
            Ok(common::AccessType::Non3gpp) => Access::NonThreeGpp,
            _ => return Err(Status::invalid_argument("name the access type")),
        };
        let id = self
            .provisioner()?
            .reprovision(access, r.new_sho_id, r.revert_to_pristine, r.keep_old)
            .await
            .map_err(provision_status)?;
        Ok(Response::new(pb::ReprovisionResponse {
            provisioning_id: id,
        }))
    }

    async fn prove_ownership(
        &self,
        req: Request<pb::ProveOwnershipRequest>,
    ) -> Result<Response<pb::ProveOwnershipResponse>, Status> {
        log_call("ProveOwnership", &req);
        let r = req.into_inner();
        let p = self
            .device
            .prove_ownership(r.subscriber, r.sho_id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ProveOwnershipResponse {
            proof: Some(common::OwnershipProof {
                payload: p.payload,
                signature: p.signature,
                tls_certificate: p.tls_certificate,
            }),
        }))
    }

    async fn destroy_orphans(
        &self,
        req: Request<pb::DestroyOrphansRequest>,
    ) -> Result<Response<pb::DestroyOrphansResponse>, Status> {
        log_call("DestroyOrphans", &req);
        let dry_run = req.into_inner().dry_run;
        let refs = self.device.destroy_orphans(dry_run).await.map_err(status)?;
        Ok(Response::new(pb::DestroyOrphansResponse {
            destroyed: !dry_run && !refs.is_empty(),
            refs,
        }))
    }

    async fn rehabilitate(
        &self,
        req: Request<pb::RehabilitateRequest>,
    ) -> Result<Response<pb::RehabilitateResponse>, Status> {
        log_call("Rehabilitate", &req);
        let lockdown = self
            .device
            .rehabilitate(req.into_inner().token)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RehabilitateResponse { lockdown }))
    }
}
