//! A private pcscd with vsmartcard's vpcd driver (Debian pcscd and vsmartcard-vpcd), for the
//! lab's `--usim pcsc` and for tests: the machine's own pcscd (if any) is left alone.
//!
//! pcscd 1.9 keeps its socket and pid file at the fixed `/run/pcscd`; this one runs in a mount
//! namespace of its own (`unshare`; as root, or in a user namespace otherwise) where a folder
//! of ours is bind-mounted on `/run/pcscd`, so its socket appears in that folder. PC/SC
//! clients reach it with `PCSCLITE_CSOCK_NAME=<folder>/pcscd.comm`. vpcd listens for the
//! virtual ICC (`tred`) on `port` and `port + 1` (its two slots).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{CliError, fail};

/// vpcd's pcscd driver as Debian installs it.
const VPCD_DRIVER: &str = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so";

/// The socket a private pcscd under `dir` serves: what `PCSCLITE_CSOCK_NAME` names.
pub fn socket(dir: &Path) -> PathBuf {
    dir.join("run").join("pcscd.comm")
}

/// The command that runs pcscd (foreground) with vpcd on `port`, its socket under `dir`.
pub fn pcscd(dir: &Path, port: u16) -> Result<Command, CliError> {
    if !Path::new(VPCD_DRIVER).exists() {
        return Err(fail(format!(
            "{VPCD_DRIVER} is missing: apt-get install pcscd vsmartcard-vpcd (ci/install-deps.sh)"
        )));
    }
    let conf = dir.join("reader.conf.d");
    let run = dir.join("run");
    for d in [&conf, &run] {
        std::fs::create_dir_all(d).map_err(fail)?;
    }
    std::fs::write(
        conf.join("vpcd"),
        format!(
            "FRIENDLYNAME \"mcim vpcd\"\nDEVICENAME /dev/null:{port}\nLIBPATH {VPCD_DRIVER}\nCHANNELID {port}\n"
        ),
    )
    .map_err(fail)?;
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    let mut cmd = Command::new("unshare");
    if !root {
        cmd.args(["--user", "--map-root-user"]);
    }
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        // A tmpfs on /run (so that /run/pcscd can be made), our folder on /run/pcscd.
        .arg("mount -t tmpfs tmpfs /run && mkdir /run/pcscd && mount --bind \"$0\" /run/pcscd && exec pcscd --foreground --info --config \"$1\" 1>&2")
        .arg(&run)
        .arg(&conf);
    Ok(cmd)
}

/// `mcimctl lab pcscd`: becomes the private pcscd (exec), for tests and by hand.
pub fn exec(dir: &Path, port: u16) -> Result<(), CliError> {
    use std::os::unix::process::CommandExt;
    let e = pcscd(dir, port)?.exec();
    Err(fail(format!("unshare: {e}")))
}
