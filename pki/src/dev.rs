//! A development PKI in a directory, for labs and tests (`mcimctl pki init`): one CA, and a
//! certificate per party whose identity is a URI SAN `urn:mcim:<role>:<name>` (what
//! [`crate::party::caller_from_cert`] reads and the authorization table decides on), plus a
//! DNS SAN for server-name checks. Devices get theirs for the public key their TRE holds.
//!
//! Files in the directory (keys 0600):
//! - `ca-<role>.pem` / `.key`: one CA per operator party (supplier, ro, vno, sho, pva,
//!   subscriber), which issues that party's certificates only: in a real deployment every
//!   operator has its own CA, and an anchor vouches only for the roles it may issue
//!   ([`trust_anchors`]);
//! - `supplier-root.pem` / `.key`: the equipment supplier's root, which certifies devices'
//!   attestation and TLS keys (5.1.3.5.8, PfC (1)) and nothing else;
//! - `<role>.pem` / `<role>.key`: each party's own certificate;
//! - `ca.pem`: the bundle of every operator CA, what a client trusts for the roles' servers
//!   when it does not know which one it calls (`tred`'s `ca_file`).
//!
//! A directory made before per-party CAs (one `ca.pem` with its `ca.key`) keeps working: its
//! one CA vouches for every operator role. A production deployment brings its own CAs.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::party::{PlatformCredential, Role, TrustAnchors, identity_uri, storage_key_uri};
use crate::{PkiError, cert_err};

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|e| PkiError::File {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

fn write(path: &Path, text: &str, secret: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| PkiError::File {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

/// A role's data key for the secrets at rest in its database (`<party>.dbkey`: 32 random
/// octets, mode 0600), made unless it exists; returns its path. `init` makes the RO's and the
/// SHOs' with their certificates, so that a role whose PKI folder it may only read (as under
/// its systemd unit) finds it; the role reads it (`mcim_roles::atrest`).
pub fn data_key_file(dir: &Path, party: &str) -> Result<std::path::PathBuf, PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(format!("{party}.dbkey"));
    if !path.exists() {
        let err = |e: std::io::Error| PkiError::File {
            path: path.clone(),
            detail: e.to_string(),
        };
        let mut k = zeroize::Zeroizing::new([0u8; 32]);
        rand::Rng::fill_bytes(&mut rand::rng(), &mut k[..]);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(err)?;
        f.write_all(&k[..]).map_err(err)?;
    }
    Ok(path)
}

/// The parties of a development PKI, one per role with its server name (`mcimctl pki init`,
/// the lab).
pub const LAB_PARTIES: [(Role, &str); 6] = [
    (Role::Supplier, "supplier.mcim.local"),
    (Role::Ro, "ro.mcim.local"),
    (Role::Vno, "vno.mcim.local"),
    (Role::Sho, "sho.mcim.local"),
    (Role::Pva, "pva.mcim.local"),
    (Role::Subscriber, "subscriber.mcim.local"),
];

/// The lab's second SHO (5.1.3.7: the operator a device changes to): its files in the PKI
/// directory (`sho2.pem`, `sho2.key`) and its identity. It is issued by the SHOs' CA like the
/// first; its server certificate also answers to the role's server name, so TLS proves "an
/// SHO" and what each SHO signs proves which one.
pub const SECOND_SHO: (&str, &str) = ("sho2", "sho2.mcim.local");

/// Creates the CA if missing, then a key and certificate for every party that has none (and,
/// when the SHO is among them, for the lab's [`SECOND_SHO`]).
/// Existing files are kept (idempotent). Returns the parties created.
pub fn init(dir: &Path, parties: &[(Role, &str)]) -> Result<Vec<Role>, PkiError> {
    std::fs::create_dir_all(dir).map_err(|e| PkiError::File {
        path: dir.to_path_buf(),
        detail: e.to_string(),
    })?;
    let legacy = dir.join("ca.key").exists();
    if !legacy {
        for role in OPERATORS {
            let ca = ca_file(role);
            if !dir.join(format!("{ca}.pem")).exists() {
                make_ca(dir, &ca, &format!("mcim development CA of the {role}"))?;
            }
        }
        // The bundle clients trust for servers, rewritten from the CAs present.
        let mut bundle = String::new();
        for role in OPERATORS {
            bundle.push_str(&read(&dir.join(format!("{}.pem", ca_file(role))))?);
        }
        write(&dir.join("ca.pem"), &bundle, false)?;
    }
    if !dir.join("supplier-root.pem").exists() {
        make_ca(dir, "supplier-root", "mcim equipment supplier root")?;
    }
    let mut made = Vec::new();
    for (role, name) in parties {
        if init_party_file(dir, role.as_str(), *role, name)? {
            made.push(*role);
        }
        // The roles that keep subscriber secrets at rest: the RO (its ICF) and the SHO.
        if matches!(role, Role::Ro | Role::Sho) {
            data_key_file(dir, role.as_str())?;
        }
    }
    if parties.iter().any(|(r, _)| *r == Role::Sho) {
        init_party_file(dir, SECOND_SHO.0, Role::Sho, SECOND_SHO.1)?;
        data_key_file(dir, SECOND_SHO.0)?;
    }
    Ok(made)
}

/// A key and certificate for the party `name` of `role` in `<file>.pem` / `<file>.key`,
/// unless the certificate exists. Returns whether it made them.
pub fn init_party_file(dir: &Path, file: &str, role: Role, name: &str) -> Result<bool, PkiError> {
    let pem = dir.join(format!("{file}.pem"));
    if pem.exists() {
        return Ok(false);
    }
    let key = KeyPair::generate().map_err(cert_err)?;
    let cert = party_params(role, name)?
        .signed_by(&key, &issuer_of(dir, role)?)
        .map_err(cert_err)?;
    write(&dir.join(format!("{file}.key")), &key.serialize_pem(), true)?;
    write(&pem, &cert.pem(), false)?;
    Ok(true)
}

/// The operator parties, each with a CA of its own.
pub const OPERATORS: [Role; 6] = [
    Role::Supplier,
    Role::Ro,
    Role::Vno,
    Role::Sho,
    Role::Pva,
    Role::Subscriber,
];

/// The file name (without `.pem`) of the CA that issues `role`'s certificates.
pub fn ca_file(role: Role) -> String {
    match role {
        Role::Device => "supplier-root".into(),
        r => format!("ca-{}", r.as_str()),
    }
}

/// The CA that issues `role`'s certificates: its own, or the one CA of a directory made
/// before per-party CAs.
fn issuer_of(dir: &Path, role: Role) -> Result<Issuer<'static, KeyPair>, PkiError> {
    issuer(dir, &issuer_name(dir, role))
}

/// The file name (without `.pem`) of the CA that issues `role`'s certificates in this
/// directory: its own, or the one CA of a directory made before per-party CAs.
pub fn issuer_name(dir: &Path, role: Role) -> String {
    let own = ca_file(role);
    if dir.join(format!("{own}.pem")).exists() {
        own
    } else {
        "ca".into()
    }
}

/// Which CA may vouch for which roles, from the directory: `ca-<role>.pem` for that role,
/// `supplier-root.pem` for devices (and, in a directory made before per-party CAs, `ca.pem`
/// for every operator role).
pub fn trust_anchors(dir: &Path) -> Result<TrustAnchors, PkiError> {
    let mut anchors = Vec::new();
    for role in OPERATORS {
        let file = dir.join(format!("{}.pem", ca_file(role)));
        if file.exists() {
            anchors.push((ca_der(dir, &ca_file(role))?, vec![role]));
        }
    }
    if dir.join("ca.key").exists() {
        anchors.push((ca_der(dir, "ca")?, OPERATORS.to_vec()));
    }
    anchors.push((ca_der(dir, "supplier-root")?, vec![Role::Device]));
    Ok(TrustAnchors::new(anchors))
}

/// The CA a client trusts for the server of `role`, PEM: that role's own CA, or the one CA of
/// a directory made before per-party CAs.
pub fn role_ca_pem(dir: &Path, role: Role) -> Result<Vec<u8>, PkiError> {
    Ok(read(&dir.join(format!("{}.pem", issuer_name(dir, role))))?.into_bytes())
}

/// A self-signed CA: `<file>.pem`, `<file>.key`.
fn make_ca(dir: &Path, file: &str, cn: &str) -> Result<(), PkiError> {
    let key = KeyPair::generate().map_err(cert_err)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).map_err(cert_err)?;
    write(&dir.join(format!("{file}.key")), &key.serialize_pem(), true)?;
    write(&dir.join(format!("{file}.pem")), &cert.pem(), false)
}

