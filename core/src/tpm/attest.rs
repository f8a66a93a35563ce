//! TPM quotes as evidence, verified without a TPM (TR 33.812 5.1.3.6.2 steps 8-10: the PVA
//! validates the platform; TPM 2.0 Part 3, 18.4 TPM2_Quote; Part 2, 10.12 TPMS_ATTEST).
//!
//! The device sends the quote (TPMS_ATTEST and its signature by the attestation key), the
//! values of the quoted PCRs and the AK's public area (certified by the supplier into the
//! platform credential). [`verify_quote`] checks, in this order: the AK is a restricted
//! signing key that never leaves its TPM (otherwise anyone could sign a TPMS_ATTEST), the
//! signature, that the TPM made the structure (magic, type), the caller's nonce, and that the
//! reported PCR values hash to the quoted digest. What the PCR values should be is policy, and
//! belongs to the caller (the PVA's reference values).

use p256::ecdsa::Signature;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::policy::{PcrSelection, pcr_digest};
use super::public::{EccPublic, attrs};
use super::wire::Reader;
use super::{TpmStructError, alg};

/// TPM_GENERATED_VALUE: the magic that only the TPM puts in structures it signs.
pub const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
/// TPM_ST_ATTEST_QUOTE.
pub const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;

/// A quote as the device sends it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpmQuote {
    /// The marshalled TPMS_ATTEST (the contents of the TPM2B_ATTEST).
    pub attest: Vec<u8>,
    /// The marshalled TPMT_SIGNATURE over it.
    pub signature: Vec<u8>,
    /// The selected SHA-256 PCRs' indices, ascending.
    pub pcrs: Vec<u8>,
    /// Their values, in the same order, as the device read them.
    pub pcr_values: Vec<[u8; 32]>,
}

/// TPMS_CLOCK_INFO: lets a verifier spot a reboot (reset count) or a TPM that was not shut
/// down properly (safe = false).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockInfo {
    /// Milliseconds the TPM has been powered, since its last clear.
    pub clock: u64,
    /// TPM resets (reboots) since the last clear.
    pub reset_count: u32,
    /// TPM restarts (resume from hibernation) since the last reset.
    pub restart_count: u32,
    /// No clock value was ever lost (orderly shutdowns only).
    pub safe: bool,
}

/// What a verified quote says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedQuote {
    /// The TPM's clock at the quote.
    pub clock: ClockInfo,
    /// The TPM firmware version.
    pub firmware_version: u64,
    /// The quoted PCRs and their values.
    pub pcrs: Vec<(u8, [u8; 32])>,
}

/// Why a quote was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuoteError {
    /// A structure is malformed.
    #[error(transparent)]
    Structure(#[from] TpmStructError),
    /// The AK is not a restricted signing key bound to its TPM.
    #[error("the attestation key is not a restricted, fixedTPM signing key")]
    NotAnAttestationKey,
    /// The signature does not verify under the AK.
    #[error("the quote signature does not verify")]
    BadSignature,
    /// The structure was not made by a TPM, or is not a quote.
    #[error("not a TPM-generated quote")]
    NotAQuote,
    /// The quote answers another nonce (a replay, or another verifier's).
    #[error("the quote does not carry our nonce")]
    WrongNonce,
    /// The quoted PCR set differs from the reported one.
    #[error("the quoted PCR selection differs from the reported PCRs")]
    SelectionMismatch,
    /// The reported PCR values are not the ones the TPM quoted.
    #[error("the reported PCR values do not match the quoted digest")]
    PcrMismatch,
}

/// Verifies `quote` against the AK's public area (TPM2B_PUBLIC) and the nonce the verifier
/// sent. See the module documentation for what is checked.
pub fn verify_quote(
    ak_tpm2b_public: &[u8],
    quote: &TpmQuote,
    nonce: &[u8],
) -> Result<VerifiedQuote, QuoteError> {
    let ak = EccPublic::from_tpm2b(ak_tpm2b_public)?;
    let must = attrs::RESTRICTED | attrs::SIGN_ENCRYPT | attrs::FIXED_TPM | attrs::FIXED_PARENT;
    if ak.attributes & must != must || ak.attributes & attrs::DECRYPT != 0 {
        return Err(QuoteError::NotAnAttestationKey);
    }
    verify_quote_with_key(&ak.p256()?, quote, nonce)
}

