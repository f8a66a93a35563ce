//! The Selected Home Operator (TR 33.812 5.1.3.5.6): subscriptions (5.1.3.5.2), the device's
//! registration by the RO's DRF (5.1.3.6.2 step 7), validation by the PVA (steps 8-10), the
//! MCIM package and the DPF's authorisation (step 11), the provisioning report (step 14), and
//! the AuC of its IMSIs for the operational attach (5.1.3.3.2.2).
//!
//! After a registration the SHO follows its validation in the background; registrations still
//! in flight when the SHO starts are followed again ([`Sho::resume`]), and every step is
//! idempotent, so a restart of the SHO, the PVA or the RO loses nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mcim_core::aka::{K, Opc};
use mcim_core::identity::Pcid;
use mcim_core::package::{self, McimPackagePayload, McimPolicy, TreTarget, UsimData};
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::pva::v1 as pva;
use mcim_proto::mcim::pva::v1::pva_service_client::PvaServiceClient;
use mcim_proto::mcim::ro::v1 as ro;
use mcim_proto::mcim::ro::v1::dpf_service_client::DpfServiceClient;
use mcim_proto::mcim::ro::v1::drf_service_client::DrfServiceClient;
use mcim_proto::mcim::sho::v1 as pb;
use mcim_proto::mcim::sho::v1::RegistrationState as St;
use mcim_proto::mcim::sho::v1::sho_service_server::ShoService;
use mcim_telemetry::Channel;
use p256::ecdsa::SigningKey;
use sqlx::SqlitePool;
use tonic::{Request, Response, Status};

use crate::atrest::DataKey;
use crate::auc::Auc;
use crate::authz::Role;
use crate::error::{RoleError, role};
use crate::gate::authorized;
use crate::peers::{self, role_verifying_key};
use crate::store::{db_err, new_id, now};

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
}

