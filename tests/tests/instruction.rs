//! Remote instructions from an authorised stakeholder (TR 33.812 5.1.1.3; 5.1.2.4) end to
//! end: each test starts its own `mcim-roles all` (two SHOs, fresh databases), its own swtpm
//! with a fresh state and its own `tred`, provisions the device at the first SHO from the
//! command line, and then the SHO's own operator instructs the device with `mcimctl sho
//! instruct`. The device verifies each instruction against the trust roots it holds, executes
//! it and reports, signed in its TRE; what it refuses changes nothing, checked on the device's
//! registry and audit log and in the reports the DPF keeps.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use mcim_e2e::{
    CliDevice, SOFTHSM2_MODULE, SOFTHSM2_PIN, SoftHsm, TestTre, db_rows, db_writer, mcimctl,
    output_text,
};
use mcim_pki::instruction::{self as ins, Action, Instruction};
use mcim_proto::mcim::ro::v1 as ro;
use mcim_proto::mcim::sho::v1 as sho;
use mcim_proto::mcim::sho::v1::sho_service_client::ShoServiceClient;
use mcim_proto::mcim::tre::v1 as tre;
use mcim_roles::authz::Role;
use prost::Message;
use serde_json::Value;
use tonic::Code;

const PCID: &str = "001010000000061";
const SHO: &str = "sho.mcim.local";

/// One provisioned device.
struct Provisioned(CliDevice);

impl std::ops::Deref for Provisioned {
    type Target = CliDevice;
    fn deref(&self) -> &CliDevice {
        &self.0
    }
}

impl std::ops::DerefMut for Provisioned {
    fn deref_mut(&mut self) -> &mut CliDevice {
        &mut self.0
    }
}

fn provisioned(token: bool) -> Provisioned {
    Provisioned(CliDevice::provisioned(token, PCID, &[], "3gpp"))
}

impl Provisioned {
    /// `mcimctl sho instruct` as the SHO `party` (`sho`, `sho2`); its JSON and exit status.
    fn instruct(&self, party: &str, action: &str, wait: u64) -> (bool, Value, String) {
        let url = if party == "sho2" {
            self.roles.url("sho2")
        } else {
            self.roles.url("sho")
        };
        let out = mcimctl(&[
            "sho",
            "instruct",
            "--sho-url",
            &url,
            "--pki",
            self.roles.pki.to_str().unwrap(),
            "--party",
            party,
            "--pcid",
            PCID,
            "--action",
            action,
            "--wait",
            &wait.to_string(),
            "--json",
        ]);
        let text = output_text(&out);
        let json = text
            .lines()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
            .unwrap_or(Value::Null);
        (out.status.success(), json, text)
    }

