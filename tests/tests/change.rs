//! End-to-end change of SHO (TR 33.812 5.1.3.7.4.2, re-provisioning using the old SHO's
//! connectivity) through `mcimctl lab run --flow change-sho`: each test starts its own
//! `mcim-roles all` (two SHOs, fresh databases), its own software TRE (swtpm with a fresh
//! state, or a fresh SoftHSM2 token) and its own `tred`, provisions the device at the first SHO,
//! moves it to the second, and then looks at what every party keeps: the lab's JSON report, the
//! roles' databases, the device's state directory, and the TRE itself through tpm2-tools and
//! pkcs11-tool.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use mcim_e2e::{LabDbs, db_rows, dump, lab_run};
use serde_json::Value;

const OLD_SHO: &str = "sho.mcim.local";
const NEW_SHO: &str = "sho2.mcim.local";
const PCID: &str = "001010000000001";

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Runs the change in `dir` with `args` (`--flow change-sho` unless they name another);
/// panics with the report when it failed.
fn change(dir: &Path, args: &[&str]) -> Value {
    let d = dir.to_str().unwrap();
    let mut all = vec!["--dir", d];
    if !args.contains(&"--flow") {
        all.extend(["--flow", "change-sho"]);
    }
    all.extend_from_slice(args);
    let (ok, r, stderr) = lab_run(&all);
    assert!(ok, "{r:#}\n{stderr}");
    r
}

