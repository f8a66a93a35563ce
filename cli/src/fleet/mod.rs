//! `mcimctl fleet run`: the fleet benchmark (issue 16 item 4). Simulated devices (software
//! keys, [`device::SimulatedDevice`]; never a TRE) provision against real roles: an embedded
//! `mcim-roles all` (SQLite in a temporary directory, or `--db`), or running roles
//! (`--ro-url` and the others, with their `--pki`).
//!
//! Two phases. Supply and contract (not timed as provisioning: a factory and a subscriber do
//! them, at other times): each device's keys are certified by the supplier, its PCID's
//! credential embedded and handed to the ICF (5.1.3.4.1 mode 2), its subscription made at the
//! SHO with the owner's proof. Then provisioning, timed: every device attaches with its PCID,
//! registers, answers the PVA, downloads, unwraps and reports its MCIM, and attaches with it
//! (5.1.3.6.2 steps 1-14, 5.1.3.3.2.2), `--concurrency` devices at a time.
//!
//! The report (`--json`: one object on stdout) counts devices, provisioned, failed (reasons
//! counted), retries (counted by step and status code), wall seconds and rate, latency
//! percentiles, and the CPU time the roles'
//! processes and this simulator spent per provisioning (from `/proc/PID/stat`), and the whole
//! machine (`/proc/stat`: a database server here counts there). The exit
//! status is 0 only if every device ended provisioned.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use mcim_pki::Role;
use mcim_proto::mcim::common::v1 as common;
use serde_json::json;

use crate::error::{CliError, fail};
use crate::lab::processes::{Proc, sibling, spawn, start_on_free_ports, working_dir};

mod device;
mod flow;

use device::SimulatedDevice;
use flow::{Failure, Network, Parties, Tries};

/// The model the simulated devices are (the PVA's reference values are registered for it).
const MODEL: &str = "mcim-fleet-simulated";

/// `mcimctl fleet ...`
#[derive(Subcommand)]
pub enum FleetCommand {
    /// Provision a fleet of simulated devices and report the rate (a benchmark).
    Run(RunArgs),
}

/// Arguments of `mcimctl fleet run`.
#[derive(Args)]
pub struct RunArgs {
    /// How many simulated devices.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    devices: u64,
    /// How many devices provision at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    concurrency: u64,
    /// The embedded roles' database (`mcim-roles all --db`): SQLite in the working directory if
    /// not given, or `postgres://USER@HOST:PORT/NAME` (created if missing). With running roles
    /// (`--ro-url` ...): only names their engine in the report.
    #[arg(long, value_name = "URL")]
    db: Option<String>,
    /// The embedded roles' `--max-concurrent-calls` (device calls served at once per role;
    /// beyond them a role answers RESOURCE_EXHAUSTED with a retry hint).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    roles_max_concurrent_calls: Option<u32>,
    /// The embedded roles' `--max-connections` (connections from devices held at once; a
    /// provisioning device holds two or three, and past the limit a newcomer displaces the
    /// quietest).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    roles_max_connections: Option<u32>,
    /// Running roles instead of embedded ones: the supplier's address (`https://host:port`,
    /// or several comma-separated for replicas, as every `--*-url` here).
    #[arg(long, value_parser = crate::net::role_urls, requires_all = ["ro_url", "vno_url", "sho_url", "pva_url", "pki"])]
    supplier_url: Option<String>,
    /// Running roles: the RO (DRF, DPF, ICF).
    #[arg(long, value_parser = crate::net::role_urls, requires = "supplier_url")]
    ro_url: Option<String>,
    /// Running roles: the VNO.
    #[arg(long, value_parser = crate::net::role_urls, requires = "supplier_url")]
    vno_url: Option<String>,
    /// Running roles: the SHO.
    #[arg(long, value_parser = crate::net::role_urls, requires = "supplier_url")]
    sho_url: Option<String>,
    /// Running roles: the PVA.
    #[arg(long, value_parser = crate::net::role_urls, requires = "supplier_url")]
    pva_url: Option<String>,
    /// Running roles: their PKI directory (`mcimctl pki init`: the supplier's and the
    /// subscriber's certificates, the CAs).
    #[arg(long, requires = "supplier_url")]
    pki: Option<PathBuf>,
    /// Running roles: their processes, whose CPU time the report counts (repeatable).
    #[arg(long = "roles-pid", requires = "supplier_url")]
    roles_pids: Vec<u32>,
    /// The MCC+MNC of the PCIDs (the VNO routes it to the RO's ICF).
    #[arg(long, default_value = "00101")]
    pcid_plmn: String,
    /// Working directory (PKI, database, logs); a temporary one if not given.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON object at the end, and no progress bar.
    #[arg(long)]
    json: bool,
}