    /// `mcimctl sho instruction ID --json`, read again until the device reported or
    /// `deadline` passed.
    fn reported(&self, id: &str, deadline: Instant) -> Value {
        loop {
            let out = mcimctl(&[
                "sho",
                "instruction",
                id,
                "--sho-url",
                &self.roles.url("sho"),
                "--pki",
                self.roles.pki.to_str().unwrap(),
                "--json",
            ]);
            let r: Value =
                serde_json::from_str(output_text(&out).lines().next().unwrap_or("null")).unwrap();
            if r["reported"] == true || Instant::now() > deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// An instruction the device must carry out: its report.
    fn done(&self, action: &str) -> Value {
        let (ok, r, text) = self.instruct("sho", action, 60);
        assert!(ok, "{action}: {text}\n{}", self.tred.log());
        assert_eq!(r["outcome"], "done", "{r:#}");
        assert_eq!(r["imsi"], self.imsi.as_str());
        r
    }

    async fn device(&self) -> (Vec<tre::Mcim>, usize) {
        self.registry().await
    }

    async fn state_of(&self, imsi: &str) -> Option<i32> {
        self.device()
            .await
            .0
            .into_iter()
            .find(|m| m.mcim_id == imsi)
            .map(|m| m.state)
    }

    /// `mcimctl device attach`: whether it attached, and what it said.
    fn attach(&self) -> (bool, String) {
        let out = mcimctl(&[
            "device",
            "--socket",
            self.tred.socket().to_str().unwrap(),
            "attach",
        ]);
        (out.status.success(), output_text(&out))
    }
}

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

use mcim_proto::mcim::common::v1::McimState;

/// The SHO blocks its MCIM (the device can no longer attach with it), unblocks it (it can
/// again), discovers it (nothing changes), instructs it while `tred` is down (the instruction
/// waits at the DPF and is carried out once `tred` is back), retires it and deletes it: gone
/// from the device's registry and its record, and the SHO issues no more vectors for it. Every report
/// is the device's, signed in its TRE and verified by the SHO.
#[test]
fn an_sho_blocks_unblocks_discovers_and_deletes_its_own_mcim_on_a_tpm_and_the_device_reports_each()
{
    lifecycle_by_instructions(false);
}

/// The same on a PKCS#11 token; after the delete, pkcs11-tool (not our code) finds the
/// MCIM's K and OPc objects gone from the token.
#[test]
fn an_sho_blocks_unblocks_discovers_and_deletes_its_own_mcim_on_a_token_and_the_device_reports_each()
 {
    lifecycle_by_instructions(true);
}

/// The objects on the test's token with `label`, by pkcs11-tool.
fn token_objects(hsm: &SoftHsm, label: &str) -> usize {
    let out = hsm.tool(
        "pkcs11-tool",
        &[
            "--module",
            SOFTHSM2_MODULE,
            "--login",
            "--pin",
            SOFTHSM2_PIN,
            "--list-objects",
        ],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim() == format!("label:      {label}"))
        .count()
}

fn lifecycle_by_instructions(token: bool) {
    let mut p = provisioned(token);
    let objects = |p: &CliDevice, label: &str| match &p.tre {
        TestTre::Token(hsm) => Some(token_objects(hsm, label)),
        TestTre::Tpm { .. } => None,
    };
    if token {
        assert_eq!(
            objects(&p, "mcim.k"),
            Some(2),
            "the PCID's K and the MCIM's"
        );
    }
    let imsi = p.imsi.clone();
    let (ok, text) = p.attach();
    assert!(ok, "attaches once provisioned: {text}");

    let r = p.done("block");
    assert_eq!(r["mcim_state"], "blocked");
    assert!(
        r["seq"].as_u64().unwrap() > 1_700_000_000_000,
        "numbered by the millisecond: {r}"
    );
    assert_eq!(
        block(p.state_of(&imsi)),
        Some(McimState::Blocked as i32),
        "the registry says blocked"
    );
    let (ok, text) = p.attach();
    assert!(!ok, "a blocked MCIM does not authenticate: {text}");
    // The SHO's block is the SHO's: the owner cannot lift it.
    let unblock = mcimctl(&["device", "--socket", &p.socket(), "unblock", &imsi]);
    assert!(!unblock.status.success());
    assert!(
        output_text(&unblock).contains("only that SHO unblocks it"),
        "{}",
        output_text(&unblock)
    );
    assert_eq!(block(p.state_of(&imsi)), Some(McimState::Blocked as i32));

    let r = p.done("unblock");
    assert_eq!(r["mcim_state"], "activated");
    let (ok, text) = p.attach();
    assert!(ok, "unblocked, it authenticates again: {text}");

    // The attach opened a session on it: discover says so, and changes nothing.
    let before = block(p.device());
    let r = p.done("discover");
    assert_eq!(r["mcim_state"], "selected");
    assert_eq!(block(p.device()), before, "discover changed nothing");

    // Nothing lost while the device is away: queued at the DPF, carried out on its return.
    assert!(p.tred.stop());
    let (ok, r, text) = p.instruct("sho", "block", 0);
    assert!(ok, "{text}");
    assert_eq!(r["reported"], false);
    let id = r["instruction_id"].as_str().unwrap().to_string();
    p.tred.restart();
    let reported = p.reported(&id, Instant::now() + Duration::from_secs(60));
    assert_eq!(
        reported["outcome"],
        "done",
        "{reported:#}\n{}",
        p.tred.log()
    );
    assert_eq!(reported["mcim_state"], "blocked");

    // Retired: its secrets leave the TRE (the token's objects are destroyed); then deleted.
    let r = p.done("retire");
    assert_eq!(r["mcim_state"], "retired");
    assert_eq!(
        block(p.state_of(&imsi)),
        Some(McimState::Retired as i32),
        "the registry says retired"
    );
    if token {
        assert_eq!(objects(&p, "mcim.k"), Some(1), "only the PCID's K is left");
    }
    let r = p.done("delete");
    assert_eq!(r["mcim_state"], "deleted");
    assert_eq!(block(p.state_of(&imsi)), None, "gone from the registry");
    let records: Vec<String> = std::fs::read_dir(p.tred.state_dir().join("mcims"))
        .unwrap()
        .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !records.iter().any(|f| f.starts_with(&imsi)),
        "the record is gone: {records:?}"
    );
    if token {
        assert_eq!(objects(&p, "mcim.k"), Some(1), "only the PCID's K is left");
        assert_eq!(
            objects(&p, "mcim.opc"),
            Some(1),
            "only the PCID's OPc is left"
        );
    }
    // The SHO knows, from the device's own report: no more vectors for the IMSI.
    let got = block(async {
        mcim_proto::mcim::sho::v1::sho_service_client::ShoServiceClient::new(
            p.roles.channel(Role::Vno, Role::Sho).await,
        )
        .get_auth_vectors(sho::GetAuthVectorsRequest {
            imsi: imsi.clone(),
            count: 1,
            pcid: PCID.into(),
            ..Default::default()
        })
        .await
    });
    assert_eq!(got.unwrap_err().code(), Code::NotFound);
    // The SHO kept six verified reports, numbered in order.
    let rows = block(db_rows(
        &p.roles,
        "SELECT action, outcome FROM sho_instruction ORDER BY seq",
    ));
    assert_eq!(
        rows,
        [
            ["block", "done"],
            ["unblock", "done"],
            ["discover", "done"],
            ["block", "done"],
            ["retire", "done"],
            ["delete", "done"],
        ]
        .map(|r| r.map(String::from).to_vec())
        .to_vec()
    );
}

/// Puts `instruction` on the device's task stream as a malicious RO would (straight into the
/// DPF's queue), with a row that keeps the device's report (a replayed one's earlier report
/// is cleared first). Returns its id.
async fn inject(db: &mcim_e2e::Roles, sho_id: &str, instruction: Vec<u8>) -> String {
    let mut c = db_writer(db).await;
    let id = ins::instruction_id(&instruction);
    let body = ro::WatchDeviceTasksResponse {
        seq: 0,
        task: Some(ro::watch_device_tasks_response::Task::Instruction(
            ro::InstructionTask {
                instruction_id: id.clone(),
                instruction: instruction.clone(),
            },
        )),
    }
    .encode_to_vec();
    let (seq,): (i64,) = sqlx::query_as(
        "INSERT INTO ro_task_seq (pcid, last_seq) VALUES ($1, 1) ON CONFLICT (pcid) \
         DO UPDATE SET last_seq = ro_task_seq.last_seq + 1 RETURNING last_seq",
    )
    .bind(PCID)
    .fetch_one(&mut c)
    .await
    .unwrap();
    sqlx::query("INSERT INTO ro_task (pcid, seq, body) VALUES ($1, $2, $3)")
        .bind(PCID)
        .bind(seq)
        .bind(body)
        .execute(&mut c)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO ro_instruction (id, pcid, sho_id, body, queued_at) VALUES ($1, $2, $3, $4, 0) \
         ON CONFLICT (id) DO UPDATE SET report = NULL, signature = NULL, certificate = NULL",
    )
    .bind(&id)
    .bind(PCID)
    .bind(sho_id)
    .bind(&instruction)
    .execute(&mut c)
    .await
    .unwrap();
    id
}

