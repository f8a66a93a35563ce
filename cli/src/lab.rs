//! `mcimctl lab run`: a whole device-side system on one machine, end to end: a software TPM,
//! `tred`, and the roles' device-facing steps played by this process (equipment supplier,
//! PVA, SHO, and the home network's AuC). The network roles as servers, and the provisioning
//! flow between them (TR 33.812 5.1.3.6.2), join this lab when `mcim-roles` lands.
//!
//! Steps: supply-time initialisation (5.1.3.3.4) -> attestation and its verification
//! (steps 8-10) -> the SHO wraps K and OPc for this TRE, OPc bound to the validated PCRs
//! (step 12) -> install, activate, choose for connectivity, select (step 13, 5.1.1.1) -> AKA
//! inside the TPM against an AV from the home network (TS 33.102 6.3) -> the audit record
//! verified against its anchor in the TPM (5.1.2.2).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use mcim_core::aka::{
    Amf, Constants, HeSqnState, K, Milenage, Opc, Rand, SoftKernel, SqnProfile, generate_av,
};
use mcim_core::tpm::attest::{TpmQuote, verify_quote};
use mcim_core::tpm::import::{ObjectPolicy, wrap_aes128_key, wrap_sealed_data};
use mcim_core::tpm::policy::PcrSelection;
use mcim_core::tpm::public::EccPublic;
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::tre::v1 as pb;
use rand::Rng;

use crate::device::{DeviceError, connect, runtime};

/// `mcimctl lab ...`
#[derive(Subcommand)]
pub enum LabCommand {
    /// Run the lab once and report each step.
    Run(RunArgs),
}

/// Arguments of `mcimctl lab run`.
#[derive(Args)]
pub struct RunArgs {
    /// Working directory (TPM state, tred's state and socket, logs); a temporary one if not
    /// given.
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
struct Proc(Option<Child>);

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

fn fail(what: impl std::fmt::Display) -> DeviceError {
    DeviceError::Input(what.to_string())
}

fn free_port_pair() -> Result<u16, DeviceError> {
    for _ in 0..50 {
        let a = TcpListener::bind("127.0.0.1:0").map_err(fail)?;
        let p = a.local_addr().map_err(fail)?.port();
        if p < 65534 && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return Ok(p);
        }
    }
    Err(fail("no free port pair for swtpm"))
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) -> Result<(), DeviceError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err(fail(format!("{what} did not start")))
}

/// `tred` next to this `mcimctl`, else on PATH.
fn tred_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("tred")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("tred"))
}

fn step(n: usize, text: &str) {
    println!("[{n}/8] {text}");
}

