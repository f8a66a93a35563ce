//! The TRE conformance suite: the same checks against every backend, each test on its own
//! real TRE instance (a private swtpm, or a private SoftHSM2 token), each backend behind its own
//! cargo feature.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use mcim_core::aka::network::{recover_sqn_ms, vector_for};
use mcim_core::aka::{
    Amf, Autn, Constants, DeviceResponse, K, Milenage, MsSqnState, Opc, Rand, SoftKernel, Sqn,
    SqnProfile,
};
use mcim_core::identity::{DeviceIdentity, Pcid};
use mcim_tre::tre::{
    AkaChallenge, AkaExecution, DevicePublic, ProtectedSecrets, Tre, TreError, TreKind,
    WrappedSecrets,
};
use support::{KForm, arr, ts35208_sets};

fn identity(n: u32) -> DeviceIdentity {
    DeviceIdentity::new(
        format!("SN-{n:04}"),
        Pcid::new(format!("00101{n:010}")).unwrap(),
        "meter-v1",
    )
    .unwrap()
}

// ---- the suite, generic over the backend ----

fn before_init_there_is_no_identity(t: &mut dyn Tre) {
    assert_eq!(t.identity().unwrap(), None);
    assert!(matches!(t.device_public(), Err(TreError::NotInitialised)));
}

fn init_is_idempotent(t: &mut dyn Tre) {
    let first = t.init_device(&identity(1)).unwrap();
    assert!(first.created);
    assert_eq!(first.identity, identity(1));
    assert!(!first.public.storage_public.is_empty());
    assert!(!first.public.attestation_public.is_empty());
    assert_eq!(
        first.public.tls_public_spki.len(),
        91,
        "DER SPKI of a P-256 key"
    );
    let again = t.init_device(&identity(1)).unwrap();
    assert!(
        !again.created,
        "a second init with the same identity creates nothing"
    );
    assert_eq!(again.public, first.public, "and never re-keys");
    assert_eq!(t.identity().unwrap(), Some(identity(1)));
    assert_eq!(t.device_public().unwrap(), first.public);
}

fn a_different_identity_is_refused_and_changes_nothing(t: &mut dyn Tre) {
    let first = t.init_device(&identity(1)).unwrap();
    let err = t.init_device(&identity(2)).unwrap_err();
    assert!(matches!(err, TreError::AlreadyInitialised(_)), "{err}");
    assert!(err.to_string().contains("SN-0001"), "{err}");
    assert_eq!(t.identity().unwrap(), Some(identity(1)));
    assert_eq!(t.device_public().unwrap(), first.public);
}

fn random_gives_fresh_bytes(t: &mut dyn Tre) {
    let a = t.random(32).unwrap();
    let b = t.random(32).unwrap();
    assert_eq!(a.len(), 32);
    assert_ne!(a, b);
    assert!(t.random(65).is_err());
}

/// The SHO side of a backend: wraps K and OPc for one device's public material.
type Wrap<'a> = &'a dyn Fn(&DevicePublic, &K, &Opc, KForm) -> WrappedSecrets;

/// Δ wide enough for the test sets' large SQNs on a fresh device.
fn wide_profile() -> SqnProfile {
    SqnProfile {
        delta: 1 << 43,
        ..SqnProfile::default()
    }
}

/// Every TS 35.208 set: K and OPc go in wrapped, AKA runs in the TRE, and RES/CK/IK equal the
/// published f2/f3/f4. Replaying the same AUTN gives AUTS that the network decodes to the
/// accepted SQN (f1*, f5* in the TRE too). Returns the protected records for further checks.
fn aka_in_tre_equals_published_sets(
    t: &mut dyn Tre,
    wrap: Wrap<'_>,
    form: KForm,
) -> Vec<(ProtectedSecrets, K, Opc)> {
    t.init_device(&identity(1)).unwrap();
    let public = t.device_public().unwrap();
    let mut kept = Vec::new();
    for set in ts35208_sets() {
        let k = K::new(arr(&set.k));
        let opc = Opc::new(arr(&set.opc));
        let secrets = t
            .import_mcim_secrets(&wrap(&public, &k, &opc, form))
            .unwrap();
        let want_mode = match form {
            KForm::Key => AkaExecution::InTre,
            KForm::Sealed => AkaExecution::UnsealedInHost,
        };
        assert_eq!(secrets.aka_execution, want_mode, "set {}", set.set);

        let network = Milenage::with_opc(SoftKernel::new(&k), opc.clone(), Constants::default());
        let sqn = Sqn::from_bytes(arr(&set.sqn));
        let rand = Rand(arr(&set.rand));
        let av = vector_for(&network, sqn, Amf(arr(&set.amf)), rand).unwrap();
        let mut ms = MsSqnState::new(&wide_profile());
        let ch = AkaChallenge {
            constants: &Constants::default(),
            profile: &wide_profile(),
            rand: &rand,
            autn: &av.autn,
            pin: None,
        };
        match t.authenticate(&secrets, &mut ms, &ch).unwrap() {
            DeviceResponse::Success { res, ck, ik } => {
                assert_eq!(hex::encode(res.0), set.f2, "RES, set {}", set.set);
                assert_eq!(hex::encode(ck.expose()), set.f3, "CK, set {}", set.set);
                assert_eq!(hex::encode(ik.expose()), set.f4, "IK, set {}", set.set);
            }
            other => panic!("set {}: {other:?}", set.set),
        }
        let before = ms.clone();
        match t.authenticate(&secrets, &mut ms, &ch).unwrap() {
            DeviceResponse::SyncFailure { auts, .. } => {
                assert_eq!(recover_sqn_ms(&network, &rand, &auts).unwrap(), sqn);
            }
            other => panic!("replay accepted in set {}: {other:?}", set.set),
        }
        assert_eq!(ms, before, "a refused challenge changes no SQN state");
        kept.push((secrets, k, opc));
    }
    kept
}