/// An instruction signed by the party whose files in `pki` are `party`.
fn signed(pki: &std::path::Path, party: &str, i: &Instruction) -> Vec<u8> {
    mcim_core::signed::sign(
        &mcim_pki::dev::signing_key(pki, party).unwrap(),
        i,
        Some(&mcim_pki::dev::ca_der(pki, party).unwrap()),
    )
    .unwrap()
}

/// The device's report on `id` as the DPF keeps it (parsed; its signature is checked by the
/// SHO in the other test), waiting for it.
async fn report_of(db: &mcim_e2e::Roles, id: &str) -> ins::Report {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = db_rows(
            db,
            &format!("SELECT report FROM ro_instruction WHERE id = '{id}' AND report IS NOT NULL"),
        )
        .await;
        if let Some(r) = rows.first() {
            return ins::Report::parse(&hex::decode(&r[0]).unwrap()).unwrap();
        }
        assert!(Instant::now() < deadline, "no report on {id}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the device refuses, whoever carries it: another SHO's instruction for this SHO's
/// MCIM, the RO's own, one for another device, a replayed one, and one that names a sequence
/// number already spent. Each is reported refused with its reason, and the device's MCIMs and
/// audit log are exactly as before. Over the wire, a second SHO can neither instruct through
/// the first nor for a device where it has no MCIM.
#[test]
fn instructions_from_another_sho_the_ro_a_replay_or_for_another_device_are_refused_and_change_nothing()
 {
    let p = provisioned(false);
    let pki = p.roles.pki.clone();
    let db = &p.roles;
    p.done("block");
    p.done("unblock");
    let legit_block: Vec<u8> = block(db_rows(
        &db,
        "SELECT body FROM ro_instruction WHERE id = \
         (SELECT id FROM sho_instruction ORDER BY seq LIMIT 1)",
    ))
    .first()
    .map(|r| hex::decode(&r[0]).unwrap())
    .unwrap();
    let seqs: Vec<u64> = block(db_rows(
        &db,
        "SELECT CAST(seq AS TEXT) FROM sho_instruction ORDER BY seq",
    ))
    .into_iter()
    .map(|r| r[0].parse().unwrap())
    .collect();
    let (block_seq, unblock_seq) = (seqs[0], seqs[1]);
    let before = block(p.device());
    assert_eq!(
        before.0.iter().find(|m| m.mcim_id == p.imsi).unwrap().state,
        McimState::Activated as i32
    );
    // Signed by the SHO with a field the form does not have.
    let mut extra = serde_json::to_value(Instruction {
        kind: ins::KIND.into(),
        pcid: PCID.into(),
        imsi: p.imsi.clone(),
        sho: SHO.into(),
        seq: unblock_seq + 10,
        action: Action::Block,
        issued_at: 1,
    })
    .unwrap();
    extra["also"] = serde_json::json!("delete");
    let extra = mcim_core::signed::sign(
        &mcim_pki::dev::signing_key(&pki, "sho").unwrap(),
        &extra,
        Some(&mcim_pki::dev::ca_der(&pki, "sho").unwrap()),
    )
    .unwrap();
    let delete = |sho: &str, pcid: &str, seq: u64| Instruction {
        kind: ins::KIND.into(),
        pcid: pcid.into(),
        imsi: p.imsi.clone(),
        sho: sho.into(),
        seq,
        action: Action::Delete,
        issued_at: 1,
    };
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "a second SHO's instruction for the first SHO's MCIM",
            "sho2.mcim.local",
            signed(&pki, "sho2", &delete("sho2.mcim.local", PCID, 100)),
            ins::REFUSED_NOT_YOURS,
        ),
        (
            "the RO's own instruction, naming the SHO",
            "ro.mcim.local",
            signed(&pki, "ro", &delete(SHO, PCID, 101)),
            ins::REFUSED_SIGNATURE,
        ),
        (
            "the SHO's instruction for another device",
            SHO,
            signed(&pki, "sho", &delete(SHO, "001010000000062", 102)),
            ins::REFUSED_ANOTHER_DEVICE,
        ),
        (
            "the SHO's block, replayed after its unblock",
            SHO,
            legit_block,
            ins::REFUSED_REPLAYED,
        ),
        (
            "a new instruction under a sequence number already spent",
            SHO,
            signed(&pki, "sho", &delete(SHO, PCID, block_seq)),
            ins::REFUSED_REPLAYED,
        ),
        (
            "the SHO's own instruction numbered so high no number would be left after it",
            SHO,
            signed(&pki, "sho", &delete(SHO, PCID, u64::MAX)),
            ins::REFUSED_SEQ_RANGE,
        ),
        (
            "the SHO's signature over a payload with a field the form does not have",
            SHO,
            extra,
            ins::REFUSED_MALFORMED,
        ),
    ];
    let ids: Vec<String> = cases
        .iter()
        .map(|(_, sho_id, body, _)| block(inject(db, sho_id, body.clone())))
        .collect();
    for ((what, _, _, reason), id) in cases.iter().zip(&ids) {
        let r = block(report_of(db, id));
        assert_eq!(
            (r.outcome.as_str(), r.reason.as_str()),
            (ins::REFUSED, *reason),
            "{what}: {r:?}"
        );
        assert_eq!(r.pcid, PCID, "{what}");
    }
    assert_eq!(
        block(p.device()),
        before,
        "a refused instruction changed the device"
    );
    let (ok, text) = p.attach();
    assert!(ok, "the MCIM still authenticates: {text}");
    let before = block(p.device());

    // Over the wire: the second SHO through the first SHO, and for a device where it has
    // no MCIM; the first SHO's operator for a device it never provisioned.
    let through_first = block(async {
        ShoServiceClient::new(
            p.roles
                .party_channel(Role::Sho, "sho2.mcim.local", Role::Sho)
                .await,
        )
        .instruct_device(sho::InstructDeviceRequest {
            pcid: PCID.into(),
            action: sho::InstructionAction::Delete as i32,
        })
        .await
    });
    assert_eq!(through_first.unwrap_err().code(), Code::PermissionDenied);
    let (ok, _, text) = p.instruct("sho2", "delete", 5);
    assert!(!ok && text.contains("no MCIM"), "{text}");
    let other = block(async {
        ShoServiceClient::new(p.roles.channel(Role::Sho, Role::Sho).await)
            .instruct_device(sho::InstructDeviceRequest {
                pcid: "001010000000062".into(),
                action: sho::InstructionAction::Block as i32,
            })
            .await
    });
    assert_eq!(other.unwrap_err().code(), Code::FailedPrecondition);
    assert_eq!(
        block(p.device()),
        before,
        "a refused instruction changed the device"
    );
    // The SHO's own next instruction still works, numbered after its last.
    let r = p.done("discover");
    assert!(r["seq"].as_u64().unwrap() > unblock_seq, "{r}");
}