/// The SHO's state.
pub struct Sho {
    pki: PathBuf,
    db: SqlitePool,
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

/// The SHO's gRPC service.
#[derive(Debug, Clone)]
pub struct ShoApi(pub Arc<Sho>);

struct Subscription {
    pcid: String,
    subscriber: String,
    tre_kind: i64,
    storage_public: Vec<u8>,
    imsi: String,
    require_aka_in_tre: bool,
}

impl Sho {
    /// The SHO on `db` with its keys in `pki`.
    pub fn new(pki: PathBuf, db: SqlitePool, cfg: ShoConfig) -> Result<Arc<Self>, RoleError> {
        let internal = |e: &dyn std::fmt::Display| RoleError::internal(e.to_string());
        if cfg.plmn.len() < 5 || cfg.plmn.len() > 6 || !cfg.plmn.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(RoleError::invalid("the SHO's PLMN is 5 or 6 digits"));
        }
        let key = mcim_pki::dev::signing_key(&pki, "sho").map_err(|e| internal(&e))?;
        let cert = mcim_pki::dev::ca_der(&pki, "sho").map_err(|e| internal(&e))?;
        let id = mcim_pki::party::caller_from_cert(&cert)
            .map_err(|e| internal(&e))?
            .name;
        let data_key = DataKey::load_or_create(&pki, "sho").map_err(|e| internal(&e))?;
        Ok(Arc::new(Self {
            auc: Auc::new("sho", db.clone(), data_key),
            pva: peers::channel(&pki, Role::Sho, Role::Pva, &cfg.pva_url)?,
            drf: peers::channel(&pki, Role::Sho, Role::Ro, &cfg.ro_url)?,
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
            sqlx::query_as("SELECT id FROM sho_registration WHERE state IN (?, ?)")
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

    async fn subscription(&self, pcid: &str) -> Result<Option<Subscription>, RoleError> {
        type Row = (String, String, i64, Vec<u8>, String, i64);
        let row: Option<Row> = sqlx::query_as(
            "SELECT pcid, subscriber, tre_kind, storage_public, imsi, require_aka_in_tre \
             FROM sho_subscription WHERE pcid = ?",
        )
        .bind(pcid)
        .fetch_optional(&self.db)
        .await
        .map_err(db_err)?;
        Ok(row.map(
            |(pcid, subscriber, tre_kind, storage_public, imsi, require)| Subscription {
                pcid,
                subscriber,
                tre_kind,
                storage_public,
                imsi,
                require_aka_in_tre: require != 0,
            },
        ))
    }

    async fn set_state(&self, id: &str, st: St, detail: &str) -> Result<(), RoleError> {
        sqlx::query("UPDATE sho_registration SET state = ?, detail = ? WHERE id = ?")
            .bind(st as i64)
            .bind(detail)
            .bind(id)
            .execute(&self.db)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    /// Follows one registration through steps 10-11 in the background, in the trace of the
    /// call that started it.
    fn follow(self: Arc<Self>, id: String) {
        let span = tracing::info_span!("follow_validation", registration = %id);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let deadline = tokio::time::Instant::now() + VALIDATION_WAIT;
                loop {
                    match self.step(&id).await {
                        Ok(true) => return,
                        // Still pending after a long poll: ask again at once.
                        Ok(false) => {}
                        Err(e) if e.retryable() => {
                            tracing::warn!(registration = %id, "will retry: {e}");
                            tokio::time::sleep(RETRY_PAUSE).await;
                        }
                        Err(e) => {
                            tracing::warn!(registration = %id, "failed: {e}");
                            let _ = self.set_state(&id, St::Failed, &e.to_string()).await;
                            return;
                        }
                    }
                    if tokio::time::Instant::now() > deadline {
                        let _ = self
                            .set_state(
                                &id,
                                St::ValidationFailed,
                                "no evidence from the device in time",
                            )
                            .await;
                        return;
                    }
                }
            },
            span,
        ));
    }

    /// One look at a registration; `Ok(true)` when there is nothing more to do.
    async fn step(&self, id: &str) -> Result<bool, RoleError> {
        type Row = (String, Vec<u8>, String, String, i64, Option<Vec<u8>>);
        let row: Option<Row> = sqlx::query_as(
            "SELECT pcid, nonce, dpf_url, validation_id, state, package FROM sho_registration WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.db)
        .await
        .map_err(db_err)?;
        let Some((pcid, nonce, dpf_url, validation_id, state, package)) = row else {
            return Ok(true);
        };
        if state != St::Validating as i64 && state != St::Registered as i64 {
            return Ok(true);
        }
        // Step 10: the PVA's verdict.
        let v = PvaServiceClient::new(self.pva.clone())
            .get_validation_result(pva::GetValidationResultRequest {
                validation_id: validation_id.clone(),
                wait_ms: VALIDATION_LONG_POLL_MS,
            })
            .await
            .map_err(RoleError::peer(Role::Pva))?
            .into_inner();
        match pva::Verdict::try_from(v.verdict) {
            Ok(pva::Verdict::Pending) => return Ok(false),
            Ok(pva::Verdict::Trusted) => {}
            _ => {
                tracing::warn!(%pcid, registration = %id, "validation failed: {}", v.reason);
                self.refuse(id, &dpf_url, &v.reason).await?;
                return Ok(true);
            }
        }
        let result = v
            .result
            .ok_or_else(|| RoleError::internal("a trusted verdict without a signed result"))?;
        let pva_key = role_verifying_key(&self.pki, Role::Pva)?;
        let now_s = u64::try_from(now()).unwrap_or(0);
        let verified =
            match mcim_core::validation::verify(&result.cose_sign1, &pva_key, &pcid, now_s) {
                Ok(r) => r,
                Err(e) => {
                    self.refuse(id, &dpf_url, &e.to_string()).await?;
                    return Ok(true);
                }
            };
        let aka_in_host = verified.aka_execution == mcim_core::validation::AKA_UNSEALED_IN_HOST;
        if aka_in_host
            && self
                .subscription(&pcid)
                .await?
                .is_some_and(|s| s.require_aka_in_tre)
        {
            let why = "the device runs AKA outside its TRE (K unsealed into host memory); \
                       the subscription requires AKA in the TRE";
            tracing::warn!(%pcid, registration = %id, "{why}");
            self.refuse(id, &dpf_url, why).await?;
            return Ok(true);
        }
        // Step 11: the package (built once), then the DPF's authorisation.
        let package = match package {
            Some(p) => p,
            None => self.build_package(id, &pcid, &nonce, aka_in_host).await?,
        };
        self.dpf(&dpf_url)
            .await?
            .authorize_provisioning(ro::AuthorizeProvisioningRequest {
                registration_id: id.to_string(),
                package: Some(common::McimPackage {
                    cose_sign1: package,
                }),
                validation: Some(result),
            })
            .await
            .map_err(RoleError::peer(Role::Ro))?;
        self.set_state(id, St::Authorized, "").await?;
        tracing::info!(%pcid, registration = %id, "package handed to the DPF");
        Ok(true)
    }

    async fn dpf(&self, url: &str) -> Result<DpfServiceClient<Channel>, RoleError> {
        Ok(DpfServiceClient::new(
            self.dpfs.get(&self.pki, Role::Sho, Role::Ro, url).await?,
        ))
    }

    /// Step 10's negative outcome: the RO's DPF is told first (the device hears it on its task
    /// stream), then the registration is marked; a failure to reach the DPF is retried.
    async fn refuse(&self, id: &str, dpf_url: &str, reason: &str) -> Result<(), RoleError> {
        self.dpf(dpf_url)
            .await?
            .refuse_provisioning(ro::RefuseProvisioningRequest {
                registration_id: id.to_string(),
                reason: reason.to_string(),
            })
            .await
            .map_err(RoleError::peer(Role::Ro))?;
        self.set_state(id, St::ValidationFailed, reason).await
    }

    /// New K and OPc for the subscription's IMSI, wrapped for the device's TRE, in a package
    /// signed by the SHO and bound to the registration nonce. K leaves the SHO only wrapped:
    /// as a TPM AES key (AKA in the TPM), or, for a TPM the PVA found running AKA with K
    /// unsealed in the host (`aka_in_host`: no TPM2_EncryptDecrypt2), as sealed data.
    async fn build_package(
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
        let target = match common::TreKind::try_from(i32::try_from(sub.tre_kind).unwrap_or(0)) {
            Ok(common::TreKind::Tpm2) if aka_in_host => TreTarget::Tpm2SealedK,
            Ok(common::TreKind::Tpm2) => TreTarget::Tpm2,
            Ok(common::TreKind::Pkcs11) => TreTarget::Pkcs11,
            _ => return Err(RoleError::conflict("unknown TRE kind")),
        };
        let (k, opc, wrapped) = {
            let mut rng = rand::rng();
            let mut kb = zeroize::Zeroizing::new([0u8; 16]);
            let mut ob = zeroize::Zeroizing::new([0u8; 16]);
            rand::Rng::fill_bytes(&mut rng, &mut kb[..]);
            rand::Rng::fill_bytes(&mut rng, &mut ob[..]);
            let (k, opc) = (K::new(*kb), Opc::new(*ob));
            let wrapped = package::wrap_secrets(target, &sub.storage_public, &k, &opc, &mut rng)
                .map_err(|e| RoleError::conflict(e.to_string()))?;
            (kb, ob, wrapped)
        };
        // No package was stored, so no earlier K ever left: replace whatever a crash left.
        self.auc.forget(&sub.imsi).await?;
        self.auc.provision(&sub.imsi, &k[..], &opc[..]).await?;
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
            },
            policy: McimPolicy {
                use_for_connectivity: true,
                opc_bound_to_pcrs: false,
            },
            issued_at: u64::try_from(now()).unwrap_or(0),
        };
        let signed = package::seal(&self.key, &payload, &self.cert)
            .map_err(|e| RoleError::internal(e.to_string()))?;
        sqlx::query("UPDATE sho_registration SET package = ? WHERE id = ? AND package IS NULL")
            .bind(&signed)
            .bind(id)
            .execute(&self.db)
            .await
            .map_err(db_err)?;
        // Whatever is stored now is the one package of this registration.
        let (stored,): (Option<Vec<u8>>,) =
            sqlx::query_as("SELECT package FROM sho_registration WHERE id = ?")
                .bind(id)
                .fetch_one(&self.db)
                .await
                .map_err(db_err)?;
        stored.ok_or_else(|| RoleError::internal("package not stored"))
    }
}

#[tonic::async_trait]
impl ShoService for ShoApi {
    async fn create_subscription(
        &self,
        req: Request<pb::CreateSubscriptionRequest>,
    ) -> Result<Response<pb::CreateSubscriptionResponse>, Status> {
        role(async move {
            authorized(&req)?;
            let s = &self.0;
            let r = req.into_inner();
            if r.subscriber.is_empty() {
                return Err(RoleError::invalid("the subscriber is required"));
            }
            let device = r
                .device
                .ok_or_else(|| RoleError::invalid("the device is required"))?;
            let pcid =
                Pcid::new(device.pcid.clone()).map_err(|e| RoleError::invalid(e.to_string()))?;
            let target = match common::TreKind::try_from(r.tre_kind) {
                Ok(common::TreKind::Tpm2) => TreTarget::Tpm2,
                Ok(common::TreKind::Pkcs11) => TreTarget::Pkcs11,
                _ => return Err(RoleError::invalid("the TRE kind is required")),
            };
            // The storage key must be one we can wrap to (checked now, not at step 11).
            package::wrap_secrets(
                target,
                &r.storage_public,
                &K::new([0; 16]),
                &Opc::new([0; 16]),
                &mut rand::rng(),
            )
            .map_err(|e| RoleError::invalid(format!("storage key: {e}")))?;
            let cred = mcim_pki::dev::verify_platform_credential(&s.pki, &r.platform_credential)
                .map_err(|e| RoleError::invalid(format!("platform credential: {e}")))?;
            if cred.pcid != pcid.as_str() {
                return Err(RoleError::invalid(
                    "the platform credential is another device's",
                ));
            }
            // The MCIM will be wrapped to this key: it must be the one the supplier certified in
            // this device's TRE, not one the subscriber (or anyone) holds outside it.
            if !cred.certifies_storage_key(&r.storage_public) {
                return Err(RoleError::invalid(
                    "the storage key is not the one the supplier certified for this device's TRE",
                ));
            }
            if let Some(existing) = s.subscription(pcid.as_str()).await? {
                if existing.subscriber != r.subscriber {
                    return Err(RoleError::exists(
                        "this device has a subscription of another subscriber",
                    ));
                }
            } else {
                let mut tx = s.db.begin().await.map_err(db_err)?;
                // The next number of the SHO's range; numbers are never reused.
                let (n,): (i64,) = sqlx::query_as(
                    "UPDATE sho_imsi_seq SET last = last + 1 WHERE id = 1 RETURNING last",
                )
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err)?;
                let width = 15 - s.cfg.plmn.len();
                if u32::try_from(width)
                    .ok()
                    .and_then(|w| 10_i64.checked_pow(w))
                    .is_none_or(|limit| n >= limit)
                {
                    // Dropping the transaction leaves the counter as it was.
                    return Err(RoleError::exhausted("the SHO's IMSI range is used up"));
                }
                let imsi = format!("{}{:0width$}", s.cfg.plmn, n);
                sqlx::query(
                "INSERT INTO sho_subscription (id, pcid, subscriber, device_id, model, tre_kind, \
                 storage_public, imsi, require_aka_in_tre) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(new_id())
            .bind(pcid.as_str())
            .bind(&r.subscriber)
            .bind(&device.device_id)
            .bind(&cred.model)
            .bind(i64::from(r.tre_kind))
            .bind(&r.storage_public)
            .bind(&imsi)
            .bind(i64::from(r.require_aka_in_tre))
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
                tx.commit().await.map_err(db_err)?;
            }
            let sub = s
                .subscription(pcid.as_str())
                .await?
                .ok_or_else(|| RoleError::internal("subscription not stored"))?;
            // The RO's DRF learns where this device's SHO is (step 6 looks it up).
            DrfServiceClient::new(s.drf.clone())
                .set_subscription(ro::SetSubscriptionRequest {
                    pcid: sub.pcid.clone(),
                    sho_id: s.id.clone(),
                    sho_url: s.cfg.url.clone(),
                })
                .await
                .map_err(RoleError::peer(Role::Ro))?;
            tracing::info!(pcid = %sub.pcid, imsi = %sub.imsi, "subscription");
            Ok(Response::new(pb::CreateSubscriptionResponse {
                subscription_id: sub.pcid,
                imsi: sub.imsi,
            }))
        })
        .await
    }

