//! `mcimctl lab run`: a whole system on this machine, end to end. It starts the same binaries
//! users deploy, as child processes: `mcim-roles all` (supplier, RO, VNO, SHO, PVA on one
//! SQLite database, mutual TLS under a fresh development PKI), a software TRE (swtpm, or a
//! SoftHSM2 token), and `tred` for the device. Then, as the factory, the subscriber and the
//! device owner would:
//!
//! 1. supply time (5.1.3.3.4): keys and identity in the TRE, the supplier certifies them
//!    (platform credential, TLS certificate), registers the model's reference values with the
//!    PVA, embeds the PCID's initial credential and hands it to the RO's ICF (CCIF mode 2);
//! 2. the subscriber contracts with the SHO (5.1.3.5.2);
//! 3. the device runs initial provisioning (5.1.3.6.2 steps 1-14, or 5.1.3.6.3), each step
//!    printed as the device sees it;
//! 4. an operational attach with the new MCIM (5.1.3.3.2.2).
//!
//! `--json` prints one JSON object at the end (progress goes to stderr). On failure the exit
//! status is non-zero and the failed step is named.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use mcim_pki::Role;
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::pva::v1::pva_service_client::PvaServiceClient;
use mcim_proto::mcim::sho::v1 as sho;
use mcim_proto::mcim::sho::v1::sho_service_client::ShoServiceClient;
use mcim_proto::mcim::supplier::v1::supplier_service_client::SupplierServiceClient;
use mcim_proto::mcim::tre::v1 as pb;
use mcim_proto::mcim::tre::v1::tre_service_client::TreServiceClient;
use mcim_proto::mcim::vno::v1 as vno;
use mcim_proto::mcim::vno::v1::vno_service_client::VnoServiceClient;
use serde_json::json;
use tonic::transport::Channel;

use crate::error::{CliError, fail, runtime};
use crate::tred::connect;

mod compromised_dpf;
mod crash;
pub mod pcsc;
pub(crate) mod processes;
mod report;
mod scenario;
mod tre;

use processes::{Proc, restart_tred, sibling, spawn, start_on_free_ports, wait_until};
use report::{Say, lab};
use scenario::lab_inner;

/// The longest the lab waits for the device's next provisioning step (the device itself
/// retries an unreachable role for two minutes).
const STEP_TIMEOUT: Duration = Duration::from_secs(150);

/// The lab SHO's PLMN (MCC 001, MNC 02): its IMSIs start with it.
const LAB_SHO_PLMN: &str = "00102";

/// MCC+MNC of the lab's second SHO (the operator a device changes to, 5.1.3.7).
const LAB_SHO2_PLMN: &str = "00103";

/// `mcimctl lab ...`
#[derive(Subcommand)]
pub enum LabCommand {
    /// Run the lab once and report each step.
    Run(RunArgs),
    /// Run a private pcscd with vsmartcard's vpcd on PORT (and PORT+1), its socket in
    /// DIR/run/pcscd.comm (for PCSCLITE_CSOCK_NAME); the machine's pcscd is left alone.
    #[command(hide = true)]
    Pcscd {
        /// Its folder.
        #[arg(long)]
        dir: PathBuf,
        /// vpcd's port for the virtual ICC.
        #[arg(long)]
        port: u16,
    },
}

/// The device's TRE in the lab.
/// Which of the seed's procedures the lab runs (`--flow`).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FlowChoice {
    /// Initial provisioning, 5.1.3.6.2 (5.1.3.6.3 over non-3GPP access).
    Initial,
    /// Initial provisioning, then a change to the lab's second SHO over the first SHO's
    /// connectivity, 5.1.3.7.4.2 steps 1-14.
    ChangeSho,
    /// Initial provisioning, then a change to the second SHO by reverting to the pristine
    /// state, 5.1.3.7.4.3 (steps 1-3, then 5.1.3.6.2's as 4-17).
    Pristine,
    /// Initial provisioning, then the second SHO's MCIM installed beside the first (end of
    /// 5.1.3.7.4.2, steps 1-10); the owner switches connectivity to it, back, and to it again.
    Dual,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TreChoice {
    /// A software TPM 2.0 (swtpm).
    Tpm,
    /// A SoftHSM2 token.
    Pkcs11,
}

/// How the device reaches the RO.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccessChoice {
    /// Through a VNO after AKA with the PCID (5.1.3.6.2).
    #[value(name = "3gpp")]
    ThreeGpp,
    /// Straight to the RO's DRF (5.1.3.6.3).
    #[value(name = "non-3gpp")]
    Non3gpp,
}

