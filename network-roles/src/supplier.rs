//! The M2M equipment supplier (TR 33.812 5.1.3.5.3) and its CCIF (5.1.3.4.1): certifies a
//! device's attestation key (the platform credential, 5.1.3.5.8 PfC) and TLS key under the
//! supplier root; as the CCIF, issues a device's initial connectivity credentials (mode 1:
//! generated here, wrapped for the device's TRE, given to the RO's ICF) or hands the ones the
//! supplier embedded to the ICF (mode 2). Mode 3, the subscriber registering them at the ICF,
//! is `mcimctl subscriber register-pcid`.

use std::path::PathBuf;

use mcim_core::aka::{K, Opc};
use mcim_core::identity::Pcid;
use mcim_core::package::{self, TreTarget};
use mcim_core::tpm::public::{EccPublic, attrs};
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::ro::v1 as ro;
use mcim_proto::mcim::ro::v1::icf_service_client::IcfServiceClient;
use mcim_proto::mcim::supplier::v1 as pb;
use mcim_proto::mcim::supplier::v1::supplier_service_server::SupplierService;
use tonic::{Request, Response, Status};

use crate::authz::Role;
use crate::error::{RoleError, role};
use crate::gate::authorized;

/// The supplier's service over its PKI directory (the supplier root signs).
#[derive(Debug, Clone)]
pub struct Supplier {
    pki: PathBuf,
    /// The RO's ICF (CCIF mode 2 hands credentials to it); none: not configured.
    icf: Option<mcim_telemetry::Channel>,
}

impl Supplier {
    /// Serves with the supplier root in `pki`; `ro_url` is the RO whose ICF receives the
    /// connectivity credentials the supplier embedded.
    pub fn new(pki: PathBuf, ro_url: Option<&str>) -> Result<Self, RoleError> {
        let icf = ro_url
            .map(|u| crate::peers::channel(&pki, Role::Supplier, Role::Ro, u))
            .transpose()?;
        Ok(Self { pki, icf })
    }
}

fn internal(e: mcim_pki::PkiError) -> RoleError {
    RoleError::Pki(e)
}

/// The attestation key's point: from a TPM2B_PUBLIC that must be a restricted, fixedTPM
/// signing key (else a "quote" it signed would prove nothing), or from a token's SPKI.
fn attestation_point(kind: i32, public: &[u8]) -> Result<[u8; 65], RoleError> {
    let bad = |m: &str| RoleError::invalid(format!("attestation key: {m}"));
    match common::TreKind::try_from(kind) {
        Ok(common::TreKind::Tpm2) => {
            let ak = EccPublic::from_tpm2b(public).map_err(|e| bad(&e.to_string()))?;
            let must =
                attrs::RESTRICTED | attrs::SIGN_ENCRYPT | attrs::FIXED_TPM | attrs::FIXED_PARENT;
            if ak.attributes & must != must || ak.attributes & attrs::DECRYPT != 0 {
                return Err(bad("not a restricted, fixedTPM signing key"));
            }
            ak.p256().map_err(|e| bad(&e.to_string()))?;
            let mut p = [0u8; 65];
            p[0] = 0x04;
            p[1..33].copy_from_slice(&ak.x);
            p[33..].copy_from_slice(&ak.y);
            Ok(p)
        }
        Ok(common::TreKind::Pkcs11) => {
            mcim_core::token_wrap::spki_point(public).map_err(|e| bad(&e.to_string()))?;
            let mut p = [0u8; 65];
            p.copy_from_slice(&public[26..]);
            Ok(p)
        }
        _ => Err(bad("unknown TRE kind")),
    }
}

/// A new K and OPc (zeroized when dropped, for an AuC) and the same wrapped for a device's
/// TRE (`target`, `storage_public`); a key nothing can be wrapped to is refused before
/// anything is kept (5.1.3.4.1 mode 1, the SHO's package, a renewal).
#[allow(clippy::type_complexity)]
pub(crate) fn fresh_wrapped(
    target: TreTarget,
    storage_public: &[u8],
) -> Result<
    (
        zeroize::Zeroizing<[u8; 16]>,
        zeroize::Zeroizing<[u8; 16]>,
        (Vec<u8>, Vec<u8>),
    ),
    RoleError,
> {
    let mut rng = rand::rng();
    let mut k = zeroize::Zeroizing::new([0u8; 16]);
    let mut opc = zeroize::Zeroizing::new([0u8; 16]);
    rand::Rng::fill_bytes(&mut rng, &mut k[..]);
    rand::Rng::fill_bytes(&mut rng, &mut opc[..]);
    let wrapped = package::wrap_secrets(
        target,
        storage_public,
        &K::new(*k),
        &Opc::new(*opc),
        &mut rng,
    )
    .map_err(|e| RoleError::invalid(format!("storage key: {e}")))?;
    Ok((k, opc, wrapped))
}

/// How K and OPc are wrapped for a device's TRE: its kind, and where it runs AKA (a TPM
/// without TPM2_EncryptDecrypt2 gets K as sealed data).
pub(crate) fn tre_target(tre_kind: i32, aka: common::AkaExecution) -> Result<TreTarget, RoleError> {
    match common::TreKind::try_from(tre_kind) {
        Ok(common::TreKind::Tpm2) if aka == common::AkaExecution::UnsealedInHost => {
            Ok(TreTarget::Tpm2SealedK)
        }
        Ok(common::TreKind::Tpm2) => Ok(TreTarget::Tpm2),
        Ok(common::TreKind::Pkcs11) => Ok(TreTarget::Pkcs11),
        _ => Err(RoleError::invalid("the TRE kind is required")),
    }
}

