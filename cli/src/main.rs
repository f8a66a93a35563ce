//! `mcimctl`: the mcim command line.
//!
//! Today: `mcimctl aka milenage` and `mcimctl aka auts`, the AKA core at the command line.
//! The device (`mcimctl device ...`), subscriber, operator, PKI and lab commands arrive with
//! the issues that build those parts.
#![forbid(unsafe_code)]

mod aka;
mod hexarg;

use clap::{Parser, Subcommand};
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Aka(cmd) => aka::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcimctl: error: {e}");
            ExitCode::FAILURE
        }
    }
}
