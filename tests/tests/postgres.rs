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

/// Two replicas of the roles, each told the other's ports: a device given several addresses of
/// the RO and of the VNO (both replicas, and an address where nothing listens) and contracted
/// at replica A's SHO provisions and attaches although A is killed (SIGKILL) while the run is
/// under way: its calls and its task stream fail over to B, B's SHO takes over A's
/// registration when A's lease lapses, the addresses the roles gave each other list both
/// replicas, and the run completes once, with one MCIM.
#[test]
fn a_device_fails_over_to_another_replica_when_one_is_killed() {
    let pg = Postgres::start();
    let db = pg.fresh_database();
    let work = tempfile::tempdir().unwrap();
    let mut replicas = Roles::start_replicas(work.path(), &db, 2);
    let b = replicas.pop().unwrap();
    let mut a = replicas.pop().unwrap();
    let dead = format!("https://127.0.0.1:{}", mcim_e2e::free_ports(1));
    let ro = format!("{dead},{},{}", a.url("ro"), b.url("ro"));
    let vno = format!("{},{dead},{}", a.url("vno"), b.url("vno"));
    let tpm = Swtpm::start();
    let tred = b.tred_with(&tpm.tcti(), &[("MCIM_RO_URL", &ro), ("MCIM_VNO_URL", &vno)]);
    let socket = tred.socket().to_str().unwrap().to_string();
    mcim_e2e::supply_device(&a, &socket, "001010000000181", &[]);
    let imsi = contract_device(&a, work.path(), &socket, "sho");
    // A dies once the device has registered at A's SHO (step 7): the validation that A's SHO
    // follows, the device's task stream and the rest of its calls must go on at B.
    let mut run = std::process::Command::new(workspace_bin("mcimctl"))
        .args([
            "device",
            "--socket",
            &socket,
            "provision",
            "--access",
            "3gpp",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(run.stdout.take().unwrap()));
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.trim_start().starts_with("step  7") {
            a.kill();
            break;
        }
    }
    assert!(
        seen.contains("step  7"),
        "the run never reached step 7:\n{seen}"
    );
    for line in lines {
        seen.push_str(&line.unwrap());
        seen.push('\n');
    }
    let out = run.wait_with_output().unwrap();
    let text = format!("{seen}{}", output_text(&out));
    assert!(out.status.success() && !text.contains("FAILED"), "{text}");
    attached_once(&b, &socket, &imsi);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let subs = rt.block_on(db_rows(
        &b,
        "SELECT imsi, sho_url FROM ro_subscription r JOIN sho_subscription s ON s.pcid = r.pcid",
    ));
    assert_eq!(subs.len(), 1, "{subs:?}");
    assert_eq!(subs[0][0], imsi);
    assert_eq!(
        subs[0][1].split(',').count(),
        2,
        "the SHO's address lists both replicas"
    );
}

