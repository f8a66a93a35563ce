//! The PVA's whole validation per second on one core (issue 16's benchmark target), side by
//! side in one command with the peer an operator would otherwise pick, on the same quote:
//!
//! - `mcim-roles`' PVA (`Pva::validate_offline`: the platform credential's chain to the
//!   supplier root, the quote's signature by the AK it certifies, the nonce, the PCRs against
//!   the model's reference values, and the signed validation result; what SubmitEvidence does
//!   between reading the validation and recording the verdict);
//! - keylime's own quote check, `keylime.tpm.tpm_util.checkquote` (PyPI `keylime` 7.14), the
//!   quote alone, on the same files in tpm2-tools' format;
//! - bare ECDSA P-256 verification of the quote's signature: Python's `cryptography`
//!   (OpenSSL), which keylime uses, and the `p256` crate, which the PVA uses.
//!
//! The quote comes from swtpm through tpm2-tools (a restricted ECC signing key, PCRs 0-7 of the
//! SHA-256 bank, a 32-octet nonce). Each rate is one thread for `MCIM_BENCH_SECONDS` (3).
//! keylime runs in the Python of `MCIM_KEYLIME_PYTHON` (`python3`); where it cannot be imported
//! its rows say so (`pip install keylime==7.14.3 cryptography pyyaml` and what it asks for).
//!
//! ```sh
//! cargo bench -p mcim-e2e --bench pva
//! MCIM_KEYLIME_PYTHON=/tmp/kl/bin/python cargo bench -p mcim-e2e --bench pva
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use mcim_e2e::{Swtpm, output_text};
use mcim_proto::mcim::common::v1 as common;
use p256::elliptic_curve::Generate;

/// The nonce: 32 ASCII octets, so that keylime's `nonce: str` and the PVA's 32 octets are one.
const NONCE: &[u8; 32] = b"mcim-pva-bench-nonce-0123456789a";

