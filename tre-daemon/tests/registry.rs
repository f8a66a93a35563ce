//! The MCIM registry on a real TPM (a private swtpm per test): lifecycle, PIN, AKA, the audit
//! record, tamper and rollback detection (TR 33.812 5.1.1.1, 5.1.2.2, 5.1.2.3).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::{Path, PathBuf};

use mcim_core::aka::network::vector_for;
use mcim_core::aka::{
    Amf, AuthVector, Constants, DeviceResponse, K, Milenage, Opc, Rand, SoftKernel, Sqn, SqnProfile,
};
use mcim_core::identity::{DeviceIdentity, Imsi, Pcid};
use mcim_core::lifecycle::{BlockReason, LifecycleOp as Op, McimState};
use mcim_tre::registry::{InstallRequest, Registry};
use mcim_tre::tre::Tre;

const IMSI_A: &str = "001010123456789";
const IMSI_B: &str = "001010987654321";
#[cfg(feature = "pkcs11")]
const IMSI_C: &str = "001010555555555";

fn secrets(imsi: &str) -> (K, Opc) {
    let seed = imsi.as_bytes()[14];
    (K::new([seed; 16]), Opc::new([seed ^ 0x5a; 16]))
}
fn av(imsi: &str, seq: u8) -> AuthVector {
    let (k, opc) = secrets(imsi);
    let m = Milenage::with_opc(SoftKernel::new(&k), opc, Constants::default());
    vector_for(
        &m,
        Sqn::from_bytes([0, 0, 0, 0, seq, 0]),
        Amf([0x80, 0]),
        Rand([seq; 16]),
    )
    .unwrap()
}

/// [`av`] for SQN numbers past 255 (a run of hundreds of AKAs).
#[cfg(feature = "tpm")]
fn av_n(imsi: &str, n: u16) -> AuthVector {
    let (k, opc) = secrets(imsi);
    let m = Milenage::with_opc(SoftKernel::new(&k), opc, Constants::default());
    let [hi, lo] = n.to_be_bytes();
    let mut rand = [lo; 16];
    rand[0] = hi;
    vector_for(
        &m,
        Sqn::from_bytes([0, 0, 0, hi, lo, 0]),
        Amf([0x80, 0]),
        Rand(rand),
    )
    .unwrap()
}

fn state(reg: &Registry, id: &str) -> McimState {
    reg.get(id).unwrap().state
}

/// Every file under the state directory, by relative path, with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push((
                    e.path().strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(e.path()).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

