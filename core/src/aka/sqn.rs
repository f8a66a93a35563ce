//! Sequence numbers as in 3GPP TS 33.102 Annex C: SQN = SEQ || IND.
//!
//! - The network (HE/AuC) keeps one counter SEQ_HE per subscriber, increments it for every
//!   vector and gives the vectors IND values in turn (C.1.1, C.1.2), so that vectors handed to
//!   different serving nodes, or used out of order, stay acceptable.
//! - The device (USIM, here the TRE) keeps an array SEQ_MS(i), one entry per IND value, and
//!   accepts SEQ || i only if SEQ > SEQ_MS(i) (C.2.2). It also refuses a SEQ more than Δ
//!   above the highest SEQ it accepted (C.2.1, protection against wrap-around of the counter)
//!   and, when an age limit L is configured, a SEQ that is L or more below it (C.2.2).
//! - The network never lets SEQ_HE wrap: at the top of the range it refuses to make vectors
//!   ([`SqnError::Exhausted`]) instead of starting again at zero.

use serde::{Deserialize, Serialize};

/// A 48-bit sequence number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Hash, Serialize, Deserialize)]
pub struct Sqn(u64);

impl Sqn {
    /// The largest SQN (2^48 - 1).
    pub const MAX: u64 = (1 << 48) - 1;

    /// `None` above 48 bits.
    pub fn new(v: u64) -> Option<Self> {
        (v <= Self::MAX).then_some(Self(v))
    }

    /// From its six big-endian octets.
    pub fn from_bytes(b: [u8; 6]) -> Self {
        let mut w = [0u8; 8];
        w[2..].copy_from_slice(&b);
        Self(u64::from_be_bytes(w))
    }

    /// Its six big-endian octets.
    pub fn to_bytes(self) -> [u8; 6] {
        let w = self.0.to_be_bytes();
        let mut b = [0u8; 6];
        b.copy_from_slice(&w[2..]);
        b
    }

    /// The value.
    pub fn value(self) -> u64 {
        self.0
    }
}

/// What went wrong with a sequence number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SqnError {
    /// SEQ_HE reached the top of its range; making more vectors would wrap the counter.
    #[error("sequence number space exhausted: SEQ_HE is at its maximum {max}")]
    Exhausted {
        /// the largest SEQ
        max: u64,
    },
    /// The profile is not usable.
    #[error("invalid SQN profile: {0}")]
    InvalidProfile(&'static str),
    /// The state does not fit the profile (an array of the wrong length, say).
    #[error("SQN state does not match the profile: {0}")]
    StateMismatch(&'static str),
}

/// Why the device refused a sequence number (each a synchronisation failure: it answers AUTS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SqnReject {
    /// SEQ ≤ SEQ_MS(IND): a replay, or older than a vector already used with that IND.
    #[error("SQN not fresh: SEQ {seq} <= SEQ_MS({ind}) = {seq_ms}")]
    NotFresh {
        /// received SEQ
        seq: u64,
        /// its IND
        ind: u32,
        /// the highest SEQ accepted for that IND
        seq_ms: u64,
    },
    /// SEQ - SEQ_MS > Δ (TS 33.102 C.2.1).
    #[error(
        "SQN too far ahead: SEQ {seq} exceeds the highest accepted {highest} by more than delta {delta}"
    )]
    TooFarAhead {
        /// received SEQ
        seq: u64,
        /// highest accepted SEQ over all IND
        highest: u64,
        /// Δ
        delta: u64,
    },
    /// SEQ_MS - SEQ ≥ L (TS 33.102 C.2.2, age limit).
    #[error("SQN too old: SEQ {seq} is at least L={limit} below the highest accepted {highest}")]
    TooOld {
        /// received SEQ
        seq: u64,
        /// highest accepted SEQ over all IND
        highest: u64,
        /// L
        limit: u64,
    },
}

/// The parameters of the Annex C scheme, shared by network and device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SqnProfile {
    /// Length of IND in bits (TS 33.102 C.3.2 suggests 5). 0..=10.
    pub ind_bits: u8,
    /// Δ: largest accepted jump above the highest accepted SEQ (C.3.2 suggests 2^28).
    pub delta: u64,
    /// L: when set, a SEQ that is L or more below the highest accepted SEQ is refused.
    pub age_limit: Option<u64>,
}

impl Default for SqnProfile {
    fn default() -> Self {
        Self {
            ind_bits: 5,
            delta: 1 << 28,
            age_limit: None,
        }
    }
}