/// What every successful change shows, whatever the TRE, access or crash: the flow's steps
/// once each (14 over the old connectivity; 17 reverting to the pristine state); exactly one
/// MCIM, the new SHO's, provides connectivity and attaches; the old SHO holds the device's
/// verified notice and refuses the old IMSI; the new SHO learnt nothing of the old
/// subscription (over the old connectivity: only the filtered acknowledgment; reverting: not
/// even that); the DRF routes the device to the new SHO; one download.
fn assert_changed(dir: &Path, r: &Value) {
    let pristine = r["flow"] == "pristine";
    let steps: Vec<(u64, bool)> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step"].as_u64().unwrap(), s["ok"].as_bool().unwrap()))
        .collect();
    let last = if pristine { 17 } else { 14 };
    assert_eq!(
        steps,
        (1..=last).map(|s| (s, true)).collect::<Vec<_>>(),
        "{r:#}"
    );
    let old_imsi = r["before"]["imsi"].as_str().unwrap().to_string();
    let new_imsi = r["mcim"]["imsi"].as_str().unwrap().to_string();
    assert_eq!(r["before"]["sho"], OLD_SHO);
    assert!(old_imsi.starts_with("00102"), "{old_imsi}");
    assert!(
        new_imsi.starts_with("00103"),
        "the new SHO's IMSI: {new_imsi}"
    );
    assert_eq!(r["mcim"]["sho"], NEW_SHO);
    assert_eq!(r["operational_attach"]["ok"], true);
    assert_eq!(r["operational_attach"]["imsi"], new_imsi.as_str());
    assert_eq!(r["discard"]["notice_acknowledged"], true);
    assert_eq!(r["discard"]["relayed_to_new_sho"], !pristine);
    assert_eq!(r["old_imsi_refused"], true);
    assert_eq!(r["sho_registration"]["state"], "provisioned");
    // The registry: the initial credential and the new MCIM; nothing of the old SHO.
    let mcims = r["mcims"].as_array().unwrap();
    let of = |sho: &str| mcims.iter().filter(|m| m["sho"] == sho).count();
    assert_eq!(of(NEW_SHO), 1, "{mcims:?}");
    assert_eq!(of(OLD_SHO), 0, "{mcims:?}");
    assert_eq!(
        mcims.len(),
        2,
        "the PCID's credential and the new MCIM: {mcims:?}"
    );
    // The device's state: no record of the old MCIM; the notice acknowledged, once.
    let state = dir.join("tred-state");
    let records: Vec<String> = std::fs::read_dir(state.join("mcims"))
        .unwrap()
        .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !records.iter().any(|f| f.starts_with(&old_imsi)),
        "the old MCIM's record is gone: {records:?}"
    );
    let outbox: Value =
        serde_json::from_slice(&std::fs::read(state.join("discard-outbox.json")).unwrap()).unwrap();
    let notices = outbox.as_array().unwrap();
    assert_eq!(notices.len(), 1, "{outbox:#}");
    assert_eq!(notices[0]["imsi"], old_imsi.as_str());
    assert!(notices[0]["ack"].is_string(), "acknowledged: {outbox:#}");
    // The old SHO: one notice for the old IMSI, from this device, with the acknowledgment it
    // signed (checked here with its certificate).
    let roles = LabDbs::of(dir).roles;
    let rows = block(db_rows(
        &roles,
        "SELECT imsi, pcid, notice, ack FROM sho_discard",
    ));
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0][0], old_imsi);
    assert_eq!(rows[0][1], PCID);
    let notice = mcim_pki::discard::Notice::parse(&hex::decode(&rows[0][2]).unwrap()).unwrap();
    assert_eq!(
        (
            notice.pcid.as_str(),
            notice.imsi.as_str(),
            notice.sho.as_str()
        ),
        (PCID, old_imsi.as_str(), OLD_SHO)
    );
    let sho_key = mcim_pki::dev::certificate_key(&dir.join("pki"), "sho").unwrap();
    let ack: mcim_pki::discard::Ack =
        mcim_core::signed::open(&hex::decode(&rows[0][3]).unwrap(), &sho_key).unwrap();
    assert_eq!(
        (ack.imsi.as_str(), ack.sho.as_str()),
        (old_imsi.as_str(), OLD_SHO)
    );
    // The RO: the device is the new SHO's for discovery, no offer left, one download.
    let sub = block(db_rows(
        &roles,
        &format!("SELECT sho_id FROM ro_subscription WHERE pcid = '{PCID}'"),
    ));
    assert_eq!(sub, vec![vec![NEW_SHO.to_string()]]);
    assert!(block(db_rows(&roles, "SELECT pcid FROM ro_sho_offer")).is_empty());
    let downloads = block(db_rows(
        &roles,
        &format!("SELECT CAST(downloads AS TEXT) FROM ro_registration WHERE sho_id = '{NEW_SHO}'"),
    ));
    assert_eq!(downloads, vec![vec!["1".to_string()]], "one download");
    // The new SHO's whole database: the filtered acknowledgment, and neither the old IMSI nor
    // the old SHO's identity or certificate anywhere (as text or as blob hex). (Its own
    // certificate names the role's server name, "sho.mcim.local", as every SHO's does.)
    let new_db = block(dump(&LabDbs::of(dir).sho2));
    // Lower-cased: blobs are upper-case hex in SQLite's dump, lower-case in PostgreSQL's.
    let everything: String = new_db.values().cloned().collect::<String>().to_lowercase();
    let lower_hex = |s: &[u8]| hex::encode(s);
    let old_identity = format!("urn:mcim:sho:{OLD_SHO}");
    let old_cert = mcim_pki::dev::ca_der(&dir.join("pki"), "sho").unwrap();
    for (what, secret) in [
        ("the old IMSI", old_imsi.as_bytes()),
        ("the old SHO's identity", old_identity.as_bytes()),
    ] {
        let text = String::from_utf8_lossy(secret).to_lowercase();
        assert!(
            !everything.contains(text.as_str()) && !everything.contains(&lower_hex(secret)),
            "the new SHO learnt {what}"
        );
    }
    assert!(
        !everything.contains(&lower_hex(&old_cert[..64])),
        "the new SHO holds the old SHO's certificate"
    );
    let filtered = block(db_rows(
        &LabDbs::of(dir).sho2,
        "SELECT discard_ack FROM sho_registration WHERE discard_ack IS NOT NULL",
    ));
    if pristine {
        assert!(filtered.is_empty(), "nothing is relayed after a revert");
        return;
    }
    assert_eq!(filtered.len(), 1);
    let f: mcim_pki::discard::FilteredAck =
        serde_json::from_slice(&hex::decode(&filtered[0][0]).unwrap()).unwrap();
    assert_eq!(f.discarded_at, notice.discarded_at);
}

