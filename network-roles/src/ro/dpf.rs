//! The RO's MCIM Download and Provisioning Function (TR 33.812 5.1.3.4.3): takes the SHO's
//! authorisation and package (5.1.3.6.2 step 11) after checking the PVA's result it relied on,
//! lets the device download the package (step 12), takes the device's install report
//! (step 13) and reports it to the SHO (step 14). In a change of SHO (5.1.3.7.4.2) it also
//! orders the device to discard the old SHO's MCIM (step 8) and relays the old SHO's
//! acknowledgment to the new SHO, privacy-filtered (step 11). It also carries an SHO's signed
//! remote instructions to the device and keeps the device's reports (5.1.1.3;
//! `instructions.rs`). What the device must hear reaches it on the task stream it opened
//! itself.

use std::sync::Arc;
use std::time::Duration;

use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::ro::v1 as pb;
use mcim_proto::mcim::ro::v1::dpf_service_server::DpfService;
use mcim_proto::mcim::sho::v1 as sho;
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{Registration, Ro};
use crate::authz::Role;
use crate::error::{RoleError, role};
use crate::gate::{Authorized, authorized};
use crate::peers::role_verifying_key;
use crate::store::{db_err, now};

/// An open task stream wakes when this RO queues a task, and re-reads at least this often
/// (tasks queued by another RO process on the same database).
const TASK_POLL: Duration = crate::store::REREAD;

/// The DPF service.
#[derive(Debug, Clone)]
pub struct Dpf(pub Arc<Ro>);

impl Dpf {
    /// The order to discard the old SHO's MCIM for a change registration: the IMSI the device
    /// reported installed from that SHO, and where that SHO is (the DRF's subscription).
    async fn discard_task(&self, reg: &Registration) -> Result<pb::DiscardTask, RoleError> {
        let old = self.old_mcim(reg).await?;
        let old_sho_url = match self.0.sho_url(&reg.pcid).await? {
            Some((id, url)) if id == reg.change_from => url,
            _ => {
                return Err(RoleError::conflict(
                    "the SHO the device changes from no longer serves it",
                ));
            }
        };
        Ok(pb::DiscardTask {
            mcim_id: old.unwrap_or_default(),
            old_sho_url,
            registration_id: reg.id.clone(),
        })
    }

    /// The MCIM (IMSI) the device reported installed from the SHO a change registration
    /// changes from, when the RO saw that install.
    async fn old_mcim(&self, reg: &Registration) -> Result<Option<String>, RoleError> {
        let old: Option<(String,)> = sqlx::query_as(
            "SELECT mcim_id FROM ro_registration WHERE pcid = $1 AND sho_id = $2 \
             AND state = 'installed' ORDER BY made DESC LIMIT 1",
        )
        .bind(&reg.pcid)
        .bind(&reg.change_from)
        .fetch_optional(&self.0.db)
        .await
        .map_err(db_err)?;
        Ok(old.map(|(m,)| m).filter(|m| !m.is_empty()))
    }

    /// A registration, for the SHO the device registered at only (it alone authorises or
    /// refuses it, 5.1.3.6.2 steps 10-11; the table's ownership rule).
    async fn registration_of(
        &self,
        auth: &Authorized,
        id: &str,
    ) -> Result<Registration, RoleError> {
        let reg = self.0.registration(id).await?;
        auth.owns(&reg.sho_id)?;
        Ok(reg)
    }
}

