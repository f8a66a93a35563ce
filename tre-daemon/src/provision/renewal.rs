//! Renewal of the PCID's initial connectivity credential (TR 33.812 5.1.3.7.4.3: the device
//! may need it again after a change of SHO, so "a way to renew the initial connectivity
//! credentials ... should be provided"). The CCIF/ICF gave the credential a lifetime, which the
//! registry keeps with it (`McimRecord::expires_at`); before a change of SHO, `tred` renews a
//! credential that expires within [`RENEW_AHEAD_SECS`] (or has expired) over the connectivity
//! the device has:
//!
//! 1. a nonce of the device's, kept in `pcid-renewal.json` (replaced atomically) before it
//!    leaves, so a crash asks again with the same nonce and gets the same package;
//! 2. `IcfService.RenewInitialCredentials`: the new K and OPc wrapped for the TRE, in a package
//!    the RO signs (its certificate under the RO CA `tred` trusts, naming the identity the
//!    credential was installed from), for this PCID and this nonce; kept in the file;
//! 3. installed in place (`Registry::renew`: new secrets in the TRE, fresh SQN, the new
//!    lifetime, one commit; the old secrets leave the TRE);
//! 4. `ConfirmInitialCredentials`: the ICF switches to the new credential; then the file goes.
//!
//! A renewal left unfinished is finished before the next change. An expired credential that
//! cannot be renewed stops the change with the reason, and nothing changes.

use std::time::{SystemTime, UNIX_EPOCH};

use mcim_pki::Role;
use mcim_proto::mcim::ro::v1 as ro;
use mcim_proto::mcim::ro::v1::icf_service_client::IcfServiceClient;
use serde::{Deserialize, Serialize};

use super::{ProvisionError, Provisioner, Stop};
use crate::device::{DeviceError, NewMcim};
use crate::registry::files::{read_optional, write_atomic};

/// A credential that expires within this is renewed before a change (a week).
pub const RENEW_AHEAD_SECS: u64 = 7 * 24 * 3600;

/// A renewal in progress, as `pcid-renewal.json` keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pending {
    /// The device's nonce, hex.
    nonce: String,
    /// The RO's package, hex, once received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    package: Option<String>,
    /// When the new credential expires.
    #[serde(default)]
    expires_at: u64,
    /// Installed in the TRE (only the ICF's confirmation is left).
    #[serde(default)]
    installed: bool,
    /// The ICF asked for it (a `RenewalTask`): kept until done, even when the ICF is not
    /// reachable for a while.
    #[serde(default)]
    offered: bool,
}

