//! Renewal of the PCID's initial connectivity credential (TR 33.812 5.1.3.7.4.3) end to end:
//! each test starts its own `mcim-roles all`, its own TRE and `tred`, supplies the device with
//! a PCID credential of a few seconds' lifetime (which the device keeps with the credential),
//! provisions it over non-3GPP access (the PCID is not used), lets the credential expire, and
//! then the owner reverts the device to the pristine state for a second SHO, which needs the
//! PCID again: an attach with the PCID (AKA in the TRE against the ICF's vectors).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mcim_e2e::{CliDevice, db_rows, db_writer, mcimctl, mcimctl_ok, output_text};

const PCID: &str = "001010000000071";

fn now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// The device with a PCID credential of `lifetime` seconds, provisioned at the first SHO over
/// non-3GPP access, contracted at the second; returns once the credential has expired (as the
/// device's registry says).
fn expired(token: bool, lifetime: u64) -> CliDevice {
    let d = CliDevice::provisioned(
        token,
        PCID,
        &["--pcid-lifetime", &lifetime.to_string()],
        "non-3gpp",
    );
    let expires = pcid_expiry(&d);
    assert!(
        expires > 0 && expires <= now() + i64::try_from(lifetime).unwrap() + 1,
        "the device keeps the lifetime the supplier gave: {expires}"
    );
    d.contract("sho2");
    while now() <= expires {
        std::thread::sleep(Duration::from_millis(200));
    }
    d
}

/// When the device's PCID credential expires, as its local API says.
fn pcid_expiry(d: &CliDevice) -> i64 {
    let (mcims, _) = block(d.registry());
    mcims
        .iter()
        .find(|m| m.mcim_id == PCID)
        .and_then(|m| m.expires_at.as_ref())
        .map_or(0, |t| t.seconds)
}

fn revert(d: &CliDevice) -> std::process::Output {
    mcimctl(&[
        "device",
        "--socket",
        &d.socket(),
        "reprovision",
        "--sho-id",
        "sho2.mcim.local",
        "--pristine",
        "--access",
        "3gpp",
    ])
}

/// Expired, renewed before the change: the change then attaches with the PCID (the ICF, which
/// refuses vectors for the expired credential, authenticates the renewed one) and completes at
/// the second SHO. The device keeps the new lifetime; the ICF switched on the device's
/// confirmation; nothing of the renewal is left pending.
fn renewed_before_a_change(token: bool) {
    let d = expired(token, 3);
    let out = revert(&d);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}\n{}", d.tred.log());
    assert!(!text.contains("FAILED"), "{text}");
    assert!(
        text.contains("RES from the TRE matched the ICF's XRES") || text.contains("PCID"),
        "{text}"
    );
    let expires = pcid_expiry(&d);
    assert!(
        expires > now() + 300 * 24 * 3600,
        "the renewed credential lasts a year: {expires}"
    );
    assert!(
        !d.tred.state_dir().join("pcid-renewal.json").exists(),
        "no renewal left pending"
    );
    let db = &d.roles;
    let icf = block(db_rows(
        &db,
        &format!(
            "SELECT CAST(r.confirmed AS TEXT), CAST(p.expires_at AS TEXT) FROM icf_renewal r \
             JOIN icf_pcid p ON p.pcid = r.pcid WHERE r.pcid = '{PCID}'"
        ),
    ));
    assert_eq!(icf.len(), 1, "{icf:?}");
    assert_eq!(icf[0][0], "1", "the ICF took the confirmation");
    assert_eq!(
        icf[0][1],
        expires.to_string(),
        "the ICF and the device agree"
    );
    // The pending credential became the PCID's: no second one is left at the ICF's AuC.
    let auc = block(db_rows(
        &db,
        &format!("SELECT id FROM auc_subscriber WHERE owner = 'icf' AND id LIKE '%{PCID}'"),
    ));
    assert_eq!(auc, vec![vec![PCID.to_string()]]);
    // The second SHO provided the MCIM in use now.
    let (mcims, _) = block(d.registry());
    assert!(
        mcims
            .iter()
            .any(|m| m.sho_id == "sho2.mcim.local" && m.connectivity),
        "{mcims:?}"
    );
}

#[test]
fn an_expired_pcid_credential_on_a_tpm_is_renewed_before_a_change_and_the_new_one_authenticates() {
    renewed_before_a_change(false);
}

