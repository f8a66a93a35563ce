//! Fuzz targets: one function per parser of untrusted bytes, each taking arbitrary bytes and
//! required never to panic (and never to allocate without bound). The libFuzzer binaries in
//! `fuzz_targets/` call these (`cargo fuzz run <target> --features libfuzzer`); the replay
//! test (`tests/corpus.rs`) runs every file of `corpus/<target>/` through them on stable, in
//! CI, so what a fuzzing run found stays fixed.
//!
//! Inputs that several values make (a certificate chain and a signature, say) are split by
//! [`parts`]: each part a big-endian u16 length and its bytes, the last part the rest.

use std::sync::OnceLock;

use coset::{CborSerializable, CoseSign1Builder, HeaderBuilder, iana};
use mcim_core::identity::Pcid;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};

/// A fuzz target: arbitrary bytes in, no panic.
pub type Target = fn(&[u8]);

/// Every target, by name (the corpus directory's name).
pub const TARGETS: &[(&str, Target)] = &[
    ("package", package),
    ("signed_payload", signed_payload),
    ("import_blob", import_blob),
    ("tpm_public", tpm_public),
    ("quote", quote),
    ("token_blob", token_blob),
    ("token_evidence", token_evidence),
    ("platform_credential", platform_credential),
    ("device_statement", device_statement),
    ("rehabilitation_token", rehabilitation_token),
    ("saved_run", saved_run),
    ("tred_config", tred_config),
];

/// `n` parts of `data` (fewer when it runs out): u16 length-prefixed, the last the rest.
pub fn parts(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(n);
    let mut rest = data;
    while out.len() + 1 < n && rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let body = &rest[2..];
        let take = len.min(body.len());
        out.push(&body[..take]);
        rest = &body[take..];
    }
    out.push(rest);
    out
}

/// The fixed key a target signs and verifies with (not a secret: a test key).
fn key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut seed = [7u8; 32];
        seed[0] = 1;
        SigningKey::from_slice(&seed).unwrap_or_else(|_| unreachable!("a valid scalar"))
    })
}

/// A self-signed CA certificate (DER), made once: the root the chain targets verify against.
fn root_der() -> &'static [u8] {
    static ROOT: OnceLock<Vec<u8>> = OnceLock::new();
    ROOT.get_or_init(|| {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|_| unreachable!("P-256 key"));
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap_or_else(|_| unreachable!("no names"));
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .self_signed(&key)
            .map(|c| c.der().to_vec())
            .unwrap_or_default()
    })
}

const PCID: &str = "001010000000001";

/// An MCIM package as the device receives it (5.1.3.6.2 step 12): COSE_Sign1, the signer's
/// certificate, the payload (annex x.2.3).
pub fn package(data: &[u8]) {
    let _ = mcim_core::signed::signer_certificate(data);
    let _ = mcim_core::package::open(data, &VerifyingKey::from(key()), PCID, "reg", b"nonce");
}

/// A signed statement whose signature verifies, with `data` as its payload: every payload
/// parser behind a signature (MCIM package, remote instruction, validation result).
pub fn signed_payload(data: &[u8]) {
    let Ok(bytes) = CoseSign1Builder::new()
        .protected(
            HeaderBuilder::new()
                .algorithm(iana::Algorithm::ES256)
                .build(),
        )
        .payload(data.to_vec())
        .create_signature(&[], |m| {
            let s: Signature = key().sign(m);
            s.to_bytes().to_vec()
        })
        .build()
        .to_vec()
    else {
        return;
    };
    let vk = VerifyingKey::from(key());
    let _ = mcim_core::package::open(&bytes, &vk, PCID, "reg", b"nonce");
    let _ = mcim_core::signed::open::<mcim_pki::instruction::Instruction>(&bytes, &vk);
    let _ = mcim_core::validation::verify(&bytes, &vk, PCID, 0);
}

/// The SHO's duplication blob for a TPM (TPM2_Import's inputs) and the TPMT_PUBLIC in it.
pub fn import_blob(data: &[u8]) {
    if let Ok(b) = mcim_core::tpm::import::ImportBlob::from_bytes(data) {
        let _ = mcim_core::tpm::public::name_sha256(&b.public);
        let _ = b.to_bytes();
    }
}

