//! Secrets at rest in a role's database (K and OPc at the ICF and the SHO) are wrapped with
//! AES-256-KWP (RFC 5649) under the role's data key, a 32-octet file `<role>.dbkey` (mode
//! 0600) next to its TLS key in the PKI directory, made by `mcimctl pki init` or on first use. A copy of the database
//! alone yields no subscriber key.

use std::path::Path;

use aes_kw::KwpAes256;
use zeroize::Zeroizing;

use mcim_pki::PkiError;

/// A role's data key.
pub struct DataKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// Wrapping or unwrapping failed (wrong key, damaged row).
#[derive(Debug, thiserror::Error)]
#[error("secret at rest: {0}")]
pub struct AtRestError(String);

impl DataKey {
    /// Loads `<pki>/<role>.dbkey`, making it if it does not exist.
    pub fn load_or_create(pki: &Path, role: &str) -> Result<Self, PkiError> {
        let path = mcim_pki::dev::data_key_file(pki, role)?;
        let err = |e: std::io::Error| PkiError::File {
            path: path.clone(),
            detail: e.to_string(),
        };
        let bytes = Zeroizing::new(std::fs::read(&path).map_err(err)?);
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| PkiError::File {
            path: path.clone(),
            detail: "a data key is 32 octets".into(),
        })?;
        Ok(Self(Zeroizing::new(key)))
    }

    fn kw(&self) -> Result<KwpAes256, AtRestError> {
        <KwpAes256 as aes_kw::KeyInit>::new_from_slice(&self.0[..])
            .map_err(|e| AtRestError(e.to_string()))
    }

    /// Wraps a secret for storage.
    pub fn seal(&self, secret: &[u8]) -> Result<Vec<u8>, AtRestError> {
        let mut buf = vec![0u8; secret.len().div_ceil(8) * 8 + 8];
        let n = self
            .kw()?
            .wrap_key(secret, &mut buf)
            .map_err(|e| AtRestError(e.to_string()))?
            .len();
        buf.truncate(n);
        Ok(buf)
    }

    /// Unwraps a stored secret.
    pub fn open(&self, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, AtRestError> {
        let mut buf = Zeroizing::new(vec![0u8; wrapped.len()]);
        let n = self
            .kw()?
            .unwrap_key(wrapped, &mut buf)
            .map_err(|_| AtRestError("does not unwrap under this role's data key".into()))?
            .len();
        buf.truncate(n);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_with_its_key_only_and_is_not_stored_in_the_clear() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let other = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let a = DataKey::load_or_create(dir.path(), "sho").unwrap_or_else(|e| panic!("{e}"));
        let again = DataKey::load_or_create(dir.path(), "sho").unwrap_or_else(|e| panic!("{e}"));
        let b = DataKey::load_or_create(other.path(), "sho").unwrap_or_else(|e| panic!("{e}"));
        let k = [0x42u8; 16];
        let sealed = a.seal(&k).unwrap_or_default();
        assert!(!sealed.windows(16).any(|w| w == k), "K is not in the row");
        assert_eq!(
            again.open(&sealed).map(|v| v.to_vec()).ok(),
            Some(k.to_vec())
        );
        assert!(
            b.open(&sealed).is_err(),
            "another role's key does not open it"
        );
    }
}
