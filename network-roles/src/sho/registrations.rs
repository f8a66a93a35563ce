//! The devices the RO registers at this SHO (5.1.3.6.2 step 7), their validation request to
//! the PVA (step 8) and their state up to the provisioning report (step 14).

use mcim_proto::mcim::pva::v1 as pva;
use mcim_proto::mcim::pva::v1::pva_service_client::PvaServiceClient;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Sho, St};
use crate::authz::Role;
use crate::error::RoleError;
use crate::store::{db_err, now};

/// A registration as stored (`sho_registration`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Registration {
    /// The RO's registration id.
    pub id: String,
    /// The device.
    pub pcid: String,
    /// The registration nonce the package must carry (annex x.2.3).
    pub nonce: Vec<u8>,
    /// The DPF that serves the device.
    pub dpf_url: String,
    /// The PVA's validation.
    pub validation_id: String,
    /// The PVA's nonce for it.
    pub validation_nonce: Vec<u8>,
    /// Where it stands (`RegistrationState`).
    pub state: i64,
    /// Why it stands there.
    pub detail: String,
    /// The package, once built (built once, step 11).
    pub package: Option<Vec<u8>>,
    /// A change of SHO: the privacy-filtered acknowledgment relayed (5.1.3.7.4.2 step 11).
    pub discard_ack: Option<Vec<u8>>,
    /// The RO that registered the device (its certificate's name; '' for a registration
    /// stored before the SHO recorded it): the owner of the registration in the
    /// authorization table ([`crate::authz::Owner::Ro`]).
    pub ro: String,
}

impl<'r> sqlx::FromRow<'r, AnyRow> for Registration {
    fn from_row(row: &'r AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: row.try_get("id")?,
            pcid: row.try_get("pcid")?,
            nonce: row.try_get("nonce")?,
            dpf_url: row.try_get("dpf_url")?,
            validation_id: row.try_get("validation_id")?,
            validation_nonce: row.try_get("validation_nonce")?,
            state: row.try_get("state")?,
            detail: row.try_get("detail")?,
            package: row.try_get("package")?,
            discard_ack: row.try_get("discard_ack")?,
            ro: row.try_get("ro")?,
        })
    }
}

/// What the RO asks for at step 7.
pub(super) struct NewRegistration {
    /// The RO's registration id.
    pub id: String,
    /// The device.
    pub pcid: String,
    /// The registration nonce (16 octets or more).
    pub nonce: Vec<u8>,
    /// The DPF that serves the device.
    pub dpf_url: String,
    /// The RO registering it (the caller's certificate name).
    pub ro: String,
}

impl Registration {
    /// The caller may act for the RO on this registration: it is the RO that registered it
    /// (a registration stored before the SHO recorded its RO is open to any RO, as it was).
    pub(super) fn check_ro(&self, auth: &crate::gate::Authorized) -> Result<(), RoleError> {
        if self.ro.is_empty() {
            return Ok(());
        }
        auth.owns(&self.ro)
    }

    /// This registration, for `n` registering its id again (step 7 retried): the same RO
    /// asking the same (device, nonce, DPF) gets the same answer (any RO, for a registration
    /// stored before the SHO recorded its RO); another RO's id is not its to learn about or
    /// take over, and the same id with another device, nonce or DPF is another request, not
    /// a retry (found by an outside attack: it was answered OK with the first registration,
    /// the new nonce silently dropped).
    fn asked_again_by(self, n: &NewRegistration) -> Result<Self, RoleError> {
        if self.ro != n.ro && !self.ro.is_empty() {
            return Err(RoleError::exists("this registration id is taken"));
        }
        if self.pcid != n.pcid || self.nonce != n.nonce || self.dpf_url != n.dpf_url {
            return Err(RoleError::exists(
                "this registration id is taken by another request (device, nonce or DPF)",
            ));
        }
        Ok(self)
    }
}