    async fn register_device(
        &self,
        req: Request<pb::RegisterDeviceRequest>,
    ) -> Result<Response<pb::RegisterDeviceResponse>, Status> {
        role(async move {
        authorized(&req)?;
        let s = &self.0;
        let r = req.into_inner();
        if r.registration_id.is_empty() || r.registration_nonce.len() < 16 {
            return Err(RoleError::invalid(
                "a registration id and a nonce of 16 octets or more are required",
            ));
        }
        if !r.dpf_url.starts_with("https://") {
            return Err(RoleError::invalid(
                "dpf_url must be https://host:port",
            ));
        }
        s.subscription(&r.pcid)
            .await?
            .ok_or_else(|| RoleError::not_found("no subscription for this PCID"))?;
        let existing: Option<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT validation_id, validation_nonce FROM sho_registration WHERE id = ?",
        )
        .bind(&r.registration_id)
        .fetch_optional(&s.db)
        .await
        .map_err(db_err)?;
        if let Some((validation_id, nonce)) = existing {
            return Ok(Response::new(pb::RegisterDeviceResponse {
                validation_id,
                nonce,
                pva_url: s.cfg.pva_url.clone(),
            }));
        }
        // Step 8: ask the PVA to validate the device.
        let v = PvaServiceClient::new(s.pva.clone())
            .request_validation(pva::RequestValidationRequest {
                pcid: r.pcid.clone(),
                registration_id: r.registration_id.clone(),
            })
            .await
            .map_err(RoleError::peer(Role::Pva))?
            .into_inner();
        sqlx::query(
            "INSERT INTO sho_registration (id, pcid, nonce, dpf_url, validation_id, validation_nonce, state) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&r.registration_id)
        .bind(&r.pcid)
        .bind(&r.registration_nonce)
        .bind(&r.dpf_url)
        .bind(&v.validation_id)
        .bind(&v.nonce)
        .bind(St::Validating as i64)
        .execute(&s.db)
        .await
        .map_err(db_err)?;
        s.clone().follow(r.registration_id.clone());
        tracing::info!(pcid = %r.pcid, registration = %r.registration_id, "registered; validation requested");
        Ok(Response::new(pb::RegisterDeviceResponse {
            validation_id: v.validation_id,
            nonce: v.nonce,
            pva_url: s.cfg.pva_url.clone(),
        }))
        })
        .await
    }

