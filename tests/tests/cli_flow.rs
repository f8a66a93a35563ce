//! The whole life of a device with nothing but the command line, as the parties would run it
//! (each command a separate `mcimctl` process) against the real `mcim-roles all`, a swtpm and
//! `tred`: the supplier supplies the device in CCIF mode 3 (`mcimctl supplier supply`), the
//! subscriber registers and activates its PCID (`subscriber register-pcid`, `activate-pcid`),
//! the owner exports its parameters and the subscriber contracts with the SHO (`device
//! parameters`, `subscriber register`), the owner provisions it (`device provision`, steps
//! 1-14) and attaches with the new IMSI (`device attach`), and the subscriber sees the SHO's
//! registration provisioned (`subscriber status`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mcim_e2e::{Roles, Swtpm, mcimctl, output_text};

#[test]
fn a_device_is_supplied_contracted_provisioned_and_attached_from_the_command_line() {
    let work = tempfile::tempdir().unwrap();
    let roles = Roles::start(work.path());
    let url = |role: &str| roles.url(role);
    let pki = roles.pki.to_str().unwrap().to_string();
    let tpm = Swtpm::start();
    let tred = roles.tred(&tpm.tcti());
    let socket = tred.socket().to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let out = mcimctl(args);
        assert!(out.status.success(), "{args:?}: {}", output_text(&out));
        output_text(&out)
    };
    let pcid = "001010000000051";
    let creds = work.path().join("pcid.json");

    let supplied = run(&[
        "supplier",
        "supply",
        "--socket",
        &socket,
        "--supplier-url",
        &url("supplier"),
        "--pva-url",
        &url("pva"),
        "--pki",
        &pki,
        "--device-id",
        "CLI-51",
        "--pcid",
        pcid,
        "--model",
        "cli-model",
        "--ccif-mode",
        "3",
        "--credentials-out",
        creds.to_str().unwrap(),
    ]);
    assert!(
        supplied.contains("reference values for model cli-model registered (8 PCRs)"),
        "{supplied}"
    );
    // The credentials file is the owner's alone.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&creds).unwrap().permissions().mode() & 0o777,
        0o600
    );
    run(&[
        "subscriber",
        "register-pcid",
        "--credentials",
        creds.to_str().unwrap(),
        "--delayed-activation",
        "--ro-url",
        &url("ro"),
        "--pki",
        &pki,
    ]);
    run(&[
        "subscriber",
        "activate-pcid",
        pcid,
        "--ro-url",
        &url("ro"),
        "--pki",
        &pki,
    ]);
    let params = work.path().join("device.json");
    run(&[
        "device",
        "--socket",
        &socket,
        "parameters",
        "--out",
        params.to_str().unwrap(),
        "--for-subscriber",
        "subscriber.mcim.local",
        "--sho-id",
        "sho.mcim.local",
    ]);
    let contracted = run(&[
        "subscriber",
        "register",
        "--device",
        params.to_str().unwrap(),
        "--sho-url",
        &url("sho"),
        "--pki",
        &pki,
        "--json",
    ]);
    let contract: serde_json::Value =
        serde_json::from_str(contracted.lines().next().unwrap()).unwrap();
    let imsi = contract["imsi"].as_str().unwrap().to_string();
    let subscription = contract["subscription_id"].as_str().unwrap().to_string();
    // Before the device registers (step 7), the subscription has no registration to show.
    let early = mcimctl(&[
        "subscriber",
        "status",
        "--subscription",
        &subscription,
        "--sho-url",
        &url("sho"),
        "--pki",
        &pki,
    ]);
    assert!(!early.status.success());
    assert!(
        String::from_utf8_lossy(&early.stderr).contains("has not registered"),
        "{early:?}"
    );

    let provisioned = run(&[
        "device",
        "--socket",
        &socket,
        "provision",
        "--access",
        "3gpp",
    ]);
    for step in 1..=14 {
        assert!(
            provisioned.contains(&format!("step {step:>2}  ")),
            "step {step}: {provisioned}"
        );
    }
    assert!(!provisioned.contains("FAILED"), "{provisioned}");
    assert!(
        provisioned.contains(&format!("mcim          {imsi}")),
        "{provisioned}"
    );
    let registration = provisioned
        .lines()
        .find_map(|l| l.strip_prefix("registration  "))
        .unwrap()
        .trim()
        .to_string();

    let attached = run(&["device", "--socket", &socket, "attach"]);
    assert!(
        attached.contains(&format!("attached with IMSI {imsi}")),
        "{attached}"
    );
    let status = run(&[
        "subscriber",
        "status",
        &registration,
        "--sho-url",
        &url("sho"),
        "--pki",
        &pki,
    ]);
    assert!(status.contains("provisioned"), "{status}");
    // The subscriber needs only what `register` printed: the subscription's latest
    // registration is the device's.
    let by_subscription = run(&[
        "subscriber",
        "status",
        "--subscription",
        &subscription,
        "--sho-url",
        &url("sho"),
        "--pki",
        &pki,
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(by_subscription.trim()).unwrap();
    assert_eq!(v["registration"], registration.as_str(), "{v}");
    assert_eq!(v["state"], "provisioned", "{v}");
    assert_eq!(v["imsi"], imsi.as_str(), "{v}");
}
