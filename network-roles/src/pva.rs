//! The Platform Validation Authority (TR 33.812 5.1.3.5.8; 5.1.3.6.2 steps 8-10): the SHO asks
//! for a validation of a device and gets a nonce; the device submits evidence for it over its
//! own TRE-held TLS identity; the PVA checks the platform credential against the supplier root,
//! the quote (or a token's signed evidence) against the nonce, and the PCRs against the
//! reference values the supplier registered for the model; a trusted verdict comes with a
//! result signed by the PVA (COSE_Sign1, ES256), bound to device and nonce, valid 5 minutes.
//!
//! State (reference values, validations) lives in the roles' database (`crate::store`), so a
//! validation survives a restart of the PVA; deciding one is a single conditional UPDATE, so
//! two submissions cannot both decide it.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::store::Db;
use mcim_core::tpm::attest::{ClockInfo, TpmQuote, verify_quote_with_key};
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::pva::v1 as pb;
use mcim_proto::mcim::pva::v1::pva_service_server::PvaService;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::error::{RoleError, role};
use crate::gate::authorized;
use crate::store::{Changes, db_err};

/// How long a signed validation result is good for.
pub const RESULT_LIFETIME: Duration = Duration::from_secs(300);

/// A model's reference values, as stored (JSON in `pva_reference.body`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Reference {
    pcrs: Vec<(u32, String)>,
    allow_pkcs11: bool,
    pkcs11_measurement: String,
}

#[derive(Clone, Debug)]
struct Validation {
    pcid: String,
    /// The SHO that asked for it (empty for validations asked before this was recorded).
    requested_by: String,
    nonce: [u8; 32],
    verdict: pb::Verdict,
    reason: String,
    result: Option<common::SignedValidationResult>,
}

/// The PVA's service.
pub struct Pva {
    pki: PathBuf,
    /// The PVA's key (`pva.key`) as ring holds it: results are signed on the hot path.
    key: mcim_core::es256::Signer,
    db: Db,
    /// Validations decided (wakes GetValidationResult long polls).
    decided: Changes,
}

/// The longest a GetValidationResult long poll waits.
const MAX_WAIT: Duration = Duration::from_secs(30);

impl std::fmt::Debug for Pva {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pva")
            .field("pki", &self.pki)
            .finish_non_exhaustive()
    }
}

/// What the PVA finds of a device's TPM clock against the last one it saw.
#[derive(Debug, PartialEq, Eq)]
enum Clock {
    /// Later than before (or the first): recorded.
    Forward,
    /// Earlier than before: the evidence is refused for this reason; nothing recorded.
    Backwards(String),
}

impl Pva {
    /// A PVA that signs results with its role key in `pki` (`pva.key`).
    pub fn new(pki: PathBuf, db: Db) -> Result<Self, mcim_pki::PkiError> {
        let key = mcim_pki::dev::signing_key(&pki, "pva")?;
        let unusable = |e: String| mcim_pki::PkiError::File {
            path: pki.join("pva.key"),
            detail: e,
        };
        let key = mcim_core::es256::Signer::new(&key).map_err(|e| unusable(e.to_string()))?;
        let decided = Changes::new(&db, "pva_decided");
        Ok(Self {
            pki,
            key,
            db,
            decided,
        })
    }

