//! Operator-side tools that need no server: `mcimctl sho wrap` (an SHO wrapping K and OPc for
//! one device's TRE, 5.1.3.6.2 step 12) and `mcimctl pva verify-quote` (a PVA checking a
//! device's quote, steps 9-10).

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use mcim_core::aka::{K, Opc};
use mcim_core::tpm::attest::{TpmQuote, verify_quote};
use mcim_core::tpm::import::{ObjectPolicy, wrap_aes128_key, wrap_sealed_data};
use mcim_core::tpm::policy::PcrSelection;
use mcim_core::tpm::public::EccPublic;

use crate::hexarg;

/// `mcimctl sho ...`
#[derive(Subcommand)]
pub enum ShoCommand {
    /// Wrap K and OPc for one device's TPM (TPM2 duplication blobs, no TPM needed).
    Wrap(WrapArgs),
    /// Instruct a device about this SHO's MCIM on it (TR 33.812 5.1.1.3): discover, block,
    /// unblock, retire or delete. The SHO signs it; the RO's DPF carries it; the device
    /// verifies, executes and reports, signed in its TRE.
    Instruct(crate::instruct::InstructArgs),
    /// What a device reported for an instruction.
    Instruction(crate::instruct::InstructionArgs),
}

/// How K travels.
#[derive(Clone, Copy, ValueEnum)]
pub enum KForm {
    /// An AES-128 key object: AKA runs inside the TPM (TPM2_EncryptDecrypt2).
    Key,
    /// Sealed data, for TPMs without TPM2_EncryptDecrypt2 (weaker).
    Sealed,
}

/// Arguments of `mcimctl sho wrap`.
#[derive(Args)]
pub struct WrapArgs {
    /// The device's storage key, TPM2B_PUBLIC (`mcimctl device init --out-dir` writes it).
    #[arg(long)]
    storage_public: PathBuf,
    /// K, 32 hex digits.
    #[arg(long, value_parser = hexarg::parse::<16>)]
    k: [u8; 16],
    /// OPc, 32 hex digits.
    #[arg(long, value_parser = hexarg::parse::<16>)]
    opc: [u8; 16],
    /// How K travels.
    #[arg(long, value_enum, default_value = "key")]
    k_form: KForm,
    /// Bind OPc to the PCR values of a quote (the directory `mcimctl device attest --out-dir`
    /// wrote, after `mcimctl pva verify-quote` accepted it): the TPM then releases OPc only
    /// while the platform is in that state (TPM2_PolicyPCR).
    #[arg(long)]
    bind_opc_to_quote: Option<PathBuf>,
    /// Where k.blob and opc.blob go.
    #[arg(long)]
    out_dir: PathBuf,
}

/// `mcimctl supplier ...`
#[derive(Subcommand)]
pub enum SupplierCommand {
    /// Supply time for one device (5.1.3.3.4): keys and identity in its TRE through tred,
    /// certified by the supplier's server, reference values to the PVA, the PCID's initial
    /// credential in a CCIF mode (5.1.3.4.1).
    Supply(crate::supply::SupplyArgs),
    /// Make a rehabilitation key (P-256): the private key to a file, the public key (for
    /// tred.toml's rehabilitation_key) to stdout.
    Keygen {
        /// Where the private key goes (hex, mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a token that lifts one device's lockdown (5.1.2.2), for its PCID and the counter
    /// `mcimctl device status` shows.
    RehabToken {
        /// The rehabilitation key (from `keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The device's PCID.
        #[arg(long)]
        pcid: String,
        /// The TRE's rehabilitation counter.
        #[arg(long)]
        counter: u64,
        /// Where the token goes.
        #[arg(long)]
        out: PathBuf,
    },
}

/// `mcimctl pva ...`
#[derive(Subcommand)]
pub enum PvaCommand {
    /// Verify a device's quote (signature, nonce, PCR digest) against its AK.
    VerifyQuote(VerifyQuoteArgs),
    /// Verify a PKCS#11 device's signed evidence (weaker than a quote) against its
    /// attestation key (the SPKI `device init --out-dir` wrote as ak.pub).
    VerifyTokenEvidence(VerifyQuoteArgs),
}

/// Arguments of `mcimctl pva verify-quote`.
#[derive(Args)]
pub struct VerifyQuoteArgs {
    /// The AK's TPM2B_PUBLIC (`mcimctl device init --out-dir` writes ak.pub).
    #[arg(long)]
    ak: PathBuf,
    /// The directory `mcimctl device attest --out-dir` wrote.
    #[arg(long)]
    quote_dir: PathBuf,
    /// The nonce the verifier sent, hex.
    #[arg(long)]
    nonce: String,
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// A file.
    #[error("{path}: {detail}")]
    File {
        /// file
        path: String,
        /// why
        detail: String,
    },
    /// Refused input or evidence.
    #[error("{0}")]
    Refused(String),
}

fn read(p: &Path) -> Result<Vec<u8>, OperatorError> {
    std::fs::read(p).map_err(|e| OperatorError::File {
        path: p.display().to_string(),
        detail: e.to_string(),
    })
}

fn write(p: &Path, b: &[u8]) -> Result<(), OperatorError> {
    std::fs::write(p, b).map_err(|e| OperatorError::File {
        path: p.display().to_string(),
        detail: e.to_string(),
    })
}

/// pcrs.list and pcrs.bin of a quote directory.
fn read_pcrs(dir: &Path) -> Result<(Vec<u8>, Vec<[u8; 32]>), OperatorError> {
    let list = String::from_utf8(read(&dir.join("pcrs.list"))?)
        .map_err(|e| OperatorError::Refused(e.to_string()))?;
    let pcrs: Vec<u8> = list
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.trim().parse::<u8>())
        .collect::<Result<_, _>>()
        .map_err(|e| OperatorError::Refused(format!("pcrs.list: {e}")))?;
    let values = read(&dir.join("pcrs.bin"))?;
    if values.len() != pcrs.len() * 32 {
        return Err(OperatorError::Refused(
            "pcrs.bin does not hold one SHA-256 value per PCR".into(),
        ));
    }
    let values = values
        .chunks_exact(32)
        .map(|c| {
            let mut v = [0u8; 32];
            v.copy_from_slice(c);
            v
        })
        .collect();
    Ok((pcrs, values))
}

