//! The device keys in the TPM: templates, creation at supply time, persistent handles, and
//! their public material.

use super::{AK_HANDLE, STORAGE_HANDLE, TLS_HANDLE, cmd};
use crate::tre::{DevicePublic, TreError};
use tss_esapi::Context;
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::structures::{
    EccPoint, EccScheme, HashScheme, Public, PublicBuilder, PublicEccParametersBuilder,
    SymmetricDefinitionObject,
};
use tss_esapi::traits::Marshall;

/// What every key the TPM makes for mcim shares: generated inside, never leaves this TPM
/// or its parent, usable with its (empty) auth value, not subject to dictionary-attack
/// lockout (there is no secret to guess).
pub(super) fn device_key_attributes() -> ObjectAttributesBuilder {
    ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
}

/// ECC P-256 storage key: restricted decrypt with AES-128-CFB, the parent of imported MCIM
/// secrets (TPM 2.0 Part 1, 23.3.2 storage keys).
fn storage_template() -> Result<Public, TreError> {
    let attrs = device_key_attributes()
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(cmd("storage template"))?;
    let params = PublicEccParametersBuilder::new_restricted_decryption_key(
        SymmetricDefinitionObject::AES_128_CFB,
        EccCurve::NistP256,
    )
    .build()
    .map_err(cmd("storage template"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(params)
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(cmd("storage template"))
}

/// ECC P-256 ECDSA-SHA256 signing key; `restricted` for the AK (it signs only TPM-made
/// structures such as quotes), unrestricted for the TLS key.
fn signing_template(restricted: bool) -> Result<Public, TreError> {
    let attrs = device_key_attributes()
        .with_restricted(restricted)
        .with_sign_encrypt(true)
        .build()
        .map_err(cmd("signing template"))?;
    let params = PublicEccParametersBuilder::new()
        .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
        .with_curve(EccCurve::NistP256)
        .with_is_signing_key(true)
        .with_is_decryption_key(false)
        .with_restricted(restricted)
        .with_key_derivation_function_scheme(
            tss_esapi::structures::KeyDerivationFunctionScheme::Null,
        )
        .build()
        .map_err(cmd("signing template"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(params)
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(cmd("signing template"))
}

fn persistent(handle: u32) -> Result<PersistentTpmHandle, TreError> {
    PersistentTpmHandle::new(handle).map_err(cmd("persistent handle"))
}

/// [`open_persistent`] where the object may well be absent (a device before supply): asks
/// the TPM's handle list first, so ESYS does not log an ERROR for the expected absence.
pub(super) fn probe_persistent(
    ctx: &mut Context,
    handle: u32,
) -> Result<Option<ObjectHandle>, TreError> {
    if !super::handle_present(ctx, handle)? {
        return Ok(None);
    }
    open_persistent(ctx, handle)
}

/// The ESYS handle of a persistent object, `None` if the handle is empty.
pub(super) fn open_persistent(
    ctx: &mut Context,
    handle: u32,
) -> Result<Option<ObjectHandle>, TreError> {
    let tpm_handle = TpmHandle::Persistent(persistent(handle)?);
    match ctx.execute_without_session(|c| c.tr_from_tpm_public(tpm_handle)) {
        Ok(h) => Ok(Some(h)),
        // TPM_RC_HANDLE: nothing there.
        Err(_) => Ok(None),
    }
}

/// The storage key's name (nameAlg || digest of its public area), if the key exists.
pub(super) fn storage_name_if_present(ctx: &mut Context) -> Result<Option<Vec<u8>>, TreError> {
    let Some(mut h) = probe_persistent(ctx, STORAGE_HANDLE)? else {
        return Ok(None);
    };
    let (_, name, _) = ctx
        .execute_without_session(|c| c.read_public(KeyHandle::from(h)))
        .map_err(cmd("TPM2_ReadPublic"))?;
    ctx.tr_close(&mut h).map_err(cmd("Esys_TR_Close"))?;
    Ok(Some(name.value().to_vec()))
}

/// Creates whatever device key is missing and makes it persistent. Returns how many were
/// created (each one TPM2_EvictControl, an NV write). An existing key is never replaced.
pub(super) fn ensure_all(ctx: &mut Context) -> Result<u64, TreError> {
    let mut created = 0;
    let storage = match probe_persistent(ctx, STORAGE_HANDLE)? {
        Some(h) => h,
        None => {
            let primary = ctx.execute_with_nullauth_session(|c| {
                c.create_primary(
                    Hierarchy::Owner,
                    storage_template()?,
                    None,
                    None,
                    None,
                    None,
                )
                .map_err(cmd("TPM2_CreatePrimary"))
            })?;
            let h = make_persistent(ctx, primary.key_handle.into(), STORAGE_HANDLE)?;
            created += 1;
            h
        }
    };
    for (handle, restricted) in [(AK_HANDLE, true), (TLS_HANDLE, false)] {
        if let Some(mut h) = probe_persistent(ctx, handle)? {
            ctx.tr_close(&mut h).map_err(cmd("Esys_TR_Close"))?;
            continue;
        }
        let parent = KeyHandle::from(storage);
        let key = ctx.execute_with_nullauth_session(|c| {
            c.create(
                parent,
                signing_template(restricted)?,
                None,
                None,
                None,
                None,
            )
            .map_err(cmd("TPM2_Create"))
        })?;
        let loaded = ctx.execute_with_nullauth_session(|c| {
            c.load(parent, key.out_private, key.out_public)
                .map_err(cmd("TPM2_Load"))
        })?;
        let mut h = make_persistent(ctx, loaded.into(), handle)?;
        ctx.tr_close(&mut h).map_err(cmd("Esys_TR_Close"))?;
        created += 1;
    }
    let mut storage = storage;
    ctx.tr_close(&mut storage).map_err(cmd("Esys_TR_Close"))?;
    Ok(created)
}

/// EvictControl to `handle`, then flushes the transient copy.
fn make_persistent(
    ctx: &mut Context,
    transient: ObjectHandle,
    handle: u32,
) -> Result<ObjectHandle, TreError> {
    let p = Persistent::Persistent(persistent(handle)?);
    let h = ctx.execute_with_nullauth_session(|c| {
        c.evict_control(Provision::Owner, transient, p)
            .map_err(cmd("TPM2_EvictControl"))
    })?;
    ctx.flush_context(transient)
        .map_err(cmd("TPM2_FlushContext"))?;
    Ok(h)
}

/// TPM2B_PUBLIC of a persistent key and the key itself.
fn public_of(ctx: &mut Context, handle: u32) -> Result<(Vec<u8>, Public), TreError> {
    let mut h = open_persistent(ctx, handle)?.ok_or(TreError::NotInitialised)?;
    let (public, _, _) = ctx
        .execute_without_session(|c| c.read_public(KeyHandle::from(h)))
        .map_err(cmd("TPM2_ReadPublic"))?;
    ctx.tr_close(&mut h).map_err(cmd("Esys_TR_Close"))?;
    let tpmt = public.marshall().map_err(cmd("marshal TPMT_PUBLIC"))?;
    let len = u16::try_from(tpmt.len())
        .map_err(|_| TreError::Mismatch("public area too large".into()))?;
    let mut tpm2b = len.to_be_bytes().to_vec();
    tpm2b.extend_from_slice(&tpmt);
    Ok((tpm2b, public))
}

/// DER SubjectPublicKeyInfo of an ECC P-256 public area (RFC 5480).
fn spki_of(public: &Public) -> Result<Vec<u8>, TreError> {
    let Public::Ecc { unique, .. } = public else {
        return Err(TreError::Mismatch("TLS key is not an ECC key".into()));
    };
    let (x, y) = (unique.x().value(), unique.y().value());
    if x.len() > 32 || y.len() > 32 {
        return Err(TreError::Mismatch("TLS key is not on P-256".into()));
    }
    let mut point = [0u8; 65];
    point[0] = 0x04;
    point[33 - x.len()..33].copy_from_slice(x);
    point[65 - y.len()..].copy_from_slice(y);
    Ok(crate::tre::p256_spki(&point))
}

/// The public material of the three device keys.
pub(super) fn device_public(ctx: &mut Context) -> Result<DevicePublic, TreError> {
    let (storage_public, _) = public_of(ctx, STORAGE_HANDLE)?;
    let (attestation_public, _) = public_of(ctx, AK_HANDLE)?;
    let (_, tls) = public_of(ctx, TLS_HANDLE)?;
    Ok(DevicePublic {
        storage_public,
        attestation_public,
        tls_public_spki: spki_of(&tls)?,
    })
}
