//! Policy digests computed in software (TPM 2.0 Part 3, 23), so that an SHO can bind an
//! imported object to the device's platform state (TR 33.812 5.1.2.3: the MCIM is usable only
//! on a platform that booted into the validated state).

use super::kdf::sha256;
use super::wire::{Reader, Writer};
use super::{TpmStructError, alg};

/// TPM_CC_PolicyPCR.
const TPM_CC_POLICY_PCR: u32 = 0x0000_017F;

/// A selection of SHA-256 PCRs (indices 0..=23), kept sorted and without duplicates.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PcrSelection(Vec<u8>);

impl PcrSelection {
    /// Selects the given PCR indices; refuses indices above 23.
    pub fn sha256(pcrs: &[u8]) -> Result<Self, TpmStructError> {
        if let Some(bad) = pcrs.iter().find(|&&p| p > 23) {
            return Err(TpmStructError::Invalid {
                what: "PCR index",
                detail: format!("{bad} (0..=23)"),
            });
        }
        let mut v = pcrs.to_vec();
        v.sort_unstable();
        v.dedup();
        Ok(Self(v))
    }

    /// The selected indices, ascending (the order the TPM concatenates PCR values in).
    pub fn indices(&self) -> &[u8] {
        &self.0
    }

    /// The 3-octet pcrSelect bitmap.
    pub fn bitmap(&self) -> [u8; 3] {
        let mut m = [0u8; 3];
        for &p in &self.0 {
            m[usize::from(p / 8)] |= 1 << (p % 8);
        }
        m
    }

    /// TPML_PCR_SELECTION with one SHA-256 bank.
    pub fn marshal(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(1).u16(alg::SHA256).bytes(&[3]).bytes(&self.bitmap());
        w.finish()
    }

    /// Parses a TPML_PCR_SELECTION; accepts only one SHA-256 bank (what mcim asks for).
    pub fn parse(r: &mut Reader<'_>) -> Result<Self, TpmStructError> {
        let count = r.u32()?;
        if count != 1 {
            return Err(TpmStructError::Unsupported {
                what: "PCR selection",
                detail: format!("{count} banks (need one SHA-256 bank)"),
            });
        }
        let hash = r.u16()?;
        if hash != alg::SHA256 {
            return Err(TpmStructError::Unsupported {
                what: "PCR bank",
                detail: format!("{hash:#06x}"),
            });
        }
        let size = r.u8()?;
        let map = r.take(usize::from(size))?;
        let mut pcrs = Vec::new();
        for (i, byte) in map.iter().enumerate() {
            for bit in 0..8u8 {
                if byte & (1 << bit) != 0 {
                    let index = u8::try_from(i * 8)
                        .map_err(|_| TpmStructError::BadSize("pcrSelect"))?
                        + bit;
                    pcrs.push(index);
                }
            }
        }
        Self::sha256(&pcrs)
    }
}

/// pcrDigest = SHA-256 of the selected PCR values concatenated in ascending index order.
pub fn pcr_digest(values: &[[u8; 32]]) -> [u8; 32] {
    let parts: Vec<&[u8]> = values.iter().map(|v| &v[..]).collect();
    sha256(&parts)
}

/// The policy digest of a trial session that ran only TPM2_PolicyPCR(selection, pcrDigest)
/// (Part 3, 23.7): SHA-256(0^32 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || pcrDigest).
/// `values` are the expected PCR values in `selection` order.
pub fn policy_pcr(
    selection: &PcrSelection,
    values: &[[u8; 32]],
) -> Result<[u8; 32], TpmStructError> {
    if values.len() != selection.indices().len() {
        return Err(TpmStructError::Invalid {
            what: "PCR values",
            detail: format!(
                "{} values for {} selected PCRs",
                values.len(),
                selection.indices().len()
            ),
        });
    }
    Ok(sha256(&[
        &[0u8; 32],
        &TPM_CC_POLICY_PCR.to_be_bytes(),
        &selection.marshal(),
        &pcr_digest(values),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_marshals_and_parses() {
        let s = PcrSelection::sha256(&[7, 0, 16, 7]).unwrap_or_default();
        assert_eq!(s.indices(), &[0, 7, 16]);
        assert_eq!(s.marshal(), [0, 0, 0, 1, 0, 0x0B, 3, 0x81, 0x00, 0x01]);
        let m = s.marshal();
        let mut r = Reader::new("sel", &m);
        assert_eq!(PcrSelection::parse(&mut r), Ok(s));
        assert!(PcrSelection::sha256(&[24]).is_err());
    }

    #[test]
    fn policy_needs_one_value_per_pcr() {
        let s = PcrSelection::sha256(&[0, 1]).unwrap_or_default();
        assert!(policy_pcr(&s, &[[0; 32]]).is_err());
        assert!(policy_pcr(&s, &[[0; 32], [0; 32]]).is_ok());
    }
}