    async fn get_registration(
        &self,
        req: Request<pb::GetRegistrationRequest>,
    ) -> Result<Response<pb::GetRegistrationResponse>, Status> {
        role(async move {
            authorized(&req)?;
            let row: Option<(i64, String, String)> = sqlx::query_as(
                "SELECT r.state, r.detail, s.imsi FROM sho_registration r \
             JOIN sho_subscription s ON s.pcid = r.pcid WHERE r.id = ?",
            )
            .bind(&req.get_ref().registration_id)
            .fetch_optional(&self.0.db)
            .await
            .map_err(db_err)?;
            let (state, detail, imsi) =
                row.ok_or_else(|| RoleError::not_found("no such registration"))?;
            Ok(Response::new(pb::GetRegistrationResponse {
                state: i32::try_from(state).unwrap_or(0),
                detail,
                imsi,
            }))
        })
        .await
    }

    async fn get_auth_vectors(
        &self,
        req: Request<pb::GetAuthVectorsRequest>,
    ) -> Result<Response<pb::GetAuthVectorsResponse>, Status> {
        role(async move {
            authorized(&req)?;
            let r = req.into_inner();
            // Only an MCIM the device reported installed serves (5.1.3.6.2 step 14).
            let live: Option<(String,)> = sqlx::query_as(
                "SELECT s.imsi FROM sho_subscription s JOIN sho_registration r ON r.pcid = s.pcid \
             WHERE s.imsi = ? AND r.state = ?",
            )
            .bind(&r.imsi)
            .bind(St::Provisioned as i64)
            .fetch_optional(&self.0.db)
            .await
            .map_err(db_err)?;
            if live.is_none() {
                return Err(RoleError::not_found("no provisioned MCIM with this IMSI"));
            }
            let vectors = self
                .0
                .auc
                .vectors(&r.imsi, r.count.max(1), r.resync.as_ref())
                .await?;
            Ok(Response::new(pb::GetAuthVectorsResponse { vectors }))
        })
        .await
    }

