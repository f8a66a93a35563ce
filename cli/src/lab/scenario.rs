//! The lab's scenario: the network, the device, then the seed's flow as the factory, the
//! subscriber and the owner run it (supply, contract, provisioning with its steps printed,
//! the impostor refused, the operational attach, the audit record), with the refusals and
//! crashes the options ask for; with `--flow change-sho`, then the change to the lab's second
//! SHO (5.1.3.7.4.2) with its steps printed, the old SHO's vectors refused, and the
//! operational attach with the new IMSI.

use super::*;

/// The lab device's PCID.
const LAB_PCID: &str = "001010000000001";

/// The processes of a lab run and the device's local API.
struct Rig<'a> {
    a: &'a RunArgs,
    dir: &'a Path,
    say: &'a Say,
    pki: PathBuf,
    base: u16,
    socket: PathBuf,
    tred: Command,
    tred_proc: Proc,
    roles_proc: Proc,
    dev: TreServiceClient<Channel>,
    /// Restarts so far (each gets its own log).
    restarts: u32,
}

/// `mcim-roles all` on the ports from `base` (six: supplier, RO, VNO, SHO, PVA, second SHO).
fn start_roles_at(
    pki: &Path,
    dir: &Path,
    db: &str,
    base: u16,
    log: &str,
) -> Result<Proc, CliError> {
    spawn(
        Command::new(sibling("mcim-roles"))
            .args(["all", "--pki"])
            .arg(pki)
            // In the environment, not on the command line: a URL's password stays out of ps.
            .env("MCIM_DB", db)
            .args(["--base-port", &base.to_string()])
            .args(["--sho-plmn", LAB_SHO_PLMN])
            .args(["--sho2-plmn", LAB_SHO2_PLMN])
            .env("MCIM_LOG", "info"),
        "mcim-roles",
        &dir.join(log),
    )
}

/// The roles' database: `--db`, else `roles.db` in the lab's directory.
fn roles_db(a: &RunArgs, dir: &Path) -> String {
    a.db.clone()
        .unwrap_or_else(|| format!("sqlite://{}", dir.join("roles.db").display()))
}

/// Ports `mcim-roles all` listens on.
const ROLE_PORTS: u16 = 6;

