//! The RO's Discovery and Registration Function (TR 33.812 5.1.3.4.2): the device connects
//! under the VNO's grant (3GPP access, 5.1.3.6.2 step 5) or straight over its TLS identity
//! (non-3GPP access, 5.1.3.6.3); the DRF finds the SHO that subscribed for the PCID (step 6)
//! and registers the device there (step 7) or, in a change of SHO (5.1.3.7.4.2), at the SHO
//! the device's subscriber moved it to, then relays the SHO's validation request to the
//! device over its task stream (step 8, "may also be forwarded via the RO").

use std::sync::Arc;

use mcim_core::identity::Pcid;
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::ro::v1 as pb;
use mcim_proto::mcim::ro::v1::drf_service_server::DrfService;
use mcim_proto::mcim::sho::v1 as sho;
use tonic::{Request, Response, Status};

use super::Ro;
use crate::authz::Role;
use crate::error::{RoleError, role};
use crate::gate::authorized;
use crate::store::{db_err, new_id, now};

/// The DRF service.
#[derive(Debug, Clone)]
pub struct Drf(pub Arc<Ro>);

#[tonic::async_trait]
impl DrfService for Drf {
    async fn get_bootstrap(
        &self,
        req: Request<pb::GetBootstrapRequest>,
    ) -> Result<Response<pb::GetBootstrapResponse>, Status> {
        role(async move {
        let id = req.get_ref().device_id.clone();
        authorized(&req)?.owns(&id)?;
        Err(RoleError::not_built(
            "OMA DM bootstrap (annex x.2.2) is not built yet; devices are configured with the RO's address",
        ))
        })
        .await
    }

