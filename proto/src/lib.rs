//! # mcim-proto: the wire contract
//!
//! Generated prost messages and tonic clients/servers for `proto/mcim/<area>/v1/*.proto`,
//! one module per package. The `.proto` files are the contract; clients in other languages
//! are generated from them, and CI checks them with `buf lint` (STANDARD rules).
//!
//! | package | serves |
//! | --- | --- |
//! | [`mcim::common::v1`] | shared types: AVs, evidence, MCIM states, packages |
//! | [`mcim::tre::v1`] | `tred`'s local API (TR 33.812 5.1.2) |
//! | [`mcim::supplier::v1`] | M2ME supplier and CCIF (5.1.3.4.1, 5.1.3.5.3) |
//! | [`mcim::ro::v1`] | RO: ICF, DRF, DPF (5.1.3.4.2-4, 5.1.3.6.2 steps 2-7, 11-14) |
//! | [`mcim::vno::v1`] | VNO attach (5.1.3.5.5, steps 1-4) |
//! | [`mcim::sho::v1`] | SHO (5.1.3.5.6, steps 7-11, 14; 5.1.3.7.4.2) |
//! | [`mcim::pva::v1`] | PVA (5.1.3.5.8, steps 8-10) |
#![allow(
    missing_docs,
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

/// One module `mcim::<area>::v1` per proto package `mcim.<area>.v1`.
macro_rules! packages {
    ($($area:ident),* $(,)?) => {
        /// Generated code, one module per proto package.
        pub mod mcim {
            $(
                #[doc = concat!("`mcim.", stringify!($area), ".v1`")]
                pub mod $area {
                    /// v1
                    pub mod v1 {
                        include!(concat!(env!("OUT_DIR"), "/mcim.", stringify!($area), ".v1.rs"));
                    }
                }
            )*
        }
    };
}

packages!(common, tre, supplier, ro, vno, sho, pva);

/// The encoded `FileDescriptorSet` of every package, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("mcim_descriptor");
