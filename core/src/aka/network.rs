//! The network side of AKA (HE/AuC): authentication vectors and resynchronisation.
//!
//! The RO's ICF makes vectors for PCIDs (TR 33.812 5.1.3.6.2 step 3, annex x.3 "securely
//! generate authentication vectors for PCIDs"), the SHO for its IMSIs (5.1.3.3.2.2).

use super::milenage::{Kernel, Milenage, MilenageOutput};
use super::sqn::{HeSqnState, Sqn, SqnError, SqnProfile};
use super::{Amf, Autn, Auts, Ck, Ik, Rand, Res, xor6};
use subtle::ConstantTimeEq;

/// A UMTS authentication vector (TS 33.102 6.3.2): RAND, XRES, CK, IK, AUTN.
#[derive(Clone, Debug)]
pub struct AuthVector {
    /// the challenge
    pub rand: Rand,
    /// expected response (f2)
    pub xres: Res,
    /// cipher key (f3)
    pub ck: Ck,
    /// integrity key (f4)
    pub ik: Ik,
    /// SQN ⊕ AK || AMF || MAC-A
    pub autn: Autn,
}

/// Why a vector could not be made or a resynchronisation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkAkaError<E: std::error::Error + 'static> {
    /// The SQN counter (see [`SqnError`]).
    #[error(transparent)]
    Sqn(#[from] SqnError),
    /// MAC-S in AUTS does not verify: the AUTS is forged, corrupt, or for another RAND or K.
    #[error("AUTS rejected: MAC-S does not verify")]
    MacS,
    /// The block-cipher kernel failed.
    #[error("MILENAGE kernel failed: {0}")]
    Kernel(#[source] E),
}

/// Makes one vector with the next SQN of `state`. One kernel session (two rounds). `state` changes only
/// on success.
pub fn generate_av<Kn: Kernel>(
    m: &Milenage<Kn>,
    state: &mut HeSqnState,
    profile: &SqnProfile,
    amf: Amf,
    rand: Rand,
) -> Result<AuthVector, NetworkAkaError<Kn::Error>> {
    let mut next = state.clone();
    let sqn = next.next(profile)?;
    let av = vector_for(m, sqn, amf, rand).map_err(NetworkAkaError::Kernel)?;
    *state = next;
    Ok(av)
}

/// Makes `rands.len()` vectors with consecutive SQNs of `state`, in one kernel session for
/// the lot (GetAuthVectors asks for up to five at a time). `state` changes only on success.
pub fn generate_avs<Kn: Kernel>(
    m: &Milenage<Kn>,
    state: &mut HeSqnState,
    profile: &SqnProfile,
    amf: Amf,
    rands: &[Rand],
) -> Result<Vec<AuthVector>, NetworkAkaError<Kn::Error>> {
    let mut next = state.clone();
    let mut inputs = Vec::with_capacity(rands.len());
    for rand in rands {
        inputs.push((*rand, next.next(profile)?.to_bytes(), amf));
    }
    let outs = m.compute_many(&inputs).map_err(NetworkAkaError::Kernel)?;
    let avs = inputs
        .iter()
        .zip(outs)
        .map(|((rand, sqn, amf), out)| assemble(*rand, sqn, *amf, out))
        .collect();
    *state = next;
    Ok(avs)
}

/// The vector for a given SQN (no state). One kernel session.
pub fn vector_for<Kn: Kernel>(
    m: &Milenage<Kn>,
    sqn: Sqn,
    amf: Amf,
    rand: Rand,
) -> Result<AuthVector, Kn::Error> {
    let sqn_b = sqn.to_bytes();
    let out = m.compute(&rand, &sqn_b, &amf)?;
    Ok(assemble(rand, &sqn_b, amf, out))
}

/// AUTN = SQN ⊕ AK || AMF || MAC-A, and the rest of the vector.
fn assemble(rand: Rand, sqn: &[u8; 6], amf: Amf, out: MilenageOutput) -> AuthVector {
    let mut autn = [0u8; 16];
    autn[..6].copy_from_slice(&xor6(sqn, &out.f2345.ak));
    autn[6..8].copy_from_slice(&amf.0);
    autn[8..].copy_from_slice(&out.mac_a);
    let f = out.f2345;
    AuthVector {
        rand,
        xres: f.res,
        ck: f.ck,
        ik: f.ik,
        autn: Autn(autn),
    }
}

/// Recovers SQN_MS from AUTS and verifies MAC-S (TS 33.102 6.3.5), with no state.
///
/// AK* = f5*(RAND), SQN_MS = (SQN_MS ⊕ AK*) ⊕ AK*, then MAC-S = f1*(SQN_MS, RAND, AMF=0000)
/// compared in constant time. Three kernel calls.
pub fn recover_sqn_ms<Kn: Kernel>(
    m: &Milenage<Kn>,
    rand: &Rand,
    auts: &Auts,
) -> Result<Sqn, NetworkAkaError<Kn::Error>> {
    let temp = m.temp(rand).map_err(NetworkAkaError::Kernel)?;
    let f = m.f2345_with_temp(temp).map_err(NetworkAkaError::Kernel)?;
    let sqn_ms = xor6(&auts.0[..6], &f.ak_star);
    let (_, mac_s) = m
        .f1_with_temp(temp, &sqn_ms, &Amf::RESYNC)
        .map_err(NetworkAkaError::Kernel)?;
    if bool::from(mac_s.ct_eq(&auts.0[6..])) {
        Ok(Sqn::from_bytes(sqn_ms))
    } else {
        Err(NetworkAkaError::MacS)
    }
}

/// Verifies AUTS and, if it is genuine, resets SEQ_HE when needed (TS 33.102 6.3.5).
/// Returns SQN_MS. A bad MAC-S changes nothing.
pub fn resynchronise<Kn: Kernel>(
    m: &Milenage<Kn>,
    state: &mut HeSqnState,
    profile: &SqnProfile,
    rand: &Rand,
    auts: &Auts,
) -> Result<Sqn, NetworkAkaError<Kn::Error>> {
    profile.validate()?;
    let sqn_ms = recover_sqn_ms(m, rand, auts)?;
    state.resync(profile, sqn_ms);
    Ok(sqn_ms)
}
