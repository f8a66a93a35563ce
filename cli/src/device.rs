//! `mcimctl device ...` and `mcimctl audit ...`: the device owner's side, talking to `tred`
//! over its Unix socket (`mcim.tre.v1`).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::tre::v1 as pb;

use crate::error::{CliError, read, runtime, write};
use crate::hexarg;
use crate::parameters::DeviceParameters;
use crate::tred::{connect, step_line};

/// The client of tred's local API.
type Tred =
    mcim_proto::mcim::tre::v1::tre_service_client::TreServiceClient<tonic::transport::Channel>;

/// Where `tred` listens.
#[derive(Args, Clone)]
pub struct Socket {
    /// tred's Unix socket.
    #[arg(
        long,
        env = "MCIM_SOCKET",
        default_value = "/run/mcim/tred.sock",
        global = true
    )]
    socket: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

/// `mcimctl device ...`
#[derive(Args)]
pub struct DeviceArgs {
    #[command(flatten)]
    socket: Socket,
    #[command(subcommand)]
    command: DeviceCommand,
}

/// The device commands.
#[derive(Subcommand)]
pub enum DeviceCommand {
    /// Supply-time initialisation: TRE keys and identity (idempotent, never re-keys).
    Init {
        /// The supplier's device identifier (serial number).
        #[arg(long)]
        device_id: String,
        /// Provisional Connectivity ID, IMSI format.
        #[arg(long)]
        pcid: String,
        /// Equipment model.
        #[arg(long)]
        model: String,
        /// Also write storage.pub, ak.pub (TPM2B_PUBLIC) and tls.spki.der here.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// TRE kind, capabilities, identity, lockdown.
    Status,
    /// The device's parameters for its subscriber (5.1.3.5.2), JSON: identity, TRE kind,
    /// storage public key, platform credential (`mcimctl subscriber register --device`).
    Parameters {
        /// Write them to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Include the device's proof of ownership (annex x.2.3) for this subscriber (its
        /// certificate's name at the SHO); an SHO contracts no device without one.
        #[arg(long, requires = "sho_id")]
        for_subscriber: Option<String>,
        /// ... at this SHO (its certificate's name).
        #[arg(long, requires = "for_subscriber")]
        sho_id: Option<String>,
    },
    /// The MCIM registry.
    List,
    /// One MCIM.
    Get {
        /// MCIM id (its IMSI).
        id: String,
    },
    /// Install an MCIM from wrapped secrets (`mcimctl sho wrap` makes them).
    Install(InstallArgs),
    /// Installed -> Activated.
    Activate {
        /// MCIM id.
        id: String,
    },
    /// Activated -> Selected (a session).
    Select {
        /// MCIM id.
        id: String,
        /// Its PIN, if it has one.
        #[arg(long)]
        pin: Option<String>,
    },
    /// Selected -> Activated.
    EndSession {
        /// MCIM id.
        id: String,
    },
    /// Activated -> Blocked.
    Block {
        /// MCIM id.
        id: String,
    },
    /// Blocked -> Activated (owner blocks; a PIN block needs `pin unblock`).
    Unblock {
        /// MCIM id.
        id: String,
    },
    /// -> Retired: the credentials go.
    Retire {
        /// MCIM id.
        id: String,
    },
    /// -> Deleted.
    Delete {
        /// MCIM id.
        id: String,
    },
    /// Choose the MCIM used for connectivity.
    Connectivity {
        /// MCIM id.
        id: String,
    },
    /// Run AKA with a selected MCIM inside the TRE.
    Aka {
        /// MCIM id.
        id: String,
        /// RAND, 32 hex digits.
        #[arg(long, value_parser = hexarg::parse::<16>)]
        rand: [u8; 16],
        /// AUTN, 32 hex digits.
        #[arg(long, value_parser = hexarg::parse::<16>)]
        autn: [u8; 16],
    },
    /// PIN operations.
    #[command(subcommand)]
    Pin(PinCommand),
    /// Initial provisioning (5.1.3.6.2 over 3GPP access, 5.1.3.6.3 otherwise): starts tred's
    /// run (or follows the one in progress) and prints each step as the device sees it.
    /// Exits non-zero naming the failed step.
    Provision {
        /// The access network.
        #[arg(long, value_parser = ["3gpp", "non-3gpp"], default_value = "3gpp")]
        access: String,
    },
    /// Change of SHO (5.1.3.7.4.2 step 2): the owner instructs the device to re-provision from
    /// the SHO where the subscriber contracted (`mcimctl subscriber register` there first),
    /// over the connectivity of the MCIM in use, which is discarded before the new one is
    /// installed (the old SHO gets a signed notice it acknowledges). Prints each step (1-14);
    /// exits non-zero naming the failed step.
    Reprovision {
        /// The new SHO's identity (e.g. sho2.mcim.local).
        #[arg(long)]
        sho_id: String,
        /// The access network.
        #[arg(long, value_parser = ["3gpp", "non-3gpp"], default_value = "3gpp")]
        access: String,
        /// Revert to the pristine state first (5.1.3.7.4.3): discard the MCIM in use, then
        /// provision through 5.1.3.6 with the PCID (steps 1-3, then 4-17).
        #[arg(long)]
        pristine: bool,
        /// Keep the MCIM in use beside the new one (end of 5.1.3.7.4.2): nothing is
        /// discarded; choose the connectivity MCIM afterwards (`mcimctl device connectivity`).
        #[arg(long, conflicts_with = "pristine")]
        keep_old: bool,
    },
    /// Operational attach with an installed MCIM (5.1.3.3.2.2): AKA in the TRE against the
    /// SHO's vectors through the VNO.
    Attach {
        /// MCIM id (default: the one chosen for connectivity).
        id: Option<String>,
    },
    /// TRE objects no MCIM refers to (a token's K and OPc an earlier tred or an interrupted
    /// import left): listed; destroyed with --destroy (an audit entry names them).
    Orphans {
        /// Destroy them (C_DestroyObject).
        #[arg(long)]
        destroy: bool,
    },
    /// Leave lockdown with the supplier's rehabilitation token (`mcimctl supplier rehab-token`).
    Rehabilitate {
        /// The token file.
        #[arg(long)]
        token: PathBuf,
    },
    /// A TPM quote over a nonce (write it out with --out-dir for `mcimctl pva verify-quote`).
    Attest {
        /// Nonce, 16 to 64 octets in hex.
        #[arg(long, value_parser = crate::hexarg::nonce)]
        nonce: crate::hexarg::Bytes,
        /// PCRs, 0 to 23 (default: tred's configured set).
        #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(0..=23))]
        pcrs: Vec<u32>,
        /// Write quote.attest, quote.sig, pcrs.bin, pcrs.list (for `mcimctl pva verify-quote`)
        /// and pcrs.out (tpm2-tools' PCR file, for `tpm2_checkquote -f`) here.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

/// `mcimctl device install ...`
#[derive(Args)]
pub struct InstallArgs {
    /// Operational IMSI.
    #[arg(long)]
    imsi: String,
    /// The issuing SHO.
    #[arg(long)]
    sho: String,
    /// Wrapped K.
    #[arg(long)]
    k_blob: PathBuf,
    /// Wrapped OPc.
    #[arg(long)]
    opc_blob: PathBuf,
    /// Application PIN (4-8 digits).
    #[arg(long, requires = "puk")]
    pin: Option<String>,
    /// PUK (8 digits).
    #[arg(long, requires = "pin")]
    puk: Option<String>,
}

/// `mcimctl device pin ...`
#[derive(Subcommand)]
pub enum PinCommand {
    /// Check the PIN (a wrong one counts).
    Verify {
        /// MCIM id.
        id: String,
        /// The PIN.
        #[arg(long)]
        pin: String,
    },
    /// Change the PIN.
    Change {
        /// MCIM id.
        id: String,
        /// Current PIN.
        #[arg(long)]
        old: String,
        /// New PIN.
        #[arg(long)]
        new: String,
    },
    /// Unblock with the PUK and set a new PIN.
    Unblock {
        /// MCIM id.
        id: String,
        /// The PUK.
        #[arg(long)]
        puk: String,
        /// New PIN.
        #[arg(long)]
        new: String,
    },
    /// Give an MCIM without a PIN (one provisioned over the air) a PIN and a PUK; on a TPM
    /// the TPM itself then checks them.
    Enable {
        /// MCIM id.
        id: String,
        /// The PIN (4 to 8 digits).
        #[arg(long)]
        pin: String,
        /// The PUK (8 digits).
        #[arg(long)]
        puk: String,
    },
}

/// `mcimctl audit ...`
#[derive(Args)]
pub struct AuditArgs {
    #[command(flatten)]
    socket: Socket,
    #[command(subcommand)]
    command: AuditCommand,
}

/// The audit commands.
#[derive(Subcommand)]
pub enum AuditCommand {
    /// Print the audit record.
    Show,
    /// Check the chain and its anchor in the TRE; exit 1 when it does not verify.
    Verify,
}

fn state_name(s: i32) -> &'static str {
    match common::McimState::try_from(s) {
        Ok(common::McimState::Installed) => "installed",
        Ok(common::McimState::Activated) => "activated",
        Ok(common::McimState::Selected) => "selected",
        Ok(common::McimState::Blocked) => "blocked",
        Ok(common::McimState::Retired) => "retired",
        Ok(common::McimState::Deleted) => "deleted",
        _ => "unspecified",
    }
}

fn mcim_json(m: &pb::Mcim) -> serde_json::Value {
    serde_json::json!({
        "id": m.mcim_id,
        "imsi": m.imsi,
        "sho": m.sho_id,
        "state": state_name(m.state),
        "blocked_reason": m.blocked_reason,
        "pin_retries_left": m.pin_retries_left,
        "connectivity": m.connectivity,
    })
}

fn print_mcim(json: bool, m: Option<&pb::Mcim>) {
    let Some(m) = m else { return };
    if json {
        println!("{}", mcim_json(m));
    } else {
        let mut line = format!("{}  {}  sho={}", m.mcim_id, state_name(m.state), m.sho_id);
        if !m.blocked_reason.is_empty() {
            line.push_str(&format!(" ({})", m.blocked_reason));
        }
        if m.pin_retries_left > 0 {
            line.push_str(&format!("  pin_tries={}", m.pin_retries_left));
        }
        if m.connectivity {
            line.push_str("  [connectivity]");
        }
        println!("{line}");
    }
}

/// Runs `mcimctl device ...`.
pub fn run(a: DeviceArgs) -> Result<(), CliError> {
    runtime()?.block_on(device(a))
}

async fn device(a: DeviceArgs) -> Result<(), CliError> {
    let json = a.socket.json;
    let mut c = connect(&a.socket.socket).await?;
    use DeviceCommand as D;
    match a.command {
        D::Init {
            device_id,
            pcid,
            model,
            out_dir,
        } => init(&mut c, json, device_id, pcid, model, out_dir).await,
        D::Parameters {
            out,
            for_subscriber,
            sho_id,
        } => parameters(&mut c, out, for_subscriber, sho_id).await,
        D::Provision { access } => provision(&mut c, json, access).await,
        D::Reprovision {
            sho_id,
            access,
            pristine,
            keep_old,
        } => reprovision(&mut c, json, sho_id, access, pristine, keep_old).await,
        D::Attach { id } => attach(&mut c, json, id).await,
        D::Status => status(&mut c, json).await,
        D::List => list(&mut c, json).await,
        D::Get { id } => get(&mut c, json, id).await,
        D::Install(a) => install(&mut c, json, a).await,
        D::Activate { id } => activate(&mut c, json, id).await,
        D::Select { id, pin } => select(&mut c, json, id, pin).await,
        D::EndSession { id } => end_session(&mut c, json, id).await,
        D::Block { id } => block(&mut c, json, id).await,
        D::Unblock { id } => unblock(&mut c, json, id).await,
        D::Retire { id } => retire(&mut c, json, id).await,
        D::Delete { id } => delete(&mut c, json, id).await,
        D::Connectivity { id } => connectivity(&mut c, json, id).await,
        D::Aka { id, rand, autn } => aka(&mut c, json, id, rand, autn).await,
        D::Pin(p) => pin(&mut c, json, p).await,
        D::Rehabilitate { token } => rehabilitate(&mut c, token).await,
        D::Orphans { destroy } => orphans(&mut c, json, destroy).await,
        D::Attest {
            nonce,
            pcrs,
            out_dir,
        } => attest(&mut c, json, nonce, pcrs, out_dir).await,
    }
}

/// `mcimctl device init`.
async fn init(
    c: &mut Tred,
    json: bool,
    device_id: String,
    pcid: String,
    model: String,
    out_dir: Option<PathBuf>,
) -> Result<(), CliError> {
    let r = c
        .init_device(pb::InitDeviceRequest {
            identity: Some(common::DeviceIdentity {
                device_id,
                pcid,
                model,
            }),
        })
        .await?
        .into_inner();
    if let Some(dir) = out_dir {
        std::fs::create_dir_all(&dir).map_err(|e| CliError::File {
            path: dir.display().to_string(),
            detail: e.to_string(),
        })?;
        write(&dir.join("storage.pub"), &r.storage_public)?;
        write(&dir.join("ak.pub"), &r.attestation_public)?;
        write(&dir.join("tls.spki.der"), &r.tls_public_spki)?;
    }
    let v = serde_json::json!({
        "created": r.created,
        "storage_public": hex::encode(&r.storage_public),
        "attestation_public": hex::encode(&r.attestation_public),
        "tls_public_spki": hex::encode(&r.tls_public_spki),
    });
    if json {
        println!("{v}");
    } else {
        println!(
            "{}",
            if r.created {
                "initialised"
            } else {
                "already initialised (nothing changed)"
            }
        );
        println!("storage_public      {}", hex::encode(&r.storage_public));
        println!("attestation_public  {}", hex::encode(&r.attestation_public));
        println!("tls_public_spki     {}", hex::encode(&r.tls_public_spki));
    }
    Ok(())
}

/// `mcimctl device parameters`.
async fn parameters(
    c: &mut Tred,
    out: Option<PathBuf>,
    for_subscriber: Option<String>,
    sho_id: Option<String>,
) -> Result<(), CliError> {
    let r = c
        .get_device_parameters(pb::GetDeviceParametersRequest {})
        .await?
        .into_inner();
    let mut p = DeviceParameters::from_pb(r);
    if let (Some(subscriber), Some(sho_id)) = (for_subscriber, sho_id) {
        p.ownership_proof = c
            .prove_ownership(pb::ProveOwnershipRequest { subscriber, sho_id })
            .await?
            .into_inner()
            .proof
            .map(crate::parameters::ProofFile::from_pb);
    }
    let text = serde_json::to_string_pretty(&p).map_err(|e| CliError::Input(e.to_string()))?;
    match out {
        Some(path) => std::fs::write(&path, text + "\n")
            .map_err(|e| CliError::Input(format!("{}: {e}", path.display())))?,
        None => println!("{text}"),
    }
    Ok(())
}

/// `mcimctl device provision`.
async fn provision(c: &mut Tred, json: bool, access: String) -> Result<(), CliError> {
    let id = c
        .start_provisioning(pb::StartProvisioningRequest {
            access: access_type(&access) as i32,
        })
        .await?
        .into_inner()
        .provisioning_id;
    follow(c, json, id).await
}

fn access_type(access: &str) -> common::AccessType {
    if access == "3gpp" {
        common::AccessType::AccessType3gpp
    } else {
        common::AccessType::Non3gpp
    }
}

/// `mcimctl device reprovision`.
async fn reprovision(
    c: &mut Tred,
    json: bool,
    sho_id: String,
    access: String,
    pristine: bool,
    keep_old: bool,
) -> Result<(), CliError> {
    let id = c
        .reprovision(pb::ReprovisionRequest {
            new_sho_id: sho_id,
            access: access_type(&access) as i32,
            revert_to_pristine: pristine,
            keep_old,
            ..Default::default()
        })
        .await?
        .into_inner()
        .provisioning_id;
    follow(c, json, id).await
}

/// Prints the steps of the run `id` until it ends.
async fn follow(c: &mut Tred, json: bool, id: String) -> Result<(), CliError> {
    let mut steps = c
        .watch_provisioning(pb::WatchProvisioningRequest {
            provisioning_id: id,
        })
        .await?
        .into_inner();
    let mut failed = None;
    let (mut registration, mut mcim) = (String::new(), String::new());
    while let Some(s) = steps.message().await? {
        if json {
            println!(
                "{}",
                serde_json::json!({"step": s.step, "name": s.name, "ok": s.ok, "detail": s.detail})
            );
        } else {
            println!("{}", step_line(&s));
        }
        if !s.registration_id.is_empty() {
            registration = s.registration_id.clone();
        }
        if !s.mcim_id.is_empty() {
            mcim = s.mcim_id.clone();
        }
        if !s.ok {
            failed = Some(format!("step {} ({}) failed: {}", s.step, s.name, s.detail));
        }
    }
    if let Some(f) = failed {
        return Err(CliError::Input(f));
    }
    if !json {
        println!("registration  {registration}");
        println!("mcim          {mcim}");
    }
    Ok(())
}

/// `mcimctl device attach`.
async fn attach(c: &mut Tred, json: bool, id: Option<String>) -> Result<(), CliError> {
    let g = c
        .network_attach(pb::NetworkAttachRequest {
            mcim_id: id.unwrap_or_default(),
        })
        .await?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::json!({"imsi": g.imsi, "grant": g.grant_id, "expires_at": g.expires_at.map(|t| t.seconds)})
        );
    } else {
        println!("attached with IMSI {} (grant {})", g.imsi, g.grant_id);
    }
    Ok(())
}