/// The CA `<file>` as an issuer.
fn issuer(dir: &Path, file: &str) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key = KeyPair::from_pem(&read(&dir.join(format!("{file}.key")))?).map_err(cert_err)?;
    Issuer::from_ca_cert_pem(&read(&dir.join(format!("{file}.pem")))?, key).map_err(cert_err)
}

/// The DER of the CA `<file>.pem`.
pub fn ca_der(dir: &Path, file: &str) -> Result<Vec<u8>, PkiError> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(
        read(&dir.join(format!("{file}.pem")))?.as_bytes(),
    )
    .map(|c| c.to_vec())
    .map_err(cert_err)
}

/// A self-signed CA certificate named like the CA `<file>` (its common name, its own
/// fresh key): the junk a hostile client puts in its chain so that a path builder tries it.
/// For tests of the chain bounds (`party::MAX_CHAIN`, the roles' TLS verifier).
pub fn impostor_ca(dir: &Path, file: &str) -> Result<rcgen::Certificate, PkiError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let real = ca_der(dir, file)?;
    let (_, c) = X509Certificate::from_der(&real).map_err(cert_err)?;
    let mut dn = DistinguishedName::new();
    for cn in c.subject().iter_common_name() {
        dn.push(DnType::CommonName, cn.as_str().map_err(cert_err)?);
    }
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    params.distinguished_name = dn;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = KeyPair::generate().map_err(cert_err)?;
    params.self_signed(&key).map_err(cert_err)
}

