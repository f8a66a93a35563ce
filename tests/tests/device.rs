//! The device side end to end with the real binaries: swtpm, `tred`, and `mcimctl` as the
//! device owner, the SHO (wrapping K and OPc) and the PVA (verifying a quote).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

use mcim_e2e::{
    SOFTHSM2_LABEL, SOFTHSM2_MODULE, SOFTHSM2_PIN, SoftHsm, Swtpm, Tred, workspace_bin,
};

// TS 35.208 test set 1.
const K: &str = "465b5ce8b199b49faa5f0a2ee238a6bc";
const OPC: &str = "cd63cb71954a9f4e48a5994e37a02baf";
const RAND: &str = "23553cbe9637a89d218ae64dae47bf35";
// f2..f4 do not depend on SQN; a fresh USIM accepts only a small first SQN (Δ = 2^28).
const SQN: &str = "000000000021";
const AMF: &str = "b9b9";
const IMSI: &str = "001010000012345";

fn mcimctl(tred: &Tred, args: &[&str]) -> Output {
    Command::new(workspace_bin("mcimctl"))
        .env("MCIM_SOCKET", tred.socket())
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn json(o: Output) -> serde_json::Value {
    serde_json::from_str(ok(o).trim()).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn owner_sho_and_pva_drive_a_device_through_tred() {
    let tpm = Swtpm::start();
    let mut tred = Tred::start(&tpm.tcti());
    let work = tempfile::tempdir().unwrap();
    let keys = work.path().join("keys");
    let blobs = work.path().join("blobs");
    let quote = work.path().join("quote");

    // The socket is not world-accessible.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(tred.socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);

    // Before supply-time initialisation.
    let s = json(mcimctl(&tred, &["device", "--json", "status"]));
    assert_eq!(s["initialised"], false);
    assert_eq!(s["tre"], "tpm2");
    let before = mcimctl(&tred, &["device", "list"]);
    assert!(!before.status.success());
    assert!(String::from_utf8_lossy(&before.stderr).contains("mcimctl device init"));

    // The supplier initialises; a second init changes nothing.
    let init = [
        "device",
        "--json",
        "init",
        "--device-id",
        "SN-42",
        "--pcid",
        "001010000000042",
        "--model",
        "meter-v2",
        "--out-dir",
        p(&keys),
    ];
    assert_eq!(json(mcimctl(&tred, &init))["created"], true);
    assert_eq!(json(mcimctl(&tred, &init))["created"], false);
    // A successful supply logs no tss2-esys ERROR or WARNING (tred asks the TPM's handle list
    // before opening a handle that may be absent, instead of probing it).
    let log = tred.log();
    assert!(
        !log.contains("ERROR:esys") && !log.contains("WARNING:esys"),
        "{log}"
    );
    assert_eq!(
        json(mcimctl(&tred, &["device", "--json", "status"]))["pcid"],
        "001010000000042"
    );

    // The SHO wraps K and OPc for this device; the owner installs and activates.
    ok(mcimctl(
        &tred,
        &[
            "sho",
            "wrap",
            "--storage-public",
            p(&keys.join("storage.pub")),
            "--k",
            K,
            "--opc",
            OPC,
            "--out-dir",
            p(&blobs),
        ],
    ));
    let m = json(mcimctl(
        &tred,
        &[
            "device",
            "--json",
            "install",
            "--imsi",
            IMSI,
            "--sho",
            "sho.example",
            "--k-blob",
            p(&blobs.join("k.blob")),
            "--opc-blob",
            p(&blobs.join("opc.blob")),
            "--pin",
            "1234",
            "--puk",
            "24681357",
        ],
    ));
    assert_eq!(m["state"], "installed");
    assert_eq!(
        json(mcimctl(&tred, &["device", "--json", "activate", IMSI]))["state"],
        "activated"
    );

    // A wrong PIN is refused with the tries left; the right one selects.
    let wrong = mcimctl(&tred, &["device", "select", IMSI, "--pin", "9999"]);
    assert_eq!(wrong.status.code(), Some(1));
    let wrong_err = String::from_utf8_lossy(&wrong.stderr).to_string();
    assert!(wrong_err.contains("wrong PIN, 2 tries left"), "{wrong_err}");
    assert_eq!(
        json(mcimctl(
            &tred,
            &["device", "--json", "select", IMSI, "--pin", "1234"]
        ))["state"],
        "selected"
    );

    // AKA inside the TPM gives TS 35.208 set 1's RES, CK, IK.
    let net = json(mcimctl(
        &tred,
        &[
            "aka", "milenage", "--k", K, "--opc", OPC, "--rand", RAND, "--sqn", SQN, "--amf", AMF,
            "--json",
        ],
    ));
    let autn = net["autn"].as_str().unwrap();
    let r = json(mcimctl(
        &tred,
        &[
            "device", "--json", "aka", IMSI, "--rand", RAND, "--autn", autn,
        ],
    ));
    assert_eq!(r["result"], "success", "{r}");
    assert_eq!(r["res"], "a54211d5e3ba50bf");
    assert_eq!(r["ck"], "b40ba9a3c58b2a05bbf0d987b21bf8cb");
    assert_eq!(r["ik"], "f769bcd751044604127672711c6d3441");
    // Replayed: AUTS, which the network resolves to the SQN the device accepted.
    let r = json(mcimctl(
        &tred,
        &[
            "device", "--json", "aka", IMSI, "--rand", RAND, "--autn", autn,
        ],
    ));
    assert_eq!(r["result"], "sync_failure");
    let sqn_ms = json(mcimctl(
        &tred,
        &[
            "aka",
            "auts",
            "--k",
            K,
            "--opc",
            OPC,
            "--rand",
            RAND,
            "--auts",
            r["auts"].as_str().unwrap(),
            "--json",
        ],
    ));
    assert_eq!(sqn_ms["sqn_ms"], SQN);
    // A forged AUTN: unauthenticated, exit 1.
    let mut forged = autn.to_string();
    forged.replace_range(31..32, if autn.ends_with('0') { "1" } else { "0" });
    let f = mcimctl(
        &tred,
        &["device", "aka", IMSI, "--rand", RAND, "--autn", &forged],
    );
    assert_eq!(f.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&f.stderr).contains("MAC-A"));
    // Malformed input never reaches tred: clap says which argument, exit 2.
    let bad = mcimctl(
        &tred,
        &["device", "aka", IMSI, "--rand", "00", "--autn", autn],
    );
    assert_eq!(bad.status.code(), Some(2));

    // Lifecycle refusals are clear; nothing changes.
    let del = mcimctl(&tred, &["device", "delete", IMSI]);
    assert_eq!(del.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&del.stderr).contains("except Selected"));
    assert_eq!(
        json(mcimctl(&tred, &["device", "--json", "get", IMSI]))["state"],
        "selected"
    );

    // The PVA verifies a quote; a different nonce fails.
    let nonce = "00112233445566778899aabbccddeeff";
    ok(mcimctl(
        &tred,
        &[
            "device",
            "attest",
            "--nonce",
            nonce,
            "--pcrs",
            "0,1,2,7",
            "--out-dir",
            p(&quote),
        ],
    ));
    let v = ok(mcimctl(
        &tred,
        &[
            "pva",
            "verify-quote",
            "--ak",
            p(&keys.join("ak.pub")),
            "--quote-dir",
            p(&quote),
            "--nonce",
            nonce,
        ],
    ));
    assert!(v.contains("quote verified"), "{v}");
    let v = mcimctl(
        &tred,
        &[
            "pva",
            "verify-quote",
            "--ak",
            p(&keys.join("ak.pub")),
            "--quote-dir",
            p(&quote),
            "--nonce",
            "ff112233445566778899aabbccddeeff",
        ],
    );
    assert_eq!(v.status.code(), Some(1));

    // tpm2-tools verifies tred's default quote (PCRs 0-7, a full first digest list) from the
    // files `device attest` writes, with no help from mcim; a wrong nonce fails there too.
    let q8 = work.path().join("q8");
    ok(mcimctl(
        &tred,
        &["device", "attest", "--nonce", nonce, "--out-dir", p(&q8)],
    ));
    assert_eq!(
        std::fs::read_to_string(q8.join("pcrs.list")).unwrap(),
        "0,1,2,3,4,5,6,7"
    );
    let checkquote = |nonce: &str| {
        Command::new("tpm2_checkquote")
            .args(["-u", p(&keys.join("ak.pub")), "-m"])
            .arg(q8.join("quote.attest"))
            .arg("-s")
            .arg(q8.join("quote.sig"))
            .arg("-f")
            .arg(q8.join("pcrs.out"))
            .args(["-g", "sha256", "-q", nonce])
            .output()
            .unwrap()
    };
    let good = checkquote(nonce);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(
        !checkquote("ff112233445566778899aabbccddeeff")
            .status
            .success()
    );
    // A malformed nonce never reaches tred: clap names it, exit 2.
    let short = mcimctl(&tred, &["device", "attest", "--nonce", "123"]);
    assert_eq!(short.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&short.stderr).contains("--nonce"));
    // `audit show` into a reader that has gone (`| head`): no panic, exit 0.
    let mut child = Command::new(workspace_bin("mcimctl"))
        .env("MCIM_SOCKET", tred.socket())
        .args(["audit", "show"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let gone = child.wait_with_output().unwrap();
    assert!(
        gone.status.success(),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
    assert!(!String::from_utf8_lossy(&gone.stderr).contains("panicked"));
    let pcr24 = mcimctl(
        &tred,
        &["device", "attest", "--nonce", nonce, "--pcrs", "0,24"],
    );
    assert_eq!(pcr24.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&pcr24.stderr).contains("--pcrs"));

    // The SHO binds a second MCIM's OPc to the platform state the PVA just accepted; it
    // works on this platform (tre-daemon's conformance suite shows the refusal once a PCR moves).
    let imsi2 = "001010000067890";
    let blobs2 = work.path().join("blobs2");
    ok(mcimctl(
        &tred,
        &[
            "sho",
            "wrap",
            "--storage-public",
            p(&keys.join("storage.pub")),
            "--k",
            K,
            "--opc",
            OPC,
            "--bind-opc-to-quote",
            p(&quote),
            "--out-dir",
            p(&blobs2),
        ],
    ));
    ok(mcimctl(
        &tred,
        &[
            "device",
            "install",
            "--imsi",
            imsi2,
            "--sho",
            "sho2.example",
            "--k-blob",
            p(&blobs2.join("k.blob")),
            "--opc-blob",
            p(&blobs2.join("opc.blob")),
        ],
    ));
    ok(mcimctl(&tred, &["device", "activate", imsi2]));
    ok(mcimctl(&tred, &["device", "end-session", IMSI]));
    ok(mcimctl(&tred, &["device", "connectivity", imsi2]));
    ok(mcimctl(&tred, &["device", "select", imsi2]));
    let r = json(mcimctl(
        &tred,
        &[
            "device", "--json", "aka", imsi2, "--rand", RAND, "--autn", autn,
        ],
    ));
    assert_eq!(r["res"], "a54211d5e3ba50bf", "{r}");
    let refused = mcimctl(&tred, &["device", "select", IMSI, "--pin", "1234"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("end its session first"));
    ok(mcimctl(&tred, &["device", "end-session", imsi2]));
    let refused = mcimctl(&tred, &["device", "select", IMSI, "--pin", "1234"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("chosen for connectivity"));

    // The audit record verifies against the TRE and tells the story.
    assert!(ok(mcimctl(&tred, &["audit", "verify"])).contains("anchored in the TRE"));
    let audit = ok(mcimctl(&tred, &["audit", "show"]));
    for needle in [
        "registry created",
        "installed from SHO sho.example",
        "authenticated",
        "synchronisation failure",
        "MAC failure",
    ] {
        assert!(audit.contains(needle), "{needle} missing from\n{audit}");
    }

    // Graceful stop: exit 0, socket removed. The log names callers and holds no secret.
    assert!(tred.stop(), "tred exits cleanly on SIGTERM");
    assert!(!tred.socket().exists());
    let log = tred.log();
    assert!(log.contains("uid="), "peer credentials are logged:\n{log}");
    for secret in [K, OPC] {
        assert!(
            !log.to_lowercase().contains(secret),
            "the log holds a secret"
        );
        assert!(!log.contains(&secret.to_uppercase()));
    }
    for (path, bytes) in files(&tred.state_dir()) {
        for secret in [K, OPC] {
            let raw = hex::decode(secret).unwrap();
            assert!(!bytes.windows(16).any(|w| w == raw.as_slice()), "{path}");
            assert!(
                !String::from_utf8_lossy(&bytes)
                    .to_lowercase()
                    .contains(secret),
                "{path}"
            );
        }
    }
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(files(&e.path()));
        } else {
            out.push((
                e.path().display().to_string(),
                std::fs::read(e.path()).unwrap(),
            ));
        }
    }
    out
}

/// The shipped configuration parses, and the systemd unit starts tred with it.
#[test]
fn shipped_config_and_unit_agree() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tre-daemon");
    let toml = std::fs::read_to_string(root.join("tred.toml")).unwrap();
    // tred refuses unknown keys, so a typo in the shipped file would fail here.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tred.toml");
    // The groups the Debian package creates need not exist here.
    let local = toml
        .replace("device:/dev/tpmrm0", "swtpm:host=127.0.0.1,port=1")
        .replace("\nowner_group", "\n# owner_group")
        .replace("\nmodem_group", "\n# modem_group")
        .replace("\naudit_group", "\n# audit_group");
    std::fs::write(&cfg, local).unwrap();
    let out = Command::new(workspace_bin("tred"))
        .args(["--config", cfg.to_str().unwrap()])
        .env("MCIM_SOCKET", dir.path().join("s"))
        .env("MCIM_STATE_DIR", dir.path().join("st"))
        .output()
        .unwrap();
    // No TPM on port 1: tred must say so clearly, not complain about the file.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cannot open the TRE"), "{err}");
    // Every key the shipped file shows (set or commented out) is one `tred --config-keys`
    // lists, with its variable.
    let keys = Command::new(workspace_bin("tred"))
        .arg("--config-keys")
        .output()
        .unwrap();
    assert!(keys.status.success());
    let listed = String::from_utf8_lossy(&keys.stdout).to_string();
    for line in toml.lines() {
        let line = line.trim_start_matches('#').trim();
        let Some((key, _)) = line.split_once(" = ") else {
            continue;
        };
        if key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
        {
            let var = format!("MCIM_{}", key.to_ascii_uppercase());
            assert!(
                listed
                    .lines()
                    .any(|l| l.starts_with(&format!("{key} ")) && l.contains(&var)),
                "{key} ({var}) in {listed}"
            );
        }
    }
    let unit = std::fs::read_to_string(root.join("debian/tred.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/tred --config /etc/mcim/tred.toml"));
    assert!(unit.contains("KillSignal=SIGTERM"));
}

