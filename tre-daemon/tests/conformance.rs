//! The TRE conformance suite: the same checks against every backend, each test on its own
//! real TRE instance (swtpm here; SoftHSM2 when the PKCS#11 backend lands).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use mcim_core::identity::{DeviceIdentity, Pcid};
use mcim_tre::tre::{AkaExecution, Tre, TreError, TreKind};

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

// ---- TPM instantiation ----

mod tpm {
    use super::*;
    use mcim_tre::tre::tpm::{
        AK_HANDLE, NV_IDENTITY, STORAGE_HANDLE, TLS_HANDLE, TpmConfig, TpmTre,
    };
    use support::Swtpm;

    fn open(s: &Swtpm) -> TpmTre {
        TpmTre::open(&TpmConfig { tcti: s.tcti() }).unwrap()
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