/// Runs `mcimctl fleet ...`.
pub fn run(cmd: FleetCommand) -> Result<(), CliError> {
    let FleetCommand::Run(a) = cmd;
    if a.pcid_plmn.len() != 5 && a.pcid_plmn.len() != 6
        || !a.pcid_plmn.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(fail("--pcid-plmn: MCC+MNC, 5 or 6 digits"));
    }
    // A PCID is the PLMN, three digits of the run, and the device's number.
    let numbers = 10u64.pow(15 - a.pcid_plmn.len() as u32 - 3);
    if a.devices > numbers {
        return Err(fail(format!(
            "--devices: at most {numbers} with a {}-digit PLMN",
            a.pcid_plmn.len()
        )));
    }
    let (dir, _tmp) = working_dir(a.dir.as_deref(), false)?;
    let (net, pki, roles) = roles(&a, &dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(fail)?;
    let report = rt.block_on(fleet(&a, net, &pki, roles.as_ref().map(|(_, pid)| *pid)))?;
    drop(roles);
    if a.json {
        println!("{report}");
    } else {
        print_summary(&report);
    }
    let failed = report["failed"].as_u64().unwrap_or(0);
    if failed > 0 {
        return Err(fail(format!(
            "{failed} of {} devices were not provisioned",
            a.devices
        )));
    }
    Ok(())
}

/// The roles the fleet provisions against: running ones (`--ro-url` ...) or an embedded
/// `mcim-roles all` on free ports (its process and PID).
/// The roles a fleet runs against: where they are, their PKI directory, and the embedded
/// process (with its PID) when the fleet started them.
type RolesAt = (Network, PathBuf, Option<(Proc, u32)>);

fn roles(a: &RunArgs, dir: &Path) -> Result<RolesAt, CliError> {
    if let (
        Some(supplier_url),
        Some(ro_url),
        Some(vno_url),
        Some(sho_url),
        Some(pva_url),
        Some(pki),
    ) = (
        &a.supplier_url,
        &a.ro_url,
        &a.vno_url,
        &a.sho_url,
        &a.pva_url,
        &a.pki,
    ) {
        let net = network(
            pki,
            [supplier_url, ro_url, vno_url, sho_url, pva_url].map(String::clone),
        )?;
        return Ok((net, pki.clone(), None));
    }
    let pki = dir.join("pki");
    mcim_pki::dev::init(&pki, &mcim_pki::dev::LAB_PARTIES).map_err(fail)?;
    let db =
        a.db.clone()
            .unwrap_or_else(|| format!("sqlite://{}", dir.join("roles.db").display()));
    let (proc, base) =
        start_on_free_ports(5, "mcim-roles", Some(&dir.join("roles.log")), |base| {
            let mut c = Command::new(sibling("mcim-roles"));
            c.args(["all", "--pki"])
                .arg(&pki)
                // In the environment: a URL's password stays out of ps.
                .env("MCIM_DB", &db)
                .args(["--base-port", &base.to_string()])
                .args(["--pcid-plmn", &a.pcid_plmn])
                // Warnings only (the log is in the working directory), unless MCIM_LOG
                // asks for more (e.g. `sqlx::query=debug` to count the statements).
                .env(
                    "MCIM_LOG",
                    std::env::var("MCIM_LOG").unwrap_or_else(|_| "warn".into()),
                );
            if let Some(n) = a.roles_max_concurrent_calls {
                c.args(["--max-concurrent-calls", &n.to_string()]);
            }
            if let Some(n) = a.roles_max_connections {
                c.args(["--max-connections", &n.to_string()]);
            }
            spawn(&mut c, "mcim-roles", &dir.join("roles.log"))
        })?;
    let pid = proc.0.as_ref().map(std::process::Child::id).unwrap_or(0);
    let url = |i: u16| format!("https://127.0.0.1:{}", base + i);
    let net = network(&pki, [url(0), url(1), url(2), url(3), url(4)])?;
    Ok((net, pki, Some((proc, pid))))
}