    async fn reference(&self, model: &str) -> Result<Option<Reference>, RoleError> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT body FROM pva_reference WHERE model = $1")
                .bind(model)
                .fetch_optional(&self.db)
                .await
                .map_err(db_err)?;
        row.map(|(body,)| {
            serde_json::from_str(&body).map_err(|e| RoleError::internal(e.to_string()))
        })
        .transpose()
    }

    async fn validation(&self, id: &str) -> Result<Validation, RoleError> {
        type Row = (
            String,
            Vec<u8>,
            i64,
            String,
            Option<Vec<u8>>,
            Option<i64>,
            String,
        );
        let row: Option<Row> = sqlx::query_as(
            "SELECT pcid, nonce, verdict, reason, result, expires_at, requested_by \
             FROM pva_validation WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.db)
        .await
        .map_err(db_err)?;
        let (pcid, nonce, verdict, reason, result, expires, requested_by) =
            row.ok_or_else(|| RoleError::not_found("no such validation"))?;
        Ok(Validation {
            pcid,
            requested_by,
            nonce: nonce
                .try_into()
                .map_err(|_| RoleError::internal("stored nonce"))?,
            verdict: pb::Verdict::try_from(i32::try_from(verdict).unwrap_or(0))
                .unwrap_or(pb::Verdict::Unspecified),
            reason,
            result: result.map(|cose| common::SignedValidationResult {
                cose_sign1: cose,
                expires_at: expires.map(|s| prost_types::Timestamp {
                    seconds: s,
                    nanos: 0,
                }),
            }),
        })
    }

    /// The whole check of one piece of evidence, without the database (what SubmitEvidence
    /// does between reading the validation and recording the verdict; the PVA benchmark
    /// measures it): the platform credential's chain to the supplier root (read from the PKI
    /// directory, as each SubmitEvidence does), the evidence against `nonce` and the model's
    /// reference PCRs (SHA-256 values, hex), and the signed result. `Err(reason)`: untrusted.
    /// The device clock's monotonicity, which needs the database, is not checked.
    pub fn validate_offline(
        &self,
        validation_id: &str,
        pcid: &str,
        nonce: [u8; 32],
        ev: &common::Evidence,
        reference_pcrs: &[(u32, String)],
    ) -> Result<common::SignedValidationResult, String> {
        let v = Validation {
            pcid: pcid.to_string(),
            requested_by: String::new(),
            nonce,
            verdict: pb::Verdict::Pending,
            reason: String::new(),
            result: None,
        };
        let reference = Reference {
            pcrs: reference_pcrs.to_vec(),
            allow_pkcs11: false,
            pkcs11_measurement: String::new(),
        };
        let cred = mcim_pki::dev::verify_platform_credential(&self.pki, &ev.platform_credential);
        self.judge(&v, cred, Some(&reference), ev)?;
        self.sign_result(validation_id, &v, ev.aka_execution())
            .map_err(|e| e.to_string())
    }

    /// Judges evidence; `Err(reason)` means untrusted. A quote's clock comes back for the
    /// per-device monotonicity check ([`Pva::clock_moves_forward`]).
    fn judge(
        &self,
        v: &Validation,
        cred: Result<mcim_pki::party::PlatformCredential, mcim_pki::PkiError>,
        reference: Option<&Reference>,
        ev: &common::Evidence,
    ) -> Result<Option<ClockInfo>, String> {
        let cred = cred.map_err(|e| format!("platform credential: {e}"))?;
        if cred.pcid != v.pcid {
            return Err("the platform credential is another device's".into());
        }
        let reference =
            reference.ok_or_else(|| format!("no reference values for model {}", cred.model))?;
        match &ev.kind {
            Some(common::evidence::Kind::TpmQuote(q)) => {
                let ak = p256::PublicKey::from_sec1_bytes(&cred.ak_point)
                    .map_err(|_| "attestation key not on P-256".to_string())?;
                let quote = TpmQuote {
                    attest: q.attest.clone(),
                    signature: q.signature.clone(),
                    pcrs: q.pcrs.iter().map(|p| p.index as u8).collect(),
                    pcr_values: q
                        .pcrs
                        .iter()
                        .map(|p| p.digest.as_slice().try_into().unwrap_or([0u8; 32]))
                        .collect(),
                };
                let verified =
                    verify_quote_with_key(&ak, &quote, &v.nonce).map_err(|e| e.to_string())?;
                for (index, want) in &reference.pcrs {
                    let got = verified.pcrs.iter().find(|(i, _)| u32::from(*i) == *index);
                    match got {
                        Some((_, value)) if hex::encode(value) == *want => {}
                        Some(_) => {
                            return Err(format!("PCR {index} differs from the reference value"));
                        }
                        None => return Err(format!("PCR {index} was not quoted")),
                    }
                }
                Ok(Some(verified.clock))
            }
            Some(common::evidence::Kind::Pkcs11Signature(sig)) => {
                if !reference.allow_pkcs11 {
                    return Err("this model's policy does not accept PKCS#11 evidence".into());
                }
                let mut spki = mcim_core::token_wrap::P256_SPKI_PREFIX.to_vec();
                spki.extend_from_slice(&cred.ak_point);
                let p = mcim_core::token_evidence::verify(
                    &spki,
                    &sig.payload,
                    &sig.signature,
                    &v.nonce,
                )
                .map_err(|e| e.to_string())?;
                // The payload names the device it speaks for: this one.
                if p.pcid != v.pcid {
                    return Err("the evidence names another device".into());
                }
                if p.measurement != reference.pkcs11_measurement {
                    return Err("the daemon's measurement differs from the reference".into());
                }
                Ok(None)
            }
            None => Err("no evidence".into()),
        }
    }

    /// A device's TPM clock and reset/restart counts never go backwards (a TPM that was
    /// reset to an earlier state, or a replayed platform). The counts are compared as the AK
    /// reports them: the TPM obfuscates them per key for an owner-hierarchy AK, consistently,
    /// so order still shows. Records the new value when it moves forward.
    async fn clock_moves_forward(&self, pcid: &str, c: &ClockInfo) -> Result<Clock, RoleError> {
        let last: Option<(i64, i64, i64)> = sqlx::query_as(
            "SELECT reset_count, restart_count, clock FROM pva_device_clock WHERE pcid = $1",
        )
        .bind(pcid)
        .fetch_optional(&self.db)
        .await
        .map_err(db_err)?;
        let now = (
            i64::from(c.reset_count),
            i64::from(c.restart_count),
            i64::try_from(c.clock).unwrap_or(i64::MAX),
        );
        if let Some(prev) = last
            && now < prev
        {
            return Ok(Clock::Backwards(format!(
                "the TPM clock went backwards for this device (reset/restart/clock {now:?} < {prev:?})"
            )));
        }
        sqlx::query(
            "INSERT INTO pva_device_clock (pcid, reset_count, restart_count, clock) \
             VALUES ($1, $2, $3, $4) ON CONFLICT(pcid) DO UPDATE SET \
             reset_count = excluded.reset_count, restart_count = excluded.restart_count, \
             clock = excluded.clock",
        )
        .bind(pcid)
        .bind(now.0)
        .bind(now.1)
        .bind(now.2)
        .execute(&self.db)
        .await
        .map_err(db_err)?;
        Ok(Clock::Forward)
    }

    fn sign_result(
        &self,
        id: &str,
        v: &Validation,
        aka_execution: common::AkaExecution,
    ) -> Result<common::SignedValidationResult, RoleError> {
        let expires = SystemTime::now() + RESULT_LIFETIME;
        let secs = expires
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let cose = mcim_core::validation::sign(
            &self.key,
            &mcim_core::validation::ValidationResult {
                validation_id: id.to_string(),
                pcid: v.pcid.clone(),
                nonce: hex::encode(v.nonce),
                verdict: "trusted".into(),
                expires_at: secs,
                aka_execution: match aka_execution {
                    common::AkaExecution::UnsealedInHost => {
                        mcim_core::validation::AKA_UNSEALED_IN_HOST
                    }
                    _ => mcim_core::validation::AKA_IN_TRE,
                }
                .into(),
            },
        )
        .map_err(|e| RoleError::internal(e.to_string()))?;
        Ok(common::SignedValidationResult {
            cose_sign1: cose,
            expires_at: Some(prost_types::Timestamp {
                seconds: i64::try_from(secs).unwrap_or(i64::MAX),
                nanos: 0,
            }),
        })
    }
}

