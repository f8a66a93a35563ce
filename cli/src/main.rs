//! `mcimctl`: the mcim command line.
//!
//! - `mcimctl aka milenage|auts`: the AKA core at the command line.
//! - `mcimctl device ...`, `mcimctl audit ...`: the device owner's side, through `tred`.
//! - `mcimctl sho wrap`, `mcimctl pva verify-quote`, `mcimctl supplier keygen|rehab-token`:
//!   operator tools that need no server.
//!
//! - `mcimctl pki init`: the roles' development PKI.
//! - `mcimctl subscriber register|status`: the subscriber contracting with an SHO.
//! - `mcimctl lab run`: the whole system on this machine.
//! - `mcimctl completions bash|zsh|fish`, `mcimctl man --out-dir DIR`: shell completion and man
//!   pages, generated from these commands.
#![forbid(unsafe_code)]

mod aka;
mod card;
mod device;
mod error;
mod fleet;
mod hexarg;
mod instruct;
mod lab;
mod net;
mod operator;
mod parameters;
mod pki;
mod ro;
mod subscriber;
mod supply;
mod tred;

/// mimalloc: the fleet simulator allocates per call what glibc's malloc serves slower
/// (BENCHMARKS.md, "Where the roles' CPU goes").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{CommandFactory, Parser, Subcommand};
use std::process::ExitCode;

/// mcim: remote provisioning of MCIMs (downloadable USIMs) into a TPM or PKCS#11 TRE.
#[derive(Parser)]
#[command(name = "mcimctl", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// 3GPP AKA tools: MILENAGE (TS 35.206) and AUTS resynchronisation (TS 33.102 6.3.5).
    #[command(subcommand)]
    Aka(aka::AkaCommand),
    /// The device's TRE through tred: init, MCIM registry and lifecycle, AKA, PIN, attestation,
    /// provisioning and attach.
    Device(device::DeviceArgs),
    /// The TRE's audit record: show it, verify its chain against the TRE.
    Audit(device::AuditArgs),
    /// Selected Home Operator tools.
    #[command(subcommand)]
    Sho(operator::ShoCommand),
    /// A whole system on one machine: every role, a software TRE and tred, provisioning a
    /// device end to end (with refusals and crash recovery to show on demand).
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// A benchmark: a fleet of simulated devices (software keys, not a TRE) provisioned by the
    /// roles, embedded or running; the rate, latency and CPU per provisioning.
    #[command(subcommand)]
    Fleet(fleet::FleetCommand),
    /// The roles' development PKI: CA, role certificates, device certificates.
    #[command(subcommand)]
    Pki(pki::PkiCommand),
    /// Equipment supplier: supply a device at the factory; rehabilitation keys and tokens.
    #[command(subcommand)]
    Supplier(operator::SupplierCommand),
    /// Platform Validation Authority tools.
    #[command(subcommand)]
    Pva(operator::PvaCommand),
    /// The M2ME subscriber: contract with an SHO for a device, follow its provisioning.
    #[command(subcommand)]
    Subscriber(subscriber::SubscriberCommand),
    /// Registration Operator tools: push a renewal of a PCID's initial credential.
    #[command(subcommand)]
    Ro(ro::RoCommand),
    /// A USIM in a PC/SC reader (tred's MCIM through vpcd, or any other): read it, run
    /// AUTHENTICATE.
    #[command(subcommand)]
    Card(card::CardCommand),
    /// Prints a shell's completion script for mcimctl (bash: `source <(mcimctl completions
    /// bash)`; the Debian package installs all three).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Writes mcimctl's man pages (mcimctl.1 and one per subcommand, `mcimctl-device.1`, ...)
    /// into a folder.
    Man {
        /// The folder (created if absent).
        #[arg(long)]
        out_dir: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Aka(cmd) => aka::run(cmd).map_err(|e| e.to_string()),
        Command::Device(a) => device::run(a).map_err(|e| e.to_string()),
        Command::Audit(a) => device::run_audit(a).map_err(|e| e.to_string()),
        Command::Sho(c) => operator::run_sho(c).map_err(|e| e.to_string()),
        Command::Pva(c) => operator::run_pva(c).map_err(|e| e.to_string()),
        Command::Lab(c) => lab::run(c).map_err(|e| e.to_string()),
        Command::Fleet(c) => fleet::run(c).map_err(|e| e.to_string()),
        Command::Card(c) => card::run(c).map_err(|e| e.to_string()),
        Command::Pki(c) => pki::run(c),
        Command::Supplier(c) => operator::run_supplier(c).map_err(|e| e.to_string()),
        Command::Subscriber(c) => subscriber::run(c).map_err(|e| e.to_string()),
        Command::Ro(c) => ro::run(c).map_err(|e| e.to_string()),
        Command::Completions { shell } => {
            // Into memory first: clap_complete panics on a failed write (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "mcimctl", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)
                .map_err(|e| format!("standard output: {e}"))
        }
        Command::Man { out_dir } => std::fs::create_dir_all(&out_dir)
            .and_then(|()| clap_mangen::generate_to(Cli::command(), &out_dir))
            .map_err(|e| format!("{}: {e}", out_dir.display())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcimctl: error: {e}");
            ExitCode::FAILURE
        }
    }
}