/// `mcimctl device status`.
async fn status(c: &mut Tred, json: bool) -> Result<(), CliError> {
    let s = c.get_status(pb::GetStatusRequest {}).await?.into_inner();
    let caps = s.capabilities.unwrap_or_default();
    let aka = match common::AkaExecution::try_from(caps.aka_execution) {
        Ok(common::AkaExecution::InTre) => "in_tre",
        Ok(common::AkaExecution::UnsealedInHost) => "unsealed_in_host",
        _ => "unspecified",
    };
    let id = s.identity.unwrap_or_default();
    let v = serde_json::json!({
        "tre": match common::TreKind::try_from(s.tre_kind) { Ok(common::TreKind::Tpm2) => "tpm2", Ok(common::TreKind::Pkcs11) => "pkcs11", _ => "unspecified" },
        "aka_execution": aka,
        "quote": caps.quote,
        "initialised": !id.pcid.is_empty(),
        "device_id": id.device_id,
        "pcid": id.pcid,
        "model": id.model,
        "lockdown": s.lockdown,
        "lockdown_reason": s.lockdown_reason,
        "connectivity": s.connectivity_mcim_id,
        "rehabilitation_counter": s.rehabilitation_counter,
        "startup_findings": s.startup_findings,
        // 5.1.3.7.4.2 step 9: the notices to old SHOs, until acknowledged and after.
        "discard_notices": s.discard_notices.iter().map(|n| serde_json::json!({
            "imsi": n.imsi,
            "sho": n.sho_id,
            "acknowledged": n.acknowledged,
            "acknowledged_at": n.acknowledged_at,
            "failed_attempts": n.failed_attempts,
        })).collect::<Vec<_>>(),
    });
    if json {
        println!("{v}");
    } else if let Some(o) = v.as_object() {
        // The longest key is 22 characters: every value is set off by a space at least.
        for (k, val) in o {
            println!(
                "{k:<23} {}",
                val.as_str().map_or_else(|| val.to_string(), str::to_string)
            );
        }
    }
    Ok(())
}

