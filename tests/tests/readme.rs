//! The README's command blocks, run as they are written so that they cannot rot: each block
//! after a `<!-- walked: NAME -->` line is taken from README.md itself and run by bash with
//! `set -euo pipefail` in a folder of the test's own. Only what must differ on a shared test
//! machine is rewritten: `/tmp/` becomes that folder, swtpm's ports 2321/2322 and the roles'
//! ports 7401-7406 become free ones.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use mcim_e2e::{Roles, Swtpm, output_text, workspace_bin};

/// The block after `<!-- walked: NAME` in README.md.
fn walked(name: &str) -> String {
    mcim_e2e::readme_block(name)
}

/// Runs `script` with bash in `dir`, the workspace's binaries first on PATH; `prelude` comes
/// before it (the test's own cleanup and environment, not the README's).
fn bash(dir: &Path, prelude: &str, script: &str) -> std::process::Output {
    let bin = workspace_bin("mcimctl");
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{prelude}\n{script}"))
        .current_dir(dir)
        .env("PATH", path)
        .env_remove("MCIM_SOCKET")
        .output()
        .unwrap()
}

/// Kills, when dropped, every swtpm whose command line names this folder (the README starts
/// it with `--daemon`, so no child handle exists).
struct DaemonsIn(std::path::PathBuf);

impl Drop for DaemonsIn {
    fn drop(&mut self) {
        let needle = self.0.display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if comm.trim() == "swtpm"
                && String::from_utf8_lossy(&cmdline).contains(&needle)
                && let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>()
            {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
    }
}

#[test]
fn the_device_block_runs_as_written() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let port = mcim_e2e::free_ports(2);
    let script = walked("device")
        .replace("/tmp/", &format!("{}/", dir.display()))
        .replace("port=2321", &format!("port={port}"))
        .replace("port=2322", &format!("port={}", port + 1));
    // The block starts tred in the background (stopped when the script ends) and swtpm as a
    // daemon (stopped by the guard, also when the test fails).
    let _swtpm = DaemonsIn(dir.join("tpm"));
    let prelude = "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT";
    let out = bash(dir, prelude, &script);
    let text = output_text(&out);
    assert!(
        out.status.success(),
        "the README's device block failed:\n{text}"
    );
    // What the block's comments say it prints: test set 1's RES, then a verified quote.
    assert!(text.contains("a54211d5e3ba50bf"), "{text}");
    assert!(dir.join("q/quote.attest").exists());
}

#[test]
fn the_life_and_change_blocks_run_as_written() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    // The roles and a tred configured for them, as the block's first comment says; the block
    // itself runs unchanged but for the roles' ports and tred's socket.
    let roles = Roles::start(dir);
    assert_eq!(roles.pki, dir.join("pki"), "the blocks use --pki pki");
    let tpm = Swtpm::start();
    let tred = roles.tred(&tpm.tcti());
    let socket = tred.socket().to_str().unwrap().to_string();
    let mut script = walked("life") + &walked("change");
    for (i, role) in ["supplier", "ro", "vno", "sho", "pva", "sho2"]
        .iter()
        .enumerate()
    {
        script = script.replace(&format!("https://127.0.0.1:{}", 7401 + i), &roles.url(role));
    }
    let script = script.replace("/tmp/tred.sock", &socket);
    let out = bash(dir, &format!("export MCIM_SOCKET={socket}"), &script);
    let text = output_text(&out);
    assert!(
        out.status.success(),
        "the README's life blocks failed:\n{text}"
    );
    // Provisioned by the first SHO, then moved to the second one (5.1.3.7.4.2).
    assert!(
        text.contains("\"state\":\"provisioned\"") || text.contains("provisioned"),
        "{text}"
    );
    assert!(text.contains("attached with IMSI 00102"), "{text}");
    assert!(text.contains("attached with IMSI 00103"), "{text}");
}
