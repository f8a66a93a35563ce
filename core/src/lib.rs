//! # mcim-core
//!
//! What the device (`tred`) and the network roles (`mcim-roles`) both need, with no I/O:
//!
//! - [`aka`]: the 3GPP AKA core: MILENAGE (TS 35.206) over a pluggable block-cipher
//!   [`aka::Kernel`] (software AES here, the TRE's AES key in `tred`), the SQN scheme of
//!   TS 33.102 Annex C, authentication vectors on the network side, AUTN checking and AUTS on
//!   the device side, and resynchronisation (TS 33.102 6.3.5).
//! - [`identity`]: PCID and IMSI (IMSI format, routed by MCC/MNC, annex x.2.1) and the
//!   supplier's device identity.
//! - [`es256`]: ES256 signing and verification through ring (the hot paths).
//! - [`secret`]: fixed-size secret byte strings (K, OP, OPc, CK, IK) that wipe themselves and
//!   never print.
//!
//! - [`tpm`]: TPM 2.0 structures built without a TPM: duplication blobs for TPM2_Import (how
//!   an SHO sends K and OPc to one device's TPM), policy digests, names, and quote
//!   verification (the PVA's side of attestation).
//! - [`token_evidence`]: a PKCS#11 TRE's signed attestation evidence (weaker than a quote).
//! - [`token_wrap`]: MCIM secrets wrapped for a PKCS#11 token (ECDH + AES-KWP).
//! - [`lifecycle`]: the MCIM lifecycle state machine (TR 33.812 5.1.1.1).
//! - [`rehabilitation`]: the supplier's signed authorisation to leave lockdown (5.1.2.2).
//! - [`package`]: the MCIM package (COSE_Sign1 by the SHO, bound to one device, registration
//!   and nonce) and wrapping its secrets for a TRE; [`signed`]: COSE_Sign1 statements with
//!   their signer's certificate; [`validation`]: the PVA's signed validation result.
#![forbid(unsafe_code)]

pub mod aka;
pub mod es256;
pub mod identity;
pub mod lifecycle;
pub mod package;
pub mod rehabilitation;
pub mod secret;
pub mod signed;
pub mod token_evidence;
pub mod token_wrap;
pub mod tpm;
pub mod validation;
