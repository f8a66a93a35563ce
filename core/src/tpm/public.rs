//! Public areas (TPMT_PUBLIC, TPM 2.0 Part 2, 12.2.4) that mcim builds or reads, and object
//! names (Part 1, 16: nameAlg || H_nameAlg(TPMT_PUBLIC)).

use super::kdf::sha256;
use super::wire::{Reader, Writer, unwrap_tpm2b};
use super::{TpmStructError, alg};

/// TPMA_OBJECT bits (Part 2, 8.3).
pub mod attrs {
    /// The object cannot be duplicated to another TPM.
    pub const FIXED_TPM: u32 = 1 << 1;
    /// The object's parent cannot change.
    pub const FIXED_PARENT: u32 = 1 << 4;
    /// The TPM generated the sensitive part.
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    /// The USER role may be authorised with the auth value.
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    /// The ADMIN role needs a policy session.
    pub const ADMIN_WITH_POLICY: u32 = 1 << 7;
    /// Not subject to dictionary-attack protection.
    pub const NO_DA: u32 = 1 << 10;
    /// Restricted key (signs or decrypts only TPM-made structures).
    pub const RESTRICTED: u32 = 1 << 16;
    /// May decrypt.
    pub const DECRYPT: u32 = 1 << 17;
    /// May sign (asymmetric) or encrypt (symmetric).
    pub const SIGN_ENCRYPT: u32 = 1 << 18;
}

/// An ECC public area as the TPM reports it (TPM2B_PUBLIC from TPM2_ReadPublic or
/// TPM2_CreatePrimary).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EccPublic {
    /// The marshalled TPMT_PUBLIC (without the TPM2B size).
    pub tpmt: Vec<u8>,
    /// nameAlg.
    pub name_alg: u16,
    /// objectAttributes.
    pub attributes: u32,
    /// authPolicy.
    pub auth_policy: Vec<u8>,
    /// symmetric: (algorithm, key bits, mode), `None` for TPM_ALG_NULL.
    pub symmetric: Option<(u16, u16, u16)>,
    /// scheme: (algorithm, hash), `None` for TPM_ALG_NULL.
    pub scheme: Option<(u16, u16)>,
    /// curveID.
    pub curve: u16,
    /// The public point's x coordinate, 32 octets (left-padded).
    pub x: [u8; 32],
    /// The public point's y coordinate.
    pub y: [u8; 32],
}

impl EccPublic {
    /// Parses a marshalled TPM2B_PUBLIC holding an ECC P-256 key with a SHA-256 name.
    pub fn from_tpm2b(tpm2b: &[u8]) -> Result<Self, TpmStructError> {
        Self::from_tpmt(unwrap_tpm2b("TPM2B_PUBLIC", tpm2b)?)
    }

    /// Parses a marshalled TPMT_PUBLIC holding an ECC P-256 key with a SHA-256 name.
    pub fn from_tpmt(tpmt: &[u8]) -> Result<Self, TpmStructError> {
        let mut r = Reader::new("TPMT_PUBLIC", tpmt);
        let ty = r.u16()?;
        if ty != alg::ECC {
            return Err(unsupported("key type", ty));
        }
        let name_alg = r.u16()?;
        if name_alg != alg::SHA256 {
            return Err(unsupported("nameAlg", name_alg));
        }
        let attributes = r.u32()?;
        let auth_policy = r.tpm2b()?.to_vec();
        let sym_alg = r.u16()?;
        let symmetric = if sym_alg == alg::NULL {
            None
        } else {
            Some((sym_alg, r.u16()?, r.u16()?))
        };
        let scheme_alg = r.u16()?;
        let scheme = match scheme_alg {
            alg::NULL => None,
            // TPM_ALG_ECDAA carries a count after the hash.
            0x001A => return Err(unsupported("scheme", scheme_alg)),
            s => Some((s, r.u16()?)),
        };
        let curve = r.u16()?;
        if curve != alg::ECC_NIST_P256 {
            return Err(unsupported("curve", curve));
        }
        let kdf = r.u16()?;
        if kdf != alg::NULL {
            return Err(unsupported("kdf", kdf));
        }
        let x = coordinate(r.tpm2b()?)?;
        let y = coordinate(r.tpm2b()?)?;
        r.finish()?;
        Ok(Self {
            tpmt: tpmt.to_vec(),
            name_alg,
            attributes,
            auth_policy,
            symmetric,
            scheme,
            curve,
            x,
            y,
        })
    }

