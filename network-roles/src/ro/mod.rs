//! The Registration Operator (TR 33.812 5.1.3.5.4) and its three functions, each its own gRPC
//! service over one shared state: the ICF ([`icf`], initial credentials and AVs for PCIDs,
//! 5.1.3.4.4), the DRF ([`drf`], discovery of the SHO and registration there, steps 5-7) and
//! the DPF ([`dpf`], authorisation, download and status, steps 11-14). Devices only open
//! outbound connections: what the network pushes reaches a device as a task on the stream it
//! opened (`WatchDeviceTasks`), kept in the database until the device acknowledges it, so a
//! disconnect or a restart of either side loses nothing.

pub mod dpf;
pub mod drf;
pub mod icf;
mod instructions;
mod renewal;

use std::path::PathBuf;
use std::sync::Arc;

use crate::store::Db;
use mcim_proto::mcim::ro::v1 as pb;
use mcim_proto::mcim::sho::v1::sho_service_client::ShoServiceClient;
use mcim_telemetry::Channel;
use prost::Message;

use crate::atrest::DataKey;
use crate::auc::Auc;
use crate::authz::Role;
use crate::error::RoleError;
use crate::peers;
use crate::store::{Changes, db_err};

/// How long the VNO's grant of initial connectivity lets a device reach the RO.
pub const GRANT_LIFETIME_SECS: i64 = 600;

/// The RO's shared state.
pub struct Ro {
    pki: PathBuf,
    db: Db,
    auc: Auc,
    dpf_url: String,
    shos: peers::ChannelCache,
    /// Device tasks queued (wakes the devices' task streams).
    tasks: Changes,
    /// Set when the RO shuts down: the devices' task streams end (the devices reconnect to
    /// whatever serves next), so a clean shutdown is not held up by streams that never end.
    stopping: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Ro {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ro")
            .field("pki", &self.pki)
            .finish_non_exhaustive()
    }
}

impl Ro {
    /// Its database (for gauges read beside the role).
    pub fn pool(&self) -> Db {
        self.db.clone()
    }

    /// The RO shuts down (SIGTERM): the devices' task streams end at once.
    pub fn stop_streams(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.tasks.bump();
    }

