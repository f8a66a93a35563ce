//! The SHO's follower (5.1.3.6.2 steps 10-11): after a registration, in the background, it
//! long-polls the PVA for the verdict, refuses an untrusted device (or one whose subscription
//! needs AKA in the TRE it does not have) through the RO's DPF, and hands a trusted device's
//! package to the DPF. Every step is idempotent; [`Sho::resume`] follows again what was in
//! flight when the SHO stopped.

use std::sync::Arc;

use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::pva::v1 as pva;
use mcim_proto::mcim::pva::v1::pva_service_client::PvaServiceClient;
use mcim_proto::mcim::ro::v1 as ro;
use mcim_proto::mcim::ro::v1::dpf_service_client::DpfServiceClient;
use mcim_telemetry::Channel;

use super::registrations::Registration;
use super::{RETRY_PAUSE, Sho, St, VALIDATION_LONG_POLL_MS, VALIDATION_WAIT};
use crate::authz::Role;
use crate::error::RoleError;
use crate::peers::role_verifying_key;
use crate::store::now;

/// The followers' "will retry" warnings, for all of a process's registrations.
static RETRY_WARNING: mcim_telemetry::Throttle =
    mcim_telemetry::Throttle::new(std::time::Duration::from_secs(10));

impl Sho {
    /// Follows one registration through steps 10-11 in the background, in the trace of the
    /// call that started it.
    /// Each step first renews this process's lease ([`Sho::claim`]), except the first when
    /// `leased` (the registration was stored with a fresh lease of this process a moment
    /// ago: one write less per registration); when another process has taken the
    /// registration over, or it is done, this follower stops. A registration this process
    /// follows already is not followed twice.
    pub(super) fn follow(self: Arc<Self>, id: String, leased: bool) {
        self.follow_from(id, leased, None);
    }

    /// [`Sho::follow`] a registration just stored by this process (and leased to it): the
    /// first step looks at `reg` as written instead of reading it back.
    pub(super) fn follow_stored(self: Arc<Self>, reg: Registration) {
        self.follow_from(reg.id.clone(), true, Some(reg));
    }

    fn follow_from(self: Arc<Self>, id: String, leased: bool, first: Option<Registration>) {
        {
            let mut following = self.following.lock().unwrap_or_else(|p| p.into_inner());
            if !following.insert(id.clone()) {
                return;
            }
        }
        let span = tracing::info_span!("follow_validation", registration = %id);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                self.follow_steps(&id, leased, first).await;
                self.following
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            },
            span,
        ));
    }

    /// The steps of [`Sho::follow`], until the registration is done, another process follows
    /// it, or [`VALIDATION_WAIT`] passes.
    async fn follow_steps(&self, id: &str, mut leased: bool, mut first: Option<Registration>) {
        let deadline = tokio::time::Instant::now() + VALIDATION_WAIT;
        loop {
            let claimed = if std::mem::take(&mut leased) {
                Ok(true)
            } else {
                self.claim(id, false).await
            };
            let looked = match claimed {
                // Done, or followed by another process now.
                Ok(false) => return,
                Ok(true) => self.step(id, first.take()).await,
                Err(e) => Err(e),
            };
            match looked {
                Ok(true) => return,
                // Still pending after a long poll: ask again at once.
                Ok(false) => {}
                Err(e) if e.retryable() => {
                    // A role that is down fails every follower at once: one warning every
                    // 10 s for all of them (the rest at debug level).
                    if let Some(held_back) = RETRY_WARNING.due() {
                        tracing::warn!(
                            registration = %id,
                            held_back,
                            "will retry: {e} (said at most every 10 s for all registrations)"
                        );
                    } else {
                        tracing::debug!(registration = %id, "will retry: {e}");
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => {
                    tracing::warn!(registration = %id, "failed: {e}");
                    let _ = self.set_state(id, St::Failed, &e.to_string()).await;
                    return;
                }
            }
            if tokio::time::Instant::now() > deadline {
                let _ = self
                    .set_state(
                        id,
                        St::ValidationFailed,
                        "no evidence from the device in time",
                    )
                    .await;
                return;
            }
        }
    }

    /// One look at a registration (`known`: as this process just stored it; else read);
    /// `Ok(true)` when there is nothing more to do.
    async fn step(&self, id: &str, known: Option<Registration>) -> Result<bool, RoleError> {
        let reg = match known {
            Some(reg) => reg,
            None => match self.registration(id).await? {
                Some(reg) => reg,
                None => return Ok(true),
            },
        };
        let Registration {
            pcid,
            nonce,
            dpf_url,
            validation_id,
            state,
            package,
            ..
        } = reg;
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
        // Step 11 done: the DPF holds the package (a report relayed meanwhile stays).
        self.set_state(id, St::Authorized, "").await?;
        tracing::info!(%pcid, registration = %id, "package handed to the DPF");
        Ok(true)
    }

    pub(super) async fn dpf(&self, url: &str) -> Result<DpfServiceClient<Channel>, RoleError> {
        Ok(DpfServiceClient::new(
            self.dpfs
                .get_as(&self.pki, &self.cfg.party, Role::Ro, url)
                .await?,
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
}
