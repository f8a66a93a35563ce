//! Supply time at the factory (TR 33.812 5.1.3.3.4; the supplier's CCIF, 5.1.3.4.1): keys and
//! identity in the device's TRE, the supplier certifies them (platform credential naming the
//! AK and the storage key, TLS certificate), the certificates go back into `tred`, the
//! model's reference values reach the PVA, and the PCID's initial connectivity credential is
//! configured in one of the CCIF's three modes. `mcimctl supplier supply` and the lab both run
//! [`supply`].

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use mcim_core::aka::{K, Opc};
use mcim_core::package::{TreTarget, wrap_secrets};
use mcim_pki::Role;
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::pva::v1 as pva;
use mcim_proto::mcim::pva::v1::pva_service_client::PvaServiceClient;
use mcim_proto::mcim::supplier::v1 as sup;
use mcim_proto::mcim::supplier::v1::supplier_service_client::SupplierServiceClient;
use mcim_proto::mcim::tre::v1 as pb;
use mcim_proto::mcim::tre::v1::tre_service_client::TreServiceClient;
use rand::Rng;
use tonic::transport::Channel;

use crate::error::{CliError, fail, runtime};
use crate::subscriber::PcidCredentials;
use crate::tred::connect;

/// The CCIF's configuration modes (5.1.3.4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CcifMode {
    /// The CCIF generates them and returns them wrapped for the TRE.
    #[value(name = "1")]
    Issued = 1,
    /// The supplier embeds them, the CCIF hands them to the RO's ICF.
    #[value(name = "2")]
    Embedded = 2,
    /// The supplier embeds them, the subscriber registers them at the ICF.
    #[value(name = "3")]
    ViaSubscriber = 3,
}

impl CcifMode {
    /// What the mode means, for progress lines.
    pub fn describe(self) -> &'static str {
        match self {
            CcifMode::Issued => "issued by the CCIF, wrapped for this TRE",
            CcifMode::Embedded => "embedded by the supplier, recorded by the CCIF",
            CcifMode::ViaSubscriber => "embedded by the supplier, for the subscriber to register",
        }
    }
}

/// What supply time produced.
pub struct Supplied {
    /// The TRE's storage public key (what MCIMs are wrapped to).
    pub storage_public: Vec<u8>,
    /// The form this TRE takes secrets in.
    pub target: TreTarget,
    /// PCRs in the registered reference values (0 for a token's measurement).
    pub reference_pcrs: usize,
    /// Mode 3: the credentials the subscriber hands to the ICF.
    pub for_subscriber: Option<PcidCredentials>,
}

/// How the PCID's initial credential is issued (5.1.3.4.1) and for how long (5.1.3.7.4.3).
#[derive(Clone, Copy)]
pub struct CredentialTerms<'a> {
    /// The CCIF mode.
    pub mode: CcifMode,
    /// The RO whose ICF authenticates the PCID.
    pub ro_id: &'a str,
    /// Its lifetime in seconds; `None` for no limit.
    pub lifetime_secs: Option<u64>,
}