/// A forged AUTN (one bit of MAC-A flipped) is a MAC failure and leaves SQN state alone.
fn forged_autn_is_mac_failure(t: &mut dyn Tre, wrap: Wrap<'_>) {
    t.init_device(&identity(1)).unwrap();
    let public = t.device_public().unwrap();
    let k = K::new([0x11; 16]);
    let opc = Opc::new([0x22; 16]);
    let secrets = t
        .import_mcim_secrets(&wrap(&public, &k, &opc, KForm::Key))
        .unwrap();
    let network = Milenage::with_opc(SoftKernel::new(&k), opc, Constants::default());
    let rand = Rand([5; 16]);
    let av = vector_for(
        &network,
        Sqn::from_bytes([0, 0, 0, 0, 0, 0x21]),
        Amf([0x80, 0]),
        rand,
    )
    .unwrap();
    let mut forged = av.autn.0;
    forged[15] ^= 1;
    let mut ms = MsSqnState::new(&SqnProfile::default());
    let before = ms.clone();
    let ch = AkaChallenge {
        constants: &Constants::default(),
        profile: &SqnProfile::default(),
        rand: &rand,
        autn: &Autn(forged),
        pin: None,
    };
    let err = t.authenticate(&secrets, &mut ms, &ch).unwrap_err();
    assert!(matches!(err, TreError::MacFailure), "{err}");
    assert_eq!(ms, before);
    // The genuine AUTN still works afterwards.
    let ch = AkaChallenge {
        autn: &av.autn,
        ..ch
    };
    assert!(matches!(
        t.authenticate(&secrets, &mut ms, &ch).unwrap(),
        DeviceResponse::Success { .. }
    ));
}

/// A wrapped secret damaged in transit is refused by the TRE with a clear error.
fn damaged_blob_is_refused(t: &mut dyn Tre, wrap: Wrap<'_>) {
    t.init_device(&identity(1)).unwrap();
    let public = t.device_public().unwrap();
    let good = wrap(&public, &K::new([1; 16]), &Opc::new([2; 16]), KForm::Key);
    for i in [good.k.len() - 1, good.k.len() / 2, 3] {
        let mut bad = good.clone();
        bad.k[i] ^= 0x40;
        let err = t.import_mcim_secrets(&bad).unwrap_err();
        assert!(matches!(err, TreError::BadSecrets(_)), "byte {i}: {err}");
    }
    let mut bad = good.clone();
    bad.opc.truncate(10);
    assert!(matches!(
        t.import_mcim_secrets(&bad),
        Err(TreError::BadSecrets(_))
    ));
    assert!(
        t.import_mcim_secrets(&good).is_ok(),
        "the undamaged one imports"
    );
}

/// Secrets wrapped for another device's TRE are refused by this one.
fn secrets_for_another_device_are_refused(mine: &mut dyn Tre, other: &mut dyn Tre, wrap: Wrap<'_>) {
    mine.init_device(&identity(1)).unwrap();
    other.init_device(&identity(2)).unwrap();
    let theirs = other.device_public().unwrap();
    let blob = wrap(&theirs, &K::new([1; 16]), &Opc::new([2; 16]), KForm::Key);
    assert!(matches!(
        mine.import_mcim_secrets(&blob),
        Err(TreError::BadSecrets(_))
    ));
    assert!(other.import_mcim_secrets(&blob).is_ok());
}

