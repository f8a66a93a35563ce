//! The TRE's audit record (TR 33.812 5.1.2.2: "a secure audit record of its transactions"):
//! append-only JSON lines, each entry MACed by the TRE's integrity key and chained to the
//! previous one by hash; the head of the committed chain is anchored in the TRE.
//!
//! Line format: `<entry JSON>\t<MAC hex>\n`. The entry's hash, which the next entry's `prev`
//! carries, is SHA-256(entry JSON || MAC).

use mcim_core::tpm::kdf::sha256;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::tre::Tre;

/// Domain separation for audit MACs.
const DOMAIN: &[u8] = b"mcim-audit-v1";

/// One audited transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// 1, 2, 3, ...
    pub seq: u64,
    /// Seconds since the Unix epoch (the host clock; informative).
    pub at: u64,
    /// What happened, e.g. "install", "lifecycle", "aka", "pin", "integrity".
    pub event: String,
    /// The MCIM concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcim: Option<String>,
    /// Details for people (never a secret).
    pub detail: String,
    /// Hash of the previous entry (hex; zeros for the first).
    pub prev: String,
}

/// An entry as stored, with its MAC and hash.
#[derive(Clone, Debug)]
pub struct StoredEntry {
    /// The entry.
    pub entry: AuditEntry,
    /// Its hash (what the next entry chains to).
    pub hash: [u8; 32],
}

/// Why the chain does not verify.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// A line is not an entry.
    #[error("audit line {line}: malformed")]
    Malformed {
        /// 1-based line number.
        line: usize,
    },
    /// A MAC does not verify: the entry was altered or forged.
    #[error("audit entry {seq}: MAC does not verify")]
    BadMac {
        /// The entry's sequence number.
        seq: u64,
    },
    /// An entry does not chain to its predecessor (removed, reordered or inserted entries).
    #[error("audit entry {seq}: does not chain to the previous entry")]
    Broken {
        /// The entry's sequence number.
        seq: u64,
    },
}

/// Serialises and MACs an entry; returns the line and the entry's hash.
pub fn seal(
    tre: &mut dyn Tre,
    entry: &AuditEntry,
) -> Result<(Vec<u8>, [u8; 32]), crate::tre::TreError> {
    let body =
        serde_json::to_vec(entry).map_err(|e| crate::tre::TreError::BadRequest(e.to_string()))?;
    let mac = tre.integrity_mac(&sha256(&[DOMAIN, &body]))?;
    let hash = sha256(&[&body, &mac]);
    let mut line = body;
    line.push(b'\t');
    line.extend_from_slice(hex::encode(mac).as_bytes());
    line.push(b'\n');
    Ok((line, hash))
}

/// Parses and verifies a whole audit file: every MAC, every link, consecutive sequence
/// numbers from 1.
pub fn verify(tre: &mut dyn Tre, file: &[u8]) -> Result<Vec<StoredEntry>, VerifyError> {
    let mut out: Vec<StoredEntry> = Vec::new();
    for (i, raw) in file.split(|b| *b == b'\n').enumerate() {
        if raw.is_empty() {
            continue;
        }
        let line = i + 1;
        let tab = raw
            .iter()
            .rposition(|b| *b == b'\t')
            .ok_or(ChainError::Malformed { line })?;
        let (body, mac_hex) = (&raw[..tab], &raw[tab + 1..]);
        let mac: [u8; 32] = hex::decode(mac_hex)
            .ok()
            .and_then(|m| m.try_into().ok())
            .ok_or(ChainError::Malformed { line })?;
        let entry: AuditEntry =
            serde_json::from_slice(body).map_err(|_| ChainError::Malformed { line })?;
        let want = tre.integrity_mac(&sha256(&[DOMAIN, body]))?;
        if !bool::from(want.ct_eq(&mac)) {
            return Err(ChainError::BadMac { seq: entry.seq }.into());
        }
        let (prev_hash, prev_seq) = out.last().map_or(([0u8; 32], 0), |p| (p.hash, p.entry.seq));
        if entry.prev != hex::encode(prev_hash) || entry.seq != prev_seq + 1 {
            return Err(ChainError::Broken { seq: entry.seq }.into());
        }
        out.push(StoredEntry {
            hash: sha256(&[body, &mac]),
            entry,
        });
    }
    Ok(out)
}

/// A chain that does not verify, or a TRE that could not check it.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The chain is broken.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The TRE failed.
    #[error(transparent)]
    Tre(#[from] crate::tre::TreError),
}