impl SqnProfile {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), SqnError> {
        if self.ind_bits > 10 {
            return Err(SqnError::InvalidProfile("ind_bits must be 0..=10"));
        }
        if self.delta == 0 {
            return Err(SqnError::InvalidProfile("delta must be positive"));
        }
        if self.age_limit == Some(0) {
            return Err(SqnError::InvalidProfile("age limit L must be positive"));
        }
        Ok(())
    }

    /// Number of IND values, a = 2^ind_bits.
    pub fn ind_count(&self) -> u32 {
        1 << self.ind_bits
    }

    /// Largest SEQ: 2^(48 - ind_bits) - 1.
    pub fn max_seq(&self) -> u64 {
        (1u64 << (48 - u32::from(self.ind_bits))) - 1
    }

    /// SEQ of an SQN.
    pub fn seq(&self, sqn: Sqn) -> u64 {
        sqn.0 >> self.ind_bits
    }

    /// IND of an SQN.
    pub fn ind(&self, sqn: Sqn) -> u32 {
        // ind_bits <= 10, so the mask fits in u32.
        (sqn.0 & ((1u64 << self.ind_bits) - 1)) as u32
    }

    /// SEQ || IND. `None` if SEQ or IND does not fit.
    pub fn join(&self, seq: u64, ind: u32) -> Option<Sqn> {
        (seq <= self.max_seq() && ind < self.ind_count())
            .then(|| Sqn((seq << self.ind_bits) | u64::from(ind)))
    }
}

/// The network's per-subscriber state (HE/AuC): SEQ_HE and the next IND to hand out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeSqnState {
    /// The SEQ of the last vector made.
    pub seq_he: u64,
    /// The IND of the next vector.
    pub next_ind: u32,
}

impl HeSqnState {
    /// The SQN of the next vector: SEQ_HE + 1 with the next IND in turn (C.1.1, C.1.2).
    /// The state changes only on success.
    pub fn next(&mut self, profile: &SqnProfile) -> Result<Sqn, SqnError> {
        profile.validate()?;
        if self.seq_he >= profile.max_seq() {
            return Err(SqnError::Exhausted {
                max: profile.max_seq(),
            });
        }
        let seq = self.seq_he + 1;
        let ind = self.next_ind % profile.ind_count();
        let sqn = profile
            .join(seq, ind)
            .ok_or(SqnError::StateMismatch("SEQ or IND out of range"))?;
        self.seq_he = seq;
        self.next_ind = (ind + 1) % profile.ind_count();
        Ok(sqn)
    }

    /// After a verified AUTS (TS 33.102 6.3.5, C.3.4): if the next SEQ would not be accepted
    /// by a device whose highest accepted SEQ is that of `sqn_ms` (not above it, or more than
    /// Δ above it), SEQ_HE is set to it, so that the next vector is fresh. Returns whether the
    /// counter changed.
    pub fn resync(&mut self, profile: &SqnProfile, sqn_ms: Sqn) -> bool {
        let seq_ms = profile.seq(sqn_ms);
        let next = self.seq_he.saturating_add(1);
        let acceptable = next > seq_ms && next - seq_ms <= profile.delta;
        if acceptable {
            false
        } else {
            self.seq_he = seq_ms;
            true
        }
    }
}

/// The device's freshness state (USIM / TRE): SEQ_MS(i) for every IND value i.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsSqnState {
    seq_ms: Vec<u64>,
}

impl MsSqnState {
    /// All entries zero, as in a new USIM.
    pub fn new(profile: &SqnProfile) -> Self {
        Self {
            seq_ms: vec![0; profile.ind_count() as usize],
        }
    }

    /// Restores a persisted array; its length must be 2^ind_bits.
    pub fn from_entries(profile: &SqnProfile, seq_ms: Vec<u64>) -> Result<Self, SqnError> {
        if seq_ms.len() != profile.ind_count() as usize {
            return Err(SqnError::StateMismatch(
                "SEQ_MS array length is not 2^ind_bits",
            ));
        }
        Ok(Self { seq_ms })
    }

    /// The array SEQ_MS(i).
    pub fn entries(&self) -> &[u64] {
        &self.seq_ms
    }

    /// The highest accepted SEQ over all IND, with its IND.
    fn highest(&self) -> (u64, u32) {
        let mut best = (0u64, 0u32);
        for (i, &s) in self.seq_ms.iter().enumerate() {
            if s > best.0 {
                best = (s, i as u32);
            }
        }
        best
    }