/// The protected records hold neither K nor OPc, raw or hex.
fn protected_records_hold_no_plaintext(kept: &[(ProtectedSecrets, K, Opc)]) {
    for (p, k, opc) in kept {
        let json = serde_json::to_string(p).unwrap();
        for secret in [&k.expose()[..], &opc.expose()[..]] {
            for hay in [&p.k[..], &p.opc[..], json.as_bytes()] {
                assert!(!contains(hay, secret));
                assert!(!contains(hay, hex::encode(secret).as_bytes()));
                assert!(!contains(hay, hex::encode_upper(secret).as_bytes()));
            }
        }
        let shown = format!("{p:?}");
        assert!(!shown.contains(&hex::encode(k.expose())), "{shown}");
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

// ---- TPM instantiation ----

#[cfg(feature = "tpm")]
mod tpm {
    use super::*;
    use mcim_core::tpm::attest::{QuoteError, verify_quote};
    use mcim_core::tpm::import::{ObjectPolicy, wrap_aes128_key, wrap_sealed_data};
    use mcim_core::tpm::policy::PcrSelection;
    use mcim_core::tpm::public::EccPublic;
    use mcim_tre::tre::AuditAnchor;
    use mcim_tre::tre::tpm::{
        AK_HANDLE, NV_IDENTITY, STORAGE_HANDLE, TLS_HANDLE, TpmConfig, TpmTre,
    };
    use support::Swtpm;
    use support::tpm_wrap;

    fn open(s: &Swtpm) -> TpmTre {
        TpmTre::open(&TpmConfig { tcti: s.tcti() }).unwrap()
    }

    fn open_at(tcti: &str) -> TpmTre {
        TpmTre::open(&TpmConfig {
            tcti: tcti.to_string(),
        })
        .unwrap()
    }

    #[test]
    fn conformance_aka_in_tre_equals_published_sets() {
        let s = Swtpm::start();
        let mut t = open(&s);
        let before = t.commands_issued();
        let kept = aka_in_tre_equals_published_sets(&mut t, &tpm_wrap, KForm::Key);
        protected_records_hold_no_plaintext(&kept);
        // 20 sets x (2 imports + 2 authentications); the count per AKA is in BENCHMARKS.md.
        assert!(t.commands_issued() > before);
    }

    #[test]
    fn conformance_aka_sealed_fallback_equals_published_sets() {
        let s = Swtpm::start();
        let kept = aka_in_tre_equals_published_sets(&mut open(&s), &tpm_wrap, KForm::Sealed);
        protected_records_hold_no_plaintext(&kept);
    }

    #[test]
    fn conformance_forged_autn() {
        let s = Swtpm::start();
        forged_autn_is_mac_failure(&mut open(&s), &tpm_wrap);
    }

    #[test]
    fn conformance_damaged_blob() {
        let s = Swtpm::start();
        damaged_blob_is_refused(&mut open(&s), &tpm_wrap);
    }

    #[test]
    fn conformance_secrets_for_another_device() {
        let (a, b) = (Swtpm::start(), Swtpm::start());
        secrets_for_another_device_are_refused(&mut open(&a), &mut open(&b), &tpm_wrap);
    }

    /// One authentication in the TRE costs a fixed, small number of TPM commands: 8 (the
    /// salted bus session is started once, at the first command that needs it, and kept).
    #[test]
    fn aka_command_count_is_fixed() {
        let s = Swtpm::start();
        let mut t = open(&s);
        t.init_device(&identity(1)).unwrap();
        let public = t.device_public().unwrap();
        let k = K::new([7; 16]);
        let opc = Opc::new([8; 16]);
        let secrets = t
            .import_mcim_secrets(&tpm_wrap(&public, &k, &opc, KForm::Key))
            .unwrap();
        let network = Milenage::with_opc(SoftKernel::new(&k), opc, Constants::default());
        let mut ms = MsSqnState::new(&SqnProfile::default());
        for seq in 1..=3u8 {
            let rand = Rand([seq; 16]);
            let av = vector_for(
                &network,
                Sqn::from_bytes([0, 0, 0, 0, seq, 0]),
                Amf([0x80, 0]),
                rand,
            )
            .unwrap();
            let ch = AkaChallenge {
                constants: &Constants::default(),
                profile: &SqnProfile::default(),
                rand: &rand,
                autn: &av.autn,
                pin: None,
            };
            let before = t.commands_issued();
            t.authenticate(&secrets, &mut ms, &ch).unwrap();
            // The bus session was started by the import and is kept.
            assert_eq!(t.commands_issued() - before, 8, "authentication {seq}");
        }
    }

    /// MILENAGE in software with every E_K input and output kept: the values a bus listener
    /// must never see (RAND xor OPc, TEMP, TEMP xor OPc rotated xor c_i, E_K of those).
    struct RecordingKernel {
        inner: SoftKernel,
        seen: std::cell::RefCell<Vec<[u8; 16]>>,
    }

    impl mcim_core::aka::Kernel for RecordingKernel {
        type Error = std::convert::Infallible;
        fn encrypt_blocks(
            &self,
            blocks: &mut [mcim_core::aka::milenage::Block],
        ) -> Result<(), Self::Error> {
            self.seen.borrow_mut().extend(blocks.iter().copied());
            self.inner.encrypt_blocks(blocks)?;
            self.seen.borrow_mut().extend(blocks.iter().copied());
            Ok(())
        }
    }

    /// A passive listener on the TPM bus (a recording relay between the TRE and swtpm) sees
    /// neither K nor OPc nor any value MILENAGE derives from them, through an import and an
    /// AKA with K in the TPM and with K sealed. The control: the same run with a plain
    /// password session shows those values in the recording, so the check can fail.
    #[test]
    fn bus_recording_of_import_and_aka_holds_no_secret() {
        let s = Swtpm::start();
        let bus = mcim_e2e::BusRecorder::start(&s);
        let k = K::new(arr("4b1c6f0a9e2d73b58c0f1e2d3c4b5a69"));
        let opc = Opc::new(arr("0f1e2d3c4b5a69788796a5b4c3d2e1f0"));
        let rand = Rand(arr("23553cbe9637a89d218ae64dae47bf35"));
        let sqn = Sqn::from_bytes([0, 0, 0, 0, 1, 0]);
        let recording = Milenage::with_opc(
            RecordingKernel {
                inner: SoftKernel::new(&k),
                seen: Default::default(),
            },
            opc.clone(),
            Constants::default(),
        );
        let av = vector_for(&recording, sqn, Amf([0x80, 0]), rand).unwrap();
        let mut secret: Vec<[u8; 16]> = recording.kernel().seen.borrow().clone();
        secret.extend([*k.expose(), *opc.expose()]);
        let rand_xor_opc: [u8; 16] = std::array::from_fn(|i| rand.0[i] ^ opc.expose()[i]);
        assert!(secret.contains(&rand_xor_opc));

        for encrypted in [true, false] {
            for form in [KForm::Key, KForm::Sealed] {
                let mut t = open_at(&bus.tcti());
                if !encrypted {
                    t = t.without_bus_encryption_for_baseline();
                }
                t.init_device(&identity(1)).unwrap();
                let public = t.device_public().unwrap();
                bus.clear();
                let secrets = t
                    .import_mcim_secrets(&tpm_wrap(&public, &k, &opc, form))
                    .unwrap();
                let ch = AkaChallenge {
                    constants: &Constants::default(),
                    profile: &SqnProfile::default(),
                    rand: &rand,
                    autn: &av.autn,
                    pin: None,
                };
                let mut ms = MsSqnState::new(&SqnProfile::default());
                match t.authenticate(&secrets, &mut ms, &ch).unwrap() {
                    DeviceResponse::Success { res, .. } => assert_eq!(res.0, av.xres.0),
                    other => panic!("{other:?}"),
                }
                let rec = bus.recorded();
                assert!(rec.len() > 1000, "the relay recorded the run");
                let leaked: Vec<String> = secret
                    .iter()
                    .filter(|v| contains(&rec, &v[..]))
                    .map(hex::encode)
                    .collect();
                if encrypted {
                    assert!(
                        leaked.is_empty(),
                        "{form:?}: in clear on the bus: {leaked:?}"
                    );
                } else {
                    // OPc comes out of TPM2_Unseal in clear, and with K in the TPM every E_K
                    // input and output crosses too.
                    assert!(contains(&rec, opc.expose()), "{form:?}");
                    if form == KForm::Key {
                        assert!(contains(&rec, &rand_xor_opc));
                    } else {
                        assert!(contains(&rec, k.expose()));
                    }
                }
            }
        }
    }

    /// The kept bus session flushed behind the daemon's back (another client of the TPM,
    /// tpm2-tools here): the next import and the next AKA start a new one and succeed.
    #[test]
    fn a_flushed_bus_session_is_replaced() {
        let s = Swtpm::start();
        let mut t = open(&s);
        t.init_device(&identity(1)).unwrap();
        let public = t.device_public().unwrap();
        let k = K::new([7; 16]);
        let opc = Opc::new([8; 16]);
        let network = Milenage::with_opc(SoftKernel::new(&k), opc.clone(), Constants::default());
        let mut ms = MsSqnState::new(&SqnProfile::default());
        let flush = || {
            let out = s.tpm2("tpm2_flushcontext", &["--loaded-session"]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        // The first import starts the session.
        t.import_mcim_secrets(&tpm_wrap(&public, &k, &opc, KForm::Key))
            .unwrap();
        for seq in 1..=2u8 {
            flush();
            let secrets = t
                .import_mcim_secrets(&tpm_wrap(&public, &k, &opc, KForm::Key))
                .unwrap();
            flush();
            let rand = Rand([seq; 16]);
            let av = vector_for(
                &network,
                Sqn::from_bytes([0, 0, 0, 0, seq, 0]),
                Amf([0x80, 0]),
                rand,
            )
            .unwrap();
            let ch = AkaChallenge {
                constants: &Constants::default(),
                profile: &SqnProfile::default(),
                rand: &rand,
                autn: &av.autn,
                pin: None,
            };
            assert!(matches!(
                t.authenticate(&secrets, &mut ms, &ch).unwrap(),
                DeviceResponse::Success { .. }
            ));
        }
    }

    /// A quote verifies with core's verifier and with tpm2_checkquote; a wrong nonce, a
    /// changed PCR, or a tampered quote fails both.
    #[test]
    fn quote_verifies_in_core_and_tpm2_checkquote() {
        let s = Swtpm::start();
        let (ak_public, quote) = {
            let mut t = open(&s);
            t.init_device(&identity(1)).unwrap();
            let ak = t.device_public().unwrap().attestation_public;
            let sel = PcrSelection::sha256(&[0, 1, 2, 16]).unwrap();
            // Bad requests are refused before the TPM is asked.
            assert!(matches!(t.quote(&[], &sel), Err(TreError::BadRequest(_))));
            assert!(matches!(
                t.quote(&[1; 65], &sel),
                Err(TreError::BadRequest(_))
            ));
            (ak, t.quote(b"nonce-0123456789", &sel).unwrap())
        };
        let v = verify_quote(&ak_public, &quote, b"nonce-0123456789").unwrap();
        assert_eq!(
            v.pcrs.iter().map(|p| p.0).collect::<Vec<_>>(),
            [0, 1, 2, 16]
        );
        assert!(v.clock.safe);
        assert_eq!(
            verify_quote(&ak_public, &quote, b"nonce-other"),
            Err(QuoteError::WrongNonce)
        );
        let mut forged = quote.clone();
        forged.attest[20] ^= 1;
        assert_eq!(
            verify_quote(&ak_public, &forged, b"nonce-0123456789"),
            Err(QuoteError::BadSignature)
        );
        // The TLS key is not restricted: a "quote" it signed would prove nothing.
        let tls_like = {
            let mut t = open(&s);
            t.device_public().unwrap().storage_public
        };
        assert_eq!(
            verify_quote(&tls_like, &quote, b"nonce-0123456789"),
            Err(QuoteError::NotAnAttestationKey)
        );

        // tpm2_checkquote, independently.
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
        std::fs::write(path("ak.pub"), &ak_public).unwrap();
        std::fs::write(path("q.msg"), &quote.attest).unwrap();
        std::fs::write(path("q.sig"), &quote.signature).unwrap();
        std::fs::write(path("pcrs.bin"), quote.pcr_values.concat()).unwrap();
        let check = |nonce_hex: &str| {
            s.tpm2(
                "tpm2_checkquote",
                &[
                    "-u",
                    &path("ak.pub"),
                    "-m",
                    &path("q.msg"),
                    "-s",
                    &path("q.sig"),
                    "-f",
                    &path("pcrs.bin"),
                    "-l",
                    "sha256:0,1,2,16",
                    "-g",
                    "sha256",
                    "-q",
                    nonce_hex,
                ],
            )
        };
        let nonce_hex = hex::encode(b"nonce-0123456789");
        let ok = check(&nonce_hex);
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        assert!(!check(&hex::encode(b"nonce-other")).status.success());

        // PCR 16 changes: the verifier now expects the new value; both refuse the old quote.
        let ext = s.tpm2(
            "tpm2_pcrextend",
            &[&format!("16:sha256={}", "ab".repeat(32))],
        );
        assert!(
            ext.status.success(),
            "{}",
            String::from_utf8_lossy(&ext.stderr)
        );
        let now = open(&s)
            .quote(b"n2", &PcrSelection::sha256(&[0, 1, 2, 16]).unwrap())
            .unwrap();
        assert_ne!(now.pcr_values[3], quote.pcr_values[3], "PCR 16 moved");
        let mut stale = quote.clone();
        stale.pcr_values = now.pcr_values.clone();
        assert_eq!(
            verify_quote(&ak_public, &stale, b"nonce-0123456789"),
            Err(QuoteError::PcrMismatch)
        );
        std::fs::write(path("pcrs.bin"), now.pcr_values.concat()).unwrap();
        assert!(
            !check(&nonce_hex).status.success(),
            "tpm2_checkquote refuses too"
        );
        // And the fresh quote verifies in both.
        verify_quote(&ak_public, &now, b"n2").unwrap();
    }

    /// OPc bound to PCRs (TPM2_PolicyPCR): AKA works while the platform is in that state and
    /// is refused, changing nothing, once a PCR moves. K under a policy is refused at import.
    #[test]
    fn opc_bound_to_pcrs_is_usable_only_in_that_platform_state() {
        let s = Swtpm::start();
        let sel = PcrSelection::sha256(&[16, 23]).unwrap();
        let k = K::new([0x31; 16]);
        let opc = Opc::new([0x32; 16]);
        let (public, values) = {
            let mut t = open(&s);
            t.init_device(&identity(1)).unwrap();
            let q = t.quote(b"read-pcrs-nonce!", &sel).unwrap();
            (t.device_public().unwrap(), q.pcr_values)
        };
        let parent = EccPublic::from_tpm2b(&public.storage_public).unwrap();
        let mut rng = rand::rng();
        let bound = |vals: &[[u8; 32]]| {
            let pol = ObjectPolicy::pcrs(sel.clone(), vals).unwrap();
            WrappedSecrets {
                k: wrap_aes128_key(&parent, &k, ObjectPolicy::default(), &mut rand::rng())
                    .unwrap()
                    .to_bytes()
                    .unwrap(),
                opc: wrap_sealed_data(&parent, opc.expose(), pol, &mut rand::rng())
                    .unwrap()
                    .to_bytes()
                    .unwrap(),
            }
        };
        let network = Milenage::with_opc(SoftKernel::new(&k), opc.clone(), Constants::default());
        let challenge = |seq: u8| {
            let rand = Rand([seq; 16]);
            let av = vector_for(
                &network,
                Sqn::from_bytes([0, 0, 0, 0, seq, 0]),
                Amf([0x80, 0]),
                rand,
            )
            .unwrap();
            (rand, av.autn)
        };
        let run = |t: &mut TpmTre, secrets: &ProtectedSecrets, ms: &mut MsSqnState, seq: u8| {
            let (rand, autn) = challenge(seq);
            let ch = AkaChallenge {
                constants: &Constants::default(),
                profile: &SqnProfile::default(),
                rand: &rand,
                autn: &autn,
                pin: None,
            };
            t.authenticate(secrets, ms, &ch)
        };

        let mut ms = MsSqnState::new(&SqnProfile::default());
        let secrets = {
            let mut t = open(&s);
            let secrets = t.import_mcim_secrets(&bound(&values)).unwrap();
            assert!(matches!(
                run(&mut t, &secrets, &mut ms, 1).unwrap(),
                DeviceResponse::Success { .. }
            ));
            // Bound to values the platform does not have: refused from the start.
            let wrong = t
                .import_mcim_secrets(&bound(&[[7; 32], values[1]]))
                .unwrap();
            let before = ms.clone();
            let err = run(&mut t, &wrong, &mut ms, 2).unwrap_err();
            assert!(matches!(err, TreError::PolicyFailed(_)), "{err}");
            assert_eq!(ms, before);
            // K cannot be bound (MILENAGE would need a policy per block encryption).
            let mut k_bound = bound(&values);
            k_bound.k = wrap_aes128_key(
                &parent,
                &k,
                ObjectPolicy::pcrs(sel.clone(), &values).unwrap(),
                &mut rng,
            )
            .unwrap()
            .to_bytes()
            .unwrap();
            assert!(matches!(
                t.import_mcim_secrets(&k_bound),
                Err(TreError::BadSecrets(_))
            ));
            secrets
        };
        // The platform changes.
        let ext = s.tpm2(
            "tpm2_pcrextend",
            &[&format!("16:sha256={}", "cd".repeat(32))],
        );
        assert!(
            ext.status.success(),
            "{}",
            String::from_utf8_lossy(&ext.stderr)
        );
        let mut t = open(&s);
        let before = ms.clone();
        let err = run(&mut t, &secrets, &mut ms, 3).unwrap_err();
        assert!(matches!(err, TreError::PolicyFailed(_)), "{err}");
        assert!(err.to_string().contains("[16, 23]"), "{err}");
        assert_eq!(ms, before, "a refused authentication changes no SQN state");
    }

    /// Status calls between transactions (identity, public keys, a repeated init) must not
    /// break the handles the counter, anchor and imports use (ESYS shares one handle object
    /// per TPM handle; a regression the daemon hit).
    #[test]
    fn counter_anchor_and_import_survive_status_calls() {
        let s = Swtpm::start();
        let mut t = open(&s);
        t.init_device(&identity(1)).unwrap();
        let c0 = t.rollback_counter().unwrap();
        assert_eq!(t.advance_rollback_counter().unwrap(), c0 + 1);
        let public = t.device_public().unwrap();
        t.identity().unwrap();
        t.init_device(&identity(1)).unwrap();
        assert_eq!(t.advance_rollback_counter().unwrap(), c0 + 2);
        t.identity().unwrap();
        let a = AuditAnchor {
            seq: 9,
            head: [4; 32],
        };
        t.set_audit_anchor(&a).unwrap();
        t.device_public().unwrap();
        assert_eq!(t.audit_anchor().unwrap(), a);
        t.identity().unwrap();
        t.import_mcim_secrets(&tpm_wrap(
            &public,
            &K::new([1; 16]),
            &Opc::new([2; 16]),
            KForm::Key,
        ))
        .unwrap();
        // The counter is monotonic across TPM restarts too (not a RAM copy).
        drop(t);
        let mut s = s;
        s.restart();
        assert_eq!(open(&s).rollback_counter().unwrap(), c0 + 2);
    }

    /// tpm2-tools, an independent TPM2_Import client, accepts mcim-core's duplication blob,
    /// and the imported key encrypts exactly like software AES with K.
    #[test]
    fn tpm2_tools_imports_our_duplication_blob() {
        let s = Swtpm::start();
        let public = {
            let mut t = open(&s);
            t.init_device(&identity(1)).unwrap();
            t.device_public().unwrap()
        };
        let parent = EccPublic::from_tpm2b(&public.storage_public).unwrap();
        let k = K::new(arr("000102030405060708090a0b0c0d0e0f"));
        let blob = wrap_aes128_key(&parent, &k, ObjectPolicy::default(), &mut rand::rng()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
        let tpm2b = |b: &[u8]| [&(b.len() as u16).to_be_bytes()[..], b].concat();
        std::fs::write(path("k.pub"), blob.public_tpm2b().unwrap()).unwrap();
        std::fs::write(path("k.dpriv"), tpm2b(&blob.duplicate)).unwrap();
        std::fs::write(path("k.seed"), tpm2b(&blob.in_sym_seed)).unwrap();
        let parent_handle = format!("0x{STORAGE_HANDLE:x}");
        let ok = |o: std::process::Output| {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        };
        ok(s.tpm2(
            "tpm2_import",
            &[
                "-C",
                &parent_handle,
                "-u",
                &path("k.pub"),
                "-i",
                &path("k.dpriv"),
                "-s",
                &path("k.seed"),
                "-r",
                &path("k.priv"),
            ],
        ));
        ok(s.tpm2(
            "tpm2_load",
            &[
                "-C",
                &parent_handle,
                "-u",
                &path("k.pub"),
                "-r",
                &path("k.priv"),
                "-c",
                &path("k.ctx"),
            ],
        ));
        let block = arr::<16>("00112233445566778899aabbccddeeff");
        std::fs::write(path("in.bin"), block).unwrap();
        ok(s.tpm2(
            "tpm2_encryptdecrypt",
            &[
                "-c",
                &path("k.ctx"),
                "-G",
                "ecb",
                "-o",
                &path("out.bin"),
                &path("in.bin"),
            ],
        ));
        let mut want = [block];
        mcim_core::aka::Kernel::encrypt_blocks(&SoftKernel::new(&k), &mut want).unwrap();
        // FIPS-197 appendix C.1: AES-128 of this block under this key.
        assert_eq!(hex::encode(want[0]), "69c4e0d86a7b0430d8cdb78070b4c55a");
        assert_eq!(std::fs::read(path("out.bin")).unwrap(), want[0]);
        // K may only encrypt: the TPM refuses to decrypt with it.
        let dec = s.tpm2(
            "tpm2_encryptdecrypt",
            &[
                "-d",
                "-c",
                &path("k.ctx"),
                "-G",
                "ecb",
                "-o",
                &path("dec.bin"),
                &path("out.bin"),
            ],
        );
        assert!(!dec.status.success(), "decrypt must be refused");
    }

    #[test]
    fn conformance_before_init() {
        let s = Swtpm::start();
        before_init_there_is_no_identity(&mut open(&s));
    }

    #[test]
    fn conformance_init_idempotent() {
        let s = Swtpm::start();
        init_is_idempotent(&mut open(&s));
    }

    #[test]
    fn conformance_different_identity_refused() {
        let s = Swtpm::start();
        a_different_identity_is_refused_and_changes_nothing(&mut open(&s));
    }

    #[test]
    fn conformance_random() {
        let s = Swtpm::start();
        random_gives_fresh_bytes(&mut open(&s));
    }

    #[test]
    fn capabilities_found_at_start() {
        let s = Swtpm::start();
        let t = open(&s);
        let c = t.capabilities();
        assert_eq!(c.kind, TreKind::Tpm2);
        // libtpms implements TPM2_EncryptDecrypt2, so AKA can run inside the TPM.
        assert!(c.encrypt_decrypt2);
        assert_eq!(c.aka_execution, AkaExecution::InTre);
    }

    #[test]
    fn unreachable_tpm_is_a_clear_error() {
        let err = TpmTre::open(&TpmConfig {
            tcti: "swtpm:host=127.0.0.1,port=1".into(),
        })
        .unwrap_err();
        assert!(matches!(err, TreError::Unavailable { .. }), "{err}");
        assert!(err.to_string().contains("port=1"), "{err}");
    }

    /// tpm2-tools, independently, sees the three persistent keys and the identity in NV.
    #[test]
    fn tpm2_tools_witness_keys_and_identity() {
        let s = Swtpm::start();
        open(&s).init_device(&identity(7)).unwrap();
        let handles = s.tpm2("tpm2_getcap", &["handles-persistent"]);
        let text = String::from_utf8_lossy(&handles.stdout).to_lowercase();
        for h in [STORAGE_HANDLE, AK_HANDLE, TLS_HANDLE] {
            assert!(
                text.contains(&format!("0x{h:x}")),
                "{h:#x} missing in {text}"
            );
        }
        let nv = s.tpm2("tpm2_nvread", &[&format!("0x{NV_IDENTITY:x}"), "-C", "o"]);
        assert!(
            nv.status.success(),
            "{}",
            String::from_utf8_lossy(&nv.stderr)
        );
        let body = String::from_utf8_lossy(&nv.stdout);
        assert!(body.contains("\"pcid\":\"001010000000007\""), "{body}");
        assert!(body.contains("SN-0007"), "{body}");
    }

    /// The identity and keys survive a TPM power cycle, and a new daemon finds them.
    #[test]
    fn identity_survives_tpm_restart() {
        let mut s = Swtpm::start();
        let first = open(&s).init_device(&identity(3)).unwrap();
        s.restart();
        let mut t = open(&s);
        assert_eq!(t.identity().unwrap(), Some(identity(3)));
        assert_eq!(t.device_public().unwrap(), first.public);
        assert!(!t.init_device(&identity(3)).unwrap().created);
    }

    /// If the keys disappear while the identity stays (evicted behind our back), init
    /// refuses instead of minting new keys, and changes nothing.
    #[test]
    fn missing_keys_with_identity_is_refused_not_rekeyed() {
        let s = Swtpm::start();
        open(&s).init_device(&identity(4)).unwrap();
        let ev = s.tpm2(
            "tpm2_evictcontrol",
            &["-C", "o", "-c", &format!("0x{STORAGE_HANDLE:x}")],
        );
        assert!(
            ev.status.success(),
            "{}",
            String::from_utf8_lossy(&ev.stderr)
        );
        let mut t = open(&s);
        let err = t.init_device(&identity(4)).unwrap_err();
        assert!(matches!(err, TreError::Mismatch(_)), "{err}");
        let after = s.tpm2("tpm2_getcap", &["handles-persistent"]);
        let text = String::from_utf8_lossy(&after.stdout).to_lowercase();
        assert!(
            !text.contains(&format!("0x{STORAGE_HANDLE:x}")),
            "no new storage key was made: {text}"
        );
    }
}

// ---- PKCS#11 instantiation (SoftHSM2, one token per test) ----

#[cfg(feature = "pkcs11")]
mod pkcs11 {
    use super::*;
    use mcim_e2e::{SOFTHSM2_LABEL, SOFTHSM2_MODULE, SOFTHSM2_PIN, SoftHsm, own_softhsm};
    use mcim_tre::tre::pkcs11::{Pkcs11Config, Pkcs11Tre};

    fn config(pin: &str) -> Pkcs11Config {
        Pkcs11Config {
            module: SOFTHSM2_MODULE.into(),
            token_label: SOFTHSM2_LABEL.into(),
            pin: pin.to_string().into(),
            force_rsa_unwrap: false,
        }
    }

    fn open(_token: &SoftHsm) -> Pkcs11Tre {
        Pkcs11Tre::open(&config(SOFTHSM2_PIN)).unwrap()
    }

    /// The SHO's side for a token: ECDH + AES-KWP built in software by mcim-core.
    fn token_wrap(public: &DevicePublic, k: &K, opc: &Opc, form: KForm) -> WrappedSecrets {
        assert_eq!(form, KForm::Key, "a token always holds K as a key");
        let mut rng = rand::rng();
        let w = |s: &[u8]| {
            mcim_core::token_wrap::wrap_for_token(&public.storage_public, s)
                .unwrap()
                .to_bytes()
        };
        let _ = &mut rng;
        WrappedSecrets {
            k: w(k.expose()),
            opc: w(opc.expose()),
        }
    }

    /// A test that runs on its own SoftHSM2 token (see `mcim_e2e::own_softhsm`).
    macro_rules! on_token {
        ($(#[$doc:meta])* $name:ident, |$token:ident| $body:block) => {
            $(#[$doc])*
            #[test]
            fn $name() {
                let Some($token) = own_softhsm(concat!("pkcs11::", stringify!($name))) else {
                    return;
                };
                $body
            }
        };
    }

    on_token!(conformance_before_init, |t| {
        before_init_there_is_no_identity(&mut open(&t));
    });

    on_token!(conformance_init_idempotent, |t| {
        init_is_idempotent(&mut open(&t));
    });

    on_token!(conformance_different_identity_refused, |t| {
        a_different_identity_is_refused_and_changes_nothing(&mut open(&t));
    });

    on_token!(conformance_random, |t| {
        random_gives_fresh_bytes(&mut open(&t));
    });

    fn open_rsa(_token: &SoftHsm) -> Pkcs11Tre {
        let mut c = config(SOFTHSM2_PIN);
        c.force_rsa_unwrap = true;
        Pkcs11Tre::open(&c).unwrap()
    }

    /// The SHO's side for a token without ECDH: RSA-OAEP to its RSA unwrap key.
    fn token_wrap_rsa(public: &DevicePublic, k: &K, opc: &Opc, form: KForm) -> WrappedSecrets {
        assert_eq!(form, KForm::Key);
        assert!(mcim_core::token_wrap::is_rsa_spki(&public.storage_public));
        let w = |s: &[u8]| {
            mcim_core::token_wrap::wrap_for_token_rsa(&public.storage_public, s, &mut rand::rng())
                .unwrap()
                .0
        };
        WrappedSecrets {
            k: w(k.expose()),
            opc: w(opc.expose()),
        }
    }

    on_token!(
        /// The RSA-OAEP fallback (tokens without ECDH; forced here): the same AKA results,
        /// and capabilities say which scheme the token takes.
        conformance_rsa_oaep_fallback,
        |t| {
            let mut tre = open_rsa(&t);
            assert_eq!(tre.capabilities().unwrap, mcim_tre::tre::UnwrapScheme::RsaOaep);
            let kept = aka_in_tre_equals_published_sets(&mut tre, &token_wrap_rsa, KForm::Key);
            protected_records_hold_no_plaintext(&kept);
            // A later session without the flag keeps the scheme of the key it finds.
            drop(tre);
            assert_eq!(open(&t).capabilities().unwrap, mcim_tre::tre::UnwrapScheme::RsaOaep);
        }
    );

    on_token!(conformance_rsa_oaep_damaged_blob, |t| {
        damaged_blob_is_refused(&mut open_rsa(&t), &token_wrap_rsa);
    });

    on_token!(conformance_aka_in_tre_equals_published_sets, |t| {
        let kept = aka_in_tre_equals_published_sets(&mut open(&t), &token_wrap, KForm::Key);
        protected_records_hold_no_plaintext(&kept);
    });

    on_token!(conformance_forged_autn, |t| {
        forged_autn_is_mac_failure(&mut open(&t), &token_wrap);
    });

    on_token!(conformance_damaged_blob, |t| {
        damaged_blob_is_refused(&mut open(&t), &token_wrap);
    });

    on_token!(conformance_secrets_for_another_device, |t| {
        let other = t.tool(
            "softhsm2-util",
            &[
                "--init-token",
                "--free",
                "--label",
                "other",
                "--pin",
                SOFTHSM2_PIN,
                "--so-pin",
                "975310",
            ],
        );
        assert!(other.status.success());
        let mut c = config(SOFTHSM2_PIN);
        c.token_label = "other".into();
        let mut theirs = Pkcs11Tre::open(&c).unwrap();
        secrets_for_another_device_are_refused(&mut open(&t), &mut theirs, &token_wrap);
    });

    on_token!(
        /// After an import, pkcs11-tool (independent) shows K sensitive and never extractable,
        /// and reading its value is refused.
        pkcs11_tool_sees_k_sensitive_and_unreadable,
        |t| {
            let mut tre = open(&t);
            tre.init_device(&identity(1)).unwrap();
            let public = tre.device_public().unwrap();
            let k = K::new([0x5a; 16]);
            let secrets = tre
                .import_mcim_secrets(&token_wrap(&public, &k, &Opc::new([0x6b; 16]), KForm::Key))
                .unwrap();
            let base = [
                "--module", SOFTHSM2_MODULE, "--token-label", SOFTHSM2_LABEL, "--login", "--pin",
                SOFTHSM2_PIN,
            ];
            let list = t.tool("pkcs11-tool", &[&base[..], &["--list-objects", "--type", "secrkey"]].concat());
            let text = String::from_utf8_lossy(&list.stdout);
            let k_part = text.split("Secret Key Object").find(|p| p.contains("mcim.k")).unwrap();
            assert!(k_part.contains("AES"), "{k_part}");
            let access = k_part.lines().find(|l| l.contains("Access:")).unwrap();
            assert!(access.contains("sensitive"), "{k_part}");
            // pkcs11-tool prints "extractable" only when CKA_EXTRACTABLE is true. (An
            // unwrapped key is never "never extractable": it existed outside once.)
            assert!(!access.contains("extractable"), "{k_part}");
            let usage = k_part.lines().find(|l| l.contains("Usage:")).unwrap();
            assert_eq!(usage.split(':').nth(1).unwrap().trim(), "encrypt", "{k_part}");
            let id = hex::encode(&secrets.k);
            let read = t.tool(
                "pkcs11-tool",
                &[
                    &base[..],
                    &["--read-object", "--type", "secrkey", "--id", &id, "--label", "mcim.k"],
                ]
                .concat(),
            );
            assert!(
                !read.status.success(),
                "reading K's value must be refused: {:?} {} {}",
                read.status,
                String::from_utf8_lossy(&read.stdout),
                String::from_utf8_lossy(&read.stderr)
            );
            let why = String::from_utf8_lossy(&read.stderr);
            assert!(why.contains("SENSITIVE") || why.contains("sensitive"), "{why}");
            let shown = String::from_utf8_lossy(&read.stdout);
            assert!(!shown.contains(&hex::encode(k.expose())));
            assert!(!read.stdout.windows(16).any(|w| w == k.expose()));
        }
    );

    on_token!(
        /// The identity and keys survive closing and reopening the token.
        identity_survives_a_new_session,
        |t| {
            let first = open(&t).init_device(&identity(3)).unwrap();
            let mut again = open(&t);
            assert_eq!(again.identity().unwrap(), Some(identity(3)));
            assert_eq!(again.device_public().unwrap(), first.public);
            assert_eq!(again.capabilities().kind, TreKind::Pkcs11);
            assert_eq!(again.capabilities().aka_execution, AkaExecution::InTre);
            assert!(!again.capabilities().quote);
        }
    );

    on_token!(
        /// Wrong PIN, unknown token, missing module: each a clear error at start; nothing on
        /// the token changes (the right PIN still opens it, no object appeared).
        bad_configuration_is_a_clear_error_and_changes_nothing,
        |t| {
            let err = Pkcs11Tre::open(&config("000000")).unwrap_err();
            assert!(matches!(err, TreError::Login(ref m) if m.contains("wrong user PIN")), "{err}");
            let mut c = config(SOFTHSM2_PIN);
            c.token_label = "no-such-token".into();
            let err = Pkcs11Tre::open(&c).unwrap_err();
            assert!(err.to_string().contains("no token with this label"), "{err}");
            let mut c = config(SOFTHSM2_PIN);
            c.module = "/nonexistent/libpkcs11.so".into();
            let err = Pkcs11Tre::open(&c).unwrap_err();
            assert!(err.to_string().contains("cannot load the PKCS#11 module"), "{err}");
            let mut tre = open(&t);
            assert_eq!(tre.identity().unwrap(), None);
            assert!(matches!(tre.device_public(), Err(TreError::NotInitialised)));
            // The PIN never shows in Debug output.
            assert!(!format!("{:?}", config(SOFTHSM2_PIN)).contains(SOFTHSM2_PIN));
        }
    );

    on_token!(
        /// pkcs11-tool (OpenSC), independently, sees the key pairs and the identity object,
        /// and the private keys sensitive and never extractable.
        pkcs11_tool_witness_keys_and_identity,
        |t| {
            open(&t).init_device(&identity(7)).unwrap();
            let out = t.tool(
                "pkcs11-tool",
                &[
                    "--module", SOFTHSM2_MODULE, "--token-label", SOFTHSM2_LABEL, "--login",
                    "--pin", SOFTHSM2_PIN, "--list-objects",
                ],
            );
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let text = String::from_utf8_lossy(&out.stdout);
            for label in ["mcim.unwrap", "mcim.attestation", "mcim.tls", "mcim.identity"] {
                assert!(text.contains(label), "{label} missing:\n{text}");
            }
            assert_eq!(text.matches("Private Key Object; EC").count(), 3, "{text}");
            for part in text.split("Private Key Object").skip(1) {
                let part = part.split("Object;").next().unwrap();
                assert!(part.contains("never extractable"), "{part}");
            }
        }
    );
}