#[test]
fn an_expired_pcid_credential_on_a_token_is_renewed_before_a_change_and_the_new_one_authenticates()
{
    renewed_before_a_change(true);
}

/// Expired, and the ICF no longer holds the PCID (revoked): the change is refused with the
/// reason before anything changed: the device's registry and audit log, its saved run, and
/// every role's database are as before; no renewal is left pending.
#[test]
fn an_expired_pcid_credential_that_cannot_be_renewed_stops_the_change_and_changes_nothing() {
    let d = expired(false, 3);
    let db = &d.roles;
    block(async {
        let mut c = db_writer(&db).await;
        sqlx::query("DELETE FROM icf_pcid WHERE pcid = $1")
            .bind(PCID)
            .execute(&mut c)
            .await
            .unwrap();
    });
    let before = block(d.registry());
    let run_before = std::fs::read(d.tred.state_dir().join("provisioning.json")).unwrap();
    let roles_before = block(d.roles.snapshot());
    let out = revert(&d);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("expired") && text.contains("could not be renewed"),
        "the reason: {text}"
    );
    assert_eq!(block(d.registry()), before, "the device changed");
    assert_eq!(
        std::fs::read(d.tred.state_dir().join("provisioning.json")).unwrap(),
        run_before,
        "a run started"
    );
    assert_eq!(block(d.roles.snapshot()), roles_before, "a role changed");
    assert!(!d.tred.state_dir().join("pcid-renewal.json").exists());
}

