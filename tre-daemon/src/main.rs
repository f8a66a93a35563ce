//! `tred`: the TRE daemon (TR 33.812 5.1.2). The TPM backend and the local API arrive with
//! the TRE issue; for now the binary only reports its version.
use clap::Parser;

/// The mcim TRE daemon.
#[derive(Parser)]
#[command(version, about)]
struct Args {}

fn main() {
    let _args = Args::parse();
    eprintln!("tred: no TRE backend is built into this version yet");
    std::process::exit(1);
}
