//! The MCIM package (annex x.2.3, the "M2MSIMMobj"; 5.1.3.6.2 steps 11-13): what the SHO builds
//! for one device after a positive validation and the device installs into its TRE. A
//! COSE_Sign1 by the SHO ([`crate::signed`]) whose payload names the device (PCID), the
//! registration and its nonce, the IMSI, the algorithm and its constants, USIM data and policy,
//! and carries K and OPc wrapped for that device's TRE only (TPM duplication blobs or the
//! PKCS#11 wrap). The device accepts a package only for itself and for the registration it is
//! in, and a TRE installs an IMSI once: a replayed or redirected package changes nothing.

use p256::ecdsa::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::signed::{self, SignedError};

/// The payload's domain string.
pub const DOMAIN: &str = "mcim-package-v1";

/// USIM data that travels with the credential (TS 31.102 files, the few the lab uses).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsimData {
    /// EF_HPLMN: the SHO's PLMN, "MCC-MNC".
    pub home_plmn: String,
    /// EF_SPN: the service provider name (empty: the SHO's id).
    pub service_provider_name: String,
    /// EF_FPLMN: forbidden PLMNs, "MCC-MNC" each (TS 31.102 4.2.16; the card keeps 4).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forbidden_plmns: Vec<String>,
    /// EF_HPPLMN: the higher-priority PLMN search period in steps of 6 minutes (TS 31.102
    /// 4.2.6); none: 5 (30 minutes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hpplmn_period: Option<u8>,
}

/// What the SHO allows the device to do with this MCIM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct McimPolicy {
    /// Activate it and use it for connectivity once installed.
    pub use_for_connectivity: bool,
    /// OPc is bound to the PCR values the PVA validated (TPM2_PolicyPCR).
    pub opc_bound_to_pcrs: bool,
}

/// The signed content of a package.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct McimPackagePayload {
    /// [`DOMAIN`].
    pub domain: String,
    /// The RO's registration this package answers (5.1.3.6.2 step 7).
    pub registration_id: String,
    /// The registration nonce (annex x.2.3), hex.
    pub registration_nonce: String,
    /// The device it is for.
    pub pcid: String,
    /// The operational IMSI.
    pub imsi: String,
    /// The SHO that issued it.
    pub sho_id: String,
    /// "milenage".
    pub algorithm: String,
    /// MILENAGE c1..c5, hex; empty for the TS 35.206 defaults.
    pub milenage_c: Vec<String>,
    /// MILENAGE r1..r5; empty for the defaults.
    pub milenage_r: Vec<u32>,
    /// K wrapped for the device's TRE, hex.
    pub wrapped_k: String,
    /// OPc wrapped for the device's TRE, hex.
    pub wrapped_opc: String,
    /// USIM data.
    pub usim: UsimData,
    /// Policy.
    pub policy: McimPolicy,
    /// Seconds since the epoch.
    pub issued_at: u64,
}

/// Why a device refuses a package. Nothing is installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackageError {
    /// Envelope or signature.
    #[error("MCIM package: {0}")]
    Signed(#[from] SignedError),
    /// Not a package.
    #[error("MCIM package: wrong domain {0:?}")]
    Domain(String),
    /// For another device.
    #[error("the MCIM package is for device {0}, not this one")]
    OtherDevice(String),
    /// For another registration (an old package replayed, or a mix-up).
    #[error("the MCIM package belongs to another registration (nonce or id differs)")]
    OtherRegistration,
    /// Algorithm this TRE does not run.
    #[error("the MCIM package's algorithm {0:?} is not supported")]
    Algorithm(String),
    /// MILENAGE constants that are not five c of 16 octets and five r below 128 (or none).
    #[error("the MCIM package's MILENAGE constants: {0}")]
    Constants(String),
}

impl McimPackagePayload {
    /// The MILENAGE constants (TS 35.206 4.1) the package carries: five c (hex, 16 octets
    /// each) and five r, or none for the defaults.
    pub fn constants(&self) -> Result<crate::aka::Constants, PackageError> {
        let bad = |w: String| PackageError::Constants(w);
        match (self.milenage_c.len(), self.milenage_r.len()) {
            (0, 0) => Ok(crate::aka::Constants::default()),
            (5, 5) => {
                let mut c = [[0u8; 16]; 5];
                for (out, v) in c.iter_mut().zip(&self.milenage_c) {
                    let v = hex::decode(v).map_err(|e| bad(format!("c: {e}")))?;
                    *out = v
                        .as_slice()
                        .try_into()
                        .map_err(|_| bad(format!("c is {} octets, not 16", v.len())))?;
                }
                let mut r = [0u32; 5];
                r.copy_from_slice(&self.milenage_r);
                crate::aka::Constants::new(c, r).map_err(|e| bad(e.to_string()))
            }
            _ => Err(bad("give all five c and r values, or none".into())),
        }
    }
}

/// Signs a package (the SHO's side); `cert` is the SHO's certificate (DER) for the receiver.
pub fn seal<K: crate::es256::Es256Key + ?Sized>(
    key: &K,
    payload: &McimPackagePayload,
    cert: &[u8],
) -> Result<Vec<u8>, PackageError> {
    Ok(signed::sign(key, payload, Some(cert))?)
}

