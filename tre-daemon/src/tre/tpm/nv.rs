//! The device identity record in TPM NV (TR 33.812 5.1.2.2: "securely store the identity of
//! the M2ME platform").

use super::{NV_IDENTITY, cmd};
use crate::tre::TreError;
use mcim_core::identity::DeviceIdentity;
use serde::{Deserialize, Serialize};
use std::io::Write;
use tss_esapi::Context;
use tss_esapi::abstraction::nv::{NvOpenOptions, read_full};
use tss_esapi::attributes::NvIndexAttributesBuilder;
use tss_esapi::handles::NvIndexTpmHandle;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::NvAuth;
use tss_esapi::structures::NvPublicBuilder;

/// What the NV index holds.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(super) struct IdentityRecord {
    pub identity: DeviceIdentity,
    /// Name of the storage key at supply time, hex in JSON.
    #[serde(with = "crate::tre::hex_bytes")]
    pub storage_name: Vec<u8>,
}

fn index() -> Result<NvIndexTpmHandle, TreError> {
    NvIndexTpmHandle::new(NV_IDENTITY).map_err(cmd("NV index handle"))
}

/// The record, `None` if the index is not defined.
pub(super) fn read_identity(ctx: &mut Context) -> Result<Option<IdentityRecord>, TreError> {
    let idx = index()?;
    let exists = tss_esapi::abstraction::nv::list(ctx)
        .map_err(cmd("TPM2_GetCapability(nv indices)"))?
        .iter()
        .any(|(p, _)| p.nv_index() == idx);
    if !exists {
        return Ok(None);
    }
    let bytes = ctx
        .execute_with_nullauth_session(|c| read_full(c, NvAuth::Owner, idx))
        .map_err(cmd("TPM2_NV_Read"))?;
    let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1);
    serde_json::from_slice(&bytes[..end])
        .map(Some)
        .map_err(|e| TreError::Mismatch(format!("identity record in NV does not parse: {e}")))
}

/// Defines the index and writes the record.
pub(super) fn write_identity(ctx: &mut Context, rec: &IdentityRecord) -> Result<(), TreError> {
    let data = serde_json::to_vec(rec).map_err(|e| TreError::Mismatch(e.to_string()))?;
    let attrs = NvIndexAttributesBuilder::new()
        .with_owner_write(true)
        .with_owner_read(true)
        .with_no_da(true)
        .build()
        .map_err(cmd("NV attributes"))?;
    let public = NvPublicBuilder::new()
        .with_nv_index(index()?)
        .with_index_name_algorithm(HashingAlgorithm::Sha256)
        .with_index_attributes(attrs)
        .with_data_area_size(data.len())
        .build()
        .map_err(cmd("NV public"))?;
    ctx.execute_with_nullauth_session(|c| {
        let mut rw = NvOpenOptions::NewIndex {
            nv_public: public,
            auth_handle: NvAuth::Owner,
        }
        .open(c)
        .map_err(cmd("TPM2_NV_DefineSpace"))?;
        rw.write_all(&data).map_err(|e| TreError::Command {
            command: "TPM2_NV_Write",
            detail: e.to_string(),
        })
    })
}