/// `mcimctl device list`.
async fn list(c: &mut Tred, json: bool) -> Result<(), CliError> {
    let r = c.list_mcims(pb::ListMcimsRequest {}).await?.into_inner();
    if json {
        println!(
            "{}",
            serde_json::Value::Array(r.mcims.iter().map(mcim_json).collect())
        );
    } else {
        for m in &r.mcims {
            print_mcim(false, Some(m));
        }
    }
    Ok(())
}

/// `mcimctl device get`.
async fn get(c: &mut Tred, json: bool, id: String) -> Result<(), CliError> {
    let r = c
        .get_mcim(pb::GetMcimRequest { mcim_id: id })
        .await?
        .into_inner();
    print_mcim(json, r.mcim.as_ref());
    Ok(())
}

/// `mcimctl device install`.
async fn install(c: &mut Tred, json: bool, a: InstallArgs) -> Result<(), CliError> {
    let r = c
        .install_mcim(pb::InstallMcimRequest {
            imsi: a.imsi,
            sho_id: a.sho,
            wrapped_k: read(&a.k_blob)?,
            wrapped_opc: read(&a.opc_blob)?,
            milenage_c: Vec::new(),
            milenage_r: Vec::new(),
            pin: a.pin.unwrap_or_default(),
            puk: a.puk.unwrap_or_default(),
            expires_at: None,
        })
        .await?
        .into_inner();
    print_mcim(json, r.mcim.as_ref());
    Ok(())
}