/// tred killed with SIGKILL again and again while a queue of instructions runs: every
/// instruction is carried out once (one audit entry each) and reported once, and the registry
/// never ends in lockdown (a commit cut between the TRE's counter and its anchor is completed
/// at the next start).
#[test]
fn tred_killed_while_instructions_run_carries_out_and_reports_each_once() {
    let mut p = provisioned(false);
    let imsi = p.imsi.clone();
    // The committed lifecycle transitions of the MCIM: the audit record also keeps the entry of
    // a transaction a kill cut before its commit point, which tred names at its next start
    // ("start-up check: audit entries A..=B belong to a transaction that did not commit").
    let entries = |p: &Provisioned| {
        let uncommitted: Vec<u64> = p
            .tred
            .log()
            .lines()
            .filter_map(|l| {
                let r = l.split("audit entries ").nth(1)?;
                let r = r
                    .split(" belong to a transaction that did not commit")
                    .next()?;
                let (a, b) = r.split_once("..=")?;
                Some(a.parse::<u64>().ok()?..=b.parse::<u64>().ok()?)
            })
            .flatten()
            .collect();
        block(async {
            let mut c = p.tred.client().await;
            c.get_audit_log(tre::GetAuditLogRequest::default())
                .await
                .unwrap()
                .into_inner()
                .entries
                .iter()
                .filter(|e| e.mcim_id == imsi && e.event == "lifecycle")
                .filter(|e| !uncommitted.contains(&e.seq))
                .count()
        })
    };
    let before = entries(&p);
    assert!(p.tred.stop());
    let ids: Vec<String> = (0..8)
        .map(|n| {
            let action = if n % 2 == 0 { "block" } else { "unblock" };
            let (ok, r, text) = p.instruct("sho", action, 0);
            assert!(ok, "{text}");
            r["instruction_id"].as_str().unwrap().to_string()
        })
        .collect();
    p.tred.restart();
    for ms in [10, 40, 70, 100, 130, 160, 200, 250] {
        std::thread::sleep(Duration::from_millis(ms));
        p.tred.kill_and_restart();
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    for id in &ids {
        let r = p.reported(id, deadline);
        assert_eq!(r["outcome"], "done", "{id}: {r:#}\n{}", p.tred.log());
    }
    let status = block(async {
        p.tred
            .client()
            .await
            .get_status(tre::GetStatusRequest::default())
            .await
            .unwrap()
            .into_inner()
    });
    assert!(!status.lockdown, "{status:?}");
    assert_eq!(
        block(p.state_of(&imsi)),
        Some(McimState::Activated as i32),
        "the last instruction was an unblock"
    );
    assert_eq!(entries(&p) - before, 8, "each instruction carried out once");
}