/// The RO pushes a renewal (`mcimctl ro offer-renewal`): the device, between runs, renews at
/// once although its credential is far from expiring, and the ICF switches on its
/// confirmation. A push for a PCID the ICF does not hold is refused.
#[test]
fn a_renewal_the_ro_pushes_is_done_by_the_device_between_runs() {
    let d = CliDevice::provisioned(
        false,
        PCID,
        &["--pcid-lifetime", &(100 * 24 * 3600).to_string()],
        "non-3gpp",
    );
    let before = pcid_expiry(&d);
    let pki = d.roles.pki.to_str().unwrap().to_string();
    let ro = d.roles.url("ro");
    mcimctl_ok(&[
        "ro",
        "offer-renewal",
        "--ro-url",
        &ro,
        "--pki",
        &pki,
        "--pcid",
        PCID,
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pcid_expiry(&d) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "not renewed: {}",
            d.tred.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = pcid_expiry(&d);
    assert!(after > now() + 300 * 24 * 3600, "{after}");
    let icf = block(db_rows(
        &d.roles,
        &format!("SELECT CAST(expires_at AS TEXT) FROM icf_pcid WHERE pcid = '{PCID}'"),
    ));
    assert_eq!(icf, vec![vec![after.to_string()]], "the ICF switched");
    assert!(!d.tred.state_dir().join("pcid-renewal.json").exists());
    let unknown = mcimctl(&[
        "ro",
        "offer-renewal",
        "--ro-url",
        &ro,
        "--pki",
        &pki,
        "--pcid",
        "001010000000079",
    ]);
    assert!(!unknown.status.success());
    assert!(
        output_text(&unknown).contains("no active credential"),
        "{}",
        output_text(&unknown)
    );
}

/// Someone who can use the device's TLS identity outside tred (here: a software certificate
/// for the PCID under the supplier root) asks for a renewal wrapped to a storage key of its
/// own, or for K as sealed data: refused, and the ICF keeps nothing. The device's own renewal
/// still works afterwards.
#[test]
fn a_renewal_is_wrapped_only_to_the_storage_key_the_supplier_certified_and_never_downgraded() {
    use mcim_proto::mcim::common::v1 as common;
    use mcim_proto::mcim::ro::v1 as ro;
    use mcim_proto::mcim::ro::v1::icf_service_client::IcfServiceClient;
    use mcim_roles::authz::Role;
    let d = CliDevice::provisioned(false, PCID, &[], "non-3gpp");
    let params = block(async {
        d.tred
            .client()
            .await
            .get_device_parameters(mcim_proto::mcim::tre::v1::GetDeviceParametersRequest {})
            .await
            .unwrap()
            .into_inner()
    });
    // A P-256 key of the attacker's (a TRE kind it can unwrap for itself).
    let own_spki = {
        use p256::pkcs8::EncodePublicKey;
        p256::ecdsa::SigningKey::from_slice(&[9u8; 32])
            .unwrap()
            .verifying_key()
            .to_public_key_der()
            .unwrap()
            .as_bytes()
            .to_vec()
    };
    let before = block(d.roles.snapshot());
    let asked = |tre_kind: common::TreKind,
                 storage_public: Vec<u8>,
                 aka: common::AkaExecution,
                 platform_credential: Vec<Vec<u8>>| {
        block(async {
            IcfServiceClient::new(d.roles.device_channel(PCID, Role::Ro).await)
                .renew_initial_credentials(ro::RenewInitialCredentialsRequest {
                    pcid: PCID.into(),
                    tre_kind: tre_kind as i32,
                    storage_public,
                    aka_execution: aka as i32,
                    nonce: vec![0x11; 16],
                    platform_credential,
                })
                .await
                .map(|_| ())
                .unwrap_err()
                .code()
        })
    };
    use tonic::Code;
    assert_eq!(
        asked(
            common::TreKind::Pkcs11,
            own_spki.clone(),
            common::AkaExecution::InTre,
            params.platform_credential.clone()
        ),
        Code::PermissionDenied,
        "the attacker's own storage key"
    );
    assert_eq!(
        asked(
            common::TreKind::Pkcs11,
            own_spki,
            common::AkaExecution::InTre,
            Vec::new()
        ),
        Code::PermissionDenied,
        "no platform credential"
    );
    assert_eq!(
        asked(
            common::TreKind::Tpm2,
            params.storage_public.clone(),
            common::AkaExecution::UnsealedInHost,
            params.platform_credential.clone()
        ),
        Code::FailedPrecondition,
        "K downgraded to sealed data"
    );
    assert_eq!(block(d.roles.snapshot()), before, "the ICF kept something");
    let pki = d.roles.pki.to_str().unwrap().to_string();
    let expires = pcid_expiry(&d);
    mcimctl_ok(&[
        "ro",
        "offer-renewal",
        "--ro-url",
        &d.roles.url("ro"),
        "--pki",
        &pki,
        "--pcid",
        PCID,
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pcid_expiry(&d) == expires {
        assert!(std::time::Instant::now() < deadline, "{}", d.tred.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sets the PCID's `active` flag at the ICF (0: it awaits activation and gets no vectors).
fn set_pcid_active(d: &CliDevice, active: bool) {
    let db = &d.roles;
    block(async {
        let mut c = db_writer(&db).await;
        sqlx::query("UPDATE icf_pcid SET active = $1 WHERE pcid = $2")
            .bind(i64::from(active))
            .bind(PCID)
            .execute(&mut c)
            .await
            .unwrap();
    });
}

/// A revert to the pristine state (5.1.3.7.4.3) that fails at the PCID attach, after it
/// discarded the old MCIM: the device has no MCIM to connect with, an initial provisioning
/// (which would go to the old SHO) is refused with what to do, and the same revert tried
/// again completes at the new SHO; the old SHO gets its discard notice.
#[test]
fn a_revert_to_the_pristine_state_that_failed_after_its_discard_is_tried_again_and_completes() {
    let d = CliDevice::provisioned(false, PCID, &[], "non-3gpp");
    d.contract("sho2");
    set_pcid_active(&d, false);
    let out = revert(&d);
    assert!(!out.status.success(), "{}", output_text(&out));
    let (mcims, _) = block(d.registry());
    assert!(
        !mcims.iter().any(|m| m.mcim_id == d.imsi),
        "the old MCIM was discarded at step 3: {mcims:?}"
    );
    assert!(!mcims.iter().any(|m| m.connectivity), "{mcims:?}");
    let again = mcimctl(&["device", "--socket", &d.socket(), "provision"]);
    assert!(!again.status.success());
    assert!(
        output_text(&again).contains("reprovision --pristine --sho-id sho2.mcim.local"),
        "{}",
        output_text(&again)
    );
    set_pcid_active(&d, true);
    let out = revert(&d);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}\n{}", d.tred.log());
    let (mcims, _) = block(d.registry());
    assert!(
        mcims
            .iter()
            .any(|m| m.sho_id == "sho2.mcim.local" && m.connectivity),
        "{mcims:?}"
    );
    // The old SHO holds the device's notice for the old IMSI.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rows = block(db_rows(&d.roles, "SELECT imsi FROM sho_discard"));
        if rows == vec![vec![d.imsi.clone()]] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{rows:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