/// Runs supply time for `identity` on the TRE behind `dev`; `pva` registers the reference
/// values (the platform's state now) when given; `terms` say how the PCID's credential is
/// issued and for how long.
pub async fn supply(
    dev: &mut TreServiceClient<Channel>,
    supplier: &mut SupplierServiceClient<Channel>,
    pva: Option<&mut PvaServiceClient<Channel>>,
    identity: &common::DeviceIdentity,
    terms: CredentialTerms<'_>,
    pki: &std::path::Path,
) -> Result<Supplied, CliError> {
    let CredentialTerms {
        mode,
        ro_id,
        lifetime_secs,
    } = terms;
    // The PCID credential's lifetime (5.1.3.7.4.3): the ICF refuses it afterwards, and the
    // device, which keeps it with the credential, renews before.
    let expires_at = lifetime_secs.map(|s| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        prost_types::Timestamp {
            seconds: i64::try_from(now.saturating_add(s)).unwrap_or(i64::MAX),
            nanos: 0,
        }
    });
    let init = dev
        .init_device(pb::InitDeviceRequest {
            identity: Some(identity.clone()),
        })
        .await?
        .into_inner();
    let status = dev.get_status(pb::GetStatusRequest {}).await?.into_inner();
    let kind = status.tre_kind;
    let aka_execution = status
        .capabilities
        .map(|c| c.aka_execution)
        .unwrap_or_default();
    let cert = supplier
        .certify_device(sup::CertifyDeviceRequest {
            identity: Some(identity.clone()),
            tre_kind: kind,
            storage_public: init.storage_public.clone(),
            attestation_public: init.attestation_public.clone(),
            tls_public_spki: init.tls_public_spki.clone(),
        })
        .await?
        .into_inner();
    dev.install_certificates(pb::InstallCertificatesRequest {
        platform_credential: cert.platform_credential.clone(),
        tls_certificate: cert.tls_certificate.clone(),
    })
    .await?;

    // The model's reference values: this platform's state at supply time.
    let mut reference_pcrs = 0;
    if let Some(pva) = pva {
        let mut nonce = [0u8; 32];
        rand::rng().fill_bytes(&mut nonce);
        let golden = dev
            .attest(pb::AttestRequest {
                nonce: nonce.to_vec(),
                pcrs: Vec::new(),
            })
            .await?
            .into_inner();
        let mut refs = pva::RegisterReferenceValuesRequest {
            model: identity.model.clone(),
            pcr_bank: "sha256".into(),
            ..Default::default()
        };
        match golden.evidence.and_then(|e| e.kind) {
            Some(common::evidence::Kind::TpmQuote(q)) => refs.pcrs = q.pcrs,
            Some(common::evidence::Kind::Pkcs11Signature(s)) => {
                let p: mcim_core::token_evidence::EvidencePayload =
                    serde_json::from_slice(&s.payload).map_err(fail)?;
                refs.allow_pkcs11 = true;
                refs.pkcs11_measurement = hex::decode(p.measurement).map_err(fail)?;
            }
            None => return Err(fail("the TRE gave no evidence")),
        }
        reference_pcrs = refs.pcrs.len();
        pva.register_reference_values(refs).await?;
    }

    // The PCID's initial credential (5.1.3.4.1), in the form this TRE needs.
    let target = match (
        kind == common::TreKind::Tpm2 as i32,
        aka_execution == common::AkaExecution::UnsealedInHost as i32,
    ) {
        (true, true) => TreTarget::Tpm2SealedK,
        (true, false) => TreTarget::Tpm2,
        (false, _) => TreTarget::Pkcs11,
    };
    let pcid = identity.pcid.as_str();
    let (wrapped_k, wrapped_opc, clear) = match mode {
        CcifMode::Issued => {
            // Mode 1: the CCIF generates them, gives them to the ICF, and returns them
            // wrapped for this TRE; the supplier embeds what it got.
            let issued = supplier
                .issue_connectivity_credentials(sup::IssueConnectivityCredentialsRequest {
                    device_id: identity.device_id.clone(),
                    ro_id: ro_id.into(),
                    pcid: pcid.into(),
                    tre_kind: kind,
                    storage_public: init.storage_public.clone(),
                    aka_execution,
                    expires_at,
                })
                .await?
                .into_inner();
            (issued.wrapped_k, issued.wrapped_opc, None)
        }
        CcifMode::Embedded | CcifMode::ViaSubscriber => {
            // Modes 2 and 3: the supplier generates and embeds them.
            let mut rng = rand::rng();
            let mut kb = zeroize::Zeroizing::new([0u8; 16]);
            let mut ob = zeroize::Zeroizing::new([0u8; 16]);
            rng.fill_bytes(&mut kb[..]);
            rng.fill_bytes(&mut ob[..]);
            let (wk, wopc) = wrap_secrets(
                target,
                &init.storage_public,
                &K::new(*kb),
                &Opc::new(*ob),
                &mut rng,
            )
            .map_err(fail)?;
            (wk, wopc, Some((kb, ob)))
        }
    };
    dev.install_mcim(pb::InstallMcimRequest {
        imsi: pcid.into(),
        sho_id: ro_id.into(),
        wrapped_k,
        wrapped_opc,
        expires_at,
        ..Default::default()
    })
    .await?;
    dev.activate_mcim(pb::ActivateMcimRequest {
        mcim_id: pcid.into(),
    })
    .await?;
    let mut for_subscriber = None;
    match (mode, clear) {
        (CcifMode::Embedded, Some((k, opc))) => {
            // Mode 2: the supplier's CCIF hands them to the ICF afterwards.
            supplier
                .record_connectivity_credentials(sup::RecordConnectivityCredentialsRequest {
                    device_id: identity.device_id.clone(),
                    pcid: pcid.into(),
                    ro_id: ro_id.into(),
                    k: k.to_vec(),
                    opc: opc.to_vec(),
                    expires_at,
                })
                .await?;
        }
        (CcifMode::ViaSubscriber, Some((k, opc))) => {
            // Mode 3: they go to the subscriber, who registers them at the ICF.
            // With the supplier's voucher, so that the ICF knows them for this PCID's.
            let key = mcim_pki::dev::signing_key(pki, "supplier").map_err(fail)?;
            let cert = mcim_pki::dev::ca_der(pki, "supplier").map_err(fail)?;
            for_subscriber = Some(PcidCredentials {
                pcid: pcid.into(),
                expires_at: expires_at.map(|t| t.seconds),
                k: hex::encode(*k),
                opc: hex::encode(*opc),
                voucher: Some(crate::subscriber::VoucherFile {
                    signature: hex::encode(mcim_pki::voucher::sign(&key, pcid, &k[..], &opc[..])),
                    supplier_certificate: vec![hex::encode(cert)],
                }),
            });
        }
        _ => {}
    }
    Ok(Supplied {
        storage_public: init.storage_public,
        target,
        reference_pcrs,
        for_subscriber,
    })
}

