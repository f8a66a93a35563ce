//! # mcim-roles: the network roles
//!
//! One module per role of TR 33.812 5.1.3.5 (supplier/CCIF, RO with ICF, DRF and DPF, VNO,
//! SHO, PVA), each a set of tonic services from `mcim-proto`, talking to each other only
//! through their gRPC clients. Storage is SQLite by default, PostgreSQL when split.
//!
//! This first slice only carries the crate and the binary; the roles land with issue 5.
#![forbid(unsafe_code)]
