//! The parties on the wire (TR 33.812 5.1.3.5; annex x.3): roles, the identity a certificate
//! carries, server names, certificate -> caller, platform credentials.

use std::fmt;

use crate::{PkiError, cert_err};

/// A role as its certificate names it (`urn:mcim:<role>:<name>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The M2M equipment supplier and its CCIF (5.1.3.5.3, 5.1.3.4.1).
    Supplier,
    /// The Registration Operator: ICF, DRF, DPF (5.1.3.5.4).
    Ro,
    /// The Visited Network Operator (5.1.3.5.5).
    Vno,
    /// The Selected Home Operator (5.1.3.5.6).
    Sho,
    /// The Platform Validation Authority (5.1.3.5.8).
    Pva,
    /// An M2M equipment, by its TRE-held TLS key (5.1.3.5.1).
    Device,
    /// The M2ME subscriber / owner (5.1.3.5.2).
    Subscriber,
}

impl Role {
    /// The name in certificates.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Supplier => "supplier",
            Role::Ro => "ro",
            Role::Vno => "vno",
            Role::Sho => "sho",
            Role::Pva => "pva",
            Role::Device => "device",
            Role::Subscriber => "subscriber",
        }
    }

    /// Parses a certificate's role name.
    pub fn parse(s: &str) -> Option<Role> {
        ALL_ROLES.iter().copied().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every role.
pub const ALL_ROLES: [Role; 7] = [
    Role::Supplier,
    Role::Ro,
    Role::Vno,
    Role::Sho,
    Role::Pva,
    Role::Device,
    Role::Subscriber,
];

/// An authenticated caller: its role and name (for a device, its PCID).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The role.
    pub role: Role,
    /// The name in its certificate (an operator's id, a device's PCID).
    pub name: String,
}

/// The identity URI of a party.
pub fn identity_uri(role: Role, name: &str) -> String {
    format!("urn:mcim:{}:{name}", role.as_str())
}

/// The server name a role's certificate carries (`<role>.mcim.local`).
pub fn server_name(role: Role) -> String {
    format!("{}.mcim.local", role.as_str())
}

/// The URI a platform credential names the TRE's storage key by:
/// `urn:mcim:storage-key:sha256:<hex of SHA-256 of its public area or SPKI>`.
pub fn storage_key_uri(storage_public: &[u8]) -> String {
    use sha2::Digest;
    format!(
        "{STORAGE_KEY_URN}{}",
        hex::encode(sha2::Sha256::digest(storage_public))
    )
}

const STORAGE_KEY_URN: &str = "urn:mcim:storage-key:sha256:";

/// The caller a (verified) peer certificate names: its `urn:mcim:<role>:<name>` URI SAN.
pub fn caller_from_cert(der: &[u8]) -> Result<Caller, PkiError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(cert_err)?;
    let san = cert
        .subject_alternative_name()
        .map_err(cert_err)?
        .ok_or(PkiError::NoIdentity)?;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name
            && let Some(rest) = uri.strip_prefix("urn:mcim:")
            && let Some((role, who)) = rest.split_once(':')
            && let Some(role) = Role::parse(role)
            && !who.is_empty()
        {
            return Ok(Caller {
                role,
                name: who.to_string(),
            });
        }
    }
    Err(PkiError::NoIdentity)
}

/// What a verified platform credential says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformCredential {
    /// The device's PCID.
    pub pcid: String,
    /// Its model.
    pub model: String,
    /// The attestation key's uncompressed P-256 point.
    pub ak_point: [u8; 65],
    /// The storage key the supplier certified ([`storage_key_uri`]), when the credential
    /// names one.
    pub storage_key_uri: Option<String>,
}

impl PlatformCredential {
    /// Whether `storage_public` is the storage key this credential certifies.
    pub fn certifies_storage_key(&self, storage_public: &[u8]) -> bool {
        self.storage_key_uri.as_deref() == Some(storage_key_uri(storage_public).as_str())
    }
}

