//! `mcimctl lab run`: a whole system on this machine, end to end. It starts the same binaries
//! users deploy, as child processes: `mcim-roles all` (supplier, RO, VNO, SHO, PVA on one
//! SQLite database, mutual TLS under a fresh development PKI), a software TRE (swtpm, or a
//! SoftHSM2 token), and `tred` for the device. Then, as the factory, the subscriber and the
//! device owner would:
//!
//! 1. supply time (5.1.3.3.4): keys and identity in the TRE, the supplier certifies them
//!    (platform credential, TLS certificate), registers the model's reference values with the
//!    PVA, embeds the PCID's initial credential and hands it to the RO's ICF (CCIF mode 2);
//! 2. the subscriber contracts with the SHO (5.1.3.5.2);
//! 3. the device runs initial provisioning (5.1.3.6.2 steps 1-14, or 5.1.3.6.3), each step
//!    printed as the device sees it;
//! 4. an operational attach with the new MCIM (5.1.3.3.2.2).
//!
//! `--json` prints one JSON object at the end (progress goes to stderr). On failure the exit
//! status is non-zero and the failed step is named.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use mcim_pki::Role;
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::pva::v1::pva_service_client::PvaServiceClient;
use mcim_proto::mcim::sho::v1 as sho;
use mcim_proto::mcim::sho::v1::sho_service_client::ShoServiceClient;
use mcim_proto::mcim::supplier::v1::supplier_service_client::SupplierServiceClient;
use mcim_proto::mcim::tre::v1 as pb;
use mcim_proto::mcim::tre::v1::tre_service_client::TreServiceClient;
use mcim_proto::mcim::vno::v1 as vno;
use mcim_proto::mcim::vno::v1::vno_service_client::VnoServiceClient;
use rand::Rng;
use serde_json::json;
use tonic::transport::Channel;

use crate::error::{CliError, fail, runtime};
use crate::tred::connect;

mod compromised_dpf;
mod crash;

/// The longest the lab waits for the device's next provisioning step (the device itself
/// retries an unreachable role for two minutes).
const STEP_TIMEOUT: Duration = Duration::from_secs(150);

/// The lab SHO's PLMN (MCC 001, MNC 02): its IMSIs start with it.
const LAB_SHO_PLMN: &str = "00102";

/// `mcimctl lab ...`
#[derive(Subcommand)]
pub enum LabCommand {
    /// Run the lab once and report each step.
    Run(RunArgs),
}

/// The device's TRE in the lab.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TreChoice {
    /// A software TPM 2.0 (swtpm).
    Tpm,
    /// A SoftHSM2 token.
    Pkcs11,
}

/// How the device reaches the RO.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccessChoice {
    /// Through a VNO after AKA with the PCID (5.1.3.6.2).
    #[value(name = "3gpp")]
    ThreeGpp,
    /// Straight to the RO's DRF (5.1.3.6.3).
    #[value(name = "non-3gpp")]
    Non3gpp,
}

