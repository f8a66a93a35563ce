//! End-to-end provisioning time (TR 33.812 5.1.3.6.2 steps 1-14), split into the TRE's time and
//! the rest. A bench binary (not criterion): each run is a whole `mcimctl lab run --json` (its
//! own `mcim-roles all`, software TRE and `tred`, all release binaries); the lab reads tred's
//! TRE-thread time (`GetStatus.tre_busy_micros`: TPM commands through the TSS or token calls,
//! with the registry commits that go with them) before and after provisioning. The baseline,
//! measured in the same command, is the same flow on a SoftHSM2 token. The change of SHO
//! (5.1.3.7.4.2 steps 1-14, `--flow change-sho`) is timed the same way, from the owner's
//! instruction to the end of the device's step stream (the lab's `change_timing`).
//!
//! ```sh
//! cargo build --release --bins && cargo bench -p mcim-e2e --bench provisioning   # N = 10
//! MCIM_BENCH_N=20 cargo bench -p mcim-e2e --bench provisioning
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::process::Command;

use mcim_e2e::workspace_bin;

#[derive(Default)]
struct Runs {
    total: Vec<u64>,
    tre: Vec<u64>,
    rest: Vec<u64>,
    commands: Vec<u64>,
}

fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[v.len() / 2]
}

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

fn run(args: &[&str], n: usize) -> Runs {
    let key = if args.contains(&"change-sho") {
        "change_timing"
    } else {
        "timing"
    };
    let mut r = Runs::default();
    for _ in 0..n {
        let out = Command::new(workspace_bin("mcimctl"))
            .args(["lab", "run", "--json"])
            .args(args)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{e}: {}", String::from_utf8_lossy(&out.stderr));
        });
        assert_eq!(v["ok"], true, "{v:#}");
        let t = &v[key];
        r.total.push(t["provisioning_us"].as_u64().unwrap());
        r.tre.push(t["tre_us"].as_u64().unwrap());
        r.rest.push(t["rest_us"].as_u64().unwrap());
        r.commands.push(t["tpm_commands"].as_u64().unwrap());
    }
    r
}

fn main() {
    let n: usize = std::env::var("MCIM_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let cases: [(&str, &[&str]); 4] = [
        (
            "baseline: SoftHSM2 token, 3GPP access",
            &["--tre", "pkcs11"],
        ),
        ("swtpm, 3GPP access (steps 1-14)", &["--tre", "tpm"]),
        (
            "swtpm, non-3GPP access (5.1.3.6.3)",
            &["--tre", "tpm", "--access", "non-3gpp"],
        ),
        (
            "swtpm, change of SHO, 3GPP access (5.1.3.7.4.2 steps 1-14)",
            &["--tre", "tpm", "--flow", "change-sho"],
        ),
    ];
    let results: Vec<(&str, Runs)> = cases.iter().map(|(name, a)| (*name, run(a, n))).collect();
    let base = median(&results[0].1.total) as f64;
    println!("end-to-end provisioning and change of SHO, median of {n} lab runs each");
    println!(
        "| case | provisioning | in the TRE | the rest | TRE share | TPM commands | vs baseline |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (name, r) in &results {
        let total = median(&r.total);
        let tre = median(&r.tre);
        println!(
            "| {name} | {} | {} | {} | {:.0} % | {} | {:.2}x |",
            ms(total),
            ms(tre),
            ms(median(&r.rest)),
            100.0 * tre as f64 / total as f64,
            median(&r.commands),
            total as f64 / base
        );
    }
}