impl Sho {
    /// The registration `id`, if any.
    pub(super) async fn registration(&self, id: &str) -> Result<Option<Registration>, RoleError> {
        sqlx::query_as::<_, Registration>(
            "SELECT id, pcid, nonce, dpf_url, validation_id, validation_nonce, state, detail, \
             package, discard_ack, ro FROM sho_registration WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.db)
        .await
        .map_err(db_err)
    }

    /// Step 7 (and 8): registers the device for its subscription and asks the PVA to validate
    /// it, then follows the validation in the background. The same registration again
    /// answers what it answered the first time.
    pub(super) async fn register(
        self: &std::sync::Arc<Self>,
        n: NewRegistration,
    ) -> Result<Registration, RoleError> {
        if n.id.is_empty() || n.nonce.len() < 16 {
            return Err(RoleError::invalid(
                "a registration id and a nonce of 16 octets or more are required",
            ));
        }
        if !n.dpf_url.starts_with("https://") {
            return Err(RoleError::invalid("dpf_url must be https://host:port"));
        }
        let sub = self
            .subscription(&n.pcid)
            .await?
            .ok_or_else(|| RoleError::not_found("no subscription for this PCID"))?;
        if let Some(existing) = self.registration(&n.id).await? {
            return existing.asked_again_by(&n);
        }
        // The device holds this SHO's MCIM already (provisioned, not discarded): a second
        // package for the same IMSI would replace its K at the AuC under a working device.
        // (The IMSI is not the RO's to learn: not in the message.)
        if self.imsi_live(&sub.imsi).await? {
            return Err(RoleError::conflict(
                "the device already holds this SHO's MCIM: nothing to provision",
            ));
        }
        // Step 8: ask the PVA to validate the device.
        let v = PvaServiceClient::new(self.pva.clone())
            .request_validation(pva::RequestValidationRequest {
                pcid: n.pcid.clone(),
                registration_id: n.id.clone(),
            })
            .await
            .map_err(RoleError::peer(Role::Pva))?
            .into_inner();
        let reg = Registration {
            id: n.id.clone(),
            pcid: n.pcid.clone(),
            nonce: n.nonce.clone(),
            dpf_url: n.dpf_url.clone(),
            validation_id: v.validation_id,
            validation_nonce: v.nonce,
            state: St::Validating as i64,
            detail: String::new(),
            package: None,
            discard_ack: None,
            ro: n.ro.clone(),
        };
        // Numbered (`made`) under the write lock: two at once never get the same number. The
        // same id registered meanwhile (two calls at once, by one RO or two) is not inserted
        // again, in the same statement: then the rule above, now under the lock.
        let mut tx = crate::store::begin_write(&self.db).await?;
        let inserted = sqlx::query(
            "INSERT INTO sho_registration (id, pcid, nonce, dpf_url, validation_id, \
             validation_nonce, state, imsi, made, follower, follow_until, ro) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, next.made, $9, $10, $11 \
             FROM (SELECT COALESCE(MAX(made), 0) + 1 AS made FROM sho_registration) AS next \
             WHERE NOT EXISTS (SELECT 1 FROM sho_registration WHERE id = $1)",
        )
        .bind(&reg.id)
        .bind(&reg.pcid)
        .bind(&reg.nonce)
        .bind(&reg.dpf_url)
        .bind(&reg.validation_id)
        .bind(&reg.validation_nonce)
        .bind(reg.state)
        .bind(&sub.imsi)
        .bind(&self.instance)
        .bind(now().saturating_add(i64::try_from(super::LEASE.as_secs()).unwrap_or(60)))
        .bind(&reg.ro)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if inserted.rows_affected() != 1 {
            drop(tx);
            return self
                .registration(&n.id)
                .await?
                .ok_or_else(|| RoleError::internal("registration not stored"))?
                .asked_again_by(&n);
        }
        tx.commit().await.map_err(db_err)?;
        // What was stored is what the follower looks at first and what the RO hears (no
        // read back: the row is this call's, as written).
        self.clone().follow_stored(reg.clone());
        tracing::info!(pcid = %n.pcid, registration = %n.id, "registered; validation requested");
        Ok(reg)
    }

    /// A registration and the subscription it is for (for the subscriber).
    pub(super) async fn registration_status(
        &self,
        id: &str,
    ) -> Result<(Registration, super::subscriptions::Subscription), RoleError> {
        let reg = self
            .registration(id)
            .await?
            .ok_or_else(|| RoleError::not_found("no such registration"))?;
        let sub = self
            .subscription(&reg.pcid)
            .await?
            .ok_or_else(|| RoleError::not_found("no such registration"))?;
        Ok((reg, sub))
    }

    /// The latest registration of a device (its PCID), if it registered.
    pub(super) async fn latest_registration(
        &self,
        pcid: &str,
    ) -> Result<Option<Registration>, RoleError> {
        // The latest: `made` grows with each insert.
        sqlx::query_as::<_, Registration>(
            "SELECT id, pcid, nonce, dpf_url, validation_id, validation_nonce, state, detail, \
             package, discard_ack, ro FROM sho_registration WHERE pcid = $1 \
             ORDER BY made DESC LIMIT 1",
        )
        .bind(pcid)
        .fetch_optional(&self.db)
        .await
        .map_err(db_err)
    }

    /// Step 14: the DPF's report of the device's install, for an authorised registration
    /// (a repeated report of the same outcome is accepted). Authorised means: the SHO built
    /// this registration's package and handed it to the DPF, which may have served it, and
    /// the device reported, before the SHO recorded the DPF's answer (the follower's
    /// [`Sho::set_state`] then leaves the report's outcome alone).
    pub(super) async fn report(&self, id: &str, st: St, detail: &str) -> Result<(), RoleError> {
        // Forward only: from authorised to the outcome, or the same outcome again. A provisioned
        // registration never becomes failed (nor the reverse) by a late or forged report: the
        // device's MCIM would lose its vectors.
        let detail: String = detail.chars().take(MAX_REPORT_DETAIL).collect();
        // The same outcome again (a retry) keeps the first report's detail: a device cannot
        // rewrite what the SHO recorded of its install.
        let done = sqlx::query(
            "UPDATE sho_registration SET state = $1, \
             detail = CASE WHEN state = $1 THEN detail ELSE $2 END WHERE id = $3 \
             AND (state IN ($4, $5) OR (state IN ($6, $7) AND package IS NOT NULL))",
        )
        .bind(st as i64)
        .bind(&detail)
        .bind(id)
        .bind(st as i64)
        .bind(St::Authorized as i64)
        .bind(St::Validating as i64)
        .bind(St::Registered as i64)
        .execute(&self.db)
        .await
        .map_err(db_err)?;
        if done.rows_affected() != 1 {
            return Err(RoleError::conflict(
                "no authorised registration with this id (or its outcome was reported already)",
            ));
        }
        tracing::info!(registration = %id, state = ?st, "provisioning result");
        Ok(())
    }

    /// Ends a registration still in steps 8-11 in `st`, saying why. A registration past them
    /// (authorised, provisioned, failed at the device) keeps its outcome: a second follower
    /// (a replica that took it over while the first still ran) failing late changes nothing.
    pub(super) async fn set_state(&self, id: &str, st: St, detail: &str) -> Result<(), RoleError> {
        sqlx::query(
            "UPDATE sho_registration SET state = $1, detail = $2 WHERE id = $3 AND state IN ($4, $5)",
        )
        .bind(st as i64)
        .bind(detail)
        .bind(id)
        .bind(St::Validating as i64)
        .bind(St::Registered as i64)
            .execute(&self.db)
            .await
            .map_err(db_err)?;
        Ok(())
    }
}

/// The longest reason a provisioning report keeps (characters; the rest is cut).
pub const MAX_REPORT_DETAIL: usize = 1024;