#[tonic::async_trait]
impl PvaService for Pva {
    async fn register_reference_values(
        &self,
        req: Request<pb::RegisterReferenceValuesRequest>,
    ) -> Result<Response<pb::RegisterReferenceValuesResponse>, Status> {
        role(async move {
            authorized(&req)?;
            let r = req.into_inner();
            if r.model.is_empty() {
                return Err(RoleError::invalid("model is required"));
            }
            if !r.pcr_bank.is_empty() && r.pcr_bank != "sha256" {
                return Err(RoleError::invalid("only the sha256 bank is supported"));
            }
            if r.pcrs.iter().any(|p| p.index > 23 || p.digest.len() != 32) {
                return Err(RoleError::invalid(
                    "PCRs are 0..=23 with 32-octet SHA-256 values",
                ));
            }
            let reference = Reference {
                pcrs: r
                    .pcrs
                    .into_iter()
                    .map(|p| (p.index, hex::encode(p.digest)))
                    .collect(),
                allow_pkcs11: r.allow_pkcs11,
                pkcs11_measurement: hex::encode(r.pkcs11_measurement),
            };
            let body = serde_json::to_string(&reference)
                .map_err(|e| RoleError::internal(e.to_string()))?;
            sqlx::query(
                "INSERT INTO pva_reference (model, body) VALUES ($1, $2) \
             ON CONFLICT(model) DO UPDATE SET body = excluded.body",
            )
            .bind(&r.model)
            .bind(body)
            .execute(&self.db)
            .await
            .map_err(db_err)?;
            Ok(Response::new(pb::RegisterReferenceValuesResponse {}))
        })
        .await
    }