fn copy_dir(from: &Path, to: &Path) {
    for (rel, bytes) in snapshot(from) {
        let p = to.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
}
/// The registry on a TPM (swtpm, one per test).
#[cfg(feature = "tpm")]
mod on_tpm {
    use super::*;
    use mcim_tre::registry::RegistryError;
    use mcim_tre::tre::tpm::{TpmConfig, TpmTre};
    use support::{KForm, Swtpm, tpm_wrap};

    /// A device: its swtpm, its state directory, and the SHO's knowledge of each MCIM's K/OPc.
    struct Device {
        tpm: Swtpm,
        state: tempfile::TempDir,
    }

    impl Device {
        fn new() -> Self {
            let tpm = Swtpm::start();
            let mut t = TpmTre::open(&TpmConfig { tcti: tpm.tcti() }).unwrap();
            t.init_device(
                &DeviceIdentity::new("SN-1", Pcid::new("001010000000001").unwrap(), "meter")
                    .unwrap(),
            )
            .unwrap();
            drop(t);
            // The device maker's dictionary-attack parameters: more tries than one MCIM's
            // PIN and PUK counters allow together (3 + 10).
            tpm.set_dictionary_attack(32, 600, 86_400);
            Self {
                tpm,
                state: tempfile::tempdir().unwrap(),
            }
        }

        fn dir(&self) -> &Path {
            self.state.path()
        }

        fn open(&self) -> Registry {
            let t = TpmTre::open(&TpmConfig {
                tcti: self.tpm.tcti(),
            })
            .unwrap();
            Registry::open(self.dir(), Box::new(t)).unwrap()
        }
    }
    fn install(reg: &mut Registry, imsi: &str, pin: Option<(&str, &str)>) {
        let (k, opc) = secrets(imsi);
        let public = reg.tre().device_public().unwrap();
        reg.install(InstallRequest {
            imsi: Imsi::new(imsi).unwrap(),
            sho: "sho.example".into(),
            wrapped: tpm_wrap(&public, &k, &opc, KForm::Key),
            constants: Constants::default(),
            sqn_profile: SqnProfile::default(),
            pin: pin.map(|(a, b)| (a.to_string(), b.to_string())),
            expires_at: None,
            usim: Default::default(),
        })
        .unwrap();
    }
    /// An MCIM with a PIN on a TPM keeps no PIN or PUK tag in its record (a tag could be
    /// searched through the integrity key, which has no dictionary-attack protection): the
    /// PIN and PUK are the authValues of its objects, and the TPM compares them.
    #[test]
    fn a_pin_bound_mcims_record_holds_no_pin_tag_to_search() {
        let dev = Device::new();
        {
            let mut reg = dev.open();
            install(&mut reg, IMSI_A, Some(("1234", "12345678")));
            let rec = reg.get(IMSI_A).unwrap();
            assert!(rec.secrets.as_ref().unwrap().pin_bound());
            let pin = rec.pin.as_ref().unwrap();
            assert!(pin.in_tre, "{pin:?}");
        }
        let record = std::fs::read_dir(dev.dir().join("mcims"))
            .unwrap()
            .flatten()
            .find(|f| f.file_name().to_string_lossy().starts_with(IMSI_A))
            .unwrap();
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(record.path()).unwrap()).unwrap();
        assert_eq!(record["pin"]["pin_tag"], "", "{record}");
        assert_eq!(record["pin"]["puk_tag"], "", "{record}");
        assert_eq!(record["pin"]["in_tre"], true, "{record}");
    }

    /// Writes an at-rest object (TPM2B_PUBLIC then TPM2B_PRIVATE) as the files tpm2_load reads
    /// and loads it under the storage key with tpm2-tools; returns the context file.
    fn tool_load(dev: &Device, dir: &Path, at_rest: &[u8], name: &str) -> String {
        let path = |n: &str| dir.join(n).to_str().unwrap().to_string();
        let n = usize::from(u16::from_be_bytes([at_rest[0], at_rest[1]]));
        let (public, rest) = at_rest.split_at(2 + n);
        let m = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        std::fs::write(path(&format!("{name}.pub")), public).unwrap();
        std::fs::write(path(&format!("{name}.priv")), &rest[..2 + m]).unwrap();
        let ctx = path(&format!("{name}.ctx"));
        // swtpm has no resource manager: free the object slots earlier clients left.
        let out = dev.tpm.tpm2("tpm2_flushcontext", &["--transient-object"]);
        assert!(out.status.success(), "{}", output_text(&out));
        let out = dev.tpm.tpm2(
            "tpm2_load",
            &[
                "-C",
                "0x81000100",
                "-u",
                &path(&format!("{name}.pub")),
                "-r",
                &path(&format!("{name}.priv")),
                "-c",
                &ctx,
            ],
        );
        assert!(out.status.success(), "{}", output_text(&out));
        ctx
    }

    fn output_text(o: &std::process::Output) -> String {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// A copy of a PIN-bound MCIM's blobs, checked with tpm2-tools alone, after the MCIM was
    /// deleted: without the PIN neither OPc unseals nor K encrypts; wrong PINs run into the
    /// TPM's dictionary-attack lockout, where even the right one is refused; with the PIN
    /// (and, from the PUK copies, with the PUK) both work: what docs/architecture.md §7 says
    /// an old copy can still do.
    #[test]
    fn a_copy_of_a_pin_bound_mcims_blobs_needs_the_pin_and_wrong_ones_run_into_lockout() {
        use mcim_core::aka::Kernel;
        let dev = Device::new();
        let saved = {
            let mut reg = dev.open();
            install(&mut reg, IMSI_A, Some(("1234", "24681357")));
            let saved = reg.get(IMSI_A).unwrap().secrets.clone().unwrap();
            reg.apply(IMSI_A, Op::Delete).unwrap();
            assert!(matches!(reg.get(IMSI_A), Err(RegistryError::NotFound(_))));
            saved
        };
        assert!(saved.pin_bound());
        // The registry is closed: tpm2-tools may talk to the TPM. The TPM holds nothing of
        // the deleted MCIM: no persistent object besides the device's three keys, no loaded
        // object.
        for (what, want) in [("handles-persistent", 3), ("handles-transient", 0)] {
            let out = dev.tpm.tpm2("tpm2_getcap", &[what]);
            assert!(out.status.success(), "{}", output_text(&out));
            let handles = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.trim_start().starts_with("- 0x"))
                .count();
            assert_eq!(handles, want, "{what}: {}", output_text(&out));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
        let (k, opc) = secrets(IMSI_A);
        let unseal = |blob: &[u8], auth: Option<&str>| {
            let ctx = tool_load(&dev, dir.path(), blob, "opc");
            let mut args = vec!["-c", ctx.as_str()];
            let p;
            if let Some(a) = auth {
                p = format!("str:{a}");
                args.extend(["-p", p.as_str()]);
            }
            dev.tpm.tpm2("tpm2_unseal", &args)
        };
        let out = unseal(&saved.opc, None);
        assert!(!out.status.success(), "OPc without the PIN");
        assert!(!out.stdout.windows(16).any(|w| w == opc.expose()));
        std::fs::write(path("block"), [0x5a; 16]).unwrap();
        let encrypt = |auth: Option<&str>| {
            let _ = std::fs::remove_file(path("out"));
            let ctx = tool_load(&dev, dir.path(), &saved.k, "k");
            let mut args = vec!["-c", ctx.as_str(), "-G", "ecb"];
            let p;
            if let Some(a) = auth {
                p = format!("str:{a}");
                args.extend(["-p", p.as_str()]);
            }
            let (o, b) = (path("out"), path("block"));
            args.extend(["-o", o.as_str(), b.as_str()]);
            dev.tpm.tpm2("tpm2_encryptdecrypt", &args)
        };
        assert!(!encrypt(None).status.success(), "E_K without the PIN");
        assert!(
            std::fs::read(path("out")).map_or(true, |b| b.is_empty()),
            "and no output was written"
        );
        // With the PIN (the control), K encrypts and OPc unseals; so does the PUK's copy.
        let mut want = [[0x5au8; 16]];
        SoftKernel::new(&k).encrypt_blocks(&mut want).unwrap();
        let out = encrypt(Some("1234"));
        assert!(out.status.success(), "{}", output_text(&out));
        assert_eq!(std::fs::read(path("out")).unwrap(), want[0].to_vec());
        let out = unseal(&saved.opc, Some("1234"));
        assert!(out.status.success(), "{}", output_text(&out));
        assert_eq!(out.stdout, opc.expose().to_vec());
        let out = unseal(&saved.opc_puk, Some("24681357"));
        assert!(out.status.success(), "{}", output_text(&out));
        assert_eq!(out.stdout, opc.expose().to_vec());
        assert!(
            !unseal(&saved.opc_puk, Some("1234")).status.success(),
            "the PUK copy does not open with the PIN"
        );
        // Wrong PINs: with the device's limit lowered to 3 (swtpm's default), the third wrong
        // one (the PUK copy's refusal above was the first) locks the TPM, and then the right
        // PIN is refused too.
        dev.tpm.set_dictionary_attack(3, 1000, 1000);
        for wrong in ["0000", "1111"] {
            let out = unseal(&saved.opc, Some(wrong));
            assert!(!out.status.success(), "{wrong}");
        }
        let out = unseal(&saved.opc, Some("1234"));
        assert!(!out.status.success(), "the right PIN in lockout");
        assert!(
            output_text(&out).to_lowercase().contains("lockout"),
            "{}",
            output_text(&out)
        );
        let out = dev.tpm.tpm2("tpm2_getcap", &["properties-variable"]);
        assert!(
            output_text(&out).contains("inLockout:                 1"),
            "{}",
            output_text(&out)
        );
    }

    /// AKA with a PIN-bound MCIM's objects needs the PIN in the challenge (the registry's
    /// selected session supplies it): without it, or with a wrong one, the TRE refuses, and
    /// the SQN state does not move.
    #[test]
    fn aka_with_pin_bound_objects_needs_the_pin() {
        let dev = Device::new();
        let (k, opc) = secrets(IMSI_A);
        let mut t = TpmTre::open(&TpmConfig {
            tcti: dev.tpm.tcti(),
        })
        .unwrap();
        let public = t.device_public().unwrap();
        let plain = t
            .import_mcim_secrets(&tpm_wrap(&public, &k, &opc, KForm::Key))
            .unwrap();
        let bound = t.bind_pin(&plain, b"1234", b"24681357").unwrap().unwrap();
        assert!(bound.pin_bound() && !plain.pin_bound());
        let profile = SqnProfile::default();
        let constants = Constants::default();
        let v = av(IMSI_A, 1);
        let mut sqn = mcim_core::aka::MsSqnState::new(&profile);
        let before = sqn.clone();
        let ch = |pin| mcim_tre::tre::AkaChallenge {
            constants: &constants,
            profile: &profile,
            rand: &v.rand,
            autn: &v.autn,
            pin,
        };
        use mcim_tre::tre::Authority;
        for pin in [
            None,
            Some(Authority::Puk(b"24681357")),
            Some(Authority::Pin(b"9999")),
        ] {
            assert!(
                t.authenticate(&bound, &mut sqn, &ch(pin)).is_err(),
                "{pin:?}"
            );
            assert_eq!(sqn, before, "{pin:?}: the SQN state did not move");
        }
        assert!(t.check_pin(&bound, Authority::Pin(b"1234")).unwrap());
        assert!(!t.check_pin(&bound, Authority::Pin(b"4321")).unwrap());
        assert!(t.check_pin(&bound, Authority::Puk(b"24681357")).unwrap());
        assert!(matches!(
            t.authenticate(&bound, &mut sqn, &ch(Some(Authority::Pin(b"1234"))))
                .unwrap(),
            DeviceResponse::Success { .. }
        ));
        // Unblocking from the PUK copies: the new PIN opens, the old one no longer does.
        let rebound = t
            .rebind_pin(&bound, Authority::Puk(b"24681357"), b"5678")
            .unwrap()
            .unwrap();
        assert!(t.check_pin(&rebound, Authority::Pin(b"5678")).unwrap());
        assert!(!t.check_pin(&rebound, Authority::Pin(b"1234")).unwrap());
        assert!(
            t.rebind_pin(&bound, Authority::Puk(b"00000000"), b"5678")
                .unwrap()
                .is_none(),
            "a wrong PUK rebinds nothing"
        );
    }

    /// An MCIM installed without a PIN (as every MCIM provisioned over the air) is given one:
    /// its objects are bound to the PIN and PUK, selecting needs the PIN, and AKA runs with
    /// the session's PIN. Enabling again, or with a malformed PIN, or while selected, is
    /// refused and changes nothing.
    #[test]
    fn enabling_a_pin_binds_the_objects_and_selecting_then_needs_it() {
        let dev = Device::new();
        let mut reg = dev.open();
        install(&mut reg, IMSI_A, None);
        reg.apply(IMSI_A, Op::Activate).unwrap();
        assert!(
            !reg.get(IMSI_A)
                .unwrap()
                .secrets
                .as_ref()
                .unwrap()
                .pin_bound()
        );
        let before = snapshot(dev.dir());
        for (pin, puk) in [("12", "12345678"), ("1234", "1234"), ("12a4", "12345678")] {
            assert!(
                matches!(
                    reg.enable_pin(IMSI_A, pin, puk),
                    Err(RegistryError::BadRequest(_))
                ),
                "{pin} {puk}"
            );
        }
        let long = "9".repeat(1 << 20);
        let err = reg.enable_pin(&long, "1234", "12345678").unwrap_err();
        assert!(matches!(err, RegistryError::NotFound(_)), "{err}");
        assert!(err.to_string().len() < 200, "a long id is not echoed whole");
        assert_eq!(snapshot(dev.dir()), before, "refusals write nothing");
        reg.enable_pin(IMSI_A, "1234", "12345678").unwrap();
        let rec = reg.get(IMSI_A).unwrap();
        assert!(rec.secrets.as_ref().unwrap().pin_bound());
        assert!(rec.pin.as_ref().unwrap().in_tre);
        let before = snapshot(dev.dir());
        assert!(matches!(
            reg.enable_pin(IMSI_A, "5678", "87654321"),
            Err(RegistryError::BadRequest(_))
        ));
        assert_eq!(
            snapshot(dev.dir()),
            before,
            "a second enable writes nothing"
        );
        assert!(matches!(
            reg.select(IMSI_A, None),
            Err(RegistryError::BadRequest(_))
        ));
        reg.select(IMSI_A, Some("1234")).unwrap();
        let v = av(IMSI_A, 1);
        assert!(matches!(
            reg.authenticate(IMSI_A, &v.rand, &v.autn).unwrap(),
            DeviceResponse::Success { .. }
        ));
        // The session's PIN follows a change.
        reg.change_pin(IMSI_A, "1234", "4321").unwrap();
        let v = av(IMSI_A, 2);
        assert!(matches!(
            reg.authenticate(IMSI_A, &v.rand, &v.autn).unwrap(),
            DeviceResponse::Success { .. }
        ));
        reg.apply(IMSI_A, Op::EndSession).unwrap();
        drop(reg);
        let mut reg = dev.open();
        assert!(matches!(
            reg.select(IMSI_A, Some("1234")),
            Err(RegistryError::WrongPin { .. })
        ));
        reg.select(IMSI_A, Some("4321")).unwrap();
        let v = av(IMSI_A, 3);
        assert!(matches!(
            reg.authenticate(IMSI_A, &v.rand, &v.autn).unwrap(),
            DeviceResponse::Success { .. }
        ));
    }

    /// A TPM in dictionary-attack lockout cannot evaluate a PIN: the try is not counted
    /// against the MCIM, the record is as before the try, and the error says what happened.
    #[test]
    fn a_pin_try_the_tpm_cannot_evaluate_is_not_counted() {
        let dev = Device::new();
        {
            let mut reg = dev.open();
            install(&mut reg, IMSI_A, Some(("1234", "12345678")));
            reg.apply(IMSI_A, Op::Activate).unwrap();
        }
        dev.tpm.set_dictionary_attack(1, 1000, 1000);
        let mut reg = dev.open();
        assert!(matches!(
            reg.verify_pin(IMSI_A, "0000"),
            Err(RegistryError::WrongPin { tries_left: 2 })
        ));
        let err = reg.verify_pin(IMSI_A, "1234").unwrap_err();
        assert!(err.to_string().contains("lockout"), "{err}");
        let rec = reg.get(IMSI_A).unwrap();
        assert_eq!(rec.pin.as_ref().unwrap().pin_tries_left, 2, "{rec:?}");
        assert_eq!(rec.state, McimState::Activated);
    }

    /// NV writes per operation, counted by the TPM backend (NV_DefineSpace, NV_Increment of
    /// an ordinary counter, NV_Write of an ordinary index, EvictControl; an orderly counter's
    /// increment only when it rolls over). A durable registry transaction writes NV twice:
    /// the rollback counter and the audit anchor. An AKA (accepted or refused, both audited)
    /// advances the hybrid counter in the TPM's RAM and writes none.
    #[test]
    fn nv_writes_per_operation_are_counted() {
        let dev = Device::new();
        let mut reg = dev.open();
        let nv = |reg: &mut Registry| reg.tre().nv_write_count().unwrap();
        let mut last = nv(&mut reg);
        let mut step = |reg: &mut Registry, what: &str, want: u64| {
            let now = nv(reg);
            assert_eq!(now - last, want, "{what}");
            last = now;
        };
        install(&mut reg, IMSI_A, None);
        step(&mut reg, "install", 2);
        reg.apply(IMSI_A, Op::Activate).unwrap();
        step(&mut reg, "activate", 2);
        reg.select(IMSI_A, None).unwrap();
        step(&mut reg, "select", 2);
        for seq in 1..=3u8 {
            let v = av(IMSI_A, seq);
            reg.authenticate(IMSI_A, &v.rand, &v.autn).unwrap();
            step(&mut reg, "AKA", 0);
        }
        let mut forged = av(IMSI_A, 9);
        forged.autn.0[15] ^= 1;
        assert!(
            reg.authenticate(IMSI_A, &forged.rand, &forged.autn)
                .is_err()
        );
        // The refusal is audited: a committed transaction too.
        step(&mut reg, "refused AKA", 0);
        let h = reg.tre().hybrid_counter().unwrap().unwrap();
        assert_ne!(
            h.value & h.orderly_mask,
            0,
            "no rollover in this run ({h:?}): a rollover would be one NV write"
        );
        reg.apply(IMSI_A, Op::EndSession).unwrap();
        step(&mut reg, "end session", 2);
        reg.apply(IMSI_A, Op::Delete).unwrap();
        step(&mut reg, "delete", 2);
        drop(reg);
        // The TPM's own account (tpm2-tools): the AKA counter is an orderly (hybrid) counter.
        let out = dev.tpm.tpm2("tpm2_nvreadpublic", &[]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{text}");
        let counter = text
            .split("\n0x")
            .find(|s| s.starts_with("1500103"))
            .unwrap_or_else(|| panic!("0x1500103 in {text}"));
        assert!(
            counter.contains("orderly") && counter.contains("nt=0x1"),
            "{counter}"
        );
    }

    #[test]
    fn every_allowed_transition_works_and_every_forbidden_one_changes_nothing() {
        let dev = Device::new();
        let mut reg = dev.open();
        install(&mut reg, IMSI_A, None);
        assert_eq!(state(&reg, IMSI_A), McimState::Installed);

        let ops = [
            Op::Activate,
            Op::EndSession,
            Op::Block(BlockReason::Requested),
            Op::Unblock,
            Op::Retire,
        ];
        // From each reachable state, every forbidden op is refused and no file changes.
        let check_forbidden = |reg: &mut Registry, allowed: &[Op]| {
            let before = snapshot(dev.dir());
            let s = state(reg, IMSI_A);
            for op in ops {
                if allowed.contains(&op) {
                    continue;
                }
                let err = reg.apply(IMSI_A, op).unwrap_err();
                assert!(
                    matches!(err, RegistryError::Lifecycle(_)),
                    "{s:?} {op:?}: {err}"
                );
            }
            if s != McimState::Activated {
                assert!(reg.select(IMSI_A, None).is_err(), "select from {s:?}");
            }
            assert_eq!(state(reg, IMSI_A), s);
            assert_eq!(
                snapshot(dev.dir()),
                before,
                "refusals from {s:?} wrote nothing"
            );
        };

        check_forbidden(&mut reg, &[Op::Activate, Op::Retire]);
        assert_eq!(
            reg.apply(IMSI_A, Op::Activate).unwrap(),
            McimState::Activated
        );
        check_forbidden(&mut reg, &[Op::Block(BlockReason::Requested), Op::Retire]);
        reg.select(IMSI_A, None).unwrap();
        assert_eq!(state(&reg, IMSI_A), McimState::Selected);
        check_forbidden(&mut reg, &[Op::EndSession]);
        let before = snapshot(dev.dir());
        assert!(matches!(
            reg.apply(IMSI_A, Op::Delete),
            Err(RegistryError::Lifecycle(_))
        ));
        assert_eq!(snapshot(dev.dir()), before, "Selected is never deleted");
        assert_eq!(
            reg.apply(IMSI_A, Op::EndSession).unwrap(),
            McimState::Activated
        );
        assert_eq!(
            reg.apply(IMSI_A, Op::Block(BlockReason::Requested))
                .unwrap(),
            McimState::Blocked
        );
        check_forbidden(&mut reg, &[Op::Unblock, Op::Retire]);
        assert_eq!(
            reg.apply(IMSI_A, Op::Unblock).unwrap(),
            McimState::Activated
        );
        assert_eq!(reg.apply(IMSI_A, Op::Retire).unwrap(), McimState::Retired);
        assert!(
            reg.get(IMSI_A).unwrap().secrets.is_none(),
            "retired: credentials gone"
        );
        check_forbidden(&mut reg, &[]);
        assert_eq!(reg.apply(IMSI_A, Op::Delete).unwrap(), McimState::Deleted);
        assert!(matches!(reg.get(IMSI_A), Err(RegistryError::NotFound(_))));

        // Deletion from Installed and from Blocked too.
        install(&mut reg, IMSI_B, None);
        assert_eq!(reg.apply(IMSI_B, Op::Delete).unwrap(), McimState::Deleted);
        install(&mut reg, IMSI_B, None);
        reg.apply(IMSI_B, Op::Activate).unwrap();
        reg.apply(IMSI_B, Op::Block(BlockReason::Requested))
            .unwrap();
        assert_eq!(reg.apply(IMSI_B, Op::Delete).unwrap(), McimState::Deleted);

        // Every transition is in the audit record.
        let audit = reg.audit().unwrap();
        assert!(audit.iter().filter(|e| e.event == "lifecycle").count() >= 9);
        assert!(audit.iter().any(|e| e.detail.contains("Retired")));
    }

    #[test]
    fn one_selected_mcim_at_a_time() {
        let dev = Device::new();
        let mut reg = dev.open();
        install(&mut reg, IMSI_A, None);
        install(&mut reg, IMSI_B, None);
        reg.apply(IMSI_A, Op::Activate).unwrap();
        reg.apply(IMSI_B, Op::Activate).unwrap();
        reg.select(IMSI_A, None).unwrap();
        let err = reg.select(IMSI_B, None).unwrap_err();
        assert!(
            matches!(err, RegistryError::AnotherSelected(ref id) if id == IMSI_A),
            "{err}"
        );
        assert_eq!(state(&reg, IMSI_B), McimState::Activated);
        reg.apply(IMSI_A, Op::EndSession).unwrap();
        reg.select(IMSI_B, None).unwrap();
        reg.apply(IMSI_B, Op::EndSession).unwrap();

        // The owner chooses B for connectivity: A can no longer be selected until chosen.
        reg.set_connectivity(IMSI_B).unwrap();
        assert_eq!(reg.connectivity(), Some(IMSI_B));
        assert!(matches!(
            reg.select(IMSI_A, None),
            Err(RegistryError::BadRequest(_))
        ));
        assert_eq!(state(&reg, IMSI_A), McimState::Activated);
        reg.select(IMSI_B, None).unwrap();
        assert!(matches!(
            reg.set_connectivity(IMSI_A),
            Err(RegistryError::AnotherSelected(_))
        ));
        reg.apply(IMSI_B, Op::EndSession).unwrap();
        reg.set_connectivity(IMSI_A).unwrap();
        reg.select(IMSI_A, None).unwrap();
        // The choice survives a restart; a blocked MCIM is no longer the choice.
        drop(reg);
        let mut reg = dev.open();
        assert_eq!(reg.connectivity(), Some(IMSI_A));
        reg.apply(IMSI_A, Op::Block(BlockReason::Requested))
            .unwrap();
        assert_eq!(reg.connectivity(), None);
        install(&mut reg, "001010555555555", None);
        assert!(
            matches!(
                reg.set_connectivity("001010555555555"),
                Err(RegistryError::BadRequest(_))
            ),
            "installed, not activated"
        );
    }

    #[test]
    fn change_pin_needs_the_old_one() {
        let dev = Device::new();
        let mut reg = dev.open();
        install(&mut reg, IMSI_A, Some(("1234", "24681357")));
        reg.apply(IMSI_A, Op::Activate).unwrap();
        assert!(matches!(
            reg.change_pin(IMSI_A, "0000", "5555"),
            Err(RegistryError::WrongPin { tries_left: 2 })
        ));
        assert!(matches!(
            reg.change_pin(IMSI_A, "1234", "55"),
            Err(RegistryError::BadRequest(_))
        ));
        reg.change_pin(IMSI_A, "1234", "5555").unwrap();
        assert_eq!(
            reg.get(IMSI_A)
                .unwrap()
                .pin
                .as_ref()
                .unwrap()
                .pin_tries_left,
            3
        );
        reg.select(IMSI_A, Some("5555")).unwrap();
    }

    /// A malformed PIN or PUK cannot be right: refused without costing a try. A malformed
    /// SHO id (control characters that would forge lines in the audit record, or too long)
    /// is refused at install, and nothing is installed.
    #[test]
    fn malformed_pins_cost_no_try_and_malformed_sho_ids_install_nothing() {
        let dev = Device::new();
        let mut reg = dev.open();
        install(&mut reg, IMSI_A, Some(("1234", "24681357")));
        reg.apply(IMSI_A, Op::Activate).unwrap();
        for bad in ["abc", "12", "123456789", "12 34", ""] {
            assert!(
                matches!(
                    reg.verify_pin(IMSI_A, bad),
                    Err(RegistryError::BadRequest(_))
                ),
                "{bad:?}"
            );
        }
        let tries = |reg: &Registry| {
            reg.get(IMSI_A)
                .unwrap()
                .pin
                .as_ref()
                .unwrap()
                .pin_tries_left
        };
        assert_eq!(tries(&reg), 3);
        assert!(matches!(
            reg.unblock_pin(IMSI_A, "nope", "4321"),
            Err(RegistryError::BadRequest(_))
        ));
        assert_eq!(
            reg.get(IMSI_A)
                .unwrap()
                .pin
                .as_ref()
                .unwrap()
                .puk_tries_left,
            10
        );
        let public = reg.tre().device_public().unwrap();
        let (k, opc) = secrets(IMSI_B);
        for sho in [
            "evil\n    9 1796061559 lifecycle x forged",
            "",
            &"s".repeat(254),
            "a b",
        ] {
            let before = reg.audit().unwrap().len();
            let r = reg.install(InstallRequest {
                imsi: Imsi::new(IMSI_B).unwrap(),
                sho: sho.into(),
                wrapped: tpm_wrap(&public, &k, &opc, KForm::Key),
                constants: Constants::default(),
                sqn_profile: SqnProfile::default(),
                pin: None,
                expires_at: None,
                usim: Default::default(),
            });
            assert!(matches!(r, Err(RegistryError::BadRequest(_))), "{sho:?}");
            assert!(matches!(reg.get(IMSI_B), Err(RegistryError::NotFound(_))));
            assert_eq!(reg.audit().unwrap().len(), before);
        }
    }

    #[test]
    fn aka_through_the_registry_keeps_sqn_across_restarts() {
        let dev = Device::new();
        {
            let mut reg = dev.open();
            install(&mut reg, IMSI_A, None);
            reg.apply(IMSI_A, Op::Activate).unwrap();
            let v = av(IMSI_A, 1);
            assert!(
                matches!(
                    reg.authenticate(IMSI_A, &v.rand, &v.autn),
                    Err(RegistryError::BadRequest(_))
                ),
                "AKA needs a selected MCIM"
            );
            reg.select(IMSI_A, None).unwrap();
            match reg.authenticate(IMSI_A, &v.rand, &v.autn).unwrap() {
                DeviceResponse::Success { res, .. } => assert!(res.ct_matches(&v.xres)),
                other => panic!("{other:?}"),
            }
        }
        let mut reg = dev.open();
        // The session ended with the restart.
        assert_eq!(state(&reg, IMSI_A), McimState::Activated);
        reg.select(IMSI_A, None).unwrap();
        let v = av(IMSI_A, 1);
        assert!(
            matches!(
                reg.authenticate(IMSI_A, &v.rand, &v.autn).unwrap(),
                DeviceResponse::SyncFailure { .. }
            ),
            "the replayed AUTN is refused after a restart"
        );
        let v2 = av(IMSI_A, 2);
        assert!(matches!(
            reg.authenticate(IMSI_A, &v2.rand, &v2.autn).unwrap(),
            DeviceResponse::Success { .. }
        ));
        let audit = reg.audit().unwrap();
        assert!(
            audit
                .iter()
                .any(|e| e.detail.contains("synchronisation failure"))
        );
    }

    #[test]
    fn no_k_or_opc_in_any_file_of_the_state_directory() {
        let dev = Device::new();
        let mut reg = dev.open();
        install(&mut reg, IMSI_A, Some(("1234", "24681357")));
        reg.apply(IMSI_A, Op::Activate).unwrap();
        reg.select(IMSI_A, Some("1234")).unwrap();
        let v = av(IMSI_A, 1);
        reg.authenticate(IMSI_A, &v.rand, &v.autn).unwrap();
        let (k, opc) = secrets(IMSI_A);
        let files = snapshot(dev.dir());
        assert!(files.len() >= 3, "{files:?}");
        for (path, bytes) in files {
            for secret in [&k.expose()[..], &opc.expose()[..]] {
                for needle in [
                    secret.to_vec(),
                    hex::encode(secret).into_bytes(),
                    hex::encode_upper(secret).into_bytes(),
                ] {
                    assert!(
                        !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                        "{} holds a secret",
                        path.display()
                    );
                }
            }
            // Nor the PIN or PUK in clear.
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains("24681357"),
                "{} holds the PUK",
                path.display()
            );
        }
    }

    #[test]
    fn one_flipped_byte_in_a_record_blocks_that_mcim_and_the_audit_says_why() {
        let dev = Device::new();
        {
            let mut reg = dev.open();
            install(&mut reg, IMSI_A, None);
            install(&mut reg, IMSI_B, None);
            reg.apply(IMSI_A, Op::Activate).unwrap();
            reg.apply(IMSI_B, Op::Activate).unwrap();
        }
        let rec = std::fs::read_dir(dev.dir().join("mcims"))
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with(IMSI_A))
            .unwrap()
            .path();
        let mut bytes = std::fs::read(&rec).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x01;
        std::fs::write(&rec, bytes).unwrap();

        let mut reg = dev.open();
        assert_eq!(reg.status().lockdown, None);
        let a = reg.get(IMSI_A).unwrap();
        assert_eq!(
            (a.state, a.blocked),
            (McimState::Blocked, Some(BlockReason::Tampered))
        );
        assert!(
            a.secrets.is_none(),
            "nothing of a tampered record is trusted"
        );
        assert_eq!(
            state(&reg, IMSI_B),
            McimState::Activated,
            "the other MCIM is untouched"
        );
        let audit = reg.audit().unwrap();
        let last = audit.iter().rev().find(|e| e.event == "integrity").unwrap();
        assert_eq!(last.mcim.as_deref(), Some(IMSI_A));
        assert!(
            last.detail.contains("integrity check failed"),
            "{}",
            last.detail
        );
        // Never unblocked; it can only be deleted.
        assert!(matches!(
            reg.apply(IMSI_A, Op::Unblock),
            Err(RegistryError::Lifecycle(_))
        ));
        assert_eq!(reg.apply(IMSI_A, Op::Delete).unwrap(), McimState::Deleted);
    }

    #[test]
    fn an_older_copy_of_the_state_directory_is_refused_as_rollback() {
        let dev = Device::new();
        let old = tempfile::tempdir().unwrap();
        {
            let mut reg = dev.open();
            install(&mut reg, IMSI_A, Some(("1234", "12345678")));
            reg.apply(IMSI_A, Op::Activate).unwrap();
            copy_dir(dev.dir(), old.path());
            // Two wrong PINs: the attacker would like those counted tries back.
            assert!(reg.verify_pin(IMSI_A, "0000").is_err());
            assert!(reg.verify_pin(IMSI_A, "0000").is_err());
        }
        std::fs::remove_dir_all(dev.dir()).unwrap();
        copy_dir(old.path(), dev.dir());
        let mut reg = dev.open();
        let why = reg.status().lockdown.expect("lockdown");
        assert!(why.contains("rollback"), "{why}");
        assert!(matches!(reg.list(), Err(RegistryError::Lockdown(_))));
        assert!(matches!(
            reg.verify_pin(IMSI_A, "1234"),
            Err(RegistryError::Lockdown(_))
        ));
        assert!(matches!(
            reg.apply(IMSI_A, Op::Block(BlockReason::Requested)),
            Err(RegistryError::Lockdown(_))
        ));
        assert_eq!(
            snapshot(dev.dir()),
            snapshot(old.path()),
            "lockdown writes nothing"
        );
    }

    /// A registry with IMSI_A installed, activated and selected: ready for AKA.
    fn selected(dev: &Device) -> Registry {
        let mut reg = dev.open();
        install(&mut reg, IMSI_A, None);
        reg.apply(IMSI_A, Op::Activate).unwrap();
        reg.select(IMSI_A, None).unwrap();
        reg
    }

    fn hybrid(reg: &mut Registry) -> mcim_tre::tre::HybridCount {
        reg.tre().hybrid_counter().unwrap().expect("a TPM has one")
    }

    /// Opens the registry over the copy `old` put back in place, and checks that it is a
    /// rollback of the hybrid counter: lockdown, and nothing written.
    fn open_as_hybrid_rollback(dev: &Device, old: &Path) -> Registry {
        let reg = dev.open();
        let why = reg.status().lockdown.expect("lockdown");
        assert!(why.contains("rollback") && why.contains("hybrid"), "{why}");
        assert_eq!(
            snapshot(dev.dir()),
            snapshot(old),
            "lockdown writes nothing"
        );
        reg
    }

    /// An AKA commits on the hybrid counter alone; a copy of the state directory from between
    /// two AKAs is still a rollback (the attacker wants AUTN 2 accepted again), refused the
    /// same way, and lockdown writes nothing.
    #[test]
    fn a_copy_from_between_two_akas_is_refused_as_rollback() {
        let dev = Device::new();
        let old = tempfile::tempdir().unwrap();
        let (a1, a2) = (av(IMSI_A, 1), av(IMSI_A, 2));
        {
            let mut reg = selected(&dev);
            reg.authenticate(IMSI_A, &a1.rand, &a1.autn).unwrap();
            copy_dir(dev.dir(), old.path());
            reg.authenticate(IMSI_A, &a2.rand, &a2.autn).unwrap();
        }
        std::fs::remove_dir_all(dev.dir()).unwrap();
        copy_dir(old.path(), dev.dir());
        let mut reg = open_as_hybrid_rollback(&dev, old.path());
        assert!(matches!(
            reg.authenticate(IMSI_A, &a2.rand, &a2.autn),
            Err(RegistryError::Lockdown(_))
        ));
        assert_eq!(
            snapshot(dev.dir()),
            snapshot(old.path()),
            "lockdown writes nothing"
        );
    }

    /// While the TPM runs, the hybrid counter must match exactly: a copy from the same block
    /// of MAX_ORDERLY_COUNT + 1 values is refused even when the live counter sits where a
    /// jump would have put it (its low bits all set). Only a TPM reset (its resetCount moved,
    /// as a verified quote reports it) lets a jump be accepted.
    #[test]
    fn a_copy_a_jump_would_explain_is_refused_while_the_tpm_ran() {
        let dev = Device::new();
        let old = tempfile::tempdir().unwrap();
        let mut n = 1u16;
        let mut aka = |reg: &mut Registry| {
            let a = av_n(IMSI_A, n);
            n += 1;
            reg.authenticate(IMSI_A, &a.rand, &a.autn).unwrap();
        };
        {
            let mut reg = selected(&dev);
            // AKAs until the next one sets the counter's low bits.
            for _ in 0..=1024 {
                let h = hybrid(&mut reg);
                if h.value & h.orderly_mask == h.orderly_mask - 1 {
                    break;
                }
                aka(&mut reg);
            }
            copy_dir(dev.dir(), old.path());
            aka(&mut reg);
            let h = hybrid(&mut reg);
            assert_eq!(h.value & h.orderly_mask, h.orderly_mask, "{h:?}");
        }
        std::fs::remove_dir_all(dev.dir()).unwrap();
        copy_dir(old.path(), dev.dir());
        open_as_hybrid_rollback(&dev, old.path());
    }

    /// The outside attacks that beat an NV reset marker and then the plain resetCount
    /// (session 9): with the owner's empty authorisation, tpm2-tools pushes the hybrid counter
    /// up to where a jump from an older copy would have put it, and swaps the key at the
    /// attestation key's handle; without a TPM reset the copy is still a rollback, because
    /// the reset epoch is the TPM's resetCount under the same attestation key, from a
    /// verified quote.
    #[test]
    fn a_counter_pushed_by_tpm2_tools_is_no_jump_without_a_reset() {
        let dev = Device::new();
        let old = tempfile::tempdir().unwrap();
        let (a1, a2) = (av(IMSI_A, 1), av(IMSI_A, 2));
        let (committed, mask) = {
            let mut reg = selected(&dev);
            reg.authenticate(IMSI_A, &a1.rand, &a1.autn).unwrap();
            let h = hybrid(&mut reg);
            copy_dir(dev.dir(), old.path());
            reg.authenticate(IMSI_A, &a2.rand, &a2.autn).unwrap();
            (h.value, h.orderly_mask)
        };
        std::fs::remove_dir_all(dev.dir()).unwrap();
        copy_dir(old.path(), dev.dir());
        let target = committed | mask;
        let read = || {
            let out = dev.tpm.tpm2("tpm2_nvread", &["-C", "o", "0x1500103"]);
            assert!(out.status.success(), "{}", output_text(&out));
            u64::from_be_bytes(out.stdout[..8].try_into().unwrap())
        };
        let mut now = read();
        while now < target {
            let out = dev.tpm.tpm2("tpm2_nvincrement", &["-C", "o", "0x1500103"]);
            assert!(out.status.success(), "{}", output_text(&out));
            now += 1;
        }
        assert_eq!(read(), target);
        drop(open_as_hybrid_rollback(&dev, old.path()));
        // The second outside attack: another restricted signing key at the attestation
        // key's handle changes the obfuscated resetCount without a reset. The epoch names
        // its key, so that is no reset either.
        let dir = tempfile::tempdir().unwrap();
        let f = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
        for args in [
            vec!["tpm2_evictcontrol", "-C", "o", "-c", "0x81000101"],
            vec![
                "tpm2_create",
                "-C",
                "0x81000100",
                "-G",
                "ecc256:ecdsa-sha256:null",
                "-a",
                "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|sign",
                "-u",
                &f("ak.pub"),
                "-r",
                &f("ak.priv"),
            ],
            vec!["tpm2_flushcontext", "--transient-object"],
            vec![
                "tpm2_load",
                "-C",
                "0x81000100",
                "-u",
                &f("ak.pub"),
                "-r",
                &f("ak.priv"),
                "-c",
                &f("ak.ctx"),
            ],
            vec![
                "tpm2_evictcontrol",
                "-C",
                "o",
                "-c",
                &f("ak.ctx"),
                "0x81000101",
            ],
            vec!["tpm2_flushcontext", "--transient-object"],
        ] {
            let out = dev.tpm.tpm2(args[0], &args[1..]);
            assert!(out.status.success(), "{args:?}: {}", output_text(&out));
        }
        open_as_hybrid_rollback(&dev, old.path());
    }

    /// A TPM reset without TPM2_Shutdown (power lost: swtpm killed) advances the hybrid
    /// counter past every value it returned. The registry accepts that jump, audits it, and
    /// goes on with its SQN state intact; the increment after the jump rolls the low bits
    /// over, the one NV write of its block.
    #[test]
    fn a_tpm_reset_without_shutdown_is_accepted_and_audited() {
        let mut dev = Device::new();
        let (a1, a2, a3) = (av(IMSI_A, 1), av(IMSI_A, 2), av(IMSI_A, 3));
        let before = {
            let mut reg = selected(&dev);
            reg.authenticate(IMSI_A, &a1.rand, &a1.autn).unwrap();
            reg.authenticate(IMSI_A, &a2.rand, &a2.autn).unwrap();
            hybrid(&mut reg)
        };
        dev.tpm.restart();
        let mut reg = dev.open();
        let st = reg.status();
        assert_eq!(st.lockdown, None, "{st:?}");
        assert!(
            st.startup
                .iter()
                .any(|s| s.contains("without TPM2_Shutdown")),
            "{st:?}"
        );
        let h = hybrid(&mut reg);
        assert!(
            h.value > before.value && h.value & h.orderly_mask == h.orderly_mask,
            "{before:?} -> {h:?}"
        );
        assert_ne!(
            h.reset_epoch, before.reset_epoch,
            "the TPM's resetCount moved"
        );
        let audit = reg.audit().unwrap();
        assert!(
            audit
                .iter()
                .any(|e| e.event == "integrity" && e.detail.contains("jumped")),
            "{audit:?}"
        );
        assert!(reg.verify_audit().unwrap().ok);
        reg.select(IMSI_A, None).unwrap();
        let nv0 = reg.tre().nv_write_count().unwrap();
        assert!(
            matches!(
                reg.authenticate(IMSI_A, &a2.rand, &a2.autn).unwrap(),
                DeviceResponse::SyncFailure { .. }
            ),
            "the SQN state stands: AUTN 2 again is refused"
        );
        assert!(matches!(
            reg.authenticate(IMSI_A, &a3.rand, &a3.autn).unwrap(),
            DeviceResponse::Success { .. }
        ));
        assert_eq!(
            reg.tre().nv_write_count().unwrap() - nv0,
            1,
            "the first increment after the jump rolls over"
        );
        drop(reg);
        assert_eq!(dev.open().status().lockdown, None);
    }

    /// What a jump cannot be told from, as docs/architecture.md §3 says: a copy of the state
    /// directory up to MAX_ORDERLY_COUNT AKAs old, put back while the TPM loses power, is
    /// accepted, and an AUTN accepted after the copy was taken is accepted again.
    #[test]
    fn a_copy_restored_across_a_tpm_reset_is_the_documented_window() {
        let mut dev = Device::new();
        let old = tempfile::tempdir().unwrap();
        let (a1, a2) = (av(IMSI_A, 1), av(IMSI_A, 2));
        {
            let mut reg = selected(&dev);
            reg.authenticate(IMSI_A, &a1.rand, &a1.autn).unwrap();
            copy_dir(dev.dir(), old.path());
            reg.authenticate(IMSI_A, &a2.rand, &a2.autn).unwrap();
        }
        dev.tpm.restart();
        std::fs::remove_dir_all(dev.dir()).unwrap();
        copy_dir(old.path(), dev.dir());
        let mut reg = dev.open();
        let st = reg.status();
        assert_eq!(st.lockdown, None, "{st:?}");
        reg.select(IMSI_A, None).unwrap();
        assert!(
            matches!(
                reg.authenticate(IMSI_A, &a2.rand, &a2.autn).unwrap(),
                DeviceResponse::Success { .. }
            ),
            "AUTN 2, accepted before, is accepted again"
        );
    }

    /// An AKA cut after its commit point (header written, hybrid counter not yet advanced)
    /// is completed at the next start: its SQN state stands.
    #[test]
    fn an_aka_cut_after_its_commit_point_is_completed_at_the_next_start() {
        let dev = Device::new();
        let (a1, a2) = (av(IMSI_A, 1), av(IMSI_A, 2));
        {
            let (mut reg, hybrid_cut) = dev.open_faulty_hybrid();
            install(&mut reg, IMSI_A, None);
            reg.apply(IMSI_A, Op::Activate).unwrap();
            reg.select(IMSI_A, None).unwrap();
            reg.authenticate(IMSI_A, &a1.rand, &a1.autn).unwrap();
            hybrid_cut.set(true);
            assert!(
                reg.authenticate(IMSI_A, &a2.rand, &a2.autn).is_err(),
                "the cut is reported"
            );
        }
        let mut reg = dev.open();
        let st = reg.status();
        assert_eq!(st.lockdown, None, "{st:?}");
        assert!(
            st.startup
                .iter()
                .any(|s| s.contains("AKA's commit cut short")),
            "{st:?}"
        );
        reg.select(IMSI_A, None).unwrap();
        assert!(
            matches!(
                reg.authenticate(IMSI_A, &a2.rand, &a2.autn).unwrap(),
                DeviceResponse::SyncFailure { .. }
            ),
            "the committed SQN state stands"
        );
        drop(reg);
        assert_eq!(dev.open().status().lockdown, None);
    }

    #[test]
    fn a_broken_audit_chain_is_lockdown() {
        for damage in ["edit", "drop", "truncate_committed"] {
            let dev = Device::new();
            {
                let mut reg = dev.open();
                install(&mut reg, IMSI_A, None);
                reg.apply(IMSI_A, Op::Activate).unwrap();
                reg.apply(IMSI_A, Op::Block(BlockReason::Requested))
                    .unwrap();
            }
            let path = dev.dir().join("audit.log");
            let text = std::fs::read_to_string(&path).unwrap();
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            match damage {
                "edit" => lines[1] = lines[1].replace("installed", "INSTALLED"),
                "drop" => {
                    lines.remove(1);
                }
                _ => {
                    lines.pop();
                }
            }
            std::fs::write(&path, lines.join("\n") + "\n").unwrap();
            let reg = dev.open();
            let why = reg
                .status()
                .lockdown
                .unwrap_or_else(|| panic!("{damage}: no lockdown"));
            assert!(why.contains("audit"), "{damage}: {why}");
            assert!(matches!(reg.get(IMSI_A), Err(RegistryError::Lockdown(_))));
        }
    }

    #[test]
    fn a_tampered_header_is_lockdown() {
        let dev = Device::new();
        {
            let mut reg = dev.open();
            install(&mut reg, IMSI_A, None);
        }
        let path = dev.dir().join("header.json");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replacen("\"format\": 1", "\"format\": 2", 1)).unwrap();
        let reg = dev.open();
        assert!(reg.status().lockdown.unwrap().contains("header"));
        // Removing it altogether is no better.
        drop(reg);
        std::fs::remove_file(&path).unwrap();
        assert!(dev.open().status().lockdown.unwrap().contains("missing"));
    }

    #[test]
    fn pin_runs_out_blocks_the_mcim_and_the_puk_unblocks_it_across_restarts() {
        let dev = Device::new();
        {
            let mut reg = dev.open();
            install(&mut reg, IMSI_A, Some(("1234", "12345678")));
            reg.apply(IMSI_A, Op::Activate).unwrap();
            assert!(matches!(
                reg.select(IMSI_A, None),
                Err(RegistryError::BadRequest(_))
            ));
            assert!(matches!(
                reg.verify_pin(IMSI_A, "9999"),
                Err(RegistryError::WrongPin { tries_left: 2 })
            ));
            assert!(matches!(
                reg.verify_pin(IMSI_A, "9999"),
                Err(RegistryError::WrongPin { tries_left: 1 })
            ));
        }
        // The counter survives a restart.
        let mut reg = dev.open();
        assert_eq!(
            reg.get(IMSI_A)
                .unwrap()
                .pin
                .as_ref()
                .unwrap()
                .pin_tries_left,
            1
        );
        assert!(matches!(
            reg.select(IMSI_A, Some("9999")),
            Err(RegistryError::WrongPin { tries_left: 0 })
        ));
        let a = reg.get(IMSI_A).unwrap();
        assert_eq!(
            (a.state, a.blocked),
            (McimState::Blocked, Some(BlockReason::PinBlocked))
        );
        // Even the right PIN is refused now, and a plain unblock is not enough.
        assert!(reg.verify_pin(IMSI_A, "1234").is_err());
        assert!(matches!(
            reg.apply(IMSI_A, Op::Unblock),
            Err(RegistryError::BadRequest(_))
        ));
        assert!(matches!(
            reg.unblock_pin(IMSI_A, "00000000", "4321"),
            Err(RegistryError::WrongPuk { tries_left: 9 })
        ));
        assert_eq!(state(&reg, IMSI_A), McimState::Blocked);
        reg.unblock_pin(IMSI_A, "12345678", "4321").unwrap();
        assert_eq!(state(&reg, IMSI_A), McimState::Activated);
        assert!(
            reg.select(IMSI_A, Some("1234")).is_err(),
            "the old PIN is gone"
        );
        reg.select(IMSI_A, Some("4321")).unwrap();
        assert!(
            matches!(
                reg.install(InstallRequest {
                    imsi: Imsi::new(IMSI_B).unwrap(),
                    sho: "x".into(),
                    wrapped: mcim_tre::tre::WrappedSecrets {
                        k: vec![1],
                        opc: vec![2]
                    },
                    constants: Constants::default(),
                    sqn_profile: SqnProfile::default(),
                    pin: Some(("12".into(), "12345678".into())),
                    expires_at: None,
                    usim: Default::default(),
                }),
                Err(RegistryError::BadRequest(_))
            ),
            "a 2-digit PIN is refused"
        );
        assert!(
            matches!(reg.get(IMSI_B), Err(RegistryError::NotFound(_))),
            "and nothing was installed"
        );
    }

    /// A real TPM TRE that fails on command: `fail_mac_in` fails the n-th next integrity MAC,
    /// `fail_advance` the next counter advance (a power cut at that point, as far as the registry
    /// can tell). Everything else goes to the TPM.
    struct Faulty {
        inner: TpmTre,
        fail_mac_in: std::rc::Rc<std::cell::Cell<u32>>,
        fail_advance: std::rc::Rc<std::cell::Cell<bool>>,
        fail_anchor: std::rc::Rc<std::cell::Cell<bool>>,
        fail_hybrid: std::rc::Rc<std::cell::Cell<bool>>,
    }

    fn cut() -> mcim_tre::tre::TreError {
        mcim_tre::tre::TreError::Command {
            command: "power cut",
            detail: "injected".into(),
        }
    }

    impl Tre for Faulty {
        fn backend_name(&self) -> &'static str {
            self.inner.backend_name()
        }
        fn capabilities(&self) -> &mcim_tre::tre::Capabilities {
            self.inner.capabilities()
        }
        fn identity(&mut self) -> Result<Option<DeviceIdentity>, mcim_tre::tre::TreError> {
            self.inner.identity()
        }
        fn device_public(
            &mut self,
        ) -> Result<mcim_tre::tre::DevicePublic, mcim_tre::tre::TreError> {
            self.inner.device_public()
        }
        fn import_mcim_secrets(
            &mut self,
            w: &mcim_tre::tre::WrappedSecrets,
        ) -> Result<mcim_tre::tre::ProtectedSecrets, mcim_tre::tre::TreError> {
            self.inner.import_mcim_secrets(w)
        }
        fn integrity_mac(&mut self, d: &[u8; 32]) -> Result<[u8; 32], mcim_tre::tre::TreError> {
            match self.fail_mac_in.get() {
                0 => self.inner.integrity_mac(d),
                1 => {
                    self.fail_mac_in.set(0);
                    Err(cut())
                }
                n => {
                    self.fail_mac_in.set(n - 1);
                    self.inner.integrity_mac(d)
                }
            }
        }
        fn rollback_counter(&mut self) -> Result<u64, mcim_tre::tre::TreError> {
            self.inner.rollback_counter()
        }
        fn advance_rollback_counter(&mut self) -> Result<u64, mcim_tre::tre::TreError> {
            if self.fail_advance.replace(false) {
                return Err(cut());
            }
            self.inner.advance_rollback_counter()
        }
        fn hybrid_counter(
            &mut self,
        ) -> Result<Option<mcim_tre::tre::HybridCount>, mcim_tre::tre::TreError> {
            self.inner.hybrid_counter()
        }
        fn advance_hybrid_counter(&mut self) -> Result<u64, mcim_tre::tre::TreError> {
            if self.fail_hybrid.replace(false) {
                return Err(cut());
            }
            self.inner.advance_hybrid_counter()
        }
        fn authenticate(
            &mut self,
            s: &mcim_tre::tre::ProtectedSecrets,
            sqn: &mut mcim_core::aka::MsSqnState,
            ch: &mcim_tre::tre::AkaChallenge<'_>,
        ) -> Result<DeviceResponse, mcim_tre::tre::TreError> {
            self.inner.authenticate(s, sqn, ch)
        }
        fn audit_anchor(&mut self) -> Result<mcim_tre::tre::AuditAnchor, mcim_tre::tre::TreError> {
            self.inner.audit_anchor()
        }
        fn set_audit_anchor(
            &mut self,
            a: &mcim_tre::tre::AuditAnchor,
        ) -> Result<(), mcim_tre::tre::TreError> {
            if self.fail_anchor.replace(false) {
                return Err(cut());
            }
            self.inner.set_audit_anchor(a)
        }
    }

    impl Device {
        fn open_faulty(
            &self,
        ) -> (
            Registry,
            std::rc::Rc<std::cell::Cell<u32>>,
            std::rc::Rc<std::cell::Cell<bool>>,
        ) {
            let (reg, mac, adv, _) = self.open_faulty_anchor();
            (reg, mac, adv)
        }

        /// A registry over [`Faulty`], and the switch that fails the next hybrid counter
        /// advance (a power cut right after an AKA's commit point).
        fn open_faulty_hybrid(&self) -> (Registry, std::rc::Rc<std::cell::Cell<bool>>) {
            let hybrid = std::rc::Rc::new(std::cell::Cell::new(false));
            let t = Faulty {
                inner: TpmTre::open(&TpmConfig {
                    tcti: self.tpm.tcti(),
                })
                .unwrap(),
                fail_mac_in: std::rc::Rc::default(),
                fail_advance: std::rc::Rc::default(),
                fail_anchor: std::rc::Rc::default(),
                fail_hybrid: hybrid.clone(),
            };
            (Registry::open(self.dir(), Box::new(t)).unwrap(), hybrid)
        }

        /// [`Device::open_faulty`], and the switch that fails the next anchor write.
        #[allow(clippy::type_complexity)]
        fn open_faulty_anchor(
            &self,
        ) -> (
            Registry,
            std::rc::Rc<std::cell::Cell<u32>>,
            std::rc::Rc<std::cell::Cell<bool>>,
            std::rc::Rc<std::cell::Cell<bool>>,
        ) {
            let mac = std::rc::Rc::new(std::cell::Cell::new(0));
            let adv = std::rc::Rc::new(std::cell::Cell::new(false));
            let anchor = std::rc::Rc::new(std::cell::Cell::new(false));
            let t = Faulty {
                inner: TpmTre::open(&TpmConfig {
                    tcti: self.tpm.tcti(),
                })
                .unwrap(),
                fail_mac_in: mac.clone(),
                fail_advance: adv.clone(),
                fail_anchor: anchor.clone(),
                fail_hybrid: std::rc::Rc::default(),
            };
            (
                Registry::open(self.dir(), Box::new(t)).unwrap(),
                mac,
                adv,
                anchor,
            )
        }
    }

    #[test]
    fn a_transaction_cut_after_its_commit_point_is_completed_at_the_next_start() {
        let dev = Device::new();
        {
            let (mut reg, _, advance) = dev.open_faulty();
            install(&mut reg, IMSI_A, None);
            advance.set(true);
            assert!(
                reg.apply(IMSI_A, Op::Activate).is_err(),
                "the cut is reported"
            );
        }
        let mut reg = dev.open();
        let st = reg.status();
        assert_eq!(st.lockdown, None, "{st:?}");
        assert!(st.startup.iter().any(|s| s.contains("cut short")), "{st:?}");
        assert_eq!(
            state(&reg, IMSI_A),
            McimState::Activated,
            "the committed transaction stands"
        );
        assert!(reg.verify_audit().unwrap().ok);
        // And the registry goes on normally.
        reg.apply(IMSI_A, Op::Block(BlockReason::Requested))
            .unwrap();
        drop(reg);
        assert_eq!(dev.open().status().lockdown, None);
    }

    /// A cut between the two TRE writes after the commit point (the counter advanced, the
    /// anchor not yet moved; found by killing tred -9 while remote instructions ran) is
    /// completed at the next start, not taken for a disagreeing audit record.
    #[test]
    fn a_transaction_cut_between_the_tre_counter_and_the_anchor_is_completed() {
        let dev = Device::new();
        {
            let (mut reg, _, _, anchor) = dev.open_faulty_anchor();
            install(&mut reg, IMSI_A, None);
            anchor.set(true);
            assert!(
                reg.apply(IMSI_A, Op::Activate).is_err(),
                "the cut is reported"
            );
        }
        let mut reg = dev.open();
        let st = reg.status();
        assert_eq!(st.lockdown, None, "{st:?}");
        assert!(
            st.startup
                .iter()
                .any(|s| s.contains("between the TRE's counter and its anchor")),
            "{st:?}"
        );
        assert_eq!(state(&reg, IMSI_A), McimState::Activated);
        assert!(reg.verify_audit().unwrap().ok);
        drop(reg);
        // In the same process: the next transaction moves the anchor first and never advances
        // the counter twice.
        {
            let (mut reg, _, _, anchor) = dev.open_faulty_anchor();
            anchor.set(true);
            assert!(
                reg.apply(IMSI_A, Op::Block(BlockReason::Requested))
                    .is_err()
            );
            reg.apply(IMSI_A, Op::Unblock).unwrap();
            assert_eq!(reg.status().lockdown, None);
        }
        let reg = dev.open();
        assert_eq!(reg.status().lockdown, None, "{:?}", reg.status());
        assert_eq!(state(&reg, IMSI_A), McimState::Activated);
    }

    #[test]
    fn a_transaction_cut_before_its_commit_point_changes_nothing() {
        // The 1st MAC of a transaction is the record's, the 2nd the audit entry's, the 3rd the
        // header's: cut at each.
        for nth in 1..=3 {
            let dev = Device::new();
            {
                let (mut reg, mac, _) = dev.open_faulty();
                install(&mut reg, IMSI_A, None);
                mac.set(nth);
                assert!(reg.apply(IMSI_A, Op::Activate).is_err(), "cut at MAC {nth}");
                assert_eq!(
                    state(&reg, IMSI_A),
                    McimState::Installed,
                    "memory unchanged ({nth})"
                );
            }
            let mut reg = dev.open();
            let st = reg.status();
            assert_eq!(st.lockdown, None, "cut at MAC {nth}: {st:?}");
            assert_eq!(
                state(&reg, IMSI_A),
                McimState::Installed,
                "cut at MAC {nth}"
            );
            if nth == 3 {
                assert!(
                    st.startup.iter().any(|s| s.contains("did not commit")),
                    "{st:?}"
                );
                // The entry that did not commit stays in the file (the chain runs through
                // it) but is not part of the record the owner reads.
                let lines = std::fs::read_to_string(dev.dir().join("audit.log"))
                    .unwrap()
                    .lines()
                    .count();
                let listed = reg.audit().unwrap();
                assert_eq!(listed.len() + 1, lines, "{listed:?}");
            }
            // Left-over record files of the cut transaction are gone.
            let files: Vec<_> = std::fs::read_dir(dev.dir().join("mcims"))
                .unwrap()
                .flatten()
                .collect();
            assert_eq!(files.len(), 1, "cut at MAC {nth}: {files:?}");
            reg.apply(IMSI_A, Op::Activate).unwrap();
            assert!(reg.verify_audit().unwrap().ok);
        }
    }

    #[test]
    fn an_older_copy_of_one_record_blocks_that_mcim() {
        let dev = Device::new();
        let old = {
            let mut reg = dev.open();
            install(&mut reg, IMSI_A, Some(("1234", "24681357")));
            let v1 =
                std::fs::read(dev.dir().join("mcims").join(format!("{IMSI_A}.1.json"))).unwrap();
            reg.apply(IMSI_A, Op::Activate).unwrap();
            assert!(reg.verify_pin(IMSI_A, "0000").is_err());
            v1
        };
        // The attacker puts the older record (full PIN tries) under the current name.
        let current = std::fs::read_dir(dev.dir().join("mcims"))
            .unwrap()
            .flatten()
            .next()
            .unwrap()
            .path();
        std::fs::write(&current, old).unwrap();
        let reg = dev.open();
        let a = reg.get(IMSI_A).unwrap();
        assert_eq!(
            (a.state, a.blocked),
            (McimState::Blocked, Some(BlockReason::Tampered))
        );
    }

    fn supplier() -> p256::ecdsa::SigningKey {
        use p256::elliptic_curve::Generate;
        p256::ecdsa::SigningKey::generate_from_rng(&mut rand::rng())
    }

    fn token(reg: &mut Registry, key: &p256::ecdsa::SigningKey) -> Vec<u8> {
        let pcid = reg.tre().identity().unwrap().unwrap().pcid;
        let counter = reg.tre().rollback_counter().unwrap();
        mcim_core::rehabilitation::issue(key, &pcid, counter).unwrap()
    }

    #[test]
    fn the_suppliers_token_lifts_a_rollback_lockdown_once() {
        let dev = Device::new();
        let key = supplier();
        let old = tempfile::tempdir().unwrap();
        {
            let mut reg = dev.open();
            install(&mut reg, IMSI_A, None);
            reg.apply(IMSI_A, Op::Activate).unwrap();
            copy_dir(dev.dir(), old.path());
            reg.apply(IMSI_A, Op::Block(BlockReason::Requested))
                .unwrap();
        }
        std::fs::remove_dir_all(dev.dir()).unwrap();
        copy_dir(old.path(), dev.dir());
        let mut reg = dev.open();
        assert!(reg.status().lockdown.is_some());
        // Refused: not in lockdown yet is moot; a stranger's token, a token for a later counter.
        let stranger = token(&mut reg, &supplier());
        let vk = p256::ecdsa::VerifyingKey::from(&key);
        assert!(matches!(
            reg.rehabilitate(&stranger, &vk),
            Err(RegistryError::Unauthorised(_))
        ));
        let pcid = reg.tre().identity().unwrap().unwrap().pcid;
        let c = reg.tre().rollback_counter().unwrap();
        let future = mcim_core::rehabilitation::issue(&key, &pcid, c + 1).unwrap();
        assert!(matches!(
            reg.rehabilitate(&future, &vk),
            Err(RegistryError::Unauthorised(_))
        ));
        assert!(
            reg.status().lockdown.is_some(),
            "refused tokens change nothing"
        );

        let good = token(&mut reg, &key);
        reg.rehabilitate(&good, &vk).unwrap();
        assert_eq!(reg.status().lockdown, None);
        // The old copy's records verify against its own header: kept as they were.
        assert_eq!(state(&reg, IMSI_A), McimState::Activated);
        let audit = reg.audit().unwrap();
        assert_eq!(audit[0].event, "rehabilitation");
        assert!(audit[0].detail.contains("rollback"), "{}", audit[0].detail);
        assert!(reg.verify_audit().unwrap().ok);
        assert!(std::fs::read_dir(dev.dir()).unwrap().flatten().any(|f| {
            f.file_name()
                .to_string_lossy()
                .starts_with("audit.log.lockdown-")
        }));
        // The same token does not work twice, and the registry survives a restart.
        assert!(matches!(
            reg.rehabilitate(&good, &vk),
            Err(RegistryError::BadRequest(_))
        ));
        drop(reg);
        let reg = dev.open();
        assert_eq!(reg.status().lockdown, None);
        assert_eq!(state(&reg, IMSI_A), McimState::Activated);
    }

    #[test]
    fn rehabilitation_after_a_forged_header_blocks_every_mcim() {
        let dev = Device::new();
        let key = supplier();
        {
            let mut reg = dev.open();
            install(&mut reg, IMSI_A, None);
            install(&mut reg, IMSI_B, None);
            reg.apply(IMSI_A, Op::Activate).unwrap();
        }
        let path = dev.dir().join("header.json");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replacen("\"format\": 1", "\"format\": 1 ", 1)
                .replacen("\"counter\"", "\"counter\" ", 1),
        )
        .unwrap();
        let mut reg = dev.open();
        assert!(reg.status().lockdown.is_some());
        let t = token(&mut reg, &key);
        reg.rehabilitate(&t, &p256::ecdsa::VerifyingKey::from(&key))
            .unwrap();
        for id in [IMSI_A, IMSI_B] {
            let r = reg.get(id).unwrap();
            assert_eq!(
                (r.state, r.blocked),
                (McimState::Blocked, Some(BlockReason::Tampered)),
                "{id}"
            );
            assert!(r.secrets.is_none());
        }
        assert!(reg.verify_audit().unwrap().ok);
    }
}

