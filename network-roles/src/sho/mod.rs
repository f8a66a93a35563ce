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
pub use registrations::MAX_REPORT_DETAIL;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::store::Db;
use mcim_proto::mcim::sho::v1::RegistrationState as St;
use mcim_telemetry::Channel;

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
    /// Its statement key (packages, acknowledgments, instructions), as ring holds it.
    key: mcim_core::es256::Signer,
    cert: Vec<u8>,
    id: String,
    cfg: ShoConfig,
    pva: Channel,
    drf: Channel,
    dpfs: peers::ChannelCache,
    /// This process's name as a registration's follower (`sho_registration.follower`).
    instance: String,
    /// The registrations this process follows now.
    following: std::sync::Mutex<std::collections::HashSet<String>>,
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
        let key = mcim_core::es256::Signer::new(&key).map_err(|e| internal(&e))?;
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
            instance: crate::store::new_id(),
            following: std::sync::Mutex::default(),
        }))
    }

    /// Follows again every registration that was in flight when the SHO stopped (taking them
    /// over from whichever process followed them), then, every [`SWEEP`], those whose
    /// follower stopped renewing its lease: another process on the database died.
    pub async fn resume(self: &Arc<Self>) -> Result<(), RoleError> {
        for id in self.in_flight(true).await? {
            tracing::info!(registration = %id, "resuming");
            if self.claim(&id, true).await? {
                self.clone().follow(id, true);
            }
        }
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let pause = SWEEP.mul_f64(0.5 + rand::random::<f64>());
                tokio::time::sleep(pause).await;
                let Some(sho) = me.upgrade() else { return };
                match sho.in_flight(false).await {
                    Ok(ids) => {
                        for id in ids {
                            tracing::info!(registration = %id, "taking over (its follower stopped)");
                            sho.clone().follow(id, false);
                        }
                    }
                    Err(e) => tracing::warn!("sweep: {e}"),
                }
            }
        });
        Ok(())
    }

    /// Registrations in steps 10-11: all of them, or those whose follower's lease ran out.
    async fn in_flight(&self, all: bool) -> Result<Vec<String>, RoleError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT id FROM sho_registration WHERE state IN ($1, $2) \
             AND ($3 = 1 OR follow_until < $4)",
        )
        .bind(St::Validating as i64)
        .bind(St::Registered as i64)
        .bind(i64::from(all))
        .bind(crate::store::now())
        .fetch_all(&self.db)
        .await
        .map_err(db_err)?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// Takes or renews the lease on following registration `id` (for [`LEASE`]): true when
    /// this process is its follower now. Another process's lease that has not run out is
    /// taken only with `take_over`.
    pub(super) async fn claim(&self, id: &str, take_over: bool) -> Result<bool, RoleError> {
        let now = crate::store::now();
        let until = now.saturating_add(i64::try_from(LEASE.as_secs()).unwrap_or(60));
        let r = sqlx::query(
            "UPDATE sho_registration SET follower = $1, follow_until = $2 \
             WHERE id = $3 AND state IN ($4, $5) \
             AND (follower = $1 OR follow_until < $6 OR $7 = 1)",
        )
        .bind(&self.instance)
        .bind(until)
        .bind(id)
        .bind(St::Validating as i64)
        .bind(St::Registered as i64)
        .bind(now)
        .bind(i64::from(take_over))
        .execute(&self.db)
        .await
        .map_err(db_err)?;
        Ok(r.rows_affected() == 1)
    }
}

/// How long a follower's lease on a registration lasts; renewed at every step. A step (a PVA
/// long poll of [`VALIDATION_LONG_POLL_MS`], a DPF call of at most 30 s) can outlast it; then
/// another process may take the registration over mid-step, which costs a repeated call (the
/// steps are idempotent), and the first follower stops at its next renewal.
pub(super) const LEASE: Duration = Duration::from_secs(30);