impl Pending {
    /// A renewal not yet asked for, with a fresh nonce.
    fn fresh(offered: bool) -> Self {
        let mut nonce = [0u8; 16];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut nonce);
        Self {
            nonce: hex::encode(nonce),
            package: None,
            expires_at: 0,
            installed: false,
            offered,
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Provisioner {
    fn renewal_file(&self) -> std::path::PathBuf {
        self.state_dir.join("pcid-renewal.json")
    }

    fn pending_renewal(&self) -> Result<Option<Pending>, String> {
        let file = self.renewal_file();
        read_optional(&file)
            .map_err(|e| format!("{}: {e}", file.display()))?
            .map(|b| serde_json::from_slice(&b))
            .transpose()
            .map_err(|e| format!("{}: {e}", file.display()))
    }

    fn keep_renewal(&self, p: &Pending) -> Result<(), String> {
        let file = self.renewal_file();
        let json = serde_json::to_vec_pretty(p).map_err(|e| e.to_string())?;
        write_atomic(&file, &json).map_err(|e| format!("{}: {e}", file.display()))
    }

    /// Before a change of SHO: renews the PCID's credential when it expires within
    /// [`RENEW_AHEAD_SECS`] or a renewal was left unfinished. Returns the new expiry when it
    /// renewed. An expired credential that cannot be renewed is refused with the reason
    /// (nothing changed); one still valid goes on, with a warning.
    pub(super) async fn ensure_pcid_fresh(&self) -> Result<Option<u64>, ProvisionError> {
        let pcid = self.device.pcid().await?;
        let cred = match self.device.get(&pcid).await {
            Ok(c) => c,
            // No initial credential (discarded, never installed): nothing to renew.
            Err(DeviceError::Registry(crate::registry::RegistryError::NotFound(_))) => {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let unfinished = self
            .pending_renewal()
            .map_err(ProvisionError::Persist)?
            .is_some();
        let now = now();
        let due = cred
            .expires_at
            .is_some_and(|e| e < now.saturating_add(RENEW_AHEAD_SECS));
        if !due && !unfinished {
            return Ok(None);
        }
        match self.renew_pcid(&pcid, &cred.sho).await {
            Ok(expires_at) => {
                tracing::info!(%pcid, expires_at, "the PCID's initial credential was renewed");
                Ok(Some(expires_at))
            }
            Err(why) => match cred.expires_at {
                Some(e) if e <= now => Err(ProvisionError::NotReady(format!(
                    "the PCID's initial credential expired at {e} (now {now}) and could not be \
                     renewed: {why}; nothing was changed"
                ))),
                _ => {
                    tracing::warn!(%pcid, "the PCID's initial credential was not renewed: {why}");
                    Ok(None)
                }
            },
        }
    }

    /// Steps 1-4 of the module's comment, each resumed from the file. Returns the new expiry.
    async fn renew_pcid(&self, pcid: &str, icf_id: &str) -> Result<u64, String> {
        // One at a time (the listener and a change may both finish one).
        let _one = self.ledger.one.lock().await;
        let mut p = match self.pending_renewal()? {
            Some(p) => p,
            None => {
                let p = Pending::fresh(false);
                self.keep_renewal(&p)?;
                p
            }
        };
        let nonce = hex::decode(&p.nonce).map_err(|e| format!("the kept nonce: {e}"))?;
        let url = self.net(0).map_err(Stop::reason)?.ro_url.clone();
        let mut icf = IcfServiceClient::new(self.channel(&url, Role::Ro, 0).map_err(Stop::reason)?);
        if p.package.is_none() {
            let params = self.device.parameters().await.map_err(|e| e.to_string())?;
            let asked = icf
                .renew_initial_credentials(ro::RenewInitialCredentialsRequest {
                    pcid: pcid.to_string(),
                    tre_kind: crate::wire::tre_kind(params.capabilities.kind) as i32,
                    storage_public: params.storage_public,
                    aka_execution: crate::wire::aka_execution(params.capabilities.aka_execution)
                        as i32,
                    nonce: nonce.clone(),
                    platform_credential: params.platform_credential,
                })
                .await;
            let r = match asked {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    // Nothing came back, so nothing was installed: the next renewal starts
                    // afresh (the ICF replaces a renewal it offered and never saw confirmed);
                    // one the ICF asked for stays to do.
                    if !p.offered {
                        let _ = std::fs::remove_file(self.renewal_file());
                    }
                    return Err(format!("the ICF: {}: {}", s.code(), s.message()));
                }
            };
            let package = r
                .package
                .map(|p| p.cose_sign1)
                .filter(|p| !p.is_empty())
                .ok_or("the ICF answered no package")?;
            p.package = Some(hex::encode(package));
            p.expires_at = r
                .expires_at
                .and_then(|t| u64::try_from(t.seconds).ok())
                .unwrap_or(0);
            self.keep_renewal(&p)?;
        }
        if !p.installed {
            let package = hex::decode(p.package.as_deref().unwrap_or_default())
                .map_err(|e| format!("the kept package: {e}"))?;
            let new = self.verify_renewal(&package, pcid, icf_id, &nonce)?;
            let expires = (p.expires_at > 0).then_some(p.expires_at);
            self.device
                .renew(pcid, new.wrapped, expires)
                .await
                .map_err(|e| format!("the TRE did not take the renewed credential: {e}"))?;
            p.installed = true;
            self.keep_renewal(&p)?;
        }
        icf.confirm_initial_credentials(ro::ConfirmInitialCredentialsRequest {
            pcid: pcid.to_string(),
            nonce,
        })
        .await
        .map_err(|s| format!("the ICF did not take the confirmation: {}", s.message()))?;
        let file = self.renewal_file();
        std::fs::remove_file(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        Ok(p.expires_at)
    }

    /// The ICF asked for a renewal (a `RenewalTask`): kept as a renewal to do, and done now
    /// when `now` (between runs; during one, before the next change).
    pub(super) async fn renewal_offered(&self, now: bool) {
        match self.pending_renewal() {
            Ok(Some(_)) => {}
            Ok(None) => {
                if let Err(e) = self.keep_renewal(&Pending::fresh(true)) {
                    tracing::error!("the ICF's renewal offer is not kept: {e}");
                    return;
                }
            }
            Err(e) => {
                tracing::error!("{e}");
                return;
            }
        }
        if now {
            self.finish_renewal().await;
        }
    }

    /// Finishes a renewal to do (asked for by the ICF, or left by a crash), if any.
    pub(super) async fn finish_renewal(&self) {
        if !matches!(self.pending_renewal(), Ok(Some(_))) {
            return;
        }
        let cred = match self.device.pcid().await {
            Ok(pcid) => self.device.get(&pcid).await.map(|c| (pcid, c)),
            Err(e) => Err(e),
        };
        let (pcid, cred) = match cred {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("a renewal to do, and no PCID credential to renew: {e}");
                return;
            }
        };
        match self.renew_pcid(&pcid, &cred.sho).await {
            Ok(expires_at) => {
                tracing::info!(%pcid, expires_at, "the PCID's initial credential was renewed");
            }
            Err(why) => tracing::warn!(%pcid, "the PCID's credential is not renewed yet: {why}"),
        }
    }

    /// The renewal package: signed by the RO `icf_id` (its certificate under the RO CA `tred`
    /// trusts), for this PCID as its IMSI, this nonce.
    fn verify_renewal(
        &self,
        package: &[u8],
        pcid: &str,
        icf_id: &str,
        nonce: &[u8],
    ) -> Result<NewMcim, String> {
        let net = self.net.as_ref().ok_or("no network")?;
        let cert = mcim_core::signed::signer_certificate(package).map_err(|e| e.to_string())?;
        let key = crate::net::verify_party(net.server_ca(Role::Ro), &cert, Role::Ro, icf_id)?;
        let p = mcim_core::package::open(package, &key, pcid, "renewal", nonce)
            .map_err(|e| e.to_string())?;
        if p.imsi != pcid || p.sho_id != icf_id {
            return Err("the renewal is not for this PCID's credential".into());
        }
        NewMcim::from_package(&p).map_err(|e| e.to_string())
    }
}