/// Checks a platform credential (AK certificate first) against the supplier root `root_der`:
/// the signature, and that it names a device and a model.
pub fn verify_platform_credential(
    root_der: &[u8],
    chain: &[Vec<u8>],
) -> Result<PlatformCredential, PkiError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let leaf_der = chain
        .first()
        .ok_or_else(|| PkiError::Cert("empty platform credential".into()))?;
    let (_, root) = X509Certificate::from_der(root_der).map_err(cert_err)?;
    let (_, leaf) = X509Certificate::from_der(leaf_der).map_err(cert_err)?;
    leaf.verify_signature(Some(root.public_key()))
        .map_err(|_| {
            PkiError::Cert("the platform credential is not signed by the supplier root".into())
        })?;
    if !leaf.validity().is_valid() {
        return Err(PkiError::Cert(
            "the platform credential is not valid now".into(),
        ));
    }
    let caller = caller_from_cert(leaf_der)?;
    if caller.role != Role::Device {
        return Err(PkiError::NoIdentity);
    }
    let model = leaf
        .subject()
        .iter_organizational_unit()
        .next()
        .and_then(|ou| ou.as_str().ok())
        .ok_or_else(|| PkiError::Cert("the platform credential names no model".into()))?
        .to_string();
    let point: [u8; 65] = leaf
        .public_key()
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| PkiError::Cert("the attestation key is not a P-256 point".into()))?;
    let storage_key_uri = leaf
        .subject_alternative_name()
        .map_err(cert_err)?
        .into_iter()
        .flat_map(|san| san.value.general_names.iter())
        .find_map(|n| match n {
            x509_parser::prelude::GeneralName::URI(u) if u.starts_with(STORAGE_KEY_URN) => {
                Some((*u).to_string())
            }
            _ => None,
        });
    Ok(PlatformCredential {
        pcid: caller.name,
        model,
        ak_point: point,
        storage_key_uri,
    })
}

/// The P-256 key and the identity of a certificate `leaf_der` issued by `ca_der` and valid
/// now (a device statement's signer under the supplier root, a supplier's voucher under its
/// CA). `Err` says which of those failed.
pub fn leaf_key_under(
    ca_der: &[u8],
    leaf_der: &[u8],
) -> Result<(p256::ecdsa::VerifyingKey, Caller), &'static str> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, ca) = X509Certificate::from_der(ca_der).map_err(|_| "the CA is unreadable")?;
    let (_, leaf) = X509Certificate::from_der(leaf_der).map_err(|_| "unreadable certificate")?;
    leaf.verify_signature(Some(ca.public_key()))
        .map_err(|_| "the certificate is not the CA's")?;
    if !leaf.validity().is_valid() {
        return Err("the certificate is not valid now");
    }
    let caller = caller_from_cert(leaf_der).map_err(|_| "the certificate names no party")?;
    let key =
        p256::ecdsa::VerifyingKey::from_sec1_bytes(&leaf.public_key().subject_public_key.data)
            .map_err(|_| "not a P-256 key")?;
    Ok((key, caller))
}

/// The statement-signing key of the party `name` of `role` from its certificate `cert_der`,
/// which an anchor that may vouch for `role` must have issued (the SHO's signature on a
/// discard acknowledgment, checked by the RO's DPF).
pub fn party_key(
    anchors: &TrustAnchors,
    cert_der: &[u8],
    role: Role,
    name: &str,
) -> Result<p256::ecdsa::VerifyingKey, PkiError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    if !anchors.vouches(&[cert_der], role) {
        return Err(PkiError::Cert(format!(
            "the signer is no {role} under its CA"
        )));
    }
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| PkiError::Cert(e.to_string()))?;
    if !cert.validity().is_valid() {
        return Err(PkiError::Cert(
            "the signer's certificate is not valid now".into(),
        ));
    }
    let caller = caller_from_cert(cert_der)?;
    if caller.role != role || caller.name != name {
        return Err(PkiError::Cert(format!(
            "the signer is {} {}, not {role} {name}",
            caller.role, caller.name
        )));
    }
    p256::ecdsa::VerifyingKey::from_sec1_bytes(&cert.public_key().subject_public_key.data)
        .map_err(|_| PkiError::Cert("not a P-256 key".into()))
}

