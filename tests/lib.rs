//! # mcim-e2e
//!
//! End-to-end tests: each starts the real binaries (`mcimctl`, `tred`, `mcim-roles`)
//! and its own swtpm (or SoftHSM2) instance with a fresh state directory. The helpers that
//! start those live here, shared with the crates' own integration tests; the tests are in
//! `tests/tests/`.
// A test harness: failing loudly on a broken fixture is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

/// A binary of the workspace, built next to the running test (`cargo test --workspace` and
/// `cargo nextest run --workspace` build them all).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps/<test>");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is not built: run the tests with --workspace (or cargo build --workspace)",
        p.display()
    );
    p
}

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running swtpm on 127.0.0.1, killed when dropped.
pub struct Swtpm {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// The TPM command port (the control port is the next one).
    pub port: u16,
}

fn free_port_pair() -> u16 {
    free_ports(2)
}

impl Swtpm {
    /// A TPM with a copy of the state another swtpm left in `state` (its `--tpmstate` dir):
    /// to look at what a stopped TPM holds with tpm2-tools.
    pub fn start_from(state: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for f in std::fs::read_dir(state).unwrap() {
            let f = f.unwrap();
            if f.file_type().unwrap().is_file() {
                std::fs::copy(f.path(), dir.path().join(f.file_name())).unwrap();
            }
        }
        let mut s = Swtpm {
            child: None,
            dir,
            port: 0,
        };
        s.launch();
        s
    }