/// Runs `mcimctl sho ...`.
pub fn run_sho(cmd: ShoCommand) -> Result<(), OperatorError> {
    let a = match cmd {
        ShoCommand::Wrap(a) => a,
        ShoCommand::Instruct(a) => {
            return crate::instruct::run(a).map_err(|e| OperatorError::Refused(e.to_string()));
        }
        ShoCommand::Instruction(a) => {
            return crate::instruct::run_status(a)
                .map_err(|e| OperatorError::Refused(e.to_string()));
        }
    };
    let storage = read(&a.storage_public)?;
    let (k, opc) = (K::new(a.k), Opc::new(a.opc));
    let mut rng = rand::rng();
    if storage.starts_with(&mcim_core::token_wrap::P256_SPKI_PREFIX) {
        // A PKCS#11 token's unwrap key (DER SPKI): ECDH + AES-KWP.
        if a.bind_opc_to_quote.is_some() || matches!(a.k_form, KForm::Sealed) {
            return Err(OperatorError::Refused(
                "a PKCS#11 token takes K as a key and has no PCRs: drop --k-form/--bind-opc-to-quote"
                    .into(),
            ));
        }
        let wrap = |s: &[u8]| {
            mcim_core::token_wrap::wrap_for_token(&storage, s)
                .map(|b| b.to_bytes())
                .map_err(|e| OperatorError::Refused(e.to_string()))
        };
        let (kb, ob) = (wrap(k.expose())?, wrap(opc.expose())?);
        std::fs::create_dir_all(&a.out_dir).map_err(|e| OperatorError::File {
            path: a.out_dir.display().to_string(),
            detail: e.to_string(),
        })?;
        write(&a.out_dir.join("k.blob"), &kb)?;
        write(&a.out_dir.join("opc.blob"), &ob)?;
        println!(
            "wrapped for the token's unwrap key: {}/k.blob, {}/opc.blob",
            a.out_dir.display(),
            a.out_dir.display()
        );
        return Ok(());
    }
    if mcim_core::token_wrap::is_rsa_spki(&storage) {
        // A PKCS#11 token without ECDH: RSA-OAEP to its RSA unwrap key.
        if a.bind_opc_to_quote.is_some() || matches!(a.k_form, KForm::Sealed) {
            return Err(OperatorError::Refused(
                "a PKCS#11 token takes K as a key and has no PCRs".into(),
            ));
        }
        let wrap = |s: &[u8], rng: &mut rand::rngs::ThreadRng| {
            mcim_core::token_wrap::wrap_for_token_rsa(&storage, s, rng)
                .map(|b| b.0)
                .map_err(|e| OperatorError::Refused(e.to_string()))
        };
        let (kb, ob) = (wrap(k.expose(), &mut rng)?, wrap(opc.expose(), &mut rng)?);
        std::fs::create_dir_all(&a.out_dir).map_err(|e| OperatorError::File {
            path: a.out_dir.display().to_string(),
            detail: e.to_string(),
        })?;
        write(&a.out_dir.join("k.blob"), &kb)?;
        write(&a.out_dir.join("opc.blob"), &ob)?;
        println!(
            "wrapped (RSA-OAEP) for the token's unwrap key: {}",
            a.out_dir.display()
        );
        return Ok(());
    }
    let parent = EccPublic::from_tpm2b(&storage)
        .map_err(|e| OperatorError::Refused(format!("storage public key: {e}")))?;
    let refuse = |e: mcim_core::tpm::TpmStructError| OperatorError::Refused(e.to_string());
    let k_blob = match a.k_form {
        KForm::Key => wrap_aes128_key(&parent, &k, ObjectPolicy::default(), &mut rng),
        KForm::Sealed => wrap_sealed_data(&parent, k.expose(), ObjectPolicy::default(), &mut rng),
    }
    .map_err(refuse)?;
    let opc_policy = match &a.bind_opc_to_quote {
        None => ObjectPolicy::default(),
        Some(dir) => {
            let (pcrs, values) = read_pcrs(dir)?;
            let sel = PcrSelection::sha256(&pcrs).map_err(refuse)?;
            ObjectPolicy::pcrs(sel, &values).map_err(refuse)?
        }
    };
    let opc_blob = wrap_sealed_data(&parent, opc.expose(), opc_policy, &mut rng).map_err(refuse)?;
    std::fs::create_dir_all(&a.out_dir).map_err(|e| OperatorError::File {
        path: a.out_dir.display().to_string(),
        detail: e.to_string(),
    })?;
    write(
        &a.out_dir.join("k.blob"),
        &k_blob.to_bytes().map_err(refuse)?,
    )?;
    write(
        &a.out_dir.join("opc.blob"),
        &opc_blob.to_bytes().map_err(refuse)?,
    )?;
    println!(
        "wrapped for the storage key {}: {}/k.blob, {}/opc.blob",
        hex::encode(parent.name()),
        a.out_dir.display(),
        a.out_dir.display()
    );
    Ok(())
}