/// Arguments of `mcimctl lab run`.
#[derive(Args)]
pub struct RunArgs {
    /// Working directory (PKI, databases, TRE state, logs); a temporary one if not given.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The device's TRE.
    #[arg(long, value_enum, default_value = "tpm")]
    tre: TreChoice,
    /// The access network.
    #[arg(long, value_enum, default_value = "3gpp")]
    access: AccessChoice,
    /// Print one JSON object at the end (progress goes to stderr).
    #[arg(long)]
    json: bool,
    /// Keep the working directory (and print where it is).
    #[arg(long)]
    keep: bool,
    /// Demonstrate a refusal: extend PCR 0 after supply (tred stopped, tpm2_pcrextend, tred
    /// restarted), so the platform no longer matches its reference values; the PVA refuses it
    /// and nothing is provisioned (TPM only).
    #[arg(long)]
    extend_pcr_after_supply: bool,
    /// Demonstrate a refusal: the RO is compromised and its DPF serves, instead of the
    /// SHO's package, another genuine SHO-signed package (one from an earlier registration,
    /// or one for another device), wrapped for this device's TRE. The device refuses it at
    /// step 13, the SHO is told, and nothing is installed.
    #[arg(long, value_enum)]
    dpf_serves: Option<compromised_dpf::Served>,
    /// Demonstrate recovery: right after the device reports step N, kill (SIGKILL) `tred` or
    /// `mcim-roles` and start it again on the same state (`tred:N` or `roles:N`, N from 1 to
    /// 13, or 0 for as soon as the run starts). Provisioning resumes where it was and
    /// completes, each step reported once.
    #[arg(long, value_name = "tred:N|roles:N")]
    crash: Option<crash::Crash>,
    /// How the PCID's initial credentials are configured (5.1.3.4.1): 1 the CCIF generates
    /// them and returns them wrapped for the TRE; 2 the supplier embeds them and the CCIF
    /// hands them to the RO; 3 the supplier embeds them and the subscriber registers them at
    /// the RO (with delayed activation, annex x.1).
    #[arg(long, value_enum, default_value = "2")]
    ccif_mode: crate::supply::CcifMode,
    /// The TPM's AKA form (tred's `tpm_aka`): "sealed" runs the device as a TPM without
    /// TPM2_EncryptDecrypt2 (K as sealed data, unsealed for each AKA); the PVA's result says
    /// so and the SHO wraps K accordingly.
    #[arg(long, value_enum, default_value = "auto")]
    tpm_aka: TpmAka,
    /// The subscription requires AKA inside the TRE: the SHO refuses a device that runs it
    /// with K unsealed in the host (step 10), and the device hears it.
    #[arg(long)]
    require_aka_in_tre: bool,
}

/// tred's `tpm_aka`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TpmAka {
    /// AKA in the TPM when it has TPM2_EncryptDecrypt2.
    Auto,
    /// K as sealed data, unsealed for each AKA.
    Sealed,
}

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
struct Proc(Option<Child>);