/// The same registry on a PKCS#11 token (SoftHSM2, one token per test).
#[cfg(feature = "pkcs11")]
mod on_token {
    use super::*;
    use mcim_e2e::{SOFTHSM2_LABEL, SOFTHSM2_MODULE, SOFTHSM2_PIN, SoftHsm, own_softhsm};
    use mcim_tre::tre::pkcs11::{Pkcs11Config, Pkcs11Tre};

    fn tre() -> Pkcs11Tre {
        Pkcs11Tre::open(&Pkcs11Config {
            module: SOFTHSM2_MODULE.into(),
            token_label: SOFTHSM2_LABEL.into(),
            pin: SOFTHSM2_PIN.to_string().into(),
            force_rsa_unwrap: false,
        })
        .unwrap()
    }

    fn install_on(reg: &mut Registry, imsi: &str) {
        let (k, opc) = secrets(imsi);
        let public = reg.tre().device_public().unwrap();
        let w = |s: &[u8]| {
            mcim_core::token_wrap::wrap_for_token(&public.storage_public, s)
                .unwrap()
                .to_bytes()
        };
        reg.install(InstallRequest {
            imsi: Imsi::new(imsi).unwrap(),
            sho: "sho.example".into(),
            wrapped: mcim_tre::tre::WrappedSecrets {
                k: w(k.expose()),
                opc: w(opc.expose()),
            },
            constants: Constants::default(),
            sqn_profile: SqnProfile::default(),
            pin: None,
            expires_at: None,
            usim: Default::default(),
        })
        .unwrap();
    }