    /// A new TPM with empty state.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Swtpm {
            child: None,
            dir,
            port: 0,
        };
        s.launch();
        s
    }

    fn launch(&mut self) {
        for _attempt in 0..5 {
            let port = free_port_pair();
            let child = Command::new("swtpm")
                .arg("socket")
                .arg("--tpm2")
                .arg("--tpmstate")
                .arg(format!("dir={}", self.dir.path().display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .arg("--flags")
                .arg("not-need-init,startup-clear")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("swtpm is installed (ci/install-deps.sh)");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    self.child = Some(child);
                    self.port = port;
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("swtpm did not start");
    }

    /// Power-cycles the TPM: stops swtpm and starts it again on the same state directory.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sets the TPM's dictionary-attack parameters with `tpm2_dictionarylockout` (the lockout
    /// hierarchy's authValue is empty on a fresh swtpm): what a device maker does at
    /// manufacturing. swtpm's defaults (3 tries, 1000 s) lock every DA-protected object after
    /// three wrong PINs.
    pub fn set_dictionary_attack(&self, max_tries: u32, recovery_s: u32, lockout_recovery_s: u32) {
        let out = self.tpm2(
            "tpm2_dictionarylockout",
            &[
                "-s",
                "-n",
                &max_tries.to_string(),
                "-t",
                &recovery_s.to_string(),
                "-l",
                &lockout_recovery_s.to_string(),
            ],
        );
        assert!(
            out.status.success(),
            "tpm2_dictionarylockout: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The TCTI string for tss-esapi and tpm2-tools.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Runs a tpm2-tools command against this TPM (an independent witness).
    pub fn tpm2(&self, tool: &str, args: &[&str]) -> std::process::Output {
        Command::new(tool)
            .args(args)
            .env("TPM2TOOLS_TCTI", self.tcti())
            .output()
            .expect("tpm2-tools is installed (ci/install-deps.sh)")
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A recording relay on the TPM bus (test-only): a TCP proxy between a TPM client and a
/// [`Swtpm`] that keeps every byte of the command channel, both directions, as a passive
/// listener on the bus between `tred` and the TPM would see it. The control channel (the next
/// port) is relayed too, unrecorded.
pub struct BusRecorder {
    port: u16,
    recorded: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl BusRecorder {
    /// Starts relaying to `tpm`; clients use [`BusRecorder::tcti`].
    pub fn start(tpm: &Swtpm) -> Self {
        let recorded = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        for _attempt in 0..5 {
            let port = free_port_pair();
            let (Ok(cmd), Ok(ctrl)) = (
                TcpListener::bind(("127.0.0.1", port)),
                TcpListener::bind(("127.0.0.1", port + 1)),
            ) else {
                continue;
            };
            relay(cmd, tpm.port, Some(recorded.clone()));
            relay(ctrl, tpm.port + 1, None);
            return BusRecorder { port, recorded };
        }
        panic!("no free port pair for the bus recorder");
    }

    /// The TCTI string that goes through the relay.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Everything recorded so far.
    pub fn recorded(&self) -> Vec<u8> {
        self.recorded.lock().unwrap().clone()
    }

    /// Forgets what was recorded.
    pub fn clear(&self) {
        self.recorded.lock().unwrap().clear();
    }
}

/// Accepts connections on `listener` and relays each to `127.0.0.1:to`, appending what passes
/// in either direction to `record`.
fn relay(
    listener: TcpListener,
    to: u16,
    record: Option<std::sync::Arc<std::sync::Mutex<Vec<u8>>>>,
) {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                return;
            };
            for (mut from, mut into) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                let record = record.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if let Some(r) = &record {
                            r.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                        if into.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
}

/// A running `tred` on its own state directory and socket, stopped (SIGTERM) when dropped.
pub struct Tred {
    child: Option<Child>,
    dir: tempfile::TempDir,
    tcti: String,
    env: Vec<(String, String)>,
}

impl Tred {
    /// Starts tred against `tcti`, waiting until its socket accepts connections.
    pub fn start(tcti: &str) -> Self {
        Self::start_with(tcti, &[])
    }

    /// Starts tred with extra environment (e.g. `MCIM_REHABILITATION_KEY`).
    pub fn start_with(tcti: &str, env: &[(&str, &str)]) -> Self {
        let mut t = Tred {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            tcti: tcti.to_string(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        t.launch();
        t
    }

    /// tred's Prometheus metrics, when it was started with `MCIM_METRICS_LISTEN`.
    pub fn metrics(&self) -> String {
        let addr = self
            .env
            .iter()
            .find(|(k, _)| k == "MCIM_METRICS_LISTEN")
            .map(|(_, v)| v.clone())
            .expect("tred started without MCIM_METRICS_LISTEN");
        scrape(&addr)
    }

    /// Starts tred again on the same state directory (after [`Tred::stop`]).
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Stops tred and starts it again on the same state with `env` set over its environment.
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        self.stop();
        for (k, v) in env {
            self.env.retain(|(x, _)| x != k);
            self.env.push((k.to_string(), v.to_string()));
        }
        self.launch();
    }

    /// Stops tred, lets `change` alter its state directory, and starts it again on it (an
    /// upgrade or a repair between two runs of the daemon).
    pub fn restart_after(&mut self, change: impl FnOnce(&Path)) {
        self.stop();
        change(&self.state_dir());
        self.launch();
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tred.log"))
            .unwrap();
        let child = Command::new(workspace_bin("tred"))
            .env("MCIM_TCTI", &self.tcti)
            .env("MCIM_STATE_DIR", self.state_dir())
            .env("MCIM_SOCKET", self.socket())
            .env("MCIM_LOG", "debug")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tred starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("tred exited with {status}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("tred did not open its socket: {}", self.log());
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("tred.sock")
    }

    /// A client of tred's local API (`mcim.tre.v1`) over its socket.
    pub async fn client(
        &self,
    ) -> mcim_proto::mcim::tre::v1::tre_service_client::TreServiceClient<tonic::transport::Channel>
    {
        mcim_proto::mcim::tre::v1::tre_service_client::TreServiceClient::new(self.channel().await)
    }

    /// A gRPC channel to the local API (for calls no generated client makes).
    pub async fn channel(&self) -> tonic::transport::Channel {
        let path = self.socket();
        tonic::transport::Endpoint::try_from("http://tred.local")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: tonic::codegen::http::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .unwrap()
    }

    /// Everything tred logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tred.log")).unwrap_or_default()
    }

    /// SIGTERM, then waits; returns whether tred exited successfully.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// SIGKILL (no clean shutdown), then starts tred again on the same state directory.
    pub fn kill_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.launch();
    }
}

impl Drop for Tred {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The SoftHSM2 module on Debian.
pub const SOFTHSM2_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The token label, user PIN and SO PIN of every test token.
pub const SOFTHSM2_LABEL: &str = "mcim-test";
/// User PIN of the test token.
pub const SOFTHSM2_PIN: &str = "246813";
/// SO PIN of the test token.
pub const SOFTHSM2_SO_PIN: &str = "975310";
const CHILD_MARKER: &str = "MCIM_SOFTHSM2_CHILD";

/// A SoftHSM2 token of one test: its own configuration file and token directory.
pub struct SoftHsm {
    /// The directory holding softhsm2.conf and tokens/.
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl SoftHsm {
    /// A new directory with a configuration and one initialised token (label
    /// [`SOFTHSM2_LABEL`], PINs [`SOFTHSM2_PIN`], [`SOFTHSM2_SO_PIN`]); removed when dropped.
    /// For processes started with `SOFTHSM2_CONF` = [`SoftHsm::conf`].
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let hsm = SoftHsm {
            dir: tmp.path().to_path_buf(),
            _tmp: Some(tmp),
        };
        std::fs::create_dir_all(hsm.dir.join("tokens")).unwrap();
        std::fs::write(
            hsm.conf(),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                hsm.dir.join("tokens").display()
            ),
        )
        .unwrap();
        let init = hsm.tool(
            "softhsm2-util",
            &[
                "--init-token",
                "--free",
                "--label",
                SOFTHSM2_LABEL,
                "--pin",
                SOFTHSM2_PIN,
                "--so-pin",
                SOFTHSM2_SO_PIN,
            ],
        );
        assert!(
            init.status.success(),
            "{}",
            String::from_utf8_lossy(&init.stderr)
        );
        hsm
    }

    /// The configuration file (what SOFTHSM2_CONF must name).
    pub fn conf(&self) -> PathBuf {
        self.dir.join("softhsm2.conf")
    }

    /// Runs `softhsm2-util` or `pkcs11-tool` against this token.
    pub fn tool(&self, tool: &str, args: &[&str]) -> std::process::Output {
        Command::new(tool)
            .args(args)
            .env("SOFTHSM2_CONF", self.conf())
            .output()
            .expect("softhsm2 / opensc are installed (ci/install-deps.sh)")
    }

    /// Runs `pkcs11-tool` on this token, logged in as its user, with `args` after the login.
    pub fn pkcs11_tool(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec![
            "--module",
            SOFTHSM2_MODULE,
            "--token-label",
            SOFTHSM2_LABEL,
            "--login",
            "--pin",
            SOFTHSM2_PIN,
        ];
        all.extend_from_slice(args);
        self.tool("pkcs11-tool", &all)
    }
}

impl Default for SoftHsm {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs the calling test on its own SoftHSM2 token. SoftHSM2 reads `SOFTHSM2_CONF` when the
/// module is initialised, and setting a variable inside a running test would take unsafe code,
/// so the test runs twice: the first run (the parent) makes a token directory and a
/// configuration, then runs this same test binary for just `test` with `SOFTHSM2_CONF` set,
/// and checks that it passed; it gets `None` and returns. The child gets `Some(token)` and
/// runs the body.
pub fn own_softhsm(test: &str) -> Option<SoftHsm> {
    if let Ok(dir) = std::env::var(CHILD_MARKER) {
        return Some(SoftHsm {
            dir: dir.into(),
            _tmp: None,
        });
    }
    let hsm = SoftHsm::new();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env("SOFTHSM2_CONF", hsm.conf())
        .env(CHILD_MARKER, &hsm.dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{test} on its own token failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    drop(hsm);
    None
}

/// Runs `mcimctl` with `args`.
pub fn mcimctl(args: &[&str]) -> std::process::Output {
    Command::new(workspace_bin("mcimctl"))
        .args(args)
        .output()
        .unwrap()
}

/// A command's standard output and error, for assertions and failure messages.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A fresh development PKI in `work/pki` (`mcimctl pki init`); returns its directory.
pub fn pki_init(work: &std::path::Path) -> PathBuf {
    let pki = work.join("pki");
    let out = mcimctl(&["pki", "init", "--dir", pki.to_str().unwrap()]);
    assert!(out.status.success(), "{}", output_text(&out));
    pki
}

/// Whether `n` consecutive ports from `base` on 127.0.0.1 accept connections within 20 s.
pub fn listening(base: u16, n: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if (0..n).all(|i| TcpStream::connect(("127.0.0.1", base + i)).is_ok()) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The first of `n` consecutive free ports on 127.0.0.1.
pub fn free_ports(n: u16) -> u16 {
    // Below the kernel's ephemeral range: no outgoing connection on this machine (the tests
    // run many at once) takes a local port here, so a server restarted on its ports finds
    // them free.
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|p| p.parse::<u16>().ok())
        })
        .unwrap_or(32768);
    let (from, to) = (10_000u16, low.saturating_sub(n).max(10_001));
    loop {
        let p = from + (rand::random::<u16>() % (to - from));
        if (0..n).all(|i| TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            return p;
        }
    }
}

/// The environment variable naming a PostgreSQL server for the tests (`postgres://USER@HOST:PORT`,
/// a user that may create databases). `ci/test.sh` starts a throwaway cluster and sets it; then
/// [`Roles`] run on PostgreSQL (each on a database of its own) instead of SQLite.
pub const POSTGRES_ENV: &str = "MCIM_TEST_POSTGRES";

/// A PostgreSQL server for a test: the one [`POSTGRES_ENV`] names, else a private cluster
/// started here (`initdb` in a temporary directory, as the `postgres` user when root, on a free
/// port of 127.0.0.1), stopped when dropped. Without PostgreSQL installed, this panics with
/// what to install: a test that needs PostgreSQL never passes without it.
pub struct Postgres {
    /// `postgres://USER@127.0.0.1:PORT` (no database).
    pub server: String,
    /// A private cluster: its directory, the server's binaries, its port.
    cluster: Option<(tempfile::TempDir, PathBuf, u16)>,
    /// The private cluster syncs its writes to disk (`fsync`, full page writes), as a
    /// production server: for benchmarks beside SQLite. Tests run without.
    durable: bool,
    /// The private cluster speaks TLS only and admits clients by certificate.
    pub tls: Option<PgTls>,
}

/// The certificates of a PostgreSQL cluster that admits only TLS clients with a certificate
/// ([`Postgres::private_tls`]): PEM files in the cluster's directory.
#[derive(Debug, Clone)]
pub struct PgTls {
    /// The CA that issued the server's certificate (127.0.0.1, localhost) and the client's.
    pub ca: PathBuf,
    /// A CA that issued neither.
    pub other_ca: PathBuf,
    /// The client's certificate (its common name is the database user) and key.
    pub client_cert: PathBuf,
    /// The client's key.
    pub client_key: PathBuf,
    /// The server's certificate and key (it checks clients against [`PgTls::ca`]).
    pub server: (PathBuf, PathBuf),
}

impl PgTls {
    /// Writes into `dir` a CA, a certificate for the server at `server_names` (IP addresses
    /// or DNS names; the first is its common name) and a client certificate for `user`.
    pub fn make(dir: &Path, user: &str, server_names: &[&str]) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca = |name: &str, file: &str| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, name);
            let cert = p.self_signed(&key).unwrap();
            let path = dir.join(file);
            std::fs::write(&path, cert.pem()).unwrap();
            (path, Issuer::new(p, key))
        };
        let (ca_path, issuer) = ca("mcim test PostgreSQL CA", "pg-ca.pem");
        let (other_ca, _) = ca("another CA", "pg-other-ca.pem");
        let leaf = |sans: Vec<String>, cn: &str, file: &str| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(sans).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            let cert = p.signed_by(&key, &issuer).unwrap();
            let (c, k) = (
                dir.join(format!("{file}.pem")),
                dir.join(format!("{file}.key")),
            );
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
            (c, k)
        };
        let server = leaf(
            server_names.iter().map(|n| n.to_string()).collect(),
            server_names.first().copied().unwrap_or("localhost"),
            "pg-server",
        );
        let (client_cert, client_key) = leaf(Vec::new(), user, "pg-client");
        PgTls {
            ca: ca_path,
            other_ca,
            client_cert,
            client_key,
            server,
        }
    }

    /// The query string for a client that checks the server against `ca` and shows the
    /// client certificate.
    pub fn query(&self, ca: &Path) -> String {
        format!(
            "sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
            ca.display(),
            self.client_cert.display(),
            self.client_key.display()
        )
    }
}

impl Postgres {
    /// The server of [`POSTGRES_ENV`], or a private cluster.
    pub fn start() -> Self {
        if let Some(server) = std::env::var(POSTGRES_ENV).ok().filter(|s| !s.is_empty()) {
            return Postgres {
                server: server.trim_end_matches('/').to_string(),
                cluster: None,
                durable: false,
                tls: None,
            };
        }
        Self::private()
    }

    /// A private cluster, whatever the environment says.
    pub fn private() -> Self {
        Self::private_cluster(false, false)
    }

    /// A private cluster that syncs its commits to disk as a production server does
    /// (benchmarks beside SQLite, which does too).
    pub fn private_durable() -> Self {
        Self::private_cluster(true, false)
    }

    /// A private cluster that speaks TLS only (`hostssl` in its pg_hba.conf, nothing else on
    /// TCP) and admits a client only with a certificate of [`PgTls::ca`] naming the user
    /// (`cert` authentication): [`Postgres::tls`] holds the files. Its [`Postgres::server`]
    /// has no TLS parameters: add [`PgTls::query`] to a database URL.
    pub fn private_tls() -> Self {
        Self::private_cluster(false, true)
    }

    fn private_cluster(durable: bool, tls: bool) -> Self {
        let bin = postgres_bin();
        let dir = tempfile::tempdir().unwrap();
        let root = is_root();
        let user = if root { "postgres" } else { "" };
        if root {
            let ok = Command::new("chown")
                .args(["postgres:postgres", dir.path().to_str().unwrap()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the cluster directory");
        }
        let data = dir.path().join("data");
        let mut initdb = pg_as(&bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-E", "UTF8", "--no-sync"]);
        if root {
            initdb.args(["-U", "postgres"]);
        }
        let out = initdb.stderr(Stdio::piped()).output().unwrap();
        assert!(out.status.success(), "initdb: {}", output_text(&out));
        let who = if user.is_empty() {
            std::env::var("USER").unwrap_or_else(|_| "postgres".into())
        } else {
            user.to_string()
        };
        let tls = tls.then(|| {
            let files = PgTls::make(dir.path(), &who, &["127.0.0.1", "localhost"]);
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 cert\n",
            )
            .unwrap();
            if root {
                let ok = Command::new("chown")
                    .args(["-R", "postgres:postgres", dir.path().to_str().unwrap()])
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "chown of the cluster's certificates");
            }
            files
        });
        let mut pg = Postgres {
            server: String::new(),
            cluster: Some((dir, bin, 0)),
            durable,
            tls,
        };
        for _ in 0..5 {
            let port = free_ports(1);
            if let Some(c) = pg.cluster.as_mut() {
                c.2 = port;
            }
            if pg.pg_ctl_start() {
                pg.server = format!("postgres://{who}@127.0.0.1:{port}");
                return pg;
            }
        }
        let log = pg
            .cluster
            .as_ref()
            .map(|(d, _, _)| std::fs::read_to_string(d.path().join("log")).unwrap_or_default());
        panic!("PostgreSQL did not start: {log:?}");
    }

    /// `pg_ctl start` of the private cluster on its port; whether it started.
    fn pg_ctl_start(&self) -> bool {
        let Some((dir, bin, port)) = &self.cluster else {
            return false;
        };
        pg_as(&bin.join("pg_ctl"))
            .arg("-D")
            .arg(dir.path().join("data"))
            .arg("-l")
            .arg(dir.path().join("log"))
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 {} {}",
                dir.path().display(),
                if self.durable {
                    "-c fsync=on -c full_page_writes=on -c synchronous_commit=on"
                } else {
                    "-c fsync=off -c full_page_writes=off"
                },
                self.tls.as_ref().map_or(String::new(), |t| format!(
                    "-c ssl=on -c ssl_cert_file={} -c ssl_key_file={} -c ssl_ca_file={}",
                    t.server.0.display(),
                    t.server.1.display(),
                    t.ca.display()
                ))
            ))
            .args(["-w", "-t", "20", "start"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Stops the private cluster (`pg_ctl stop -m immediate`: connections cut, as in a crash
    /// of the server); [`Postgres::start_again`] starts it on the same port and data.
    pub fn stop(&self) {
        if let Some((dir, bin, _)) = &self.cluster {
            let _ = pg_as(&bin.join("pg_ctl"))
                .arg("-D")
                .arg(dir.path().join("data"))
                .args(["-m", "immediate", "stop"])
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Starts a stopped private cluster again.
    pub fn start_again(&self) {
        assert!(
            self.cluster.is_some(),
            "only a private cluster stops and starts"
        );
        assert!(self.pg_ctl_start(), "PostgreSQL did not start again");
    }

    /// The URL of a database on this server with a fresh name (the roles create it).
    pub fn fresh_database(&self) -> String {
        fresh_database_on(&self.server)
    }
}

/// The newest installed PostgreSQL server's binaries (`/usr/lib/postgresql/*/bin`).
pub fn postgres_bin() -> PathBuf {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| {
            let mut v: Vec<PathBuf> = d
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .filter(|b| b.join("initdb").exists())
                .collect();
            v.sort();
            v.pop()
        })
        .unwrap_or_else(|| {
            panic!(
                "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): \
                 apt-get install postgresql (ci/install-deps.sh does), or set {POSTGRES_ENV}"
            )
        })
}

/// A database with a fresh name on `server` (`postgres://USER@HOST:PORT`).
fn fresh_database_on(server: &str) -> String {
    format!(
        "{}/mcim_t_{:016x}",
        server.trim_end_matches('/'),
        rand::random::<u64>()
    )
}

/// A fresh database on the server [`POSTGRES_ENV`] names, when it names one.
pub fn postgres_from_env() -> Option<String> {
    std::env::var(POSTGRES_ENV)
        .ok()
        .filter(|s| !s.is_empty())
        .map(|server| fresh_database_on(&server))
}

/// Whether this process runs as root (the tests start PostgreSQL as `postgres` then).
/// Whether this process runs as root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A server program of PostgreSQL, run as the `postgres` user when this process is root.
fn pg_as(program: &Path) -> Command {
    let mut c = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    c.stdout(Stdio::null());
    c
}

/// `mcim-roles all` (every role in one process, one SQLite file; the second SHO on its own
/// beside it) on six consecutive ports of 127.0.0.1 (supplier, RO, VNO, SHO, PVA, second SHO),
/// with a fresh development PKI from `mcimctl pki init`; killed when dropped.
pub struct Roles {
    child: Option<Child>,
    /// The first port (the supplier's).
    pub base: u16,
    /// The PKI directory.
    pub pki: PathBuf,
    /// The SQLite file (when on SQLite).
    pub db: PathBuf,
    /// The database's URL: `sqlite://` [`Roles::db`], or a PostgreSQL database of its own when
    /// [`POSTGRES_ENV`] is set.
    pub db_url: String,
    /// More arguments for `mcim-roles all`.
    args: Vec<String>,
}

/// Ports `mcim-roles all` listens on.
pub const ROLE_PORTS: u16 = 6;

impl Roles {
    /// Starts the roles in `work` and waits until every port listens.
    pub fn start(work: &std::path::Path) -> Self {
        Self::start_with(work, &[])
    }

    /// [`Roles::start`] with more arguments for `mcim-roles all` (`--max-concurrent-calls 1`).
    pub fn start_with(work: &std::path::Path, args: &[&str]) -> Self {
        let db = work.join("roles.db");
        let url = postgres_from_env().unwrap_or_else(|| format!("sqlite://{}", db.display()));
        Self::start_on(work, &url, args)
    }

    /// [`Roles::start_with`] on the database at `url` (`postgres://...`: created by the roles).
    pub fn start_on(work: &std::path::Path, url: &str, args: &[&str]) -> Self {
        let pki = pki_init(work);
        let mut r = Roles {
            child: None,
            base: 0,
            pki,
            db: work.join("roles.db"),
            db_url: url.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        // Ports found free can be taken by another test (or an outgoing connection's
        // ephemeral port) before mcim-roles binds them: then it exits, and we try new ones.
        for _attempt in 0..5 {
            // The roles' ports, then their metrics listener.
            r.base = free_ports(ROLE_PORTS + 1);
            if r.launch() {
                return r;
            }
        }
        panic!("mcim-roles all did not listen");
    }

    /// `n` replicas of `mcim-roles all` on one PKI and the database at `url`, each told the
    /// others' ports (`--replica-base-ports`), so that the addresses they give each other list
    /// every replica.
    pub fn start_replicas(work: &std::path::Path, url: &str, n: usize) -> Vec<Roles> {
        let pki = pki_init(work);
        let mut bases: Vec<u16> = Vec::new();
        while bases.len() < n {
            let b = free_ports(ROLE_PORTS + 1);
            if bases.iter().all(|o| b.abs_diff(*o) > ROLE_PORTS + 1) {
                bases.push(b);
            }
        }
        let list = bases
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(",");
        bases
            .into_iter()
            .map(|base| {
                let mut r = Roles {
                    child: None,
                    base,
                    pki: pki.clone(),
                    db: work.join("roles.db"),
                    db_url: url.to_string(),
                    args: vec!["--replica-base-ports".into(), list.clone()],
                };
                assert!(r.launch(), "a replica did not listen on {base}");
                r
            })
            .collect()
    }

    /// Another `mcim-roles all` process on the same PKI and database, on ports of its own
    /// (on SQLite both wait for one write lock; on PostgreSQL they are replicas).
    pub fn beside(other: &Roles) -> Self {
        let mut r = Roles {
            child: None,
            base: 0,
            pki: other.pki.clone(),
            db: other.db.clone(),
            db_url: other.db_url.clone(),
            args: other.args.clone(),
        };
        for _attempt in 0..5 {
            r.base = free_ports(ROLE_PORTS + 1);
            if r.launch() {
                return r;
            }
        }
        panic!("a second mcim-roles all did not listen");
    }

    /// Starts the process on `self.base`; false when it exited before listening.
    fn launch(&mut self) -> bool {
        let child = Command::new(workspace_bin("mcim-roles"))
            .args(["all", "--pki", self.pki.to_str().unwrap(), "--db"])
            .arg(&self.db_url)
            .args(["--base-port", &self.base.to_string()])
            .args([
                "--metrics-listen",
                &format!("127.0.0.1:{}", self.base + ROLE_PORTS),
            ])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if (0..ROLE_PORTS).all(|i| TcpStream::connect(("127.0.0.1", self.base + i)).is_ok()) {
                return true;
            }
            if let Some(c) = self.child.as_mut()
                && c.try_wait().ok().flatten().is_some()
            {
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "mcim-roles all did not listen on {}..{}",
            self.base,
            self.base + ROLE_PORTS - 1
        );
    }

    /// Kills the process and starts it again on the same PKI, database and ports.
    pub fn restart(&mut self) {
        self.kill();
        assert!(self.launch(), "mcim-roles all did not start again");
    }

    /// Kills the process (SIGKILL) and waits for it; [`Roles::restart`] starts it again.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The roles' Prometheus metrics (`GET /metrics` on the port after theirs).
    pub fn metrics(&self) -> String {
        scrape(&format!("127.0.0.1:{}", self.base + ROLE_PORTS))
    }

    /// The address of a role ("supplier", "ro", "vno", "sho", "pva"), `https://127.0.0.1:port`.
    pub fn url(&self, role: &str) -> String {
        format!("https://127.0.0.1:{}", self.port(role))
    }

    /// A `tred` on `tcti` configured to provision against these roles (their CA, the RO, the
    /// VNO).
    pub fn tred(&self, tcti: &str) -> Tred {
        self.tred_with(tcti, &[])
    }

    /// [`Roles::tred`] with more environment (a PKCS#11 token's `MCIM_BACKEND`, ...).
    pub fn tred_with(&self, tcti: &str, extra: &[(&str, &str)]) -> Tred {
        let ca = self.pki.join("ca.pem");
        let sho_ca = self.pki.join("ca-sho.pem");
        let (ro, vno) = (self.url("ro"), self.url("vno"));
        let metrics = format!("127.0.0.1:{}", free_ports(1));
        let mut env = vec![
            ("MCIM_METRICS_LISTEN", metrics.as_str()),
            ("MCIM_CA_FILE", ca.to_str().unwrap()),
            ("MCIM_SHO_CA_FILE", sho_ca.to_str().unwrap()),
            ("MCIM_CA_DIR", self.pki.to_str().unwrap()),
            ("MCIM_RO_URL", ro.as_str()),
            ("MCIM_VNO_URL", vno.as_str()),
        ];
        env.extend_from_slice(extra);
        Tred::start_with(tcti, &env)
    }

    /// The port of a role ("supplier", "ro", "vno", "sho", "pva", "sho2": the second SHO).
    pub fn port(&self, role: &str) -> u16 {
        let i = ["supplier", "ro", "vno", "sho", "pva", "sho2"]
            .iter()
            .position(|r| *r == role)
            .unwrap_or_else(|| panic!("no role {role}"));
        self.base + i as u16
    }

    /// A mutual-TLS channel to `peer` with `me`'s development certificate.
    pub async fn channel(
        &self,
        me: mcim_roles::authz::Role,
        peer: mcim_roles::authz::Role,
    ) -> tonic::transport::Channel {
        let tls = mcim_roles::tls::client_tls(&self.pki, me, peer).unwrap();
        self.connect(peer, tls).await
    }

    /// A mutual-TLS channel to `peer` as a software device (a certificate for `pcid` under
    /// the supplier root, no TRE: for tests of the roles' rules, not of the TRE).
    pub async fn device_channel(
        &self,
        pcid: &str,
        peer: mcim_roles::authz::Role,
    ) -> tonic::transport::Channel {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let (cert, key) = mcim_pki::dev::issue_software_device(&self.pki, pcid).unwrap();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(
                std::fs::read(self.pki.join("ca.pem")).unwrap(),
            ))
            .identity(Identity::from_pem(cert, key))
            .domain_name(format!("{}.mcim.local", peer.as_str()));
        self.connect(peer, tls).await
    }

    /// A device `pcid` with software keys (PKCS#11-shaped public material; not a TRE: for tests
    /// of the roles' rules), certified by the supplier.
    pub async fn software_device(&self, pcid: &str, device_id: &str) -> SoftwareDevice {
        use mcim_proto::mcim::common::v1 as common;
        use mcim_proto::mcim::supplier::v1 as sup;
        use mcim_roles::authz::Role;
        use p256::elliptic_curve::Generate;
        use p256::pkcs8::EncodePublicKey;
        let key = || p256::ecdsa::SigningKey::generate_from_rng(&mut rand::rng());
        let spki = |k: &p256::ecdsa::SigningKey| {
            p256::ecdsa::VerifyingKey::from(k)
                .to_public_key_der()
                .unwrap()
                .as_bytes()
                .to_vec()
        };
        let identity = common::DeviceIdentity {
            device_id: device_id.into(),
            pcid: pcid.into(),
            model: "sw".into(),
        };
        let tls_key = key();
        let storage = spki(&key());
        // (The TLS key signs what the TRE signs: ownership proofs, discard notices.)
        let cert = sup::supplier_service_client::SupplierServiceClient::new(
            self.channel(Role::Supplier, Role::Supplier).await,
        )
        .certify_device(sup::CertifyDeviceRequest {
            identity: Some(identity.clone()),
            tre_kind: common::TreKind::Pkcs11 as i32,
            storage_public: storage.clone(),
            attestation_public: spki(&key()),
            tls_public_spki: spki(&tls_key),
        })
        .await
        .unwrap()
        .into_inner();
        SoftwareDevice {
            identity,
            storage_public: storage,
            platform_credential: cert.platform_credential,
            tls_certificate: cert.tls_certificate,
            tls_key,
        }
    }

    /// [`Roles::software_device`], contracted at the SHO by the lab's subscriber (in its
    /// certificate's name, with the device's proof of ownership). Returns its identity.
    pub async fn contract_software_device(
        &self,
        pcid: &str,
        device_id: &str,
    ) -> mcim_proto::mcim::common::v1::DeviceIdentity {
        use mcim_proto::mcim::sho::v1 as sho;
        use mcim_roles::authz::Role;
        let dev = self.software_device(pcid, device_id).await;
        let proof = dev.proof("subscriber.mcim.local", "sho.mcim.local");
        sho::sho_service_client::ShoServiceClient::new(
            self.channel(Role::Subscriber, Role::Sho).await,
        )
        .create_subscription(dev.subscription(Some(proof)))
        .await
        .unwrap();
        dev.identity
    }

    /// A mutual-TLS channel to `peer` as another party of `role` named `name` (a second SHO,
    /// another subscriber), certified by the CA that issues `role`'s certificates.
    pub async fn party_channel(
        &self,
        role: mcim_roles::authz::Role,
        name: &str,
        peer: mcim_roles::authz::Role,
    ) -> tonic::transport::Channel {
        let (cert, key) = mcim_pki::dev::issue_party(&self.pki, role, name).unwrap();
        self.channel_as(cert, key, peer).await
    }

    /// A mutual-TLS channel to `peer` presenting `cert` / `key` (PEM), whoever issued them.
    pub async fn channel_as(
        &self,
        cert: String,
        key: String,
        peer: mcim_roles::authz::Role,
    ) -> tonic::transport::Channel {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(
                mcim_pki::dev::ca_pem(&self.pki).unwrap(),
            ))
            .identity(Identity::from_pem(cert, key))
            .domain_name(mcim_pki::party::server_name(peer));
        self.connect(peer, tls).await
    }

    async fn connect(
        &self,
        peer: mcim_roles::authz::Role,
        tls: tonic::transport::ClientTlsConfig,
    ) -> tonic::transport::Channel {
        self.connect_to(self.port(peer.as_str()), tls).await
    }

    /// A mutual-TLS channel to the second SHO with `me`'s development certificate.
    pub async fn sho2_channel(&self, me: mcim_roles::authz::Role) -> tonic::transport::Channel {
        let tls = mcim_roles::tls::client_tls(&self.pki, me, mcim_roles::authz::Role::Sho).unwrap();
        self.connect_to(self.port("sho2"), tls).await
    }

    async fn connect_to(
        &self,
        port: u16,
        tls: tonic::transport::ClientTlsConfig,
    ) -> tonic::transport::Channel {
        self.try_connect_to(port, tls).await.unwrap()
    }

    /// A mutual-TLS channel to the roles' `port` with `tls`, or the transport's error (for
    /// tests of connections the roles refuse).
    pub async fn try_connect_to(
        &self,
        port: u16,
        tls: tonic::transport::ClientTlsConfig,
    ) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
    }
}

impl Drop for Roles {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Roles {
    /// Everything in the roles' database, table by table (each row quoted, in key order): two
    /// equal snapshots mean nothing was changed in between.
    pub async fn snapshot(&self) -> std::collections::BTreeMap<String, String> {
        if self.db_url.starts_with("postgres") {
            pg_dump(&self.db_url).await
        } else {
            db_dump(&self.db).await
        }
    }

    /// The database's name as the roles label it in their metrics: the SQLite file's name or
    /// the PostgreSQL database's (never the URL).
    pub fn db_name(&self) -> String {
        self.db_url
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// [`Roles::snapshot`] of the second SHO's database (`roles-sho2.db` beside the roles',
    /// or the PostgreSQL database named like theirs with `-sho2`).
    pub async fn sho2_snapshot(&self) -> std::collections::BTreeMap<String, String> {
        if self.db_url.starts_with("postgres") {
            pg_dump(&format!("{}-sho2", self.db_url)).await
        } else {
            db_dump(&self.db.with_file_name("roles-sho2.db")).await
        }
    }
}

/// Every row of every table of the SQLite file `db`, one string per table (SQL literals:
/// blobs as X'..' hex), read-only.
pub async fn db_dump(db: &Path) -> std::collections::BTreeMap<String, String> {
    {
        use sqlx::sqlite::SqliteConnectOptions;
        let opts = SqliteConnectOptions::new().filename(db).read_only(true);
        let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
        let tables: Vec<(String,)> = sqlx::query_as(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
             ORDER BY name",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let mut out = std::collections::BTreeMap::new();
        for (t,) in tables {
            let cols: Vec<(String,)> = sqlx::query_as("SELECT name FROM pragma_table_info(?)")
                .bind(&t)
                .fetch_all(&pool)
                .await
                .unwrap();
            let row = cols
                .iter()
                .map(|(c,)| format!("quote(\"{c}\")"))
                .collect::<Vec<_>>()
                .join(" || ',' || ");
            // Table and column names come from the database itself.
            let all: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT group_concat(r, ';') FROM (SELECT {row} AS r FROM \"{t}\" ORDER BY 1)"
            )))
            .fetch_one(&pool)
            .await
            .unwrap();
            out.insert(t, all.unwrap_or_default());
        }
        pool.close().await;
        out
    }
}

/// Every row of every table of the PostgreSQL database at `url`, one string per table (each
/// row as PostgreSQL's text form of the record, in order): the counterpart of [`db_dump`].
pub async fn pg_dump(url: &str) -> std::collections::BTreeMap<String, String> {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    let tables: Vec<(String,)> = sqlx::query_as(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY 1",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    let mut out = std::collections::BTreeMap::new();
    for (t,) in tables {
        // Table names come from the database itself.
        let all: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT string_agg(r, ';' ORDER BY r) FROM (SELECT t::text AS r FROM \"{t}\" t) x"
        )))
        .fetch_one(&mut c)
        .await
        .unwrap();
        out.insert(t, all.unwrap_or_default());
    }
    let _ = c.close().await;
    out
}

/// Where a roles' database is, for the helpers that read or write it behind the roles' back:
/// an SQLite file's path, or [`Roles`] (SQLite or PostgreSQL, as they run).
pub trait DbAt {
    /// The database's URL.
    fn db_url(&self) -> String;
}

impl<T: DbAt + ?Sized> DbAt for &T {
    fn db_url(&self) -> String {
        (**self).db_url()
    }
}

impl DbAt for Path {
    fn db_url(&self) -> String {
        format!("sqlite://{}", self.display())
    }
}

impl DbAt for PathBuf {
    fn db_url(&self) -> String {
        self.as_path().db_url()
    }
}

impl DbAt for Roles {
    fn db_url(&self) -> String {
        self.db_url.clone()
    }
}

/// A database by its URL (`sqlite://PATH` or `postgres://...`).
#[derive(Clone, Debug)]
pub struct DbUrl(pub String);

impl DbAt for DbUrl {
    fn db_url(&self) -> String {
        self.0.clone()
    }
}

/// The file in a lab's directory naming the PostgreSQL database [`lab_run`] gave it.
const LAB_DB_URL_FILE: &str = "test-db-url";

/// The roles' databases of a lab run in `dir` (`mcimctl lab run --dir`): the SQLite files
/// there (`roles.db`, the second SHO's `roles-sho2.db`), or, when [`lab_run`] ran the lab on
/// PostgreSQL, its database and the second SHO's beside it (`NAME-sho2`).
#[derive(Clone, Debug)]
pub struct LabDbs {
    /// The roles' database.
    pub roles: DbUrl,
    /// The second SHO's.
    pub sho2: DbUrl,
}

impl LabDbs {
    /// The databases of the lab in `dir`.
    pub fn of(dir: &Path) -> Self {
        match std::fs::read_to_string(dir.join(LAB_DB_URL_FILE)) {
            Ok(url) => Self {
                sho2: DbUrl(format!("{url}-sho2")),
                roles: DbUrl(url),
            },
            Err(_) => Self {
                roles: DbUrl(dir.join("roles.db").db_url()),
                sho2: DbUrl(dir.join("roles-sho2.db").db_url()),
            },
        }
    }
}

/// Every row of every table of `db`, one string per table ([`db_dump`] on SQLite,
/// [`pg_dump`] on PostgreSQL: blobs as hex, upper-case X'..' there, `\x..` here).
pub async fn dump(db: &(impl DbAt + ?Sized)) -> std::collections::BTreeMap<String, String> {
    let url = db.db_url();
    if url.starts_with("postgres") {
        pg_dump(&url).await
    } else {
        let path = url.trim_start_matches("sqlite://");
        db_dump(Path::new(path.split('?').next().unwrap_or(path))).await
    }
}

/// A connection to `db` through sqlx's `Any` driver (as the roles connect).
async fn any_connection(url: &str) -> sqlx::AnyConnection {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    sqlx::AnyConnection::connect(url).await.unwrap()
}

/// A connection that writes to the database `db` while the roles run (a test standing in for
/// a malicious or forgetful operator); on SQLite it waits for their write lock (5 s busy
/// timeout). Statements take `$1`-style parameters, as the roles' own.
pub async fn db_writer(db: &(impl DbAt + ?Sized)) -> sqlx::AnyConnection {
    any_connection(&db.db_url()).await
}

/// The rows `sql` selects from the database `db`, every column as text: text as it is,
/// integers in decimal, bytes in upper-case hex (as SQLite's `hex()`), NULL as `NULL`.
pub async fn db_rows(db: &(impl DbAt + ?Sized), sql: &str) -> Vec<Vec<String>> {
    use sqlx::{Connection, Row, ValueRef};
    let mut c = any_connection(&db.db_url()).await;
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_all(&mut c)
        .await
        .unwrap();
    let out = rows
        .iter()
        .map(|r| {
            (0..r.len())
                .map(|i| {
                    if r.try_get_raw(i).unwrap().is_null() {
                        "NULL".to_string()
                    } else if let Ok(t) = r.try_get::<String, _>(i) {
                        t
                    } else if let Ok(n) = r.try_get::<i64, _>(i) {
                        n.to_string()
                    } else {
                        hex_upper(&r.try_get::<Vec<u8>, _>(i).unwrap())
                    }
                })
                .collect()
        })
        .collect();
    let _ = c.close().await;
    out
}

fn hex_upper(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// `mcimctl lab run --json ARGS`: whether it succeeded, its JSON report, its progress
/// (stderr).
/// With [`POSTGRES_ENV`] set (and no `--db` in `args`), the lab's roles run on a fresh
/// PostgreSQL database there.
pub fn lab_run(args: &[&str]) -> (bool, serde_json::Value, String) {
    let mut cmd = Command::new(workspace_bin("mcimctl"));
    cmd.args(["lab", "run", "--json"]).args(args);
    if let Some(db) = postgres_from_env()
        && !args.contains(&"--db")
    {
        // Where [`LabDbs::of`] finds it.
        if let Some(dir) = args
            .iter()
            .position(|a| *a == "--dir")
            .and_then(|i| args.get(i + 1))
        {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(Path::new(dir).join(LAB_DB_URL_FILE), &db).unwrap();
        }
        cmd.arg("--db").arg(db);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}); stderr:\n{stderr}"));
    (out.status.success(), report, stderr)
}

/// A device with software keys, certified by the supplier (not a TRE: for tests of the roles'
/// rules).
pub struct SoftwareDevice {
    /// Its identity.
    pub identity: mcim_proto::mcim::common::v1::DeviceIdentity,
    /// Its "storage key" (an SPKI the SHO can wrap to).
    pub storage_public: Vec<u8>,
    /// The supplier's platform credential.
    pub platform_credential: Vec<Vec<u8>>,
    /// The supplier's TLS certificate chain.
    pub tls_certificate: Vec<Vec<u8>>,
    /// The TLS key (in software here; in a TRE on a real device).
    pub tls_key: p256::ecdsa::SigningKey,
}

impl SoftwareDevice {
    /// Its proof of ownership for `subscriber` at `sho`, signed as `tred` signs it.
    pub fn proof(
        &self,
        subscriber: &str,
        sho: &str,
    ) -> mcim_proto::mcim::common::v1::OwnershipProof {
        use p256::ecdsa::signature::Signer;
        let mut nonce = [0u8; 16];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut nonce);
        let payload = mcim_pki::ownership::Statement {
            pcid: self.identity.pcid.clone(),
            subscriber: subscriber.into(),
            sho: sho.into(),
            nonce: nonce.iter().map(|b| format!("{b:02x}")).collect(),
            issued_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        }
        .to_bytes()
        .unwrap();
        let sig: p256::ecdsa::Signature = self.tls_key.sign(&payload);
        mcim_proto::mcim::common::v1::OwnershipProof {
            payload,
            signature: sig.to_der().as_bytes().to_vec(),
            tls_certificate: self.tls_certificate.clone(),
        }
    }

    /// The SHO's CreateSubscription for this device in the caller's name, with `proof`.
    pub fn subscription(
        &self,
        proof: Option<mcim_proto::mcim::common::v1::OwnershipProof>,
    ) -> mcim_proto::mcim::sho::v1::CreateSubscriptionRequest {
        mcim_proto::mcim::sho::v1::CreateSubscriptionRequest {
            subscriber: String::new(),
            device: Some(self.identity.clone()),
            tre_kind: mcim_proto::mcim::common::v1::TreKind::Pkcs11 as i32,
            storage_public: self.storage_public.clone(),
            platform_credential: self.platform_credential.clone(),
            require_aka_in_tre: false,
            ownership_proof: proof,
        }
    }
}

/// A device's TRE in a test: a swtpm, or a SoftHSM2 token of the test's own.
pub enum TestTre {
    /// Kept running for the test's life.
    Tpm {
        /// The TPM.
        _tpm: Swtpm,
    },
    /// The token.
    Token(SoftHsm),
}

/// A device supplied, contracted at the first SHO and provisioned from the command line
/// (`mcimctl supplier supply`, `device parameters`, `subscriber register`, `device
/// provision`), against its own `mcim-roles all`, TRE and `tred`.
pub struct CliDevice {
    /// The test's folder (the roles' databases are `roles.db` and `roles-sho2.db` in it).
    pub work: tempfile::TempDir,
    /// The roles.
    pub roles: Roles,
    /// The TRE.
    pub tre: TestTre,
    /// The daemon.
    pub tred: Tred,
    /// The device's PCID.
    pub pcid: String,
    /// The IMSI of the MCIM the first SHO provisioned.
    pub imsi: String,
}

/// Runs `mcimctl` and returns its output; panics when it fails.
pub fn mcimctl_ok(args: &[&str]) -> String {
    let out = mcimctl(args);
    assert!(out.status.success(), "{args:?}: {}", output_text(&out));
    output_text(&out)
}

impl CliDevice {
    /// Supplies (CCIF mode 2, with `supply_args` added), contracts at the first SHO and
    /// provisions over `access` ("3gpp" or "non-3gpp") the device `pcid`, on a token when
    /// `token`, else on a swtpm.
    pub fn provisioned(token: bool, pcid: &str, supply_args: &[&str], access: &str) -> Self {
        let work = tempfile::tempdir().unwrap();
        let roles = Roles::start(work.path());
        let (tre, tred) = if token {
            let hsm = SoftHsm::new();
            let conf = hsm.conf();
            let tred = roles.tred_with(
                "unused",
                &[
                    ("MCIM_BACKEND", "pkcs11"),
                    ("SOFTHSM2_CONF", conf.to_str().unwrap()),
                    ("MCIM_PKCS11_MODULE", SOFTHSM2_MODULE),
                    ("MCIM_PKCS11_TOKEN", SOFTHSM2_LABEL),
                    ("MCIM_PKCS11_PIN", SOFTHSM2_PIN),
                ],
            );
            (TestTre::Token(hsm), tred)
        } else {
            let tpm = Swtpm::start();
            let tred = roles.tred(&tpm.tcti());
            (TestTre::Tpm { _tpm: tpm }, tred)
        };
        let mut d = CliDevice {
            work,
            roles,
            tre,
            tred,
            pcid: pcid.to_string(),
            imsi: String::new(),
        };
        let socket = d.socket();
        supply_device(&d.roles, &socket, pcid, supply_args);
        d.imsi = d.contract("sho");
        let provisioned = mcimctl_ok(&[
            "device",
            "--socket",
            &socket,
            "provision",
            "--access",
            access,
        ]);
        assert!(!provisioned.contains("FAILED"), "{provisioned}");
        d
    }

    /// The daemon's socket.
    pub fn socket(&self) -> String {
        self.tred.socket().to_str().unwrap().to_string()
    }

    /// The subscriber contracts the device at the SHO `sho` ("sho" or "sho2") with a fresh
    /// proof of ownership for it; returns the IMSI the SHO reserved.
    pub fn contract(&self, sho: &str) -> String {
        contract_device(&self.roles, self.work.path(), &self.socket(), sho)
    }

    /// The device's MCIMs (sorted by id) and its audit log's length, from its local API.
    pub async fn registry(&self) -> (Vec<mcim_proto::mcim::tre::v1::Mcim>, usize) {
        use mcim_proto::mcim::tre::v1 as tre;
        let mut c = self.tred.client().await;
        let mut mcims = c
            .list_mcims(tre::ListMcimsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .mcims;
        mcims.sort_by(|a, b| a.mcim_id.cmp(&b.mcim_id));
        let audit = c
            .get_audit_log(tre::GetAuditLogRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries
            .len();
        (mcims, audit)
    }
}

/// A private pcscd with vsmartcard's vpcd driver (`mcimctl lab pcscd`: its own mount
/// namespace, so that many run at once and the machine's pcscd is left alone), vpcd waiting
/// for the virtual ICC on `port` and `port + 1`; killed when dropped.
pub struct Pcscd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// vpcd's port for the virtual ICC (`usim_vpcd`).
    pub port: u16,
}

impl Pcscd {
    /// Starts one and waits until it serves PC/SC clients and vpcd listens.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_ports(2);
        let log = std::fs::File::create(dir.path().join("pcscd.log")).unwrap();
        let child = Command::new(workspace_bin("mcimctl"))
            .args(["lab", "pcscd", "--dir"])
            .arg(dir.path().join("pcscd"))
            .args(["--port", &port.to_string()])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Pcscd {
            child: Some(child),
            dir,
            port,
        };
        assert!(
            listening(port, 2),
            "pcscd with vpcd did not start (pcscd, vsmartcard-vpcd: ci/install-deps.sh): {}",
            p.log()
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !p.socket().exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    /// Its PC/SC socket (`PCSCLITE_CSOCK_NAME`).
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("pcscd").join("run").join("pcscd.comm")
    }

    /// vpcd's address for `tred` (`MCIM_USIM_VPCD`).
    pub fn vpcd(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A PC/SC client (`program` and `args`) of this pcscd.
    pub fn client(&self, program: &str, args: &[&str]) -> std::process::Output {
        Command::new(program)
            .args(args)
            .env("PCSCLITE_CSOCK_NAME", self.socket())
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    }

    /// What pcscd printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pcscd.log")).unwrap_or_default()
    }
}

impl Drop for Pcscd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The first `sh` block after the line `<!-- walked: NAME` in README.md: the README's
/// commands, for tests that run them as written.
pub fn readme_block(name: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let marker = format!("<!-- walked: {name}");
    let at = readme
        .find(&marker)
        .unwrap_or_else(|| panic!("README.md has no block marked {marker}"));
    let rest = &readme[at..];
    let start = rest.find("```sh\n").expect("a sh block after the marker") + "```sh\n".len();
    let end = rest[start..].find("```").expect("the block ends");
    rest[start..start + end].to_string()
}

/// The TRE of a [`usim_device`]: a swtpm or a SoftHSM2 token.
pub enum UsimTre<'a> {
    /// A software TPM.
    Tpm(&'a Swtpm),
    /// A SoftHSM2 token.
    Token(&'a SoftHsm),
}

impl<'a> From<&'a Swtpm> for UsimTre<'a> {
    fn from(t: &'a Swtpm) -> Self {
        UsimTre::Tpm(t)
    }
}

impl<'a> From<&'a SoftHsm> for UsimTre<'a> {
    fn from(h: &'a SoftHsm) -> Self {
        UsimTre::Token(h)
    }
}

/// TS 35.208 test set 1, and the IMSI the USIM tests and benches install it under.
pub mod test_set_1 {
    /// K.
    pub const K: &str = "465b5ce8b199b49faa5f0a2ee238a6bc";
    /// OPc.
    pub const OPC: &str = "cd63cb71954a9f4e48a5994e37a02baf";
    /// RAND.
    pub const RAND: &str = "23553cbe9637a89d218ae64dae47bf35";
    /// The IMSI.
    pub const IMSI: &str = "001010123456789";
}

/// A device for the USIM tests and benches: tred on `tpm` with one MCIM (test set 1, IMSI
/// [`test_set_1::IMSI`], PIN 1234, PUK 12345678) activated and chosen for connectivity, its
/// raw APDU socket at `work/usim.sock`, `env` over tred's environment. Tred and the socket.
pub fn usim_device<'a>(
    tre: impl Into<UsimTre<'a>>,
    work: &std::path::Path,
    env: &[(&str, &str)],
) -> (Tred, std::path::PathBuf) {
    let usim = work.join("usim.sock");
    let mut env = env.to_vec();
    env.push(("MCIM_USIM_SOCKET", usim.to_str().unwrap()));
    let conf;
    let tcti = match tre.into() {
        UsimTre::Tpm(tpm) => {
            // The device maker's lockout setting: the MCIM's own counters (3 PIN tries) decide.
            tpm.set_dictionary_attack(32, 600, 86400);
            tpm.tcti()
        }
        UsimTre::Token(hsm) => {
            conf = hsm.conf().to_str().unwrap().to_string();
            env.extend([
                ("MCIM_BACKEND", "pkcs11"),
                ("SOFTHSM2_CONF", conf.as_str()),
                ("MCIM_PKCS11_MODULE", SOFTHSM2_MODULE),
                ("MCIM_PKCS11_TOKEN", SOFTHSM2_LABEL),
                ("MCIM_PKCS11_PIN", SOFTHSM2_PIN),
            ]);
            "unused".to_string()
        }
    };
    let tred = Tred::start_with(&tcti, &env);
    use test_set_1::{IMSI, K, OPC};
    let socket = tred.socket();
    let s = socket.to_str().unwrap();
    let dir = |d: &str| work.join(d).to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let out = mcimctl(&[&["device", "--socket", s], args].concat());
        assert!(out.status.success(), "{args:?}: {}", output_text(&out));
    };
    let (keys, blobs) = (dir("keys"), dir("blobs"));
    run(&[
        "init",
        "--device-id",
        "SN-U",
        "--pcid",
        "001010000000001",
        "--model",
        "m",
        "--out-dir",
        &keys,
    ]);
    let out = mcimctl(&[
        "sho",
        "wrap",
        "--storage-public",
        &format!("{keys}/storage.pub"),
        "--k",
        K,
        "--opc",
        OPC,
        "--out-dir",
        &blobs,
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    run(&[
        "install",
        "--imsi",
        IMSI,
        "--sho",
        "sho.example",
        "--k-blob",
        &format!("{blobs}/k.blob"),
        "--opc-blob",
        &format!("{blobs}/opc.blob"),
        "--pin",
        "1234",
        "--puk",
        "12345678",
    ]);
    run(&["activate", IMSI]);
    run(&["connectivity", IMSI]);
    (tred, usim)
}

/// `GET /metrics` at `addr` (plain HTTP/1.1): the body, after checking the answer is 200.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("metrics at {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The supplier supplies the device behind tred's `socket` as `pcid` (CCIF mode 2, with
/// `supply_args` added) under `roles`.
pub fn supply_device(roles: &Roles, socket: &str, pcid: &str, supply_args: &[&str]) {
    let pki = roles.pki.to_str().unwrap().to_string();
    let (supplier, pva) = (roles.url("supplier"), roles.url("pva"));
    let mut supply: Vec<&str> = vec![
        "supplier",
        "supply",
        "--socket",
        socket,
        "--supplier-url",
        &supplier,
        "--pva-url",
        &pva,
        "--pki",
        &pki,
        "--device-id",
        "CLI-DEVICE",
        "--pcid",
        pcid,
        "--model",
        "cli-model",
    ];
    supply.extend_from_slice(supply_args);
    mcimctl_ok(&supply);
}

/// The subscriber contracts the device behind tred's `socket` at the SHO `sho` ("sho" or
/// "sho2") of `roles` with a fresh proof of ownership (files in `work`); the IMSI the SHO
/// reserved.
pub fn contract_device(roles: &Roles, work: &Path, socket: &str, sho: &str) -> String {
    let sho_id = if sho == "sho2" {
        "sho2.mcim.local"
    } else {
        "sho.mcim.local"
    };
    let params = work.join(format!("device-{sho}.json"));
    mcimctl_ok(&[
        "device",
        "--socket",
        socket,
        "parameters",
        "--out",
        params.to_str().unwrap(),
        "--for-subscriber",
        "subscriber.mcim.local",
        "--sho-id",
        sho_id,
    ]);
    let contracted = mcimctl_ok(&[
        "subscriber",
        "register",
        "--device",
        params.to_str().unwrap(),
        "--sho-url",
        &roles.url(sho),
        "--pki",
        roles.pki.to_str().unwrap(),
        "--json",
    ]);
    serde_json::from_str::<serde_json::Value>(contracted.lines().next().unwrap()).unwrap()["imsi"]
        .as_str()
        .unwrap()
        .to_string()
}