#[tonic::async_trait]
impl DpfService for Dpf {
    async fn authorize_provisioning(
        &self,
        req: Request<pb::AuthorizeProvisioningRequest>,
    ) -> Result<Response<pb::AuthorizeProvisioningResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            let r = req.into_inner();
            let reg = self.registration_of(&auth, &r.registration_id).await?;
            let package = r
                .package
                .map(|p| p.cose_sign1)
                .filter(|p| !p.is_empty())
                .ok_or_else(|| RoleError::invalid("the package is required"))?;
            // The DPF relies on the PVA too: a positive, fresh result for this very device.
            let validation = r
                .validation
                .ok_or_else(|| RoleError::invalid("the validation result is required"))?;
            let pva = role_verifying_key(&self.0.pki, Role::Pva)?;
            let now_s = u64::try_from(now()).unwrap_or(0);
            mcim_core::validation::verify(&validation.cose_sign1, &pva, &reg.pcid, now_s)
                .map_err(|e| RoleError::conflict(e.to_string()))?;
            match (&reg.package, reg.state.as_str()) {
                (Some(p), _) if *p == package => {
                    return Ok(Response::new(pb::AuthorizeProvisioningResponse {}));
                }
                (Some(_), _) => {
                    return Err(RoleError::exists(
                        "this registration already has another package",
                    ));
                }
                (None, "validating") => {}
                (None, s) => {
                    return Err(RoleError::conflict(format!("the registration is {s}")));
                }
            }
            // The package and the device's download task; in a change of SHO, then the order
            // to discard the old SHO's MCIM (5.1.3.7.4.2 steps 7-8).
            let mut tasks = vec![pb::watch_device_tasks_response::Task::Download(
                pb::DownloadTask {
                    registration_id: reg.id.clone(),
                },
            )];
            if reg.discards() {
                tasks.push(pb::watch_device_tasks_response::Task::Discard(
                    self.discard_task(&reg).await?,
                ));
            }
            let authorised = self
                .0
                .change_with_tasks(
                    sqlx::query(
                        "UPDATE ro_registration SET package = $1, state = 'authorized' \
                     WHERE id = $2 AND package IS NULL AND state = 'validating'",
                    )
                    .bind(package)
                    .bind(&reg.id),
                    &reg.pcid,
                    tasks,
                )
                .await?;
            if authorised {
                tracing::info!(pcid = %reg.pcid, registration = %reg.id, "provisioning authorised");
            }
            Ok(Response::new(pb::AuthorizeProvisioningResponse {}))
        })
        .await
    }

    async fn refuse_provisioning(
        &self,
        req: Request<pb::RefuseProvisioningRequest>,
    ) -> Result<Response<pb::RefuseProvisioningResponse>, Status> {
        role(async move {
        let auth = authorized(&req)?;
        let r = req.into_inner();
        let reg = self.registration_of(&auth, &r.registration_id).await?;
        match reg.state.as_str() {
            "refused" => return Ok(Response::new(pb::RefuseProvisioningResponse {})),
            "validating" => {}
            s => {
                return Err(RoleError::conflict(format!(
                    "the registration is {s}"
                )));
            }
        }
        // The refusal and the device's task.
        let refused = self
            .0
            .change_with_task(
                sqlx::query(
                    "UPDATE ro_registration SET state = 'refused', detail = $1 \
                     WHERE id = $2 AND state = 'validating'",
                )
                .bind(&r.reason)
                .bind(&reg.id),
                &reg.pcid,
                pb::watch_device_tasks_response::Task::Refused(pb::RefusedTask {
                    registration_id: reg.id.clone(),
                    reason: r.reason.clone(),
                }),
            )
            .await?;
        if refused {
            tracing::info!(pcid = %reg.pcid, registration = %reg.id, "provisioning refused by the SHO: {}", r.reason);
        }
        Ok(Response::new(pb::RefuseProvisioningResponse {}))
        })
        .await
    }

    type WatchDeviceTasksStream = ReceiverStream<Result<pb::WatchDeviceTasksResponse, Status>>;

    async fn watch_device_tasks(
        &self,
        req: Request<pb::WatchDeviceTasksRequest>,
    ) -> Result<Response<Self::WatchDeviceTasksStream>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            let pcid = auth.caller.name;
            let ack = i64::try_from(req.get_ref().ack_seq).unwrap_or(i64::MAX);
            // A device acknowledges only tasks it was sent; anything more deletes nothing.
            // Acknowledged tasks are done with; the rest is replayed (nothing to delete for a
            // device that acknowledges none).
            if ack > 0 {
                let sent: Option<(i64,)> =
                    sqlx::query_as("SELECT last_seq FROM ro_task_sent WHERE pcid = $1")
                        .bind(&pcid)
                        .fetch_optional(&self.0.db)
                        .await
                        .map_err(db_err)?;
                let sent = sent.map_or(0, |(s,)| s);
                if ack > sent {
                    return Err(RoleError::invalid(format!(
                        "ack_seq {ack} acknowledges tasks this device was not sent (last sent: {sent})"
                    )));
                }
                sqlx::query("DELETE FROM ro_task WHERE pcid = $1 AND seq <= $2")
                    .bind(&pcid)
                    .bind(ack)
                    .execute(&self.0.db)
                    .await
                    .map_err(db_err)?;
            }
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let ro = self.0.clone();
            tokio::spawn(async move {
                let db = &ro.db;
                let mut sent = ack;
                loop {
                    let mut queued = ro.tasks.watch();
                    let rows: Result<Vec<(i64, Vec<u8>)>, _> = sqlx::query_as(
                        "SELECT seq, body FROM ro_task WHERE pcid = $1 AND seq > $2 ORDER BY seq",
                    )
                    .bind(&pcid)
                    .bind(sent)
                    .fetch_all(db)
                    .await;
                    let rows = match rows {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = tx.send(Err(db_err(e).into())).await;
                            return;
                        }
                    };
                    for (seq, body) in rows {
                        let mut t = match pb::WatchDeviceTasksResponse::decode(body.as_slice()) {
                            Ok(t) => t,
                            Err(e) => {
                                tracing::error!("stored task {seq} for {pcid}: {e}");
                                sent = seq;
                                continue;
                            }
                        };
                        t.seq = u64::try_from(seq).unwrap_or(0);
                        // Recorded before it goes out, so the device's acknowledgement can
                        // never arrive before the record.
                        if let Err(e) = sqlx::query(
                            "INSERT INTO ro_task_sent (pcid, last_seq) VALUES ($1, $2) \
                             ON CONFLICT(pcid) DO UPDATE SET \
                             last_seq = CASE WHEN excluded.last_seq > ro_task_sent.last_seq \
                             THEN excluded.last_seq ELSE ro_task_sent.last_seq END",
                        )
                        .bind(&pcid)
                        .bind(seq)
                        .execute(db)
                        .await
                        {
                            let _ = tx.send(Err(db_err(e).into())).await;
                            return;
                        }
                        if tx.send(Ok(t)).await.is_err() {
                            return;
                        }
                        sent = seq;
                    }
                    if ro.stopping() {
                        return;
                    }
                    tokio::select! {
                        _ = tx.closed() => return,
                        _ = queued.wait(TASK_POLL) => {}
                    }
                    if ro.stopping() {
                        return;
                    }
                }
            });
            Ok(Response::new(ReceiverStream::new(rx)))
        })
        .await
    }

    async fn download_package(
        &self,
        req: Request<pb::DownloadPackageRequest>,
    ) -> Result<Response<pb::DownloadPackageResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            let reg = self.0.registration(&req.get_ref().registration_id).await?;
            auth.owns(&reg.pcid)?;
            let package = reg
                .package
                .ok_or_else(|| RoleError::conflict("the SHO has not authorised it yet"))?;
            sqlx::query("UPDATE ro_registration SET downloads = downloads + 1 WHERE id = $1")
                .bind(&reg.id)
                .execute(&self.0.db)
                .await
                .map_err(db_err)?;
            Ok(Response::new(pb::DownloadPackageResponse {
                package: Some(common::McimPackage {
                    cose_sign1: package,
                }),
            }))
        })
        .await
    }

    async fn report_provisioning_status(
        &self,
        req: Request<pb::ReportProvisioningStatusRequest>,
    ) -> Result<Response<pb::ReportProvisioningStatusResponse>, Status> {
        role(async move {
        let auth = authorized(&req)?;
        let reg = self.0.registration(&req.get_ref().registration_id).await?;
        auth.owns(&reg.pcid)?;
        let r = req.into_inner();
        let (state, st) = match common::ProvisioningStatus::try_from(r.status) {
            Ok(common::ProvisioningStatus::Installed) => {
                ("installed", common::ProvisioningStatus::Installed)
            }
            Ok(common::ProvisioningStatus::Failed) => {
                ("failed", common::ProvisioningStatus::Failed)
            }
            _ => return Err(RoleError::invalid("status is installed or failed")),
        };
        if reg.package.is_none() {
            return Err(RoleError::conflict(
                "nothing was downloaded for this registration",
            ));
        }
        // A change of SHO installs after the old SHO's acknowledgment reached the new one
        // (5.1.3.7.4.2 steps 11-13).
        if st == common::ProvisioningStatus::Installed && reg.discards() && reg.discard_relayed == 0
        {
            return Err(RoleError::conflict(
                "a change of SHO: relay the old SHO's discard acknowledgment first (step 11)",
            ));
        }
        let sho_url = self.0.registration_sho_url(&reg).await?;
        // Recorded first: the SHO, told next, registers at the DRF as the device's SHO
        // (5.1.3.7.4.2 step 14), which the DRF allows for an installed registration. A retry
        // reports again (the SHO is idempotent).
        // Forward only (from authorised, or the same outcome again): an installed MCIM is never
        // turned into a failure by a later report, nor the reverse.
        let detail: String = r
            .detail
            .chars()
            .take(crate::sho::MAX_REPORT_DETAIL)
            .collect();
        // The same outcome again (a retry) keeps the first report's detail and MCIM id.
        let done = sqlx::query(
            "UPDATE ro_registration SET state = $1, \
             detail = CASE WHEN state = $1 THEN detail ELSE $2 END, \
             mcim_id = CASE WHEN state = $1 THEN mcim_id ELSE $3 END WHERE id = $4 \
             AND state NOT IN ('installed', 'failed') OR (id = $5 AND state = $6)",
        )
        .bind(state)
        .bind(&detail)
        .bind(&r.mcim_id)
        .bind(&reg.id)
        .bind(&reg.id)
        .bind(state)
        .execute(&self.0.db)
        .await
        .map_err(db_err)?;
        if done.rows_affected() != 1 {
            return Err(RoleError::conflict(
                "this registration's outcome was reported already",
            ));
        }
        // Step 14 (5.1.3.6.2) / 13 (5.1.3.7.4.2): the SHO hears it.
        self.0
            .sho(&sho_url)
            .await?
            .report_provisioning_status(sho::ReportProvisioningStatusRequest {
                registration_id: reg.id.clone(),
                status: st as i32,
                detail,
            })
            .await
            .map_err(RoleError::peer(Role::Sho))?;
        tracing::info!(pcid = %reg.pcid, registration = %reg.id, state, "provisioning reported");
        Ok(Response::new(pb::ReportProvisioningStatusResponse {}))
        })
        .await
    }

    async fn relay_discard_ack(
        &self,
        req: Request<pb::RelayDiscardAckRequest>,
    ) -> Result<Response<pb::RelayDiscardAckResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            let reg = self.0.registration(&req.get_ref().registration_id).await?;
            auth.owns(&reg.pcid)?;
            if !reg.discards() {
                return Err(RoleError::conflict(
                    "not a change of SHO over the old connectivity: nothing to relay",
                ));
            }
            let ack = req.into_inner().discard_ack;
            // The old SHO's own signature, for this device.
            let cert = mcim_core::signed::signer_certificate(&ack)
                .map_err(|e| RoleError::invalid(format!("the acknowledgment: {e}")))?;
            let anchors = mcim_pki::dev::trust_anchors(&self.0.pki)?;
            let key = mcim_pki::party::party_key(&anchors, &cert, Role::Sho, &reg.change_from)
                .map_err(|e| RoleError::denied(format!("the acknowledgment: {e}")))?;
            let a: mcim_pki::discard::Ack = mcim_core::signed::open(&ack, &key)
                .map_err(|e| RoleError::denied(format!("the acknowledgment: {e}")))?;
            // For the MCIM this change discards (when the RO knows it), acknowledged after it
            // was discarded.
            let old = self.old_mcim(&reg).await?;
            if a.kind != mcim_pki::discard::ACK_KIND
                || a.pcid != reg.pcid
                || a.sho != reg.change_from
                || old.is_some_and(|m| m != a.imsi)
                || a.acknowledged_at < a.discarded_at
            {
                return Err(RoleError::denied(
                    "the acknowledgment is not the old SHO's for this device",
                ));
            }
            // Privacy filtering (step 11): when, and nothing of the old subscription.
            let filtered = serde_json::to_vec(&mcim_pki::discard::FilteredAck {
                registration_id: reg.id.clone(),
                discarded_at: a.discarded_at,
                acknowledged_at: a.acknowledged_at,
            })
            .map_err(|e| RoleError::internal(e.to_string()))?;
            let sho_url = self.0.registration_sho_url(&reg).await?;
            self.0
                .sho(&sho_url)
                .await?
                .receive_discard_ack(sho::ReceiveDiscardAckRequest {
                    registration_id: reg.id.clone(),
                    filtered_ack: filtered,
                })
                .await
                .map_err(RoleError::peer(Role::Sho))?;
            sqlx::query("UPDATE ro_registration SET discard_relayed = 1 WHERE id = $1")
                .bind(&reg.id)
                .execute(&self.0.db)
                .await
                .map_err(db_err)?;
            tracing::info!(pcid = %reg.pcid, registration = %reg.id, "the old SHO's acknowledgment relayed, filtered");
            Ok(Response::new(pb::RelayDiscardAckResponse {}))
        })
        .await
    }

    async fn queue_instruction(
        &self,
        req: Request<pb::QueueInstructionRequest>,
    ) -> Result<Response<pb::QueueInstructionResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            let r = req.into_inner();
            let instruction_id = self
                .0
                .queue_instruction(&auth, &r.pcid, r.instruction)
                .await?;
            Ok(Response::new(pb::QueueInstructionResponse {
                instruction_id,
            }))
        })
        .await
    }

    async fn report_instruction(
        &self,
        req: Request<pb::ReportInstructionRequest>,
    ) -> Result<Response<pb::ReportInstructionResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            self.0.report_instruction(&auth, req.into_inner()).await?;
            Ok(Response::new(pb::ReportInstructionResponse {}))
        })
        .await
    }

    async fn get_instruction_report(
        &self,
        req: Request<pb::GetInstructionReportRequest>,
    ) -> Result<Response<pb::GetInstructionReportResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            Ok(Response::new(
                self.0
                    .instruction_report(&auth, &req.get_ref().instruction_id)
                    .await?,
            ))
        })
        .await
    }
}
