//! # mcim-tre: the TRE daemon
//!
//! `tred` runs on the M2M equipment. Its Trusted Environment (TR 33.812 5.1.2) is a TPM 2.0
//! (tss-esapi) or a PKCS#11 token (cryptoki); the MCIM's secrets enter it wrapped and AKA
//! runs inside it.
//!
//! - [`tre`]: the [`tre::Tre`] trait and its backends (`tpm`: tss-esapi; `pkcs11`: cryptoki),
//!   each behind its own cargo feature.
//!
//! - [`registry`]: the MCIM registry and lifecycle (5.1.1.1), PINs, the audit record
//!   (5.1.2.2), start-up integrity checks, rollback detection and lockdown (5.1.2.3).
//!
//! - [`device`]: the device façade, every operation on the TRE and the registry as a typed
//!   call; [`engine`] the one thread that owns the TRE and runs them.
//!
//! - [`config`], [`service`] (the local gRPC API `mcim.tre.v1` on a Unix socket: protobuf to
//!   and from the façade's types, [`wire`]), [`access`] (who may call what, by the caller's
//!   peer credentials): the daemon `tred`.
//!
//! - [`tls`]: the device's TLS key as a rustls signing key whose signatures the TRE makes.
//!
//! - [`provision`]: the device side of initial provisioning (5.1.3.6.2, 5.1.3.6.3), a typed
//!   state machine ([`provision::run`]) saved in a versioned form, over the façade; [`net`]
//!   its mutual-TLS channels; [`certificates`] the supplier's certificates it presents.
//!
//! Dependencies inside the crate point one way: `service -> {provision, device, wire}`,
//! `provision -> {device, wire, net, tls}`, `device -> {engine, registry, tre}`.

pub mod access;
pub mod certificates;
pub mod config;
pub mod device;
pub mod engine;
pub mod net;
pub mod provision;
pub mod registry;
pub mod service;
pub mod tls;
pub mod tre;
pub mod usim;
pub mod wire;