/// The objects on the lab's SoftHSM2 token with `label`, by pkcs11-tool (an independent
/// witness: not our code).
fn token_objects(dir: &Path, label: &str) -> usize {
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", dir.join("softhsm").join("softhsm2.conf"))
        .args([
            "--module",
            "/usr/lib/softhsm/libsofthsm2.so",
            "--login",
            "--pin",
            "1234",
            "--list-objects",
        ])
        .output()
        .expect("pkcs11-tool (opensc) is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim() == format!("label:      {label}"))
        .count()
}

#[test]
fn a_swtpm_device_changes_sho_over_the_old_connectivity_and_the_tpm_keeps_nothing_of_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let r = change(dir.path(), &["--tre", "tpm"]);
    assert_eq!(r["tre"], "tpm");
    assert_changed(dir.path(), &r);
    // The TPM itself (tpm2-tools on its saved state): only the device's own three persistent
    // keys, no transient object left behind; the MCIMs' objects never persist in it.
    let tpm = mcim_e2e::Swtpm::start_from(&dir.path().join("tpm"));
    let getcap = |what: &str| {
        let out = Command::new("tpm2_getcap")
            .env(
                "TPM2TOOLS_TCTI",
                format!("swtpm:host=127.0.0.1,port={}", tpm.port),
            )
            .arg(what)
            .output()
            .expect("tpm2-tools are installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let persistent: Vec<String> = getcap("handles-persistent")
        .lines()
        .map(|l| l.trim_start_matches("- ").trim().to_lowercase())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        persistent,
        ["0x81000100", "0x81000101", "0x81000102"],
        "the storage key, the AK, the TLS key"
    );
    assert!(getcap("handles-transient").trim().is_empty());
}

#[test]
fn a_softhsm_device_changes_sho_and_the_old_k_and_opc_leave_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let r = change(dir.path(), &["--tre", "pkcs11"]);
    assert_changed(dir.path(), &r);
    // pkcs11-tool: one K and one OPc object for each MCIM the registry holds (the PCID's
    // initial credential and the new MCIM); the old MCIM's were destroyed.
    assert_eq!(token_objects(dir.path(), "mcim.k"), 2);
    assert_eq!(token_objects(dir.path(), "mcim.opc"), 2);
}

#[test]
fn a_change_of_sho_over_non_3gpp_access() {
    let dir = tempfile::tempdir().unwrap();
    let r = change(dir.path(), &["--tre", "pkcs11", "--access", "non-3gpp"]);
    assert_eq!(r["access"], "non-3gpp");
    assert_changed(dir.path(), &r);
    assert!(
        r["steps"][1]["detail"]
            .as_str()
            .unwrap()
            .contains("non-3GPP"),
        "{r:#}"
    );
}

/// Kill -9 of `what` after each of `steps` of the change (0: as it starts; after the last
/// step there is nothing left to resume), then the same process started again: the change
/// completes, once.
fn crashed_after(what: &str, steps: std::ops::RangeInclusive<u32>, tre: &str) {
    crashed_in("change-sho", what, steps, tre);
}

fn crashed_in(flow: &str, what: &str, steps: std::ops::RangeInclusive<u32>, tre: &str) {
    for n in steps {
        let dir = tempfile::tempdir().unwrap();
        let crash = format!("{what}:{n}");
        let r = change(
            dir.path(),
            &["--flow", flow, "--tre", tre, "--crash", &crash],
        );
        assert_eq!(r["crash"]["process"], what, "{crash}");
        assert_eq!(r["crash"]["after_step"], n, "{crash}");
        assert_changed(dir.path(), &r);
    }
}

#[test]
fn tred_killed_after_each_of_steps_0_to_7_of_a_change_resumes_and_completes_once() {
    crashed_after("tred", 0..=7, "pkcs11");
}

#[test]
fn tred_killed_after_each_of_steps_8_to_13_of_a_change_resumes_and_completes_once() {
    crashed_after("tred", 8..=13, "tpm");
}

#[test]
fn the_roles_killed_after_each_of_steps_0_to_7_of_a_change_resume_and_complete_once() {
    crashed_after("roles", 0..=7, "tpm");
}

#[test]
fn the_roles_killed_after_each_of_steps_8_to_13_of_a_change_resume_and_complete_once() {
    crashed_after("roles", 8..=13, "pkcs11");
}

