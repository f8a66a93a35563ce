//! The Platform Validation Authority (TR 33.812 5.1.3.5.8; 5.1.3.6.2 steps 8-10): the SHO asks
//! for a validation of a device and gets a nonce; the device submits evidence for it over its
//! own TRE-held TLS identity; the PVA checks the platform credential against the supplier root,
//! the quote (or a token's signed evidence) against the nonce, and the PCRs against the
//! reference values the supplier registered for the model; a trusted verdict comes with a
//! result signed by the PVA (COSE_Sign1, ES256), bound to device and nonce, valid 5 minutes.
//!
//! State is in memory in this slice: validations do not survive a restart (SQLite comes with
//! the rest of issue 5).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use coset::{CborSerializable, CoseSign1Builder, HeaderBuilder, iana};
use mcim_core::tpm::attest::{TpmQuote, verify_quote_with_key};
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::pva::v1 as pb;
use mcim_proto::mcim::pva::v1::pva_service_server::PvaService;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use rand::Rng;
use serde::Serialize;
use tonic::{Request, Response, Status};

use crate::pki;
use crate::tls::authorize;

/// How long a signed validation result is good for.
pub const RESULT_LIFETIME: Duration = Duration::from_secs(300);

#[derive(Clone, Debug)]
struct Reference {
    pcrs: Vec<(u32, Vec<u8>)>,
    allow_pkcs11: bool,
    pkcs11_measurement: Vec<u8>,
}

#[derive(Clone, Debug)]
struct Validation {
    pcid: String,
    nonce: [u8; 32],
    verdict: pb::Verdict,
    reason: String,
    result: Option<common::SignedValidationResult>,
}

/// What the PVA signs.
#[derive(Serialize)]
struct ResultPayload<'a> {
    validation_id: &'a str,
    pcid: &'a str,
    nonce: String,
    verdict: &'static str,
    expires_at: u64,
}

/// The PVA's service.
pub struct Pva {
    pki: PathBuf,
    key: SigningKey,
    refs: Mutex<HashMap<String, Reference>>,
    validations: Mutex<HashMap<String, Validation>>,
}

impl std::fmt::Debug for Pva {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pva")
            .field("pki", &self.pki)
            .finish_non_exhaustive()
    }
}

fn lock_err<T>(_: T) -> Status {
    Status::internal("state lock poisoned")
}

impl Pva {
    /// A PVA that signs results with its role key in `pki` (`pva.key`).
    pub fn new(pki: PathBuf) -> Result<Self, pki::PkiError> {
        let key = pki::signing_key(&pki, "pva")?;
        Ok(Self {
            pki,
            key,
            refs: Mutex::new(HashMap::new()),
            validations: Mutex::new(HashMap::new()),
        })
    }