/// Which CA may vouch for which roles (annex x.3: the supplier root for devices, each
/// operator's CA for that operator's roles). A certificate chains to one of them (the TLS
/// handshake checked that); this says whether that one may issue the role it claims.
#[derive(Clone, Debug, Default)]
pub struct TrustAnchors {
    anchors: Vec<(Vec<u8>, Vec<Role>)>,
}

impl TrustAnchors {
    /// From CA certificates (DER) and the roles each may vouch for.
    pub fn new(anchors: Vec<(Vec<u8>, Vec<Role>)>) -> Self {
        Self { anchors }
    }

    /// Whether the leaf of `chain` (DER, leaf first, as the peer presented it) descends, link
    /// by link through the certificates presented, from a CA that may vouch for `role`. A
    /// certificate merely presented alongside (a genuine one of that role, appended) proves
    /// nothing: each link must sign the one before it.
    ///
    /// Bounded for a hostile chain (found by an outside attack: a leaf followed by ~150
    /// self-signed certificates named like its issuer cost ~N² signature checks, seconds of
    /// CPU per call): at most [`MAX_CHAIN`] certificates are looked at (a longer chain is
    /// refused unread), a certificate is a link at most once (no cycles: a self-signed
    /// certificate that is no anchor ends the walk), and each (issuer, certificate) pair's
    /// signature is checked at most once.
    pub fn vouches<C: AsRef<[u8]>>(&self, chain: &[C], role: Role) -> bool {
        use x509_parser::prelude::{FromDer, X509Certificate};
        if chain.is_empty() || chain.len() > MAX_CHAIN {
            return false;
        }
        let certs: Vec<X509Certificate<'_>> = chain
            .iter()
            .filter_map(|c| X509Certificate::from_der(c.as_ref()).ok().map(|(_, c)| c))
            .collect();
        if certs.len() != chain.len() {
            return false;
        }
        let anchors: Vec<X509Certificate<'_>> = self
            .anchors
            .iter()
            .filter(|(_, roles)| roles.contains(&role))
            .filter_map(|(der, _)| X509Certificate::from_der(der).ok().map(|(_, c)| c))
            .collect();
        let signs = |issuer: &X509Certificate<'_>, c: &X509Certificate<'_>| {
            c.issuer() == issuer.subject() && c.verify_signature(Some(issuer.public_key())).is_ok()
        };
        let is_ca = |c: &X509Certificate<'_>| {
            c.basic_constraints()
                .ok()
                .flatten()
                .is_some_and(|b| b.value.ca)
        };
        // tried[i][j]: whether certs[i]'s signature on certs[j] was checked already.
        let mut tried = [[false; MAX_CHAIN]; MAX_CHAIN];
        let mut on_path = [false; MAX_CHAIN];
        let mut cur = 0usize;
        on_path[0] = true;
        // At most as many links as certificates presented.
        for _ in 0..certs.len() {
            if anchors.iter().any(|a| signs(a, &certs[cur])) {
                return true;
            }
            let next = (0..certs.len()).find(|&i| {
                if on_path[i] || tried[i][cur] || !is_ca(&certs[i]) {
                    return false;
                }
                tried[i][cur] = true;
                signs(&certs[i], &certs[cur])
            });
            match next {
                Some(i) => {
                    on_path[i] = true;
                    cur = i;
                }
                None => return false,
            }
        }
        false
    }
}

/// The most certificates a peer's chain may hold for [`TrustAnchors::vouches`] (leaf and
/// intermediates; the lab's chains have one or two).
pub const MAX_CHAIN: usize = 4;