    fn setup(_t: &SoftHsm) -> tempfile::TempDir {
        let mut t = tre();
        t.init_device(
            &DeviceIdentity::new("SN-T", Pcid::new("001010000000009").unwrap(), "token").unwrap(),
        )
        .unwrap();
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn lifecycle_aka_tamper_and_missing_objects() {
        let Some(t) = own_softhsm("on_token::lifecycle_aka_tamper_and_missing_objects") else {
            return;
        };
        let dir = setup(&t);
        {
            let mut reg = Registry::open(dir.path(), Box::new(tre())).unwrap();
            install_on(&mut reg, IMSI_A);
            install_on(&mut reg, IMSI_B);
            reg.apply(IMSI_A, Op::Activate).unwrap();
            reg.select(IMSI_A, None).unwrap();
            let v = av(IMSI_A, 1);
            match reg.authenticate(IMSI_A, &v.rand, &v.autn).unwrap() {
                DeviceResponse::Success { res, .. } => assert!(res.ct_matches(&v.xres)),
                other => panic!("{other:?}"),
            }
        }
        let mut reg = Registry::open(dir.path(), Box::new(tre())).unwrap();
        reg.select(IMSI_A, None).unwrap();
        let v = av(IMSI_A, 1);
        assert!(matches!(
            reg.authenticate(IMSI_A, &v.rand, &v.autn).unwrap(),
            DeviceResponse::SyncFailure { .. }
        ));
        let b_id = hex::encode(&reg.get(IMSI_B).unwrap().secrets.as_ref().unwrap().k);
        drop(reg);

        // B's K object disappears from the token behind the daemon's back.
        let del = t.pkcs11_tool(&[
            "--delete-object",
            "--type",
            "secrkey",
            "--id",
            &b_id,
            "--label",
            "mcim.k",
        ]);
        assert!(
            del.status.success(),
            "{}",
            String::from_utf8_lossy(&del.stderr)
        );
        let mut reg = Registry::open(dir.path(), Box::new(tre())).unwrap();
        let b = reg.get(IMSI_B).unwrap();
        assert_eq!(
            (b.state, b.blocked),
            (McimState::Blocked, Some(BlockReason::Tampered))
        );
        let audit = reg.audit().unwrap();
        assert!(
            audit
                .iter()
                .any(|e| e.detail.contains("missing from the TRE")),
            "{audit:?}"
        );
        assert_eq!(state(&reg, IMSI_A), McimState::Activated);
        assert!(reg.verify_audit().unwrap().ok);
        // B's OPc object, left on the token, belongs to B's blocked stub: not an orphan, and
        // deleting B destroys it.
        let b_ref = hex::decode(&b_id).unwrap();
        assert!(reg.tre().held_secret_refs().unwrap().contains(&b_ref));
        assert!(reg.orphans().unwrap().is_empty());
        reg.apply(IMSI_B, Op::Delete).unwrap();
        assert!(!reg.tre().held_secret_refs().unwrap().contains(&b_ref));
        assert_eq!(state(&reg, IMSI_A), McimState::Activated);
    }

    /// A record altered in the state directory becomes a Blocked (tampered) stub; what the
    /// TRE holds for it (as its unverified record names it, checked against the token) goes
    /// when it is deleted, and nothing of another MCIM's.
    #[test]
    fn deleting_a_tampered_mcim_destroys_its_token_objects() {
        let Some(t) = own_softhsm("on_token::deleting_a_tampered_mcim_destroys_its_token_objects")
        else {
            return;
        };
        let dir = setup(&t);
        let (a_ref, b_ref) = {
            let mut reg = Registry::open(dir.path(), Box::new(tre())).unwrap();
            install_on(&mut reg, IMSI_A);
            install_on(&mut reg, IMSI_B);
            let r = |reg: &Registry, id| reg.get(id).unwrap().secrets.as_ref().unwrap().k.clone();
            (r(&reg, IMSI_A), r(&reg, IMSI_B))
        };
        let mcims = dir.path().join("mcims");
        let file = std::fs::read_dir(&mcims)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(IMSI_B))
            .unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, text.replace("sho.example", "sho.evil")).unwrap();