    /// SQN_MS for AUTS: the highest accepted SEQ with its IND (TS 33.102 6.3.3, C.2).
    pub fn sqn_ms(&self, profile: &SqnProfile) -> Sqn {
        let (seq, ind) = self.highest();
        profile.join(seq, ind).unwrap_or(Sqn(0))
    }

    /// Whether `sqn` would be accepted; changes nothing.
    pub fn check(&self, profile: &SqnProfile, sqn: Sqn) -> Result<(), SqnReject> {
        let seq = profile.seq(sqn);
        let ind = profile.ind(sqn);
        let seq_ms_i = self.seq_ms.get(ind as usize).copied().unwrap_or(u64::MAX);
        if seq <= seq_ms_i {
            return Err(SqnReject::NotFresh {
                seq,
                ind,
                seq_ms: seq_ms_i,
            });
        }
        let (highest, _) = self.highest();
        if seq > highest && seq - highest > profile.delta {
            return Err(SqnReject::TooFarAhead {
                seq,
                highest,
                delta: profile.delta,
            });
        }
        if let Some(limit) = profile.age_limit
            && seq < highest
            && highest - seq >= limit
        {
            return Err(SqnReject::TooOld {
                seq,
                highest,
                limit,
            });
        }
        Ok(())
    }

    /// Checks `sqn` and, if fresh, records it: SEQ_MS(IND) = SEQ.
    pub fn accept(&mut self, profile: &SqnProfile, sqn: Sqn) -> Result<(), SqnReject> {
        self.check(profile, sqn)?;
        let ind = profile.ind(sqn) as usize;
        if let Some(slot) = self.seq_ms.get_mut(ind) {
            *slot = profile.seq(sqn);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> SqnProfile {
        SqnProfile::default()
    }

    #[test]
    fn sqn_bytes_round_trip() {
        let s = Sqn::from_bytes([0xff, 0x9b, 0xb4, 0xd0, 0xb6, 0x07]);
        assert_eq!(s.value(), 0xff9bb4d0b607);
        assert_eq!(s.to_bytes(), [0xff, 0x9b, 0xb4, 0xd0, 0xb6, 0x07]);
        assert!(Sqn::new(1 << 48).is_none());
        assert_eq!(Sqn::new(Sqn::MAX).map(Sqn::to_bytes), Some([0xff; 6]));
    }

    #[test]
    fn seq_and_ind_split_and_join() {
        let p = p();
        let s = p.join(12345, 7).unwrap();
        assert_eq!(p.seq(s), 12345);
        assert_eq!(p.ind(s), 7);
        assert!(p.join(p.max_seq() + 1, 0).is_none());
        assert!(p.join(1, 32).is_none());
    }

    #[test]
    fn network_cycles_ind_and_increments_seq() {
        let p = p();
        let mut he = HeSqnState::default();
        let a = he.next(&p).unwrap();
        let b = he.next(&p).unwrap();
        assert_eq!((p.seq(a), p.ind(a)), (1, 0));
        assert_eq!((p.seq(b), p.ind(b)), (2, 1));
        for _ in 0..30 {
            he.next(&p).unwrap();
        }
        let c = he.next(&p).unwrap();
        assert_eq!(
            (p.seq(c), p.ind(c)),
            (33, 0),
            "IND wraps after 2^ind_bits vectors"
        );
    }

    #[test]
    fn in_window_reordering_is_accepted() {
        let p = p();
        let mut he = HeSqnState::default();
        let v: Vec<Sqn> = (0..4).map(|_| he.next(&p).unwrap()).collect();
        let mut ms = MsSqnState::new(&p);
        // Used out of order, each with its own IND: all fresh.
        for i in [3, 0, 2, 1] {
            ms.accept(&p, v[i]).unwrap();
        }
    }

    #[test]
    fn replay_is_refused_and_changes_nothing() {
        let p = p();
        let mut he = HeSqnState::default();
        let a = he.next(&p).unwrap();
        let mut ms = MsSqnState::new(&p);
        ms.accept(&p, a).unwrap();
        let before = ms.clone();
        assert_eq!(
            ms.accept(&p, a),
            Err(SqnReject::NotFresh {
                seq: 1,
                ind: 0,
                seq_ms: 1
            })
        );
        assert_eq!(ms, before);
    }

    #[test]
    fn older_vector_with_same_ind_is_refused() {
        let p = p();
        let mut ms = MsSqnState::new(&p);
        ms.accept(&p, p.join(40, 3).unwrap()).unwrap();
        assert!(matches!(
            ms.accept(&p, p.join(8, 3).unwrap()),
            Err(SqnReject::NotFresh { .. })
        ));
    }

    #[test]
    fn jump_beyond_delta_is_refused() {
        let p = SqnProfile { delta: 1000, ..p() };
        let mut ms = MsSqnState::new(&p);
        ms.accept(&p, p.join(10, 0).unwrap()).unwrap();
        ms.accept(&p, p.join(1010, 1).unwrap()).unwrap();
        let before = ms.clone();
        assert!(matches!(
            ms.accept(&p, p.join(2011, 2).unwrap()),
            Err(SqnReject::TooFarAhead { .. })
        ));
        assert_eq!(ms, before);
    }

    #[test]
    fn age_limit_l_refuses_old_vectors() {
        let p = SqnProfile {
            age_limit: Some(100),
            ..p()
        };
        let mut ms = MsSqnState::new(&p);
        ms.accept(&p, p.join(500, 0).unwrap()).unwrap();
        assert!(ms.check(&p, p.join(401, 1).unwrap()).is_ok());
        assert!(matches!(
            ms.check(&p, p.join(400, 1).unwrap()),
            Err(SqnReject::TooOld { .. })
        ));
    }

    #[test]
    fn network_never_wraps_at_the_top_of_the_range() {
        let p = p();
        let mut he = HeSqnState {
            seq_he: p.max_seq() - 1,
            next_ind: 0,
        };
        let last = he.next(&p).unwrap();
        assert_eq!(p.seq(last), p.max_seq());
        let before = he.clone();
        assert_eq!(he.next(&p), Err(SqnError::Exhausted { max: p.max_seq() }));
        assert_eq!(he, before);
    }

    #[test]
    fn device_refuses_a_wrapped_sqn_near_the_top() {
        let p = p();
        let mut ms = MsSqnState::new(&p);
        // Walk the device up to the top in steps of at most Δ.
        let mut seq = 0;
        while seq < p.max_seq() {
            seq = (seq + p.delta).min(p.max_seq());
            ms.accept(&p, p.join(seq, 0).unwrap()).unwrap();
        }
        // A counter that wrapped around to small values is stale, for every IND.
        for ind in 0..p.ind_count() {
            let wrapped = p.join(1, ind).unwrap();
            if ind == 0 {
                assert!(matches!(
                    ms.check(&p, wrapped),
                    Err(SqnReject::NotFresh { .. })
                ));
            } else {
                // Other INDs are still 0: SEQ 1 > 0 but far below the top; Annex C accepts
                // it unless L is set, which is exactly what L is for.
                assert!(ms.check(&p, wrapped).is_ok());
                let with_l = SqnProfile {
                    age_limit: Some(1 << 20),
                    ..p
                };
                assert!(matches!(
                    ms.check(&with_l, wrapped),
                    Err(SqnReject::TooOld { .. })
                ));
            }
        }
    }

    #[test]
    fn resync_moves_seq_he_only_when_needed() {
        let p = p();
        let mut he = HeSqnState {
            seq_he: 10,
            next_ind: 0,
        };
        // Device has seen SEQ 50: next (11) would be stale; reset to 50.
        assert!(he.resync(&p, p.join(50, 4).unwrap()));
        assert_eq!(he.seq_he, 50);
        // Device at 20 while HE is at 50: next (51) is fine; no change.
        assert!(!he.resync(&p, p.join(20, 0).unwrap()));
        assert_eq!(he.seq_he, 50);
        // HE ran more than Δ ahead of the device: pulled back to the device.
        let mut far = HeSqnState {
            seq_he: 5 + p.delta + 10,
            next_ind: 0,
        };
        assert!(far.resync(&p, p.join(5, 0).unwrap()));
        assert_eq!(far.seq_he, 5);
    }

    #[test]
    fn profile_validation() {
        assert!(
            SqnProfile {
                ind_bits: 11,
                ..p()
            }
            .validate()
            .is_err()
        );
        assert!(SqnProfile { delta: 0, ..p() }.validate().is_err());
        assert!(
            SqnProfile {
                age_limit: Some(0),
                ..p()
            }
            .validate()
            .is_err()
        );
        assert!(MsSqnState::from_entries(&p(), vec![0; 31]).is_err());
        assert!(MsSqnState::from_entries(&p(), vec![0; 32]).is_ok());
    }
}
