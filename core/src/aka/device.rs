//! The device side of AKA (USIM functions, executed by the TRE; TS 33.102 6.3.3).
//!
//! From RAND and AUTN: AK = f5(RAND) recovers SQN; XMAC = f1(SQN, RAND, AMF) must equal
//! MAC-A (compared in constant time, a mismatch is [`DeviceAkaError::MacFailure`]); SQN must
//! be fresh per Annex C, otherwise the answer is AUTS = SQN_MS ⊕ AK* || MAC-S; if both hold,
//! the answer is RES, CK, IK and SEQ_MS(IND) is updated. Three kernel calls on success.

use super::milenage::{Kernel, Milenage};
use super::sqn::{MsSqnState, Sqn, SqnProfile, SqnReject};
use super::{Amf, Autn, Auts, Ck, Ik, Rand, Res, xor6};
use subtle::ConstantTimeEq;

/// What the device answers to a genuine challenge.
#[derive(Debug, Clone)]
pub enum DeviceResponse {
    /// AUTN verified and SQN fresh.
    Success {
        /// f2
        res: Res,
        /// f3
        ck: Ck,
        /// f4
        ik: Ik,
    },
    /// AUTN verified but SQN not acceptable: synchronisation failure with AUTS.
    SyncFailure {
        /// SQN_MS ⊕ AK* || MAC-S
        auts: Auts,
        /// why SQN was refused
        reason: SqnReject,
    },
}

/// Why the device refused the challenge outright.
#[derive(Debug, thiserror::Error)]
pub enum DeviceAkaError<E: std::error::Error + 'static> {
    /// MAC-A does not verify: the network does not know K, or AUTN was altered (TS 33.102
    /// 6.3.3 "user authentication reject ... MAC failure").
    #[error("network authentication failed: MAC-A does not verify")]
    MacFailure,
    /// The SQN profile is unusable.
    #[error(transparent)]
    Sqn(#[from] super::sqn::SqnError),
    /// The block-cipher kernel failed.
    #[error("MILENAGE kernel failed: {0}")]
    Kernel(#[source] E),
}

/// Runs the USIM side of AKA. `state` changes only on [`DeviceResponse::Success`].
pub fn authenticate<Kn: Kernel>(
    m: &Milenage<Kn>,
    state: &mut MsSqnState,
    profile: &SqnProfile,
    rand: &Rand,
    autn: &Autn,
) -> Result<DeviceResponse, DeviceAkaError<Kn::Error>> {
    profile.validate()?;
    let temp = m.temp(rand).map_err(DeviceAkaError::Kernel)?;
    let f = m.f2345_with_temp(temp).map_err(DeviceAkaError::Kernel)?;
    let sqn_b = xor6(&autn.0[..6], &f.ak);
    let amf = Amf([autn.0[6], autn.0[7]]);
    let (xmac, _) = m
        .f1_with_temp(temp, &sqn_b, &amf)
        .map_err(DeviceAkaError::Kernel)?;
    if !bool::from(xmac.ct_eq(&autn.0[8..])) {
        return Err(DeviceAkaError::MacFailure);
    }
    let sqn = Sqn::from_bytes(sqn_b);
    match state.accept(profile, sqn) {
        Ok(()) => Ok(DeviceResponse::Success {
            res: f.res,
            ck: f.ck,
            ik: f.ik,
        }),
        Err(reason) => {
            let sqn_ms = state.sqn_ms(profile).to_bytes();
            let (_, mac_s) = m
                .f1_with_temp(temp, &sqn_ms, &Amf::RESYNC)
                .map_err(DeviceAkaError::Kernel)?;
            let mut auts = [0u8; 14];
            auts[..6].copy_from_slice(&xor6(&sqn_ms, &f.ak_star));
            auts[6..].copy_from_slice(&mac_s);
            Ok(DeviceResponse::SyncFailure {
                auts: Auts(auts),
                reason,
            })
        }
    }
}
