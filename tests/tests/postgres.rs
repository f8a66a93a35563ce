//! The roles on PostgreSQL (issue 16, item 1): the same code and the same migrations' meaning
//! as on SQLite, with a database the roles create, and any number of role processes on one
//! database. Each test has a PostgreSQL server: the one `MCIM_TEST_POSTGRES` names (ci/test.sh
//! starts a throwaway cluster), else a private cluster of its own (`mcim_e2e::Postgres`); a
//! machine without PostgreSQL fails these tests with what to install, never skips them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mcim_e2e::{
    Postgres, Roles, Swtpm, contract_device, db_rows, lab_run, mcimctl_ok, output_text, pg_dump,
    workspace_bin,
};

/// The lab, with a change of SHO, on PostgreSQL: every step passes; the roles created the
/// database and the second SHO's beside it (`NAME-sho2`), and the rows are there.
#[test]
fn the_lab_provisions_and_changes_sho_on_postgresql() {
    let pg = Postgres::start();
    let db = pg.fresh_database();
    let (ok, r, stderr) = lab_run(&["--flow", "change-sho", "--db", &db]);
    assert!(ok, "{stderr}\n{r:#}");
    assert_eq!(r["operational_attach"]["ok"], true, "{r:#}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let roles = rt.block_on(pg_dump(&db));
    let sho2 = rt.block_on(pg_dump(&format!("{db}-sho2")));
    // The first SHO's subscription and the discard it acknowledged (5.1.3.7.4.2 step 10); the
    // second SHO's subscription; the RO's two registrations, both installed.
    assert_eq!(roles["sho_subscription"].split(';').count(), 1, "{roles:?}");
    assert_eq!(roles["sho_discard"].split(';').count(), 1, "{roles:?}");
    assert_eq!(sho2["sho_subscription"].split(';').count(), 1, "{sho2:?}");
    let installed = rt.block_on(db_rows(
        &Db(db.clone()),
        "SELECT sho_id FROM ro_registration WHERE state = 'installed' ORDER BY made",
    ));
    assert_eq!(
        installed,
        vec![
            vec!["sho.mcim.local".to_string()],
            vec!["sho2.mcim.local".to_string()]
        ]
    );
}

/// A database URL, for `mcim_e2e::db_rows`.
struct Db(String);

impl mcim_e2e::DbAt for Db {
    fn db_url(&self) -> String {
        self.0.clone()
    }
}

/// Two `mcim-roles all` processes on one PostgreSQL database serve devices between them: each
/// device attaches at one process's VNO, registers at the other's RO and contracts at either
/// SHO, and ends provisioned with an IMSI of its own: grants, registrations, task queues,
/// validations and IMSI numbers live in the database, not in a process.
#[test]
fn two_role_processes_on_one_database_provision_devices_between_them() {
    let pg = Postgres::start();
    let db = pg.fresh_database();
    let work = tempfile::tempdir().unwrap();
    let a = Roles::start_on(work.path(), &db, &[]);
    let b = Roles::beside(&a);
    let mut devices = Vec::new();
    for (i, (ro, vno, sho)) in [(&a, &b, &b), (&b, &a, &a), (&a, &b, &a)]
        .into_iter()
        .enumerate()
    {
        let tpm = Swtpm::start();
        let (ro_url, vno_url) = (ro.url("ro"), vno.url("vno"));
        let tred = a.tred_with(
            &tpm.tcti(),
            &[("MCIM_RO_URL", &ro_url), ("MCIM_VNO_URL", &vno_url)],
        );
        let socket = tred.socket().to_str().unwrap().to_string();
        let pcid = format!("00101000000017{i}");
        mcim_e2e::supply_device(ro, &socket, &pcid, &[]);
        let imsi = contract_device(sho, work.path(), &socket, "sho");
        let out = mcimctl_ok(&[
            "device",
            "--socket",
            &socket,
            "provision",
            "--access",
            "3gpp",
        ]);
        assert!(!out.contains("FAILED"), "device {i}: {out}");
        // The operational attach with the new MCIM, at the VNO the device knows.
        let attach = mcimctl_ok(&["device", "--socket", &socket, "attach"]);
        assert!(
            attach.contains(&format!("attached with IMSI {imsi}")),
            "device {i}: {attach}"
        );
        devices.push((tpm, tred, imsi));
    }
    let imsis: std::collections::BTreeSet<&str> =
        devices.iter().map(|(_, _, i)| i.as_str()).collect();
    assert_eq!(imsis.len(), 3, "one IMSI each: {imsis:?}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let installed = rt.block_on(db_rows(
        &a,
        "SELECT COUNT(*) FROM ro_registration WHERE state = 'installed'",
    ));
    assert_eq!(installed, vec![vec!["3".to_string()]]);
}

