//! `mcimctl subscriber ...`: the M2ME subscriber's side (5.1.3.5.2). The device owner exports
//! the device's parameters from `tred` (`mcimctl device parameters`, public material only);
//! the subscriber hands them to the SHO it contracts with (`mcimctl subscriber register`),
//! which reserves an IMSI and tells the RO's DRF which SHO the device's PCID belongs to. The
//! subscriber can then follow the SHO's side of the device's provisioning
//! (`mcimctl subscriber status`). In CCIF mode 3 (5.1.3.4.1) the subscriber also hands the
//! PCID's initial credentials to the RO's ICF (`register-pcid`, `activate-pcid`).

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use mcim_pki::Role;
use mcim_proto::mcim::ro::v1 as ro;
use mcim_proto::mcim::ro::v1::icf_service_client::IcfServiceClient;
use mcim_proto::mcim::sho::v1 as sho;
use mcim_proto::mcim::sho::v1::sho_service_client::ShoServiceClient;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use crate::error::{CliError, fail, runtime};
use crate::parameters::DeviceParameters;

/// How the subscriber reaches its SHO.
#[derive(Args, Clone)]
pub struct ShoAccess {
    /// The SHO, `https://host:port`.
    #[arg(long, env = "MCIM_SHO_URL", value_parser = crate::net::role_url)]
    sho_url: String,
    /// The PKI directory holding the subscriber's certificate (subscriber.pem, subscriber.key)
    /// and the roles' CA (ca.pem).
    #[arg(long, env = "MCIM_PKI")]
    pki: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// How the subscriber reaches the RO's ICF.
#[derive(Args, Clone)]
pub struct RoAccess {
    /// The RO, `https://host:port`.
    #[arg(long, env = "MCIM_RO_URL", value_parser = crate::net::role_url)]
    ro_url: String,
    /// The PKI directory (subscriber.pem, subscriber.key, ca.pem).
    #[arg(long, env = "MCIM_PKI")]
    pki: PathBuf,
}

/// A PCID's initial credentials as the supplier gives them to the subscriber (mode 3).
#[derive(Serialize, Deserialize, zeroize::ZeroizeOnDrop)]
#[serde(deny_unknown_fields)]
pub struct PcidCredentials {
    /// The PCID.
    #[zeroize(skip)]
    pub pcid: String,
    /// K, hex.
    pub k: String,
    /// OPc, hex.
    pub opc: String,
    /// The supplier's voucher for these credentials (mcim_pki::voucher): the ICF takes a
    /// subscriber's registration only with it.
    #[zeroize(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voucher: Option<VoucherFile>,
    /// When the credentials stop being valid (seconds since the epoch), if they have a
    /// lifetime.
    #[zeroize(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

/// The supplier's voucher in a credentials file, hex.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoucherFile {
    /// ECDSA P-256, DER.
    pub signature: String,
    /// The supplier's certificate chain, DER, leaf first.
    pub supplier_certificate: Vec<String>,
}

impl PcidCredentials {
    /// Writes a new credentials file, readable by its owner only; an existing file is left
    /// alone (refused).
    pub fn write_new(&self, path: &Path) -> Result<(), CliError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let text = zeroize::Zeroizing::new(serde_json::to_string(self).map_err(fail)?);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| fail(format!("{}: {e}", path.display())))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| fail(format!("{}: {e}", path.display())))
    }

    /// Reads and checks a credentials file (never echoes its secrets).
    pub fn read(path: &Path) -> Result<Self, CliError> {
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(path).map_err(|e| fail(format!("{}: {e}", path.display())))?,
        );
        let c: Self = serde_json::from_str(&text)
            .map_err(|_| fail(format!("{}: not a credentials file", path.display())))?;
        for (name, v) in [("k", &c.k), ("opc", &c.opc)] {
            if v.len() != 32 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(fail(format!(
                    "{}: {name} must be 16 octets in hex",
                    path.display()
                )));
            }
        }
        Ok(c)
    }
}