/// Runs `mcimctl lab ...`.
pub fn run(cmd: LabCommand) -> Result<(), DeviceError> {
    let LabCommand::Run(a) = cmd;
    let tmp;
    let dir: &Path = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(fail)?;
            d
        }
        None => {
            tmp = tempdir()?;
            &tmp.0
        }
    };
    let tpm_dir = dir.join("tpm");
    std::fs::create_dir_all(&tpm_dir).map_err(fail)?;

    step(1, "software TPM (swtpm) and the TRE daemon (tred)");
    let port = free_port_pair()?;
    let _swtpm = Proc(Some(
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
            .args(["--flags", "not-need-init,startup-clear"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| fail(format!("swtpm: {e} (bash ci/install-deps.sh installs it)")))?,
    ));
    wait_until("swtpm", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })?;
    let socket = dir.join("tred.sock");
    let log = std::fs::File::create(dir.join("tred.log")).map_err(fail)?;
    let _tred = Proc(Some(
        Command::new(tred_binary())
            .env("MCIM_TCTI", format!("swtpm:host=127.0.0.1,port={port}"))
            .env("MCIM_STATE_DIR", dir.join("tred-state"))
            .env("MCIM_SOCKET", &socket)
            .env("MCIM_QUOTE_PCRS", "0,1,2,3,4,5,6,7")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| fail(format!("tred: {e} (build it: cargo build -p mcim-tre)")))?,
    ));
    wait_until("tred", || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    })?;
    println!(
        "      swtpm on 127.0.0.1:{port}, tred on {}",
        socket.display()
    );

    runtime()?.block_on(async {
        let mut c = connect(&socket).await?;
        let mut rng = rand::rng();

        step(
            2,
            "equipment supplier: supply-time initialisation (keys and identity in the TPM)",
        );
        let init = c
            .init_device(pb::InitDeviceRequest {
                identity: Some(common::DeviceIdentity {
                    device_id: "LAB-0001".into(),
                    pcid: "001010000000001".into(),
                    model: "mcim-lab".into(),
                }),
            })
            .await?
            .into_inner();
        let storage = EccPublic::from_tpm2b(&init.storage_public).map_err(fail)?;
        println!("      storage key {}", hex::encode(storage.name()));

        step(
            3,
            "PVA: the device attests; the quote verifies (signature, nonce, PCR digest)",
        );
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        let att = c
            .attest(pb::AttestRequest {
                nonce: nonce.to_vec(),
                pcrs: Vec::new(),
            })
            .await?
            .into_inner();
        let Some(common::evidence::Kind::TpmQuote(q)) = att.evidence.and_then(|e| e.kind) else {
            return Err(fail("no TPM quote"));
        };
        let quote = TpmQuote {
            attest: q.attest,
            signature: q.signature,
            pcrs: q.pcrs.iter().map(|p| p.index as u8).collect(),
            pcr_values: q
                .pcrs
                .iter()
                .map(|p| p.digest.as_slice().try_into().unwrap_or([0u8; 32]))
                .collect(),
        };
        let verified = verify_quote(&init.attestation_public, &quote, &nonce).map_err(fail)?;
        println!("      {} PCRs verified", verified.pcrs.len());

        step(
            4,
            "SHO: K and OPc wrapped for this TPM, OPc bound to the validated PCRs",
        );
        let mut k = [0u8; 16];
        let mut opc = [0u8; 16];
        rng.fill_bytes(&mut k);
        rng.fill_bytes(&mut opc);
        let (k, opc) = (K::new(k), Opc::new(opc));
        let sel = PcrSelection::sha256(&quote.pcrs).map_err(fail)?;
        let policy = ObjectPolicy::pcrs(sel, &quote.pcr_values).map_err(fail)?;
        let k_blob =
            wrap_aes128_key(&storage, &k, ObjectPolicy::default(), &mut rng).map_err(fail)?;
        let opc_blob = wrap_sealed_data(&storage, opc.expose(), policy, &mut rng).map_err(fail)?;

        step(
            5,
            "device: install, activate, choose for connectivity, select (PIN)",
        );
        let imsi = "001010123456789";
        c.install_mcim(pb::InstallMcimRequest {
            imsi: imsi.into(),
            sho_id: "sho.lab".into(),
            wrapped_k: k_blob.to_bytes().map_err(fail)?,
            wrapped_opc: opc_blob.to_bytes().map_err(fail)?,
            milenage_c: Vec::new(),
            milenage_r: Vec::new(),
            pin: "2468".into(),
            puk: "13572468".into(),
        })
        .await?;
        c.activate_mcim(pb::ActivateMcimRequest {
            mcim_id: imsi.into(),
        })
        .await?;
        c.set_connectivity_mcim(pb::SetConnectivityMcimRequest {
            mcim_id: imsi.into(),
        })
        .await?;
        c.select_mcim(pb::SelectMcimRequest {
            mcim_id: imsi.into(),
            pin: "2468".into(),
        })
        .await?;

        step(
            6,
            "home network: authentication vectors; the device answers from inside the TPM",
        );
        let network = Milenage::with_opc(SoftKernel::new(&k), opc, Constants::default());
        let mut he = HeSqnState::default();
        let profile = SqnProfile::default();
        for round in 1..=3 {
            let av = generate_av(
                &network,
                &mut he,
                &profile,
                Amf([0x80, 0]),
                Rand::random(&mut rng),
            )
            .map_err(fail)?;
            let r = c
                .authenticate(pb::AuthenticateRequest {
                    credential: Some(pb::authenticate_request::Credential::McimId(imsi.into())),
                    challenge: Some(common::AuthChallenge {
                        rand: av.rand.0.to_vec(),
                        autn: av.autn.0.to_vec(),
                    }),
                })
                .await?
                .into_inner();
            let Some(pb::authenticate_response::Result::Success(s)) = r.result else {
                return Err(fail(format!("authentication {round} failed")));
            };
            let res_ok = s.res.as_slice() == av.xres.0.as_slice();
            let keys_ok = s.ck.as_slice() == av.ck.expose().as_slice()
                && s.ik.as_slice() == av.ik.expose().as_slice();
            if !(res_ok && keys_ok) {
                return Err(fail(format!(
                    "authentication {round}: RES/CK/IK differ from the AV"
                )));
            }
            println!("      authentication {round}: RES = XRES, CK and IK agree");
        }

        step(
            7,
            "audit record: hash chain and MACs verified, head anchored in the TPM",
        );
        let v = c
            .verify_audit_log(pb::VerifyAuditLogRequest {})
            .await?
            .into_inner();
        if !v.ok {
            return Err(DeviceError::AuditBroken(v.detail));
        }
        println!("      {}", v.detail);
        Ok(())
    })?;

    step(
        8,
        "done: tred stops on SIGTERM; logs and state are in the lab directory",
    );
    if a.dir.is_some() {
        println!("      {}", dir.display());
    }
    Ok(())
}

/// A temporary directory removed on drop (no extra dependency for one directory).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> Result<TempDir, DeviceError> {
    let mut n = [0u8; 8];
    rand::rng().fill_bytes(&mut n);
    let p = std::env::temp_dir().join(format!("mcim-lab-{}", hex::encode(n)));
    std::fs::create_dir_all(&p).map_err(fail)?;
    Ok(TempDir(p))
}