#[test]
fn a_swtpm_device_reverts_to_the_pristine_state_and_is_provisioned_by_the_new_sho() {
    let dir = tempfile::tempdir().unwrap();
    let r = change(dir.path(), &["--flow", "pristine", "--tre", "tpm"]);
    assert_eq!(r["flow"], "pristine");
    assert_changed(dir.path(), &r);
    // Steps 4-17 are 5.1.3.6.2's: the PCID attached again, with the initial credential.
    assert!(
        r["steps"][3]["detail"].as_str().unwrap().contains(PCID),
        "{r:#}"
    );
}

#[test]
fn a_softhsm_device_reverts_to_the_pristine_state_and_the_old_k_leaves_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let r = change(dir.path(), &["--flow", "pristine", "--tre", "pkcs11"]);
    assert_changed(dir.path(), &r);
    assert_eq!(token_objects(dir.path(), "mcim.k"), 2);
    assert_eq!(token_objects(dir.path(), "mcim.opc"), 2);
}

#[test]
fn tred_killed_after_each_of_steps_0_to_8_of_a_revert_resumes_and_completes_once() {
    crashed_in("pristine", "tred", 0..=8, "pkcs11");
}

#[test]
fn tred_killed_after_each_of_steps_9_to_16_of_a_revert_resumes_and_completes_once() {
    crashed_in("pristine", "tred", 9..=16, "tpm");
}

#[test]
fn the_roles_killed_after_each_of_steps_0_to_8_of_a_revert_resume_and_complete_once() {
    crashed_in("pristine", "roles", 0..=8, "tpm");
}

#[test]
fn the_roles_killed_after_each_of_steps_9_to_16_of_a_revert_resume_and_complete_once() {
    crashed_in("pristine", "roles", 9..=16, "pkcs11");
}

/// To the second SHO and back: the first SHO gives the device a new IMSI (the one it had is
/// dead since its discard), the second SHO stops serving its own, and the device attaches with
/// the new IMSI of its first SHO.
#[test]
fn a_device_moved_to_a_new_sho_and_back_gets_a_new_imsi_from_its_first_sho() {
    let dir = tempfile::tempdir().unwrap();
    let r = change(dir.path(), &["--tre", "pkcs11", "--changes", "2"]);
    assert_eq!(r["changes"], 2, "{r:#}");
    let steps: Vec<bool> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["ok"].as_bool().unwrap())
        .collect();
    assert_eq!(steps, vec![true; 14], "{r:#}");
    assert_eq!(r["before"]["sho"], NEW_SHO);
    assert_eq!(r["mcim"]["sho"], OLD_SHO);
    let first = "001020000000001";
    let imsi = r["mcim"]["imsi"].as_str().unwrap();
    assert!(
        imsi.starts_with("00102") && imsi != first,
        "a new IMSI: {imsi}"
    );
    assert_eq!(r["operational_attach"]["imsi"], imsi);
    assert_eq!(r["old_imsi_refused"], true);
    assert_eq!(r["discard"]["notice_acknowledged"], true);
    assert_eq!(r["discard"]["relayed_to_new_sho"], true);
    let mcims = r["mcims"].as_array().unwrap();
    assert_eq!(mcims.len(), 2, "{mcims:?}");
    assert_eq!(token_objects(dir.path(), "mcim.k"), 2);
    // Each SHO holds the notice of its own discarded IMSI; the RO routes to the first again.
    let roles = LabDbs::of(dir.path()).roles;
    let first_discarded = block(db_rows(&roles, "SELECT imsi FROM sho_discard"));
    assert_eq!(first_discarded, vec![vec![first.to_string()]]);
    let second = r["before"]["imsi"].as_str().unwrap();
    let second_discarded = block(db_rows(
        &LabDbs::of(dir.path()).sho2,
        "SELECT imsi FROM sho_discard",
    ));
    assert_eq!(second_discarded, vec![vec![second.to_string()]]);
    let sub = block(db_rows(
        &roles,
        &format!("SELECT sho_id FROM ro_subscription WHERE pcid = '{PCID}'"),
    ));
    assert_eq!(sub, vec![vec![OLD_SHO.to_string()]]);
    // The SHO the device left cannot take it back at the DRF (its change registration is no
    // longer the device's latest install): refused, nothing changes.
    let roles = mcim_e2e::Roles::start_on(dir.path(), &LabDbs::of(dir.path()).roles.0, &[]);
    let before = block(roles.snapshot());
    let got = block(async {
        use mcim_proto::mcim::ro::v1 as ro;
        ro::drf_service_client::DrfServiceClient::new(
            roles
                .party_channel(
                    mcim_roles::authz::Role::Sho,
                    NEW_SHO,
                    mcim_roles::authz::Role::Ro,
                )
                .await,
        )
        .set_subscription(ro::SetSubscriptionRequest {
            pcid: PCID.into(),
            sho_id: NEW_SHO.into(),
            sho_url: "https://127.0.0.1:1".into(),
            change_of_sho: false,
        })
        .await
    });
    assert_eq!(
        got.err().map(|s| s.code()),
        Some(tonic::Code::PermissionDenied)
    );
    assert_eq!(block(roles.snapshot()), before);
}

