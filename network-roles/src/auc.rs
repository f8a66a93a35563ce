//! The authentication centre both the RO's ICF (for PCIDs, 5.1.3.6.2 step 3) and the SHO (for
//! its IMSIs, 5.1.3.3.2.2) run: K and OPc wrapped at rest ([`crate::atrest`]), SEQ_HE per
//! subscriber, vectors and resynchronisation from `mcim_core::aka`. One place for the rule.

use crate::store::Db;
use mcim_core::aka::{
    Amf, Auts, Constants, HeSqnState, K, Milenage, Opc, Rand, SoftKernel, SqnProfile, generate_avs,
    resynchronise,
};
use mcim_proto::mcim::common::v1 as common;

use crate::atrest::DataKey;
use crate::error::RoleError;
use crate::store::db_err;

/// AMF of the vectors: the separation bit set (TS 33.102 annex H).
const AMF: Amf = Amf([0x80, 0x00]);

/// How many times [`Auc::vectors`] reads SEQ_HE again when another call advanced it first
/// (each such call made its vectors: a contended subscriber still gets its vectors, this
/// many calls at once being far beyond what one device asks).
const SQN_ATTEMPTS: usize = 64;

/// One owner's subscribers ("icf" or "sho") in the roles' database.
#[derive(Debug)]
pub struct Auc {
    owner: &'static str,
    db: Db,
    key: DataKey,
}

/// What a new subscriber's credential meets.
#[derive(Debug, PartialEq, Eq)]
pub enum Provisioned {
    /// Stored.
    New,
    /// The same K and OPc were already stored (an idempotent retry).
    Same,
}

impl Auc {
    /// The AuC of `owner`, its secrets under `key`.
    pub fn new(owner: &'static str, db: Db, key: DataKey) -> Self {
        Self { owner, db, key }
    }

    /// A new subscriber row's values: K and OPc (16 octets each) sealed under the data key, and
    /// SEQ_HE from zero.
    fn new_row(&self, k: &[u8], opc: &[u8]) -> Result<(Vec<u8>, Vec<u8>, String), RoleError> {
        if k.len() != 16 || opc.len() != 16 {
            return Err(RoleError::invalid("K and OPc are 16 octets each"));
        }
        let seal = |s: &[u8]| {
            self.key
                .seal(s)
                .map_err(|e| RoleError::internal(e.to_string()))
        };
        let sqn = serde_json::to_string(&HeSqnState::default())
            .map_err(|e| RoleError::internal(e.to_string()))?;
        Ok((seal(k)?, seal(opc)?, sqn))
    }