/// Checks that `cert_der` is signed by a CA in `ca_pem`, is valid now, and carries the URI SAN
/// `urn:mcim:<role>:<name>`; returns its P-256 key.
pub fn verify_party(
    ca_pem: &[u8],
    cert_der: &[u8],
    role: Role,
    name: &str,
) -> Result<p256::ecdsa::VerifyingKey, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| e.to_string())?;
    let signed = CertificateDer::pem_slice_iter(ca_pem).flatten().any(|ca| {
        X509Certificate::from_der(&ca)
            .map(|(_, ca)| cert.verify_signature(Some(ca.public_key())).is_ok())
            .unwrap_or(false)
    });
    if !signed {
        return Err(format!(
            "the {role} certificate is not signed by the roles' CA"
        ));
    }
    if !cert.validity().is_valid() {
        return Err(format!("the {role} certificate is not valid now"));
    }
    let want = identity_uri(role, name);
    let named = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value
                .general_names
                .iter()
                .any(|g| matches!(g, GeneralName::URI(u) if *u == want))
        });
    if !named {
        return Err(format!("the certificate does not name {want}"));
    }
    p256::ecdsa::VerifyingKey::from_sec1_bytes(&cert.public_key().subject_public_key.data)
        .map_err(|_| format!("the {role} key is not P-256"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> Vec<u8> {
        rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
            .unwrap()
    }

    /// The anchor must sign the leaf's own path: appending a genuine certificate of the role
    /// (public material) to a leaf from another CA proves nothing.
    #[test]
    fn an_appended_genuine_certificate_does_not_vouch_for_a_forged_leaf() {
        let dir = tempfile::tempdir().unwrap();
        crate::dev::init(dir.path(), &crate::dev::LAB_PARTIES).unwrap();
        let anchors = crate::dev::trust_anchors(dir.path()).unwrap();
        let genuine = crate::dev::ca_der(dir.path(), "sho").unwrap();
        assert!(anchors.vouches(std::slice::from_ref(&genuine), Role::Sho));
        let (forged, _) =
            crate::dev::issue_party_under(dir.path(), "ca-vno", Role::Sho, "sho.mcim.local")
                .unwrap();
        let forged = der(&forged);
        assert!(!anchors.vouches(std::slice::from_ref(&forged), Role::Sho));
        assert!(!anchors.vouches(&[forged.clone(), genuine.clone()], Role::Sho));
        // The genuine SHO certificate is no CA: it cannot be a link either.
        assert!(!anchors.vouches(&[forged, genuine], Role::Sho));
        // A VNO certificate from the VNO's CA vouches for the VNO only.
        let (vno, _) = crate::dev::issue_party_under(dir.path(), "ca-vno", Role::Vno, "v").unwrap();
        assert!(anchors.vouches(&[der(&vno)], Role::Vno));
        assert!(!anchors.vouches(&[der(&vno)], Role::Sho));
    }

    /// A hostile chain (found by an outside attack): a leaf from the wrong CA followed by
    /// self-signed CAs named like its issuer and the issuer itself. Refused, and a chain
    /// longer than [`MAX_CHAIN`] is refused unread, even behind a genuine leaf; a genuine leaf
    /// with such junk behind it (within the bound) still passes.
    #[test]
    fn a_hostile_chain_is_refused_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        crate::dev::init(dir.path(), &crate::dev::LAB_PARTIES).unwrap();
        let anchors = crate::dev::trust_anchors(dir.path()).unwrap();
        let ca_vno = crate::dev::ca_der(dir.path(), "ca-vno").unwrap();
        let junk = || {
            crate::dev::impostor_ca(dir.path(), "ca-vno")
                .unwrap()
                .der()
                .to_vec()
        };
        let (forged, _) =
            crate::dev::issue_party_under(dir.path(), "ca-vno", Role::Sho, "sho.mcim.local")
                .unwrap();
        let forged = der(&forged);
        let hostile = vec![forged.clone(), junk(), junk(), ca_vno.clone()];
        assert_eq!(hostile.len(), MAX_CHAIN);
        assert!(!anchors.vouches(&hostile, Role::Sho));
        let cycle = vec![
            forged.clone(),
            ca_vno.clone(),
            ca_vno.clone(),
            ca_vno.clone(),
        ];
        assert!(!anchors.vouches(&cycle, Role::Sho));
        let genuine = crate::dev::ca_der(dir.path(), "sho").unwrap();
        let mut behind = vec![genuine.clone(), junk(), junk(), ca_vno.clone()];
        assert!(anchors.vouches(&behind, Role::Sho));
        behind.push(junk());
        assert!(
            !anchors.vouches(&behind, Role::Sho),
            "longer than MAX_CHAIN"
        );
        assert!(!anchors.vouches(&[] as &[Vec<u8>], Role::Sho));
    }
}