/// A database URL of another engine, or a server that does not answer, stops the roles with a
/// clear error and a failing status, before they listen.
#[test]
fn a_bad_database_url_stops_the_roles_with_a_clear_error() {
    let work = tempfile::tempdir().unwrap();
    let pki = mcim_e2e::pki_init(work.path());
    let closed = mcim_e2e::free_ports(1);
    for (db, says) in [
        ("mysql://127.0.0.1/x".to_string(), "postgres://"),
        (
            format!("postgres://postgres@127.0.0.1:{closed}/x"),
            "database",
        ),
    ] {
        let out = std::process::Command::new(workspace_bin("mcim-roles"))
            .args(["pva", "--pki", pki.to_str().unwrap(), "--db", &db])
            .args(["--listen", "127.0.0.1:0"])
            .output()
            .unwrap();
        let text = output_text(&out);
        assert!(!out.status.success(), "{db}: {text}");
        assert!(text.contains(says), "{db}: {text}");
    }
}

/// A device given several addresses of the RO and of the VNO (replicas on one database, and an
/// address where nothing listens) provisions and attaches although one replica is killed
/// (SIGKILL) while it runs: its calls and its task stream fail over to the replica left, the
/// run completes once, and no MCIM is duplicated. (Each channel starts at an address drawn at
/// random, so a run meets the dead address or the killed replica with 8 chances in 9; the
/// outcome asserted is the same either way.)
#[test]
fn a_device_fails_over_to_another_replica_when_one_is_killed() {
    let pg = Postgres::start();
    let db = pg.fresh_database();
    let work = tempfile::tempdir().unwrap();
    let a = Roles::start_on(work.path(), &db, &[]);
    let mut b = Roles::beside(&a);
    let dead = format!("https://127.0.0.1:{}", mcim_e2e::free_ports(1));
    let ro = format!("{dead},{},{}", b.url("ro"), a.url("ro"));
    let vno = format!("{},{dead},{}", b.url("vno"), a.url("vno"));
    let tpm = Swtpm::start();
    let tred = a.tred_with(&tpm.tcti(), &[("MCIM_RO_URL", &ro), ("MCIM_VNO_URL", &vno)]);
    let socket = tred.socket().to_str().unwrap().to_string();
    mcim_e2e::supply_device(&a, &socket, "001010000000181", &[]);
    let imsi = contract_device(&a, work.path(), &socket, "sho");
    // The replica dies while the run is under way (its steps take a few seconds).
    let killer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(700));
        b.kill();
        b
    });
    let out = std::process::Command::new(workspace_bin("mcimctl"))
        .args([
            "device",
            "--socket",
            &socket,
            "provision",
            "--access",
            "3gpp",
        ])
        .output()
        .unwrap();
    let _b = killer.join().unwrap();
    let text = output_text(&out);
    assert!(out.status.success() && !text.contains("FAILED"), "{text}");
    let attach = mcimctl_ok(&["device", "--socket", &socket, "attach"]);
    assert!(
        attach.contains(&format!("attached with IMSI {imsi}")),
        "{attach}"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let installed = rt.block_on(db_rows(
        &a,
        "SELECT COUNT(*), COUNT(DISTINCT mcim_id) FROM ro_registration WHERE state = 'installed'",
    ));
    assert_eq!(installed, vec![vec!["1".to_string(), "1".to_string()]]);
    let subs = rt.block_on(db_rows(&a, "SELECT imsi FROM sho_subscription"));
    assert_eq!(subs, vec![vec![imsi]]);
}