    /// The point as a P-256 public key; fails when it is not on the curve.
    pub fn p256(&self) -> Result<p256::PublicKey, TpmStructError> {
        let mut sec1 = [0u8; 65];
        sec1[0] = 0x04;
        sec1[1..33].copy_from_slice(&self.x);
        sec1[33..].copy_from_slice(&self.y);
        p256::PublicKey::from_sec1_bytes(&sec1).map_err(|_| TpmStructError::Invalid {
            what: "ECC point",
            detail: "not on P-256".into(),
        })
    }

    /// The object's name.
    pub fn name(&self) -> Vec<u8> {
        name_sha256(&self.tpmt)
    }

    /// Checks the shape of a storage parent that duplication blobs can target: restricted
    /// decrypt, not a signing key, AES-128-CFB symmetric (Part 1, 23.3.2.3).
    pub fn check_storage_parent(&self) -> Result<(), TpmStructError> {
        let want = attrs::RESTRICTED | attrs::DECRYPT;
        if self.attributes & want != want || self.attributes & attrs::SIGN_ENCRYPT != 0 {
            return Err(TpmStructError::Invalid {
                what: "storage parent",
                detail: format!(
                    "attributes {:#010x} are not restricted-decrypt",
                    self.attributes
                ),
            });
        }
        if self.symmetric != Some((alg::AES, 128, alg::CFB)) {
            return Err(TpmStructError::Unsupported {
                what: "storage parent symmetric",
                detail: format!("{:?} (need AES-128-CFB)", self.symmetric),
            });
        }
        self.p256().map(|_| ())
    }
}

fn unsupported(what: &'static str, v: u16) -> TpmStructError {
    TpmStructError::Unsupported {
        what,
        detail: format!("{v:#06x}"),
    }
}

fn coordinate(b: &[u8]) -> Result<[u8; 32], TpmStructError> {
    if b.len() > 32 {
        return Err(TpmStructError::BadSize("ECC coordinate"));
    }
    let mut out = [0u8; 32];
    out[32 - b.len()..].copy_from_slice(b);
    Ok(out)
}

/// name = TPM_ALG_SHA256 || SHA-256(TPMT_PUBLIC).
pub fn name_sha256(tpmt_public: &[u8]) -> Vec<u8> {
    let mut n = alg::SHA256.to_be_bytes().to_vec();
    n.extend_from_slice(&sha256(&[tpmt_public]));
    n
}

/// TPMT_PUBLIC of an AES-128 symmetric key (TPM_ALG_SYMCIPHER, mode TPM_ALG_NULL so that the
/// mode is chosen per TPM2_EncryptDecrypt2 call). `unique` = SHA-256(seedValue || key).
pub fn aes128_key_public(
    attributes: u32,
    auth_policy: Option<&[u8; 32]>,
    unique: &[u8; 32],
) -> Vec<u8> {
    let mut w = Writer::new();
    w.u16(alg::SYMCIPHER).u16(alg::SHA256).u32(attributes);
    policy_field(&mut w, auth_policy);
    w.u16(alg::AES).u16(128).u16(alg::NULL);
    w.u16(32).bytes(unique);
    w.finish()
}

/// TPMT_PUBLIC of a sealed data object (TPM_ALG_KEYEDHASH with scheme TPM_ALG_NULL).
/// `unique` = SHA-256(seedValue || data).
pub fn sealed_data_public(
    attributes: u32,
    auth_policy: Option<&[u8; 32]>,
    unique: &[u8; 32],
) -> Vec<u8> {
    let mut w = Writer::new();
    w.u16(alg::KEYEDHASH).u16(alg::SHA256).u32(attributes);
    policy_field(&mut w, auth_policy);
    w.u16(alg::NULL);
    w.u16(32).bytes(unique);
    w.finish()
}

/// authPolicy: a SHA-256 policy digest or the empty buffer.
fn policy_field(w: &mut Writer, auth_policy: Option<&[u8; 32]>) {
    match auth_policy {
        Some(p) => w.u16(32).bytes(p),
        None => w.u16(0),
    };
}