    /// Replaces whatever is kept for `id` with a new K and OPc (SEQ_HE from zero), inside the
    /// caller's transaction: a credential that never left this role (the SHO's package for it
    /// is stored in the same transaction, so the K in the package and the AuC's are one).
    pub async fn replace_in(
        &self,
        tx: &mut crate::store::Tx,
        id: &str,
        k: &[u8],
        opc: &[u8],
    ) -> Result<(), RoleError> {
        let (wk, wopc, sqn) = self.new_row(k, opc)?;
        sqlx::query(
            "INSERT INTO auc_subscriber (owner, id, k, opc, sqn) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT(owner, id) DO UPDATE SET k = excluded.k, opc = excluded.opc, \
             sqn = excluded.sqn",
        )
        .bind(self.owner)
        .bind(id)
        .bind(&wk)
        .bind(&wopc)
        .bind(sqn)
        .execute(&mut **tx)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    /// Stores K and OPc for `id`. The same credential again is fine; a different one for an
    /// existing id is ALREADY_EXISTS and changes nothing.
    pub async fn provision(
        &self,
        id: &str,
        k: &[u8],
        opc: &[u8],
    ) -> Result<Provisioned, RoleError> {
        let (wk, wopc, sqn) = self.new_row(k, opc)?;
        let done = sqlx::query(
            "INSERT INTO auc_subscriber (owner, id, k, opc, sqn) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT(owner, id) DO NOTHING",
        )
        .bind(self.owner)
        .bind(id)
        .bind(&wk)
        .bind(&wopc)
        .bind(sqn)
        .execute(&self.db)
        .await
        .map_err(db_err)?;
        if done.rows_affected() == 1 {
            return Ok(Provisioned::New);
        }
        // AES-KWP is deterministic: the same secrets wrap to the same rows.
        let row: Option<(Vec<u8>, Vec<u8>)> =
            sqlx::query_as("SELECT k, opc FROM auc_subscriber WHERE owner = $1 AND id = $2")
                .bind(self.owner)
                .bind(id)
                .fetch_optional(&self.db)
                .await
                .map_err(db_err)?;
        match row {
            Some((a, b)) if a == wk && b == wopc => Ok(Provisioned::Same),
            _ => Err(RoleError::exists(format!(
                "{id} already has other credentials"
            ))),
        }
    }

    /// `count` (1-5) vectors for `id`, after resynchronising on `resync` when given.
    pub async fn vectors(
        &self,
        id: &str,
        count: u32,
        resync: Option<&common::ResyncInfo>,
    ) -> Result<Vec<common::AuthVector>, RoleError> {
        if !(1..=5).contains(&count) {
            return Err(RoleError::invalid("1 to 5 vectors"));
        }
        // SEQ_HE is read, advanced, and written back only if nobody wrote it in between (a
        // compare-and-swap on the stored state), else read again: no two vectors get one SQN,
        // whichever process of the role makes them (replicas, issue 16 item 2), and no lock is
        // held while K and OPc are opened and MILENAGE runs (one short write per call, not a
        // transaction across the work: on SQLite the database's one write lock is the
        // bottleneck of a fleet).
        for _ in 0..SQN_ATTEMPTS {
            let row: Option<(Vec<u8>, Vec<u8>, String)> = sqlx::query_as(
                "SELECT k, opc, sqn FROM auc_subscriber WHERE owner = $1 AND id = $2",
            )
            .bind(self.owner)
            .bind(id)
            .fetch_optional(&self.db)
            .await
            .map_err(db_err)?;
            let (wk, wopc, sqn) =
                row.ok_or_else(|| RoleError::not_found(format!("unknown {id}")))?;
            let (avs, next) = self.make(&wk, &wopc, &sqn, count, resync)?;
            let done = sqlx::query(
                "UPDATE auc_subscriber SET sqn = $1 WHERE owner = $2 AND id = $3 AND sqn = $4",
            )
            .bind(next)
            .bind(self.owner)
            .bind(id)
            .bind(&sqn)
            .execute(&self.db)
            .await
            .map_err(db_err)?;
            if done.rows_affected() == 1 {
                return Ok(avs);
            }
        }
        Err(RoleError::unavailable(
            "the subscriber's SQN kept changing under this call: try again",
        ))
    }

    /// `count` vectors from the stored K, OPc (sealed) and SQN state `sqn` (JSON), after
    /// `resync` if given, and the SQN state to store.
    fn make(
        &self,
        wk: &[u8],
        wopc: &[u8],
        sqn: &str,
        count: u32,
        resync: Option<&common::ResyncInfo>,
    ) -> Result<(Vec<common::AuthVector>, String), RoleError> {
        let open = |w: &[u8]| -> Result<[u8; 16], RoleError> {
            let v = self
                .key
                .open(w)
                .map_err(|e| RoleError::internal(e.to_string()))?;
            v.as_slice()
                .try_into()
                .map_err(|_| RoleError::internal("stored secret length"))
        };
        let k = K::new(open(wk)?);
        let opc = Opc::new(open(wopc)?);
        let m = Milenage::with_opc(SoftKernel::new(&k), opc, Constants::default());
        let mut state: HeSqnState =
            serde_json::from_str(sqn).map_err(|e| RoleError::internal(e.to_string()))?;
        let profile = SqnProfile::default();
        if let Some(r) = resync {
            let rand = Rand(
                r.rand
                    .as_slice()
                    .try_into()
                    .map_err(|_| RoleError::invalid("RAND is 16 octets"))?,
            );
            let auts = Auts(
                r.auts
                    .as_slice()
                    .try_into()
                    .map_err(|_| RoleError::invalid("AUTS is 14 octets"))?,
            );
            resynchronise(&m, &mut state, &profile, &rand, &auts)
                .map_err(|e| RoleError::invalid(e.to_string()))?;
        }
        let rands: Vec<Rand> = {
            let mut rng = rand::rng();
            (0..count).map(|_| Rand::random(&mut rng)).collect()
        };
        let avs = generate_avs(&m, &mut state, &profile, AMF, &rands)
            .map_err(|e| RoleError::internal(e.to_string()))?;
        let next = serde_json::to_string(&state).map_err(|e| RoleError::internal(e.to_string()))?;
        let avs = avs
            .into_iter()
            .map(|av| common::AuthVector {
                rand: av.rand.0.to_vec(),
                xres: av.xres.0.to_vec(),
                ck: av.ck.expose().to_vec(),
                ik: av.ik.expose().to_vec(),
                autn: av.autn.0.to_vec(),
            })
            .collect();
        Ok((avs, next))
    }
}

impl Auc {
    /// Makes the credential kept under `from` the one of `to` (a renewal confirmed), in one
    /// transaction; `to`'s old one is gone. Done already (no `from`) changes nothing.
    pub async fn adopt(&self, from: &str, to: &str) -> Result<(), RoleError> {
        let mut tx = crate::store::begin_write(&self.db).await?;
        let pending: Option<(String,)> =
            sqlx::query_as("SELECT id FROM auc_subscriber WHERE owner = $1 AND id = $2")
                .bind(self.owner)
                .bind(from)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        if pending.is_some() {
            sqlx::query("DELETE FROM auc_subscriber WHERE owner = $1 AND id = $2")
                .bind(self.owner)
                .bind(to)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            sqlx::query("UPDATE auc_subscriber SET id = $1 WHERE owner = $2 AND id = $3")
                .bind(to)
                .bind(self.owner)
                .bind(from)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)
    }