#[tonic::async_trait]
impl SupplierService for Supplier {
    async fn certify_device(
        &self,
        req: Request<pb::CertifyDeviceRequest>,
    ) -> Result<Response<pb::CertifyDeviceResponse>, Status> {
        role(async move {
            authorized(&req)?;
            let r = req.into_inner();
            let identity = r
                .identity
                .ok_or_else(|| RoleError::invalid("identity is required"))?;
            let pcid = Pcid::new(identity.pcid).map_err(|e| RoleError::invalid(e.to_string()))?;
            let ak = attestation_point(r.tre_kind, &r.attestation_public)?;
            // The platform credential certifies the storage key: it must be one K and OPc can
            // be wrapped to, as the SHO will wrap them (5.1.3.6.2 step 12).
            fresh_wrapped(
                tre_target(r.tre_kind, common::AkaExecution::InTre)?,
                &r.storage_public,
            )?;
            let root = mcim_pki::dev::ca_der(&self.pki, "supplier-root").map_err(internal)?;
            let ak_cert = mcim_pki::dev::issue_attestation_der(
                &self.pki,
                pcid.as_str(),
                &identity.model,
                &ak,
                &r.storage_public,
            )
            .map_err(internal)?;
            let tls_cert = mcim_pki::dev::issue_device_der(
                &self.pki,
                "supplier-root",
                pcid.as_str(),
                &r.tls_public_spki,
            )
            .map_err(|e| RoleError::invalid(e.to_string()))?;
            Ok(Response::new(pb::CertifyDeviceResponse {
                platform_credential: vec![ak_cert, root.clone()],
                tls_certificate: vec![tls_cert, root],
            }))
        })
        .await
    }

    async fn issue_connectivity_credentials(
        &self,
        req: Request<pb::IssueConnectivityCredentialsRequest>,
    ) -> Result<Response<pb::IssueConnectivityCredentialsResponse>, Status> {
        role(async move {
        authorized(&req)?;
        let r = req.into_inner();
        let pcid = Pcid::new(r.pcid.clone()).map_err(|e| RoleError::invalid(e.to_string()))?;
        let target = tre_target(r.tre_kind, r.aka_execution())?;
        let icf = self
            .icf
            .clone()
            .ok_or_else(|| RoleError::conflict("no RO configured (--ro-url)"))?;
        // Fresh K and OPc, wrapped for this TRE first (a key we cannot wrap to changes
        // nothing), then given to the ICF; only the wrapped form comes back.
        let (k, opc, (wrapped_k, wrapped_opc)) = fresh_wrapped(target, &r.storage_public)?;
        IcfServiceClient::new(icf)
            .register_initial_credentials(ro::RegisterInitialCredentialsRequest {
                pcid: pcid.as_str().to_string(),
                k: k.to_vec(),
                opc: opc.to_vec(),
                mode: ro::CredentialMode::CcifGenerated as i32,
                expires_at: r.expires_at,
                delayed_activation: false,
                supplier_voucher: None,
            })
            .await
            .map_err(RoleError::peer(Role::Ro))?;
        tracing::info!(pcid = %pcid.as_str(), device = %r.device_id, "CCIF mode 1: credentials issued");
        Ok(Response::new(pb::IssueConnectivityCredentialsResponse {
            pcid: pcid.as_str().to_string(),
            wrapped_k,
            wrapped_opc,
        }))
        })
        .await
    }

    /// CCIF mode 2 (5.1.3.4.1): the supplier generated the PCID's K and OPc and embedded them
    /// in the device's TRE; the CCIF hands them to the RO's ICF over mutual TLS and keeps no
    /// copy.
    async fn record_connectivity_credentials(
        &self,
        req: Request<pb::RecordConnectivityCredentialsRequest>,
    ) -> Result<Response<pb::RecordConnectivityCredentialsResponse>, Status> {
        role(async move {
            authorized(&req)?;
            let r = req.into_inner();
            let pcid = Pcid::new(r.pcid).map_err(|e| RoleError::invalid(e.to_string()))?;
            let icf = self
                .icf
                .clone()
                .ok_or_else(|| RoleError::conflict("no RO configured (--ro-url)"))?;
            IcfServiceClient::new(icf)
                .register_initial_credentials(ro::RegisterInitialCredentialsRequest {
                    pcid: pcid.as_str().to_string(),
                    k: r.k.clone(),
                    opc: r.opc.clone(),
                    mode: ro::CredentialMode::SupplierGenerated as i32,
                    expires_at: r.expires_at,
                    delayed_activation: false,
                    supplier_voucher: None,
                })
                .await
                .map_err(RoleError::peer(Role::Ro))?;
            Ok(Response::new(pb::RecordConnectivityCredentialsResponse {}))
        })
        .await
    }

    async fn get_supplier_root(
        &self,
        req: Request<pb::GetSupplierRootRequest>,
    ) -> Result<Response<pb::GetSupplierRootResponse>, Status> {
        role(async move {
            authorized(&req)?;
            Ok(Response::new(pb::GetSupplierRootResponse {
                certificate: mcim_pki::dev::ca_der(&self.pki, "supplier-root").map_err(internal)?,
            }))
        })
        .await
    }
}
