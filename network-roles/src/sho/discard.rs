//! Both SHO ends of a change of SHO (TR 33.812 5.1.3.7.4.2):
//! - as the old SHO, the device's discard notice (step 9) and the signed acknowledgment
//!   (step 10): kept per IMSI, answered again unchanged to a repeated notice, and from then on
//!   the IMSI gets no vectors;
//! - as the new SHO, the privacy-filtered acknowledgment the RO's DPF relays (step 11), kept on
//!   the registration;
//! - step 14: once the device reports its new MCIM installed, the SHO registers at the DRF as
//!   the device's SHO for future discovery.

use mcim_pki::discard::{ACK_KIND, Ack, FilteredAck, notice_digest, verify_notice};
use mcim_proto::mcim::ro::v1 as ro;
use mcim_proto::mcim::ro::v1::drf_service_client::DrfServiceClient;

use super::Sho;
use crate::authz::Role;
use crate::error::RoleError;
use crate::gate::Authorized;
use crate::store::{db_err, now};

/// A discard notice as it arrives (`NotifyDiscardRequest`).
pub(super) struct DiscardNotice {
    /// The discarded MCIM's IMSI.
    pub imsi: String,
    /// The notice's bytes.
    pub notice: Vec<u8>,
    /// The device's signature over them.
    pub signature: Vec<u8>,
    /// The device's TLS certificate chain.
    pub chain: Vec<Vec<u8>>,
}

impl Sho {
    /// Steps 9-10 at the old SHO: checks the notice (the device that holds the IMSI's
    /// subscription, signed in its TRE), stops the IMSI's vectors and answers the signed
    /// acknowledgment with when it was made; the same acknowledgment again for a repeated
    /// notice.
    pub(super) async fn notice(
        &self,
        auth: &Authorized,
        n: DiscardNotice,
    ) -> Result<(Vec<u8>, i64), RoleError> {
        let pcid: Option<(String,)> =
            sqlx::query_as("SELECT pcid FROM sho_subscription WHERE imsi = $1")
                .bind(&n.imsi)
                .fetch_optional(&self.db)
                .await
                .map_err(db_err)?;
        // Only the device the MCIM was provisioned to speaks for it (the table's owner rule);
        // another device's IMSI is answered as one nobody holds, so that no device learns
        // which IMSIs this SHO gave (they are numbered in order).
        let (pcid,) = pcid
            .filter(|(p,)| auth.owns(p).is_ok())
            .ok_or_else(|| RoleError::not_found("no MCIM of this SHO has this IMSI"))?;
        let kept: Option<(Vec<u8>, i64)> =
            sqlx::query_as("SELECT ack, acknowledged_at FROM sho_discard WHERE imsi = $1")
                .bind(&n.imsi)
                .fetch_optional(&self.db)
                .await
                .map_err(db_err)?;
        if let Some(kept) = kept {
            return Ok(kept);
        }
        let notice = verify_notice(
            &mcim_pki::dev::ca_der(&self.pki, "supplier-root")?,
            &n.notice,
            &n.signature,
            &n.chain,
            &pcid,
            &n.imsi,
            &self.id,
        )
        .map_err(|e| RoleError::denied(e.to_string()))?;
        let at = now();
        if notice.discarded_at > u64::try_from(at).unwrap_or(0) + 300 {
            return Err(RoleError::denied(
                "the discard notice is dated in the future",
            ));
        }
        let ack = mcim_core::signed::sign(
            &self.key,
            &Ack {
                kind: ACK_KIND.into(),
                pcid: pcid.clone(),
                imsi: n.imsi.clone(),
                sho: self.id.clone(),
                discarded_at: notice.discarded_at,
                acknowledged_at: u64::try_from(at).unwrap_or(0),
                notice_sha256: notice_digest(&n.notice),
            },
            Some(&self.cert),
        )
        .map_err(|e| RoleError::internal(e.to_string()))?;
        // Two notices at once: the first one's acknowledgment is kept and answered to both.
        sqlx::query(
            "INSERT INTO sho_discard (imsi, pcid, notice, ack, acknowledged_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT(imsi) DO NOTHING",
        )
        .bind(&n.imsi)
        .bind(&pcid)
        .bind(&n.notice)
        .bind(&ack)
        .bind(at)
        .execute(&self.db)
        .await
        .map_err(db_err)?;
        tracing::info!(%pcid, imsi = %n.imsi, "the device discarded this SHO's MCIM; acknowledged");
        let (ack, at): (Vec<u8>, i64) =
            sqlx::query_as("SELECT ack, acknowledged_at FROM sho_discard WHERE imsi = $1")
                .bind(&n.imsi)
                .fetch_one(&self.db)
                .await
                .map_err(db_err)?;
        Ok((ack, at))
    }

    /// Step 11 at the new SHO: the relayed acknowledgment for one of its registrations, kept
    /// as received. It must be the filtered form (nothing of the old subscription) for that
    /// registration.
    pub(super) async fn relayed_ack(
        &self,
        registration_id: &str,
        filtered: Vec<u8>,
    ) -> Result<(), RoleError> {
        let f: FilteredAck = serde_json::from_slice(&filtered)
            .map_err(|e| RoleError::invalid(format!("the filtered acknowledgment: {e}")))?;
        if f.registration_id != registration_id {
            return Err(RoleError::invalid(
                "the filtered acknowledgment is for another registration",
            ));
        }
        // Kept in the filtered form only, whatever else the bytes held.
        let filtered = serde_json::to_vec(&f).map_err(|e| RoleError::internal(e.to_string()))?;
        let done = sqlx::query("UPDATE sho_registration SET discard_ack = $1 WHERE id = $2")
            .bind(&filtered)
            .bind(registration_id)
            .execute(&self.db)
            .await
            .map_err(db_err)?;
        if done.rows_affected() != 1 {
            return Err(RoleError::not_found("no such registration"));
        }
        tracing::info!(registration = %registration_id, discarded_at = f.discarded_at, "the old SHO's credentials were discarded");
        Ok(())
    }

    /// Step 14: the device's MCIM from this SHO is installed; the DRF is told this SHO serves
    /// it (for an initial provisioning it already does: the same row again).
    pub(super) async fn serve_at_drf(&self, pcid: &str) -> Result<(), RoleError> {
        DrfServiceClient::new(self.drf.clone())
            .set_subscription(ro::SetSubscriptionRequest {
                pcid: pcid.to_string(),
                sho_id: self.id.clone(),
                sho_url: self.cfg.url.clone(),
                change_of_sho: false,
            })
            .await
            .map_err(RoleError::peer(Role::Ro))?;
        Ok(())
    }
}
