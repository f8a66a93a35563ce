//! The RO's Initial Connectivity Function (TR 33.812 5.1.3.4.4): receives PCIDs and their
//! initial K/OPc from the supplier's CCIF or the subscriber (5.1.3.4.1), makes AVs for them for
//! the VNO (5.1.3.6.2 steps 2-3) and records the grant the VNO gave (step 4), which the DRF
//! accepts (step 5).

use std::sync::Arc;

use mcim_core::identity::Pcid;
use mcim_proto::mcim::ro::v1 as pb;
use mcim_proto::mcim::ro::v1::icf_service_server::IcfService;
use tonic::{Request, Response, Status};

use super::Ro;
use crate::authz::Role;
use crate::error::{RoleError, role};
use crate::gate::authorized;
use crate::store::{db_err, now};

/// The ICF service.
#[derive(Debug, Clone)]
pub struct Icf(pub Arc<Ro>);

fn pcid(s: &str) -> Result<Pcid, RoleError> {
    Pcid::new(s.to_string()).map_err(|e| RoleError::invalid(e.to_string()))
}

#[tonic::async_trait]
impl IcfService for Icf {
    async fn register_initial_credentials(
        &self,
        req: Request<pb::RegisterInitialCredentialsRequest>,
    ) -> Result<Response<pb::RegisterInitialCredentialsResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            // A subscriber registers in its own name (CCIF mode 3) and alone activates the
            // PCID; the supplier's registrations have no subscriber.
            let registered_by = if auth.caller.role == Role::Subscriber {
                auth.caller.name.clone()
            } else {
                String::new()
            };
            let r = req.into_inner();
            let p = pcid(&r.pcid)?;
            let mode = pb::CredentialMode::try_from(r.mode)
                .ok()
                .filter(|m| *m != pb::CredentialMode::Unspecified)
                .ok_or_else(|| RoleError::invalid("the credential mode is required"))?;
            let expires = r.expires_at.map(|t| t.seconds);
            if expires.is_some_and(|e| e <= now()) {
                return Err(RoleError::invalid("the credential has already expired"));
            }
            // Mode 3 comes from a subscriber: only with the supplier's voucher for this very PCID
            // and these credentials (nobody else may claim a PCID first or choose its K).
            if auth.caller.role == Role::Subscriber {
                let v = r.supplier_voucher.as_ref().ok_or_else(|| {
                    RoleError::denied("the credentials carry no voucher of the device's supplier")
                })?;
                let ca = mcim_pki::dev::ca_der(
                    &self.0.pki,
                    &mcim_pki::dev::issuer_name(&self.0.pki, Role::Supplier),
                )?;
                mcim_pki::voucher::verify(
                    &ca,
                    &v.supplier_certificate,
                    &v.signature,
                    p.as_str(),
                    &r.k,
                    &r.opc,
                )
                .map_err(|e| RoleError::denied(e.to_string()))?;
            }
            self.0.auc.provision(p.as_str(), &r.k, &r.opc).await?;
            sqlx::query(
                "INSERT INTO icf_pcid (pcid, mode, expires_at, active, registered_by) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT(pcid) DO NOTHING",
            )
            .bind(p.as_str())
            .bind(mode as i64)
            .bind(expires)
            .bind(i64::from(!r.delayed_activation))
            .bind(&registered_by)
            .execute(&self.0.db)
            .await
            .map_err(db_err)?;
            tracing::info!(pcid = %p.as_str(), ?mode, "initial credentials registered");
            Ok(Response::new(pb::RegisterInitialCredentialsResponse {}))
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
            let p = pcid(&r.pcid)?;
            let row: Option<(Option<i64>, i64)> =
                sqlx::query_as("SELECT expires_at, active FROM icf_pcid WHERE pcid = $1")
                    .bind(p.as_str())
                    .fetch_optional(&self.0.db)
                    .await
                    .map_err(db_err)?;
            match row {
                None => return Err(RoleError::not_found("unknown PCID")),
                Some((_, 0)) => {
                    return Err(RoleError::conflict(
                        "the PCID awaits activation by its subscriber",
                    ));
                }
                Some((Some(e), _)) if e <= now() => {
                    return Err(RoleError::conflict(
                        "the PCID's initial credential has expired",
                    ));
                }
                _ => {}
            }
            let vectors = self
                .0
                .auc
                .vectors(p.as_str(), r.count.max(1), r.resync.as_ref())
                .await?;
            Ok(Response::new(pb::GetAuthVectorsResponse { vectors }))
        })
        .await
    }

    async fn report_attach(
        &self,
        req: Request<pb::ReportAttachRequest>,
    ) -> Result<Response<pb::ReportAttachResponse>, Status> {
        role(async move {
            authorized(&req)?;
            let r = req.into_inner();
            let p = pcid(&r.pcid)?;
            if r.grant_id.is_empty() {
                return Err(RoleError::invalid("grant_id is required"));
            }
            let expires = r
                .expires_at
                .map(|t| t.seconds)
                .unwrap_or_else(|| now() + super::GRANT_LIFETIME_SECS)
                .min(now() + super::GRANT_LIFETIME_SECS);
            sqlx::query(
                "INSERT INTO ro_grant (grant_id, pcid, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT(grant_id) DO NOTHING",
            )
            .bind(&r.grant_id)
            .bind(p.as_str())
            .bind(expires)
            .execute(&self.0.db)
            .await
            .map_err(db_err)?;
            Ok(Response::new(pb::ReportAttachResponse {}))
        })
        .await
    }

    async fn activate_pcid(
        &self,
        req: Request<pb::ActivatePcidRequest>,
    ) -> Result<Response<pb::ActivatePcidResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            let p = pcid(&req.get_ref().pcid)?;
            let (registered_by,): (String,) =
                sqlx::query_as("SELECT registered_by FROM icf_pcid WHERE pcid = $1")
                    .bind(p.as_str())
                    .fetch_optional(&self.0.db)
                    .await
                    .map_err(db_err)?
                    .ok_or_else(|| RoleError::not_found("unknown PCID"))?;
            // Only the subscriber that registered the PCID activates it (annex x.1).
            auth.owns(&registered_by)?;
            let done = sqlx::query("UPDATE icf_pcid SET active = 1 WHERE pcid = $1")
                .bind(p.as_str())
                .execute(&self.0.db)
                .await
                .map_err(db_err)?;
            if done.rows_affected() == 0 {
                return Err(RoleError::not_found("unknown PCID"));
            }
            Ok(Response::new(pb::ActivatePcidResponse {}))
        })
        .await
    }

    async fn renew_initial_credentials(
        &self,
        req: Request<pb::RenewInitialCredentialsRequest>,
    ) -> Result<Response<pb::RenewInitialCredentialsResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            Ok(Response::new(
                self.0.renew_credential(&auth, req.into_inner()).await?,
            ))
        })
        .await
    }

    async fn offer_renewal(
        &self,
        req: Request<pb::OfferRenewalRequest>,
    ) -> Result<Response<pb::OfferRenewalResponse>, Status> {
        role(async move {
            authorized(&req)?;
            let p = pcid(&req.get_ref().pcid)?;
            self.0.offer_renewal(p.as_str()).await?;
            Ok(Response::new(pb::OfferRenewalResponse {}))
        })
        .await
    }

    async fn confirm_initial_credentials(
        &self,
        req: Request<pb::ConfirmInitialCredentialsRequest>,
    ) -> Result<Response<pb::ConfirmInitialCredentialsResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            let r = req.into_inner();
            self.0.confirm_credential(&auth, &r.pcid, &r.nonce).await?;
            Ok(Response::new(pb::ConfirmInitialCredentialsResponse {}))
        })
        .await
    }
}
