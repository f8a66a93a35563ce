//! Overload (issue 16 item 5): a role past its capacity answers devices at once with
//! RESOURCE_EXHAUSTED and a retry hint, and devices retry with jittered exponential backoff:
//! several devices provisioning at once against roles that serve one device call at a time
//! all end provisioned, with nothing failed, and the refusals are there to see in the roles'
//! metrics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mcim_e2e::{Roles, Swtpm, contract_device, output_text, supply_device};

fn sample_sum(text: &str, prefix: &str, needle: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix) && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn devices_past_the_roles_capacity_are_told_to_retry_and_all_end_provisioned() {
    const DEVICES: usize = 6;
    let work = tempfile::tempdir().unwrap();
    let roles = Roles::start_with(work.path(), &["--max-concurrent-calls", "1"]);
    let devices: Vec<_> = (0..DEVICES)
        .map(|i| {
            let tpm = Swtpm::start();
            let tred = roles.tred(&tpm.tcti());
            let socket = tred.socket().to_str().unwrap().to_string();
            let dir = work.path().join(format!("d{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            supply_device(&roles, &socket, &format!("00101000000020{i}"), &[]);
            contract_device(&roles, &dir, &socket, "sho");
            (tpm, tred, socket)
        })
        .collect();
    // All at once: many more device calls than the one slot.
    let runs: Vec<_> = devices
        .iter()
        .map(|(_, _, socket)| {
            std::process::Command::new(mcim_e2e::workspace_bin("mcimctl"))
                .args(["device", "--socket", socket, "provision"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, r) in runs.into_iter().enumerate() {
        let out = r.wait_with_output().unwrap();
        let text = output_text(&out);
        assert!(
            out.status.success() && !text.contains("FAILED"),
            "device {i}: {text}\n{}",
            devices[i].1.log()
        );
    }
    let m = roles.metrics();
    assert_eq!(
        sample_sum(&m, "mcim_roles_provisionings_total", "provisioned"),
        DEVICES as f64,
        "{m}"
    );
    assert_eq!(
        sample_sum(&m, "mcim_roles_provisionings_total", "failed"),
        0.0
    );
    let shed = sample_sum(
        &m,
        "mcim_roles_grpc_server_calls_total",
        "RESOURCE_EXHAUSTED",
    );
    assert!(
        shed > 0.0,
        "no call was refused: the test did not overload the roles\n{m}"
    );
    eprintln!("{shed} device calls refused with RESOURCE_EXHAUSTED");
    // Only OK and RESOURCE_EXHAUSTED among the calls (and the task streams the devices
    // closed once provisioned, which gRPC counts as CANCELLED).
    for l in m
        .lines()
        .filter(|l| l.starts_with("mcim_roles_grpc_server_calls_total"))
    {
        let stream_closed =
            l.contains("DpfService/WatchDeviceTasks") && l.contains("code=\"CANCELLED\"");
        assert!(
            l.contains("code=\"OK\"") || l.contains("code=\"RESOURCE_EXHAUSTED\"") || stream_closed,
            "{l}"
        );
    }
    // tred heard the hint and waited.
    assert!(
        devices
            .iter()
            .any(|(_, t, _)| t.log().contains("overloaded")),
        "no device was told to retry"
    );
}
