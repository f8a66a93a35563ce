//! # mcim-roles: the network roles of TR 33.812 Alternative 1a
//!
//! gRPC servers for the equipment supplier (CCIF), the Registration Operator (ICF, DRF, DPF),
//! the Visited Network Operator, the Selected Home Operator and the Platform Validation
//! Authority. Built so far:
//!
//! - [`authz`]: the one authorization table (annex x.3): who may call which RPC, and whose
//!   objects it touches (the caller's own device, the SHO's own registration, ...).
//!   Who a party is (roles, the identity a certificate carries) and the development PKI
//!   live in the `mcim-pki` crate, shared with the device, the CLI and the tests.
//!
//! - [`gate`]: the layer in front of every role's server that applies the table to each call
//!   (caller from the certificate, rule from the method) before any handler runs.
//! - [`tls`]: mutual TLS (rustls via tonic), with the acceptor's connection limits; [`calls`]
//!   counts the calls in flight on each connection for them.
//! - [`supplier`]: the equipment supplier certifying devices' attestation and TLS keys.
//! - [`pva`]: the Platform Validation Authority (steps 8-10).
//! - [`store`]: the roles' database, SQLite or PostgreSQL (sqlx), and its migrations.
//! - [`ro`] (ICF, DRF, DPF), [`vno`], [`sho`]: the provisioning flow of 5.1.3.6.2 and
//!   5.1.3.6.3; [`auc`] the one AuC, [`atrest`] secrets at rest, [`peers`] role-to-role
//!   channels.
//! - [`config`]: the TOML file under the flags and their `MCIM_*` variables.
#![forbid(unsafe_code)]

pub mod atrest;
pub mod auc;
pub mod authz;
pub mod calls;
pub mod config;
pub mod error;
pub mod gate;
pub mod peers;
pub mod pva;
pub mod ro;
pub mod shed;
pub mod sho;
pub mod store;
pub mod supplier;
pub mod tls;
pub mod vno;
