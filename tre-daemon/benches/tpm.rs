//! TPM cost of the TRE operations on swtpm: TPM commands and wall time per AKA, per MCIM
//! import, per quote, per registry transaction. A bench binary (not criterion): each case runs
//! `N` times on its own swtpm and reports the median; the baseline is one TPM2_GetRandom, the
//! cheapest round trip to the same TPM, measured in the same run.
//!
//! ```sh
//! cargo bench -p mcim-tre --bench tpm            # N = 200
//! MCIM_BENCH_N=50 cargo bench -p mcim-tre --bench tpm
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::time::{Duration, Instant};

use mcim_core::aka::network::vector_for;
use mcim_core::aka::{
    Amf, Constants, K, Milenage, MsSqnState, Opc, Rand, SoftKernel, Sqn, SqnProfile,
};
use mcim_core::identity::{DeviceIdentity, Imsi, Pcid};
use mcim_core::lifecycle::LifecycleOp;
use mcim_core::tpm::import::{ObjectPolicy, wrap_aes128_key, wrap_sealed_data};
use mcim_core::tpm::policy::PcrSelection;
use mcim_core::tpm::public::EccPublic;
use mcim_e2e::Swtpm;
use mcim_tre::registry::{InstallRequest, Registry};
use mcim_tre::tre::tpm::{TpmConfig, TpmTre};
use mcim_tre::tre::{AkaChallenge, Authority, DevicePublic, Tre, WrappedSecrets};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn wrap(public: &DevicePublic, k: &K, opc: &Opc, sealed_k: bool) -> WrappedSecrets {
    let parent = EccPublic::from_tpm2b(&public.storage_public).unwrap();
    let mut rng = rand::rng();
    let kb = if sealed_k {
        wrap_sealed_data(&parent, k.expose(), ObjectPolicy::default(), &mut rng)
    } else {
        wrap_aes128_key(&parent, k, ObjectPolicy::default(), &mut rng)
    }
    .unwrap();
    let ob = wrap_sealed_data(&parent, opc.expose(), ObjectPolicy::default(), &mut rng).unwrap();
    WrappedSecrets {
        k: kb.to_bytes().unwrap(),
        opc: ob.to_bytes().unwrap(),
    }
}

fn device(s: &Swtpm) -> TpmTre {
    let mut t = TpmTre::open(&TpmConfig { tcti: s.tcti() }).unwrap();
    t.init_device(
        &DeviceIdentity::new("SN-B", Pcid::new("001010000000777").unwrap(), "bench").unwrap(),
    )
    .unwrap();
    t
}

struct Row {
    name: &'static str,
    median: Duration,
    commands: f64,
    /// NV-writing TPM commands per operation (NaN: not counted).
    nv: f64,
}

/// The same AKA on a PKCS#11 token (SoftHSM2), run in a child process of this bench whose
/// SOFTHSM2_CONF names a fresh token (the module reads it at C_Initialize). Prints one line
/// for the parent: the median in nanoseconds.
fn token_child(n: usize) {
    use mcim_tre::tre::pkcs11::{Pkcs11Config, Pkcs11Tre};
    let mut t = Pkcs11Tre::open(&Pkcs11Config {
        module: mcim_e2e::SOFTHSM2_MODULE.into(),
        token_label: mcim_e2e::SOFTHSM2_LABEL.into(),
        pin: mcim_e2e::SOFTHSM2_PIN.to_string().into(),
        force_rsa_unwrap: false,
    })
    .unwrap();
    t.init_device(
        &DeviceIdentity::new("SN-B", Pcid::new("001010000000777").unwrap(), "bench").unwrap(),
    )
    .unwrap();
    let public = t.device_public().unwrap();
    let k = K::new([0x46; 16]);
    let opc = Opc::new([0xcd; 16]);
    let w = |s: &[u8]| {
        mcim_core::token_wrap::wrap_for_token(&public.storage_public, s)
            .unwrap()
            .to_bytes()
    };
    let secrets = t
        .import_mcim_secrets(&WrappedSecrets {
            k: w(k.expose()),
            opc: w(opc.expose()),
        })
        .unwrap();
    let network = Milenage::with_opc(SoftKernel::new(&k), opc, Constants::default());
    let profile = SqnProfile::default();
    let mut ms = MsSqnState::new(&profile);
    let mut times = Vec::new();
    for i in 0..n {
        let seq = (i as u64 + 1) << 5;
        let rand = Rand([i as u8; 16]);
        let av = vector_for(&network, Sqn::new(seq).unwrap(), Amf([0x80, 0]), rand).unwrap();
        let ch = AkaChallenge {
            constants: &Constants::default(),
            profile: &profile,
            rand: &rand,
            autn: &av.autn,
            pin: None,
        };
        let a = Instant::now();
        t.authenticate(&secrets, &mut ms, &ch).unwrap();
        times.push(a.elapsed());
    }
    println!("TOKEN_AKA_NS {}", median(times).as_nanos());
}

