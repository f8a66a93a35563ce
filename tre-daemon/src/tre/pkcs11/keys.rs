//! The device keys and identity as token objects.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use mcim_core::identity::DeviceIdentity;

use super::ck;
use crate::tre::{DevicePublic, InitOutcome, TreError, UnwrapScheme};

/// Label of the unwrap (storage) key pair.
pub const UNWRAP_LABEL: &str = "mcim.unwrap";
/// Label of the attestation key pair.
pub const ATTESTATION_LABEL: &str = "mcim.attestation";
/// Label of the TLS key pair.
pub const TLS_LABEL: &str = "mcim.tls";
/// Label of the identity data object.
pub const IDENTITY_LABEL: &str = "mcim.identity";
const APPLICATION: &str = "mcim";

/// DER of the P-256 curve OID (CKA_EC_PARAMS).
const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Finds the one object of `class` with `label`; more than one is a broken token.
fn find(
    session: &Session,
    class: ObjectClass,
    label: &str,
) -> Result<Option<ObjectHandle>, TreError> {
    let found = session
        .find_objects(&[
            Attribute::Class(class),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(ck("C_FindObjects"))?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        many => Err(TreError::Mismatch(format!(
            "{} objects labelled {label}",
            many.len()
        ))),
    }
}

/// The identity stored at supply time.
pub(super) fn read_identity(session: &Session) -> Result<Option<DeviceIdentity>, TreError> {
    let Some(obj) = find(session, ObjectClass::DATA, IDENTITY_LABEL)? else {
        return Ok(None);
    };
    let attrs = session
        .get_attributes(obj, &[AttributeType::Value])
        .map_err(ck("C_GetAttributeValue"))?;
    let Some(Attribute::Value(v)) = attrs.into_iter().next() else {
        return Err(TreError::Mismatch(
            "the identity object has no value".into(),
        ));
    };
    serde_json::from_slice(&v)
        .map(Some)
        .map_err(|e| TreError::Mismatch(format!("identity object does not parse: {e}")))
}

/// The scheme of the unwrap key on the token, if there is one.
pub(super) fn unwrap_key_scheme(session: &Session) -> Result<Option<UnwrapScheme>, TreError> {
    let Some(obj) = find(session, ObjectClass::PRIVATE_KEY, UNWRAP_LABEL)? else {
        return Ok(None);
    };
    let attrs = session
        .get_attributes(obj, &[AttributeType::KeyType])
        .map_err(ck("C_GetAttributeValue"))?;
    Ok(match attrs.into_iter().next() {
        Some(Attribute::KeyType(KeyType::RSA)) => Some(UnwrapScheme::RsaOaep),
        _ => Some(UnwrapScheme::EcdhAesKwp),
    })
}

/// Creates the RSA-2048 unwrap key pair (the fallback for tokens without ECDH).
fn generate_rsa_unwrap(session: &Session) -> Result<(), TreError> {
    let l = UNWRAP_LABEL.as_bytes().to_vec();
    let public = [
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Label(l.clone()),
        Attribute::ModulusBits(2048.into()),
        Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
        Attribute::Encrypt(true),
        Attribute::Wrap(true),
    ];
    let private = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Label(l),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Decrypt(false),
        Attribute::Unwrap(true),
    ];
    session
        .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
        .map_err(ck("C_GenerateKeyPair(RSA)"))?;
    Ok(())
}

/// Creates an EC P-256 key pair on the token. `sign` or derive (ECDH) use.
fn generate(session: &Session, label: &str, sign: bool) -> Result<(), TreError> {
    let l = label.as_bytes().to_vec();
    let public = [
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Label(l.clone()),
        Attribute::EcParams(P256_PARAMS.to_vec()),
        Attribute::Verify(sign),
        Attribute::Derive(!sign),
    ];
    let private = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Label(l),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(sign),
        Attribute::Derive(!sign),
    ];
    session
        .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
        .map_err(ck("C_GenerateKeyPair"))?;
    Ok(())
}

/// Supply-time initialisation; see [`crate::tre::Tre::init_device`].
pub(super) fn init_device(
    session: &Session,
    identity: &DeviceIdentity,
    scheme: UnwrapScheme,
) -> Result<InitOutcome, TreError> {
    let stored = read_identity(session)?;
    let mut present = Vec::new();
    for label in [UNWRAP_LABEL, ATTESTATION_LABEL, TLS_LABEL] {
        present.push(find(session, ObjectClass::PRIVATE_KEY, label)?.is_some());
    }
    match &stored {
        Some(rec) if rec != identity => {
            return Err(TreError::AlreadyInitialised(format!(
                "device {} with PCID {}",
                rec.device_id, rec.pcid
            )));
        }
        Some(_) if present.iter().any(|p| !p) => {
            return Err(TreError::Mismatch(
                "an identity is recorded but device keys are gone (was the token reset?)".into(),
            ));
        }
        _ => {}
    }
    let mut created = false;
    for ((label, sign), here) in [
        (UNWRAP_LABEL, false),
        (ATTESTATION_LABEL, true),
        (TLS_LABEL, true),
    ]
    .into_iter()
    .zip(present)
    {
        if !here {
            if label == UNWRAP_LABEL && scheme == UnwrapScheme::RsaOaep {
                generate_rsa_unwrap(session)?;
            } else {
                generate(session, label, sign)?;
            }
            created = true;
        }
    }
    if stored.is_none() {
        let value = serde_json::to_vec(identity).map_err(|e| TreError::Mismatch(e.to_string()))?;
        session
            .create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Modifiable(false),
                Attribute::Label(IDENTITY_LABEL.as_bytes().to_vec()),
                Attribute::Application(APPLICATION.as_bytes().to_vec()),
                Attribute::Value(value),
            ])
            .map_err(ck("C_CreateObject"))?;
        created = true;
    }
    Ok(InitOutcome {
        created,
        identity: identity.clone(),
        public: device_public(session)?,
    })
}

