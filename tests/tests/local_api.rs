//! `tred`'s local API knows its callers (TR 33.812 5.1.2.2, issue 12 item 6): real processes
//! run as other uids and gids (`setpriv`) call the real `tred` (swtpm) through `mcimctl`, and
//! each is admitted to exactly its class: owner, modem (AKA and attach, reading), audit
//! (reading), or nothing. Refusals are PERMISSION_DENIED, logged, and change nothing. And
//! `tred` tells systemd it is ready (`Type=notify`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use mcim_e2e::{Swtpm, Tred, output_text, workspace_bin};
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::tre::v1 as pb;

const OWNER: &str = "4101";
const MODEM: &str = "4102";
const AUDIT: &str = "4103";

/// `mcimctl device --socket S <args>` run as `uid`/`gid` with supplementary `groups`.
fn as_user(
    mcimctl: &std::path::Path,
    uid: u32,
    gid: u32,
    groups: &[u32],
    socket: &str,
    args: &[&str],
) -> std::process::Output {
    let groups = if groups.is_empty() {
        "--clear-groups".to_string()
    } else {
        format!(
            "--groups={}",
            groups
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg(groups)
        .arg(mcimctl)
        .args(["device", "--socket", socket])
        .args(args)
        .output()
        .expect("setpriv runs (util-linux)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_local_caller_gets_exactly_its_class_and_anyone_else_is_refused() {
    let tpm = Swtpm::start();
    let tred = Tred::start_with(
        &tpm.tcti(),
        &[
            ("MCIM_OWNER_GROUP", OWNER),
            ("MCIM_MODEM_GROUP", MODEM),
            ("MCIM_AUDIT_GROUP", AUDIT),
            ("MCIM_SOCKET_MODE", "0666"),
        ],
    );
    // Other users reach the socket (its directory) and run mcimctl (a copy they may read).
    let socket_path = tred.socket();
    let dir = socket_path.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = tempfile::tempdir().unwrap();
    std::fs::set_permissions(bin.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mcimctl = bin.path().join("mcimctl");
    std::fs::copy(workspace_bin("mcimctl"), &mcimctl).unwrap();
    std::fs::set_permissions(&mcimctl, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = socket_path.to_str().unwrap();
    // Root (the test) supplies the device: an owner.
    tred.client()
        .await
        .init_device(pb::InitDeviceRequest {
            identity: Some(common::DeviceIdentity {
                device_id: "LOCAL-1".into(),
                pcid: "001010000000041".into(),
                model: "m".into(),
            }),
        })
        .await
        .unwrap();
    let absent = "001019999999999";
    let zeros = "00000000000000000000000000000000";
    let status = ["status"];
    let aka = ["aka", absent, "--rand", zeros, "--autn", zeros];
    let delete = ["delete", absent];
    let denied = |o: &std::process::Output| output_text(o).contains("permission denied");
    let admitted = |o: &std::process::Output| !denied(o);

    let audit_before = tred
        .client()
        .await
        .get_audit_log(pb::GetAuditLogRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .len();
    // (uid, gid, supplementary groups): what each may do.
    let owner = (4001, 4101, vec![]);
    let modem = (4002, 4102, vec![]);
    let audit = (4003, 4103, vec![]);
    let modem_by_supplementary = (4005, 4105, vec![4102]);
    let nobody = (4004, 4104, vec![4106]);
    for (who, (uid, gid, groups), may_read, may_aka, may_delete) in [
        ("owner", &owner, true, true, true),
        ("modem", &modem, true, true, false),
        (
            "modem (supplementary)",
            &modem_by_supplementary,
            true,
            true,
            false,
        ),
        ("audit", &audit, true, false, false),
        ("nobody", &nobody, false, false, false),
    ] {
        let run = |args: &[&str]| as_user(&mcimctl, *uid, *gid, groups, socket, args);
        let s = run(&status);
        assert_eq!(admitted(&s), may_read, "{who} status: {}", output_text(&s));
        if may_read {
            assert!(s.status.success(), "{who} status: {}", output_text(&s));
        }
        let a = run(&aka);
        assert_eq!(admitted(&a), may_aka, "{who} aka: {}", output_text(&a));
        let d = run(&delete);
        assert_eq!(
            admitted(&d),
            may_delete,
            "{who} delete: {}",
            output_text(&d)
        );
        // Admitted or not, nothing existed to change: the refusal is the policy's alone.
        assert!(!d.status.success(), "{who} delete of an absent MCIM");
    }
    // Refusals are logged with the caller, and changed nothing in the registry's record.
    let log = tred.log();
    assert!(log.contains("local API: refused"), "{log}");
    assert!(log.contains("uid=4004"), "{log}");
    let audit_after = tred
        .client()
        .await
        .get_audit_log(pb::GetAuditLogRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .len();
    assert_eq!(
        audit_after, audit_before,
        "a refused call was audited as a change"
    );
}

#[test]
fn tred_tells_systemd_it_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let tpm = Swtpm::start();
    let _tred = Tred::start_with(&tpm.tcti(), &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
}