/// The database server goes down in the middle of a device's run and comes back: the roles
/// answer UNAVAILABLE with a retry hint meanwhile (counted in their metrics), the device
/// waits and retries, and the run completes once, nothing lost.
#[test]
fn a_database_outage_mid_run_is_waited_out_and_nothing_is_lost() {
    // A cluster of this test's own: it is stopped and started.
    let pg = Postgres::private();
    let db = pg.fresh_database();
    let work = tempfile::tempdir().unwrap();
    let roles = Roles::start_on(work.path(), &db, &[]);
    let tpm = Swtpm::start();
    let tred = roles.tred(&tpm.tcti());
    let socket = tred.socket().to_str().unwrap().to_string();
    mcim_e2e::supply_device(&roles, &socket, "001010000000191", &[]);
    let imsi = contract_device(&roles, work.path(), &socket, "sho");
    pg.stop();
    let run = {
        let socket = socket.clone();
        std::thread::spawn(move || {
            std::process::Command::new(workspace_bin("mcimctl"))
                .args([
                    "device",
                    "--socket",
                    &socket,
                    "provision",
                    "--access",
                    "3gpp",
                ])
                .output()
                .unwrap()
        })
    };
    // Long enough for calls to be answered (the roles give up on the database after 5 s).
    std::thread::sleep(std::time::Duration::from_secs(8));
    let unavailable = |m: &str| {
        m.lines()
            .filter(|l| {
                l.starts_with("mcim_roles_grpc_server_calls_total")
                    && l.contains("code=\"UNAVAILABLE\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let during = unavailable(&roles.metrics());
    pg.start_again();
    let out = run.join().unwrap();
    let text = output_text(&out);
    assert!(out.status.success() && !text.contains("FAILED"), "{text}");
    assert!(
        during >= 1.0,
        "the roles said UNAVAILABLE while the database was down"
    );
    attached_once(&roles, &socket, &imsi);
}

/// The device behind `socket` attaches with `imsi`, and the roles' database holds exactly one
/// installed registration, with one MCIM.
fn attached_once(roles: &Roles, socket: &str, imsi: &str) {
    let attach = mcimctl_ok(&["device", "--socket", socket, "attach"]);
    assert!(
        attach.contains(&format!("attached with IMSI {imsi}")),
        "{attach}"
    );
    let installed = tokio::runtime::Runtime::new().unwrap().block_on(db_rows(
        roles,
        "SELECT COUNT(*), COUNT(DISTINCT mcim_id) FROM ro_registration WHERE state = 'installed'",
    ));
    assert_eq!(installed, vec![vec!["1".to_string(), "1".to_string()]]);
}

/// The roles reach PostgreSQL over TLS they verify (`sslmode=verify-full`, `sslrootcert` the
/// operator's CA) with a client certificate (`sslcert`, `sslkey`), on a server that admits
/// nothing else over TCP (`hostssl ... cert`): they serve, the server's own view
/// (`pg_stat_ssl`) shows every connection of theirs encrypted under that certificate, and the
/// lab provisions and changes SHO through it. Without TLS, with a server certificate the given
/// CA did not issue, or without a client certificate, the roles stop with a clear error before
/// they listen, and create no database.
#[test]
fn the_roles_reach_postgresql_over_verified_tls_with_a_client_certificate() {
    let pg = Postgres::private_tls();
    let tls = pg.tls.clone().unwrap();
    let work = tempfile::tempdir().unwrap();
    let pki = mcim_e2e::pki_init(work.path());
    let db = pg.fresh_database();
    let name = db.rsplit('/').next().unwrap().to_string();
    let admin = Db(format!("{}/postgres?{}", pg.server, tls.query(&tls.ca)));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let databases = || rt.block_on(db_rows(&admin, "SELECT datname::text FROM pg_database"));
    for (query, says) in [
        ("sslmode=disable".to_string(), "no encryption"),
        (tls.query(&tls.other_ca), "certificate"),
        (
            format!("sslmode=verify-full&sslrootcert={}", tls.ca.display()),
            "certificate",
        ),
    ] {
        let out = std::process::Command::new(workspace_bin("mcim-roles"))
            .args(["pva", "--pki", pki.to_str().unwrap()])
            .args(["--db", &format!("{db}?{query}")])
            .args(["--listen", "127.0.0.1:0"])
            .output()
            .unwrap();
        let text = output_text(&out);
        assert!(!out.status.success(), "{query}: {text}");
        assert!(text.contains(says), "{query}: {text}");
        assert!(
            !databases().iter().any(|r| r[0] == name),
            "{query}: a database was created"
        );
    }
    let url = format!("{db}?{}", tls.query(&tls.ca));
    {
        let roles = Roles::start_on(work.path(), &url, &[]);
        let seen = rt.block_on(db_rows(
            &admin,
            &format!(
                "SELECT CASE WHEN s.ssl THEN 'tls' ELSE 'plain' END, s.client_dn \
                 FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid \
                 WHERE a.datname = '{name}'"
            ),
        ));
        assert!(!seen.is_empty(), "the roles hold connections to {name}");
        let cn = x509_parser::pem::parse_x509_pem(&std::fs::read(&tls.client_cert).unwrap())
            .unwrap()
            .1
            .parse_x509()
            .unwrap()
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        for row in &seen {
            assert_eq!(
                row,
                &vec!["tls".to_string(), format!("/CN={cn}")],
                "{seen:?}"
            );
        }
        drop(roles);
    }
    let (ok, r, stderr) = lab_run(&["--flow", "change-sho", "--db", &url]);
    assert!(ok, "{stderr}\n{r:#}");
    assert_eq!(r["operational_attach"]["ok"], true, "{r:#}");
}