/// The uncompressed point of a public key (CKA_EC_POINT is a DER OCTET STRING around it).
pub(super) fn ec_point(session: &Session, label: &str) -> Result<[u8; 65], TreError> {
    let obj = find(session, ObjectClass::PUBLIC_KEY, label)?.ok_or(TreError::NotInitialised)?;
    let attrs = session
        .get_attributes(obj, &[AttributeType::EcPoint])
        .map_err(ck("C_GetAttributeValue"))?;
    let Some(Attribute::EcPoint(der)) = attrs.into_iter().next() else {
        return Err(TreError::Mismatch(format!("{label} has no EC point")));
    };
    let raw = match der.as_slice() {
        [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest,
        raw if raw.len() == 65 => raw,
        _ => return Err(TreError::Mismatch(format!("{label} is not a P-256 point"))),
    };
    let mut out = [0u8; 65];
    out.copy_from_slice(raw);
    if out[0] != 0x04 {
        return Err(TreError::Mismatch(format!(
            "{label} is not an uncompressed point"
        )));
    }
    Ok(out)
}

/// DER SPKI of the RSA unwrap key.
fn rsa_spki(session: &Session) -> Result<Vec<u8>, TreError> {
    use rsa::pkcs8::EncodePublicKey;
    let obj =
        find(session, ObjectClass::PUBLIC_KEY, UNWRAP_LABEL)?.ok_or(TreError::NotInitialised)?;
    let attrs = session
        .get_attributes(
            obj,
            &[AttributeType::Modulus, AttributeType::PublicExponent],
        )
        .map_err(ck("C_GetAttributeValue"))?;
    let (mut n, mut e) = (Vec::new(), Vec::new());
    for a in attrs {
        match a {
            Attribute::Modulus(v) => n = v,
            Attribute::PublicExponent(v) => e = v,
            _ => {}
        }
    }
    let bad = || TreError::Mismatch("the RSA unwrap key is malformed".into());
    let n = rsa::BoxedUint::from_be_slice_vartime(&n);
    let e = rsa::BoxedUint::from_be_slice_vartime(&e);
    let key = rsa::PublicKey::new(n, e).map_err(|_| bad())?;
    key.to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .map_err(|_| bad())
}

/// The public material of the three key pairs, as DER SPKI.
pub(super) fn device_public(session: &Session) -> Result<DevicePublic, TreError> {
    let storage_public = match unwrap_key_scheme(session)? {
        Some(UnwrapScheme::RsaOaep) => rsa_spki(session)?,
        _ => crate::tre::p256_spki(&ec_point(session, UNWRAP_LABEL)?),
    };
    Ok(DevicePublic {
        storage_public,
        attestation_public: crate::tre::p256_spki(&ec_point(session, ATTESTATION_LABEL)?),
        tls_public_spki: crate::tre::p256_spki(&ec_point(session, TLS_LABEL)?),
    })
}

/// ECDSA P-256 by the attestation key over SHA-256(payload): r || s.
pub(super) fn sign_evidence(session: &Session, payload: &[u8]) -> Result<Vec<u8>, TreError> {
    let key = find(session, ObjectClass::PRIVATE_KEY, ATTESTATION_LABEL)?
        .ok_or(TreError::NotInitialised)?;
    let digest = mcim_core::tpm::kdf::sha256(&[payload]);
    session
        .sign(&Mechanism::Ecdsa, key, &digest)
        .map_err(ck("C_Sign(CKM_ECDSA)"))
}

/// ECDSA P-256 by the TLS key over SHA-256(message), DER.
pub(super) fn sign_tls(session: &Session, message: &[u8]) -> Result<Vec<u8>, TreError> {
    let key =
        find(session, ObjectClass::PRIVATE_KEY, TLS_LABEL)?.ok_or(TreError::NotInitialised)?;
    let digest = mcim_core::tpm::kdf::sha256(&[message]);
    let raw = session
        .sign(&Mechanism::Ecdsa, key, &digest)
        .map_err(ck("C_Sign(CKM_ECDSA)"))?;
    if raw.len() != 64 {
        return Err(TreError::Mismatch("CKM_ECDSA did not return r || s".into()));
    }
    crate::tre::ecdsa_der(&raw[..32], &raw[32..])
}