/// Verifies a package with the SHO's key and checks it is for `pcid` in the registration
/// `(registration_id, nonce)`.
pub fn open(
    package: &[u8],
    sho: &VerifyingKey,
    pcid: &str,
    registration_id: &str,
    nonce: &[u8],
) -> Result<McimPackagePayload, PackageError> {
    let p: McimPackagePayload = signed::open(package, sho)?;
    if p.domain != DOMAIN {
        return Err(PackageError::Domain(p.domain));
    }
    if p.pcid != pcid {
        return Err(PackageError::OtherDevice(p.pcid));
    }
    let nonce_ok = subtle::ConstantTimeEq::ct_eq(
        p.registration_nonce.as_bytes(),
        hex::encode(nonce).as_bytes(),
    );
    if p.registration_id != registration_id || !bool::from(nonce_ok) {
        return Err(PackageError::OtherRegistration);
    }
    if p.algorithm != "milenage" {
        return Err(PackageError::Algorithm(p.algorithm));
    }
    Ok(p)
}

/// The kind of TRE a package is wrapped for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreTarget {
    /// A TPM 2.0: `storage_public` is its storage key's TPM2B_PUBLIC; K becomes an AES-128 key
    /// object (AKA in the TPM), OPc sealed data.
    Tpm2,
    /// A TPM 2.0 without TPM2_EncryptDecrypt2: K becomes sealed data too, unsealed into the
    /// daemon's zeroized memory for each authentication (`tred`'s fallback).
    Tpm2SealedK,
    /// A PKCS#11 token: `storage_public` is its unwrap key's SPKI (P-256: ECDH + AES-KWP;
    /// RSA-2048: OAEP).
    Pkcs11,
}

/// Why secrets could not be wrapped for a TRE.
#[derive(Debug, thiserror::Error)]
#[error("cannot wrap for this TRE: {0}")]
pub struct WrapError(String);

/// K and OPc wrapped for one TRE, in the transport encodings `tred` installs.
pub fn wrap_secrets<R: rand::CryptoRng + ?Sized>(
    target: TreTarget,
    storage_public: &[u8],
    k: &crate::aka::K,
    opc: &crate::aka::Opc,
    rng: &mut R,
) -> Result<(Vec<u8>, Vec<u8>), WrapError> {
    use crate::token_wrap::{is_rsa_spki, wrap_for_token, wrap_for_token_rsa};
    use crate::tpm::import::{ObjectPolicy, wrap_aes128_key, wrap_sealed_data};
    let e = |x: &dyn std::fmt::Display| WrapError(x.to_string());
    match target {
        TreTarget::Tpm2 | TreTarget::Tpm2SealedK => {
            let parent =
                crate::tpm::public::EccPublic::from_tpm2b(storage_public).map_err(|x| e(&x))?;
            let kb = if target == TreTarget::Tpm2SealedK {
                wrap_sealed_data(&parent, k.expose(), ObjectPolicy::default(), rng)
            } else {
                wrap_aes128_key(&parent, k, ObjectPolicy::default(), rng)
            }
            .map_err(|x| e(&x))?;
            let ob = wrap_sealed_data(&parent, opc.expose(), ObjectPolicy::default(), rng)
                .map_err(|x| e(&x))?;
            Ok((
                kb.to_bytes().map_err(|x| e(&x))?,
                ob.to_bytes().map_err(|x| e(&x))?,
            ))
        }
        TreTarget::Pkcs11 if is_rsa_spki(storage_public) => Ok((
            wrap_for_token_rsa(storage_public, k.expose(), rng)
                .map_err(|x| e(&x))?
                .0,
            wrap_for_token_rsa(storage_public, opc.expose(), rng)
                .map_err(|x| e(&x))?
                .0,
        )),
        TreTarget::Pkcs11 => Ok((
            wrap_for_token(storage_public, k.expose())
                .map_err(|x| e(&x))?
                .to_bytes(),
            wrap_for_token(storage_public, opc.expose())
                .map_err(|x| e(&x))?
                .to_bytes(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::elliptic_curve::Generate;

    fn payload() -> McimPackagePayload {
        McimPackagePayload {
            domain: DOMAIN.into(),
            registration_id: "r1".into(),
            registration_nonce: hex::encode([7u8; 32]),
            pcid: "001010000000001".into(),
            imsi: "001020000000001".into(),
            sho_id: "sho1".into(),
            algorithm: "milenage".into(),
            milenage_c: Vec::new(),
            milenage_r: Vec::new(),
            wrapped_k: "00".into(),
            wrapped_opc: "00".into(),
            usim: UsimData {
                home_plmn: "001-02".into(),
                service_provider_name: "lab".into(),
                forbidden_plmns: Vec::new(),
                hpplmn_period: None,
            },
            policy: McimPolicy {
                use_for_connectivity: true,
                opc_bound_to_pcrs: false,
            },
            issued_at: 1,
        }
    }

    #[test]
    fn a_package_opens_only_for_its_device_and_registration() {
        let key = SigningKey::generate_from_rng(&mut rand::rng());
        let vk = VerifyingKey::from(&key);
        let p = seal(&key, &payload(), b"c").unwrap_or_default();
        assert_eq!(
            open(&p, &vk, "001010000000001", "r1", &[7; 32]),
            Ok(payload())
        );
        assert_eq!(
            open(&p, &vk, "001010000000002", "r1", &[7; 32]),
            Err(PackageError::OtherDevice("001010000000001".into()))
        );
        assert_eq!(
            open(&p, &vk, "001010000000001", "r1", &[8; 32]),
            Err(PackageError::OtherRegistration)
        );
        assert_eq!(
            open(&p, &vk, "001010000000001", "r2", &[7; 32]),
            Err(PackageError::OtherRegistration)
        );
        let other = VerifyingKey::from(&SigningKey::generate_from_rng(&mut rand::rng()));
        assert_eq!(
            open(&p, &other, "001010000000001", "r1", &[7; 32]),
            Err(PackageError::Signed(SignedError::BadSignature))
        );
    }
}