/// The variant with both MCIMs present (end of 5.1.3.7.4.2): the new SHO's MCIM is installed
/// beside the old one, nothing is discarded; each SHO holds only its own (neither database
/// has the other's IMSI); the owner switches connectivity to the new one, back to the old one
/// (which still attaches), and forth again.
fn assert_both_present(dir: &Path, r: &Value) {
    let steps: Vec<(u64, bool)> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step"].as_u64().unwrap(), s["ok"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        steps,
        (1..=10).map(|s| (s, true)).collect::<Vec<_>>(),
        "{r:#}"
    );
    let old_imsi = r["before"]["imsi"].as_str().unwrap().to_string();
    let new_imsi = r["mcim"]["imsi"].as_str().unwrap().to_string();
    assert_eq!(r["mcim"]["sho"], NEW_SHO);
    assert!(new_imsi.starts_with("00103"), "{new_imsi}");
    assert_eq!(r["operational_attach"]["imsi"], new_imsi.as_str());
    assert_eq!(r["switch_back"]["imsi"], old_imsi.as_str());
    assert_eq!(r["old_imsi_refused"], false);
    assert_eq!(r["discard"]["notice_acknowledged"], false);
    let mcims = r["mcims"].as_array().unwrap();
    assert_eq!(mcims.len(), 3, "the PCID's, the old and the new: {mcims:?}");
    assert_eq!(mcims.iter().filter(|m| m["sho"] == OLD_SHO).count(), 1);
    assert_eq!(mcims.iter().filter(|m| m["sho"] == NEW_SHO).count(), 1);
    let roles = LabDbs::of(dir).roles;
    assert!(block(db_rows(&roles, "SELECT imsi FROM sho_discard")).is_empty());
    // Strictly apart: the new SHO's database has nothing of the old MCIM, and the old SHO's
    // tables nothing of the new one (the RO, which delivered both, knows both).
    let new_db: String = block(dump(&LabDbs::of(dir).sho2)).into_values().collect();
    assert!(
        !new_db.contains(&old_imsi),
        "the new SHO holds the old IMSI"
    );
    let old_sho: String = block(dump(&roles))
        .into_iter()
        .filter(|(t, _)| t.starts_with("sho_") || t.starts_with("auc_"))
        .map(|(_, rows)| rows)
        .collect();
    assert!(
        !old_sho.contains(&new_imsi),
        "the old SHO holds the new IMSI"
    );
}

#[test]
fn a_swtpm_device_keeps_both_mcims_apart_and_the_owner_switches_between_them() {
    let dir = tempfile::tempdir().unwrap();
    let r = change(dir.path(), &["--flow", "dual", "--tre", "tpm"]);
    assert_eq!(r["flow"], "dual");
    assert_both_present(dir.path(), &r);
}

#[test]
fn a_softhsm_device_keeps_both_mcims_and_the_token_holds_three_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let r = change(dir.path(), &["--flow", "dual", "--tre", "pkcs11"]);
    assert_both_present(dir.path(), &r);
    assert_eq!(token_objects(dir.path(), "mcim.k"), 3);
    assert_eq!(token_objects(dir.path(), "mcim.opc"), 3);
}

