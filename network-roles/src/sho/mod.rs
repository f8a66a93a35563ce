//! The Selected Home Operator (TR 33.812 5.1.3.5.6): subscriptions (5.1.3.5.2), the device's
//! registration by the RO's DRF (5.1.3.6.2 step 7), validation by the PVA (steps 8-10), the
//! MCIM package and the DPF's authorisation (step 11), the provisioning report (step 14), and
//! the AuC of its IMSIs for the operational attach (5.1.3.3.2.2).
//!
//! After a registration the SHO follows its validation in the background; registrations still
//! in flight when the SHO starts are followed again ([`Sho::resume`]), and every step is
//! idempotent, so a restart of the SHO, the PVA or the RO loses nothing.
//!
//! One file per job: `subscriptions.rs` (contracts and IMSI numbers), `registrations.rs`
//! (step 7's registrations and their state), `follower.rs` (steps 10-11 in the background),
//! `package.rs` (building and signing the MCIM package), `discard.rs` (both ends of a change of
//! SHO: the old SHO's discard notices and acknowledgments, the new SHO's relayed one),
//! `instructions.rs` (remote instructions about its MCIMs on devices, 5.1.1.3), `api.rs` (the
//! gRPC surface).

mod api;
mod discard;
mod follower;
mod instructions;
mod package;
mod registrations;
mod subscriptions;

pub use api::ShoApi;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::store::Db;
use mcim_proto::mcim::sho::v1::RegistrationState as St;
use mcim_telemetry::Channel;
use p256::ecdsa::SigningKey;

use crate::atrest::DataKey;
use crate::auc::Auc;
use crate::authz::Role;
use crate::error::RoleError;
use crate::peers;
use crate::store::db_err;

/// How long the SHO waits for a device's evidence before it gives the registration up.
const VALIDATION_WAIT: Duration = Duration::from_secs(600);
/// How long one question to the PVA waits for the verdict (a long poll).
const VALIDATION_LONG_POLL_MS: u32 = 10_000;
/// The pause after a failed question before the next.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Where the SHO is and what it hands out.
#[derive(Clone, Debug)]
pub struct ShoConfig {
    /// Its own address (given to the RO for step 7).
    pub url: String,
    /// The RO's address (DRF: subscriptions).
    pub ro_url: String,
    /// The PVA's address.
    pub pva_url: String,
    /// MCC+MNC of its IMSIs.
    pub plmn: String,
    /// Its service provider name (EF_SPN).
    pub name: String,
    /// Its files in the PKI directory: `<party>.pem`, `<party>.key` (`sho`; `sho2` for the
    /// lab's second SHO, `mcim_pki::dev::SECOND_SHO`).
    pub party: String,
}

/// The SHO's state.
pub struct Sho {
    pki: PathBuf,
    db: Db,
    auc: Auc,
    key: SigningKey,
    cert: Vec<u8>,
    id: String,
    cfg: ShoConfig,
    pva: Channel,
    drf: Channel,
    dpfs: peers::ChannelCache,
}

impl std::fmt::Debug for Sho {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sho")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Sho {
    /// The SHO on `db` with its keys in `pki`.
    pub fn new(pki: PathBuf, db: Db, cfg: ShoConfig) -> Result<Arc<Self>, RoleError> {
        let internal = |e: &dyn std::fmt::Display| RoleError::internal(e.to_string());
        if cfg.plmn.len() < 5 || cfg.plmn.len() > 6 || !cfg.plmn.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(RoleError::invalid("the SHO's PLMN is 5 or 6 digits"));
        }
        let party = cfg.party.as_str();
        let key = mcim_pki::dev::signing_key(&pki, party).map_err(|e| internal(&e))?;
        let cert = mcim_pki::dev::ca_der(&pki, party).map_err(|e| internal(&e))?;
        let id = mcim_pki::party::caller_from_cert(&cert)
            .map_err(|e| internal(&e))?
            .name;
        let data_key = DataKey::load_or_create(&pki, party).map_err(|e| internal(&e))?;
        Ok(Arc::new(Self {
            auc: Auc::new("sho", db.clone(), data_key),
            pva: peers::channel_as(&pki, party, Role::Pva, &cfg.pva_url)?,
            drf: peers::channel_as(&pki, party, Role::Ro, &cfg.ro_url)?,
            pki,
            db,
            key,
            cert,
            id,
            cfg,
            dpfs: peers::ChannelCache::default(),
        }))
    }

    /// Follows again every registration that was in flight when the SHO stopped.
    pub async fn resume(self: &Arc<Self>) -> Result<(), RoleError> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT id FROM sho_registration WHERE state IN ($1, $2)")
                .bind(St::Validating as i64)
                .bind(St::Registered as i64)
                .fetch_all(&self.db)
                .await
                .map_err(db_err)?;
        for (id,) in rows {
            tracing::info!(registration = %id, "resuming");
            self.clone().follow(id);
        }
        Ok(())
    }
}
