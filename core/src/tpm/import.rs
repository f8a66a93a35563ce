//! TPM2 duplication blobs built in software (TPM 2.0 Part 1, 23.3 "Duplication", 24
//! "Protected Storage"; Part 3, 13.3 TPM2_Import), with an outer wrapper only.
//!
//! The SHO (or the CCIF for the initial credentials) builds an [`ImportBlob`] against the public
//! area of the device's storage key (TR 33.812 5.1.3.6.2 step 12: the MCIM is "encrypted for
//! the TRE"); only that TPM can import it, and the plaintext never leaves the TPM afterwards.
//!
//! Outer wrapper, for an ECC P-256 storage parent with nameAlg SHA-256 and AES-128-CFB:
//! 1. an ephemeral key pair (d_e, Q_eU); Z = x(d_e · Q_sV) (Part 1, C.6.1),
//! 2. seed = KDFe(SHA-256, Z, "DUPLICATE", x(Q_eU), x(Q_sV), 256),
//! 3. symKey = KDFa(SHA-256, seed, "STORAGE", name, "", 128),
//!    HMACkey = KDFa(SHA-256, seed, "INTEGRITY", "", "", 256),
//! 4. encSensitive = AES-128-CFB(symKey, IV = 0, TPM2B_SENSITIVE),
//! 5. outerHMAC = HMAC-SHA-256(HMACkey, encSensitive || name),
//! 6. duplicate = TPM2B_DIGEST(outerHMAC) || encSensitive; inSymSeed = TPMS_ECC_POINT(Q_eU).
//!
//! The objects carry neither fixedTPM nor fixedParent (TPM2_Import refuses those) but an empty
//! authPolicy and adminWithPolicy: TPM2_Duplicate and TPM2_ObjectChangeAuth need a policy
//! session whose digest matches authPolicy, which an empty one never does, so an imported K can
//! be neither duplicated out again nor given a new auth value.

use aes::Aes128;
use cfb_mode::cipher::KeyIvInit;
use p256::ecdh::EphemeralSecret;
use p256::elliptic_curve::Generate;
use p256::elliptic_curve::sec1::ToSec1Point;
use rand::CryptoRng;
use zeroize::Zeroizing;

use super::kdf::{hmac_sha256, kdfa_sha256, kdfe_sha256, sha256};
use super::policy::{PcrSelection, policy_pcr};
use super::public::{EccPublic, aes128_key_public, attrs, name_sha256, sealed_data_public};
use super::wire::{Reader, Writer};
use super::{TpmStructError, alg};
use crate::aka::K;

/// MAX_SYM_DATA: the largest sealed data object (Part 2, 11.1.13 TPM2B_SENSITIVE_DATA).
pub const MAX_SEALED_DATA: usize = 128;

/// Everything TPM2_Import needs besides the parent handle (no inner wrapper, so
/// `encryptionKey` is empty and `symmetricAlg` is TPM_ALG_NULL). Holds no plaintext secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportBlob {
    /// objectPublic: the marshalled TPMT_PUBLIC.
    pub public: Vec<u8>,
    /// duplicate: the contents of the TPM2B_PRIVATE.
    pub duplicate: Vec<u8>,
    /// inSymSeed: the contents of the TPM2B_ENCRYPTED_SECRET (a TPMS_ECC_POINT).
    pub in_sym_seed: Vec<u8>,
    /// The PCRs of the object's TPM2_PolicyPCR, when it is bound to platform state: the
    /// device needs them to satisfy the policy (the digest alone does not name them).
    pub policy_pcrs: Option<PcrSelection>,
}

impl ImportBlob {
    /// The imported object's name (what the TPM will call it).
    pub fn name(&self) -> Vec<u8> {
        name_sha256(&self.public)
    }

    /// The public area as a TPM2B_PUBLIC (what `tpm2_import -u` reads).
    pub fn public_tpm2b(&self) -> Result<Vec<u8>, TpmStructError> {
        let mut w = Writer::new();
        w.tpm2b("TPM2B_PUBLIC", &self.public)?;
        Ok(w.finish())
    }