/// How often (on average, jittered by ±50 %) an SHO process looks for registrations whose
/// follower stopped renewing.
const SWEEP: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    fn sho(pki: &std::path::Path, db: Db) -> Arc<Sho> {
        let cfg = ShoConfig {
            url: "https://127.0.0.1:1".into(),
            ro_url: "https://127.0.0.1:1".into(),
            pva_url: "https://127.0.0.1:1".into(),
            plmn: "00102".into(),
            name: "test SHO".into(),
            party: "sho".into(),
        };
        Sho::new(pki.to_path_buf(), db, cfg).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Step 14's report moves a registration forward only: from authorised (or in flight with
    /// its package built) to an outcome, or the same outcome again; never provisioned to
    /// failed or back (a late or forged report would cut a working MCIM off its vectors), and
    /// never for a registration whose package was not built. The detail is cut to 1 KiB, and
    /// a repeated report keeps the first one's.
    #[tokio::test]
    async fn a_report_moves_a_registration_forward_only() {
        for url in crate::store::test_urls() {
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            mcim_pki::dev::init(dir.path(), &mcim_pki::dev::LAB_PARTIES)
                .unwrap_or_else(|e| panic!("{e}"));
            let db = crate::store::open(&url)
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            let s = sho(dir.path(), db.clone());
            for (id, state, package) in [
                ("authorized", St::Authorized, Some(vec![1u8])),
                ("building", St::Validating, Some(vec![1u8])),
                ("unbuilt", St::Validating, None),
                ("provisioned", St::Provisioned, Some(vec![1u8])),
            ] {
                sqlx::query(
                    "INSERT INTO sho_registration (id, pcid, nonce, dpf_url, validation_id, \
                     validation_nonce, state, package) VALUES ($1, 'p', $2, 'https://x', 'v', $2, $3, $4)",
                )
                .bind(id)
                .bind(vec![0u8; 4])
                .bind(state as i64)
                .bind(package)
                .execute(&db)
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            }
            let state = |id: &'static str| {
                let db = db.clone();
                async move {
                    let (st, detail): (i64, String) =
                        sqlx::query_as("SELECT state, detail FROM sho_registration WHERE id = $1")
                            .bind(id)
                            .fetch_one(&db)
                            .await
                            .unwrap_or_else(|e| panic!("{e}"));
                    (st, detail.len())
                }
            };
            let long = "x".repeat(5000);
            assert!(
                s.report("authorized", St::Provisioned, &long).await.is_ok(),
                "{url}"
            );
            assert_eq!(
                state("authorized").await,
                (St::Provisioned as i64, 1024),
                "{url}"
            );
            // The same outcome again is accepted and keeps the first report's detail.
            assert!(
                s.report("authorized", St::Provisioned, "rewritten")
                    .await
                    .is_ok(),
                "{url}: again"
            );
            assert_eq!(
                state("authorized").await,
                (St::Provisioned as i64, 1024),
                "{url}: the first detail kept"
            );
            assert!(
                s.report("building", St::Provisioned, "").await.is_ok(),
                "{url}"
            );
            assert!(
                s.report("provisioned", St::Provisioned, "").await.is_ok(),
                "{url}: again"
            );
            for (id, st) in [
                ("provisioned", St::Failed),
                ("authorized", St::Failed),
                ("unbuilt", St::Provisioned),
                ("unbuilt", St::Failed),
            ] {
                let before = state(id).await;
                assert!(
                    s.report(id, st, "late").await.is_err(),
                    "{url}: {id} {st:?}"
                );
                assert_eq!(state(id).await, before, "{url}: {id} unchanged");
            }
        }
    }

    /// Two SHO processes on one database (two instances here): a registration in flight has
    /// one follower at a time; the other takes it over only when the lease ran out, or when
    /// it starts (`take_over`); a finished registration is nobody's. On SQLite, and on
    /// PostgreSQL where the tests have a server.
    #[tokio::test]
    async fn a_registration_has_one_follower_and_a_lapsed_lease_is_taken_over() {
        for url in crate::store::test_urls() {
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            mcim_pki::dev::init(dir.path(), &mcim_pki::dev::LAB_PARTIES)
                .unwrap_or_else(|e| panic!("{e}"));
            let db = crate::store::open(&url)
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            let (a, b) = (sho(dir.path(), db.clone()), sho(dir.path(), db.clone()));
            let insert = |id: &'static str, state: St, until: i64| {
                sqlx::query(
                    "INSERT INTO sho_registration (id, pcid, nonce, dpf_url, validation_id, \
                     validation_nonce, state, follower, follow_until) \
                     VALUES ($1, 'p', $2, 'https://x', 'v', $2, $3, 'gone', $4)",
                )
                .bind(id)
                .bind(vec![0u8; 4])
                .bind(state as i64)
                .bind(until)
            };
            let now = crate::store::now();
            for (id, state, until) in [
                ("lapsed", St::Validating, now - 1),
                ("held", St::Registered, now + 3600),
                ("done", St::Provisioned, 0),
            ] {
                insert(id, state, until)
                    .execute(&db)
                    .await
                    .unwrap_or_else(|e| panic!("{url}: {e}"));
            }
            // The sweep sees only the lapsed one; a start sees both in flight.
            assert_eq!(
                a.in_flight(false).await.ok(),
                Some(vec!["lapsed".to_string()]),
                "{url}"
            );
            let mut all = a.in_flight(true).await.unwrap_or_default();
            all.sort();
            assert_eq!(all, vec!["held".to_string(), "lapsed".to_string()], "{url}");
            let claim = |s: &Arc<Sho>, id: &'static str, take: bool| {
                let s = s.clone();
                async move { s.claim(id, take).await.unwrap_or_else(|e| panic!("{e}")) }
            };
            assert!(
                claim(&a, "lapsed", false).await,
                "{url}: a lapsed lease is taken"
            );
            assert!(!claim(&b, "lapsed", false).await, "{url}: a's lease holds");
            assert!(
                claim(&a, "lapsed", false).await,
                "{url}: the follower renews"
            );
            assert!(
                !claim(&a, "held", false).await,
                "{url}: another's live lease"
            );
            assert!(claim(&b, "held", true).await, "{url}: taken over at start");
            assert!(!claim(&b, "done", true).await, "{url}: nothing to follow");
            assert!(
                a.in_flight(false).await.unwrap_or_default().is_empty(),
                "{url}"
            );
        }
    }
}