/// Tampering while tred is down puts the TRE in lockdown; the supplier's token, for this
/// device and counter, lifts it once; the MCIMs the forged header vouched for stay blocked.
#[test]
fn lockdown_and_the_suppliers_rehabilitation_token() {
    let tpm = Swtpm::start();
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("supplier.key");
    let keygen = Command::new(workspace_bin("mcimctl"))
        .args(["supplier", "keygen", "--out", p(&key)])
        .output()
        .unwrap();
    let public = ok(keygen).trim().to_string();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let mut tred = Tred::start_with(&tpm.tcti(), &[("MCIM_REHABILITATION_KEY", &public)]);
    let keys = work.path().join("keys");
    let blobs = work.path().join("blobs");
    ok(mcimctl(
        &tred,
        &[
            "device",
            "init",
            "--device-id",
            "SN-7",
            "--pcid",
            "001010000000007",
            "--model",
            "m",
            "--out-dir",
            p(&keys),
        ],
    ));
    ok(mcimctl(
        &tred,
        &[
            "sho",
            "wrap",
            "--storage-public",
            p(&keys.join("storage.pub")),
            "--k",
            K,
            "--opc",
            OPC,
            "--out-dir",
            p(&blobs),
        ],
    ));
    ok(mcimctl(
        &tred,
        &[
            "device",
            "install",
            "--imsi",
            IMSI,
            "--sho",
            "s",
            "--k-blob",
            p(&blobs.join("k.blob")),
            "--opc-blob",
            p(&blobs.join("opc.blob")),
        ],
    ));

    assert!(tred.stop());
    let header = tred.state_dir().join("header.json");
    let text = std::fs::read_to_string(&header).unwrap();
    std::fs::write(&header, text.replacen("\"format\": 1", "\"format\": 2", 1)).unwrap();
    tred.restart();

    let s = json(mcimctl(&tred, &["device", "--json", "status"]));
    assert_eq!(s["lockdown"], true, "{s}");
    let listed = mcimctl(&tred, &["device", "list"]);
    assert_eq!(listed.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&listed.stderr).contains("lockdown"));
    let attest = mcimctl(
        &tred,
        &[
            "device",
            "attest",
            "--nonce",
            "00112233445566778899aabbccddeeff",
        ],
    );
    assert_eq!(
        attest.status.code(),
        Some(1),
        "no evidence from a TRE in lockdown"
    );

    let counter = s["rehabilitation_counter"].as_u64().unwrap().to_string();
    let token = work.path().join("token.cose");
    let make = |c: &str| {
        Command::new(workspace_bin("mcimctl"))
            .args([
                "supplier",
                "rehab-token",
                "--key",
                p(&key),
                "--pcid",
                "001010000000007",
                "--counter",
                c,
                "--out",
                p(&token),
            ])
            .output()
            .unwrap()
    };
    ok(make("1"));
    let stale = mcimctl(&tred, &["device", "rehabilitate", "--token", p(&token)]);
    assert_eq!(stale.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&stale.stderr).contains("permission denied"));
    ok(make(&counter));
    assert!(
        ok(mcimctl(
            &tred,
            &["device", "rehabilitate", "--token", p(&token)]
        ))
        .contains("out of lockdown")
    );
    let m = json(mcimctl(&tred, &["device", "--json", "get", IMSI]));
    assert_eq!(
        (m["state"].as_str(), m["blocked_reason"].as_str()),
        (Some("blocked"), Some("tampered"))
    );
    let again = mcimctl(&tred, &["device", "rehabilitate", "--token", p(&token)]);
    assert_eq!(again.status.code(), Some(1), "a token works once");
    assert!(ok(mcimctl(&tred, &["audit", "verify"])).contains("anchored"));
    assert!(ok(mcimctl(&tred, &["audit", "show"])).contains("rehabilitated from lockdown"));
}