/// `mcimctl device activate`.
async fn activate(c: &mut Tred, json: bool, id: String) -> Result<(), CliError> {
    let r = c
        .activate_mcim(pb::ActivateMcimRequest { mcim_id: id })
        .await?;
    print_mcim(json, r.get_ref().mcim.as_ref());
    Ok(())
}

/// `mcimctl device select`.
async fn select(c: &mut Tred, json: bool, id: String, pin: Option<String>) -> Result<(), CliError> {
    let r = c
        .select_mcim(pb::SelectMcimRequest {
            mcim_id: id,
            pin: pin.unwrap_or_default(),
        })
        .await?;
    print_mcim(json, r.get_ref().mcim.as_ref());
    Ok(())
}

/// `mcimctl device end-session`.
async fn end_session(c: &mut Tred, json: bool, id: String) -> Result<(), CliError> {
    let r = c
        .end_mcim_session(pb::EndMcimSessionRequest { mcim_id: id })
        .await?;
    print_mcim(json, r.get_ref().mcim.as_ref());
    Ok(())
}

/// `mcimctl device block`.
async fn block(c: &mut Tred, json: bool, id: String) -> Result<(), CliError> {
    let r = c
        .block_mcim(pb::BlockMcimRequest {
            mcim_id: id,
            reason: "owner".into(),
        })
        .await?;
    print_mcim(json, r.get_ref().mcim.as_ref());
    Ok(())
}