/// The network as the fleet sees it: addresses (supplier, RO, VNO, SHO, PVA), the CAs of the
/// roles' certificates, and the parties' names.
fn network(pki: &Path, urls: [String; 5]) -> Result<Network, CliError> {
    let name_of = |file: &str| -> Result<String, CliError> {
        let der = mcim_pki::dev::ca_der(pki, file).map_err(fail)?;
        Ok(mcim_pki::party::caller_from_cert(&der).map_err(fail)?.name)
    };
    let mut ca = HashMap::new();
    for r in [Role::Supplier, Role::Ro, Role::Vno, Role::Sho, Role::Pva] {
        ca.insert(r, mcim_pki::dev::role_ca_pem(pki, r).map_err(fail)?);
    }
    let [supplier_url, ro_url, vno_url, sho_url, pva_url] = urls;
    Ok(Network {
        supplier_url,
        ro_url,
        vno_url,
        sho_url,
        pva_url,
        ca,
        subscriber: name_of("subscriber")?,
        sho_id: name_of("sho")?,
        ro_id: name_of("ro")?,
    })
}

/// CPU time (user + system) a process has spent so far, from `/proc/PID/stat` (all its
/// threads, living and ended), in milliseconds.
fn cpu_ms(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from the ')' that ends it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the name.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux architecture this runs on.
    Some(ticks * 10.0)
}

/// CPU time (every state but idle and I/O wait) the whole machine has spent so far, summed
/// over its CPUs, from `/proc/stat`, in milliseconds: with a database server on this machine,
/// its share too (which the roles' own processes do not show).
fn machine_cpu_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<f64> = cpu
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: f64 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Some(busy * 10.0)
}

/// Outcome of one device.
struct Done {
    latency: Option<Duration>,
    failure: Option<Failure>,
    retries: Tries,
    device: Option<SimulatedDevice>,
}

/// The progress bar: on a terminal without `--json`, none otherwise.
fn progress(a: &RunArgs, what: &str) -> indicatif::ProgressBar {
    if a.json {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(a.devices);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>14} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
    ) {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar
}

/// Runs `jobs` at most `concurrency` at a time; the outcomes in completion order.
async fn run_all<F, Fut>(
    items: Vec<SimulatedDevice>,
    concurrency: u64,
    bar: &indicatif::ProgressBar,
    job: F,
) -> Vec<Done>
where
    F: Fn(SimulatedDevice) -> Fut,
    Fut: std::future::Future<Output = Done> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    let mut out = Vec::with_capacity(items.len());
    let mut items = items.into_iter();
    // A device that gave up on unreachable roles (two minutes of retries) stops the fleet:
    // the devices not started yet are counted as not provisioned, for that reason.
    let mut stopped = false;
    loop {
        while !stopped && (set.len() as u64) < concurrency {
            match items.next() {
                Some(d) => {
                    set.spawn(job(d));
                }
                None => break,
            }
        }
        match set.join_next().await {
            Some(Ok(done)) => {
                bar.inc(1);
                if done.failure.as_ref().is_some_and(|f| f.gave_up) && !stopped {
                    stopped = true;
                    for _ in items.by_ref() {
                        out.push(Done {
                            latency: None,
                            failure: Some(Failure {
                                reason: "not started: the roles stopped answering".into(),
                                detail: "another device gave up after two minutes of retries"
                                    .into(),
                                gave_up: false,
                            }),
                            retries: Tries::default(),
                            device: None,
                        });
                        bar.inc(1);
                    }
                }
                out.push(done);
            }
            Some(Err(e)) => {
                bar.inc(1);
                out.push(Done {
                    latency: None,
                    failure: Some(Failure {
                        reason: "simulator: a device's task ended".into(),
                        detail: e.to_string(),
                        gave_up: false,
                    }),
                    retries: Tries::default(),
                    device: None,
                });
            }
            None => break,
        }
    }
    bar.finish_and_clear();
    out
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