    async fn register_device(
        &self,
        req: Request<pb::RegisterDeviceRequest>,
    ) -> Result<Response<pb::RegisterDeviceResponse>, Status> {
        role(async move {
        let pcid = req.get_ref().pcid.clone();
        authorized(&req)?.owns(&pcid)?;
        let r = req.into_inner();
        Pcid::new(pcid.clone()).map_err(|e| RoleError::invalid(e.to_string()))?;
        let access =
            common::AccessType::try_from(r.access).unwrap_or(common::AccessType::Unspecified);
        // A change of SHO (5.1.3.7.4.2; 5.1.3.7.4.3): the device names the SHO its subscriber
        // moved it to, which must have announced it (step 1); the device is on the old SHO's
        // connectivity (or its PCID's), known by its TLS identity.
        let change = !r.new_sho_id.is_empty();
        if (r.pristine || r.keep_old) && !change {
            return Err(RoleError::invalid(
                "pristine and keep_old name the SHO changed to (new_sho_id)",
            ));
        }
        if r.pristine && r.keep_old {
            return Err(RoleError::invalid(
                "a revert to the pristine state keeps no old MCIM",
            ));
        }
        match access {
            // Step 5: only under a live grant the VNO reported for this PCID.
            common::AccessType::AccessType3gpp if !change => {
                let grant: Option<(String, i64)> =
                    sqlx::query_as("SELECT pcid, expires_at FROM ro_grant WHERE grant_id = $1")
                        .bind(&r.grant_id)
                        .fetch_optional(&self.0.db)
                        .await
                        .map_err(db_err)?;
                match grant {
                    Some((p, e)) if p == pcid && e > now() => {}
                    Some((p, _)) if p == pcid => {
                        return Err(RoleError::denied("the VNO's grant has expired"));
                    }
                    _ => {
                        return Err(RoleError::denied(
                            "no grant from a VNO for this PCID (attach first)",
                        ));
                    }
                }
            }
            // 5.1.3.6.3: the device's TLS identity (checked by the table) is what it shows.
            common::AccessType::AccessType3gpp | common::AccessType::Non3gpp => {}
            common::AccessType::Unspecified => {
                return Err(RoleError::invalid("access type is required"));
            }
        }
        // Step 6: the SHO that serves the device, or the one it changes to.
        let current = self.0.sho_url(&pcid).await?;
        let old_sho_url = match (&current, change) {
            (Some((_, url)), true) => url.clone(),
            _ => String::new(),
        };
        let (sho_id, sho_url, change_from) = if change {
            let (old, _) = current.ok_or_else(|| {
                RoleError::conflict(
                    "no SHO serves this PCID yet: provision it first (a change of SHO needs one)",
                )
            })?;
            if old == r.new_sho_id {
                return Err(RoleError::conflict(format!(
                    "{old} already serves this PCID"
                )));
            }
            let url = self.0.sho_offer(&pcid, &r.new_sho_id).await?.ok_or_else(|| {
                RoleError::conflict(format!(
                    "{} has no contract for this PCID (the subscriber contracts there first, \
                     5.1.3.7.4.2 step 1)",
                    r.new_sho_id
                ))
            })?;
            (r.new_sho_id.clone(), url, old)
        } else {
            let (id, url) = current.ok_or_else(|| {
                RoleError::conflict("no SHO has a subscription for this PCID")
            })?;
            (id, url, String::new())
        };
        // Idempotent: a registration still in progress at that SHO is the answer again.
        let open: Option<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT id, nonce FROM ro_registration \
             WHERE pcid = $1 AND sho_id = $2 AND state IN ('validating', 'authorized')",
        )
        .bind(&pcid)
        .bind(&sho_id)
        .fetch_optional(&self.0.db)
        .await
        .map_err(db_err)?;
        if let Some((id, nonce)) = open {
            return Ok(Response::new(pb::RegisterDeviceResponse {
                registration_id: id,
                sho_id,
                registration_nonce: nonce,
                old_sho_url,
            }));
        }
        // Step 7: register at the SHO, which asks the PVA for a validation (step 8).
        let id = new_id();
        let mut nonce = [0u8; 32];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut nonce);
        let v = self
            .0
            .sho(&sho_url)
            .await?
            .register_device(sho::RegisterDeviceRequest {
                registration_id: id.clone(),
                pcid: pcid.clone(),
                registration_nonce: nonce.to_vec(),
                dpf_url: self.0.dpf_url.clone(),
            })
            .await
            .map_err(RoleError::peer(Role::Sho))?
            .into_inner();
        // The registration and the device's attestation task.
        self.0
            .change_with_task(
                sqlx::query(
                    "INSERT INTO ro_registration (id, pcid, access, sho_id, nonce, state, \
                     sho_url, change_from, pristine, keep_old, made) \
                     SELECT $1, $2, $3, $4, $5, 'validating', $6, $7, $8, $9, \
                     COALESCE(MAX(made), 0) + 1 FROM ro_registration",
                )
                .bind(&id)
                .bind(&pcid)
                .bind(access as i64)
                .bind(&sho_id)
                .bind(nonce.to_vec())
                .bind(&sho_url)
                .bind(&change_from)
                .bind(i64::from(r.pristine))
                .bind(i64::from(r.keep_old)),
                &pcid,
                pb::watch_device_tasks_response::Task::Attest(pb::AttestationTask {
                    validation_id: v.validation_id,
                    nonce: v.nonce,
                    pva_url: v.pva_url,
                    registration_id: id.clone(),
                }),
            )
            .await?;
        tracing::info!(%pcid, registration = %id, sho = %sho_id, change = change, "device registered at its SHO");
        Ok(Response::new(pb::RegisterDeviceResponse {
            registration_id: id,
            sho_id,
            registration_nonce: nonce.to_vec(),
            old_sho_url,
        }))
        })
        .await
    }

    async fn set_subscription(
        &self,
        req: Request<pb::SetSubscriptionRequest>,
    ) -> Result<Response<pb::SetSubscriptionResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            let r = req.into_inner();
            Pcid::new(r.pcid.clone()).map_err(|e| RoleError::invalid(e.to_string()))?;
            // An SHO speaks for itself only.
            auth.owns(&r.sho_id)?;
            if !r.sho_url.starts_with("https://") {
                return Err(RoleError::invalid("sho_url must be https://host:port"));
            }
            // The row names the caller at this address already (every report of an initial
            // provisioning, 5.1.3.7.4.2 step 14 repeated): nothing to change, no write.
            if self
                .0
                .sho_url(&r.pcid)
                .await?
                .is_some_and(|(sho, url)| sho == r.sho_id && url == r.sho_url)
            {
                return Ok(Response::new(pb::SetSubscriptionResponse {}));
            }
            // A PCID another SHO serves stays that SHO's: the update applies only to the
            // caller's own row, or to a device that re-provisioned at the caller in a change
            // of SHO (5.1.3.7.4.2 step 14). Otherwise the caller is, at most, the SHO the
            // device may change to (step 1).
            let mut tx = crate::store::begin_write(&self.0.db).await?;
            // The device's latest installed MCIM must be the caller's, from a change (an SHO
            // the device has since left cannot take it back).
            let latest: Option<(String, String)> = sqlx::query_as(
                "SELECT sho_id, change_from FROM ro_registration WHERE pcid = $1 \
                 AND state = 'installed' ORDER BY made DESC LIMIT 1",
            )
            .bind(&r.pcid)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?;
            let changed = latest.filter(|(sho, from)| *sho == r.sho_id && !from.is_empty());
            let sql = if changed.is_some() {
                "INSERT INTO ro_subscription (pcid, sho_id, sho_url) VALUES ($1, $2, $3) \
                 ON CONFLICT(pcid) DO UPDATE SET sho_id = excluded.sho_id, \
                 sho_url = excluded.sho_url"
            } else {
                "INSERT INTO ro_subscription (pcid, sho_id, sho_url) VALUES ($1, $2, $3) \
                 ON CONFLICT(pcid) DO UPDATE SET sho_url = excluded.sho_url \
                 WHERE ro_subscription.sho_id = excluded.sho_id"
            };
            let done = sqlx::query(sql)
                .bind(&r.pcid)
                .bind(&r.sho_id)
                .bind(&r.sho_url)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            if done.rows_affected() == 0 {
                if !r.change_of_sho {
                    return Err(RoleError::denied("another SHO serves this PCID"));
                }
                sqlx::query(
                    "INSERT INTO ro_sho_offer (pcid, sho_id, sho_url) VALUES ($1, $2, $3) \
                     ON CONFLICT(pcid, sho_id) DO UPDATE SET sho_url = excluded.sho_url",
                )
                .bind(&r.pcid)
                .bind(&r.sho_id)
                .bind(&r.sho_url)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
                tracing::info!(pcid = %r.pcid, sho = %r.sho_id, "an SHO the device may change to");
            } else if changed.is_some() {
                sqlx::query("DELETE FROM ro_sho_offer WHERE pcid = $1")
                    .bind(&r.pcid)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                tracing::info!(pcid = %r.pcid, sho = %r.sho_id, "the device's SHO changed");
            }
            tx.commit().await.map_err(db_err)?;
            Ok(Response::new(pb::SetSubscriptionResponse {}))
        })
        .await
    }
}