/// `mcimctl device unblock`.
async fn unblock(c: &mut Tred, json: bool, id: String) -> Result<(), CliError> {
    let r = c
        .unblock_mcim(pb::UnblockMcimRequest { mcim_id: id })
        .await?;
    print_mcim(json, r.get_ref().mcim.as_ref());
    Ok(())
}

/// `mcimctl device retire`.
async fn retire(c: &mut Tred, json: bool, id: String) -> Result<(), CliError> {
    let r = c.retire_mcim(pb::RetireMcimRequest { mcim_id: id }).await?;
    print_mcim(json, r.get_ref().mcim.as_ref());
    Ok(())
}

/// `mcimctl device delete`.
async fn delete(c: &mut Tred, json: bool, id: String) -> Result<(), CliError> {
    c.delete_mcim(pb::DeleteMcimRequest {
        mcim_id: id.clone(),
    })
    .await?;
    if json {
        println!("{}", serde_json::json!({ "id": id, "state": "deleted" }));
    } else {
        println!("{id}  deleted");
    }
    Ok(())
}

/// `mcimctl device connectivity`.
async fn connectivity(c: &mut Tred, json: bool, id: String) -> Result<(), CliError> {
    let r = c
        .set_connectivity_mcim(pb::SetConnectivityMcimRequest { mcim_id: id })
        .await?;
    print_mcim(json, r.get_ref().mcim.as_ref());
    Ok(())
}