    /// One byte string for transport: TPM2B(public) || TPM2B(duplicate) || TPM2B(inSymSeed),
    /// then the policy's TPML_PCR_SELECTION when there is one.
    pub fn to_bytes(&self) -> Result<Vec<u8>, TpmStructError> {
        let mut w = Writer::new();
        w.tpm2b("objectPublic", &self.public)?
            .tpm2b("duplicate", &self.duplicate)?
            .tpm2b("inSymSeed", &self.in_sym_seed)?;
        if let Some(sel) = &self.policy_pcrs {
            w.bytes(&sel.marshal());
        }
        Ok(w.finish())
    }

    /// Parses [`ImportBlob::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Result<Self, TpmStructError> {
        let mut r = Reader::new("import blob", b);
        let public = r.tpm2b()?.to_vec();
        let duplicate = r.tpm2b()?.to_vec();
        let in_sym_seed = r.tpm2b()?.to_vec();
        let rest = r.rest();
        let policy_pcrs = if rest.is_empty() {
            None
        } else {
            let mut p = Reader::new("policy PCR selection", rest);
            let sel = PcrSelection::parse(&mut p)?;
            p.finish()?;
            Some(sel)
        };
        Ok(Self {
            public,
            duplicate,
            in_sym_seed,
            policy_pcrs,
        })
    }
}

/// How the imported object may be used.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectPolicy {
    /// A policy digest that every use must satisfy; when `None` the object is used with its
    /// empty auth value.
    pub auth_policy: Option<[u8; 32]>,
    /// The PCRs of the policy's TPM2_PolicyPCR, carried with the blob.
    pub pcrs: Option<PcrSelection>,
}

impl ObjectPolicy {
    /// Bound to platform state (TR 33.812 5.1.2.3: usable only on a platform in the state the
    /// PVA validated): every use needs TPM2_PolicyPCR over `selection` with these `values`
    /// (SHA-256 bank, in selection order).
    pub fn pcrs(selection: PcrSelection, values: &[[u8; 32]]) -> Result<Self, TpmStructError> {
        Ok(Self {
            auth_policy: Some(policy_pcr(&selection, values)?),
            pcrs: Some(selection),
        })
    }

    /// The object's attributes besides `usage`. Without a policy, the USER and ADMIN roles
    /// both use the authValue (empty as the SHO wraps it) and the object is subject to the
    /// TPM's dictionary-attack protection: the device makes the MCIM's PIN the authValue with
    /// TPM2_ObjectChangeAuth (TR 33.812 5.1.1.1 "PIN-protected"), so the TPM checks the PIN
    /// and counts wrong ones. Duplication stays impossible (the DUP role always needs a policy,
    /// and the authPolicy is empty). With a PCR policy every use needs the policy, ADMIN too,
    /// and the authValue is never used (NO_DA).
    fn attributes(&self, usage: u32) -> u32 {
        match self.auth_policy {
            Some(_) => usage | attrs::ADMIN_WITH_POLICY | attrs::NO_DA,
            None => usage | attrs::USER_WITH_AUTH,
        }
    }
}

/// Wraps K as an AES-128 key that may only encrypt (sign/encrypt set, decrypt clear: MILENAGE
/// needs E_K only), for `TPM2_EncryptDecrypt2` inside the TPM.
pub fn wrap_aes128_key<R: CryptoRng + ?Sized>(
    parent: &EccPublic,
    k: &K,
    policy: ObjectPolicy,
    rng: &mut R,
) -> Result<ImportBlob, TpmStructError> {
    let seed_value = obfuscation_value(rng);
    let unique = sha256(&[&seed_value[..], k.expose()]);
    let public = aes128_key_public(
        policy.attributes(attrs::SIGN_ENCRYPT),
        policy.auth_policy.as_ref(),
        &unique,
    );
    let sensitive = sensitive(alg::SYMCIPHER, &seed_value, k.expose())?;
    wrap(parent, public, &sensitive, policy.pcrs, rng)
}

