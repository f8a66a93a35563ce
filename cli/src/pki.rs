//! `mcimctl pki ...`: the development PKI of the roles' mutual TLS (`mcim_pki::dev`).

use std::path::PathBuf;

use clap::Subcommand;

/// `mcimctl pki ...`
#[derive(Subcommand)]
pub enum PkiCommand {
    /// Create a development CA and a certificate per role (supplier, ro, vno, sho, pva,
    /// subscriber) in DIR; existing files are kept.
    Init {
        /// The PKI directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Certify a device's TLS key (the tls.spki.der `device init --out-dir` wrote; the key
    /// stays in its TRE) for its PCID.
    Device {
        /// The PKI directory.
        #[arg(long)]
        dir: PathBuf,
        /// The device's PCID.
        #[arg(long)]
        pcid: String,
        /// The device's TLS public key, DER SPKI.
        #[arg(long)]
        tls_spki: PathBuf,
        /// Where the certificate (PEM) goes.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs `mcimctl pki ...`.
pub fn run(cmd: PkiCommand) -> Result<(), String> {
    match cmd {
        PkiCommand::Init { dir } => {
            let made = mcim_pki::dev::init(&dir, &mcim_pki::dev::LAB_PARTIES)
                .map_err(|e| e.to_string())?;
            println!(
                "PKI in {}: CA kept or made; new certificates: {}",
                dir.display(),
                if made.is_empty() {
                    "none".to_string()
                } else {
                    made.iter()
                        .map(|r| r.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
            Ok(())
        }
        PkiCommand::Device {
            dir,
            pcid,
            tls_spki,
            out,
        } => {
            mcim_core::identity::Pcid::new(pcid.clone()).map_err(|e| e.to_string())?;
            let spki =
                std::fs::read(&tls_spki).map_err(|e| format!("{}: {e}", tls_spki.display()))?;
            let pem = mcim_pki::dev::issue_device(&dir, &pcid, &spki).map_err(|e| e.to_string())?;
            std::fs::write(&out, pem).map_err(|e| format!("{}: {e}", out.display()))?;
            println!("certificate for device {pcid}: {}", out.display());
            Ok(())
        }
    }
}
