//! # mcim-tre: the TRE daemon
//!
//! `tred` runs on the M2M equipment. Its Trusted Environment (TR 33.812 5.1.2) is a TPM 2.0
//! (tss-esapi) or a PKCS#11 token (cryptoki); the MCIM's secrets enter it wrapped and AKA
//! runs inside it. This crate will hold the `Tre` trait with its backends, the MCIM registry
//! and lifecycle (5.1.1.1), the audit record (5.1.2.2), and the device side of every flow.
//!
//! This first slice only carries the crate and the binary; the TRE lands with issue 3.