/// `mcimctl device aka`.
async fn aka(
    c: &mut Tred,
    json: bool,
    id: String,
    rand: [u8; 16],
    autn: [u8; 16],
) -> Result<(), CliError> {
    let r = c
        .authenticate(pb::AuthenticateRequest {
            credential: Some(pb::authenticate_request::Credential::McimId(id)),
            challenge: Some(common::AuthChallenge {
                rand: rand.to_vec(),
                autn: autn.to_vec(),
            }),
        })
        .await?
        .into_inner();
    let v = match r.result {
        Some(pb::authenticate_response::Result::Success(s)) => serde_json::json!({
            "result": "success",
            "res": hex::encode(s.res),
            "ck": hex::encode(s.ck),
            "ik": hex::encode(s.ik),
        }),
        Some(pb::authenticate_response::Result::Auts(a)) => serde_json::json!({
            "result": "sync_failure",
            "auts": hex::encode(a),
        }),
        None => return Err(CliError::Input("tred gave no result".into())),
    };
    if json {
        println!("{v}");
    } else if let Some(o) = v.as_object() {
        for (k, val) in o {
            println!("{k:<7}{}", val.as_str().unwrap_or_default());
        }
    }
    Ok(())
}

/// `mcimctl device pin`.
async fn pin(c: &mut Tred, json: bool, p: PinCommand) -> Result<(), CliError> {
    match p {
        PinCommand::Verify { id, pin } => {
            let r = c
                .verify_pin(pb::VerifyPinRequest { mcim_id: id, pin })
                .await?
                .into_inner();
            println!("PIN verified ({} tries)", r.retries_left);
        }
        PinCommand::Change { id, old, new } => {
            c.change_pin(pb::ChangePinRequest {
                mcim_id: id,
                old_pin: old,
                new_pin: new,
            })
            .await?;
            println!("PIN changed");
        }
        PinCommand::Unblock { id, puk, new } => {
            let r = c
                .unblock_pin(pb::UnblockPinRequest {
                    mcim_id: id,
                    puk,
                    new_pin: new,
                })
                .await?;
            print_mcim(json, r.get_ref().mcim.as_ref());
        }
        PinCommand::Enable { id, pin, puk } => {
            let r = c
                .enable_pin(pb::EnablePinRequest {
                    mcim_id: id,
                    pin,
                    puk,
                })
                .await?;
            print_mcim(json, r.get_ref().mcim.as_ref());
        }
    }
    Ok(())
}