/// `mcimctl supplier supply`.
#[derive(Args)]
pub struct SupplyArgs {
    /// tred's Unix socket on the device under supply.
    #[arg(long, env = "MCIM_SOCKET", default_value = "/run/mcim/tred.sock")]
    socket: PathBuf,
    /// The supplier's server (CertifyDevice, the CCIF), `https://host:port`.
    #[arg(long, env = "MCIM_SUPPLIER_URL", value_parser = crate::net::role_url)]
    supplier_url: String,
    /// The PVA, to register this model's reference values from this device (a golden unit).
    #[arg(long, env = "MCIM_PVA_URL", value_parser = crate::net::role_url)]
    pva_url: Option<String>,
    /// The PKI directory with the supplier's certificate (supplier.pem, supplier.key, ca.pem).
    #[arg(long, env = "MCIM_PKI")]
    pki: PathBuf,
    /// The supplier's device identifier (serial number).
    #[arg(long)]
    device_id: String,
    /// Provisional Connectivity ID, IMSI format.
    #[arg(long)]
    pcid: String,
    /// Equipment model (keys the PVA's reference values).
    #[arg(long)]
    model: String,
    /// How the PCID's initial credentials are configured (5.1.3.4.1).
    #[arg(long, value_enum, default_value = "2")]
    ccif_mode: CcifMode,
    /// The RO whose ICF authenticates the PCID.
    #[arg(long, default_value = "ro.mcim.local")]
    ro_id: String,
    /// The PCID credential's lifetime in seconds (5.1.3.7.4.3): the ICF refuses it afterwards
    /// and the device renews it before a change of SHO when it expires within a week. Unset:
    /// no limit.
    #[arg(long)]
    pcid_lifetime: Option<u64>,
    /// Mode 3: where the credentials for the subscriber go (JSON, created with mode 0600;
    /// `mcimctl subscriber register-pcid --credentials` reads it).
    #[arg(long)]
    credentials_out: Option<PathBuf>,
}

/// Runs `mcimctl supplier supply`.
pub fn run(a: SupplyArgs) -> Result<(), CliError> {
    if (a.ccif_mode == CcifMode::ViaSubscriber) != a.credentials_out.is_some() {
        return Err(fail(
            "--credentials-out is required with --ccif-mode 3, and only with it",
        ));
    }
    runtime()?.block_on(async {
        let identity = common::DeviceIdentity {
            device_id: a.device_id.clone(),
            pcid: a.pcid.clone(),
            model: a.model.clone(),
        };
        let mut dev = connect(&a.socket).await?;
        let mut supplier = SupplierServiceClient::new(
            crate::net::role_channel(&a.pki, Role::Supplier, Role::Supplier, &a.supplier_url)
                .await?,
        );
        let mut pva = match &a.pva_url {
            Some(url) => Some(PvaServiceClient::new(
                crate::net::role_channel(&a.pki, Role::Supplier, Role::Pva, url).await?,
            )),
            None => None,
        };
        let s = supply(
            &mut dev,
            &mut supplier,
            pva.as_mut(),
            &identity,
            CredentialTerms {
                mode: a.ccif_mode,
                ro_id: &a.ro_id,
                lifetime_secs: a.pcid_lifetime,
            },
            &a.pki,
        )
        .await?;
        println!("device {} (PCID {}) supplied", a.device_id, a.pcid);
        if a.pva_url.is_some() {
            println!(
                "reference values for model {} registered ({} PCRs)",
                a.model, s.reference_pcrs
            );
        }
        println!(
            "initial credential: CCIF mode {} ({})",
            a.ccif_mode as u8,
            a.ccif_mode.describe()
        );
        if let (Some(path), Some(c)) = (&a.credentials_out, &s.for_subscriber) {
            c.write_new(path)?;
            println!("credentials for the subscriber: {}", path.display());
        }
        Ok(())
    })
}
