//! The registry's integrity key, rollback counter and audit anchor on a token.
//!
//! The integrity key is a token HMAC key (CKK_GENERIC_SECRET, sensitive, never extractable;
//! CKM_SHA256_HMAC). The counter and the anchor are private data objects that the daemon
//! rewrites. **This is weaker than a TPM:** a PKCS#11 token has no monotonic counter, so
//! whoever can restore the token's own storage (SoftHSM2's token directory, or a token backup)
//! together with the state directory rolls both back consistently and is not detected. A
//! hardware token whose storage cannot be restored bounds that; the TPM's NV counter does not
//! have the gap at all. `capabilities().monotonic_counter` is false for this reason.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::{Pkcs11Tre, ck};
use crate::tre::{AuditAnchor, TreError};

/// Label of the integrity (HMAC) key.
pub const INTEGRITY_LABEL: &str = "mcim.integrity";
/// Label of the rollback counter data object.
pub const COUNTER_LABEL: &str = "mcim.counter";
/// Label of the audit anchor data object.
pub const ANCHOR_LABEL: &str = "mcim.audit-anchor";

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
    Ok(found.first().copied())
}

fn data_object(session: &Session, label: &str, value: Vec<u8>) -> Result<(), TreError> {
    session
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Modifiable(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Application(b"mcim".to_vec()),
            Attribute::Value(value),
        ])
        .map_err(ck("C_CreateObject"))?;
    Ok(())
}

/// Creates what is missing (supply time). Idempotent.
pub(super) fn ensure(session: &Session) -> Result<(), TreError> {
    if find(session, ObjectClass::SECRET_KEY, INTEGRITY_LABEL)?.is_none() {
        session
            .generate_key(
                &Mechanism::GenericSecretKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::GENERIC_SECRET),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Sign(true),
                    Attribute::Label(INTEGRITY_LABEL.as_bytes().to_vec()),
                ],
            )
            .map_err(ck("C_GenerateKey(integrity)"))?;
    }
    if find(session, ObjectClass::DATA, COUNTER_LABEL)?.is_none() {
        data_object(session, COUNTER_LABEL, 0u64.to_be_bytes().to_vec())?;
    }
    if find(session, ObjectClass::DATA, ANCHOR_LABEL)?.is_none() {
        data_object(session, ANCHOR_LABEL, vec![0u8; ANCHOR_LEN])?;
    }
    Ok(())
}

fn missing(what: &str) -> TreError {
    TreError::Mismatch(format!("the token's {what} is missing (token reset?)"))
}

/// The anchor object: generation (8) || seq (8) || head (32).
const ANCHOR_LEN: usize = 48;

/// The newest value of a data object that starts with a big-endian generation number. Tokens
/// (SoftHSM2 among them) need not let CKA_VALUE change, so a write creates the new object
/// first and then destroys the old: a cut in between leaves two, and the newer one wins.
fn read_value(session: &Session, label: &str, len: usize) -> Result<Vec<u8>, TreError> {
    let objs = session
        .find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(ck("C_FindObjects"))?;
    let mut best: Option<Vec<u8>> = None;
    for obj in objs {
        let attrs = session
            .get_attributes(obj, &[AttributeType::Value])
            .map_err(ck("C_GetAttributeValue"))?;
        match attrs.into_iter().next() {
            Some(Attribute::Value(v)) if v.len() == len => {
                if best.as_ref().is_none_or(|b| v[..8] > b[..8]) {
                    best = Some(v);
                }
            }
            _ => return Err(TreError::Mismatch(format!("{label} is malformed"))),
        }
    }
    best.ok_or_else(|| missing(label))
}

/// Writes a new value: creates the new object, then destroys the older ones.
fn replace_value(session: &Session, label: &str, value: Vec<u8>) -> Result<(), TreError> {
    let old = session
        .find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(ck("C_FindObjects"))?;
    data_object(session, label, value)?;
    for o in old {
        session.destroy_object(o).map_err(ck("C_DestroyObject"))?;
    }
    Ok(())
}

fn u64_at(v: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&v[at..at + 8]);
    u64::from_be_bytes(b)
}

impl Pkcs11Tre {
    pub(super) fn mac_digest(&mut self, digest: &[u8; 32]) -> Result<[u8; 32], TreError> {
        let key = find(&self.session, ObjectClass::SECRET_KEY, INTEGRITY_LABEL)?
            .ok_or(TreError::NotInitialised)?;
        let mac = self
            .session
            .sign(&Mechanism::Sha256Hmac, key, digest)
            .map_err(ck("C_Sign(CKM_SHA256_HMAC)"))?;
        mac.as_slice().try_into().map_err(|_| TreError::Command {
            command: "C_Sign(CKM_SHA256_HMAC)",
            detail: "not 32 octets".into(),
        })
    }

    pub(super) fn read_counter(&mut self) -> Result<u64, TreError> {
        Ok(u64_at(&read_value(&self.session, COUNTER_LABEL, 8)?, 0))
    }

    pub(super) fn increment_counter(&mut self) -> Result<u64, TreError> {
        let next = self
            .read_counter()?
            .checked_add(1)
            .ok_or_else(|| TreError::Mismatch("the counter is exhausted".into()))?;
        replace_value(&self.session, COUNTER_LABEL, next.to_be_bytes().to_vec())?;
        Ok(next)
    }

    pub(super) fn read_anchor(&mut self) -> Result<AuditAnchor, TreError> {
        let v = read_value(&self.session, ANCHOR_LABEL, ANCHOR_LEN)?;
        let mut head = [0u8; 32];
        head.copy_from_slice(&v[16..]);
        Ok(AuditAnchor {
            seq: u64_at(&v, 8),
            head,
        })
    }

    pub(super) fn write_anchor(&mut self, a: &AuditAnchor) -> Result<(), TreError> {
        let generation =
            u64_at(&read_value(&self.session, ANCHOR_LABEL, ANCHOR_LEN)?, 0).saturating_add(1);
        let mut v = generation.to_be_bytes().to_vec();
        v.extend_from_slice(&a.seq.to_be_bytes());
        v.extend_from_slice(&a.head);
        replace_value(&self.session, ANCHOR_LABEL, v)
    }
}
