//! # mcim-tre: the TRE daemon
//!
//! `tred` runs on the M2M equipment. Its Trusted Environment (TR 33.812 5.1.2) is a TPM 2.0
//! (tss-esapi) or a PKCS#11 token (cryptoki); the MCIM's secrets enter it wrapped and AKA
//! runs inside it.
//!
//! - [`tre`]: the [`tre::Tre`] trait and its backends (`tpm` today).
//!
//! - [`registry`]: the MCIM registry and lifecycle (5.1.1.1), PINs, the audit record
//!   (5.1.2.2), start-up integrity checks, rollback detection and lockdown (5.1.2.3).
//!
//! - [`config`], [`engine`] (the thread that owns the TRE), [`service`] (the local gRPC API
//!   `mcim.tre.v1` on a Unix socket): the daemon `tred`.
//!
//! - [`tls`]: the device's TLS key as a rustls signing key whose signatures the TRE makes.
//!
//! - [`provision`]: the device side of initial provisioning (5.1.3.6.2, 5.1.3.6.3), one
//!   persisted state machine; [`net`] its mutual-TLS channels; [`certificates`] the supplier's
//!   certificates it presents.

pub mod certificates;
pub mod config;
pub mod engine;
pub mod net;
pub mod provision;
pub mod registry;
pub mod service;
pub mod tls;
pub mod tre;