fn engine(db: Option<&str>) -> serde_json::Value {
    match db {
        None => json!("sqlite"),
        Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
            json!("postgres")
        }
        Some(u) if u.starts_with("sqlite:") => json!("sqlite"),
        Some(_) => serde_json::Value::Null,
    }
}

async fn fleet(
    a: &RunArgs,
    net: Network,
    pki: &Path,
    embedded_pid: Option<u32>,
) -> Result<serde_json::Value, CliError> {
    let parties = Parties {
        supplier: crate::net::lazy_role_channel(
            pki,
            Role::Supplier,
            Role::Supplier,
            &net.supplier_url,
        )?,
        subscriber: crate::net::lazy_role_channel(pki, Role::Subscriber, Role::Sho, &net.sho_url)?,
        reference: crate::net::lazy_role_channel(pki, Role::Supplier, Role::Pva, &net.pva_url)?,
    };
    // The model's reference values (a token's measurement), once, as the supplier; retried
    // like every device's step while the roles are busy or not yet reachable.
    let mut retries = Tries::default();
    flow::register_model(&parties, MODEL, &mut retries)
        .await
        .map_err(|f| crate::error::fail(format!("{}: {}", f.reason, f.detail)))?;

    // PCIDs of this run: the PLMN, three random digits, the device's number.
    let run: u32 = rand::random::<u32>() % 1000;
    let msin_digits = 15 - a.pcid_plmn.len() - 3;
    let devices: Vec<SimulatedDevice> = (0..a.devices)
        .map(|i| {
            SimulatedDevice::new(common::DeviceIdentity {
                device_id: format!("FLEET-{run:03}-{i}"),
                pcid: format!("{}{run:03}{i:0msin_digits$}", a.pcid_plmn),
                model: MODEL.into(),
            })
            .map_err(|e| CliError::Input(format!("a simulated device's key: {e}")))
        })
        .collect::<Result<_, _>>()?;

    let net = Arc::new(net);
    let mut failures: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let count = |f: Failure, failures: &mut BTreeMap<String, (u64, String)>| {
        let e = failures.entry(f.reason).or_insert((0, f.detail));
        e.0 += 1;
    };

    // Phase 1: supply and contract.
    let started = Instant::now();
    let bar = progress(a, "supply");
    let setup = run_all(devices, a.concurrency, &bar, |mut d| {
        let (net, parties) = (net.clone(), parties.clone());
        async move {
            let mut tries = Tries::default();
            let r = flow::supply_and_contract(&mut d, &net, &parties, &mut tries).await;
            Done {
                latency: None,
                failure: r.err(),
                retries: tries,
                device: Some(d),
            }
        }
    })
    .await;
    let setup_seconds = started.elapsed().as_secs_f64();
    let mut ready = Vec::with_capacity(setup.len());
    let mut setup_failed = 0u64;
    for d in setup {
        retries.add(d.retries);
        match (d.failure, d.device) {
            (None, Some(dev)) => ready.push(dev),
            (Some(f), _) => {
                setup_failed += 1;
                count(f, &mut failures);
            }
            (None, None) => setup_failed += 1,
        }
    }

    // Phase 2: provisioning, timed, with the CPU both sides spend.
    let roles_pids: Vec<String> = embedded_pid
        .into_iter()
        .chain(a.roles_pids.iter().copied())
        .map(|p| p.to_string())
        .collect();
    let roles_cpu = |pids: &[String]| -> Option<f64> { pids.iter().map(|p| cpu_ms(p)).sum() };
    let (roles_before, self_before, machine_before) =
        (roles_cpu(&roles_pids), cpu_ms("self"), machine_cpu_ms());
    let started = Instant::now();
    let bar = progress(a, "provisioning");
    let done = run_all(ready, a.concurrency, &bar, |mut d| {
        let net = net.clone();
        async move {
            let mut tries = Tries::default();
            let t = Instant::now();
            let r = flow::provision(&mut d, &net, &mut tries).await;
            Done {
                latency: r.is_ok().then(|| t.elapsed()),
                failure: r.err(),
                retries: tries,
                device: None,
            }
        }
    })
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let (roles_after, self_after, machine_after) =
        (roles_cpu(&roles_pids), cpu_ms("self"), machine_cpu_ms());

    let mut latencies = Vec::with_capacity(done.len());
    for d in done {
        retries.add(d.retries);
        if let Some(l) = d.latency {
            latencies.push(l);
        }
        if let Some(f) = d.failure {
            count(f, &mut failures);
        }
    }
    latencies.sort_unstable();
    let provisioned = latencies.len() as u64;
    let per = |before: Option<f64>, after: Option<f64>| -> serde_json::Value {
        match (before, after) {
            (Some(b), Some(a)) if provisioned > 0 && !roles_pids.is_empty() => {
                json!(((a - b) / provisioned as f64 * 1000.0).round() / 1000.0)
            }
            _ => serde_json::Value::Null,
        }
    };
    let own = |before: Option<f64>, after: Option<f64>| match (before, after) {
        (Some(b), Some(a)) if provisioned > 0 => {
            json!(((a - b) / provisioned as f64 * 1000.0).round() / 1000.0)
        }
        _ => serde_json::Value::Null,
    };
    let simulator = own(self_before, self_after);
    let machine = own(machine_before, machine_after);
    Ok(json!({
        "devices": a.devices,
        "provisioned": provisioned,
        "failed": a.devices - provisioned,
        "failures": failures.iter().map(|(k, (n, _))| (k.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "failure_examples": failures.iter().map(|(k, (_, d))| (k.clone(), json!(d))).collect::<serde_json::Map<_, _>>(),
        "retries": retries.n,
        "retry_reasons": retries.why,
        "concurrency": a.concurrency,
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "per_second": if seconds > 0.0 { ((provisioned as f64 / seconds) * 10.0).round() / 10.0 } else { 0.0 },
        "latency_ms": {
            "p50": (percentile(&latencies, 0.50) * 10.0).round() / 10.0,
            "p99": (percentile(&latencies, 0.99) * 10.0).round() / 10.0,
            "max": (percentile(&latencies, 1.0) * 10.0).round() / 10.0,
        },
        "roles_cpu_ms_per_provisioning": per(roles_before, roles_after),
        "simulator_cpu_ms_per_provisioning": simulator,
        "machine_cpu_ms_per_provisioning": machine,
        "db": engine(a.db.as_deref()),
        "roles": if embedded_pid.is_some() { "embedded" } else { "running" },
        "setup_seconds": (setup_seconds * 1000.0).round() / 1000.0,
        "setup_failed": setup_failed,
    }))
}

fn print_summary(r: &serde_json::Value) {
    println!(
        "fleet: {} of {} devices provisioned in {} s ({} per second; supply and contract before it took {} s)",
        r["provisioned"], r["devices"], r["seconds"], r["per_second"], r["setup_seconds"]
    );
    println!(
        "latency: p50 {} ms, p99 {} ms, max {} ms; retries {}",
        r["latency_ms"]["p50"], r["latency_ms"]["p99"], r["latency_ms"]["max"], r["retries"]
    );
    println!(
        "CPU per provisioning: roles {} ms, simulator {} ms, whole machine {} ms; database {}",
        r["roles_cpu_ms_per_provisioning"],
        r["simulator_cpu_ms_per_provisioning"],
        r["machine_cpu_ms_per_provisioning"],
        r["db"]
    );
    if let Some(f) = r["failures"].as_object() {
        for (why, n) in f {
            println!("failed: {n} × {why}: {}", r["failure_examples"][why]);
        }
    }
}