fn seconds() -> f64 {
    std::env::var("MCIM_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0)
}

fn tpm2(tcti: &str, dir: &Path, args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .env("TPM2TOOLS_TCTI", tcti)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", output_text(&out));
    // No resource manager in front of swtpm: what a tool left loaded is flushed (its context
    // file loads it again).
    let _ = Command::new("tpm2_flushcontext")
        .arg("-t")
        .env("TPM2TOOLS_TCTI", tcti)
        .output();
}

/// Runs `f` on this thread for the bench's time: calls per second.
fn rate(mut f: impl FnMut()) -> f64 {
    let (start, mut n) = (Instant::now(), 0u64);
    while start.elapsed().as_secs_f64() < seconds() {
        for _ in 0..50 {
            f();
        }
        n += 50;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// keylime's checkquote and `cryptography`'s bare verify on the files in `dir`, per second.
fn keylime(dir: &Path) -> Result<(f64, f64), String> {
    let python = std::env::var("MCIM_KEYLIME_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = format!(
        r#"
import logging, time, sys
logging.disable(logging.CRITICAL)
from keylime.tpm import tpm_util
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
d = {dir:?}
ak = open(d + "/ak.pem", "rb").read()
sig = open(d + "/quote.sig", "rb").read()
msg = open(d + "/quote.msg", "rb").read()
pcrs = open(d + "/quote.pcrs", "rb").read()
nonce = {nonce:?}
tpm_util.checkquote(ak, nonce, sig, msg, pcrs, "sha256")
def rate(f):
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < {secs}:
        for _ in range(50):
            f()
        n += 50
    return n / (time.perf_counter() - t)
check = rate(lambda: tpm_util.checkquote(ak, nonce, sig, msg, pcrs, "sha256"))
key = serialization.load_pem_public_key(ak)
der = tpm_util.ecdsa_der_from_tpm(sig, key)
bare = rate(lambda: key.verify(der, msg, ec.ECDSA(hashes.SHA256())))
print(check, bare)
"#,
        dir = dir.display().to_string(),
        nonce = String::from_utf8_lossy(NONCE),
        secs = seconds(),
    );
    let out = Command::new(&python)
        .args(["-c", &script])
        .output()
        .map_err(|e| format!("{python}: {e}"))?;
    if !out.status.success() {
        return Err(output_text(&out).lines().last().unwrap_or("").to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    match v.as_slice() {
        [a, b] => Ok((*a, *b)),
        _ => Err(format!("unexpected output {text:?}")),
    }
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tpm = Swtpm::start();
    let tcti = tpm.tcti();
    // A restricted ECC signing key under an owner primary, and a quote of PCRs 0-7.
    tpm2(
        &tcti,
        d,
        &[
            "tpm2_createprimary",
            "-C",
            "o",
            "-g",
            "sha256",
            "-G",
            "ecc",
            "-c",
            "primary.ctx",
        ],
    );
    tpm2(
        &tcti,
        d,
        &[
            "tpm2_create",
            "-C",
            "primary.ctx",
            "-G",
            "ecc256:ecdsa-sha256:null",
            "-a",
            "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign",
            "-u",
            "ak.pub",
            "-r",
            "ak.priv",
        ],
    );
    tpm2(
        &tcti,
        d,
        &[
            "tpm2_load",
            "-C",
            "primary.ctx",
            "-u",
            "ak.pub",
            "-r",
            "ak.priv",
            "-c",
            "ak.ctx",
        ],
    );
    tpm2(
        &tcti,
        d,
        &[
            "tpm2_readpublic",
            "-c",
            "ak.ctx",
            "-f",
            "pem",
            "-o",
            "ak.pem",
        ],
    );
    let nonce_hex = hex::encode(NONCE);
    tpm2(
        &tcti,
        d,
        &[
            "tpm2_quote",
            "-c",
            "ak.ctx",
            "-l",
            "sha256:0,1,2,3,4,5,6,7",
            "-q",
            &nonce_hex,
            "-m",
            "quote.msg",
            "-s",
            "quote.sig",
            "-o",
            "quote.pcrs",
            "-g",
            "sha256",
        ],
    );
    tpm2(
        &tcti,
        d,
        &["tpm2_pcrread", "sha256:0,1,2,3,4,5,6,7", "-o", "pcrs.bin"],
    );

    // The PVA, with the supplier's platform credential for this AK.
    let pki = d.join("pki");
    mcim_pki::dev::init(&pki, &mcim_pki::dev::LAB_PARTIES).unwrap();
    let ak_pub = std::fs::read(d.join("ak.pub")).unwrap();
    let ak = mcim_core::tpm::public::EccPublic::from_tpm2b(&ak_pub)
        .unwrap()
        .p256()
        .unwrap();
    let point: [u8; 65] = p256::elliptic_curve::sec1::ToSec1Point::to_sec1_point(&ak, false)
        .as_bytes()
        .try_into()
        .unwrap();
    let storage = p256::SecretKey::generate_from_rng(&mut rand::rng());
    let mut storage_spki = mcim_core::token_wrap::P256_SPKI_PREFIX.to_vec();
    storage_spki.extend_from_slice(
        p256::elliptic_curve::sec1::ToSec1Point::to_sec1_point(&storage.public_key(), false)
            .as_bytes(),
    );
    let pcid = "001010000000001";
    let credential =
        mcim_pki::dev::issue_attestation_der(&pki, pcid, "bench", &point, &storage_spki).unwrap();
    let values = std::fs::read(d.join("pcrs.bin")).unwrap();
    let evidence = common::Evidence {
        kind: Some(common::evidence::Kind::TpmQuote(common::TpmQuote {
            attest: std::fs::read(d.join("quote.msg")).unwrap(),
            signature: std::fs::read(d.join("quote.sig")).unwrap(),
            pcrs: (0..8)
                .map(|i| common::PcrValue {
                    index: i,
                    digest: values[i as usize * 32..(i as usize + 1) * 32].to_vec(),
                })
                .collect(),
            pcr_bank: "sha256".into(),
        })),
        aka_execution: common::AkaExecution::InTre as i32,
        platform_credential: vec![credential],
    };
    let reference: Vec<(u32, String)> = (0..8)
        .map(|i| {
            (
                i,
                hex::encode(&values[i as usize * 32..(i as usize + 1) * 32]),
            )
        })
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt
        .block_on(mcim_roles::store::open("sqlite::memory:"))
        .unwrap();
    let pva = {
        let _guard = rt.enter();
        mcim_roles::pva::Pva::new(pki.clone(), db).unwrap()
    };
    pva.validate_offline("v1", pcid, *NONCE, &evidence, &reference)
        .unwrap();
    // A refusal, to show the checks run: another nonce, a PCR off its reference.
    let mut other = *NONCE;
    other[0] ^= 1;
    assert!(
        pva.validate_offline("v1", pcid, other, &evidence, &reference)
            .is_err()
    );
    let mut off = reference.clone();
    off[0].1 = "ff".repeat(32);
    assert!(
        pva.validate_offline("v1", pcid, *NONCE, &evidence, &off)
            .is_err()
    );

    let ours = rate(|| {
        std::hint::black_box(
            pva.validate_offline("v1", pcid, *NONCE, &evidence, &reference)
                .unwrap(),
        );
    });
    // The quote's signature alone, with the p256 crate (what the PVA's check uses).
    let attest = std::fs::read(d.join("quote.msg")).unwrap();
    let quote = mcim_core::tpm::attest::TpmQuote {
        attest: attest.clone(),
        signature: std::fs::read(d.join("quote.sig")).unwrap(),
        pcrs: (0..8).collect(),
        pcr_values: (0..8)
            .map(|i| values[i * 32..(i + 1) * 32].try_into().unwrap())
            .collect(),
    };
    let quote_only = rate(|| {
        std::hint::black_box(
            mcim_core::tpm::attest::verify_quote_with_key(&ak, &quote, NONCE).unwrap(),
        );
    });

    println!(
        "PVA validation, one thread, {} s each, the same swtpm quote (ECDSA P-256, PCRs 0-7)",
        seconds()
    );
    println!("{:<68} {:>12} {:>8}", "", "per second", "ratio");
    let line = |what: &str, r: f64, base: f64| {
        println!("{what:<68} {r:>12.0} {:>7.2}x", r / base);
    };
    match keylime(d) {
        Ok((check, bare)) => {
            line(
                "keylime 7.14 checkquote, the quote alone (baseline)",
                check,
                check,
            );
            line(
                "mcim-roles PVA, whole validation (chain, quote, PCRs, signed result)",
                ours,
                check,
            );
            line(
                "mcim_core verify_quote_with_key, the quote alone",
                quote_only,
                check,
            );
            line(
                "bare ECDSA P-256 verify, Python cryptography (OpenSSL)",
                bare,
                check,
            );
        }
        Err(why) => {
            println!("keylime: not run ({why})");
            line("mcim-roles PVA, whole validation (baseline)", ours, ours);
            line(
                "mcim_core verify_quote_with_key, the quote alone",
                quote_only,
                ours,
            );
        }
    }
}
