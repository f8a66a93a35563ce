//! The lab's TRE: a software TPM (swtpm on free ports) or a SoftHSM2 token of its own, and
//! `tred`'s settings for it.

use std::path::Path;
use std::process::Command;

use super::processes::{Proc, spawn, start_on_free_ports};
use super::report::Say;
use super::{RunArgs, TpmAka, TreChoice};
use crate::error::{CliError, fail};

/// Starts the TRE `a.tre` under `dir` and points `tred` at it; the swtpm process (kept alive
/// by the caller) and its port (0 for a token).
pub(super) fn start(
    a: &RunArgs,
    dir: &Path,
    tred: &mut Command,
    say: &Say,
) -> Result<(Option<Proc>, u16), CliError> {
    match a.tre {
        TreChoice::Tpm => {
            let tpm_dir = dir.join("tpm");
            std::fs::create_dir_all(&tpm_dir).map_err(fail)?;
            let (proc, port) = start_on_free_ports(2, "swtpm", None, |port| {
                spawn(
                    Command::new("swtpm")
                        .args(["socket", "--tpm2", "--tpmstate"])
                        .arg(format!("dir={}", tpm_dir.display()))
                        .args([
                            "--server",
                            &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                        ])
                        .args([
                            "--ctrl",
                            &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
                        ])
                        .args(["--flags", "not-need-init,startup-clear"]),
                    "swtpm",
                    &dir.join("swtpm.log"),
                )
            })?;
            tred.env("MCIM_BACKEND", "tpm")
                .env("MCIM_TCTI", format!("swtpm:host=127.0.0.1,port={port}"))
                .env(
                    "MCIM_TPM_AKA",
                    match a.tpm_aka {
                        TpmAka::Auto => "auto",
                        TpmAka::Sealed => "sealed",
                    },
                );
            say.line(&format!("[lab] software TPM (swtpm) on 127.0.0.1:{port}"));
            Ok((Some(proc), port))
        }
        TreChoice::Pkcs11 => {
            let hsm = dir.join("softhsm");
            std::fs::create_dir_all(hsm.join("tokens")).map_err(fail)?;
            let conf = hsm.join("softhsm2.conf");
            std::fs::write(
                &conf,
                format!(
                    "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                    hsm.join("tokens").display()
                ),
            )
            .map_err(fail)?;
            let init = Command::new("softhsm2-util")
                .env("SOFTHSM2_CONF", &conf)
                .args([
                    "--init-token",
                    "--free",
                    "--label",
                    "mcim",
                    "--pin",
                    "1234",
                    "--so-pin",
                    "5678",
                ])
                .output()
                .map_err(|e| {
                    fail(format!(
                        "softhsm2-util: {e} (bash ci/install-deps.sh installs it)"
                    ))
                })?;
            if !init.status.success() {
                return Err(fail(format!(
                    "softhsm2-util: {}",
                    String::from_utf8_lossy(&init.stderr)
                )));
            }
            tred.env("MCIM_BACKEND", "pkcs11")
                .env("SOFTHSM2_CONF", &conf)
                .env("MCIM_PKCS11_TOKEN", "mcim")
                .env("MCIM_PKCS11_PIN", "1234");
            say.line("[lab] SoftHSM2 token \"mcim\"");
            Ok((None, 0))
        }
    }
}
