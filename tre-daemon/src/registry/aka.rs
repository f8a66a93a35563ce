//! AKA with the selected MCIM inside the TRE (TS 33.102 6.3.3): the SQN state is committed
//! on success, and every outcome is audited.

use super::*;

impl Registry {
    /// AKA with the selected MCIM (TS 33.102 6.3.3) inside the TRE; the SQN state is committed
    /// on success, and every outcome is audited.
    pub fn authenticate(
        &mut self,
        id: &str,
        rand: &Rand,
        autn: &Autn,
    ) -> Result<DeviceResponse, RegistryError> {
        let rec = self.record(id)?.clone();
        if rec.state != McimState::Selected {
            return Err(RegistryError::BadRequest(format!(
                "AKA needs a selected MCIM; {id} is {:?}",
                rec.state
            )));
        }
        let secrets = rec
            .secrets
            .clone()
            .ok_or_else(|| RegistryError::BadRequest("the MCIM has no credentials".into()))?;
        let constants = rec
            .constants
            .to_constants()
            .map_err(RegistryError::BadRequest)?;
        let mut sqn = rec.sqn.clone();
        let pin = self
            .session_pin
            .as_ref()
            .filter(|(sid, _)| sid == id)
            .map(|(_, p)| p.clone());
        let ch = AkaChallenge {
            constants: &constants,
            profile: &rec.sqn_profile,
            rand,
            autn,
            pin: pin.as_ref().map(|p| crate::tre::Authority::Pin(p)),
        };
        match self.tre.authenticate(&secrets, &mut sqn, &ch) {
            Ok(resp @ DeviceResponse::Success { .. }) => {
                let mut next = rec;
                next.sqn = sqn;
                self.commit_as(
                    Commit::Frequent,
                    vec![Change::Put(Box::new(next))],
                    AKA_EVENT,
                    Some(id),
                    "authenticated".into(),
                )?;
                Ok(resp)
            }
            Ok(resp @ DeviceResponse::SyncFailure { .. }) => {
                self.commit_as(
                    Commit::Frequent,
                    Vec::new(),
                    AKA_EVENT,
                    Some(id),
                    "synchronisation failure: AUTS sent".into(),
                )?;
                Ok(resp)
            }
            Err(TreError::MacFailure) => {
                self.commit_as(
                    Commit::Frequent,
                    Vec::new(),
                    AKA_EVENT,
                    Some(id),
                    "MAC failure: network not authenticated".into(),
                )?;
                Err(TreError::MacFailure.into())
            }
            Err(e) => Err(e.into()),
        }
    }
}
