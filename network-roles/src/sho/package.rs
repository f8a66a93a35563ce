//! The MCIM package (5.1.3.6.2 step 11): new K and OPc for the subscription's IMSI, into the
//! SHO's AuC and wrapped for the device's TRE, signed by the SHO and bound to the
//! registration; built once per registration.

use mcim_core::package::{self, McimPackagePayload, McimPolicy, UsimData};
use mcim_proto::mcim::common::v1 as common;

use super::Sho;
use crate::error::RoleError;
use crate::store::{db_err, now};

impl Sho {
    /// New K and OPc for the subscription's IMSI, wrapped for the device's TRE, in a package
    /// signed by the SHO and bound to the registration nonce. K leaves the SHO only wrapped:
    /// as a TPM AES key (AKA in the TPM), or, for a TPM the PVA found running AKA with K
    /// unsealed in the host (`aka_in_host`: no TPM2_EncryptDecrypt2), as sealed data.
    pub(super) async fn build_package(
        &self,
        id: &str,
        pcid: &str,
        nonce: &[u8],
        aka_in_host: bool,
    ) -> Result<Vec<u8>, RoleError> {
        let sub = self
            .subscription(pcid)
            .await?
            .ok_or_else(|| RoleError::conflict("the subscription is gone"))?;
        let aka = if aka_in_host {
            common::AkaExecution::UnsealedInHost
        } else {
            common::AkaExecution::InTre
        };
        // The subscription's TRE, checked at contract time: a failure here is its state's.
        let as_state = |e: RoleError| match e {
            RoleError::Invalid(m) => RoleError::conflict(m),
            e => e,
        };
        let target = crate::supplier::tre_target(i32::try_from(sub.tre_kind).unwrap_or(0), aka)
            .map_err(as_state)?;
        let (k, opc, wrapped) =
            crate::supplier::fresh_wrapped(target, &sub.storage_public).map_err(as_state)?;
        // No package was stored, so no earlier K ever left: whatever a crash left is replaced
        // below. Never the K of an MCIM a device holds and uses (another registration's,
        // provisioned).
        if self.imsi_live(&sub.imsi).await? {
            return Err(RoleError::conflict(format!(
                "IMSI {} is provisioned on the device already: its K stays",
                sub.imsi
            )));
        }
        let (mcc, mnc) = self.cfg.plmn.split_at(3);
        let payload = McimPackagePayload {
            domain: package::DOMAIN.into(),
            registration_id: id.to_string(),
            registration_nonce: hex::encode(nonce),
            pcid: pcid.to_string(),
            imsi: sub.imsi.clone(),
            sho_id: self.id.clone(),
            algorithm: "milenage".into(),
            milenage_c: Vec::new(),
            milenage_r: Vec::new(),
            wrapped_k: hex::encode(&wrapped.0),
            wrapped_opc: hex::encode(&wrapped.1),
            usim: UsimData {
                home_plmn: format!("{mcc}-{mnc}"),
                service_provider_name: self.cfg.name.clone(),
                forbidden_plmns: Vec::new(),
                hpplmn_period: None,
            },
            policy: McimPolicy {
                use_for_connectivity: true,
                opc_bound_to_pcrs: false,
            },
            issued_at: u64::try_from(now()).unwrap_or(0),
        };
        let signed = package::seal(&self.key, &payload, &self.cert)
            .map_err(|e| RoleError::internal(e.to_string()))?;
        // The AuC's K and the package's are one: both written in one transaction, and only by
        // the first builder. Another process following this registration too (a replica that
        // took it over, 5.1.3.6.2 step 11 running twice) finds the package stored and keeps it.
        let mut tx = crate::store::begin_write(&self.db).await?;
        let (stored,): (Option<Vec<u8>>,) =
            sqlx::query_as("SELECT package FROM sho_registration WHERE id = $1")
                .bind(id)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err)?;
        if let Some(stored) = stored {
            return Ok(stored);
        }
        self.auc
            .replace_in(&mut tx, &sub.imsi, &k[..], &opc[..])
            .await?;
        sqlx::query("UPDATE sho_registration SET package = $1 WHERE id = $2")
            .bind(&signed)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(signed)
    }
}