/// Wraps up to 128 octets (OPc and other small secrets) as a sealed data object, read back on
/// the device with TPM2_Unseal.
pub fn wrap_sealed_data<R: CryptoRng + ?Sized>(
    parent: &EccPublic,
    data: &[u8],
    policy: ObjectPolicy,
    rng: &mut R,
) -> Result<ImportBlob, TpmStructError> {
    if data.is_empty() || data.len() > MAX_SEALED_DATA {
        return Err(TpmStructError::Invalid {
            what: "sealed data",
            detail: format!("{} octets (1..={MAX_SEALED_DATA})", data.len()),
        });
    }
    let seed_value = obfuscation_value(rng);
    let unique = sha256(&[&seed_value[..], data]);
    let public = sealed_data_public(policy.attributes(0), policy.auth_policy.as_ref(), &unique);
    let sensitive = sensitive(alg::KEYEDHASH, &seed_value, data)?;
    wrap(parent, public, &sensitive, policy.pcrs, rng)
}

/// seedValue: the obfuscation value that keeps `unique` from revealing the secret.
fn obfuscation_value<R: CryptoRng + ?Sized>(rng: &mut R) -> Zeroizing<[u8; 32]> {
    let mut v = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(&mut v[..]);
    v
}

/// TPM2B_SENSITIVE { sensitiveType, authValue = empty, seedValue, sensitive }.
fn sensitive(
    ty: u16,
    seed_value: &[u8; 32],
    secret: &[u8],
) -> Result<Zeroizing<Vec<u8>>, TpmStructError> {
    let mut inner = Writer(Vec::with_capacity(40 + secret.len()));
    inner.u16(ty).u16(0);
    inner.tpm2b("seedValue", seed_value)?;
    inner.tpm2b("sensitive", secret)?;
    let inner = Zeroizing::new(inner.finish());
    let mut outer = Writer(Vec::with_capacity(inner.len() + 2));
    outer.tpm2b("TPM2B_SENSITIVE", &inner)?;
    Ok(Zeroizing::new(outer.finish()))
}

