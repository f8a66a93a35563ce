//! The SHO's subscriptions (5.1.3.5.2: the subscriber contracts for a device) and its IMSI
//! numbers: one subscription per PCID, an IMSI from the SHO's range that is never reused.

use mcim_core::aka::{K, Opc};
use mcim_core::identity::Pcid;
use mcim_core::package::{self, TreTarget};
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::ro::v1 as ro;
use mcim_proto::mcim::ro::v1::drf_service_client::DrfServiceClient;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::Sho;
use crate::authz::Role;
use crate::error::RoleError;
use crate::store::{db_err, new_id};

/// A subscription as stored (`sho_subscription`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Subscription {
    /// The device.
    pub pcid: String,
    /// Who contracted.
    pub subscriber: String,
    /// The device's TRE (`common::TreKind`).
    pub tre_kind: i64,
    /// The storage key the MCIM is wrapped to (certified by the supplier).
    pub storage_public: Vec<u8>,
    /// The IMSI reserved for it.
    pub imsi: String,
    /// The SHO refuses a device that runs AKA outside its TRE.
    pub require_aka_in_tre: bool,
}

impl<'r> sqlx::FromRow<'r, AnyRow> for Subscription {
    fn from_row(row: &'r AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            pcid: row.try_get("pcid")?,
            subscriber: row.try_get("subscriber")?,
            tre_kind: row.try_get("tre_kind")?,
            storage_public: row.try_get("storage_public")?,
            imsi: row.try_get("imsi")?,
            require_aka_in_tre: row.try_get::<i64, _>("require_aka_in_tre")? != 0,
        })
    }
}

/// A contract as the subscriber asks for it, checked.
pub(super) struct NewSubscription {
    /// The subscriber's account.
    pub subscriber: String,
    /// The device.
    pub pcid: Pcid,
    /// The supplier's device id.
    pub device_id: String,
    /// The device's TRE.
    pub tre_kind: common::TreKind,
    /// The TRE's storage key.
    pub storage_public: Vec<u8>,
    /// The platform credential (AK chain to the supplier root).
    pub platform_credential: Vec<Vec<u8>>,
    /// AKA must run in the TRE.
    pub require_aka_in_tre: bool,
    /// The owner's proof that it controls the device (annex x.2.3).
    pub ownership_proof: Option<common::OwnershipProof>,
}

/// A device's subscription, by PCID.
const SUBSCRIPTION_OF_PCID: &str = "SELECT pcid, subscriber, tre_kind, storage_public, imsi, require_aka_in_tre \
     FROM sho_subscription WHERE pcid = $1";

impl Sho {
    /// The subscription of `pcid`, if any.
    pub(super) async fn subscription(&self, pcid: &str) -> Result<Option<Subscription>, RoleError> {
        sqlx::query_as::<_, Subscription>(SUBSCRIPTION_OF_PCID)
            .bind(pcid)
            .fetch_optional(&self.db)
            .await
            .map_err(db_err)
    }