/// A package that keeps failing to install (item 3 of the issue): tred is stopped after step 11
/// and its kept package damaged; the install is tried again from the kept copy only (one
/// download in all), the change ends at step 12 with the DPF and the new SHO told; the old
/// MCIM, discarded at step 8, stays discarded: the device keeps its PCID's credential only.
#[test]
fn a_kept_package_that_keeps_failing_ends_the_change_at_step_12_without_a_second_download() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (ok, r, stderr) = lab_run(&[
        "--flow",
        "change-sho",
        "--tre",
        "pkcs11",
        "--dir",
        d,
        "--crash",
        "tred:11",
        "--damage-kept-package",
    ]);
    assert!(!ok, "{r:#}");
    assert!(stderr.contains("kept package(s) damaged"), "{stderr}");
    let steps = r["steps"].as_array().unwrap();
    let last = steps.last().unwrap();
    assert_eq!(
        (last["step"].as_u64(), last["ok"].as_bool()),
        (Some(12), Some(false)),
        "{r:#}"
    );
    assert!(
        last["detail"]
            .as_str()
            .unwrap()
            .contains("tried 3 times from the kept package"),
        "{last}"
    );
    assert!(steps[..steps.len() - 1].iter().all(|s| s["ok"] == true));
    assert_eq!(
        r["sho_registration"]["state"], "failed",
        "the new SHO was told"
    );
    let roles = LabDbs::of(dir.path()).roles;
    let reg = block(db_rows(
        &roles,
        &format!(
            "SELECT state, CAST(downloads AS TEXT) FROM ro_registration WHERE sho_id = '{NEW_SHO}'"
        ),
    ));
    assert_eq!(reg, vec![vec!["failed".to_string(), "1".to_string()]]);
    let mcims = r["mcims"].as_array().unwrap();
    assert_eq!(mcims.len(), 1, "only the PCID's credential: {mcims:?}");
    assert_eq!(mcims[0]["imsi"], PCID);
}

/// With both MCIMs present, a change back to the first SHO would provision it a second time
/// (its SHO reuses the IMSI and would replace the K of the MCIM the device still uses): the
/// device refuses the instruction (choose the MCIM for connectivity instead), nothing reaches
/// the SHO.
#[test]
fn with_both_mcims_present_a_change_back_to_the_first_sho_is_refused_by_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (ok, r, stderr) = lab_run(&[
        "--flow",
        "dual",
        "--changes",
        "2",
        "--tre",
        "pkcs11",
        "--dir",
        d,
    ]);
    assert!(!ok, "{r:#}");
    let error = r["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("already holds MCIM 001020000000001 of sho.mcim.local"),
        "{error}\n{stderr}"
    );
    // The first change happened; the second never reached the first SHO.
    assert_eq!(r["changes"], 1);
    let regs = block(db_rows(
        &LabDbs::of(dir.path()).roles,
        &format!("SELECT id FROM sho_registration WHERE pcid = '{PCID}'"),
    ));
    assert_eq!(
        regs.len(),
        1,
        "only the initial provisioning's registration: {regs:?}"
    );
}

/// The owner's instruction is checked before anything starts: no SHO named, no access type,
/// a device with no network (either variant): a clear refusal each, and no run saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reprovision_instruction_is_refused_and_starts_nothing() {
    use mcim_proto::mcim::common::v1 as common;
    use mcim_proto::mcim::tre::v1 as pb;
    let tpm = mcim_e2e::Swtpm::start();
    let tred = mcim_e2e::Tred::start(&tpm.tcti());
    let mut c = tred.client().await;
    let ask = |sho: &str, access: common::AccessType, pristine: bool| pb::ReprovisionRequest {
        new_sho_id: sho.into(),
        access: access as i32,
        revert_to_pristine: pristine,
        ..Default::default()
    };
    for (what, req, code) in [
        (
            "no SHO",
            ask("", common::AccessType::AccessType3gpp, false),
            tonic::Code::InvalidArgument,
        ),
        (
            "no access",
            ask(NEW_SHO, common::AccessType::Unspecified, false),
            tonic::Code::InvalidArgument,
        ),
        (
            "pristine, no network",
            ask(NEW_SHO, common::AccessType::AccessType3gpp, true),
            tonic::Code::FailedPrecondition,
        ),
        (
            "no network",
            ask(NEW_SHO, common::AccessType::Non3gpp, false),
            tonic::Code::FailedPrecondition,
        ),
    ] {
        let got = c.reprovision(req).await;
        assert_eq!(got.err().map(|s| s.code()), Some(code), "{what}");
    }
    assert!(!tred.state_dir().join("provisioning.json").exists());
    assert!(!tred.state_dir().join("discard-outbox.json").exists());
}
