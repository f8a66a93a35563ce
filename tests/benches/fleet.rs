//! Provisionings per second of a fleet (issue 16's fleet benchmark), on the engines side by side
//! in one command: `mcimctl fleet run` (simulated devices: software keys, the fleet benchmark's
//! own, never a TRE) against
//!
//! 1. an embedded `mcim-roles all` on SQLite (the baseline of the ratios),
//! 2. an embedded `mcim-roles all` on PostgreSQL,
//! 3. two `mcim-roles all` replicas on one PostgreSQL database, beside each other on this
//!    machine, the devices given both addresses of each role (spread and failed over).
//!
//! Each run provisions N devices, C at a time (supply and contract first, not timed), and
//! reports the rate, latency and the CPU milliseconds per provisioning of the roles' processes,
//! of the simulator, and of the whole machine (PostgreSQL's server processes count only
//! there). PostgreSQL is a private cluster of the bench's own that syncs its commits to disk
//! (`fsync`, full page writes, synchronous commit: a production server's defaults), as SQLite
//! does; the test clusters do not. Release binaries; the roles log at `warn`.
//!
//! ```sh
//! cargo build --release --bins && cargo bench -p mcim-e2e --bench fleet
//! MCIM_BENCH_DEVICES=5000 MCIM_BENCH_CONCURRENCY=128 cargo bench -p mcim-e2e --bench fleet
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mcim_e2e::{Postgres, workspace_bin};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `mcimctl fleet run --json` with `args`: its report (every device provisioned).
fn fleet(n: u64, c: u64, args: &[String]) -> serde_json::Value {
    let out = Command::new(workspace_bin("mcimctl"))
        .args(["fleet", "run", "--json", "--devices", &n.to_string()])
        .args(["--concurrency", &c.to_string()])
        .args(args)
        .env("MCIM_LOG", "warn")
        .output()
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(r["failed"], 0, "{r:#}");
    r
}

/// A `mcim-roles all` replica, stopped on drop.
struct Replica(Child);

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_base(n: u16) -> u16 {
    loop {
        let p = 20_000 + rand::random::<u16>() % 20_000;
        if (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            return p;
        }
    }
}

/// Two replicas of every role on the PostgreSQL database `db`: their processes, and the
/// fleet's arguments naming both addresses of each role.
fn replicas(dir: &std::path::Path, db: &str) -> (Vec<Replica>, Vec<String>) {
    let pki = dir.join("pki");
    let ok = Command::new(workspace_bin("mcimctl"))
        .args(["pki", "init", "--dir"])
        .arg(&pki)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
    // One SHO (the second SHO's files would start a second database).
    for f in ["sho2.pem", "sho2.key"] {
        let _ = std::fs::remove_file(pki.join(f));
    }
    let (a, b) = (free_base(5), free_base(5));
    let procs: Vec<Replica> = [(a, b), (b, a)]
        .iter()
        .map(|(me, other)| {
            Replica(
                Command::new(workspace_bin("mcim-roles"))
                    .args(["all", "--pki"])
                    .arg(&pki)
                    .env("MCIM_DB", db)
                    .env("MCIM_LOG", "warn")
                    .args(["--base-port", &me.to_string()])
                    .args(["--replica-base-ports", &other.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ![a, b]
        .iter()
        .all(|p| (0..5).all(|i| TcpStream::connect(("127.0.0.1", p + i)).is_ok()))
    {
        assert!(Instant::now() < deadline, "the replicas did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let both = |i: u16| format!("https://127.0.0.1:{},https://127.0.0.1:{}", a + i, b + i);
    let mut args: Vec<String> = [
        ("--supplier-url", 0),
        ("--ro-url", 1),
        ("--vno-url", 2),
        ("--sho-url", 3),
        ("--pva-url", 4),
    ]
    .iter()
    .flat_map(|(flag, i)| [flag.to_string(), both(*i)])
    .collect();
    args.extend(["--pki".to_string(), pki.display().to_string()]);
    args.extend(["--db".to_string(), db.to_string()]);
    for p in &procs {
        args.extend(["--roles-pid".to_string(), p.0.id().to_string()]);
    }
    (procs, args)
}

fn main() {
    let (n, c) = (
        env("MCIM_BENCH_DEVICES", 1000),
        env("MCIM_BENCH_CONCURRENCY", 64),
    );
    let pg = Postgres::private_durable();
    let dir = tempfile::tempdir().unwrap();
    let sqlite = fleet(n, c, &[]);
    let pg_one = fleet(n, c, &["--db".into(), pg.fresh_database()]);
    let db = pg.fresh_database();
    let (procs, args) = replicas(dir.path(), &db);
    let pg_two = fleet(n, c, &args);
    drop(procs);

    let base = sqlite["per_second"].as_f64().unwrap();
    println!("fleet: {n} simulated devices, {c} at a time, release binaries, roles log at warn");
    println!(
        "{:<40} {:>8} {:>6} {:>7} {:>7} {:>9} {:>7} {:>11}",
        "roles", "prov/s", "ratio", "p50 ms", "p99 ms", "roles ms", "sim ms", "machine ms"
    );
    for (name, r) in [
        ("mcim-roles all on SQLite (baseline)", &sqlite),
        ("mcim-roles all on PostgreSQL", &pg_one),
        ("2 replicas of every role, PostgreSQL", &pg_two),
    ] {
        let rate = r["per_second"].as_f64().unwrap();
        println!(
            "{:<40} {:>8.1} {:>6.2} {:>7.0} {:>7.0} {:>9.1} {:>7.1} {:>11.1}",
            name,
            rate,
            rate / base,
            r["latency_ms"]["p50"].as_f64().unwrap(),
            r["latency_ms"]["p99"].as_f64().unwrap(),
            r["roles_cpu_ms_per_provisioning"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["simulator_cpu_ms_per_provisioning"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["machine_cpu_ms_per_provisioning"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
    }
}