    /// Contracts `n` (idempotent for the same subscriber), reserves its IMSI and tells the
    /// RO's DRF where the device's SHO is (step 6 looks it up).
    pub(super) async fn contract(&self, n: NewSubscription) -> Result<Subscription, RoleError> {
        let target = match n.tre_kind {
            common::TreKind::Tpm2 => TreTarget::Tpm2,
            common::TreKind::Pkcs11 => TreTarget::Pkcs11,
            common::TreKind::Unspecified => {
                return Err(RoleError::invalid("the TRE kind is required"));
            }
        };
        // The storage key must be one we can wrap to (checked now, not at step 11).
        package::wrap_secrets(
            target,
            &n.storage_public,
            &K::new([0; 16]),
            &Opc::new([0; 16]),
            &mut rand::rng(),
        )
        .map_err(|e| RoleError::invalid(format!("storage key: {e}")))?;
        let cred = mcim_pki::dev::verify_platform_credential(&self.pki, &n.platform_credential)
            .map_err(|e| RoleError::invalid(format!("platform credential: {e}")))?;
        if cred.pcid != n.pcid.as_str() {
            return Err(RoleError::invalid(
                "the platform credential is another device's",
            ));
        }
        // The MCIM will be wrapped to this key: it must be the one the supplier certified in
        // this device's TRE, not one the subscriber (or anyone) holds outside it.
        if !cred.certifies_storage_key(&n.storage_public) {
            return Err(RoleError::invalid(
                "the storage key is not the one the supplier certified for this device's TRE",
            ));
        }
        // Annex x.2.3: the subscriber shows it controls the device (a statement the device
        // signed in its TRE, on its owner's request, for this subscriber at this SHO).
        let proof = n.ownership_proof.as_ref().ok_or_else(|| {
            RoleError::denied(
                "no proof of ownership: the device's owner obtains one from the device \
                 (mcimctl device parameters --for-subscriber --sho-id)",
            )
        })?;
        let statement = mcim_pki::ownership::verify(
            &mcim_pki::dev::ca_der(&self.pki, "supplier-root")?,
            &mcim_pki::ownership::Proof {
                payload: &proof.payload,
                signature: &proof.signature,
                tls_chain: &proof.tls_certificate,
            },
            &mcim_pki::ownership::Contract {
                pcid: n.pcid.as_str(),
                subscriber: &n.subscriber,
                sho: &self.id,
            },
            u64::try_from(crate::store::now()).unwrap_or(0),
        )
        .map_err(|e| RoleError::denied(e.to_string()))?;
        // A proof is used once (a refusal below drops the transaction: nothing changes).
        let mut tx = crate::store::begin_write(&self.db).await?;
        let fresh = sqlx::query(
            "INSERT INTO sho_ownership_proof (nonce, pcid, subscriber) VALUES ($1, $2, $3) \
             ON CONFLICT(nonce) DO NOTHING",
        )
        .bind(&statement.nonce)
        .bind(n.pcid.as_str())
        .bind(&n.subscriber)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if fresh.rows_affected() == 0 {
            return Err(RoleError::denied(
                "this proof of ownership was used before: ask the device for a new one",
            ));
        }
        // Read in the transaction: a second connection while holding the write lock could
        // wait for one that waits for the lock (SQLite's pool is small).
        let existing = sqlx::query_as::<_, Subscription>(SUBSCRIPTION_OF_PCID)
            .bind(n.pcid.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?;
        match existing {
            Some(existing) if existing.subscriber != n.subscriber => {
                return Err(RoleError::exists(
                    "this device has a subscription of another subscriber",
                ));
            }
            // The same contract again (the same subscriber, a new proof): answered as before,
            // unless the device discarded this SHO's MCIM since (it changed SHO, 5.1.3.7.4.2):
            // coming back is a new MCIM, with a new IMSI (the old one stays dead).
            Some(existing) => {
                let discarded: Option<(String,)> =
                    sqlx::query_as("SELECT imsi FROM sho_discard WHERE imsi = $1")
                        .bind(&existing.imsi)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(db_err)?;
                if discarded.is_some() {
                    let imsi = self.next_imsi(&mut tx).await?;
                    sqlx::query(
                        "UPDATE sho_subscription SET imsi = $1, tre_kind = $2, storage_public = $3, \
                         require_aka_in_tre = $4 WHERE pcid = $5",
                    )
                    .bind(&imsi)
                    .bind(n.tre_kind as i64)
                    .bind(&n.storage_public)
                    .bind(i64::from(n.require_aka_in_tre))
                    .bind(n.pcid.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                    tracing::info!(pcid = %n.pcid, old = %existing.imsi, new = %imsi, "the device comes back: a new IMSI");
                }
                tx.commit().await.map_err(db_err)?;
            }
            None => {
                let imsi = self.next_imsi(&mut tx).await?;
                sqlx::query(
                    "INSERT INTO sho_subscription (id, pcid, subscriber, device_id, model, \
                     tre_kind, storage_public, imsi, require_aka_in_tre) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(new_id())
                .bind(n.pcid.as_str())
                .bind(&n.subscriber)
                .bind(&n.device_id)
                .bind(&cred.model)
                .bind(n.tre_kind as i64)
                .bind(&n.storage_public)
                .bind(&imsi)
                .bind(i64::from(n.require_aka_in_tre))
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
                tx.commit().await.map_err(db_err)?;
            }
        }
        let sub = self
            .subscription(n.pcid.as_str())
            .await?
            .ok_or_else(|| RoleError::internal("subscription not stored"))?;
        DrfServiceClient::new(self.drf.clone())
            .set_subscription(ro::SetSubscriptionRequest {
                pcid: sub.pcid.clone(),
                sho_id: self.id.clone(),
                sho_url: self.cfg.url.clone(),
                // Another SHO serving the device: this one is where it may change to
                // (5.1.3.7.4.2 step 1).
                change_of_sho: true,
            })
            .await
            .map_err(RoleError::peer(Role::Ro))?;
        tracing::info!(pcid = %sub.pcid, imsi = %sub.imsi, "subscription");
        Ok(sub)
    }

    /// The next IMSI of the SHO's range, in `tx`; numbers are never reused, and a used-up
    /// range is RESOURCE_EXHAUSTED (dropping `tx` leaves the counter as it was).
    async fn next_imsi(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    ) -> Result<String, RoleError> {
        let (n,): (i64,) =
            sqlx::query_as("UPDATE sho_imsi_seq SET last = last + 1 WHERE id = 1 RETURNING last")
                .fetch_one(&mut **tx)
                .await
                .map_err(db_err)?;
        let width = 15 - self.cfg.plmn.len();
        if u32::try_from(width)
            .ok()
            .and_then(|w| 10_i64.checked_pow(w))
            .is_none_or(|limit| n >= limit)
        {
            return Err(RoleError::exhausted("the SHO's IMSI range is used up"));
        }
        Ok(format!("{}{:0width$}", self.cfg.plmn, n))
    }

    /// Whether `imsi` is the IMSI of an MCIM the device reported installed (5.1.3.6.2 step
    /// 14) and has not discarded (5.1.3.7.4.2 step 9), nor retired or deleted on this SHO's
    /// instruction (5.1.1.3).
    pub(super) async fn imsi_live(&self, imsi: &str) -> Result<bool, RoleError> {
        self.live(imsi, None).await
    }

    /// [`Self::imsi_live`], and on the device `pcid` (the one the MCIM was provisioned to):
    /// only those get vectors (5.1.3.3.2.2).
    pub(super) async fn imsi_live_on(&self, imsi: &str, pcid: &str) -> Result<bool, RoleError> {
        self.live(imsi, Some(pcid)).await
    }

    async fn live(&self, imsi: &str, pcid: Option<&str>) -> Result<bool, RoleError> {
        // `pcid` NULL: on any device.
        let live: Option<(String,)> = sqlx::query_as(
            "SELECT s.imsi FROM sho_subscription s JOIN sho_registration r ON r.pcid = s.pcid \
             WHERE s.imsi = $1 AND r.state = $2 AND (r.imsi = s.imsi OR r.imsi = '') \
             AND ($3 IS NULL OR s.pcid = $3) \
             AND NOT EXISTS (SELECT 1 FROM sho_discard d WHERE d.imsi = s.imsi) \
             AND NOT EXISTS (SELECT 1 FROM sho_instruction i WHERE i.imsi = s.imsi \
             AND i.outcome = 'done' AND i.action IN ('retire', 'delete'))",
        )
        .bind(imsi)
        .bind(super::St::Provisioned as i64)
        .bind(pcid)
        .fetch_optional(&self.db)
        .await
        .map_err(db_err)?;
        Ok(live.is_some())
    }
}