/// [`verify_quote`] for an AK known by its key alone, when a certificate already vouches that
/// it is a restricted, fixedTPM signing key (the supplier's platform credential, which
/// `mcim-roles`' supplier issues only after checking exactly that).
pub fn verify_quote_with_key(
    ak: &p256::PublicKey,
    quote: &TpmQuote,
    nonce: &[u8],
) -> Result<VerifiedQuote, QuoteError> {
    // ring's P-256 (what rustls verifies TLS with): the PVA's hot path, ~3x the p256 crate.
    let signature = parse_ecdsa_signature(&quote.signature)?;
    let point = p256::elliptic_curve::sec1::ToSec1Point::to_sec1_point(ak, false);
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_FIXED,
        point.as_bytes(),
    )
    .verify(&quote.attest, &signature.to_bytes())
    .map_err(|_| QuoteError::BadSignature)?;

    let QuoteInfo {
        extra_data,
        clock,
        firmware_version,
        selection,
        pcr_digest: digest,
    } = parse_quote(&quote.attest)?;
    if extra_data.len() != nonce.len() || !bool::from(extra_data.ct_eq(nonce)) {
        return Err(QuoteError::WrongNonce);
    }

    if selection.indices() != quote.pcrs.as_slice() || quote.pcrs.len() != quote.pcr_values.len() {
        return Err(QuoteError::SelectionMismatch);
    }
    if digest != pcr_digest(&quote.pcr_values) {
        return Err(QuoteError::PcrMismatch);
    }
    Ok(VerifiedQuote {
        clock,
        firmware_version,
        pcrs: quote
            .pcrs
            .iter()
            .copied()
            .zip(quote.pcr_values.iter().copied())
            .collect(),
    })
}

/// The fields of a TPMS_ATTEST of type quote, unverified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuoteInfo {
    /// extraData: the verifier's nonce.
    pub extra_data: Vec<u8>,
    /// clockInfo.
    pub clock: ClockInfo,
    /// firmwareVersion.
    pub firmware_version: u64,
    /// The quoted PCRs.
    pub selection: PcrSelection,
    /// Their digest.
    pub pcr_digest: Vec<u8>,
}

/// Parses a quote's TPMS_ATTEST without verifying anything but its shape (for display; a
/// verifier calls [`verify_quote`]).
pub fn parse_quote(attest: &[u8]) -> Result<QuoteInfo, QuoteError> {
    let mut r = Reader::new("TPMS_ATTEST", attest);
    if r.u32()? != TPM_GENERATED_VALUE || r.u16()? != TPM_ST_ATTEST_QUOTE {
        return Err(QuoteError::NotAQuote);
    }
    let _qualified_signer = r.tpm2b()?;
    let extra_data = r.tpm2b()?.to_vec();
    let clock = ClockInfo {
        clock: r.u64()?,
        reset_count: r.u32()?,
        restart_count: r.u32()?,
        safe: r.u8()? != 0,
    };
    let firmware_version = r.u64()?;
    let selection = PcrSelection::parse(&mut r)?;
    let pcr_digest = r.tpm2b()?.to_vec();
    r.finish()?;
    Ok(QuoteInfo {
        extra_data,
        clock,
        firmware_version,
        selection,
        pcr_digest,
    })
}

/// TPMT_SIGNATURE with ECDSA-SHA256 → (r, s).
fn parse_ecdsa_signature(b: &[u8]) -> Result<Signature, QuoteError> {
    let mut r = Reader::new("TPMT_SIGNATURE", b);
    let sig_alg = r.u16()?;
    let hash = r.u16()?;
    if sig_alg != alg::ECDSA || hash != alg::SHA256 {
        return Err(TpmStructError::Unsupported {
            what: "signature scheme",
            detail: format!("{sig_alg:#06x}/{hash:#06x} (need ECDSA/SHA-256)"),
        }
        .into());
    }
    let sr = scalar(r.tpm2b()?)?;
    let ss = scalar(r.tpm2b()?)?;
    r.finish()?;
    Signature::from_scalars(sr, ss).map_err(|_| QuoteError::BadSignature)
}

