//! End-to-end provisioning (TR 33.812 5.1.3.6.2 and 5.1.3.6.3) through `mcimctl lab run`: each
//! test starts its own `mcim-roles all` (fresh PKI and SQLite database), its own software TRE
//! (swtpm with a fresh state directory, or a fresh SoftHSM2 token) and its own `tred`, all the
//! deployed binaries, and reads the lab's JSON report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;

fn lab(args: &[&str]) -> (bool, Value, String) {
    mcim_e2e::lab_run(args)
}

fn steps(r: &Value) -> Vec<(u64, bool)> {
    r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step"].as_u64().unwrap(), s["ok"].as_bool().unwrap()))
        .collect()
}

fn assert_provisioned(r: &Value, first_step: u64) {
    let want: Vec<(u64, bool)> = (first_step..=14).map(|s| (s, true)).collect();
    assert_eq!(steps(r), want, "{r:#}");
    let imsi = r["mcim"]["imsi"].as_str().unwrap();
    assert!(
        imsi.starts_with("00102") && imsi.len() == 15,
        "the SHO's IMSI: {imsi}"
    );
    assert_eq!(r["mcim"]["id"], r["mcim"]["imsi"]);
    // Selected: in the session of the operational attach (5.1.1.1).
    assert_eq!(r["mcim"]["state"], "selected");
    assert_eq!(r["operational_attach"]["ok"], true);
    assert_eq!(r["operational_attach"]["imsi"], imsi);
    assert_eq!(r["operational_attach"]["via"], "tred");
    assert_eq!(r["impostor_attach"]["refused"], true);
    assert_eq!(r["sho_registration"]["state"], "provisioned");
    assert_eq!(r["audit"]["ok"], true);
    // The registry holds the initial credential (PCID) and the new MCIM.
    let held: Vec<&str> = r["registry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(held.len(), 2, "{held:?}");
    assert!(held.contains(&imsi) && held.contains(&"001010000000001"));
    // The timing split (BENCHMARKS.md): the TRE's part is some, not all, of the whole
    // (not measured across a crash: tred's counters restart with it).
    if r.get("crash").is_some() {
        assert!(r.get("timing").is_none());
        return;
    }
    let t = &r["timing"];
    let (total, tre) = (
        t["provisioning_us"].as_u64().unwrap(),
        t["tre_us"].as_u64().unwrap(),
    );
    assert!(tre > 0 && tre < total, "{t}");
    assert_eq!(t["rest_us"].as_u64().unwrap(), total - tre);
    let commands = t["tpm_commands"].as_u64().unwrap();
    if r["tre"] == "tpm" {
        assert!(commands > 10, "every TPM command is counted: {t}");
    } else {
        assert_eq!(commands, 0, "a token issues no TPM commands: {t}");
    }
}

#[test]
fn swtpm_device_is_provisioned_over_3gpp_access_then_attaches_with_its_new_imsi() {
    let (ok, r, stderr) = lab(&["--tre", "tpm", "--access", "3gpp"]);
    assert!(ok, "{stderr}");
    assert_eq!(r["tre"], "tpm");
    assert_eq!(r["access"], "3gpp");
    assert_provisioned(&r, 1);
}

#[test]
fn swtpm_device_is_provisioned_over_non_3gpp_access_without_pcid_aka() {
    let (ok, r, stderr) = lab(&["--tre", "tpm", "--access", "non-3gpp"]);
    assert!(ok, "{stderr}");
    assert_eq!(r["access"], "non-3gpp");
    // 5.1.3.6.3: no attach with the PCID; the device goes straight to the DRF.
    assert_provisioned(&r, 5);
}

#[test]
fn softhsm_device_is_provisioned_over_3gpp_access() {
    let (ok, r, stderr) = lab(&["--tre", "pkcs11", "--access", "3gpp"]);
    assert!(ok, "{stderr}");
    assert_eq!(r["tre"], "pkcs11");
    assert_provisioned(&r, 1);
}

/// The lab failed at `step`, every earlier step passed, the failure says `why`, the SHO's
/// registration ended in `sho_state`, and the device holds only its initial credential.
fn assert_refused(r: &Value, stderr: &str, step: u64, why: &str, sho_state: &str) {
    assert_eq!(r["ok"], false);
    let s = steps(r);
    assert_eq!(s.last(), Some(&(step, false)), "{r:#}");
    assert!(s[..s.len() - 1].iter().all(|(_, ok)| *ok), "{r:#}");
    let failed = &r["steps"].as_array().unwrap()[s.len() - 1];
    assert!(failed["detail"].as_str().unwrap().contains(why), "{failed}");
    assert!(
        stderr.contains(&format!("step {step}")),
        "the failed step is named: {stderr}"
    );
    assert_eq!(r["sho_registration"]["state"], sho_state, "the SHO is told");
    // Nothing provisioned: only the initial credential is in the registry.
    assert_eq!(r["registry"], serde_json::json!(["001010000000001"]));
    assert!(r.get("mcim").is_none() && r.get("operational_attach").is_none());
}

#[test]
fn a_pcr_extended_after_supply_is_refused_by_the_pva_the_sho_is_told_and_nothing_is_provisioned() {
    let (ok, r, stderr) = lab(&["--tre", "tpm", "--extend-pcr-after-supply"]);
    assert!(!ok, "the lab must fail: {r:#}");
    assert_refused(&r, &stderr, 9, "PCR 0 differs", "validation_failed");
}

/// A compromised RO's DPF serves a genuine SHO-signed package for another device, its
/// secrets wrapped for this device's TPM: the device refuses it at step 13 by the package's
/// binding, reports the failure (the SHO hears it), and installs nothing.
#[test]
fn a_package_for_another_device_is_refused_by_the_device_and_nothing_is_installed() {
    let (ok, r, stderr) = lab(&["--tre", "tpm", "--dpf-serves", "other-device-package"]);
    assert!(!ok, "the lab must fail: {r:#}");
    assert!(stderr.contains("the RO is compromised"), "{stderr}");
    assert_refused(
        &r,
        &stderr,
        13,
        "is for device 001010000000002, not this one",
        "failed",
    );
}

/// The same with a genuine package of an earlier registration of this very device (another
/// registration id and nonce), on the PKCS#11 TRE.
#[test]
fn a_replayed_package_is_refused_by_the_device_and_nothing_is_installed() {
    let (ok, r, stderr) = lab(&["--tre", "pkcs11", "--dpf-serves", "replayed-package"]);
    assert!(!ok, "the lab must fail: {r:#}");
    assert_refused(&r, &stderr, 13, "another registration", "failed");
}

/// Every step resumes after a crash of the device's daemon (SIGKILL right after the device
/// reports the step, restarted on the same state): after registration (the task stream is
/// reopened for the same registration) and between download and install (the install and the
/// report are idempotent). Each step is reported once; the registry holds one new MCIM.
#[test]
fn tred_killed_during_provisioning_resumes_its_run_and_completes() {
    for crash in ["tred:7", "tred:12"] {
        let (ok, r, stderr) = lab(&["--tre", "tpm", "--crash", crash]);
        assert!(ok, "{crash}: {stderr}");
        assert!(stderr.contains("tred killed after step"), "{stderr}");
        assert_eq!(r["crash"]["process"], "tred");
        assert_provisioned(&r, 1);
    }
}

/// The same for the network side: every role killed at once, while the PVA's validation is
/// pending (the SHO follows it again from its database) and after the SHO's authorisation
/// (the DPF replays the unacknowledged download task); the device retries meanwhile.
#[test]
fn the_roles_killed_during_provisioning_resume_from_their_database_and_the_device_completes() {
    for crash in ["roles:8", "roles:11"] {
        let (ok, r, stderr) = lab(&["--tre", "tpm", "--crash", crash]);
        assert!(ok, "{crash}: {stderr}");
        assert!(stderr.contains("mcim-roles killed after step"), "{stderr}");
        assert_eq!(r["crash"]["process"], "roles");
        assert_provisioned(&r, 1);
    }
}

/// A clean shutdown (SIGTERM, as an operator's restart or an upgrade sends it) of every role
/// right after each step of the flow, then a start on the same database: the roles drain (the
/// DPF ends its task streams, a drain is bounded), nothing is marked failed for calls the
/// shutdown cancelled, and the provisioning completes with each step reported once.
fn roles_stopped_cleanly_after(steps: std::ops::RangeInclusive<u32>) {
    for step in steps {
        let crash = format!("roles:{step}");
        let (ok, r, stderr) = lab(&["--tre", "tpm", "--crash", &crash, "--crash-signal", "term"]);
        assert!(ok, "{crash}: {stderr}");
        assert_eq!(r["crash"]["signal"], "term", "{crash}");
        assert_provisioned(&r, 1);
    }
}

#[test]
fn the_roles_stopped_cleanly_after_steps_1_to_7_resume_and_the_device_completes() {
    roles_stopped_cleanly_after(1..=7);
}

#[test]
fn the_roles_stopped_cleanly_after_steps_8_to_13_resume_and_the_device_completes() {
    roles_stopped_cleanly_after(8..=13);
}

/// The same for the device's daemon: SIGTERM as the run starts and after each step; `tred`
/// resumes its saved run.
fn tred_stopped_cleanly_after(steps: std::ops::RangeInclusive<u32>) {
    for step in steps {
        let crash = format!("tred:{step}");
        let (ok, r, stderr) = lab(&["--tre", "tpm", "--crash", &crash, "--crash-signal", "term"]);
        assert!(ok, "{crash}: {stderr}");
        assert_eq!(r["crash"]["signal"], "term", "{crash}");
        assert_provisioned(&r, 1);
    }
}

#[test]
fn tred_stopped_cleanly_as_the_run_starts_or_after_steps_1_to_6_resumes_and_completes() {
    tred_stopped_cleanly_after(0..=6);
}

#[test]
fn tred_stopped_cleanly_after_steps_7_to_13_resumes_and_completes() {
    tred_stopped_cleanly_after(7..=13);
}

/// The PCID's initial credentials in CCIF modes 1 (issued by the CCIF, wrapped for the TPM)
/// and 3 (registered by the subscriber, delayed activation) carry the same flow as mode 2
/// (the default above): the PCID's AKA in the TRE at steps 1-4 uses them.
#[test]
fn every_ccif_mode_gives_credentials_the_pcid_attach_authenticates() {
    for (mode, tre) in [("1", "tpm"), ("3", "pkcs11")] {
        let (ok, r, stderr) = lab(&["--tre", tre, "--ccif-mode", mode]);
        assert!(ok, "mode {mode}: {stderr}");
        assert_eq!(r["ccif_mode"], mode.parse::<u64>().unwrap());
        assert!(stderr.contains(&format!("CCIF mode {mode}")), "{stderr}");
        assert_provisioned(&r, 1);
    }
}

/// A TPM without TPM2_EncryptDecrypt2 (tred's `tpm_aka = "sealed"`): the PVA's result says
/// AKA runs with K unsealed in the host, so the SHO (and the CCIF, mode 1) wrap K as sealed
/// data; that TRE refuses K as an AES key, so provisioning and the operational attach
/// succeeding show the SHO chose the form from the result.
#[test]
fn a_tpm_without_encrypt_decrypt2_gets_k_as_sealed_data_and_is_provisioned() {
    let (ok, r, stderr) = lab(&["--tre", "tpm", "--tpm-aka", "sealed", "--ccif-mode", "1"]);
    assert!(ok, "{stderr}");
    assert_provisioned(&r, 1);
}

/// The same device under a subscription that requires AKA in the TRE: the SHO refuses it at
/// step 10 through the RO's DPF, the device hears it on its task stream and ends its run,
/// and nothing is provisioned.
#[test]
fn a_subscription_requiring_aka_in_the_tre_refuses_a_sealed_k_device_and_the_device_hears_it() {
    let (ok, r, stderr) = lab(&[
        "--tre",
        "tpm",
        "--tpm-aka",
        "sealed",
        "--require-aka-in-tre",
    ]);
    assert!(!ok, "the lab must fail: {r:#}");
    assert_refused(
        &r,
        &stderr,
        10,
        "the subscription requires AKA in the TRE",
        "validation_failed",
    );
}
