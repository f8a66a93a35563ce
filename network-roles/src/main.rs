//! `mcim-roles`: the network roles' gRPC servers. The roles arrive with the provisioning
//! issue; for now the binary only reports its version.
use clap::Parser;

/// The mcim network roles.
#[derive(Parser)]
#[command(version, about)]
struct Args {}

fn main() {
    let _args = Args::parse();
    eprintln!("mcim-roles: no role is built into this version yet");
    std::process::exit(1);
}