    async fn report_provisioning_status(
        &self,
        req: Request<pb::ReportProvisioningStatusRequest>,
    ) -> Result<Response<pb::ReportProvisioningStatusResponse>, Status> {
        role(async move {
            authorized(&req)?;
            let r = req.into_inner();
            let st = match common::ProvisioningStatus::try_from(r.status) {
                Ok(common::ProvisioningStatus::Installed) => St::Provisioned,
                Ok(common::ProvisioningStatus::Failed) => St::Failed,
                _ => return Err(RoleError::invalid("status is installed or failed")),
            };
            let done = sqlx::query(
            "UPDATE sho_registration SET state = ?, detail = ? WHERE id = ? AND state IN (?, ?, ?)",
        )
        .bind(st as i64)
        .bind(&r.detail)
        .bind(&r.registration_id)
        .bind(St::Authorized as i64)
        .bind(St::Provisioned as i64)
        .bind(St::Failed as i64)
        .execute(&self.0.db)
        .await
        .map_err(db_err)?;
            if done.rows_affected() != 1 {
                return Err(RoleError::conflict(
                    "no authorised registration with this id",
                ));
            }
            tracing::info!(registration = %r.registration_id, state = ?st, "provisioning result");
            Ok(Response::new(pb::ReportProvisioningStatusResponse {}))
        })
        .await
    }

    async fn notify_discard(
        &self,
        req: Request<pb::NotifyDiscardRequest>,
    ) -> Result<Response<pb::NotifyDiscardResponse>, Status> {
        role(async move {
            // The device that discarded: known from the IMSI once change of SHO is built; until
            // then only the role is checked.
            authorized(&req)?;
            Err(RoleError::not_built(
                "change of SHO (5.1.3.7.4.2) is not built yet",
            ))
        })
        .await
    }

    async fn receive_discard_ack(
        &self,
        req: Request<pb::ReceiveDiscardAckRequest>,
    ) -> Result<Response<pb::ReceiveDiscardAckResponse>, Status> {
        role(async move {
            authorized(&req)?;
            Err(RoleError::not_built(
                "change of SHO (5.1.3.7.4.2) is not built yet",
            ))
        })
        .await
    }
}