    /// Whether [`Ro::stop_streams`] was called.
    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The RO on `db`, with its keys in `pki`; `dpf_url` is where SHOs reach its DPF.
    pub fn new(pki: PathBuf, db: Db, dpf_url: String) -> Result<Arc<Self>, RoleError> {
        let key =
            DataKey::load_or_create(&pki, "ro").map_err(|e| RoleError::internal(e.to_string()))?;
        let tasks = Changes::new(&db, "ro_task");
        Ok(Arc::new(Self {
            auc: Auc::new("icf", db.clone(), key),
            pki,
            db,
            dpf_url,
            shos: peers::ChannelCache::default(),
            tasks,
            stopping: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// A client of the SHO at `url`.
    async fn sho(&self, url: &str) -> Result<ShoServiceClient<Channel>, RoleError> {
        Ok(ShoServiceClient::new(
            self.shos.get(&self.pki, Role::Ro, Role::Sho, url).await?,
        ))
    }

    /// Applies `change` (one statement on a device's registration) and, when it changed a
    /// row, queues `task` for the device `pcid`, in one transaction: both happen or neither
    /// (a crash between them would leave a device waiting for a task that never comes). The
    /// device's task stream wakes once it is committed. Returns whether the change applied.
    async fn change_with_task(
        &self,
        change: sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments>,
        pcid: &str,
        task: pb::watch_device_tasks_response::Task,
    ) -> Result<bool, RoleError> {
        self.change_with_tasks(change, pcid, vec![task]).await
    }

    /// [`Ro::change_with_task`] with several tasks, queued in order.
    async fn change_with_tasks(
        &self,
        change: sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments>,
        pcid: &str,
        tasks: Vec<pb::watch_device_tasks_response::Task>,
    ) -> Result<bool, RoleError> {
        let mut tx = crate::store::begin_write(&self.db).await?;
        if change
            .execute(&mut *tx)
            .await
            .map_err(db_err)?
            .rows_affected()
            != 1
        {
            return Ok(false);
        }
        for task in tasks {
            let body = pb::WatchDeviceTasksResponse {
                seq: 0,
                task: Some(task),
            }
            .encode_to_vec();
            // Above every number this device was ever given (acknowledged tasks are deleted).
            let (seq,): (i64,) = sqlx::query_as(
                "INSERT INTO ro_task_seq (pcid, last_seq) VALUES ($1, 1) \
                 ON CONFLICT (pcid) DO UPDATE SET last_seq = ro_task_seq.last_seq + 1 \
                 RETURNING last_seq",
            )
            .bind(pcid)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
            sqlx::query("INSERT INTO ro_task (pcid, seq, body) VALUES ($1, $2, $3)")
                .bind(pcid)
                .bind(seq)
                .bind(body)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
        self.tasks.bump();
        Ok(true)
    }
}

/// One registration as the RO keeps it.
#[derive(Clone, Debug)]
pub(crate) struct Registration {
    pub id: String,
    pub pcid: String,
    pub sho_id: String,
    pub state: String,
    pub package: Option<Vec<u8>>,
    /// Where its SHO is (empty in rows made before changes of SHO: the subscription's).
    pub sho_url: String,
    /// A change of SHO: the SHO the device changes from (5.1.3.7.4.2); empty otherwise.
    pub change_from: String,
    /// Whether the old SHO's acknowledgment reached the new SHO (step 11).
    pub discard_relayed: i64,
    /// A change by reverting to the pristine state (5.1.3.7.4.3).
    pub pristine: bool,
    /// A change that keeps the old MCIM beside the new one (end of 5.1.3.7.4.2).
    pub keep_old: bool,
}

impl<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> for Registration {
    fn from_row(row: &'r sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok(Self {
            id: row.try_get("id")?,
            pcid: row.try_get("pcid")?,
            sho_id: row.try_get("sho_id")?,
            state: row.try_get("state")?,
            package: row.try_get("package")?,
            sho_url: row.try_get("sho_url")?,
            change_from: row.try_get("change_from")?,
            discard_relayed: row.try_get("discard_relayed")?,
            pristine: row.try_get::<i64, _>("pristine")? != 0,
            keep_old: row.try_get::<i64, _>("keep_old")? != 0,
        })
    }
}

impl Registration {
    /// A change over the old SHO's connectivity that discards the old MCIM: the DPF orders the
    /// discard and waits for the relayed acknowledgment before an install is reported.
    pub fn discards(&self) -> bool {
        !self.change_from.is_empty() && !self.pristine && !self.keep_old
    }
}

impl Ro {
    pub(crate) async fn registration(&self, id: &str) -> Result<Registration, RoleError> {
        sqlx::query_as::<_, Registration>(
            "SELECT id, pcid, sho_id, state, package, sho_url, change_from, discard_relayed, \
             pristine, keep_old FROM ro_registration WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.db)
        .await
        .map_err(db_err)?
        .ok_or_else(|| RoleError::not_found("no such registration"))
    }

    /// The address of the SHO a registration was made at.
    pub(crate) async fn registration_sho_url(
        &self,
        reg: &Registration,
    ) -> Result<String, RoleError> {
        if !reg.sho_url.is_empty() {
            return Ok(reg.sho_url.clone());
        }
        match self.sho_url(&reg.pcid).await? {
            Some((id, url)) if id == reg.sho_id => Ok(url),
            _ => Err(RoleError::conflict("the SHO's subscription is gone")),
        }
    }

    /// The address of `sho_id` if it announced a contract for `pcid` while another SHO serves
    /// it (5.1.3.7.4.2 step 1).
    pub(crate) async fn sho_offer(
        &self,
        pcid: &str,
        sho_id: &str,
    ) -> Result<Option<String>, RoleError> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT sho_url FROM ro_sho_offer WHERE pcid = $1 AND sho_id = $2")
                .bind(pcid)
                .bind(sho_id)
                .fetch_optional(&self.db)
                .await
                .map_err(db_err)?;
        Ok(row.map(|(u,)| u))
    }

    pub(crate) async fn sho_url(&self, pcid: &str) -> Result<Option<(String, String)>, RoleError> {
        sqlx::query_as("SELECT sho_id, sho_url FROM ro_subscription WHERE pcid = $1")
            .bind(pcid)
            .fetch_optional(&self.db)
            .await
            .map_err(db_err)
    }
}