impl Proc {
    /// Whether the process has ended.
    fn exited(&mut self) -> bool {
        self.0
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// SIGKILL, no clean shutdown: what a crash or a power cut looks like to the others.
    fn crash(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `n` consecutive free ports on 127.0.0.1.
fn free_ports(n: u16) -> Result<u16, CliError> {
    for _ in 0..100 {
        let a = TcpListener::bind("127.0.0.1:0").map_err(fail)?;
        let p = a.local_addr().map_err(fail)?.port();
        drop(a);
        if p < 65535 - n && (0..n).all(|i| TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            return Ok(p);
        }
    }
    Err(fail("no free ports"))
}

/// Starts a server on `n` fresh consecutive ports (`start(first port)`) and waits until all
/// of them accept connections. Ports found free can be taken by another process before the
/// server binds them; the server then exits, and this tries new ports (five times).
fn start_on_free_ports(
    n: u16,
    what: &str,
    mut start: impl FnMut(u16) -> Result<Proc, CliError>,
) -> Result<(Proc, u16), CliError> {
    for _attempt in 0..5 {
        let base = free_ports(n)?;
        let mut p = start(base)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if (0..n).all(|i| std::net::TcpStream::connect(("127.0.0.1", base + i)).is_ok()) {
                return Ok((p, base));
            }
            if p.exited() {
                break;
            }
            if Instant::now() > deadline {
                return Err(fail(format!("{what} did not start")));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    Err(fail(format!(
        "{what} did not start: no free ports it could bind"
    )))
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) -> Result<(), CliError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err(fail(format!("{what} did not start")))
}

/// A binary next to this `mcimctl`, else on PATH.
fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Progress: stdout normally, stderr under --json (stdout then holds only the JSON).
struct Say(bool);

impl Say {
    fn line(&self, text: &str) {
        if self.0 {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }
}

fn spawn(cmd: &mut Command, what: &str, log: &Path) -> Result<Proc, CliError> {
    let log = std::fs::File::create(log).map_err(fail)?;
    cmd.stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map(|c| Proc(Some(c)))
        .map_err(|e| {
            fail(format!(
                "{what}: {e} (bash ci/install-deps.sh installs what the lab needs)"
            ))
        })
}

/// Starts `tred` again on the same state and socket (after it stopped or was killed) and
/// connects to it.
async fn restart_tred(
    tred: &mut Command,
    socket: &Path,
    log: &Path,
) -> Result<(Proc, TreServiceClient<Channel>), CliError> {
    let _ = std::fs::remove_file(socket);
    let p = spawn(tred, "tred", log)?;
    wait_until("tred", || {
        std::os::unix::net::UnixStream::connect(socket).is_ok()
    })?;
    Ok((p, connect(socket).await?))
}

async fn role_client(pki: &Path, me: Role, peer: Role, port: u16) -> Result<Channel, CliError> {
    crate::net::role_channel(pki, me, peer, &format!("https://127.0.0.1:{port}")).await
}

/// Runs `mcimctl lab ...`.
pub fn run(cmd: LabCommand) -> Result<(), CliError> {
    let LabCommand::Run(a) = cmd;
    let tmp;
    let dir: PathBuf = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(fail)?;
            d.clone()
        }
        None => {
            tmp = tempdir()?;
            if a.keep {
                let p = tmp.0.clone();
                std::mem::forget(tmp);
                p
            } else {
                tmp.0.clone()
            }
        }
    };
    let say = Say(a.json);
    let outcome = lab(&a, &dir, &say);
    if a.keep || a.dir.is_some() {
        say.line(&format!("lab directory: {}", dir.display()));
    }
    match outcome {
        Ok(report) => {
            if a.json {
                println!("{report}");
            }
            Ok(())
        }
        Err((report, e)) => {
            if a.json {
                println!("{report}");
            }
            Err(e)
        }
    }
}

type LabResult = Result<serde_json::Value, (serde_json::Value, CliError)>;

fn lab(a: &RunArgs, dir: &Path, say: &Say) -> LabResult {
    let mut report = json!({
        "tre": match a.tre { TreChoice::Tpm => "tpm", TreChoice::Pkcs11 => "pkcs11" },
        "access": match a.access { AccessChoice::ThreeGpp => "3gpp", AccessChoice::Non3gpp => "non-3gpp" },
        "steps": [],
        "ok": false,
    });
    let r = lab_inner(a, dir, say, &mut report);
    match r {
        Ok(()) => {
            report["ok"] = json!(true);
            Ok(report)
        }
        Err(e) => {
            report["error"] = json!(e.to_string());
            Err((report, e))
        }
    }
}

fn lab_inner(
    a: &RunArgs,
    dir: &Path,
    say: &Say,
    report: &mut serde_json::Value,
) -> Result<(), CliError> {
    if let Some(c) = a.crash
        && a.access == AccessChoice::Non3gpp
        && c.after_step < 5
    {
        return Err(fail(
            "--crash: non-3GPP access starts at step 5 (5.1.3.6.3 has no PCID attach)",
        ));
    }
    if a.tpm_aka == TpmAka::Sealed && a.tre != TreChoice::Tpm {
        return Err(fail("--tpm-aka needs --tre tpm"));
    }
    if a.extend_pcr_after_supply && a.tre != TreChoice::Tpm {
        return Err(fail("--extend-pcr-after-supply needs --tre tpm"));
    }
    let pki = dir.join("pki");
    mcim_pki::dev::init(&pki, &mcim_pki::dev::LAB_PARTIES).map_err(fail)?;

    // The network: every role in one process, the binary operators deploy.
    let start_roles_at = |base: u16, log: &str| -> Result<Proc, CliError> {
        spawn(
            Command::new(sibling("mcim-roles"))
                .args(["all", "--pki"])
                .arg(&pki)
                .arg("--db")
                .arg(format!("sqlite://{}", dir.join("roles.db").display()))
                .args(["--base-port", &base.to_string()])
                .args(["--sho-plmn", LAB_SHO_PLMN])
                .env("MCIM_LOG", "info"),
            "mcim-roles",
            &dir.join(log),
        )
    };
    let (mut roles_proc, base) =
        start_on_free_ports(5, "mcim-roles", |base| start_roles_at(base, "roles.log"))?;
    let (sup_p, ro_p, vno_p, sho_p, pva_p) = (base, base + 1, base + 2, base + 3, base + 4);
    // After a crash: the same ports (tred knows them), which were ours.
    let start_roles = |log: &str| -> Result<Proc, CliError> {
        let p = start_roles_at(base, log)?;
        wait_until("mcim-roles", || {
            (0..5).all(|i| std::net::TcpStream::connect(("127.0.0.1", base + i)).is_ok())
        })?;
        Ok(p)
    };
    say.line(&format!(
        "[lab] network roles (mcim-roles all): supplier :{sup_p}, RO :{ro_p}, VNO :{vno_p}, SHO :{sho_p}, PVA :{pva_p}"
    ));

    // The device: a software TRE and tred.
    let socket = dir.join("tred.sock");
    let mut tred = Command::new(sibling("tred"));
    tred.env("MCIM_STATE_DIR", dir.join("tred-state"))
        .env("MCIM_SOCKET", &socket)
        .env("MCIM_QUOTE_PCRS", "0,1,2,3,4,5,6,7")
        .env("MCIM_CA_FILE", pki.join("ca.pem"))
        .env("MCIM_RO_URL", format!("https://127.0.0.1:{ro_p}"))
        .env("MCIM_VNO_URL", format!("https://127.0.0.1:{vno_p}"));
    let _swtpm;
    let mut tpm_port = 0;
    match a.tre {
        TreChoice::Tpm => {
            let tpm_dir = dir.join("tpm");
            std::fs::create_dir_all(&tpm_dir).map_err(fail)?;
            let (proc, port) = start_on_free_ports(2, "swtpm", |port| {
                spawn(
                    Command::new("swtpm")
                        .args(["socket", "--tpm2", "--tpmstate"])
                        .arg(format!("dir={}", tpm_dir.display()))
                        .args([
                            "--server",
                            &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                        ])
                        .args([
                            "--ctrl",
                            &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
                        ])
                        .args(["--flags", "not-need-init,startup-clear"]),
                    "swtpm",
                    &dir.join("swtpm.log"),
                )
            })?;
            tpm_port = port;
            _swtpm = Some(proc);
            tred.env("MCIM_BACKEND", "tpm")
                .env("MCIM_TCTI", format!("swtpm:host=127.0.0.1,port={port}"))
                .env(
                    "MCIM_TPM_AKA",
                    match a.tpm_aka {
                        TpmAka::Auto => "auto",
                        TpmAka::Sealed => "sealed",
                    },
                );
            say.line(&format!("[lab] software TPM (swtpm) on 127.0.0.1:{port}"));
        }
        TreChoice::Pkcs11 => {
            _swtpm = None;
            let hsm = dir.join("softhsm");
            std::fs::create_dir_all(hsm.join("tokens")).map_err(fail)?;
            let conf = hsm.join("softhsm2.conf");
            std::fs::write(
                &conf,
                format!(
                    "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                    hsm.join("tokens").display()
                ),
            )
            .map_err(fail)?;
            let init = Command::new("softhsm2-util")
                .env("SOFTHSM2_CONF", &conf)
                .args([
                    "--init-token",
                    "--free",
                    "--label",
                    "mcim",
                    "--pin",
                    "1234",
                    "--so-pin",
                    "5678",
                ])
                .output()
                .map_err(|e| {
                    fail(format!(
                        "softhsm2-util: {e} (bash ci/install-deps.sh installs it)"
                    ))
                })?;
            if !init.status.success() {
                return Err(fail(format!(
                    "softhsm2-util: {}",
                    String::from_utf8_lossy(&init.stderr)
                )));
            }
            tred.env("MCIM_BACKEND", "pkcs11")
                .env("SOFTHSM2_CONF", &conf)
                .env("MCIM_PKCS11_TOKEN", "mcim")
                .env("MCIM_PKCS11_PIN", "1234");
            say.line("[lab] SoftHSM2 token \"mcim\"");
        }
    }
    let mut tred_proc = spawn(&mut tred, "tred", &dir.join("tred.log"))?;
    wait_until("tred", || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    })?;
    say.line(&format!("[lab] tred on {}", socket.display()));

    let pcid = "001010000000001";
    runtime()?.block_on(async {
        let mut dev = connect(&socket).await?;
        let mut supplier = SupplierServiceClient::new(role_client(&pki, Role::Supplier, Role::Supplier, sup_p).await?);

        // 1. Supply time, as `mcimctl supplier supply` does it.
        let identity = common::DeviceIdentity {
            device_id: "LAB-0001".into(),
            pcid: pcid.into(),
            model: "mcim-lab".into(),
        };
        let mut pva = PvaServiceClient::new(role_client(&pki, Role::Supplier, Role::Pva, pva_p).await?);
        let supplied = crate::supply::supply(
            &mut dev,
            &mut supplier,
            Some(&mut pva),
            &identity,
            a.ccif_mode,
            "ro.mcim.local",
        )
        .await?;
        say.line("[lab] supplier: keys and identity in the TRE, platform credential and TLS certificate issued");
        say.line(&format!(
            "[lab] supplier: reference values for model {} registered at the PVA ({} PCRs)",
            identity.model, supplied.reference_pcrs
        ));
        if let Some(creds) = &supplied.for_subscriber {
            // Mode 3: the subscriber registers them, for delayed activation (annex x.1), then
            // activates them, as `mcimctl subscriber register-pcid` / `activate-pcid` do.
            let mut icf =
                crate::subscriber::icf_client(&pki, &format!("https://127.0.0.1:{ro_p}")).await?;
            crate::subscriber::register_pcid(&mut icf, creds, true).await?;
            crate::subscriber::activate_pcid(&mut icf, pcid).await?;
        }
        report["ccif_mode"] = json!(a.ccif_mode as u8);
        say.line(&format!(
            "[lab] supplier: initial credential of PCID {pcid} in the TRE and at the RO's ICF (CCIF mode {}: {})",
            a.ccif_mode as u8,
            a.ccif_mode.describe()
        ));

        if a.extend_pcr_after_supply {
            // The platform changes after supply: tred lets go of the TPM, a PCR is extended,
            // tred comes back.
            drop(std::mem::replace(&mut tred_proc, Proc(None)));
            let out = Command::new("tpm2_pcrextend")
                .env("TPM2TOOLS_TCTI", format!("swtpm:host=127.0.0.1,port={tpm_port}"))
                .arg(format!("0:sha256={}", "ab".repeat(32)))
                .output()
                .map_err(|e| fail(format!("tpm2_pcrextend: {e}")))?;
            if !out.status.success() {
                return Err(fail(format!(
                    "tpm2_pcrextend: {}",
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            (tred_proc, dev) = restart_tred(&mut tred, &socket, &dir.join("tred-2.log")).await?;
            say.line("[lab] PCR 0 extended after supply: the platform no longer matches its reference values");
        }

        if let Some(what) = a.dpf_serves {
            let forged = compromised_dpf::forge(
                what,
                &pki,
                pcid,
                LAB_SHO_PLMN,
                supplied.target,
                &supplied.storage_public,
            )?;
            compromised_dpf::install(&dir.join("roles.db"), &forged, dir)?;
            say.line(&format!(
                "[lab] the RO is compromised: its DPF will serve {}",
                match what {
                    compromised_dpf::Served::ReplayedPackage =>
                        "a package of an earlier registration of this device",
                    compromised_dpf::Served::OtherDevicePackage => "a package for another device",
                }
            ));
        }

        // 2. The owner exports the device's parameters; the subscriber contracts with the
        // SHO with them (5.1.3.5.2), as `mcimctl device parameters` and `mcimctl subscriber
        // register` do.
        let params = crate::parameters::DeviceParameters::from_pb(
            dev.get_device_parameters(pb::GetDeviceParametersRequest {})
                .await?
                .into_inner(),
        );
        let sub = crate::subscriber::register(
            &mut ShoServiceClient::new(role_client(&pki, Role::Subscriber, Role::Sho, sho_p).await?),
            &params,
            "lab-subscriber",
            a.require_aka_in_tre,
        )
        .await?;
        say.line(&format!(
            "[lab] subscriber: subscription at the SHO, IMSI {} reserved",
            sub.imsi
        ));

        // 3. Provisioning, as the device sees it.
        let access = match a.access {
            AccessChoice::ThreeGpp => common::AccessType::AccessType3gpp,
            AccessChoice::Non3gpp => common::AccessType::Non3gpp,
        };
        let tre_before = dev.get_status(pb::GetStatusRequest {}).await?.into_inner();
        let started = Instant::now();
        let id = dev
            .start_provisioning(pb::StartProvisioningRequest {
                access: access as i32,
            })
            .await?
            .into_inner()
            .provisioning_id;
        let mut mcim_id = String::new();
        let mut registration = String::new();
        let mut failed = None;
        let mut crash = a.crash;
        let mut reported: Vec<u32> = Vec::new();
        if let Some(c) = crash
            && c.after_step == 0
        {
            // As soon as the run has started: inside the first exchange with the network.
            crash = None;
            report["crash"] = json!({"process": c.what.as_str(), "after_step": 0});
            match c.what {
                crash::Crashed::Tred => {
                    tred_proc.crash();
                    (tred_proc, dev) =
                        restart_tred(&mut tred, &socket, &dir.join("tred-2.log")).await?;
                }
                crash::Crashed::Roles => {
                    roles_proc.crash();
                    roles_proc = start_roles("roles-2.log")?;
                }
            }
            say.line(&format!(
                "[lab] {} killed as the run started and started again",
                c.what.as_str()
            ));
        }
        'watch: loop {
        let mut steps = dev
            .watch_provisioning(pb::WatchProvisioningRequest {
                provisioning_id: id.clone(),
            })
            .await?
            .into_inner();
        loop {
            let next = tokio::time::timeout(STEP_TIMEOUT, steps.message()).await.map_err(|_| {
                fail(format!(
                    "no progress for {} s after step {}",
                    STEP_TIMEOUT.as_secs(),
                    reported.last().copied().unwrap_or(0)
                ))
            })??;
            let Some(s) = next else { break };
            // A new watch replays what was already reported.
            if s.ok && reported.contains(&s.step) {
                continue;
            }
            if s.ok {
                reported.push(s.step);
            }
            say.line(&crate::tred::step_line(&s));
            if let Some(list) = report["steps"].as_array_mut() {
                list.push(json!({"step": s.step, "name": s.name, "ok": s.ok, "detail": s.detail}));
            }
            if !s.mcim_id.is_empty() {
                mcim_id = s.mcim_id.clone();
            }
            if !s.registration_id.is_empty() {
                registration = s.registration_id.clone();
            }
            if !s.ok {
                failed = Some(format!("step {} ({}) failed: {}", s.step, s.name, s.detail));
            }
            if let Some(c) = crash
                && s.ok
                && s.step == c.after_step
            {
                crash = None;
                report["crash"] = json!({"process": c.what.as_str(), "after_step": c.after_step});
                match c.what {
                    crash::Crashed::Tred => {
                        drop(steps);
                        tred_proc.crash();
                        (tred_proc, dev) =
                            restart_tred(&mut tred, &socket, &dir.join("tred-2.log")).await?;
                        say.line(&format!("[lab] tred killed after step {} and started again: it resumes its run", c.after_step));
                        continue 'watch;
                    }
                    crash::Crashed::Roles => {
                        roles_proc.crash();
                        roles_proc = start_roles("roles-2.log")?;
                        say.line(&format!("[lab] mcim-roles killed after step {} and started again: the roles resume from their database", c.after_step));
                    }
                }
            }
        }
        break;
        }
        // What the SHO and the device's registry say, success or not.
        if !registration.is_empty() {
            let mut sho = ShoServiceClient::new(role_client(&pki, Role::Subscriber, Role::Sho, sho_p).await?);
            // The SHO follows the PVA's verdict on its own; give it a moment to hear it.
            let deadline = Instant::now() + Duration::from_secs(10);
            let r = loop {
                let r = sho
                    .get_registration(sho::GetRegistrationRequest {
                        registration_id: registration.clone(),
                    })
                    .await?
                    .into_inner();
                let settled = r.state != sho::RegistrationState::Validating as i32
                    && r.state != sho::RegistrationState::Authorized as i32;
                if settled || Instant::now() > deadline {
                    break r;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            report["sho_registration"] = json!({
                "id": registration,
                "state": crate::subscriber::registration_state(r.state),
                "detail": r.detail,
            });
        }
        let held: Vec<String> = dev
            .list_mcims(pb::ListMcimsRequest {})
            .await?
            .into_inner()
            .mcims
            .into_iter()
            .map(|m| m.mcim_id)
            .collect();
        report["registry"] = json!(held);
        if let Some(f) = failed {
            return Err(fail(f));
        }
        let provisioning = started.elapsed();
        let provisioning_ms = provisioning.as_millis();
        // The TRE's share: what the TRE thread spent (TPM commands and the registry commits
        // with them) against the whole (network, roles, TLS, validation, the rest).
        let tre_after = dev.get_status(pb::GetStatusRequest {}).await?.into_inner();
        let tre_us = tre_after.tre_busy_micros.saturating_sub(tre_before.tre_busy_micros);
        let total_us = u64::try_from(provisioning.as_micros()).unwrap_or(u64::MAX);
        if a.crash.is_none() {
            // (After a crash the counters restarted with tred: no split.)
            report["timing"] = json!({
                "provisioning_us": total_us,
                "tre_us": tre_us,
                "rest_us": total_us.saturating_sub(tre_us),
                "tpm_commands": tre_after.tpm_commands.saturating_sub(tre_before.tpm_commands),
            });
        }
        let m = dev
            .get_mcim(pb::GetMcimRequest {
                mcim_id: mcim_id.clone(),
            })
            .await?
            .into_inner()
            .mcim
            .ok_or_else(|| fail("the provisioned MCIM is not in the registry"))?;
        say.line(&format!(
            "[lab] provisioned in {provisioning_ms} ms ({} ms in the TRE): MCIM {} (IMSI {})",
            tre_us / 1000,
            m.mcim_id,
            m.imsi
        ));

        // An impostor (a certified device without this MCIM's K) answers the IMSI's
        // challenge: the VNO refuses it, and the refusal leaves nothing behind.
        let mut impostor = VnoServiceClient::new(
            crate::net::software_device_channel(
                &pki,
                "001019999999999",
                Role::Vno,
                &format!("https://127.0.0.1:{vno_p}"),
            )
            .await?,
        );
        let ch = impostor
            .attach(vno::AttachRequest {
                identity: m.imsi.clone(),
            })
            .await?
            .into_inner();
        let mut wrong = [0u8; 8];
        rand::rng().fill_bytes(&mut wrong);
        let refused = impostor
            .complete_attach(vno::CompleteAttachRequest {
                attach_id: ch.attach_id,
                answer: Some(vno::complete_attach_request::Answer::Res(wrong.to_vec())),
            })
            .await;
        match refused {
            Err(s) if s.code() == tonic::Code::Unauthenticated => {}
            other => {
                return Err(fail(format!(
                    "an impostor's wrong RES was not refused: {other:?}"
                )));
            }
        }
        report["impostor_attach"] = json!({"refused": true});
        say.line(&format!(
            "[lab] an impostor answering IMSI {}'s challenge with a wrong RES: refused (UNAUTHENTICATED)",
            m.imsi
        ));

        // 4. Operational attach with the new MCIM.
        let g = dev
            .network_attach(pb::NetworkAttachRequest {
                mcim_id: m.mcim_id.clone(),
            })
            .await
            .map_err(|s| fail(format!("operational attach failed: {}", s.message())))?
            .into_inner();
        say.line(&format!(
            "[lab] operational attach with IMSI {}: AKA in the TRE against the SHO's vectors, grant {}",
            g.imsi, g.grant_id
        ));
        let m = dev
            .get_mcim(pb::GetMcimRequest { mcim_id })
            .await?
            .into_inner()
            .mcim
            .unwrap_or_default();
        report["mcim"] = json!({
            "id": m.mcim_id,
            "imsi": m.imsi,
            "state": common::McimState::try_from(m.state)
                .map(|s| s.as_str_name().trim_start_matches("MCIM_STATE_").to_lowercase())
                .unwrap_or_default(),
        });
        report["operational_attach"] = json!({"ok": true, "imsi": g.imsi});
        // The device's audit record of it all (5.1.2.2).
        let v = dev
            .verify_audit_log(pb::VerifyAuditLogRequest {})
            .await?
            .into_inner();
        if !v.ok {
            return Err(CliError::AuditBroken(v.detail));
        }
        say.line(&format!("[lab] audit record: {}", v.detail));
        report["audit"] = json!({"ok": true, "entries": v.entries});
        report["provisioning_ms"] = json!(provisioning_ms);
        Ok::<(), CliError>(())
    })
}

/// A temporary directory removed on drop (no extra dependency for one directory).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> Result<TempDir, CliError> {
    let mut n = [0u8; 8];
    rand::rng().fill_bytes(&mut n);
    let p = std::env::temp_dir().join(format!("mcim-lab-{}", hex::encode(n)));
    std::fs::create_dir_all(&p).map_err(fail)?;
    Ok(TempDir(p))
}