/// A client of the RO's ICF with the subscriber's certificate.
pub async fn icf_client(pki: &Path, ro_url: &str) -> Result<IcfServiceClient<Channel>, CliError> {
    let ch = crate::net::role_channel(pki, Role::Subscriber, Role::Ro, ro_url).await?;
    Ok(IcfServiceClient::new(ch))
}

/// CCIF mode 3: registers `c` at the ICF.
pub async fn register_pcid(
    icf: &mut IcfServiceClient<Channel>,
    c: &PcidCredentials,
    delayed_activation: bool,
) -> Result<(), CliError> {
    let k = zeroize::Zeroizing::new(hex::decode(&c.k).map_err(fail)?);
    let opc = zeroize::Zeroizing::new(hex::decode(&c.opc).map_err(fail)?);
    icf.register_initial_credentials(ro::RegisterInitialCredentialsRequest {
        pcid: c.pcid.clone(),
        k: k.to_vec(),
        opc: opc.to_vec(),
        mode: ro::CredentialMode::ViaSubscriber as i32,
        expires_at: c
            .expires_at
            .map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
        delayed_activation,
        supplier_voucher: c
            .voucher
            .as_ref()
            .map(|v| {
                Ok::<_, CliError>(ro::SupplierVoucher {
                    signature: hex::decode(&v.signature).map_err(fail)?,
                    supplier_certificate: v
                        .supplier_certificate
                        .iter()
                        .map(|c| hex::decode(c).map_err(fail))
                        .collect::<Result<_, _>>()?,
                })
            })
            .transpose()?,
    })
    .await?;
    Ok(())
}

/// Annex x.1: makes a PCID registered with delayed activation usable.
pub async fn activate_pcid(
    icf: &mut IcfServiceClient<Channel>,
    pcid: &str,
) -> Result<(), CliError> {
    icf.activate_pcid(ro::ActivatePcidRequest { pcid: pcid.into() })
        .await?;
    Ok(())
}

/// `mcimctl subscriber ...`
#[derive(Subcommand)]
pub enum SubscriberCommand {
    /// Contract with an SHO for a device (5.1.3.5.2): hands over the device's parameters
    /// (`mcimctl device parameters`); the SHO reserves an IMSI and tells the RO.
    Register {
        /// The device's parameters (JSON from `mcimctl device parameters`).
        #[arg(long)]
        device: PathBuf,
        /// The subscriber's name at the SHO. The SHO knows the subscriber by its certificate;
        /// a name other than the certificate's is refused. Default: the certificate's.
        #[arg(long)]
        account: Option<String>,
        /// Ask the SHO to refuse the device unless AKA runs inside its TRE.
        #[arg(long)]
        require_aka_in_tre: bool,
        #[command(flatten)]
        sho: ShoAccess,
    },
    /// CCIF mode 3 (5.1.3.4.1): hand the initial connectivity credentials the supplier
    /// embedded in the device (and gave the subscriber) to the RO's ICF.
    RegisterPcid {
        /// A JSON file {"pcid": ..., "k": hex, "opc": hex} (a file, not arguments: command
        /// lines are visible to every user of the machine).
        #[arg(long)]
        credentials: PathBuf,
        /// Keep them unusable until `activate-pcid` (annex x.1, delayed activation).
        #[arg(long)]
        delayed_activation: bool,
        #[command(flatten)]
        ro: RoAccess,
    },
    /// Make a PCID registered with delayed activation usable (annex x.1).
    ActivatePcid {
        /// The PCID.
        pcid: String,
        #[command(flatten)]
        ro: RoAccess,
    },
    /// The SHO's view of a device registration (5.1.3.6.2 steps 7-14): by the subscription
    /// `register` printed (its latest registration), or by a registration id.
    Status {
        /// The registration id (the device reports it from step 7); or --subscription.
        #[arg(
            required_unless_present = "subscription",
            conflicts_with = "subscription",
            value_parser = clap::builder::NonEmptyStringValueParser::new()
        )]
        registration: Option<String>,
        /// The subscription id `register` printed, instead of a registration id.
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        subscription: Option<String>,
        #[command(flatten)]
        sho: ShoAccess,
    },
}