/// The README's main job: `mcimctl lab run` runs the whole device-side system and says so.
#[test]
fn lab_run_goes_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(workspace_bin("mcimctl"))
        .args(["lab", "run", "--dir", p(dir.path())])
        .output()
        .unwrap();
    let text = ok(out);
    // The seed's fourteen steps of 5.1.3.6.2, each as the device saw it.
    for n in 1..=14 {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("step {n:>2} ")) && l.contains(" ok")),
            "step {n} missing or not ok:\n{text}"
        );
    }
    assert!(
        text.contains("operational attach with IMSI 00102"),
        "{text}"
    );
    assert!(text.contains("anchored in the TRE"), "{text}");
    // tred stopped cleanly (SIGTERM) and removed its socket.
    let log = std::fs::read_to_string(dir.path().join("tred.log")).unwrap();
    assert!(log.contains("tred stopped"), "{log}");
    assert!(!dir.path().join("tred.sock").exists());
}

/// The same daemon and commands on a PKCS#11 token (SoftHSM2): only the configuration
/// changes. The SHO's `sho wrap` sees a token key and wraps with ECDH + AES-KWP.
#[test]
fn the_same_device_commands_on_a_pkcs11_token() {
    let hsm = SoftHsm::new();
    let conf = hsm.conf();
    let tred = Tred::start_with(
        "unused",
        &[
            ("MCIM_BACKEND", "pkcs11"),
            ("SOFTHSM2_CONF", conf.to_str().unwrap()),
            ("MCIM_PKCS11_MODULE", SOFTHSM2_MODULE),
            ("MCIM_PKCS11_TOKEN", SOFTHSM2_LABEL),
            ("MCIM_PKCS11_PIN", SOFTHSM2_PIN),
        ],
    );
    let work = tempfile::tempdir().unwrap();
    let keys = work.path().join("keys");
    let blobs = work.path().join("blobs");
    let s = json(mcimctl(&tred, &["device", "--json", "status"]));
    assert_eq!(s["tre"], "pkcs11");
    ok(mcimctl(
        &tred,
        &[
            "device",
            "init",
            "--device-id",
            "SN-P",
            "--pcid",
            "001010000000011",
            "--model",
            "se",
            "--out-dir",
            p(&keys),
        ],
    ));
    ok(mcimctl(
        &tred,
        &[
            "sho",
            "wrap",
            "--storage-public",
            p(&keys.join("storage.pub")),
            "--k",
            K,
            "--opc",
            OPC,
            "--out-dir",
            p(&blobs),
        ],
    ));
    ok(mcimctl(
        &tred,
        &[
            "device",
            "install",
            "--imsi",
            IMSI,
            "--sho",
            "s",
            "--k-blob",
            p(&blobs.join("k.blob")),
            "--opc-blob",
            p(&blobs.join("opc.blob")),
        ],
    ));
    ok(mcimctl(&tred, &["device", "activate", IMSI]));
    ok(mcimctl(&tred, &["device", "select", IMSI]));
    let net = json(mcimctl(
        &tred,
        &[
            "aka", "milenage", "--k", K, "--opc", OPC, "--rand", RAND, "--sqn", SQN, "--amf", AMF,
            "--json",
        ],
    ));
    let r = json(mcimctl(
        &tred,
        &[
            "device",
            "--json",
            "aka",
            IMSI,
            "--rand",
            RAND,
            "--autn",
            net["autn"].as_str().unwrap(),
        ],
    ));
    assert_eq!(r["result"], "success", "{r}");
    assert_eq!(r["res"], "a54211d5e3ba50bf");
    assert!(ok(mcimctl(&tred, &["audit", "verify"])).contains("anchored"));
    // A token has no quote: it signs the nonce and the daemon's measurement instead.
    let ev = work.path().join("ev");
    let nonce = "00112233445566778899aabbccddeeff";
    ok(mcimctl(
        &tred,
        &["device", "attest", "--nonce", nonce, "--out-dir", p(&ev)],
    ));
    let v = ok(mcimctl(
        &tred,
        &[
            "pva",
            "verify-token-evidence",
            "--ak",
            p(&keys.join("ak.pub")),
            "--quote-dir",
            p(&ev),
            "--nonce",
            nonce,
        ],
    ));
    assert!(v.contains("001010000000011"), "{v}");
    let wrong = mcimctl(
        &tred,
        &[
            "pva",
            "verify-token-evidence",
            "--ak",
            p(&keys.join("ak.pub")),
            "--quote-dir",
            p(&ev),
            "--nonce",
            "ff112233445566778899aabbccddeeff",
        ],
    );
    assert_eq!(wrong.status.code(), Some(1));
    // Someone deletes the MCIM's K object from the token behind tred's back: at the next
    // start the MCIM is blocked, and status says why.
    let mut tred = tred;
    assert!(tred.stop());
    let del = hsm.pkcs11_tool(&["--delete-object", "--type", "secrkey", "--label", "mcim.k"]);
    assert!(
        del.status.success(),
        "{}",
        String::from_utf8_lossy(&del.stderr)
    );
    tred.restart();
    let s = json(mcimctl(&tred, &["device", "--json", "status"]));
    let findings = s["startup_findings"].to_string();
    assert!(findings.contains("missing from the TRE"), "{s}");
    let m = json(mcimctl(&tred, &["device", "--json", "get", IMSI]));
    assert_eq!(m["state"], "blocked");
    // Its OPc object, left on the token, belongs to the blocked MCIM: not an orphan.
    let none = ok(mcimctl(&tred, &["device", "orphans"]));
    assert!(none.contains("no orphans"), "{none}");
    let secret_keys = || {
        let o = hsm.pkcs11_tool(&["--list-objects", "--type", "secrkey"]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    // A stray key under mcim's label that no MCIM refers to (an earlier tred's, say) is an
    // orphan: listed, then destroyed on the owner's command; pkcs11-tool agrees.
    let stray = hsm.pkcs11_tool(&[
        "--keygen",
        "--key-type",
        "AES:16",
        "--label",
        "mcim.k",
        "--id",
        "0badc0de",
    ]);
    assert!(
        stray.status.success(),
        "{}",
        String::from_utf8_lossy(&stray.stderr)
    );
    let listed = json(mcimctl(&tred, &["device", "--json", "orphans"]));
    assert_eq!(
        listed["orphans"],
        serde_json::json!(["0badc0de"]),
        "{listed}"
    );
    assert_eq!(listed["destroyed"], false);
    assert!(secret_keys().contains("0badc0de"));
    let done = json(mcimctl(
        &tred,
        &["device", "--json", "orphans", "--destroy"],
    ));
    assert_eq!(done["destroyed"], true, "{done}");
    assert!(!secret_keys().contains("0badc0de"), "{}", secret_keys());
    assert!(
        secret_keys().contains("mcim.opc"),
        "the blocked MCIM's OPc is not an orphan"
    );
    // Deleting the blocked MCIM destroys what it left on the token.
    ok(mcimctl(&tred, &["device", "delete", IMSI]));
    assert!(!secret_keys().contains("mcim.opc"), "{}", secret_keys());
    assert!(ok(mcimctl(&tred, &["audit", "verify"])).contains("anchored"));
    let log = tred.log();
    assert!(!log.contains(SOFTHSM2_PIN), "the PIN is never logged");
    for secret in [K, OPC] {
        assert!(!log.to_lowercase().contains(secret));
    }
    for (path, bytes) in files(&tred.state_dir()) {
        for secret in [K, OPC] {
            let raw = hex::decode(secret).unwrap();
            assert!(!bytes.windows(16).any(|w| w == raw.as_slice()), "{path}");
            assert!(
                !String::from_utf8_lossy(&bytes)
                    .to_lowercase()
                    .contains(secret),
                "{path}"
            );
        }
    }
}

/// InstallMcim refuses an expiry that is no valid time, or already past, before it touches
/// the TRE: INVALID_ARGUMENT naming expires_at, nothing installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_refuses_an_invalid_or_past_expiry() {
    let tpm = Swtpm::start();
    let tred = Tred::start(&tpm.tcti());
    let keys = tempfile::tempdir().unwrap();
    ok(mcimctl(
        &tred,
        &[
            "device",
            "init",
            "--device-id",
            "SN-E",
            "--pcid",
            "001010000000077",
            "--model",
            "meter",
            "--out-dir",
            p(keys.path()),
        ],
    ));
    let ts = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
    for bad in [
        ts(-1, 0),
        ts(0, 0),
        ts(1, -1),
        ts(4_000_000_000, 1_000_000_000),
        ts(1, 0),
    ] {
        let e = tred
            .client()
            .await
            .install_mcim(mcim_proto::mcim::tre::v1::InstallMcimRequest {
                imsi: "001010000000099".into(),
                sho_id: "sho.example".into(),
                wrapped_k: vec![1; 40],
                wrapped_opc: vec![1; 40],
                expires_at: Some(bad),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}: {e}");
        assert!(e.message().contains("expires_at"), "{e}");
    }
    let listed = ok(mcimctl(&tred, &["device", "list"]));
    assert!(!listed.contains("001010000000099"), "{listed}");
}

/// One tred per state directory: a second daemon on the same directory (another socket)
/// exits at once, saying why, and the first one goes on serving.
#[test]
fn a_second_tred_on_the_same_state_directory_is_refused() {
    let tpm = Swtpm::start();
    let tred = Tred::start(&tpm.tcti());
    let other = tempfile::tempdir().unwrap();
    let second = Command::new(workspace_bin("tred"))
        .env("MCIM_TCTI", tpm.tcti())
        .env("MCIM_STATE_DIR", tred.state_dir())
        .env("MCIM_SOCKET", other.path().join("second.sock"))
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another tred is running"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(!other.path().join("second.sock").exists());
    let status = ok(mcimctl(&tred, &["device", "status"]));
    // Every key is set off from its value (once printed as `rehabilitation_counter0`).
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["rehabilitation_counter", "0"]),
        "{status}"
    );
}

