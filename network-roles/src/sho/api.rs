//! The SHO's gRPC surface (`mcim.sho.v1.ShoService`): protobuf to and from the SHO's typed
//! operations; the authorization layer has decided the caller before any of these runs.

use std::sync::Arc;

use mcim_core::identity::Pcid;
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::sho::v1 as pb;
use mcim_proto::mcim::sho::v1::sho_service_server::ShoService;
use tonic::{Request, Response, Status};

use super::discard::DiscardNotice;
use super::registrations::NewRegistration;
use super::subscriptions::NewSubscription;
use super::{Sho, St};
use crate::error::{RoleError, role};
use crate::gate::authorized;

/// The SHO's gRPC service.
#[derive(Debug, Clone)]
pub struct ShoApi(pub Arc<Sho>);

#[tonic::async_trait]
impl ShoService for ShoApi {
    async fn create_subscription(
        &self,
        req: Request<pb::CreateSubscriptionRequest>,
    ) -> Result<Response<pb::CreateSubscriptionResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            let r = req.into_inner();
            // The subscriber is the caller's certificate; a request may repeat that name but
            // not name another subscriber.
            if !r.subscriber.is_empty() {
                auth.owns(&r.subscriber)?;
            }
            let device = r
                .device
                .ok_or_else(|| RoleError::invalid("the device is required"))?;
            let pcid = Pcid::new(device.pcid).map_err(|e| RoleError::invalid(e.to_string()))?;
            let tre_kind = common::TreKind::try_from(r.tre_kind)
                .map_err(|_| RoleError::invalid("the TRE kind is required"))?;
            let sub = self
                .0
                .contract(NewSubscription {
                    subscriber: auth.caller.name.clone(),
                    pcid,
                    device_id: device.device_id,
                    tre_kind,
                    storage_public: r.storage_public,
                    platform_credential: r.platform_credential,
                    require_aka_in_tre: r.require_aka_in_tre,
                    ownership_proof: r.ownership_proof,
                })
                .await?;
            Ok(Response::new(pb::CreateSubscriptionResponse {
                subscription_id: sub.pcid,
                imsi: sub.imsi,
            }))
        })
        .await
    }

    async fn register_device(
        &self,
        req: Request<pb::RegisterDeviceRequest>,
    ) -> Result<Response<pb::RegisterDeviceResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            let r = req.into_inner();
            let reg = self
                .0
                .register(NewRegistration {
                    id: r.registration_id,
                    pcid: r.pcid,
                    nonce: r.registration_nonce,
                    dpf_url: r.dpf_url,
                    ro: auth.caller.name.clone(),
                })
                .await?;
            Ok(Response::new(pb::RegisterDeviceResponse {
                validation_id: reg.validation_id,
                nonce: reg.validation_nonce,
                pva_url: self.0.cfg.pva_url.clone(),
            }))
        })
        .await
    }

    async fn get_registration(
        &self,
        req: Request<pb::GetRegistrationRequest>,
    ) -> Result<Response<pb::GetRegistrationResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            let r = req.get_ref();
            let (reg, sub) = match (r.registration_id.is_empty(), r.subscription_id.is_empty()) {
                (false, true) => {
                    let (reg, sub) = self.0.registration_status(&r.registration_id).await?;
                    // A subscriber follows its own contracts only.
                    auth.owns(&sub.subscriber)?;
                    (reg, sub)
                }
                (true, false) => {
                    // A subscription id is the device's PCID, which can be guessed: one that
                    // another subscriber holds is answered as one nobody holds, so that which
                    // PCIDs have a contract here is not the caller's to learn.
                    let sub = self
                        .0
                        .subscription(&r.subscription_id)
                        .await?
                        .filter(|s| auth.owns(&s.subscriber).is_ok())
                        .ok_or_else(|| RoleError::not_found("no such subscription of yours"))?;
                    let reg = self
                        .0
                        .latest_registration(&sub.pcid)
                        .await?
                        .ok_or_else(|| {
                            RoleError::not_found(
                                "the device has not registered for this subscription yet \
                             (5.1.3.6.2 step 7)",
                            )
                        })?;
                    (reg, sub)
                }
                _ => {
                    return Err(RoleError::invalid(
                        "give either registration_id or subscription_id",
                    ));
                }
            };
            let imsi = sub.imsi;
            Ok(Response::new(pb::GetRegistrationResponse {
                state: i32::try_from(reg.state).unwrap_or(0),
                detail: reg.detail,
                imsi,
                discard_ack: reg.discard_ack.unwrap_or_default(),
                registration_id: reg.id,
            }))
        })
        .await
    }

    async fn get_auth_vectors(
        &self,
        req: Request<pb::GetAuthVectorsRequest>,
    ) -> Result<Response<pb::GetAuthVectorsResponse>, Status> {
        role(async move {
            authorized(&req)?;
            let r = req.into_inner();
            // Only for the device the MCIM was provisioned to; another device's IMSI is
            // answered as an unknown one.
            if !self.0.imsi_live_on(&r.imsi, &r.pcid).await? {
                // The caller hears what it would for an IMSI nobody holds; the operator's
                // log says when a live IMSI was presented by another device (a cloned or
                // stolen identity).
                if self.0.imsi_live(&r.imsi).await? {
                    tracing::warn!(imsi = %r.imsi, pcid = %r.pcid, "refused: vectors asked for a live IMSI from a device it was not provisioned to");
                }
                return Err(RoleError::not_found(
                    "no provisioned MCIM with this IMSI on this device",
                ));
            }
            let vectors = self
                .0
                .auc
                .vectors(&r.imsi, r.count.max(1), r.resync.as_ref())
                .await?;
            Ok(Response::new(pb::GetAuthVectorsResponse { vectors }))
        })
        .await
    }

    async fn report_provisioning_status(
        &self,
        req: Request<pb::ReportProvisioningStatusRequest>,
    ) -> Result<Response<pb::ReportProvisioningStatusResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            let r = req.into_inner();
            let st = match common::ProvisioningStatus::try_from(r.status) {
                Ok(common::ProvisioningStatus::Installed) => St::Provisioned,
                Ok(common::ProvisioningStatus::Failed) => St::Failed,
                _ => return Err(RoleError::invalid("status is installed or failed")),
            };
            let reg = self
                .0
                .registration(&r.registration_id)
                .await?
                .ok_or_else(|| RoleError::not_found("no such registration"))?;
            reg.check_ro(&auth)?;
            self.0.report(&r.registration_id, st, &r.detail).await?;
            mcim_telemetry::metrics::count(
                "provisionings",
                "MCIM provisionings the SHO was told of (step 14), by outcome",
                if st == St::Provisioned {
                    "provisioned"
                } else {
                    "failed"
                },
            );
            // Step 14 (5.1.3.7.4.2): registered at the DRF for future discovery.
            if st == St::Provisioned {
                self.0.serve_at_drf(&reg.pcid).await?;
            }
            Ok(Response::new(pb::ReportProvisioningStatusResponse {}))
        })
        .await
    }

    async fn notify_discard(
        &self,
        req: Request<pb::NotifyDiscardRequest>,
    ) -> Result<Response<pb::NotifyDiscardResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            let r = req.into_inner();
            let (ack, at) = self
                .0
                .notice(
                    &auth,
                    DiscardNotice {
                        imsi: r.imsi,
                        notice: r.discard_statement,
                        signature: r.signature,
                        chain: r.device_certificate,
                    },
                )
                .await?;
            Ok(Response::new(pb::NotifyDiscardResponse {
                discard_ack: ack,
                acknowledged_at: Some(prost_types::Timestamp {
                    seconds: at,
                    nanos: 0,
                }),
            }))
        })
        .await
    }

    async fn receive_discard_ack(
        &self,
        req: Request<pb::ReceiveDiscardAckRequest>,
    ) -> Result<Response<pb::ReceiveDiscardAckResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            let r = req.into_inner();
            self.0
                .registration(&r.registration_id)
                .await?
                .ok_or_else(|| RoleError::not_found("no such registration"))?
                .check_ro(&auth)?;
            self.0
                .relayed_ack(&r.registration_id, r.filtered_ack)
                .await?;
            Ok(Response::new(pb::ReceiveDiscardAckResponse {}))
        })
        .await
    }

    async fn instruct_device(
        &self,
        req: Request<pb::InstructDeviceRequest>,
    ) -> Result<Response<pb::InstructDeviceResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            let r = req.into_inner();
            let (instruction_id, seq, imsi) = self.0.instruct(&auth, r.pcid, r.action).await?;
            Ok(Response::new(pb::InstructDeviceResponse {
                instruction_id,
                seq,
                imsi,
            }))
        })
        .await
    }

    async fn get_instruction(
        &self,
        req: Request<pb::GetInstructionRequest>,
    ) -> Result<Response<pb::GetInstructionResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            Ok(Response::new(
                self.0
                    .instruction(&auth, &req.get_ref().instruction_id)
                    .await?,
            ))
        })
        .await
    }
}