/// A client of the SHO with the subscriber's certificate.
pub async fn sho_client(pki: &Path, sho_url: &str) -> Result<ShoServiceClient<Channel>, CliError> {
    let ch = crate::net::role_channel(pki, Role::Subscriber, Role::Sho, sho_url).await?;
    Ok(ShoServiceClient::new(ch))
}

/// Contracts for `device` as the subscriber of the channel's certificate (`account`: empty, or
/// that certificate's name); returns the SHO's answer.
pub async fn register(
    sho: &mut ShoServiceClient<Channel>,
    device: &DeviceParameters,
    account: &str,
    require_aka_in_tre: bool,
) -> Result<sho::CreateSubscriptionResponse, CliError> {
    Ok(sho
        .create_subscription(device.subscription(account, require_aka_in_tre)?)
        .await?
        .into_inner())
}

/// A registration state's name ("validating", "provisioned", ...).
pub fn registration_state(s: i32) -> String {
    sho::RegistrationState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("REGISTRATION_STATE_")
                .to_lowercase()
        })
        .unwrap_or_default()
}

/// Runs `mcimctl subscriber ...`.
pub fn run(cmd: SubscriberCommand) -> Result<(), CliError> {
    runtime()?.block_on(async {
        match cmd {
            SubscriberCommand::Register {
                device,
                account,
                require_aka_in_tre,
                sho,
            } => {
                let params = DeviceParameters::read(&device)?;
                // Refuse a malformed file before any connection.
                let account = account.unwrap_or_default();
                params.subscription(&account, require_aka_in_tre)?;
                let mut c = sho_client(&sho.pki, &sho.sho_url).await?;
                let r = register(&mut c, &params, &account, require_aka_in_tre).await?;
                if sho.json {
                    println!(
                        "{}",
                        serde_json::json!({"subscription_id": r.subscription_id, "imsi": r.imsi, "pcid": params.pcid})
                    );
                } else {
                    println!("subscription  {}", r.subscription_id);
                    println!("imsi          {}", r.imsi);
                    println!("pcid          {}", params.pcid);
                    println!(
                        "follow it:    mcimctl subscriber status --subscription {} --sho-url {} --pki {}",
                        r.subscription_id,
                        sho.sho_url,
                        sho.pki.display()
                    );
                }
            }
            SubscriberCommand::RegisterPcid {
                credentials,
                delayed_activation,
                ro,
            } => {
                let c = PcidCredentials::read(&credentials)?;
                let mut icf = icf_client(&ro.pki, &ro.ro_url).await?;
                register_pcid(&mut icf, &c, delayed_activation).await?;
                println!(
                    "PCID {} registered at the RO's ICF{}",
                    c.pcid,
                    if delayed_activation {
                        " (not usable until activate-pcid)"
                    } else {
                        ""
                    }
                );
            }
            SubscriberCommand::ActivatePcid { pcid, ro } => {
                let mut icf = icf_client(&ro.pki, &ro.ro_url).await?;
                activate_pcid(&mut icf, &pcid).await?;
                println!("PCID {pcid} activated");
            }
            SubscriberCommand::Status {
                registration,
                subscription,
                sho,
            } => {
                let mut c = sho_client(&sho.pki, &sho.sho_url).await?;
                let r = c
                    .get_registration(sho::GetRegistrationRequest {
                        registration_id: registration.unwrap_or_default(),
                        subscription_id: subscription.unwrap_or_default(),
                    })
                    .await?
                    .into_inner();
                let state = registration_state(r.state);
                let registration = &r.registration_id;
                if sho.json {
                    println!(
                        "{}",
                        serde_json::json!({"registration": registration, "state": state, "detail": r.detail, "imsi": r.imsi})
                    );
                } else {
                    println!("registration  {registration}");
                    println!("state         {state}");
                    if !r.detail.is_empty() {
                        println!("detail        {}", r.detail);
                    }
                }
            }
        }
        Ok(())
    })
}