/// `mcimctl device orphans`.
async fn orphans(c: &mut Tred, json: bool, destroy: bool) -> Result<(), CliError> {
    let r = c
        .destroy_orphans(pb::DestroyOrphansRequest { dry_run: !destroy })
        .await?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::json!({"orphans": r.refs, "destroyed": r.destroyed})
        );
    } else if r.refs.is_empty() {
        println!("no orphans: every TRE object belongs to an MCIM");
    } else {
        let verb = if r.destroyed { "destroyed" } else { "orphan" };
        for id in &r.refs {
            println!("{verb} {id}");
        }
    }
    Ok(())
}

/// `mcimctl device rehabilitate`.
async fn rehabilitate(c: &mut Tred, token: PathBuf) -> Result<(), CliError> {
    let r = c
        .rehabilitate(pb::RehabilitateRequest {
            token: read(&token)?,
        })
        .await?
        .into_inner();
    println!(
        "{}",
        if r.lockdown {
            "still in lockdown"
        } else {
            "out of lockdown"
        }
    );
    Ok(())
}

/// `mcimctl device attest`.
async fn attest(
    c: &mut Tred,
    json: bool,
    nonce: crate::hexarg::Bytes,
    pcrs: Vec<u32>,
    out_dir: Option<PathBuf>,
) -> Result<(), CliError> {
    let nonce = nonce.0;
    let r = c
        .attest(pb::AttestRequest { nonce, pcrs })
        .await?
        .into_inner();
    let q = match r.evidence.and_then(|e| e.kind) {
        Some(common::evidence::Kind::TpmQuote(q)) => q,
        Some(common::evidence::Kind::Pkcs11Signature(sig)) => {
            // A token: signed evidence, no quote (mcim_core::token_evidence).
            if let Some(dir) = out_dir {
                std::fs::create_dir_all(&dir).map_err(|e| CliError::File {
                    path: dir.display().to_string(),
                    detail: e.to_string(),
                })?;
                write(&dir.join("token.payload"), &sig.payload)?;
                write(&dir.join("token.sig"), &sig.signature)?;
            }
            let v = serde_json::json!({
                "kind": "pkcs11-signature",
                "payload": String::from_utf8_lossy(&sig.payload),
                "signature": hex::encode(&sig.signature),
            });
            if json {
                println!("{v}");
            } else {
                println!(
                    "pkcs11-signature evidence: {}",
                    String::from_utf8_lossy(&sig.payload)
                );
            }
            return Ok(());
        }
        None => return Err(CliError::Input("tred returned no evidence".into())),
    };
    if let Some(dir) = out_dir {
        std::fs::create_dir_all(&dir).map_err(|e| CliError::File {
            path: dir.display().to_string(),
            detail: e.to_string(),
        })?;
        write(&dir.join("quote.attest"), &q.attest)?;
        write(&dir.join("quote.sig"), &q.signature)?;
        let values: Vec<u8> = q.pcrs.iter().flat_map(|p| p.digest.clone()).collect();
        write(&dir.join("pcrs.bin"), &values)?;
        let list: Vec<String> = q.pcrs.iter().map(|p| p.index.to_string()).collect();
        write(&dir.join("pcrs.list"), list.join(",").as_bytes())?;
        let indices: Vec<u8> = q
            .pcrs
            .iter()
            .filter_map(|p| u8::try_from(p.index).ok())
            .collect();
        let sel = mcim_core::tpm::policy::PcrSelection::sha256(&indices)
            .map_err(|e| CliError::Input(format!("tred's quote: {e}")))?;
        let digests: Vec<[u8; 32]> = q
            .pcrs
            .iter()
            .map(|p| <[u8; 32]>::try_from(p.digest.as_slice()))
            .collect::<Result<_, _>>()
            .map_err(|_| {
                CliError::Input("tred's quote has a PCR value that is not SHA-256".into())
            })?;
        if indices.len() != q.pcrs.len() || sel.indices() != indices.as_slice() {
            return Err(CliError::Input(
                "tred's quote lists PCRs out of order".into(),
            ));
        }
        write(
            &dir.join("pcrs.out"),
            &mcim_core::tpm::attest::tpm2_tools_pcr_file(&sel, &digests),
        )?;
    }
    let v = serde_json::json!({
        "attest": hex::encode(&q.attest),
        "signature": hex::encode(&q.signature),
        "pcrs": q.pcrs.iter().map(|p| serde_json::json!({"index": p.index, "sha256": hex::encode(&p.digest)})).collect::<Vec<_>>(),
        "clock": r.clock, "reset_count": r.reset_count, "restart_count": r.restart_count, "safe": r.safe,
    });
    if json {
        println!("{v}");
    } else {
        println!(
            "quote over PCRs {:?}: clock {} ms, resets {}, restarts {}, safe {}",
            q.pcrs.iter().map(|p| p.index).collect::<Vec<_>>(),
            r.clock,
            r.reset_count,
            r.restart_count,
            r.safe
        );
    }
    Ok(())
}

