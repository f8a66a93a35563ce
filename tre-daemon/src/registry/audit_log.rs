//! The registry's audit record as its owner reads it (5.1.2.2): the chain, and its check
//! against the anchor the TRE holds. The entry format is [`super::audit`].

use super::*;

impl Registry {
    /// The committed audit record, verified entry by entry. Entries past the header's last
    /// committed one belong to a transaction that did not commit (a cut before its commit
    /// point; reported at start): they stay in the file, where the chain runs through them,
    /// but are not part of the record. In lockdown the header is not trusted, and every entry
    /// is shown.
    pub fn audit(&mut self) -> Result<Vec<AuditEntry>, RegistryError> {
        let committed = match self.lockdown {
            None => self.header.audit_seq,
            Some(_) => u64::MAX,
        };
        Ok(self
            .audit_chain()?
            .into_iter()
            .map(|s| s.entry)
            .filter(|e| e.seq <= committed)
            .collect())
    }

    /// The audit record with each entry's hash, verified entry by entry.
    pub fn audit_chain(&mut self) -> Result<Vec<audit::StoredEntry>, RegistryError> {
        let bytes = files::read_optional(&self.dir.join(AUDIT_FILE))
            .map_err(io)?
            .unwrap_or_default();
        audit::verify(self.tre.as_mut(), &bytes).map_err(|e| match e {
            audit::VerifyError::Tre(t) => RegistryError::Tre(t),
            audit::VerifyError::Chain(c) => {
                RegistryError::Lockdown(format!("audit chain broken: {c}"))
            }
        })
    }

    /// Checks the audit record against the TRE's anchor (`mcimctl audit verify`). Answers
    /// in lockdown too: it is how an operator sees why.
    pub fn verify_audit(&mut self) -> Result<AuditVerdict, RegistryError> {
        let bytes = files::read_optional(&self.dir.join(AUDIT_FILE))
            .map_err(io)?
            .unwrap_or_default();
        let entries = match audit::verify(self.tre.as_mut(), &bytes) {
            Ok(e) => e,
            Err(audit::VerifyError::Tre(t)) => return Err(t.into()),
            Err(audit::VerifyError::Chain(c)) => {
                let seq = match c {
                    audit::ChainError::BadMac { seq } | audit::ChainError::Broken { seq } => seq,
                    audit::ChainError::Malformed { .. } => 0,
                };
                return Ok(AuditVerdict {
                    ok: false,
                    entries: 0,
                    first_bad_seq: seq,
                    detail: c.to_string(),
                });
            }
        };
        let anchor = self.tre.audit_anchor()?;
        let anchored = entries
            .iter()
            .find(|e| e.entry.seq == anchor.seq)
            .is_some_and(|e| e.hash == anchor.head);
        let n = entries.len() as u64;
        Ok(if anchored {
            AuditVerdict {
                ok: true,
                entries: n,
                first_bad_seq: 0,
                detail: if anchor.seq == self.header.audit_seq || self.lockdown.is_some() {
                    format!("{n} entries; entry {} is anchored in the TRE", anchor.seq)
                } else {
                    format!(
                        "{n} entries; entry {} is anchored in the TRE, and the AKA entries after it up to {} are committed by the registry header and the TRE's hybrid counter",
                        anchor.seq, self.header.audit_seq
                    )
                },
            }
        } else {
            AuditVerdict {
                ok: false,
                entries: n,
                first_bad_seq: anchor.seq,
                detail: format!(
                    "the TRE anchors entry {}, which the record does not hold",
                    anchor.seq
                ),
            }
        })
    }
}