/// The outer wrapper (steps 1-6 of the module documentation).
fn wrap<R: CryptoRng + ?Sized>(
    parent: &EccPublic,
    public: Vec<u8>,
    sensitive: &[u8],
    policy_pcrs: Option<PcrSelection>,
    rng: &mut R,
) -> Result<ImportBlob, TpmStructError> {
    parent.check_storage_parent()?;
    let q_sv = parent.p256()?;
    let ephemeral = EphemeralSecret::generate_from_rng(rng);
    let q_eu = ephemeral.public_key().to_sec1_point(false);
    let (Some(ex), Some(ey)) = (q_eu.x(), q_eu.y()) else {
        return Err(TpmStructError::Invalid {
            what: "ephemeral key",
            detail: "point at infinity".into(),
        });
    };
    let shared = ephemeral.diffie_hellman(&q_sv);
    let seed = kdfe_sha256(shared.raw_secret_bytes(), "DUPLICATE", ex, &parent.x, 256);
    drop(shared);

    let name = name_sha256(&public);
    let sym_key = kdfa_sha256(&seed, "STORAGE", &name, &[], 128);
    let hmac_key = kdfa_sha256(&seed, "INTEGRITY", &[], &[], 256);

    let mut enc = Zeroizing::new(sensitive.to_vec());
    let key: &[u8; 16] = sym_key[..]
        .try_into()
        .map_err(|_| TpmStructError::BadSize("symKey"))?;
    cfb_mode::Encryptor::<Aes128>::new(key.into(), &[0u8; 16].into()).encrypt(&mut enc);
    let outer_hmac = hmac_sha256(&hmac_key, &[&enc, &name]);

    let mut duplicate = Writer(Vec::with_capacity(34 + enc.len()));
    duplicate.tpm2b("outerHMAC", &outer_hmac)?.bytes(&enc);
    let mut seed_point = Writer::new();
    seed_point.tpm2b("x", ex)?.tpm2b("y", ey)?;
    Ok(ImportBlob {
        public,
        duplicate: duplicate.finish(),
        in_sym_seed: seed_point.finish(),
        policy_pcrs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tpm::kdf::sha256;
    use p256::elliptic_curve::sec1::ToSec1Point;

    /// A storage parent's TPMT_PUBLIC with the given point, shaped like tred's.
    fn parent(point: &p256::PublicKey) -> EccPublic {
        let enc = point.to_sec1_point(false);
        let (Some(x), Some(y)) = (enc.x(), enc.y()) else {
            panic!("identity point");
        };
        let mut w = Writer::new();
        w.u16(alg::ECC).u16(alg::SHA256);
        w.u32(attrs::RESTRICTED | attrs::DECRYPT | attrs::USER_WITH_AUTH);
        w.u16(0).u16(alg::AES).u16(128).u16(alg::CFB).u16(alg::NULL);
        w.u16(alg::ECC_NIST_P256).u16(alg::NULL);
        w.u16(32).bytes(x).u16(32).bytes(y);
        EccPublic::from_tpmt(&w.finish()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn blob_round_trips_and_names_its_public() {
        let mut rng = rand::rng();
        let sk = p256::SecretKey::generate_from_rng(&mut rng);
        let p = parent(&sk.public_key());
        let b = wrap_aes128_key(&p, &K::new([3; 16]), ObjectPolicy::default(), &mut rng)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            ImportBlob::from_bytes(&b.to_bytes().unwrap_or_default()),
            Ok(b.clone())
        );
        assert_eq!(&b.name()[2..], &sha256(&[&b.public])[..]);
        // outerHMAC (32) + encrypted TPM2B_SENSITIVE (2 + 2 + 2 + 2 + 32 + 2 + 16).
        assert_eq!(b.duplicate.len(), 2 + 32 + 58);
        // Two wraps of the same K differ (fresh seed and obfuscation value).
        let c = wrap_aes128_key(&p, &K::new([3; 16]), ObjectPolicy::default(), &mut rng)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(b.duplicate, c.duplicate);
        assert_ne!(b.public, c.public);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let mut rng = rand::rng();
        let sk = p256::SecretKey::generate_from_rng(&mut rng);
        let p = parent(&sk.public_key());
        for n in [0, MAX_SEALED_DATA + 1] {
            assert!(wrap_sealed_data(&p, &vec![1; n], ObjectPolicy::default(), &mut rng).is_err());
        }
        let mut signing = p.clone();
        signing.attributes |= attrs::SIGN_ENCRYPT;
        assert!(
            wrap_aes128_key(
                &signing,
                &K::new([3; 16]),
                ObjectPolicy::default(),
                &mut rng
            )
            .is_err()
        );
        let mut off_curve = p.clone();
        off_curve.y[31] ^= 1;
        assert!(off_curve.check_storage_parent().is_err());
        assert!(ImportBlob::from_bytes(&[0, 1]).is_err());
    }

    #[test]
    fn policy_clears_user_with_auth() {
        let with = ObjectPolicy {
            auth_policy: Some([9; 32]),
            pcrs: None,
        }
        .attributes(attrs::SIGN_ENCRYPT);
        assert_eq!(with & attrs::USER_WITH_AUTH, 0);
        let without = ObjectPolicy::default().attributes(0);
        assert_ne!(without & attrs::USER_WITH_AUTH, 0);
        for a in [with, without] {
            assert_eq!(a & (attrs::FIXED_TPM | attrs::FIXED_PARENT), 0);
        }
        // Without a policy the PIN can become the authValue (ObjectChangeAuth in the ADMIN
        // role) and the TPM's dictionary-attack protection counts wrong ones.
        assert_eq!(without & (attrs::ADMIN_WITH_POLICY | attrs::NO_DA), 0);
        assert_eq!(
            with & (attrs::ADMIN_WITH_POLICY | attrs::NO_DA),
            attrs::ADMIN_WITH_POLICY | attrs::NO_DA
        );
    }
}
