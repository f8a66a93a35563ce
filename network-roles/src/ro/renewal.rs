//! Renewal of a PCID's initial connectivity credential at the ICF (TR 33.812 5.1.3.7.4.3: "a
//! way to renew the initial connectivity credentials ... should be provided"). The device asks
//! for it over the connectivity it has (its TLS identity is its PCID); the ICF makes a new K
//! and OPc, keeps them beside the ones in use (AuC id `renewal:<pcid>`), and answers them
//! wrapped for the device's TRE in an MCIM package the RO signs, bound to the device's nonce.
//! The one in use stays valid until the device confirms it installed the new one: no moment
//! where the ICF and the device hold different credentials for the PCID and neither works.

use mcim_core::package::{self, McimPackagePayload, McimPolicy, UsimData};
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::ro::v1 as pb;

use super::Ro;
use crate::error::RoleError;
use crate::gate::Authorized;
use crate::store::{db_err, now};

/// How long a renewed credential lasts.
pub const RENEWED_LIFETIME_SECS: i64 = 365 * 24 * 3600;

/// Where the pending credential waits in the ICF's AuC.
fn pending_id(pcid: &str) -> String {
    format!("renewal:{pcid}")
}

impl Ro {
    /// A new credential for the calling device's `pcid`, wrapped for its TRE; the same nonce
    /// again answers the same package.
    pub(crate) async fn renew_credential(
        &self,
        auth: &Authorized,
        r: pb::RenewInitialCredentialsRequest,
    ) -> Result<pb::RenewInitialCredentialsResponse, RoleError> {
        // The device's own PCID only (the table's owner rule).
        auth.owns(&r.pcid)?;
        let known: Option<(i64,)> = sqlx::query_as("SELECT active FROM icf_pcid WHERE pcid = $1")
            .bind(&r.pcid)
            .fetch_optional(&self.db)
            .await
            .map_err(db_err)?;
        match known {
            None => {
                return Err(RoleError::not_found(
                    "the ICF holds no credential for this PCID",
                ));
            }
            Some((0,)) => {
                return Err(RoleError::conflict(
                    "the PCID awaits activation by its subscriber",
                ));
            }
            Some(_) => {}
        }
        if r.nonce.len() != 16 {
            return Err(RoleError::invalid("the nonce is 16 octets"));
        }
        // Wrapped only to the storage key the supplier certified in this device's TRE (the
        // TLS identity alone is not enough: whoever could use the device's TLS key outside
        // tred would get the credential wrapped to a key of its own), and K only as a key the
        // TRE uses in place: a renewal never downgrades K to sealed data unsealed in the host.
        let cred = mcim_pki::dev::verify_platform_credential(&self.pki, &r.platform_credential)
            .map_err(|e| RoleError::denied(format!("platform credential: {e}")))?;
        if cred.pcid != r.pcid || !cred.certifies_storage_key(&r.storage_public) {
            return Err(RoleError::denied(
                "the storage key is not the one the supplier certified for this PCID's TRE",
            ));
        }
        if r.aka_execution() == common::AkaExecution::UnsealedInHost {
            return Err(RoleError::conflict(
                "the ICF renews only credentials whose K stays a key in the TRE \
                 (this TRE runs AKA in the host: renew at the supplier)",
            ));
        }
        let answer = |package: Vec<u8>, expires_at: i64| pb::RenewInitialCredentialsResponse {
            package: Some(common::McimPackage {
                cose_sign1: package,
            }),
            expires_at: Some(prost_types::Timestamp {
                seconds: expires_at,
                nanos: 0,
            }),
        };
        let pending: Option<(Vec<u8>, Vec<u8>, i64, i64)> = sqlx::query_as(
            "SELECT nonce, package, expires_at, confirmed FROM icf_renewal WHERE pcid = $1",
        )
        .bind(&r.pcid)
        .fetch_optional(&self.db)
        .await
        .map_err(db_err)?;
        if let Some((nonce, package, expires_at, _)) = pending
            && nonce == r.nonce
        {
            return Ok(answer(package, expires_at));
        }
        let target = crate::supplier::tre_target(r.tre_kind, r.aka_execution())?;
        // Wrapped first: a key we cannot wrap to changes nothing.
        let (k, opc, wrapped) = crate::supplier::fresh_wrapped(target, &r.storage_public)?;
        let key = mcim_pki::dev::signing_key(&self.pki, "ro")?;
        let cert = mcim_pki::dev::ca_der(&self.pki, "ro")?;
        let ro_id = mcim_pki::party::caller_from_cert(&cert)?.name;
        let expires_at = now() + RENEWED_LIFETIME_SECS;
        let (mcc, mnc) = r.pcid.split_at(3.min(r.pcid.len()));
        let payload = McimPackagePayload {
            domain: package::DOMAIN.into(),
            registration_id: "renewal".into(),
            registration_nonce: hex::encode(&r.nonce),
            pcid: r.pcid.clone(),
            imsi: r.pcid.clone(),
            sho_id: ro_id,
            algorithm: "milenage".into(),
            milenage_c: Vec::new(),
            milenage_r: Vec::new(),
            wrapped_k: hex::encode(&wrapped.0),
            wrapped_opc: hex::encode(&wrapped.1),
            usim: UsimData {
                home_plmn: format!("{mcc}-{}", &mnc[..2.min(mnc.len())]),
                service_provider_name: String::new(),
                forbidden_plmns: Vec::new(),
                hpplmn_period: None,
            },
            policy: McimPolicy {
                use_for_connectivity: false,
                opc_bound_to_pcrs: false,
            },
            issued_at: u64::try_from(now()).unwrap_or(0),
        };
        let signed =
            package::seal(&key, &payload, &cert).map_err(|e| RoleError::internal(e.to_string()))?;
        // The pending credential replaces an earlier unconfirmed one (its package was never
        // installed, or the device would have confirmed it).
        let pending = pending_id(&r.pcid);
        self.auc.forget(&pending).await?;
        self.auc.provision(&pending, &k[..], &opc[..]).await?;
        sqlx::query(
            "INSERT INTO icf_renewal (pcid, nonce, package, expires_at, confirmed) \
             VALUES ($1, $2, $3, $4, 0) ON CONFLICT (pcid) DO UPDATE SET nonce = excluded.nonce, \
             package = excluded.package, expires_at = excluded.expires_at, confirmed = 0",
        )
        .bind(&r.pcid)
        .bind(&r.nonce)
        .bind(&signed)
        .bind(expires_at)
        .execute(&self.db)
        .await
        .map_err(db_err)?;
        tracing::info!(pcid = %r.pcid, "initial credential renewal offered");
        Ok(answer(signed, expires_at))
    }

