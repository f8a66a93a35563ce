//! Test support: a private swtpm per test, with its own state directory (TOOLCHAIN.md).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running swtpm on 127.0.0.1, killed when dropped.
pub struct Swtpm {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub port: u16,
}

fn free_port_pair() -> u16 {
    loop {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = a.local_addr().unwrap().port();
        if p < 65534 && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

impl Swtpm {
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

/// One TS 35.208 MILENAGE test set (core/testdata), as the conformance suite uses it.
#[derive(serde::Deserialize)]
#[allow(dead_code)]
pub struct TestSet {
    pub set: u32,
    pub k: String,
    pub rand: String,
    pub sqn: String,
    pub amf: String,
    pub opc: String,
    pub f2: String,
    pub f3: String,
    pub f4: String,
}

/// TS 35.208 sets 1-20.
#[allow(dead_code)]
pub fn ts35208_sets() -> Vec<TestSet> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../core/testdata/milenage_ts35208.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Hex to a fixed-size array.
#[allow(dead_code)]
pub fn arr<const N: usize>(h: &str) -> [u8; N] {
    hex::decode(h).unwrap().try_into().unwrap()
}

/// How the SHO wraps K for a device: as a TRE key (AKA in the TRE) or as sealed data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KForm {
    Key,
    Sealed,
}

/// The SHO's side for a TPM: duplication blobs built in software by mcim-core.
pub fn tpm_wrap(
    public: &mcim_tre::tre::DevicePublic,
    k: &mcim_core::aka::K,
    opc: &mcim_core::aka::Opc,
    form: KForm,
) -> mcim_tre::tre::WrappedSecrets {
    use mcim_core::tpm::import::{ObjectPolicy, wrap_aes128_key, wrap_sealed_data};
    let parent = mcim_core::tpm::public::EccPublic::from_tpm2b(&public.storage_public).unwrap();
    let mut rng = rand::rng();
    let k_blob = match form {
        KForm::Key => wrap_aes128_key(&parent, k, ObjectPolicy::default(), &mut rng),
        KForm::Sealed => wrap_sealed_data(&parent, k.expose(), ObjectPolicy::default(), &mut rng),
    }
    .unwrap();
    let opc_blob =
        wrap_sealed_data(&parent, opc.expose(), ObjectPolicy::default(), &mut rng).unwrap();
    mcim_tre::tre::WrappedSecrets {
        k: k_blob.to_bytes().unwrap(),
        opc: opc_blob.to_bytes().unwrap(),
    }
}
