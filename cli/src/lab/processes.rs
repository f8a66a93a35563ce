//! The lab's processes: children started from the binaries beside `mcimctl`, on ports found
//! free, stopped (SIGTERM, then SIGKILL) when dropped or crashed on purpose (SIGKILL), and the
//! lab's temporary directory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mcim_proto::mcim::tre::v1::tre_service_client::TreServiceClient;
use rand::Rng;
use tonic::transport::Channel;

use crate::error::{CliError, fail};
use crate::tred::connect;

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
pub(crate) struct Proc(pub(crate) Option<Child>);

impl Proc {
    /// Whether the process has ended.
    pub(crate) fn exited(&mut self) -> bool {
        self.0
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// SIGKILL, no clean shutdown: what a crash or a power cut looks like to the others.
    pub(crate) fn crash(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the process as `signal` says: SIGKILL at once, or SIGTERM (a clean shutdown:
    /// the process drains its calls) and SIGKILL only after 15 s.
    pub(crate) fn stop_with(&mut self, signal: super::crash::Signal) {
        match signal {
            super::crash::Signal::Kill => self.crash(),
            super::crash::Signal::Term => self.terminate(),
        }
    }

    /// SIGTERM, then SIGKILL after 15 s.
    fn terminate(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// `n` consecutive free ports on 127.0.0.1.
pub(crate) fn free_ports(n: u16) -> Result<u16, CliError> {
    // Below the kernel's ephemeral range: no outgoing connection on this machine takes a local
    // port there, so a server restarted on its ports (after --crash) finds them free.
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|p| p.parse::<u16>().ok())
        })
        .unwrap_or(32768);
    let (from, to) = (10_000u16, low.saturating_sub(n).max(10_001));
    for _ in 0..1000 {
        let p = from + (rand::random::<u16>() % (to - from));
        if (0..n).all(|i| TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            return Ok(p);
        }
    }
    Err(fail("no free ports"))
}

/// Starts a server on `n` fresh consecutive ports (`start(first port)`) and waits until all
/// of them accept connections. Ports found free can be taken by another process before the
/// server binds them; the server then exits, and this tries new ports (five times).
pub(crate) fn start_on_free_ports(
    n: u16,
    what: &str,
    log: Option<&Path>,
    mut start: impl FnMut(u16) -> Result<Proc, CliError>,
) -> Result<(Proc, u16), CliError> {
    for _attempt in 0..5 {
        let base = free_ports(n)?;
        let mut p = start(base)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if (0..n).all(|i| std::net::TcpStream::connect(("127.0.0.1", base + i)).is_ok()) {
                return Ok((p, base));
            }
            if p.exited() {
                // Another process took a port: try others. With its log at hand (a program
                // that says so when a port is taken), anything else is the error.
                let Some(log) = log else { break };
                let said = std::fs::read_to_string(log).unwrap_or_default();
                if said.to_lowercase().contains("in use") {
                    break;
                }
                let last: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
                return Err(fail(format!(
                    "{what} stopped at start: {}",
                    last[last.len().saturating_sub(3)..].join(" / ")
                )));
            }
            if Instant::now() > deadline {
                return Err(fail(format!("{what} did not start")));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    Err(fail(format!(
        "{what} did not start: no free ports it could bind"
    )))
}

/// Waits (30 s at most) until `ready`.
pub(crate) fn wait_until(what: &str, mut ready: impl FnMut() -> bool) -> Result<(), CliError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err(fail(format!("{what} did not start")))
}

/// A binary next to this `mcimctl`, else on PATH.
pub(crate) fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Starts `cmd` with its standard error into `log`.
pub(crate) fn spawn(cmd: &mut Command, what: &str, log: &Path) -> Result<Proc, CliError> {
    let log = std::fs::File::create(log).map_err(fail)?;
    cmd.stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map(|c| Proc(Some(c)))
        .map_err(|e| {
            fail(format!(
                "{what}: {e} (bash ci/install-deps.sh installs what the lab needs)"
            ))
        })
}

/// Starts `tred` again on the same state and socket (after it stopped or was killed) and
/// connects to it.
pub(crate) async fn restart_tred(
    tred: &mut Command,
    socket: &Path,
    log: &Path,
) -> Result<(Proc, TreServiceClient<Channel>), CliError> {
    let _ = std::fs::remove_file(socket);
    let p = spawn(tred, "tred", log)?;
    wait_until("tred", || {
        std::os::unix::net::UnixStream::connect(socket).is_ok()
    })?;
    Ok((p, connect(socket).await?))
}

/// A temporary directory removed on drop (no extra dependency for one directory).
pub(crate) struct TempDir(pub(crate) PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The working directory of a lab or fleet run: `dir` (created if missing), else a fresh
/// temporary one, removed when the returned guard drops unless `keep`.
pub(crate) fn working_dir(
    dir: Option<&Path>,
    keep: bool,
) -> Result<(PathBuf, Option<TempDir>), CliError> {
    if let Some(d) = dir {
        std::fs::create_dir_all(d).map_err(fail)?;
        return Ok((d.to_path_buf(), None));
    }
    let tmp = tempdir()?;
    let p = tmp.0.clone();
    if keep {
        std::mem::forget(tmp);
        return Ok((p, None));
    }
    Ok((p, Some(tmp)))
}

/// A fresh directory under the system's temporary directory.
pub(crate) fn tempdir() -> Result<TempDir, CliError> {
    let mut n = [0u8; 8];
    rand::rng().fill_bytes(&mut n);
    let p = std::env::temp_dir().join(format!("mcim-lab-{}", hex::encode(n)));
    std::fs::create_dir_all(&p).map_err(fail)?;
    Ok(TempDir(p))
}