    /// Queues a [`pb::RenewalTask`] for the device `pcid` (a PCID the ICF holds).
    pub(crate) async fn offer_renewal(&self, pcid: &str) -> Result<(), RoleError> {
        let queued = self
            .change_with_task(
                sqlx::query("UPDATE icf_pcid SET active = active WHERE pcid = $1 AND active = 1")
                    .bind(pcid),
                pcid,
                pb::watch_device_tasks_response::Task::Renewal(pb::RenewalTask {}),
            )
            .await?;
        if !queued {
            return Err(RoleError::not_found(
                "the ICF holds no active credential for this PCID",
            ));
        }
        tracing::info!(%pcid, "renewal offered to the device");
        Ok(())
    }

    /// The device installed the renewal with `nonce`: the ICF uses it from now on.
    pub(crate) async fn confirm_credential(
        &self,
        auth: &Authorized,
        pcid: &str,
        nonce: &[u8],
    ) -> Result<(), RoleError> {
        auth.owns(pcid)?;
        let pending: Option<(Vec<u8>, i64, i64)> =
            sqlx::query_as("SELECT nonce, expires_at, confirmed FROM icf_renewal WHERE pcid = $1")
                .bind(pcid)
                .fetch_optional(&self.db)
                .await
                .map_err(db_err)?;
        let Some((expected, expires_at, confirmed)) = pending else {
            return Err(RoleError::not_found("no renewal of this PCID's credential"));
        };
        if expected != nonce {
            return Err(RoleError::conflict("not the renewal the ICF offered last"));
        }
        if confirmed != 0 {
            return Ok(());
        }
        self.auc.adopt(&pending_id(pcid), pcid).await?;
        let mut tx = crate::store::begin_write(&self.db).await?;
        sqlx::query("UPDATE icf_pcid SET expires_at = $1 WHERE pcid = $2")
            .bind(expires_at)
            .bind(pcid)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        sqlx::query("UPDATE icf_renewal SET confirmed = 1 WHERE pcid = $1")
            .bind(pcid)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        tracing::info!(%pcid, "renewed initial credential in use");
        Ok(())
    }
}