/// Runs `mcimctl supplier ...`.
pub fn run_supplier(cmd: SupplierCommand) -> Result<(), OperatorError> {
    use p256::ecdsa::{SigningKey, VerifyingKey};
    use p256::elliptic_curve::Generate;
    match cmd {
        SupplierCommand::Supply(a) => {
            crate::supply::run(a).map_err(|e| OperatorError::Refused(e.to_string()))
        }
        SupplierCommand::Keygen { out } => {
            let key = SigningKey::generate_from_rng(&mut rand::rng());
            let secret = zeroize::Zeroizing::new(hex::encode(key.to_bytes()));
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&out)
                    .map_err(|e| OperatorError::File {
                        path: out.display().to_string(),
                        detail: e.to_string(),
                    })?;
                f.write_all(secret.as_bytes())
                    .map_err(|e| OperatorError::File {
                        path: out.display().to_string(),
                        detail: e.to_string(),
                    })?;
            }
            let public = VerifyingKey::from(&key).to_sec1_point(false);
            println!("{}", hex::encode(public.as_bytes()));
            Ok(())
        }
        SupplierCommand::RehabToken {
            key,
            pcid,
            counter,
            out,
        } => {
            let text = zeroize::Zeroizing::new(read(&key)?);
            let bytes = zeroize::Zeroizing::new(
                hex::decode(String::from_utf8_lossy(&text).trim())
                    .map_err(|e| OperatorError::Refused(format!("{}: {e}", key.display())))?,
            );
            let key = SigningKey::from_slice(&bytes)
                .map_err(|_| OperatorError::Refused("not a P-256 private key".into()))?;
            let pcid = mcim_core::identity::Pcid::new(pcid)
                .map_err(|e| OperatorError::Refused(e.to_string()))?;
            let token = mcim_core::rehabilitation::issue(&key, &pcid, counter)
                .map_err(|e| OperatorError::Refused(e.to_string()))?;
            write(&out, &token)?;
            println!(
                "token for {} at counter {counter}: {}",
                pcid.as_str(),
                out.display()
            );
            Ok(())
        }
    }
}

/// Runs `mcimctl pva ...`.
pub fn run_pva(cmd: PvaCommand) -> Result<(), OperatorError> {
    let a = match cmd {
        PvaCommand::VerifyQuote(a) => a,
        PvaCommand::VerifyTokenEvidence(a) => {
            let nonce = hex::decode(&a.nonce)
                .map_err(|e| OperatorError::Refused(format!("--nonce: {e}")))?;
            let p = mcim_core::token_evidence::verify(
                &read(&a.ak)?,
                &read(&a.quote_dir.join("token.payload"))?,
                &read(&a.quote_dir.join("token.sig"))?,
                &nonce,
            )
            .map_err(|e| OperatorError::Refused(format!("evidence refused: {e}")))?;
            println!(
                "token evidence verified (weaker than a quote): device {}, daemon measurement {}",
                p.pcid, p.measurement
            );
            return Ok(());
        }
    };
    let nonce =
        hex::decode(&a.nonce).map_err(|e| OperatorError::Refused(format!("--nonce: {e}")))?;
    let (pcrs, pcr_values) = read_pcrs(&a.quote_dir)?;
    let quote = TpmQuote {
        attest: read(&a.quote_dir.join("quote.attest"))?,
        signature: read(&a.quote_dir.join("quote.sig"))?,
        pcrs,
        pcr_values,
    };
    let v = verify_quote(&read(&a.ak)?, &quote, &nonce)
        .map_err(|e| OperatorError::Refused(format!("quote refused: {e}")))?;
    println!(
        "quote verified: clock {} ms, resets {}, restarts {}, safe {}",
        v.clock.clock, v.clock.reset_count, v.clock.restart_count, v.clock.safe
    );
    for (i, val) in v.pcrs {
        println!("pcr {i:>2} {}", hex::encode(val));
    }
    Ok(())
}