    /// Forgets `id` (a credential that never left this role, replaced after a crash).
    pub async fn forget(&self, id: &str) -> Result<(), RoleError> {
        sqlx::query("DELETE FROM auc_subscriber WHERE owner = $1 AND id = $2")
            .bind(self.owner)
            .bind(id)
            .execute(&self.db)
            .await
            .map_err(db_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two processes of a role on one database (two pools here) making vectors for one
    /// subscriber at once never hand out one SQN twice: SEQ_HE ends advanced by exactly the
    /// number of vectors made. On an SQLite file, and on PostgreSQL where the tests have a
    /// server (`MCIM_TEST_POSTGRES`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_never_hand_out_one_sqn_twice() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut urls = vec![format!("sqlite://{}", dir.path().join("auc.db").display())];
        urls.extend(
            crate::store::test_urls()
                .into_iter()
                .filter(|u| u.starts_with("postgres")),
        );
        for url in urls {
            let key =
                || DataKey::load_or_create(dir.path(), "icf").unwrap_or_else(|e| panic!("{e}"));
            let open = || async {
                crate::store::open(&url)
                    .await
                    .unwrap_or_else(|e| panic!("{url}: {e}"))
            };
            let a = std::sync::Arc::new(Auc::new("icf", open().await, key()));
            let b = std::sync::Arc::new(Auc::new("icf", open().await, key()));
            a.provision("001010000000001", &[1; 16], &[2; 16])
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let mut calls = tokio::task::JoinSet::new();
            for i in 0..40 {
                let auc = if i % 2 == 0 { a.clone() } else { b.clone() };
                calls.spawn(async move { auc.vectors("001010000000001", 1, None).await });
            }
            let mut autns = std::collections::HashSet::new();
            while let Some(r) = calls.join_next().await {
                let v = r
                    .unwrap_or_else(|e| panic!("{e}"))
                    .unwrap_or_else(|e| panic!("{url}: {e}"));
                autns.insert(v[0].autn.clone());
            }
            assert_eq!(autns.len(), 40, "{url}");
            let (sqn,): (String,) =
                sqlx::query_as("SELECT sqn FROM auc_subscriber WHERE id = '001010000000001'")
                    .fetch_one(&a.db)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            let state: HeSqnState = serde_json::from_str(&sqn).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(state.seq_he, 40, "{url}: one SQN per vector");
        }
    }
}