/// Runs [`token_child`] in a child with its own token; returns its median.
fn token_aka(n: usize) -> Duration {
    let hsm = mcim_e2e::SoftHsm::new();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env("SOFTHSM2_CONF", hsm.conf())
        .env("MCIM_BENCH_TOKEN_CHILD", "1")
        .env("MCIM_BENCH_N", n.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let ns: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("TOKEN_AKA_NS "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "token bench failed: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    Duration::from_nanos(ns)
}

fn main() {
    let n: usize = std::env::var("MCIM_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    if std::env::var("MCIM_BENCH_TOKEN_CHILD").is_ok() {
        token_child(n);
        return;
    }
    let mut rows = Vec::new();
    let k = K::new([0x46; 16]);
    let opc = Opc::new([0xcd; 16]);
    let network = Milenage::with_opc(SoftKernel::new(&k), opc.clone(), Constants::default());
    let profile = SqnProfile::default();

    // Baseline: one TPM2_GetRandom.
    let s = Swtpm::start();
    let mut t = device(&s);
    let mut times = Vec::new();
    let c0 = t.commands_issued();
    for _ in 0..n {
        let a = Instant::now();
        t.random(16).unwrap();
        times.push(a.elapsed());
    }
    rows.push(Row {
        name: "baseline: TPM2_GetRandom",
        median: median(times),
        commands: 1.0,
        nv: f64::NAN,
    });
    let _ = c0;

    // Import of one MCIM (K as AES key + OPc sealed): two TPM2_Import.
    let public = t.device_public().unwrap();
    let mut times = Vec::new();
    let c0 = t.commands_issued();
    let mut secrets = None;
    for _ in 0..n {
        let w = wrap(&public, &k, &opc, false);
        let a = Instant::now();
        secrets = Some(t.import_mcim_secrets(&w).unwrap());
        times.push(a.elapsed());
    }
    rows.push(Row {
        name: "import one MCIM (K key + OPc sealed)",
        median: median(times),
        commands: (t.commands_issued() - c0) as f64 / n as f64,
        nv: f64::NAN,
    });
    let secrets = secrets.unwrap();

    // AKA inside the TPM.
    let aka = |t: &mut TpmTre, secrets, pin: Option<Authority<'static>>, label: &'static str| {
        let mut ms = MsSqnState::new(&profile);
        let mut times = Vec::new();
        let c0 = t.commands_issued();
        let nv0 = t.nv_writes_issued();
        for i in 0..n {
            let seq = (i as u64 + 1) << 5;
            let rand = Rand([i as u8; 16]);
            let av = vector_for(&network, Sqn::new(seq).unwrap(), Amf([0x80, 0]), rand).unwrap();
            let ch = AkaChallenge {
                constants: &Constants::default(),
                profile: &profile,
                rand: &rand,
                autn: &av.autn,
                pin,
            };
            let a = Instant::now();
            t.authenticate(secrets, &mut ms, &ch).unwrap();
            times.push(a.elapsed());
        }
        Row {
            name: label,
            median: median(times),
            commands: (t.commands_issued() - c0) as f64 / n as f64,
            nv: (t.nv_writes_issued() - nv0) as f64 / n as f64,
        }
    };
    rows.push(aka(
        &mut t,
        &secrets,
        None,
        "AKA, K in the TPM (EncryptDecrypt2)",
    ));
    // The PIN as the objects' authValue: binding (4 x Load + ObjectChangeAuth + Flush),
    // checking (Load + Unseal + Flush), and AKA with the bound objects.
    let mut times = Vec::new();
    let c0 = t.commands_issued();
    let mut bound = None;
    for _ in 0..n {
        let a = Instant::now();
        bound = t.bind_pin(&secrets, b"1234", b"12345678").unwrap();
        times.push(a.elapsed());
    }
    rows.push(Row {
        name: "bind an MCIM to its PIN and PUK (4 x ObjectChangeAuth)",
        median: median(times),
        commands: (t.commands_issued() - c0) as f64 / n as f64,
        nv: f64::NAN,
    });
    let bound = bound.unwrap();
    let mut times = Vec::new();
    let c0 = t.commands_issued();
    for _ in 0..n {
        let a = Instant::now();
        assert!(t.check_pin(&bound, Authority::Pin(b"1234")).unwrap());
        times.push(a.elapsed());
    }
    rows.push(Row {
        name: "check a PIN in the TPM (Unseal with the PIN as authValue)",
        median: median(times),
        commands: (t.commands_issued() - c0) as f64 / n as f64,
        nv: f64::NAN,
    });
    rows.push(aka(
        &mut t,
        &bound,
        Some(Authority::Pin(b"1234")),
        "AKA, K in the TPM, objects bound to the PIN",
    ));
    let sealed = t
        .import_mcim_secrets(&wrap(&public, &k, &opc, true))
        .unwrap();
    rows.push(aka(
        &mut t,
        &sealed,
        None,
        "AKA, sealed fallback (K unsealed)",
    ));
    // The cost of bus encryption: the same two AKAs with a plain password session (secrets in
    // clear on the bus; the baseline only, never tred's configuration). A second context on
    // the same TPM; opening it flushes the first one's kept session, which restarts on demand.
    let mut plain = TpmTre::open(&TpmConfig { tcti: s.tcti() })
        .unwrap()
        .without_bus_encryption_for_baseline();
    rows.push(aka(
        &mut plain,
        &secrets,
        None,
        "AKA, K in the TPM, NO bus encryption (baseline of its cost)",
    ));
    rows.push(aka(
        &mut plain,
        &sealed,
        None,
        "AKA, sealed fallback, NO bus encryption (baseline of its cost)",
    ));
    drop(plain);

    // Quote over PCRs 0-7.
    let sel = PcrSelection::sha256(&[0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
    let mut times = Vec::new();
    let c0 = t.commands_issued();
    for i in 0..n {
        let nonce = [i as u8; 32];
        let a = Instant::now();
        t.quote(&nonce, &sel).unwrap();
        times.push(a.elapsed());
    }
    rows.push(Row {
        name: "quote over PCRs 0-7 (+ PCR read)",
        median: median(times),
        commands: (t.commands_issued() - c0) as f64 / n as f64,
        nv: f64::NAN,
    });
    drop(t);
    drop(s);

    // AKA through the registry: the TPM AKA plus the committed SQN state (MACs, counter,
    // audit anchor). Commands counted on the registry's own TRE context.
    let s = Swtpm::start();
    let t = device(&s);
    let state = tempfile::tempdir().unwrap();
    let mut reg = Registry::open(state.path(), Box::new(t)).unwrap();
    let public = reg.tre().device_public().unwrap();
    let imsi = "001010000000001";
    reg.install(InstallRequest {
        imsi: Imsi::new(imsi).unwrap(),
        sho: "bench".into(),
        wrapped: wrap(&public, &k, &opc, false),
        constants: Constants::default(),
        sqn_profile: profile,
        pin: None,
        expires_at: None,
        usim: Default::default(),
    })
    .unwrap();
    reg.apply(imsi, LifecycleOp::Activate).unwrap();
    reg.select(imsi, None).unwrap();
    let mut times = Vec::new();
    let m = n.min(100);
    let c0 = reg.tre().command_count().unwrap();
    let nv0 = reg.tre().nv_write_count().unwrap();
    for i in 0..m {
        let seq = (i as u64 + 1) << 5;
        let rand = Rand([i as u8; 16]);
        let av = vector_for(&network, Sqn::new(seq).unwrap(), Amf([0x80, 0]), rand).unwrap();
        let a = Instant::now();
        reg.authenticate(imsi, &rand, &av.autn).unwrap();
        times.push(a.elapsed());
    }
    rows.push(Row {
        name: "AKA through the registry (+ commit)",
        median: median(times),
        commands: (reg.tre().command_count().unwrap() - c0) as f64 / m as f64,
        nv: (reg.tre().nv_write_count().unwrap() - nv0) as f64 / m as f64,
    });

    // The same AKA on a PKCS#11 token (SoftHSM2): 3 C_Encrypt + reading OPc.
    rows.push(Row {
        name: "AKA on a PKCS#11 token (SoftHSM2, CKM_AES_ECB)",
        median: token_aka(n),
        commands: f64::NAN,
        nv: f64::NAN,
    });

    // Software reference: the same AKA with K in host memory.
    let mut times = Vec::new();
    let mut ms = MsSqnState::new(&profile);
    for i in 0..n {
        let seq = (i as u64 + 1) << 5;
        let rand = Rand([i as u8; 16]);
        let av = vector_for(&network, Sqn::new(seq).unwrap(), Amf([0x80, 0]), rand).unwrap();
        let a = Instant::now();
        mcim_core::aka::authenticate(&network, &mut ms, &profile, &rand, &av.autn).unwrap();
        times.push(a.elapsed());
    }
    rows.push(Row {
        name: "reference: AKA in software (core)",
        median: median(times),
        commands: 0.0,
        nv: f64::NAN,
    });

    let base = rows[0].median.as_secs_f64();
    println!("n = {n} per case (registry AKA: {m}); swtpm over TCP on loopback");
    println!("| operation | median | TPM commands | NV writes | vs GetRandom |");
    println!("| --- | --- | --- | --- | --- |");
    for r in rows {
        let cmds = if r.commands.is_nan() {
            "n/a".to_string()
        } else {
            format!("{:.1}", r.commands)
        };
        let nv = if r.nv.is_nan() {
            "n/a".to_string()
        } else {
            format!("{:.1}", r.nv)
        };
        let ms = r.median.as_secs_f64() * 1e3;
        let shown = if ms < 0.1 {
            format!("{:.1} µs", ms * 1e3)
        } else {
            format!("{ms:.3} ms")
        };
        println!(
            "| {} | {shown} | {cmds} | {nv} | {:.3}x |",
            r.name,
            r.median.as_secs_f64() / base
        );
    }
}