impl Rig<'_> {
    /// `mcim-roles all` again on its ports (tred knows them), after it stopped. A port freed
    /// by the stopped process can be taken for a moment by another process on this machine;
    /// mcim-roles then exits at once, and is started again (for 30 s).
    fn restart_roles(&mut self) -> Result<(), CliError> {
        self.roles_proc.stop_with(self.a.crash_signal);
        self.restarts += 1;
        let log = format!("roles-{}.log", self.restarts + 1);
        let base = self.base;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut p =
                start_roles_at(&self.pki, self.dir, &roles_db(self.a, self.dir), base, &log)?;
            let listening = || {
                (0..ROLE_PORTS)
                    .all(|i| std::net::TcpStream::connect(("127.0.0.1", base + i)).is_ok())
            };
            while !p.exited() && !listening() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(25));
            }
            if !p.exited() && listening() {
                self.roles_proc = p;
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(fail("mcim-roles did not start again on its ports"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `tred` stopped (with the crash signal) and started again on its state.
    async fn restart_tred(&mut self) -> Result<(), CliError> {
        self.tred_proc.stop_with(self.a.crash_signal);
        if self.a.damage_kept_package {
            self.damage_kept_package()?;
        }
        self.restarts += 1;
        let log = self.dir.join(format!("tred-{}.log", self.restarts + 1));
        (self.tred_proc, self.dev) = restart_tred(&mut self.tred, &self.socket, &log).await?;
        Ok(())
    }

    /// `--damage-kept-package`: one octet of every kept package in tred's state flipped (its
    /// signature no longer verifies).
    fn damage_kept_package(&self) -> Result<(), CliError> {
        let state = self.dir.join("tred-state");
        let mut damaged = 0;
        for f in std::fs::read_dir(&state).map_err(fail)? {
            let path = f.map_err(fail)?.path();
            let kept = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("package-") && n.ends_with(".cose"));
            if kept {
                let mut b = std::fs::read(&path).map_err(fail)?;
                let mid = b.len() / 2;
                if let Some(x) = b.get_mut(mid) {
                    *x ^= 0x5a;
                }
                std::fs::write(&path, b).map_err(fail)?;
                damaged += 1;
            }
        }
        self.say.line(&format!(
            "[lab] {damaged} kept package(s) damaged while tred was down"
        ));
        Ok(())
    }

    /// A channel to a role as `me`.
    async fn role(&self, me: Role, peer: Role, port: u16) -> Result<Channel, CliError> {
        role_client(&self.pki, me, peer, port).await
    }
}

/// The last lines of each log in the lab's directory (the roles', tred's, each restart's),
/// for an error that a stalled run ends with.
fn log_tails(dir: &Path) -> String {
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    logs.iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            format!(
                "--- {} (last 15 lines)\n{}",
                p.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default(),
                lines[lines.len().saturating_sub(15)..].join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What following a run found.
#[derive(Default)]
struct Followed {
    mcim_id: String,
    registration: String,
    failed: Option<String>,
}

/// Follows the device's run `id` to its end, printing each step and adding it to `steps`,
/// crashing what `crash` says after its step (0: as the run starts).
async fn follow(
    rig: &mut Rig<'_>,
    id: &str,
    mut crash: Option<crash::Crash>,
    steps_out: &mut Vec<serde_json::Value>,
    report: &mut serde_json::Value,
) -> Result<Followed, CliError> {
    let signal = rig.a.crash_signal.as_str();
    let mut out = Followed::default();
    let mut reported: Vec<u32> = Vec::new();
    if let Some(c) = crash
        && c.after_step == 0
    {
        // As soon as the run has started: inside the first exchange with the network.
        crash = None;
        report["crash"] = json!({"process": c.what.as_str(), "after_step": 0, "signal": signal});
        match c.what {
            crash::Crashed::Tred => rig.restart_tred().await?,
            crash::Crashed::Roles => rig.restart_roles()?,
        }
        rig.say.line(&format!(
            "[lab] {} killed as the run started and started again",
            c.what.as_str()
        ));
    }
    'watch: loop {
        let mut steps = rig
            .dev
            .watch_provisioning(pb::WatchProvisioningRequest {
                provisioning_id: id.to_string(),
            })
            .await?
            .into_inner();
        loop {
            let next = tokio::time::timeout(STEP_TIMEOUT, steps.message())
                .await
                .map_err(|_| {
                    fail(format!(
                        "no progress for {} s after step {}\n{}",
                        STEP_TIMEOUT.as_secs(),
                        reported.last().copied().unwrap_or(0),
                        log_tails(rig.dir)
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
            rig.say.line(&crate::tred::step_line(&s));
            steps_out.push(json!({"step": s.step, "name": s.name, "ok": s.ok, "detail": s.detail}));
            if !s.mcim_id.is_empty() {
                out.mcim_id = s.mcim_id.clone();
            }
            if !s.registration_id.is_empty() {
                out.registration = s.registration_id.clone();
            }
            if !s.ok {
                out.failed = Some(format!("step {} ({}) failed: {}", s.step, s.name, s.detail));
            }
            if let Some(c) = crash
                && s.ok
                && s.step == c.after_step
            {
                crash = None;
                report["crash"] = json!({"process": c.what.as_str(), "after_step": c.after_step, "signal": signal});
                match c.what {
                    crash::Crashed::Tred => {
                        drop(steps);
                        rig.restart_tred().await?;
                        rig.say.line(&format!(
                            "[lab] tred killed after step {} and started again: it resumes its run",
                            c.after_step
                        ));
                        continue 'watch;
                    }
                    crash::Crashed::Roles => {
                        rig.restart_roles()?;
                        rig.say.line(&format!(
                            "[lab] mcim-roles killed after step {} and started again: the roles resume from their database",
                            c.after_step
                        ));
                    }
                }
            }
        }
        return Ok(out);
    }
}

/// Runs the scenario of `a` in `dir`, filling `report`.
pub(super) fn lab_inner(
    a: &RunArgs,
    dir: &Path,
    say: &Say,
    report: &mut serde_json::Value,
) -> Result<(), CliError> {
    // --crash counts the steps of the chosen flow.
    if let Some(c) = a.crash
        && a.flow == FlowChoice::Initial
        && a.access == AccessChoice::Non3gpp
        && (1..5).contains(&c.after_step)
    {
        return Err(fail(
            "--crash: non-3GPP access starts at step 5 (5.1.3.6.3 has no PCID attach)",
        ));
    }
    if let Some(c) = a.crash
        && a.flow != FlowChoice::Pristine
        && c.after_step > 13
    {
        return Err(fail(
            "--crash: this flow has 14 steps (after the last there is nothing to resume)",
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
    let (roles_proc, base) = start_on_free_ports(
        ROLE_PORTS,
        "mcim-roles",
        Some(&dir.join("roles.log")),
        |base| start_roles_at(&pki, dir, &roles_db(a, dir), base, "roles.log"),
    )?;
    let (sup_p, ro_p, vno_p, sho_p, pva_p, sho2_p) =
        (base, base + 1, base + 2, base + 3, base + 4, base + 5);
    say.line(&format!(
        "[lab] network roles (mcim-roles all): supplier :{sup_p}, RO :{ro_p}, VNO :{vno_p}, SHO :{sho_p}, PVA :{pva_p}, second SHO :{sho2_p}"
    ));

    // The device: a software TRE and tred.
    let socket = dir.join("tred.sock");
    let mut tred = Command::new(sibling("tred"));
    tred.env("MCIM_STATE_DIR", dir.join("tred-state"))
        .env("MCIM_SOCKET", &socket)
        .env("MCIM_QUOTE_PCRS", "0,1,2,3,4,5,6,7")
        .env("MCIM_CA_FILE", pki.join("ca.pem"))
        .env("MCIM_SHO_CA_FILE", pki.join("ca-sho.pem"))
        .env("MCIM_CA_DIR", &pki)
        .env("MCIM_RO_URL", format!("https://127.0.0.1:{ro_p}"))
        .env("MCIM_VNO_URL", format!("https://127.0.0.1:{vno_p}"));
    let (_swtpm, tpm_port) = tre::start(a, dir, &mut tred, say)?;
    // The USIM in a PC/SC reader: a private pcscd with vpcd, tred its virtual card.
    let pcscd_dir = dir.join("pcscd");
    let _pcscd = match a.usim {
        Some(super::UsimChoice::Pcsc) => {
            let (p, port) = start_on_free_ports(2, "pcscd with vpcd", None, |port| {
                spawn(
                    &mut super::pcsc::pcscd(&pcscd_dir, port)?,
                    "pcscd (unshare)",
                    &dir.join("pcscd.log"),
                )
            })?;
            wait_until("pcscd", || super::pcsc::socket(&pcscd_dir).exists())?;
            // The private pcscd runs as this user (root in its user namespace otherwise).
            let uid = std::fs::metadata("/proc/self")
                .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
                .map_err(fail)?;
            tred.env("MCIM_USIM_VPCD", format!("127.0.0.1:{port}"))
                .env("MCIM_USIM_VPCD_USER", uid.to_string());
            say.line(&format!(
                "[lab] pcscd with vpcd: PCSCLITE_CSOCK_NAME={}; tred is the card in reader \"mcim vpcd 00 00\"",
                super::pcsc::socket(&pcscd_dir).display()
            ));
            Some(p)
        }
        None => None,
    };
    let tred_proc = spawn(&mut tred, "tred", &dir.join("tred.log"))?;
    wait_until("tred", || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    })?;
    say.line(&format!("[lab] tred on {}", socket.display()));

    let pcid = LAB_PCID;
    runtime()?.block_on(async {
        let dev = connect(&socket).await?;
        let mut rig = Rig {
            a,
            dir,
            say,
            pki: pki.clone(),
            base,
            socket: socket.clone(),
            tred,
            tred_proc,
            roles_proc,
            dev,
            restarts: 0,
        };
        let mut supplier = SupplierServiceClient::new(rig.role(Role::Supplier, Role::Supplier, sup_p).await?);
        // 1. Supply time, as `mcimctl supplier supply` does it.
        let identity = common::DeviceIdentity {
            device_id: "LAB-0001".into(),
            pcid: pcid.into(),
            model: "mcim-lab".into(),
        };
        let mut pva = PvaServiceClient::new(rig.role(Role::Supplier, Role::Pva, pva_p).await?);
        let supplied = crate::supply::supply(
            &mut rig.dev,
            &mut supplier,
            Some(&mut pva),
            &identity,
            crate::supply::CredentialTerms {
                mode: a.ccif_mode,
                ro_id: "ro.mcim.local",
                lifetime_secs: None,
            },
            &pki,
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
            drop(std::mem::replace(&mut rig.tred_proc, Proc(None)));
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
            rig.restarts += 1;
            (rig.tred_proc, rig.dev) =
                restart_tred(&mut rig.tred, &socket, &dir.join("tred-2.log")).await?;
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
            compromised_dpf::install(&roles_db(a, dir), &forged, dir)?;
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
        let sub = contract(&mut rig, "sho", sho_p).await?;
        say.line(&format!(
            "[lab] subscriber: subscription at the SHO, IMSI {} reserved",
            sub.imsi
        ));

        // 3. Provisioning, as the device sees it.
        let access = match a.access {
            AccessChoice::ThreeGpp => common::AccessType::AccessType3gpp,
            AccessChoice::Non3gpp => common::AccessType::Non3gpp,
        };
        let tre_before = rig.dev.get_status(pb::GetStatusRequest {}).await?.into_inner();
        let started = Instant::now();
        let id = rig
            .dev
            .start_provisioning(pb::StartProvisioningRequest {
                access: access as i32,
            })
            .await?
            .into_inner()
            .provisioning_id;
        let initial_crash = if a.flow == FlowChoice::Initial { a.crash } else { None };
        let mut steps = Vec::new();
        let followed = follow(&mut rig, &id, initial_crash, &mut steps, report).await;
        if a.flow == FlowChoice::Initial {
            report["steps"] = json!(steps);
        } else {
            report["initial_steps"] = json!(steps);
        }
        let Followed {
            mcim_id,
            registration,
            failed,
        } = followed?;
        // What the SHO and the device's registry say, success or not.
        if !registration.is_empty() {
            let mut sho = ShoServiceClient::new(rig.role(Role::Subscriber, Role::Sho, sho_p).await?);
            // The SHO follows the PVA's verdict on its own; give it a moment to hear it.
            let deadline = Instant::now() + Duration::from_secs(10);
            let r = loop {
                let r = sho
                    .get_registration(sho::GetRegistrationRequest {
                        registration_id: registration.clone(),
                        ..Default::default()
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
        let held: Vec<String> = rig
            .dev
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
        let tre_after = rig.dev.get_status(pb::GetStatusRequest {}).await?.into_inner();
        let tre_us = tre_after.tre_busy_micros.saturating_sub(tre_before.tre_busy_micros);
        let total_us = u64::try_from(provisioning.as_micros()).unwrap_or(u64::MAX);
        if initial_crash.is_none() {
            // (After a crash the counters restarted with tred: no split.)
            report["timing"] = json!({
                "provisioning_us": total_us,
                "tre_us": tre_us,
                "rest_us": total_us.saturating_sub(tre_us),
                "tpm_commands": tre_after.tpm_commands.saturating_sub(tre_before.tpm_commands),
            });
        }
        let m = rig
            .dev
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

        // An impostor (a certified device, another PCID, without this MCIM) attaches with the
        // IMSI: the SHO answers only for the device it provisioned the IMSI to, so the VNO
        // refuses it as for an IMSI nobody holds, with no challenge and nothing left behind.
        let mut impostor = VnoServiceClient::new(
            crate::net::software_device_channel(
                &pki,
                "001019999999999",
                Role::Vno,
                &format!("https://127.0.0.1:{vno_p}"),
            )
            .await?,
        );
        let refused = impostor
            .attach(vno::AttachRequest {
                identity: m.imsi.clone(),
            })
            .await;
        match refused {
            Err(s) if s.code() == tonic::Code::NotFound => {}
            other => {
                return Err(fail(format!(
                    "an impostor's attach with the device's IMSI was not refused: {other:?}"
                )));
            }
        }
        report["impostor_attach"] = json!({"refused": true, "code": "NOT_FOUND"});
        say.line(&format!(
            "[lab] an impostor (another certified device) attaching with IMSI {}: refused, no challenge (NOT_FOUND)",
            m.imsi
        ));

        // 4. Operational attach with the new MCIM: tred attaches, or the UE through the
        // card.
        let (imsi, grant, via) = rig.operational_attach(&m.mcim_id, &m.imsi).await?;
        say.line(&format!(
            "[lab] operational attach with IMSI {imsi}: {}, grant {grant}",
            attach_how(via)
        ));
        let m = rig
            .dev
            .get_mcim(pb::GetMcimRequest { mcim_id })
            .await?
            .into_inner()
            .mcim
            .unwrap_or_default();
        report["mcim"] = mcim_report(&m);
        report["operational_attach"] = json!({"ok": true, "imsi": imsi, "via": via});
        if via == "usim-pcsc" {
            report["usim"] = card_contents(dir)?;
        }
        report["provisioning_ms"] = json!(provisioning_ms);
        if a.flow != FlowChoice::Initial {
            // The lab's SHOs: the device goes to the second, and (--changes 2 and more) back
            // and forth.
            let shos = [
                LabSho { file: "sho", port: sho_p },
                LabSho { file: mcim_pki::dev::SECOND_SHO.0, port: sho2_p },
            ];
            let mut current = m.clone();
            for i in 0..usize::from(a.changes.max(1)) {
                report["operational_attach"] = json!({"ok": false});
                let (from, to) = (&shos[i % 2], &shos[(i + 1) % 2]);
                let crash = if i == 0 { a.crash } else { None };
                current = change_sho(&mut rig, &current, from, to, crash, report).await?;
                report["changes"] = json!(i + 1);
            }
        }
        // The device's audit record of it all (5.1.2.2).
        let v = rig
            .dev
            .verify_audit_log(pb::VerifyAuditLogRequest {})
            .await?
            .into_inner();
        if !v.ok {
            return Err(CliError::AuditBroken(v.detail));
        }
        say.line(&format!("[lab] audit record: {}", v.detail));
        report["audit"] = json!({"ok": true, "entries": v.entries});
        Ok::<(), CliError>(())
    })
}

/// An MCIM as the report shows it.
fn mcim_report(m: &pb::Mcim) -> serde_json::Value {
    json!({
        "id": m.mcim_id,
        "imsi": m.imsi,
        "sho": m.sho_id,
        "state": common::McimState::try_from(m.state)
            .map(|s| s.as_str_name().trim_start_matches("MCIM_STATE_").to_lowercase())
            .unwrap_or_default(),
    })
}

/// The owner exports the device's parameters with its proof of ownership for the lab's
/// subscriber at the SHO whose files are `sho_file` (annex x.2.3, from the device's
/// owner-only local API); the subscriber contracts there with them (5.1.3.5.2; 5.1.3.7.4.2
/// step 1), as `mcimctl device parameters` and `mcimctl subscriber register` do.
async fn contract(
    rig: &mut Rig<'_>,
    sho_file: &str,
    sho_port: u16,
) -> Result<sho::CreateSubscriptionResponse, CliError> {
    let mut params = crate::parameters::DeviceParameters::from_pb(
        rig.dev
            .get_device_parameters(pb::GetDeviceParametersRequest {})
            .await?
            .into_inner(),
    );
    let name_of = |file: &str| -> Result<String, CliError> {
        let der = mcim_pki::dev::ca_der(&rig.pki, file).map_err(fail)?;
        Ok(mcim_pki::party::caller_from_cert(&der).map_err(fail)?.name)
    };
    let (subscriber, sho_id) = (name_of("subscriber")?, name_of(sho_file)?);
    params.ownership_proof = rig
        .dev
        .prove_ownership(pb::ProveOwnershipRequest { subscriber, sho_id })
        .await?
        .into_inner()
        .proof
        .map(crate::parameters::ProofFile::from_pb);
    crate::subscriber::register(
        &mut ShoServiceClient::new(rig.role(Role::Subscriber, Role::Sho, sho_port).await?),
        &params,
        "",
        rig.a.require_aka_in_tre,
    )
    .await
}

/// `--flow change-sho`: the subscriber moves the device from the lab's SHO (whose MCIM `old`
/// is in use) to its second SHO (5.1.3.7.4.2, steps 1-14), then the device attaches with the
/// new IMSI and the old SHO refuses vectors for the old one. `--flow pristine` the same by
/// reverting to the pristine state (5.1.3.7.4.3: steps 1-3, then 5.1.3.6.2's as 4-17; the
/// notice goes to the old SHO in the background, and nothing is relayed to the new SHO).
/// One of the lab's SHOs: its files in the PKI directory and its port.
struct LabSho {
    file: &'static str,
    port: u16,
}

async fn change_sho(
    rig: &mut Rig<'_>,
    old: &pb::Mcim,
    from: &LabSho,
    to: &LabSho,
    crash: Option<crash::Crash>,
    report: &mut serde_json::Value,
) -> Result<pb::Mcim, CliError> {
    let a = rig.a;
    let (sho_p, sho2_p) = (from.port, to.port);
    report["before"] = json!({"imsi": old.imsi, "sho": old.sho_id});
    let new_sho =
        mcim_pki::party::caller_from_cert(&mcim_pki::dev::ca_der(&rig.pki, to.file).map_err(fail)?)
            .map_err(fail)?
            .name;
    let new_sho = new_sho.as_str();
    let pristine = a.flow == FlowChoice::Pristine;
    let dual = a.flow == FlowChoice::Dual;
    rig.say.line(&format!(
        "[lab] change of SHO ({}): from {} (IMSI {}) to {new_sho}",
        if pristine {
            "5.1.3.7.4.3, reverting to the pristine state"
        } else if dual {
            "end of 5.1.3.7.4.2, both MCIMs present"
        } else {
            "5.1.3.7.4.2, over the old SHO's connectivity"
        },
        old.sho_id,
        old.imsi
    ));
    // Step 1: the subscriber hands the device's parameters to the new SHO.
    let sub = contract(rig, to.file, sho2_p).await?;
    rig.say.line(&format!(
        "[lab] subscriber: subscription at {new_sho}, IMSI {} reserved",
        sub.imsi
    ));
    // Step 2: the subscriber instructs the device.
    let access = match a.access {
        AccessChoice::ThreeGpp => common::AccessType::AccessType3gpp,
        AccessChoice::Non3gpp => common::AccessType::Non3gpp,
    };
    let tre_before = rig
        .dev
        .get_status(pb::GetStatusRequest {})
        .await?
        .into_inner();
    let started = Instant::now();
    let id = rig
        .dev
        .reprovision(pb::ReprovisionRequest {
            new_sho_id: new_sho.into(),
            access: access as i32,
            revert_to_pristine: pristine,
            keep_old: dual,
            ..Default::default()
        })
        .await?
        .into_inner()
        .provisioning_id;
    let mut steps = Vec::new();
    let followed = follow(rig, &id, crash, &mut steps, report).await;
    report["steps"] = json!(steps);
    let Followed {
        mcim_id,
        registration,
        failed,
    } = followed?;
    // What the new SHO learnt (step 11): the filtered acknowledgment, nothing of the old.
    let mut relayed = false;
    if !registration.is_empty() {
        let r = ShoServiceClient::new(rig.role(Role::Subscriber, Role::Sho, sho2_p).await?)
            .get_registration(sho::GetRegistrationRequest {
                registration_id: registration.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        relayed = !r.discard_ack.is_empty();
        report["sho_registration"] = json!({
            "id": registration,
            "sho": new_sho,
            "state": crate::subscriber::registration_state(r.state),
            "detail": r.detail,
            "discard_ack": String::from_utf8_lossy(&r.discard_ack),
        });
    }
    // The device's own record of the notice (its outbox); after a revert to the pristine
    // state the notice goes in the background: wait for it (30 s).
    let deadline = Instant::now() + Duration::from_secs(if pristine { 30 } else { 0 });
    let acknowledged = loop {
        let done = rig
            .dev
            .get_status(pb::GetStatusRequest {})
            .await?
            .into_inner()
            .discard_notices
            .iter()
            .any(|n| n.imsi == old.imsi && n.acknowledged);
        if done || failed.is_some() || Instant::now() >= deadline {
            break done;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    report["discard"] = json!({
        "notice_acknowledged": acknowledged,
        "relayed_to_new_sho": relayed,
    });
    let held = rig
        .dev
        .list_mcims(pb::ListMcimsRequest {})
        .await?
        .into_inner()
        .mcims;
    report["mcims"] = json!(
        held.iter()
            .map(|m| json!({"imsi": m.imsi, "sho": m.sho_id, "state": mcim_report(m)["state"]}))
            .collect::<Vec<_>>()
    );
    if let Some(f) = failed {
        return Err(fail(f));
    }
    let change_ms = started.elapsed().as_millis();
    report["change_ms"] = json!(change_ms);
    if crash.is_none() {
        // As for the initial provisioning: the TRE's share of the change (5.1.3.7.4.2 steps
        // 1-14, from the instruction to the end of the step stream).
        let tre_after = rig
            .dev
            .get_status(pb::GetStatusRequest {})
            .await?
            .into_inner();
        let tre_us = tre_after
            .tre_busy_micros
            .saturating_sub(tre_before.tre_busy_micros);
        let total_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        report["change_timing"] = json!({
            "provisioning_us": total_us,
            "tre_us": tre_us,
            "rest_us": total_us.saturating_sub(tre_us),
            "tpm_commands": tre_after.tpm_commands.saturating_sub(tre_before.tpm_commands),
        });
    }
    // The old SHO gives no more vectors for the old IMSI: a VNO attach with it goes nowhere.
    let refused = old_imsi_refused(rig, &old.imsi, sho_p).await?;
    report["old_imsi_refused"] = json!(refused);
    if dual {
        // Both MCIMs present: the old one still works; the owner chooses the new one.
        if refused {
            return Err(fail(format!(
                "the old SHO refuses the kept MCIM's IMSI {}",
                old.imsi
            )));
        }
        switch_connectivity(rig, &old.mcim_id, &mcim_id).await?;
        rig.say.line(&format!(
            "[lab] both MCIMs present: the old SHO still serves IMSI {}; the owner chooses the new MCIM for connectivity",
            old.imsi
        ));
    } else if !refused {
        return Err(fail(format!(
            "the old SHO still gives vectors for {} after the discard",
            old.imsi
        )));
    } else {
        rig.say.line(&format!(
            "[lab] the old SHO refuses vectors for IMSI {} (NOT_FOUND): its MCIM was discarded",
            old.imsi
        ));
    }
    // Operational attach with the new MCIM.
    let new_imsi = rig
        .dev
        .get_mcim(pb::GetMcimRequest {
            mcim_id: mcim_id.clone(),
        })
        .await?
        .into_inner()
        .mcim
        .unwrap_or_default()
        .imsi;
    let (imsi, grant, via) = rig.operational_attach(&mcim_id, &new_imsi).await?;
    let m = rig
        .dev
        .get_mcim(pb::GetMcimRequest { mcim_id })
        .await?
        .into_inner()
        .mcim
        .unwrap_or_default();
    rig.say.line(&format!(
        "[lab] changed in {change_ms} ms; operational attach with IMSI {imsi} of {}: {}, grant {grant}",
        m.sho_id,
        attach_how(via)
    ));
    report["operational_attach"] = json!({"ok": true, "imsi": imsi, "via": via});
    if via == "usim-pcsc" {
        report["usim"] = card_contents(rig.dir)?;
    }
    let m = if dual {
        // The new one cannot attach? The owner switches back (one audited transition), the
        // old one attaches, and forth again: the new one provides connectivity at the end.
        switch_connectivity(rig, &m.mcim_id, &old.mcim_id).await?;
        let back = rig
            .dev
            .network_attach(pb::NetworkAttachRequest {
                mcim_id: old.mcim_id.clone(),
            })
            .await
            .map_err(|s| {
                fail(format!(
                    "attach after switching back failed: {}",
                    s.message()
                ))
            })?
            .into_inner();
        rig.say.line(&format!(
            "[lab] switched back: IMSI {} of {} attaches again (grant {}); and forth to the new one",
            back.imsi, old.sho_id, back.grant_id
        ));
        report["switch_back"] = json!({"ok": true, "imsi": back.imsi});
        switch_connectivity(rig, &old.mcim_id, &m.mcim_id).await?;
        rig.dev
            .get_mcim(pb::GetMcimRequest {
                mcim_id: m.mcim_id.clone(),
            })
            .await?
            .into_inner()
            .mcim
            .unwrap_or_default()
    } else {
        m
    };
    report["mcim"] = mcim_report(&m);
    let held = rig
        .dev
        .list_mcims(pb::ListMcimsRequest {})
        .await?
        .into_inner()
        .mcims;
    report["mcims"] = mcims_report(&held);
    Ok(m)
}

/// Whether the SHO whose port is `sho_p` refuses vectors for `imsi` on the lab device
/// (NOT_FOUND), asked as the VNO asks it.
async fn old_imsi_refused(rig: &Rig<'_>, imsi: &str, sho_p: u16) -> Result<bool, CliError> {
    let got = ShoServiceClient::new(rig.role(Role::Vno, Role::Sho, sho_p).await?)
        .get_auth_vectors(sho::GetAuthVectorsRequest {
            imsi: imsi.to_string(),
            count: 1,
            pcid: LAB_PCID.into(),
            ..Default::default()
        })
        .await;
    Ok(matches!(got, Err(s) if s.code() == tonic::Code::NotFound))
}

/// The owner moves connectivity from the MCIM `from` (its session ended, if it has one) to
/// `to` (5.1.3.7.2: "the owner of the device should control which MCIM ... is used").
async fn switch_connectivity(rig: &mut Rig<'_>, from: &str, to: &str) -> Result<(), CliError> {
    let ended = rig
        .dev
        .end_mcim_session(pb::EndMcimSessionRequest {
            mcim_id: from.to_string(),
        })
        .await;
    if let Err(s) = ended
        && s.code() != tonic::Code::FailedPrecondition
    {
        return Err(s.into());
    }
    rig.dev
        .set_connectivity_mcim(pb::SetConnectivityMcimRequest {
            mcim_id: to.to_string(),
        })
        .await?;
    Ok(())
}

/// Every MCIM the registry holds, as the report shows them.
fn mcims_report(held: &[pb::Mcim]) -> serde_json::Value {
    json!(
        held.iter()
            .map(|m| json!({"imsi": m.imsi, "sho": m.sho_id, "state": mcim_report(m)["state"]}))
            .collect::<Vec<_>>()
    )
}

impl Rig<'_> {
    /// The operational attach with MCIM `mcim_id` (IMSI `imsi`): `tred` attaches
    /// (`NetworkAttach`), or with `--usim pcsc` the UE through the card. The IMSI, the grant
    /// and how ("tred" or "usim-pcsc").
    async fn operational_attach(
        &mut self,
        mcim_id: &str,
        imsi: &str,
    ) -> Result<(String, String, &'static str), CliError> {
        if self.a.usim == Some(super::UsimChoice::Pcsc) {
            let grant =
                attach_through_the_card(&self.pki, self.base + 2, LAB_PCID, imsi, self.dir).await?;
            return Ok((imsi.to_string(), grant, "usim-pcsc"));
        }
        let g = self
            .dev
            .network_attach(pb::NetworkAttachRequest {
                mcim_id: mcim_id.to_string(),
            })
            .await
            .map_err(|s| fail(format!("operational attach failed: {}", s.message())))?
            .into_inner();
        Ok((g.imsi, g.grant_id, "tred"))
    }
}

/// How an operational attach went, for the lab's lines.
fn attach_how(via: &str) -> &'static str {
    if via == "usim-pcsc" {
        "the VNO's challenge as AUTHENTICATE over PC/SC, answered by the card in the TRE"
    } else {
        "AKA in the TRE against the SHO's vectors"
    }
}

/// The UE's operational attach through the USIM in the PC/SC reader: the VNO's challenge for
/// `imsi` goes to the card as AUTHENTICATE (`mcimctl card authenticate`, a PC/SC client of the
/// lab's pcscd), its RES back to the VNO; the grant.
async fn attach_through_the_card(
    pki: &Path,
    vno_p: u16,
    pcid: &str,
    imsi: &str,
    dir: &Path,
) -> Result<String, CliError> {
    let mut vno = VnoServiceClient::new(
        crate::net::software_device_channel(
            pki,
            pcid,
            Role::Vno,
            &format!("https://127.0.0.1:{vno_p}"),
        )
        .await?,
    );
    let ch = vno
        .attach(vno::AttachRequest {
            identity: imsi.to_string(),
        })
        .await?
        .into_inner();
    let c = ch
        .challenge
        .ok_or_else(|| fail("the VNO sent no challenge"))?;
    let (rand, autn) = (hex::encode(&c.rand), hex::encode(&c.autn));
    let v = card_json(
        dir,
        &["authenticate", "--rand", &rand, "--autn", &autn],
        "AUTHENTICATE over PC/SC",
    )?;
    let res = v["res"]
        .as_str()
        .and_then(|r| hex::decode(r).ok())
        .ok_or_else(|| fail(format!("the card did not authenticate the network: {v}")))?;
    let done = vno
        .complete_attach(vno::CompleteAttachRequest {
            attach_id: ch.attach_id,
            answer: Some(vno::complete_attach_request::Answer::Res(res)),
        })
        .await?
        .into_inner();
    match done.result {
        Some(vno::complete_attach_response::Result::Grant(g)) => Ok(g.grant_id),
        _ => Err(fail("the VNO granted nothing for the card's RES")),
    }
}

/// What the card in the lab's reader shows (`mcimctl card read --json`): its ICCID, IMSI,
/// MNC length and service provider name, from the MCIM's package.
fn card_contents(dir: &Path) -> Result<serde_json::Value, CliError> {
    card_json(dir, &["read"], "reading the card over PC/SC")
}

/// `mcimctl card ARGS --json` on the card in the lab's reader, a client of the lab's pcscd
/// (the UE's side): its JSON answer, or `what` failed with mcimctl's words.
fn card_json(dir: &Path, args: &[&str], what: &str) -> Result<serde_json::Value, CliError> {
    let exe = std::env::current_exe().map_err(fail)?;
    let out = Command::new(exe)
        .arg("card")
        .args(args)
        .args(["--json", "--reader", "mcim vpcd 00 00"])
        .env(
            "PCSCLITE_CSOCK_NAME",
            super::pcsc::socket(&dir.join("pcscd")),
        )
        .output()
        .map_err(fail)?;
    if !out.status.success() {
        return Err(fail(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    serde_json::from_slice(&out.stdout).map_err(fail)
}