    async fn request_validation(
        &self,
        req: Request<pb::RequestValidationRequest>,
    ) -> Result<Response<pb::RequestValidationResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            let r = req.into_inner();
            mcim_core::identity::Pcid::new(r.pcid.clone())
                .map_err(|e| RoleError::invalid(e.to_string()))?;
            let (id, nonce) = {
                let mut rng = rand::rng();
                let mut id = [0u8; 16];
                let mut nonce = [0u8; 32];
                rng.fill_bytes(&mut id);
                rng.fill_bytes(&mut nonce);
                (hex::encode(id), nonce)
            };
            sqlx::query(
                "INSERT INTO pva_validation (id, pcid, nonce, verdict, requested_by) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&id)
            .bind(&r.pcid)
            .bind(nonce.to_vec())
            .bind(pb::Verdict::Pending as i64)
            .bind(&auth.caller.name)
            .execute(&self.db)
            .await
            .map_err(db_err)?;
            Ok(Response::new(pb::RequestValidationResponse {
                validation_id: id,
                nonce: nonce.to_vec(),
            }))
        })
        .await
    }

    async fn submit_evidence(
        &self,
        req: Request<pb::SubmitEvidenceRequest>,
    ) -> Result<Response<pb::SubmitEvidenceResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            let id = req.get_ref().validation_id.clone();
            let v = self.validation(&id).await?;
            auth.owns(&v.pcid)?;
            if v.verdict != pb::Verdict::Pending {
                return Err(RoleError::conflict("this validation is already decided"));
            }
            let ev = req
                .into_inner()
                .evidence
                .ok_or_else(|| RoleError::invalid("evidence is required"))?;
            // The credential is verified once; its model picks the reference values.
            let cred =
                mcim_pki::dev::verify_platform_credential(&self.pki, &ev.platform_credential);
            let reference = match &cred {
                Ok(c) => self.reference(&c.model).await?,
                Err(_) => None,
            };
            let mut decided = v.clone();
            let judged = match self.judge(&v, cred, reference.as_ref(), &ev) {
                Ok(Some(clock)) => match self.clock_moves_forward(&v.pcid, &clock).await? {
                    Clock::Forward => Ok(()),
                    Clock::Backwards(why) => Err(why),
                },
                other => other.map(|_| ()),
            };
            match judged {
                Ok(()) => {
                    decided.verdict = pb::Verdict::Trusted;
                    decided.result = Some(self.sign_result(&id, &v, ev.aka_execution())?);
                }
                Err(reason) => {
                    tracing::warn!(pcid = %v.pcid, "untrusted: {reason}");
                    decided.verdict = pb::Verdict::Untrusted;
                    decided.reason = reason;
                }
            }
            let (cose, expires) = match &decided.result {
                Some(r) => (
                    Some(r.cose_sign1.clone()),
                    r.expires_at.as_ref().map(|t| t.seconds),
                ),
                None => (None, None),
            };
            let done = sqlx::query(
                "UPDATE pva_validation SET verdict = $1, reason = $2, result = $3, expires_at = $4 \
             WHERE id = $5 AND verdict = $6",
            )
            .bind(decided.verdict as i64)
            .bind(&decided.reason)
            .bind(cose)
            .bind(expires)
            .bind(&id)
            .bind(pb::Verdict::Pending as i64)
            .execute(&self.db)
            .await
            .map_err(db_err)?;
            if done.rows_affected() != 1 {
                return Err(RoleError::conflict("this validation is already decided"));
            }
            self.decided.bump();
            Ok(Response::new(pb::SubmitEvidenceResponse {
                verdict: decided.verdict as i32,
                reason: decided.reason,
            }))
        })
        .await
    }

    async fn get_validation_result(
        &self,
        req: Request<pb::GetValidationResultRequest>,
    ) -> Result<Response<pb::GetValidationResultResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            let id = &req.get_ref().validation_id;
            let deadline = tokio::time::Instant::now()
                + Duration::from_millis(u64::from(req.get_ref().wait_ms)).min(MAX_WAIT);
            // Subscribed before reading: a decision after the read wakes the wait below.
            let mut decided = self.decided.watch();
            let mut v = self.validation(id).await?;
            // Only the SHO that asked reads the result (a validation asked before the PVA
            // recorded who asked has no owner to check).
            if !v.requested_by.is_empty() {
                auth.owns(&v.requested_by)?;
            }
            let v = loop {
                let now = tokio::time::Instant::now();
                if v.verdict != pb::Verdict::Pending || now >= deadline {
                    break v;
                }
                decided.wait(deadline - now).await;
                decided = self.decided.watch();
                v = self.validation(id).await?;
            };
            Ok(Response::new(pb::GetValidationResultResponse {
                verdict: v.verdict as i32,
                reason: v.reason,
                result: v.result,
            }))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(reset: u32, restart: u32, ms: u64) -> ClockInfo {
        ClockInfo {
            clock: ms,
            reset_count: reset,
            restart_count: restart,
            safe: true,
        }
    }

    /// On SQLite, and on PostgreSQL too where the tests have a server (`MCIM_TEST_POSTGRES`).
    #[tokio::test]
    async fn a_device_clock_never_goes_backwards() {
        for url in crate::store::test_urls() {
            a_device_clock_never_goes_backwards_on(&url).await;
        }
    }

    async fn a_device_clock_never_goes_backwards_on(url: &str) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        mcim_pki::dev::init(dir.path(), &[(crate::authz::Role::Pva, "pva.mcim.local")])
            .unwrap_or_else(|e| panic!("{e}"));
        let db = crate::store::open(url)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let pva = Pva::new(dir.path().to_path_buf(), db).unwrap_or_else(|e| panic!("{e}"));
        let ok = |r: Result<Clock, RoleError>| matches!(r, Ok(Clock::Forward));
        assert!(ok(pva.clock_moves_forward("d1", &clock(5, 0, 1000)).await));
        assert!(
            ok(pva.clock_moves_forward("d1", &clock(5, 0, 2000)).await),
            "time passes"
        );
        assert!(
            ok(pva.clock_moves_forward("d1", &clock(6, 0, 10)).await),
            "a reboot"
        );
        let back = pva.clock_moves_forward("d1", &clock(6, 0, 5)).await;
        assert!(
            matches!(back, Ok(Clock::Backwards(ref m)) if m.contains("backwards")),
            "{back:?}"
        );
        let older = pva.clock_moves_forward("d1", &clock(5, 0, 9000)).await;
        assert!(
            matches!(older, Ok(Clock::Backwards(_))),
            "an older reset count"
        );
        assert!(
            ok(pva.clock_moves_forward("d2", &clock(1, 0, 1)).await),
            "per device"
        );
        // A refused clock is not recorded: the genuine next one still passes.
        assert!(ok(pva.clock_moves_forward("d1", &clock(6, 0, 11)).await));
    }

    /// A token's evidence is trusted only when signed by the credential's attestation key,
    /// over this validation's nonce, with the reference measurement, and naming this device
    /// (found by an outside attack: a payload naming another PCID was trusted).
    #[tokio::test]
    async fn token_evidence_must_name_the_device_it_speaks_for() {
        use mcim_core::token_evidence::EvidencePayload;
        use p256::elliptic_curve::Generate;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        mcim_pki::dev::init(dir.path(), &[(crate::authz::Role::Pva, "pva.mcim.local")])
            .unwrap_or_else(|e| panic!("{e}"));
        let db = crate::store::open("sqlite::memory:")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let pva = Pva::new(dir.path().to_path_buf(), db).unwrap_or_else(|e| panic!("{e}"));
        let ak = mcim_core::es256::Signer::new(&p256::ecdsa::SigningKey::generate_from_rng(
            &mut rand::rng(),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let mut ak_point = [0u8; 65];
        ak_point.copy_from_slice(ak.public_point());
        let pcid = "001010000000001";
        let v = Validation {
            pcid: pcid.into(),
            requested_by: String::new(),
            nonce: [7; 32],
            verdict: pb::Verdict::Pending,
            reason: String::new(),
            result: None,
        };
        let measurement = [9u8; 32];
        let reference = Reference {
            pcrs: Vec::new(),
            allow_pkcs11: true,
            pkcs11_measurement: hex::encode(measurement),
        };
        let judge = |named: &str, nonce: &[u8]| {
            let payload = EvidencePayload::new(named, nonce, &measurement).to_bytes();
            let signature = ak.sign(&payload).unwrap_or_else(|e| panic!("{e}"));
            let ev = common::Evidence {
                kind: Some(common::evidence::Kind::Pkcs11Signature(
                    common::Pkcs11Signature { payload, signature },
                )),
                ..Default::default()
            };
            let cred = Ok(mcim_pki::party::PlatformCredential {
                pcid: pcid.into(),
                model: "m".into(),
                ak_point,
                storage_key_uri: None,
            });
            pva.judge(&v, cred, Some(&reference), &ev)
        };
        let trusted = judge(pcid, &[7; 32]);
        assert!(matches!(trusted, Ok(None)), "{:?}", trusted.err());
        assert_eq!(
            judge("001010000000002", &[7; 32]).err().as_deref(),
            Some("the evidence names another device")
        );
        assert!(judge(pcid, &[8; 32]).is_err(), "another nonce");
    }
}