/// A TPM2B_PUBLIC (a storage key or an attestation key as a device reports it).
pub fn tpm_public(data: &[u8]) {
    let _ = mcim_core::tpm::public::EccPublic::from_tpm2b(data);
    let _ = mcim_core::token_wrap::spki_point(data);
}

/// Attestation evidence: a TPMS_ATTEST, its TPMT_SIGNATURE, PCR values, verified against an
/// attestation key's TPM2B_PUBLIC.
pub fn quote(data: &[u8]) {
    let _ = mcim_core::tpm::attest::parse_quote(data);
    let p = parts(data, 4);
    let (ak, attest, signature, values) = match p.as_slice() {
        [a, b, c, d] => (*a, *b, *c, *d),
        _ => return,
    };
    let pcr_values: Vec<[u8; 32]> = values
        .chunks_exact(32)
        .take(24)
        .filter_map(|c| <[u8; 32]>::try_from(c).ok())
        .collect();
    let q = mcim_core::tpm::attest::TpmQuote {
        attest: attest.to_vec(),
        signature: signature.to_vec(),
        pcrs: (0u8..).take(pcr_values.len()).collect(),
        pcr_values,
    };
    let _ = mcim_core::tpm::attest::verify_quote(ak, &q, b"nonce");
}

/// A token's wrapped secret (ECDH + AES-KWP transport form).
pub fn token_blob(data: &[u8]) {
    let _ = mcim_core::token_wrap::TokenBlob::from_bytes(data);
}

/// A token's signed evidence: attestation key SPKI, payload, signature.
pub fn token_evidence(data: &[u8]) {
    if let [ak, payload, sig] = parts(data, 3).as_slice() {
        let _ = mcim_core::token_evidence::verify(ak, payload, sig, b"nonce");
    }
}

/// A platform credential (5.1.3.5.8 PfC): a certificate chain against the supplier root, and
/// a certificate as a role's caller identity.
pub fn platform_credential(data: &[u8]) {
    let chain: Vec<Vec<u8>> = parts(data, 3).into_iter().map(<[u8]>::to_vec).collect();
    let _ = mcim_pki::party::verify_platform_credential(root_der(), &chain);
    let _ = mcim_pki::party::caller_from_cert(data);
}

/// What a device signs with its TLS key for the roles: an instruction report, a discard
/// notice, a proof of ownership (statement, DER signature, chain).
pub fn device_statement(data: &[u8]) {
    let _ = mcim_pki::instruction::Report::parse(data);
    let _ = mcim_pki::discard::Notice::parse(data);
    let _ = mcim_pki::ownership::Statement::parse(data);
    let p = parts(data, 4);
    let [statement, signature, leaf, rest] = p.as_slice() else {
        return;
    };
    let chain = vec![leaf.to_vec(), rest.to_vec()];
    let root = root_der();
    let _ = mcim_pki::instruction::verify_report(root, statement, signature, &chain, PCID, b"i");
    let _ = mcim_pki::discard::verify_notice(root, statement, signature, &chain, PCID, "i", "s");
    let proof = mcim_pki::ownership::Proof {
        payload: statement,
        signature,
        tls_chain: &chain,
    };
    let contract = mcim_pki::ownership::Contract {
        pcid: PCID,
        subscriber: "sub",
        sho: "sho",
    };
    let _ = mcim_pki::ownership::verify(root, &proof, &contract, 0);
}

/// The supplier's rehabilitation token (leaving lockdown, 5.1.2.2).
pub fn rehabilitation_token(data: &[u8]) {
    let Ok(pcid) = Pcid::new(PCID) else {
        return;
    };
    let _ = mcim_core::rehabilitation::verify(data, &VerifyingKey::from(key()), &pcid, 0);
}

/// The saved provisioning run (`provisioning.json`, any version `tred` reads).
pub fn saved_run(data: &[u8]) {
    let _ = mcim_tre::provision::run::load(data);
}

/// `tred`'s TOML configuration.
pub fn tred_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = toml::from_str::<mcim_tre::config::Config>(text);
    }
}
