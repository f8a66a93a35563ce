//! What the TRE holds for secrets no record refers to (a token's K and OPc objects; a TPM
//! holds nothing between commands): destroyed after the commit that let go of them, or at the
//! next start when a crash came in between (`Header::doomed`); and the orphans an earlier
//! version or an interrupted import left, listed and destroyed on the owner's command.

use super::*;

impl Registry {
    /// The change that dooms what the TRE holds for `rec`'s secrets.
    pub(super) fn doom(&self, rec: &McimRecord) -> Change {
        Change::Doom(
            rec.secrets
                .iter()
                .flat_map(|s| self.tre.held_refs_of(s))
                .chain(rec.left_in_tre.iter().filter_map(|r| hex::decode(r).ok()))
                .collect(),
        )
    }

    /// References of every secret a live record refers to, its own or what its untrusted
    /// predecessor left in the TRE.
    fn referenced(&self) -> Vec<Vec<u8>> {
        self.records
            .values()
            .flat_map(|r| {
                r.secrets
                    .iter()
                    .flat_map(|s| [s.k.clone(), s.opc.clone()])
                    .chain(r.left_in_tre.iter().filter_map(|h| hex::decode(h).ok()))
            })
            .collect()
    }

    /// Destroys what the header dooms; keeps (and reports) what the TRE refused, for the next
    /// try. Never destroys what a record still refers to. The pruned list is written with the
    /// next commit; until then a restart destroys again, which finds nothing and succeeds.
    pub(super) fn destroy_doomed(&mut self) {
        let doomed = std::mem::take(&mut self.header.doomed);
        let mut kept = Vec::new();
        for r in doomed {
            let Ok(bytes) = hex::decode(&r) else {
                continue;
            };
            if self.referenced().contains(&bytes) {
                continue;
            }
            if let Err(e) = self.tre.destroy_held_secret(&bytes) {
                tracing::error!(object = %r, "the TRE kept an object it should destroy: {e}");
                self.startup
                    .push(format!("TRE object {r} not destroyed yet: {e}"));
                kept.push(r);
            }
        }
        self.header.doomed = kept;
    }

    /// TRE objects that no record refers to and none is waiting to destroy.
    pub fn orphans(&mut self) -> Result<Vec<Vec<u8>>, RegistryError> {
        let held = self.tre.held_secret_refs()?;
        let referenced = self.referenced();
        Ok(held
            .into_iter()
            .filter(|r| !referenced.contains(r))
            .filter(|r| !self.header.doomed.contains(&hex::encode(r)))
            .collect())
    }

    /// Destroys the orphans (the owner's command): doomed in one commit with an audit entry
    /// naming them, then destroyed like any doomed object. Returns what was destroyed.
    pub fn destroy_orphans(&mut self) -> Result<Vec<Vec<u8>>, RegistryError> {
        self.live()?;
        let orphans = self.orphans()?;
        if orphans.is_empty() {
            return Ok(orphans);
        }
        let names: Vec<String> = orphans.iter().map(hex::encode).collect();
        self.commit(
            vec![Change::Doom(orphans.clone())],
            "tre",
            None,
            format!(
                "destroying TRE objects no MCIM refers to: {}",
                names.join(", ")
            ),
        )?;
        let left = self.tre.held_secret_refs()?;
        if let Some(r) = orphans.iter().find(|r| left.contains(r)) {
            return Err(RegistryError::Tre(TreError::Command {
                command: "C_DestroyObject",
                detail: format!("object {} is still held", hex::encode(r)),
            }));
        }
        Ok(orphans)
    }
}
