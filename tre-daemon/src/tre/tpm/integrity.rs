//! What keeps the state directory honest (TR 33.812 5.1.2.2 audit record and lockdown, 5.1.2.3
//! integrity checks): an HMAC key that never leaves the TPM, a monotonic NV counter against
//! rollback, a hybrid (orderly) NV counter for the frequent commits (the SQN state after each
//! AKA) that wears no NV per increment, and an NV index anchoring the audit chain's head.
//!
//! The HMAC key is a primary key of the owner hierarchy with a fixed template: the TPM derives
//! the same key from its owner seed every time, so it needs no persistent handle and is gone
//! only when the owner hierarchy is cleared (as are the MCIMs' parent key and everything else).
//!
//! The audit anchor is an ordinary owner-written index holding (sequence number, head hash).
//! TPM_NT_EXTEND would be the natural type, but tss-esapi 7.7 has no TPM2_NV_Extend (8.0 has)
//! and with an empty owner auth value an extend index can be undefined and re-extended from
//! zero by the same attacker who could rewrite this one; the counter and the MACs carry the
//! protection.

use mcim_core::tpm::wire::{Reader, Writer};
use tss_esapi::attributes::NvIndexAttributesBuilder;
use tss_esapi::constants::{NvIndexType, PropertyTag};
use tss_esapi::handles::{KeyHandle, NvIndexHandle, NvIndexTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::resource_handles::{Hierarchy, NvAuth, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Digest, KeyedHashScheme, MaxBuffer, MaxNvBuffer, NvPublicBuilder, Public, PublicBuilder,
    PublicKeyedHashParameters,
};

use super::{TpmTre, cmd};
use crate::tre::{AuditAnchor, HybridCount, ResetEpoch, TreError};

/// NV index of the rollback counter (TPM_NT_COUNTER).
pub const NV_COUNTER: u32 = 0x0150_0101;
/// NV index of the audit anchor: sequence number (8) || head (32).
pub const NV_AUDIT_ANCHOR: u32 = 0x0150_0102;
const ANCHOR_SIZE: usize = 40;
/// NV index of the hybrid counter (TPM_NT_COUNTER, TPMA_NV_ORDERLY) that the frequent
/// commits (the SQN state after each AKA) advance without an NV write per increment.
pub const NV_HYBRID_COUNTER: u32 = 0x0150_0103;

fn hmac_template() -> Result<Public, TreError> {
    let attrs = super::keys::device_key_attributes()
        .with_sign_encrypt(true)
        .build()
        .map_err(cmd("HMAC template"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(
            KeyedHashScheme::HMAC_SHA_256,
        ))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
        .map_err(cmd("HMAC template"))
}

fn nv_handle(index: u32) -> Result<NvIndexTpmHandle, TreError> {
    NvIndexTpmHandle::new(index).map_err(cmd("NV index handle"))
}

impl TpmTre {
    /// The integrity key, created from the owner seed on first use and kept loaded.
    fn integrity_key(&mut self) -> Result<KeyHandle, TreError> {
        if let Some(h) = self.integrity {
            return Ok(h);
        }
        self.count(1);
        let template = hmac_template()?;
        let h = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .map_err(cmd("TPM2_CreatePrimary(integrity key)"))?
            .key_handle;
        self.integrity = Some(h);
        Ok(h)
    }

    /// HMAC-SHA-256 with the integrity key over a 32-octet digest.
    pub(super) fn mac_digest(&mut self, digest: &[u8; 32]) -> Result<[u8; 32], TreError> {
        let key = self.integrity_key()?;
        let data = MaxBuffer::try_from(digest.to_vec()).map_err(cmd("TPM2_HMAC"))?;
        self.count(1);
        let mac = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.hmac(key.into(), data, HashingAlgorithm::Sha256)
            })
            .map_err(cmd("TPM2_HMAC"))?;
        mac.value().try_into().map_err(|_| TreError::Command {
            command: "TPM2_HMAC",
            detail: "not 32 octets".into(),
        })
    }

    /// The ESYS handle of one of our NV indices, opened once and kept (nothing else in
    /// this process opens these indices, so no other close can invalidate it).
    fn open_nv(&mut self, index: u32) -> Result<Option<NvIndexHandle>, TreError> {
        if let Some(h) = self.nv.get(&index) {
            return Ok(Some(*h));
        }
        self.count(1);
        if !super::handle_present(&mut self.ctx, index)? {
            return Ok(None);
        }
        let h = TpmHandle::NvIndex(nv_handle(index)?);
        self.count(1);
        match self
            .ctx
            .execute_without_session(|c| c.tr_from_tpm_public(h))
        {
            Ok(o) => {
                let h: NvIndexHandle = o.into();
                self.nv.insert(index, h);
                Ok(Some(h))
            }
            Err(_) => Ok(None),
        }
    }

    /// Keeps the handle open (see [`TpmTre::open_nv`]).
    fn close_nv(&mut self, _h: NvIndexHandle) -> Result<(), TreError> {
        Ok(())
    }

    /// Defines a counter index if missing: ordinary (`orderly` false: every increment writes
    /// NV) or hybrid (`orderly`: increments stay in the TPM's RAM until the low bits roll
    /// over or TPM2_Shutdown).
    fn ensure_counter(&mut self, index: u32, orderly: bool) -> Result<(), TreError> {
        if let Some(h) = self.open_nv(index)? {
            return self.close_nv(h);
        }
        let public = NvPublicBuilder::new()
            .with_nv_index(nv_handle(index)?)
            .with_index_name_algorithm(HashingAlgorithm::Sha256)
            .with_index_attributes(
                NvIndexAttributesBuilder::new()
                    .with_nv_index_type(NvIndexType::Counter)
                    .with_orderly(orderly)
                    .with_owner_write(true)
                    .with_owner_read(true)
                    .with_no_da(true)
                    .build()
                    .map_err(cmd("NV attributes"))?,
            )
            .with_data_area_size(8)
            .build()
            .map_err(cmd("NV public"))?;
        // The definition and the first increment (which sets TPMA_NV_WRITTEN) write NV.
        self.count(2);
        self.count_nv_write(2);
        let h = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.nv_define_space(Provision::Owner, None, public)
            })
            .map_err(cmd("TPM2_NV_DefineSpace(counter)"))?;
        self.nv.insert(index, h);
        // A counter reads only after its first increment.
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.nv_increment(NvAuth::Owner, h)
            })
            .map_err(cmd("TPM2_NV_Increment"))?;
        self.close_nv(h)
    }

    /// Defines the counters and the anchor if missing (supply time). Idempotent.
    pub(super) fn ensure_anchors(&mut self) -> Result<(), TreError> {
        self.ensure_counter(NV_COUNTER, false)?;
        self.ensure_counter(NV_HYBRID_COUNTER, true)?;
        if let Some(h) = self.open_nv(NV_AUDIT_ANCHOR)? {
            self.close_nv(h)?;
        } else {
            let public = NvPublicBuilder::new()
                .with_nv_index(nv_handle(NV_AUDIT_ANCHOR)?)
                .with_index_name_algorithm(HashingAlgorithm::Sha256)
                .with_index_attributes(
                    NvIndexAttributesBuilder::new()
                        .with_owner_write(true)
                        .with_owner_read(true)
                        .with_no_da(true)
                        .build()
                        .map_err(cmd("NV attributes"))?,
                )
                .with_data_area_size(ANCHOR_SIZE)
                .build()
                .map_err(cmd("NV public"))?;
            self.count(1);
            self.count_nv_write(1);
            let h = self
                .ctx
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.nv_define_space(Provision::Owner, None, public)
                })
                .map_err(cmd("TPM2_NV_DefineSpace(audit anchor)"))?;
            self.close_nv(h)?;
            self.write_anchor(&AuditAnchor::default())?;
        }
        Ok(())
    }

    fn read_nv(&mut self, index: u32, size: u16) -> Result<Vec<u8>, TreError> {
        let h = self.open_nv(index)?.ok_or_else(|| {
            TreError::Mismatch(format!("NV index {index:#x} is missing (TPM cleared?)"))
        })?;
        self.count(1);
        let out = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.nv_read(NvAuth::Owner, h, size, 0)
            })
            .map_err(cmd("TPM2_NV_Read"))
            .map(|b| b.value().to_vec());
        self.close_nv(h)?;
        out
    }

    /// The value of one of our 8-octet counters.
    fn read_u64(&mut self, index: u32, what: &'static str) -> Result<u64, TreError> {
        let b = self.read_nv(index, 8)?;
        Reader::new(what, &b)
            .u64()
            .map_err(|e| TreError::Mismatch(e.to_string()))
    }

    /// TPM2_NV_Increment of one of our counters; its new value.
    fn increment(&mut self, index: u32, what: &'static str) -> Result<u64, TreError> {
        let h = self
            .open_nv(index)?
            .ok_or_else(|| TreError::Mismatch(format!("the {what} is missing (TPM cleared?)")))?;
        self.count(1);
        let r = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.nv_increment(NvAuth::Owner, h)
            })
            .map_err(cmd("TPM2_NV_Increment"));
        self.close_nv(h)?;
        r?;
        self.read_u64(index, what)
    }

    pub(super) fn read_counter(&mut self) -> Result<u64, TreError> {
        self.read_u64(NV_COUNTER, "rollback counter")
    }

    pub(super) fn increment_counter(&mut self) -> Result<u64, TreError> {
        self.count_nv_write(1);
        self.increment(NV_COUNTER, "rollback counter")
    }

    /// The hybrid counter and the TPM's MAX_ORDERLY_COUNT; the counter is defined here when
    /// missing (a TPM supplied by a `tred` that predates it).
    pub(super) fn read_hybrid_counter(&mut self) -> Result<HybridCount, TreError> {
        let orderly_mask = match self.orderly_mask {
            Some(m) => m,
            None => {
                self.count(1);
                let m = self
                    .ctx
                    .get_tpm_property(PropertyTag::OrderlyCount)
                    .map_err(cmd("TPM2_GetCapability(TPM_PT_ORDERLY_COUNT)"))?
                    .ok_or_else(|| {
                        TreError::Mismatch("the TPM reports no TPM_PT_ORDERLY_COUNT".into())
                    })?;
                self.orderly_mask = Some(u64::from(m));
                u64::from(m)
            }
        };
        self.ensure_counter(NV_HYBRID_COUNTER, true)?;
        let value = self.read_u64(NV_HYBRID_COUNTER, "hybrid counter")?;
        let reset_epoch = self.reset_epoch()?;
        Ok(HybridCount {
            value,
            orderly_mask,
            reset_epoch,
        })
    }

    /// The TPM's reset count, from a quote by the attestation key over PCR 0 with a fresh
    /// nonce, verified with the key's public area (an altered answer on the bus fails). Not an
    /// NV index: an NV marker would be undefined and defined again by anyone with the owner
    /// hierarchy's (empty) authorisation, which looks exactly like a reset. Read once per
    /// context: a reset of the TPM ends every context opened before it.
    fn reset_epoch(&mut self) -> Result<ResetEpoch, TreError> {
        if let Some(e) = self.reset_epoch {
            return Ok(e);
        }
        let mut nonce = [0u8; 16];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut nonce);
        let selection = mcim_core::tpm::policy::PcrSelection::sha256(&[0])
            .map_err(|e| TreError::Mismatch(e.to_string()))?;
        let quote = self.quote_pcrs(&nonce, &selection)?;
        let ak = crate::tre::Tre::device_public(self)?.attestation_public;
        let verified = mcim_core::tpm::attest::verify_quote(&ak, &quote, &nonce)
            .map_err(|e| TreError::Mismatch(format!("the TPM's own quote does not verify: {e}")))?;
        let epoch = ResetEpoch {
            key: mcim_core::tpm::kdf::sha256(&[&ak]),
            count: u64::from(verified.clock.reset_count),
        };
        self.reset_epoch = Some(epoch);
        Ok(epoch)
    }

    /// Increments the hybrid counter. NV is written only when the increment clears the low
    /// bits (once every MAX_ORDERLY_COUNT + 1), and that is what is counted as an NV write.
    pub(super) fn increment_hybrid_counter(&mut self) -> Result<u64, TreError> {
        let value = self.increment(NV_HYBRID_COUNTER, "hybrid counter")?;
        if self.orderly_mask.is_some_and(|m| value & m == 0) {
            self.count_nv_write(1);
        }
        Ok(value)
    }

    pub(super) fn read_anchor(&mut self) -> Result<AuditAnchor, TreError> {
        let b = self.read_nv(NV_AUDIT_ANCHOR, ANCHOR_SIZE as u16)?;
        let mut r = Reader::new("audit anchor", &b);
        let seq = r.u64().map_err(|e| TreError::Mismatch(e.to_string()))?;
        let head = r
            .array::<32>()
            .map_err(|e| TreError::Mismatch(e.to_string()))?;
        Ok(AuditAnchor { seq, head })
    }

    pub(super) fn write_anchor(&mut self, a: &AuditAnchor) -> Result<(), TreError> {
        let mut w = Writer::new();
        w.bytes(&a.seq.to_be_bytes()).bytes(&a.head);
        let data = MaxNvBuffer::try_from(w.finish()).map_err(cmd("TPM2_NV_Write"))?;
        let h = self.open_nv(NV_AUDIT_ANCHOR)?.ok_or_else(|| {
            TreError::Mismatch("the audit anchor is missing (TPM cleared?)".into())
        })?;
        self.count(1);
        self.count_nv_write(1);
        let r = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.nv_write(NvAuth::Owner, h, data, 0)
            })
            .map_err(cmd("TPM2_NV_Write"));
        self.close_nv(h)?;
        r
    }
}