        let mut reg = Registry::open(dir.path(), Box::new(tre())).unwrap();
        let b = reg.get(IMSI_B).unwrap();
        assert_eq!(b.blocked, Some(BlockReason::Tampered));
        assert!(b.secrets.is_none());
        assert!(reg.orphans().unwrap().is_empty(), "B's objects are B's");
        reg.apply(IMSI_B, Op::Delete).unwrap();
        let held = reg.tre().held_secret_refs().unwrap();
        assert!(!held.contains(&b_ref), "B's K and OPc are gone");
        assert!(held.contains(&a_ref), "A's stay");
        let v = av(IMSI_A, 1);
        reg.apply(IMSI_A, Op::Activate).unwrap();
        reg.select(IMSI_A, None).unwrap();
        assert!(matches!(
            reg.authenticate(IMSI_A, &v.rand, &v.autn).unwrap(),
            DeviceResponse::Success { .. }
        ));
    }

    /// pkcs11-tool, logged in: the token's secret key objects, as text.
    fn token_secret_keys(t: &SoftHsm) -> String {
        let out = t.pkcs11_tool(&["--list-objects", "--type", "secrkey"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A session of the test's own on the token (cryptoki), and the handle of the K object of
    /// this CKA_ID: what anyone holding the user PIN could use.
    fn k_handle(id: &[u8]) -> (cryptoki::session::Session, cryptoki::object::ObjectHandle) {
        use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
        use cryptoki::object::{Attribute, ObjectClass};
        let ctx = Pkcs11::new(SOFTHSM2_MODULE).unwrap();
        let _ = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
        let slot = ctx.get_slots_with_token().unwrap()[0];
        let session = ctx.open_ro_session(slot).unwrap();
        let _ = session.login(
            cryptoki::session::UserType::User,
            Some(&SOFTHSM2_PIN.to_string().into()),
        );
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Id(id.to_vec()),
                Attribute::Label(b"mcim.k".to_vec()),
            ])
            .unwrap();
        assert_eq!(found.len(), 1);
        (session, found[0])
    }

    /// AES-ECB of one block with a K object handle.
    fn encrypts(session: &cryptoki::session::Session, k: cryptoki::object::ObjectHandle) -> bool {
        session
            .encrypt(&cryptoki::mechanism::Mechanism::AesEcb, k, &[0u8; 16])
            .is_ok()
    }

    /// The secret objects of one CKA_ID in pkcs11-tool's listing.
    fn objects_with_id(listing: &str, id: &str) -> usize {
        listing
            .lines()
            .filter(|l| l.trim() == format!("ID:         {id}"))
            .count()
    }

    /// Retire and delete destroy the MCIM's K and OPc on the token, as pkcs11-tool sees it,
    /// and AES with the old key is refused; the other MCIM's objects stay. OPc is data with
    /// no key usage of its own.
    #[test]
    fn retire_and_delete_destroy_the_token_objects() {
        let Some(t) = own_softhsm("on_token::retire_and_delete_destroy_the_token_objects") else {
            return;
        };
        let dir = setup(&t);
        let mut reg = Registry::open(dir.path(), Box::new(tre())).unwrap();
        let mut ids = Vec::new();
        for imsi in [IMSI_A, IMSI_B, IMSI_C] {
            install_on(&mut reg, imsi);
            ids.push(hex::encode(
                &reg.get(imsi).unwrap().secrets.as_ref().unwrap().k,
            ));
        }
        let before = token_secret_keys(&t);
        let mut handles = Vec::new();
        for id in &ids {
            assert_eq!(objects_with_id(&before, id), 2, "K and OPc: {before}");
            let (session, k) = k_handle(&hex::decode(id).unwrap());
            assert!(encrypts(&session, k), "the control: K encrypts");
            handles.push((session, k));
        }
        let opc_usage: Vec<&str> = before
            .split("Secret Key Object")
            .filter(|o| o.contains("mcim.opc"))
            .filter_map(|o| o.lines().find(|l| l.contains("Usage:")))
            .collect();
        assert_eq!(opc_usage.len(), 3, "{before}");
        assert!(
            opc_usage.iter().all(|u| u.trim() == "Usage:      none"),
            "{opc_usage:?}"
        );

        assert_eq!(reg.apply(IMSI_A, Op::Retire).unwrap(), McimState::Retired);
        reg.apply(IMSI_B, Op::Activate).unwrap();
        assert_eq!(reg.apply(IMSI_B, Op::Delete).unwrap(), McimState::Deleted);
        let after = token_secret_keys(&t);
        for (id, (session, k)) in ids[..2].iter().zip(&handles) {
            assert_eq!(objects_with_id(&after, id), 0, "{after}");
            assert!(!encrypts(session, *k), "the old key handle is dead");
        }
        assert_eq!(objects_with_id(&after, &ids[2]), 2, "{after}");
        assert!(encrypts(&handles[2].0, handles[2].1));
        assert!(reg.orphans().unwrap().is_empty());
        assert!(reg.verify_audit().unwrap().ok);
    }

    /// A token TRE whose C_DestroyObject "does not happen" while `skip` is set: the crash
    /// between the registry's commit and the destruction, as far as the registry can tell.
    struct NoDestroy {
        inner: Pkcs11Tre,
        skip: bool,
    }

    impl Tre for NoDestroy {
        fn backend_name(&self) -> &'static str {
            self.inner.backend_name()
        }
        fn capabilities(&self) -> &mcim_tre::tre::Capabilities {
            self.inner.capabilities()
        }
        fn device_public(
            &mut self,
        ) -> Result<mcim_tre::tre::DevicePublic, mcim_tre::tre::TreError> {
            self.inner.device_public()
        }
        fn import_mcim_secrets(
            &mut self,
            w: &mcim_tre::tre::WrappedSecrets,
        ) -> Result<mcim_tre::tre::ProtectedSecrets, mcim_tre::tre::TreError> {
            self.inner.import_mcim_secrets(w)
        }
        fn secrets_present(
            &mut self,
            s: &mcim_tre::tre::ProtectedSecrets,
        ) -> Result<bool, mcim_tre::tre::TreError> {
            self.inner.secrets_present(s)
        }
        fn held_secret_refs(&mut self) -> Result<Vec<Vec<u8>>, mcim_tre::tre::TreError> {
            self.inner.held_secret_refs()
        }
        fn held_refs_of(&self, s: &mcim_tre::tre::ProtectedSecrets) -> Vec<Vec<u8>> {
            self.inner.held_refs_of(s)
        }
        fn destroy_held_secret(&mut self, r: &[u8]) -> Result<(), mcim_tre::tre::TreError> {
            if self.skip {
                return Err(mcim_tre::tre::TreError::Command {
                    command: "power cut",
                    detail: "injected".into(),
                });
            }
            self.inner.destroy_held_secret(r)
        }
        fn integrity_mac(&mut self, d: &[u8; 32]) -> Result<[u8; 32], mcim_tre::tre::TreError> {
            self.inner.integrity_mac(d)
        }
        fn rollback_counter(&mut self) -> Result<u64, mcim_tre::tre::TreError> {
            self.inner.rollback_counter()
        }
        fn advance_rollback_counter(&mut self) -> Result<u64, mcim_tre::tre::TreError> {
            self.inner.advance_rollback_counter()
        }
        fn audit_anchor(&mut self) -> Result<mcim_tre::tre::AuditAnchor, mcim_tre::tre::TreError> {
            self.inner.audit_anchor()
        }
        fn set_audit_anchor(
            &mut self,
            a: &mcim_tre::tre::AuditAnchor,
        ) -> Result<(), mcim_tre::tre::TreError> {
            self.inner.set_audit_anchor(a)
        }
    }

    /// A crash after the commit that retires an MCIM and before its objects are destroyed:
    /// the header dooms them, and the next start destroys them (not reported as orphans);
    /// the next commit drops them from the header.
    #[test]
    fn a_destruction_cut_short_is_finished_at_the_next_start() {
        let Some(t) =
            own_softhsm("on_token::a_destruction_cut_short_is_finished_at_the_next_start")
        else {
            return;
        };
        let dir = setup(&t);
        let mut reg = Registry::open(
            dir.path(),
            Box::new(NoDestroy {
                inner: tre(),
                skip: true,
            }),
        )
        .unwrap();
        install_on(&mut reg, IMSI_A);
        install_on(&mut reg, IMSI_B);
        let a_id = reg.get(IMSI_A).unwrap().secrets.as_ref().unwrap().k.clone();
        reg.apply(IMSI_A, Op::Retire).unwrap();
        drop(reg);
        let header = std::fs::read_to_string(dir.path().join("header.json")).unwrap();
        assert!(header.contains(&hex::encode(&a_id)), "doomed: {header}");
        assert!(
            tre().held_secret_refs().unwrap().contains(&a_id),
            "still on the token"
        );

        let mut reg = Registry::open(dir.path(), Box::new(tre())).unwrap();
        assert!(
            !tre().held_secret_refs().unwrap().contains(&a_id),
            "destroyed at start"
        );
        let st = reg.status();
        assert!(
            !st.startup.iter().any(|s| s.contains("no MCIM refers to")),
            "{:?}",
            st.startup
        );
        assert_eq!(state(&reg, IMSI_B), McimState::Installed);
        reg.apply(IMSI_B, Op::Activate).unwrap();
        let header = std::fs::read_to_string(dir.path().join("header.json")).unwrap();
        assert!(!header.contains("doomed"), "pruned: {header}");
    }

    #[test]
    fn orphan_token_objects_are_reported_kept_and_destroyed_on_command() {
        let Some(t) = own_softhsm(
            "on_token::orphan_token_objects_are_reported_kept_and_destroyed_on_command",
        ) else {
            return;
        };
        let dir = setup(&t);
        let orphan_id = {
            // Imported straight into the TRE, never recorded (a crash between the two, say).
            let mut t = tre();
            let public = t.device_public().unwrap();
            let (k, opc) = secrets(IMSI_B);
            let w = |s: &[u8]| {
                mcim_core::token_wrap::wrap_for_token(&public.storage_public, s)
                    .unwrap()
                    .to_bytes()
            };
            t.import_mcim_secrets(&mcim_tre::tre::WrappedSecrets {
                k: w(k.expose()),
                opc: w(opc.expose()),
            })
            .unwrap()
            .k
        };
        let mut reg = Registry::open(dir.path(), Box::new(tre())).unwrap();
        install_on(&mut reg, IMSI_A);
        drop(reg);
        let reg = Registry::open(dir.path(), Box::new(tre())).unwrap();
        let st = reg.status();
        assert_eq!(st.lockdown, None);
        let note = st
            .startup
            .iter()
            .find(|s| s.contains("no MCIM refers to"))
            .unwrap();
        assert!(note.contains(&hex::encode(&orphan_id)), "{note}");
        let a_id = hex::encode(&reg.get(IMSI_A).unwrap().secrets.as_ref().unwrap().k);
        assert!(!note.contains(&a_id), "{note}");
        drop(reg);
        // Still on the token.
        let mut again = tre();
        assert!(again.held_secret_refs().unwrap().contains(&orphan_id));
        drop(again);

        // The owner's command destroys it, with an audit entry naming it; A stays.
        let mut reg = Registry::open(dir.path(), Box::new(tre())).unwrap();
        assert_eq!(reg.orphans().unwrap(), vec![orphan_id.clone()]);
        assert_eq!(reg.destroy_orphans().unwrap(), vec![orphan_id.clone()]);
        assert!(reg.orphans().unwrap().is_empty());
        let held = reg.tre().held_secret_refs().unwrap();
        assert!(!held.contains(&orphan_id));
        assert!(held.contains(&hex::decode(&a_id).unwrap()));
        assert!(
            reg.audit()
                .unwrap()
                .iter()
                .any(|e| e.detail.contains(&hex::encode(&orphan_id))),
        );
        assert!(reg.destroy_orphans().unwrap().is_empty(), "again: nothing");
        assert!(reg.verify_audit().unwrap().ok);
    }

    #[test]
    fn an_older_state_directory_is_refused_on_a_token_too() {
        let Some(t) = own_softhsm("on_token::an_older_state_directory_is_refused_on_a_token_too")
        else {
            return;
        };
        let dir = setup(&t);
        let old = tempfile::tempdir().unwrap();
        {
            let mut reg = Registry::open(dir.path(), Box::new(tre())).unwrap();
            install_on(&mut reg, IMSI_A);
            copy_dir(dir.path(), old.path());
            reg.apply(IMSI_A, Op::Activate).unwrap();
        }
        std::fs::remove_dir_all(dir.path()).unwrap();
        copy_dir(old.path(), dir.path());
        let reg = Registry::open(dir.path(), Box::new(tre())).unwrap();
        let why = reg.status().lockdown.expect("lockdown");
        assert!(why.contains("rollback"), "{why}");
    }
}
