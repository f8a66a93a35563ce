//! The UE's updates of the USIM's files (TS 31.102 4.2.16, 4.2.17, 4.2.23, 4.2.91), kept in
//! the MCIM's record so that they outlive resets and restarts under the registry's integrity
//! protection (a tampered or rolled-back location is found like a tampered SQN).

use super::*;
use record::UE_PERSISTED;

impl Registry {
    /// Keeps the UE's new contents of EF `fid` for the MCIM `id`: one of
    /// [`record::UE_PERSISTED`], whole (its exact size). Unchanged contents commit nothing.
    pub fn update_usim_file(
        &mut self,
        id: &str,
        fid: u16,
        body: &[u8],
    ) -> Result<(), RegistryError> {
        let rec = self.record(id)?;
        match UE_PERSISTED.iter().find(|(f, _)| *f == fid) {
            Some((_, len)) if *len == body.len() => {}
            Some((_, len)) => {
                return Err(RegistryError::BadRequest(format!(
                    "EF {fid:04X} holds {len} octets, not {}",
                    body.len()
                )));
            }
            None => {
                return Err(RegistryError::BadRequest(format!(
                    "EF {fid:04X} is not kept across card sessions"
                )));
            }
        }
        if rec.usim.ue_file(fid).as_deref() == Some(body) {
            return Ok(());
        }
        let mut next = rec.clone();
        next.usim
            .ue_files
            .insert(format!("{fid:04X}"), hex::encode(body));
        self.commit_as(
            Commit::Frequent,
            vec![Change::Put(Box::new(next))],
            USIM_EVENT,
            Some(id),
            format!("the UE updated EF {fid:04X}"),
        )
    }
}