    /// Judges evidence; `Err(reason)` means untrusted.
    fn judge(&self, v: &Validation, ev: &common::Evidence) -> Result<(), String> {
        let cred = pki::verify_platform_credential(&self.pki, &ev.platform_credential)
            .map_err(|e| format!("platform credential: {e}"))?;
        if cred.pcid != v.pcid {
            return Err("the platform credential is another device's".into());
        }
        let reference = self
            .refs
            .lock()
            .map_err(|_| "state".to_string())?
            .get(&cred.model)
            .cloned()
            .ok_or_else(|| format!("no reference values for model {}", cred.model))?;
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
                        Some((_, value)) if value.as_slice() == want.as_slice() => {}
                        Some(_) => {
                            return Err(format!("PCR {index} differs from the reference value"));
                        }
                        None => return Err(format!("PCR {index} was not quoted")),
                    }
                }
                Ok(())
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
                if p.measurement != hex::encode(&reference.pkcs11_measurement) {
                    return Err("the daemon's measurement differs from the reference".into());
                }
                Ok(())
            }
            None => Err("no evidence".into()),
        }
    }

    fn sign_result(
        &self,
        id: &str,
        v: &Validation,
    ) -> Result<common::SignedValidationResult, Status> {
        let expires = SystemTime::now() + RESULT_LIFETIME;
        let secs = expires
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let payload = serde_json::to_vec(&ResultPayload {
            validation_id: id,
            pcid: &v.pcid,
            nonce: hex::encode(v.nonce),
            verdict: "trusted",
            expires_at: secs,
        })
        .map_err(|e| Status::internal(e.to_string()))?;
        let cose = CoseSign1Builder::new()
            .protected(
                HeaderBuilder::new()
                    .algorithm(iana::Algorithm::ES256)
                    .build(),
            )
            .payload(payload)
            .create_signature(&[], |m| {
                let s: Signature = self.key.sign(m);
                s.to_bytes().to_vec()
            })
            .build()
            .to_vec()
            .map_err(|e| Status::internal(e.to_string()))?;
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
        authorize(
            &req,
            "/mcim.pva.v1.PvaService/RegisterReferenceValues",
            None,
        )?;
        let r = req.into_inner();
        if r.model.is_empty() {
            return Err(Status::invalid_argument("model is required"));
        }
        if !r.pcr_bank.is_empty() && r.pcr_bank != "sha256" {
            return Err(Status::invalid_argument(
                "only the sha256 bank is supported",
            ));
        }
        if r.pcrs.iter().any(|p| p.index > 23 || p.digest.len() != 32) {
            return Err(Status::invalid_argument(
                "PCRs are 0..=23 with 32-octet SHA-256 values",
            ));
        }
        let reference = Reference {
            pcrs: r.pcrs.into_iter().map(|p| (p.index, p.digest)).collect(),
            allow_pkcs11: r.allow_pkcs11,
            pkcs11_measurement: r.pkcs11_measurement,
        };
        self.refs
            .lock()
            .map_err(lock_err)?
            .insert(r.model, reference);
        Ok(Response::new(pb::RegisterReferenceValuesResponse {}))
    }

    async fn request_validation(
        &self,
        req: Request<pb::RequestValidationRequest>,
    ) -> Result<Response<pb::RequestValidationResponse>, Status> {
        authorize(&req, "/mcim.pva.v1.PvaService/RequestValidation", None)?;
        let r = req.into_inner();
        mcim_core::identity::Pcid::new(r.pcid.clone())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut rng = rand::rng();
        let mut id = [0u8; 16];
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut id);
        rng.fill_bytes(&mut nonce);
        let id = hex::encode(id);
        self.validations.lock().map_err(lock_err)?.insert(
            id.clone(),
            Validation {
                pcid: r.pcid,
                nonce,
                verdict: pb::Verdict::Pending,
                reason: String::new(),
                result: None,
            },
        );
        Ok(Response::new(pb::RequestValidationResponse {
            validation_id: id,
            nonce: nonce.to_vec(),
        }))
    }

    async fn submit_evidence(
        &self,
        req: Request<pb::SubmitEvidenceRequest>,
    ) -> Result<Response<pb::SubmitEvidenceResponse>, Status> {
        let id = req.get_ref().validation_id.clone();
        let v = self
            .validations
            .lock()
            .map_err(lock_err)?
            .get(&id)
            .cloned()
            .ok_or_else(|| Status::not_found("no such validation"))?;
        authorize(
            &req,
            "/mcim.pva.v1.PvaService/SubmitEvidence",
            Some(&v.pcid),
        )?;
        if v.verdict != pb::Verdict::Pending {
            return Err(Status::failed_precondition(
                "this validation is already decided",
            ));
        }
        let ev = req
            .into_inner()
            .evidence
            .ok_or_else(|| Status::invalid_argument("evidence is required"))?;
        let mut decided = v.clone();
        match self.judge(&v, &ev) {
            Ok(()) => {
                decided.verdict = pb::Verdict::Trusted;
                decided.result = Some(self.sign_result(&id, &v)?);
            }
            Err(reason) => {
                tracing::warn!(pcid = %v.pcid, "untrusted: {reason}");
                decided.verdict = pb::Verdict::Untrusted;
                decided.reason = reason;
            }
        }
        let resp = pb::SubmitEvidenceResponse {
            verdict: decided.verdict as i32,
            reason: decided.reason.clone(),
        };
        self.validations
            .lock()
            .map_err(lock_err)?
            .insert(id, decided);
        Ok(Response::new(resp))
    }

    async fn get_validation_result(
        &self,
        req: Request<pb::GetValidationResultRequest>,
    ) -> Result<Response<pb::GetValidationResultResponse>, Status> {
        authorize(&req, "/mcim.pva.v1.PvaService/GetValidationResult", None)?;
        let v = self
            .validations
            .lock()
            .map_err(lock_err)?
            .get(&req.get_ref().validation_id)
            .cloned()
            .ok_or_else(|| Status::not_found("no such validation"))?;
        Ok(Response::new(pb::GetValidationResultResponse {
            verdict: v.verdict as i32,
            reason: v.reason,
            result: v.result,
        }))
    }
}
