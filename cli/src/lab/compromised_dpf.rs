//! `mcimctl lab run --dpf-serves ...`: a compromised Registration Operator. The RO carries the
//! SHO's package to the device (5.1.3.6.2 steps 11-12) but is not trusted with it: the package
//! is signed by the SHO, names the device and the registration it answers (annex x.2.3), and
//! its secrets are wrapped for that device's TRE. This module makes the lab's RO misbehave the
//! way an attacker in control of its database would: a trigger swaps the package the SHO
//! authorises for another genuine, SHO-signed package. The device must refuse it at step 13,
//! report the failure, and install nothing.

use std::path::Path;

use clap::ValueEnum;
use mcim_core::aka::{K, Opc};
use mcim_core::package::{self, McimPackagePayload, McimPolicy, TreTarget, UsimData};
use rand::Rng;

use crate::error::CliError;

fn fail(what: impl std::fmt::Display) -> CliError {
    CliError::Input(format!("compromised DPF: {what}"))
}

/// What the compromised DPF serves instead of the SHO's package.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Served {
    /// A package the SHO issued this device for an earlier registration (another
    /// registration id and nonce): a replay.
    ReplayedPackage,
    /// A package the SHO issued for another device (another PCID).
    OtherDevicePackage,
}

/// The device the lab's other device is.
const OTHER_PCID: &str = "001010000000002";

/// A genuine package from the SHO's own key and certificate in `pki` that is not this
/// device's for this registration. Its secrets are wrapped for this very device's TRE, so
/// only the package's binding (device, registration, nonce) can stop it.
pub fn forge(
    what: Served,
    pki: &Path,
    pcid: &str,
    sho_plmn: &str,
    target: TreTarget,
    storage_public: &[u8],
) -> Result<Vec<u8>, CliError> {
    let key = mcim_pki::dev::signing_key(pki, "sho").map_err(fail)?;
    let cert = mcim_pki::dev::ca_der(pki, "sho").map_err(fail)?;
    let sho_id = mcim_pki::party::caller_from_cert(&cert).map_err(fail)?.name;
    let mut rng = rand::rng();
    let mut kb = zeroize::Zeroizing::new([0u8; 16]);
    let mut ob = zeroize::Zeroizing::new([0u8; 16]);
    rng.fill_bytes(&mut kb[..]);
    rng.fill_bytes(&mut ob[..]);
    let (wk, wopc) = package::wrap_secrets(
        target,
        storage_public,
        &K::new(*kb),
        &Opc::new(*ob),
        &mut rng,
    )
    .map_err(fail)?;
    let mut nonce = [0u8; 32];
    rng.fill_bytes(&mut nonce);
    let (for_pcid, imsi) = match what {
        Served::ReplayedPackage => (pcid, format!("{sho_plmn}{:0>10}", 9_999_999_999u64)),
        Served::OtherDevicePackage => (OTHER_PCID, format!("{sho_plmn}{:0>10}", 9_999_999_998u64)),
    };
    let (mcc, mnc) = sho_plmn.split_at(3);
    let payload = McimPackagePayload {
        domain: package::DOMAIN.into(),
        registration_id: format!("earlier-{}", hex::encode(&nonce[..8])),
        registration_nonce: hex::encode(nonce),
        pcid: for_pcid.into(),
        imsi,
        sho_id,
        algorithm: "milenage".into(),
        milenage_c: Vec::new(),
        milenage_r: Vec::new(),
        wrapped_k: hex::encode(wk),
        wrapped_opc: hex::encode(wopc),
        usim: UsimData {
            home_plmn: format!("{mcc}-{mnc}"),
            service_provider_name: "mcim lab SHO".into(),
            forbidden_plmns: Vec::new(),
            hpplmn_period: None,
        },
        policy: McimPolicy {
            use_for_connectivity: true,
            opc_bound_to_pcrs: false,
        },
        issued_at: 0,
    };
    package::seal(&key, &payload, &cert).map_err(fail)
}

/// Installs the swap in the roles' database `db` (its URL) with the test-support binary
/// `mcim-lab-compromised-ro` (beside this `mcimctl`): whenever the DPF stores the package the
/// SHO authorised (step 11), the stored package becomes `forged`.
pub fn install(db: &str, forged: &[u8], work: &Path) -> Result<(), CliError> {
    let file = work.join("compromised-dpf.package");
    std::fs::write(&file, forged).map_err(fail)?;
    let out = std::process::Command::new(super::sibling("mcim-lab-compromised-ro"))
        // In the environment, not on the command line (a URL's password stays out of ps).
        .env("MCIM_DB", db)
        .arg("--package")
        .arg(&file)
        .output()
        .map_err(|e| {
            fail(format!(
                "mcim-lab-compromised-ro: {e} (build it with cargo build --bins)"
            ))
        })?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}