fn scalar(b: &[u8]) -> Result<[u8; 32], TpmStructError> {
    if b.len() > 32 {
        return Err(TpmStructError::BadSize("ECDSA scalar"));
    }
    let mut out = [0u8; 32];
    out[32 - b.len()..].copy_from_slice(b);
    Ok(out)
}

/// The PCR values of a quote in the file format tpm2-tools writes with `tpm2_quote -o` and
/// reads with `tpm2_checkquote -f` when no `-l` is given (its "serialized" format: the C
/// structures as they lie in memory on a little-endian host): a TPML_PCR_SELECTION (132 octets),
/// a UINT32 count of digest lists, and that many TPML_DIGEST (532 octets each, up to eight
/// digests per list). `tpm2_checkquote -l` with a plain concatenation of values loses the
/// eighth PCR in tpm2-tools 5.4, so this form is the one that verifies at any PCR count.
pub fn tpm2_tools_pcr_file(sel: &PcrSelection, values: &[[u8; 32]]) -> Vec<u8> {
    const SELECTIONS: usize = 16; // TPM2_NUM_PCR_BANKS
    const SELECT_MAX: usize = 4; // TPM2_PCR_SELECT_MAX
    const DIGESTS: usize = 8; // a TPML_DIGEST's capacity
    const HA: usize = 64; // sizeof(TPMU_HA)
    let mut out = Vec::new();
    out.extend_from_slice(&1u32.to_le_bytes());
    for bank in 0..SELECTIONS {
        // TPMS_PCR_SELECTION: hash, sizeofSelect, pcrSelect[4], one octet of padding.
        let mut s = [0u8; 8];
        if bank == 0 {
            s[..2].copy_from_slice(&alg::SHA256.to_le_bytes());
            s[2] = 3;
            s[3..6].copy_from_slice(&sel.bitmap());
        }
        debug_assert_eq!(s.len(), 2 + 1 + SELECT_MAX + 1);
        out.extend_from_slice(&s);
    }
    let lists: Vec<&[[u8; 32]]> = values.chunks(DIGESTS).collect();
    out.extend_from_slice(&u32::try_from(lists.len()).unwrap_or(0).to_le_bytes());
    for list in lists {
        out.extend_from_slice(&u32::try_from(list.len()).unwrap_or(0).to_le_bytes());
        for i in 0..DIGESTS {
            let mut d = [0u8; 2 + HA];
            if let Some(v) = list.get(i) {
                d[..2].copy_from_slice(&32u16.to_le_bytes());
                d[2..34].copy_from_slice(v);
            }
            out.extend_from_slice(&d);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout tpm2-tools' structures have on a little-endian host: 132 octets of
    /// selection, a list count, 532 octets per list of up to eight digests.
    #[test]
    fn tpm2_tools_pcr_file_layout() {
        let eight = PcrSelection::sha256(&[0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
        let f = tpm2_tools_pcr_file(&eight, &[[7u8; 32]; 8]);
        assert_eq!(f.len(), 132 + 4 + 532);
        assert_eq!(&f[..4], &1u32.to_le_bytes());
        assert_eq!(&f[4..11], &[0x0b, 0x00, 3, 0xff, 0, 0, 0]);
        assert_eq!(&f[132..136], &1u32.to_le_bytes());
        assert_eq!(&f[136..140], &8u32.to_le_bytes());
        assert_eq!(&f[140..142], &32u16.to_le_bytes());
        assert_eq!(&f[142..174], &[7u8; 32]);
        // The eighth digest is the last of the first list.
        assert_eq!(&f[140 + 7 * 66..140 + 7 * 66 + 2], &32u16.to_le_bytes());
        let nine = PcrSelection::sha256(&[0, 1, 2, 3, 4, 5, 6, 7, 16]).unwrap();
        let f = tpm2_tools_pcr_file(&nine, &[[7u8; 32]; 9]);
        assert_eq!(f.len(), 132 + 4 + 2 * 532);
        assert_eq!(&f[132..136], &2u32.to_le_bytes());
        assert_eq!(&f[136 + 532..140 + 532], &1u32.to_le_bytes());
    }
}