/// A TPM that was never sent TPM2_Startup: tred says so and what to do, and exits.
#[test]
fn a_tpm_never_started_is_a_clear_error() {
    let port = mcim_e2e::free_ports(2);
    let state = tempfile::tempdir().unwrap();
    let mut swtpm = Command::new("swtpm")
        .args(["socket", "--tpm2", "--tpmstate"])
        .arg(format!("dir={}", state.path().display()))
        .arg("--server")
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
        .args(["--flags", "not-need-init"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "swtpm did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let tred = Command::new(workspace_bin("tred"))
        .env("MCIM_TCTI", format!("swtpm:host=127.0.0.1,port={port}"))
        .env("MCIM_STATE_DIR", state.path().join("tred"))
        .env("MCIM_SOCKET", state.path().join("tred.sock"))
        .output()
        .unwrap();
    let _ = swtpm.kill();
    let _ = swtpm.wait();
    assert!(!tred.status.success());
    let err = String::from_utf8_lossy(&tred.stderr);
    assert!(err.contains("never started"), "{err}");
    assert!(err.contains("tpm2_startup -c"), "{err}");
}

/// `mcimctl pki init` makes the roles' CA and certificates; `mcimctl pki device` certifies the
/// TLS key a device's TPM holds, for its PCID, so the roles can authenticate it.
#[test]
fn pki_certifies_roles_and_the_device_tls_key() {
    let tpm = Swtpm::start();
    let tred = Tred::start(&tpm.tcti());
    let work = tempfile::tempdir().unwrap();
    let pki = work.path().join("pki");
    let keys = work.path().join("keys");
    let run = |args: &[&str]| {
        Command::new(workspace_bin("mcimctl"))
            .args(args)
            .output()
            .unwrap()
    };
    assert!(ok(run(&["pki", "init", "--dir", p(&pki)])).contains("sho"));
    assert!(
        ok(run(&["pki", "init", "--dir", p(&pki)])).contains("none"),
        "idempotent"
    );
    ok(mcimctl(
        &tred,
        &[
            "device",
            "init",
            "--device-id",
            "SN-9",
            "--pcid",
            "001010000000099",
            "--model",
            "m",
            "--out-dir",
            p(&keys),
        ],
    ));
    let cert = work.path().join("device.pem");
    ok(run(&[
        "pki",
        "device",
        "--dir",
        p(&pki),
        "--pcid",
        "001010000000099",
        "--tls-spki",
        p(&keys.join("tls.spki.der")),
        "--out",
        p(&cert),
    ]));
    let pem = std::fs::read(&cert).unwrap();
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    let caller = mcim_pki::party::caller_from_cert(&der).unwrap();
    assert_eq!(caller.role, mcim_roles::authz::Role::Device);
    assert_eq!(caller.name, "001010000000099");
    // The certificate carries exactly the key the TPM holds.
    let spki = std::fs::read(keys.join("tls.spki.der")).unwrap();
    assert!(der.windows(65).any(|w| w == &spki[26..]));
    let bad = run(&[
        "pki",
        "device",
        "--dir",
        p(&pki),
        "--pcid",
        "12",
        "--tls-spki",
        p(&keys.join("tls.spki.der")),
        "--out",
        p(&cert),
    ]);
    assert_eq!(bad.status.code(), Some(1), "a malformed PCID is refused");
}

/// An MCIM provisioned over the air has no PIN (its package carries none); the owner enables
/// one with `mcimctl device pin enable`, after which the TPM checks it: selecting needs it, a
/// second enable is refused and changes nothing, and the MCIM's record says the TRE checks it.
#[test]
fn a_provisioned_mcim_gets_a_pin_the_tpm_checks() {
    let d = mcim_e2e::CliDevice::provisioned(false, "001010000000077", &[], "non-3gpp");
    let s = d.socket();
    let run = |args: &[&str]| {
        let mut all = vec!["device", "--socket", s.as_str()];
        all.extend_from_slice(args);
        mcim_e2e::mcimctl(&all)
    };
    let got = json(run(&["--json", "get", &d.imsi]));
    if got["state"] == "selected" {
        ok(run(&["end-session", &d.imsi]));
    }
    let bad = run(&["pin", "enable", &d.imsi, "--pin", "12", "--puk", "12345678"]);
    assert_eq!(
        bad.status.code(),
        Some(1),
        "{}",
        mcim_e2e::output_text(&bad)
    );
    let m = json(run(&[
        "--json", "pin", "enable", &d.imsi, "--pin", "1234", "--puk", "24681357",
    ]));
    assert_eq!(m["state"], "activated", "{m}");
    let again = run(&[
        "pin", "enable", &d.imsi, "--pin", "5678", "--puk", "87654321",
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        mcim_e2e::output_text(&again).contains("has a PIN already"),
        "{}",
        mcim_e2e::output_text(&again)
    );
    let no_pin = run(&["select", &d.imsi]);
    assert_eq!(no_pin.status.code(), Some(1), "selecting now needs the PIN");
    let wrong = run(&["select", &d.imsi, "--pin", "5678"]);
    assert!(
        mcim_e2e::output_text(&wrong).contains("wrong PIN, 2 tries left"),
        "{}",
        mcim_e2e::output_text(&wrong)
    );
    assert_eq!(
        json(run(&["--json", "select", &d.imsi, "--pin", "1234"]))["state"],
        "selected"
    );
    // The record on disk: the TRE checks the PIN, and no tag to search is kept.
    let dir = d.tred.state_dir().join("mcims");
    let rec = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .find(|f| f.file_name().to_string_lossy().starts_with(&d.imsi))
        .unwrap();
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rec.path()).unwrap()).unwrap();
    assert_eq!(rec["pin"]["in_tre"], true, "{rec}");
    assert_eq!(rec["pin"]["pin_tag"], "", "{rec}");
    assert!(
        rec["secrets"]["opc_puk"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{rec}"
    );
}