/// Runs `mcimctl audit ...`.
pub fn run_audit(a: AuditArgs) -> Result<(), CliError> {
    runtime()?.block_on(async move {
        let mut c = connect(&a.socket.socket).await?;
        match a.command {
            AuditCommand::Show => {
                let r = c
                    .get_audit_log(pb::GetAuditLogRequest { from_seq: 0, limit: 0 })
                    .await?
                    .into_inner();
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                for e in r.entries {
                    let at = e.at.map_or(0, |t| t.seconds);
                    // Control characters in a detail are shown escaped: one entry, one line.
                    let detail = e.detail.escape_debug();
                    let line = if a.socket.json {
                        writeln!(out, "{}", serde_json::json!({"seq": e.seq, "at": at, "event": e.event, "mcim": e.mcim_id, "detail": e.detail, "hash": hex::encode(&e.hash)}))
                    } else {
                        writeln!(out, "{:>5} {at} {:<12} {:<16} {detail}", e.seq, e.event, e.mcim_id)
                    };
                    // A reader that stopped early (`| head`) is not an error.
                    if line.is_err() {
                        break;
                    }
                }
                Ok(())
            }
            AuditCommand::Verify => {
                let r = c.verify_audit_log(pb::VerifyAuditLogRequest {}).await?.into_inner();
                if a.socket.json {
                    println!("{}", serde_json::json!({"ok": r.ok, "entries": r.entries, "first_bad_seq": r.first_bad_seq, "detail": r.detail}));
                } else {
                    println!("{}", r.detail);
                }
                if r.ok {
                    Ok(())
                } else {
                    Err(CliError::AuditBroken(r.detail))
                }
            }
        }
    })
}
