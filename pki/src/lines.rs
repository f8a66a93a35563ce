//! The form of the statements a device signs in its TRE (proof of ownership, discard notice,
//! instruction report): a domain line, then fields one per line (none empty, none holding a
//! line break), the last a number of seconds since the epoch; and the check of the device's
//! signature over one. One place for both, so every statement reads, writes and verifies
//! alike.

/// `domain`, `fields` and `at`, one per line.
pub(crate) fn write(domain: &str, fields: &[&str], at: u64) -> Result<Vec<u8>, &'static str> {
    if fields.iter().any(|f| f.is_empty() || f.contains('\n')) {
        return Err("a field is empty or holds a line break");
    }
    let mut out = String::from(domain);
    for f in fields {
        out.push('\n');
        out.push_str(f);
    }
    out.push('\n');
    out.push_str(&at.to_string());
    Ok(out.into_bytes())
}

/// The `n` fields after `domain`, and the number on the last line; refused unless the bytes
/// are exactly that.
pub(crate) fn read<'a>(
    bytes: &'a [u8],
    domain: &str,
    n: usize,
) -> Result<(Vec<&'a str>, u64), &'static str> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8")?;
    let lines: Vec<&str> = text.split('\n').collect();
    if lines.len() != n + 2 {
        return Err("not the statement's number of lines");
    }
    if lines[0] != domain {
        return Err("not this kind of statement");
    }
    let at = lines[n + 1]
        .parse()
        .map_err(|_| "the time is not a number")?;
    Ok((lines[1..=n].to_vec(), at))
}

/// A nonce as statements carry it: 16 random octets in lowercase hex (what makes a statement
/// single-use).
pub(crate) fn nonce_ok(nonce: &str) -> bool {
    nonce.len() == 32
        && nonce
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Why a statement is not signed by the device it names.
#[derive(Debug)]
pub(crate) enum NotSigned {
    /// The chain is empty.
    NoCertificate,
    /// The leaf is not a certificate the supplier root issued and that is valid now.
    NotTheDevice(&'static str),
    /// The leaf certifies another party than the device `pcid`.
    AnotherDevice,
    /// The signature is not DER or does not verify.
    Signature,
}

/// Checks that `statement` is signed (`signature_der`, ECDSA P-256) by the TLS key the
/// supplier root (`supplier_root_der`) certified for the device `pcid`, the leaf of
/// `tls_chain`.
pub(crate) fn check_device_signature(
    supplier_root_der: &[u8],
    statement: &[u8],
    signature_der: &[u8],
    tls_chain: &[Vec<u8>],
    pcid: &str,
) -> Result<(), NotSigned> {
    use p256::ecdsa::signature::Verifier;
    let leaf = tls_chain.first().ok_or(NotSigned::NoCertificate)?;
    let (key, named) =
        crate::party::leaf_key_under(supplier_root_der, leaf).map_err(NotSigned::NotTheDevice)?;
    if named.role != crate::party::Role::Device || named.name != pcid {
        return Err(NotSigned::AnotherDevice);
    }
    let sig = p256::ecdsa::Signature::from_der(signature_der).map_err(|_| NotSigned::Signature)?;
    key.verify(statement, &sig)
        .map_err(|_| NotSigned::Signature)
}

/// For tests of the statements: a development PKI in a fresh folder and a device `pcid`
/// whose TLS key is the software key `[7; 32]`: (the folder, the key, its certificate chain,
/// the supplier root, DER).
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn test_device(
    pcid: &str,
) -> (
    tempfile::TempDir,
    p256::ecdsa::SigningKey,
    Vec<Vec<u8>>,
    Vec<u8>,
) {
    use p256::pkcs8::EncodePublicKey;
    let dir = tempfile::tempdir().unwrap();
    crate::dev::init(dir.path(), &crate::dev::LAB_PARTIES).unwrap();
    let key = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
    let spki = key
        .verifying_key()
        .to_public_key_der()
        .unwrap()
        .as_bytes()
        .to_vec();
    let pem = crate::dev::issue_device(dir.path(), pcid, &spki).unwrap();
    let leaf: rustls::pki_types::CertificateDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).unwrap();
    let root = crate::dev::ca_der(dir.path(), "supplier-root").unwrap();
    (dir, key, vec![leaf.to_vec()], root)
}