fn party_params(role: Role, name: &str) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{role} {name}"));
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(
        identity_uri(role, name).try_into().map_err(cert_err)?,
    )];
    if role != Role::Device {
        params
            .subject_alt_names
            .push(SanType::DnsName(name.try_into().map_err(cert_err)?));
        // A further party of a role (a second SHO) also serves under the role's name.
        let role_name = crate::party::server_name(role);
        if name != role_name {
            params
                .subject_alt_names
                .push(SanType::DnsName(role_name.try_into().map_err(cert_err)?));
        }
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}

/// The TRE's P-256 public key (the point inside its SPKI) for rcgen.
struct P256Point(Vec<u8>);

impl rcgen::PublicKeyData for P256Point {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Certifies a device's TLS key (DER SPKI of a P-256 key held by its TRE) for `pcid` under
/// the CA `<ca>` ("ca" in labs, "supplier-root" when the supplier certifies).
fn device_cert(
    dir: &Path,
    ca: &str,
    pcid: &str,
    tls_spki: &[u8],
) -> Result<rcgen::Certificate, PkiError> {
    // A P-256 SPKI whose point is on the curve: the supplier root certifies no other.
    mcim_core::token_wrap::spki_point(tls_spki)
        .map_err(|_| PkiError::Cert("the device TLS key is not a P-256 SPKI".into()))?;
    let point = &tls_spki[mcim_core::token_wrap::P256_SPKI_PREFIX.len()..];
    party_params(Role::Device, pcid)?
        .signed_by(&P256Point(point.to_vec()), &issuer(dir, ca)?)
        .map_err(cert_err)
}

/// [`device_cert`] as DER.
pub fn issue_device_der(
    dir: &Path,
    ca: &str,
    pcid: &str,
    tls_spki: &[u8],
) -> Result<Vec<u8>, PkiError> {
    Ok(device_cert(dir, ca, pcid, tls_spki)?.der().to_vec())
}

/// A device whose key is in software, certified under the supplier root: NOT a real device
/// (no TRE), for labs and tests that need a second, untrusted device (an impostor). Returns
/// the certificate and the private key, PEM.
pub fn issue_software_device(dir: &Path, pcid: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(cert_err)?;
    let cert = party_params(Role::Device, pcid)?
        .signed_by(&key, &issuer(dir, "supplier-root")?)
        .map_err(cert_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A further party of `role` named `name` under the development CA (a second SHO, another
/// subscriber): its certificate and private key, PEM. For tests of who owns what.
pub fn issue_party(dir: &Path, role: Role, name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(cert_err)?;
    let cert = party_params(role, name)?
        .signed_by(&key, &issuer_of(dir, role)?)
        .map_err(cert_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A certificate claiming `role` named `name`, issued by the CA `<ca>` of the directory
/// whatever that CA may vouch for: for tests that a wrong root is refused.
pub fn issue_party_under(
    dir: &Path,
    ca: &str,
    role: Role,
    name: &str,
) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(cert_err)?;
    let cert = party_params(role, name)?
        .signed_by(&key, &issuer(dir, ca)?)
        .map_err(cert_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A device certificate under the supplier root, as PEM (`mcimctl pki device`).
pub fn issue_device(dir: &Path, pcid: &str, tls_spki: &[u8]) -> Result<String, PkiError> {
    Ok(device_cert(dir, "supplier-root", pcid, tls_spki)?.pem())
}

/// Certifies a device's attestation key under the supplier root (the platform credential,
/// 5.1.3.5.8 PfC): `ak_p256_point` is the key's uncompressed point (from its TPM2B_PUBLIC or
/// SPKI); the certificate names the device by PCID. Returns DER.
pub fn issue_attestation_der(
    dir: &Path,
    pcid: &str,
    model: &str,
    ak_p256_point: &[u8; 65],
    storage_public: &[u8],
) -> Result<Vec<u8>, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("attestation key of {pcid}"));
    // The model keys the PVA's reference values.
    dn.push(DnType::OrganizationalUnitName, model);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![
        SanType::URI(
            identity_uri(Role::Device, pcid)
                .try_into()
                .map_err(cert_err)?,
        ),
        // The TRE's storage key, the one an SHO wraps the MCIM to (5.1.3.6.2 step 11): the
        // supplier vouches that it lives in this device's TRE, so a subscriber cannot hand
        // the SHO a key of its own.
        SanType::URI(
            storage_key_uri(storage_public)
                .try_into()
                .map_err(cert_err)?,
        ),
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params
        .signed_by(
            &P256Point(ak_p256_point.to_vec()),
            &issuer(dir, "supplier-root")?,
        )
        .map_err(cert_err)?;
    Ok(cert.der().to_vec())
}

/// A role's private key (`<role>.key`) as a P-256 signing key (the PVA signs results with it).
pub fn signing_key(dir: &Path, file: &str) -> Result<p256::ecdsa::SigningKey, PkiError> {
    use p256::pkcs8::DecodePrivateKey;
    let kp = KeyPair::from_pem(&read(&dir.join(format!("{file}.key")))?).map_err(cert_err)?;
    let der = zeroize::Zeroizing::new(kp.serialize_der());
    p256::ecdsa::SigningKey::from_pkcs8_der(&der).map_err(cert_err)
}

/// The P-256 public key in the certificate `<file>.pem` (a role's statement-signing key: the
/// PVA's results, the SHO's packages).
pub fn certificate_key(dir: &Path, file: &str) -> Result<p256::ecdsa::VerifyingKey, PkiError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let der = ca_der(dir, file)?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(cert_err)?;
    p256::ecdsa::VerifyingKey::from_sec1_bytes(&cert.public_key().subject_public_key.data)
        .map_err(|_| PkiError::Cert(format!("{file}.pem: not a P-256 key")))
}

/// [`crate::party::verify_platform_credential`] against the supplier root in `dir`.
pub fn verify_platform_credential(
    dir: &Path,
    chain: &[Vec<u8>],
) -> Result<PlatformCredential, PkiError> {
    crate::party::verify_platform_credential(&ca_der(dir, "supplier-root")?, chain)
}

/// A party's certificate and key, PEM (`<role>.pem`, `<role>.key`).
pub fn party_pem(dir: &Path, role: Role) -> Result<(Vec<u8>, Vec<u8>), PkiError> {
    party_file_pem(dir, role.as_str())
}

/// The certificate and key of the party whose files are `<file>.pem`, `<file>.key` (a
/// second SHO: [`SECOND_SHO`]).
pub fn party_file_pem(dir: &Path, file: &str) -> Result<(Vec<u8>, Vec<u8>), PkiError> {
    Ok((
        read(&dir.join(format!("{file}.pem")))?.into_bytes(),
        read(&dir.join(format!("{file}.key")))?.into_bytes(),
    ))
}

/// The client side of mutual TLS as the party whose files are `<file>.pem`, `<file>.key`,
/// calling `peer`: that party's certificate, trusting only the CA that issues `peer`'s
/// certificates (another operator's CA cannot stand in for it), HTTP/2 by ALPN. For channels
/// that pick among several addresses of a role themselves (`mcim_telemetry::channel`).
pub fn party_client_config(
    dir: &Path,
    file: &str,
    peer: Role,
) -> Result<rustls::ClientConfig, PkiError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: String, e: &dyn std::fmt::Display| PkiError::Cert(format!("{what}: {e}"));
    let (cert, key) = party_file_pem(dir, file)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("{file}.pem"), &e))?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| bad(format!("{file}.key"), &e))?;
    client_config(&role_ca_pem(dir, peer)?, chain, key)
        .map_err(|e| bad(format!("{} or {file}.pem", ca_file(peer)), &e))
}

/// The client side of mutual TLS with `chain` and `key`, trusting only the CAs in `ca_pem`,
/// HTTP/2 by ALPN (ring's provider, rustls's safe protocol versions).
pub fn client_config(
    ca_pem: &[u8],
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(ca.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The equipment supplier's root, PEM (`supplier-root.pem`).
pub fn supplier_root_pem(dir: &Path) -> Result<Vec<u8>, PkiError> {
    Ok(read(&dir.join("supplier-root.pem"))?.into_bytes())
}

/// The bundle of the roles' CAs, PEM (`ca.pem`).
pub fn ca_pem(dir: &Path) -> Result<Vec<u8>, PkiError> {
    Ok(read(&dir.join("ca.pem"))?.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Caller;
    use crate::party::caller_from_cert;

    #[test]
    fn init_is_idempotent_and_certificates_name_their_party() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let parties = [(Role::Sho, "sho.mcim.local"), (Role::Pva, "pva.mcim.local")];
        let made = init(dir.path(), &parties).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(made, [Role::Sho, Role::Pva]);
        let ca = std::fs::read(dir.path().join("ca.pem")).unwrap_or_default();
        // The SHOs' data keys are made with their certificates (the PVA keeps no secrets at
        // rest), and a second init keeps them.
        let dbkey = |f: &str| std::fs::read(dir.path().join(f)).unwrap_or_default();
        let (sho_key, sho2_key) = (dbkey("sho.dbkey"), dbkey("sho2.dbkey"));
        assert_eq!((sho_key.len(), sho2_key.len()), (32, 32));
        assert_ne!(sho_key, sho2_key);
        assert!(!dir.path().join("pva.dbkey").exists());
        assert!(init(dir.path(), &parties).unwrap_or_default().is_empty());
        assert_eq!(dbkey("sho.dbkey"), sho_key, "a data key is never replaced");
        assert_eq!(
            std::fs::read(dir.path().join("ca.pem")).unwrap_or_default(),
            ca,
            "kept"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("sho.key"))
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0);
        assert_eq!(mode, 0o600);
        let mode = std::fs::metadata(dir.path().join("sho.dbkey"))
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0);
        assert_eq!(mode, 0o600);
        let pem = std::fs::read_to_string(dir.path().join("sho.pem")).unwrap_or_default();
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
            .unwrap_or_default();
        assert_eq!(
            caller_from_cert(&der).ok(),
            Some(Caller {
                role: Role::Sho,
                name: "sho.mcim.local".into()
            })
        );
        // A certificate without our URI is nobody.
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let other = CertificateParams::new(vec!["x.example".to_string()])
            .and_then(|p| p.self_signed(&key))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            caller_from_cert(other.der()),
            Err(PkiError::NoIdentity)
        ));
    }
}