/// Arguments of `mcimctl lab run`.
#[derive(Args)]
pub struct RunArgs {
    /// Working directory (PKI, databases, TRE state, logs); a temporary one if not given.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The seed's procedure: initial provisioning, or that followed by a change of SHO.
    #[arg(long, value_enum, default_value = "initial")]
    flow: FlowChoice,
    /// With a change flow: how many changes, back and forth between the lab's two SHOs (2:
    /// to the second SHO and back to the first, which gives a new IMSI).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=4))]
    changes: u8,
    /// The device's TRE.
    #[arg(long, value_enum, default_value = "tpm")]
    tre: TreChoice,
    /// The access network.
    #[arg(long, value_enum, default_value = "3gpp")]
    access: AccessChoice,
    /// The roles' database (`mcim-roles all --db`): `sqlite://DIR/roles.db` if not given, or
    /// a PostgreSQL database, `postgres://USER@HOST:PORT/NAME`, created if missing (the second
    /// SHO keeps its own beside it, `NAME-sho2`).
    #[arg(long, value_name = "URL")]
    db: Option<String>,
    /// Print one JSON object at the end (progress goes to stderr).
    #[arg(long)]
    json: bool,
    /// Keep the working directory (and print where it is).
    #[arg(long)]
    keep: bool,
    /// Demonstrate a refusal: extend PCR 0 after supply (tred stopped, tpm2_pcrextend, tred
    /// restarted), so the platform no longer matches its reference values; the PVA refuses it
    /// and nothing is provisioned (TPM only).
    #[arg(long)]
    extend_pcr_after_supply: bool,
    /// Demonstrate a refusal: the RO is compromised and its DPF serves, instead of the
    /// SHO's package, another genuine SHO-signed package (one from an earlier registration,
    /// or one for another device), wrapped for this device's TRE. The device refuses it at
    /// step 13, the SHO is told, and nothing is installed.
    #[arg(long, value_enum)]
    dpf_serves: Option<compromised_dpf::Served>,
    /// Demonstrate recovery: right after the device reports step N, kill (SIGKILL) `tred` or
    /// `mcim-roles` and start it again on the same state (`tred:N` or `roles:N`, N from 1 to
    /// 13, or 0 for as soon as the run starts). Provisioning resumes where it was and
    /// completes, each step reported once.
    #[arg(long, value_name = "tred:N|roles:N")]
    crash: Option<crash::Crash>,
    /// How `--crash` stops the process: "kill" (SIGKILL, a crash) or "term" (SIGTERM, a clean
    /// shutdown that drains calls in flight).
    #[arg(long, value_enum, default_value = "kill")]
    crash_signal: crash::Signal,
    /// With `--crash tred:N` in a change of SHO: while tred is down, damage the package it kept
    /// (5.1.3.7.4.2 step 7), so every install from it fails: the change ends at the install
    /// step after its retries from the kept copy (never a second download), the DPF and the new
    /// SHO told.
    #[arg(long, requires = "crash")]
    damage_kept_package: bool,
    /// How the PCID's initial credentials are configured (5.1.3.4.1): 1 the CCIF generates
    /// them and returns them wrapped for the TRE; 2 the supplier embeds them and the CCIF
    /// hands them to the RO; 3 the supplier embeds them and the subscriber registers them at
    /// the RO (with delayed activation, annex x.1).
    #[arg(long, value_enum, default_value = "2")]
    ccif_mode: crate::supply::CcifMode,
    /// The TPM's AKA form (tred's `tpm_aka`): "sealed" runs the device as a TPM without
    /// TPM2_EncryptDecrypt2 (K as sealed data, unsealed for each AKA); the PVA's result says
    /// so and the SHO wraps K accordingly.
    #[arg(long, value_enum, default_value = "auto")]
    tpm_aka: TpmAka,
    /// The operational attach through the MCIM as a USIM: "pcsc" starts a private pcscd with
    /// vsmartcard's vpcd, `tred` is the card in its reader, and the VNO's challenge goes to
    /// the card as an AUTHENTICATE APDU over PC/SC (`mcimctl card authenticate`).
    #[arg(long, value_enum)]
    usim: Option<UsimChoice>,
    /// The subscription requires AKA inside the TRE: the SHO refuses a device that runs it
    /// with K unsealed in the host (step 10), and the device hears it.
    #[arg(long)]
    require_aka_in_tre: bool,
}

/// How the lab's UE reaches the USIM (`--usim`).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UsimChoice {
    /// PC/SC: pcscd with vsmartcard's vpcd, `tred` the virtual card.
    Pcsc,
}

/// tred's `tpm_aka`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TpmAka {
    /// AKA in the TPM when it has TPM2_EncryptDecrypt2.
    Auto,
    /// K as sealed data, unsealed for each AKA.
    Sealed,
}

async fn role_client(pki: &Path, me: Role, peer: Role, port: u16) -> Result<Channel, CliError> {
    crate::net::role_channel(pki, me, peer, &format!("https://127.0.0.1:{port}")).await
}

/// Runs `mcimctl lab ...`.
pub fn run(cmd: LabCommand) -> Result<(), CliError> {
    let a = match cmd {
        LabCommand::Run(a) => a,
        LabCommand::Pcscd { dir, port } => return pcsc::exec(&dir, port),
    };
    let (dir, _tmp) = processes::working_dir(a.dir.as_deref(), a.keep)?;
    let say = Say(a.json);
    let outcome = lab(&a, &dir, &say);
    if a.keep || a.dir.is_some() {
        say.line(&format!("lab directory: {}", dir.display()));
    }
    match outcome {
        Ok(report) => {
            if a.json {
                println!("{report}");
            }
            Ok(())
        }
        Err((report, e)) => {
            if a.json {
                println!("{report}");
            }
            Err(e)
        }
    }
}
