//! What the registry stores per MCIM and in its header.

use std::collections::BTreeMap;

use mcim_core::aka::milenage::InvalidConstants;
use mcim_core::aka::{Constants, MsSqnState, SqnProfile};
use mcim_core::lifecycle::{BlockReason, McimState};
use serde::{Deserialize, Serialize};

use crate::tre::ProtectedSecrets;

/// One MCIM in the registry (5.1.1.1 "has an entry in the M2ME's registry").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct McimRecord {
    /// The registry key: the MCIM's operational IMSI.
    pub id: String,
    /// The SHO that issued it.
    pub sho: String,
    /// Lifecycle state.
    pub state: McimState,
    /// Why it is Blocked, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<BlockReason>,
    /// K and OPc in the TRE's at-rest form; `None` once Retired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<ProtectedSecrets>,
    /// MILENAGE constants.
    pub constants: ConstantsRecord,
    /// The SQN scheme.
    pub sqn_profile: SqnProfile,
    /// The USIM's SQN state (changes with every accepted AUTN).
    pub sqn: MsSqnState,
    /// The application PIN, if the MCIM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<PinRecord>,
    /// When the credential stops being valid (seconds since the epoch): the PCID's initial
    /// credential, whose lifetime the CCIF/ICF gave (5.1.3.7.4.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// References (hex) of what the TRE still holds for this MCIM although its record could
    /// not be trusted (a tampered or damaged record, or one whose other key object is
    /// missing): kept with the Blocked stub so that retiring or deleting it destroys them too.
    /// Never destroyed while another record refers to them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_in_tre: Vec<String>,
    /// What its USIM's files hold beyond the IMSI: the package's data part and the UE's
    /// writes (`mcim_tre::usim`), under the registry's integrity protection.
    #[serde(default, skip_serializing_if = "UsimRecord::is_empty")]
    pub usim: UsimRecord,
    /// Bumped at every change; the header records it (per-record rollback).
    pub version: u64,
}

/// The MCIM's USIM data (TS 31.102): what the package's data part set, and the EFs the UE
/// updated (kept across resets and restarts). Empty: the card's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsimRecord {
    /// The MNC's length in digits (EF_AD), from the package's home PLMN; none: 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mnc_len: Option<u8>,
    /// EF_SPN's name; empty: the SHO's id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub spn: String,
    /// EF_FPLMN's initial contents, "MCC-MNC" each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forbidden_plmns: Vec<String>,
    /// EF_HPPLMN, in steps of 6 minutes; none: 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hpplmn_period: Option<u8>,
    /// The EFs the UE updated: file id (4 hex digits) to contents (hex). Only
    /// [`UE_PERSISTED`] files; never EF_KEYS or EF_KEYSPS (CK and IK stay off the disk).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ue_files: BTreeMap<String, String>,
}

/// The EFs whose UE updates outlive the card session (TS 31.102 4.2.16 EF_FPLMN, 4.2.17
/// EF_LOCI, 4.2.23 EF_PSLOCI, 4.2.91 EF_EPSLOCI), with their sizes. EF_KEYS and EF_KEYSPS
/// are writable but kept for the session only: after a reset the UE finds no key set
/// (KSI 7) and the network runs AKA again (TS 33.102 6.4.4), so CK and IK never reach a file.
pub const UE_PERSISTED: [(u16, usize); 4] =
    [(0x6f7b, 12), (0x6f7e, 11), (0x6f73, 14), (0x6fe3, 18)];

impl UsimRecord {
    /// Nothing set: the card's defaults.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// Refuses values no card could hold: an MNC length other than 2 or 3, a name of more
    /// than 16 printable ASCII characters, a PLMN not "MCC-MNC", more than 4 of them, a
    /// search period past 80 (8 hours).
    pub fn check(&self) -> Result<(), String> {
        if self.mnc_len.is_some_and(|n| !(2..=3).contains(&n)) {
            return Err("the MNC has 2 or 3 digits".into());
        }
        if self.spn.len() > 16 || !self.spn.bytes().all(|c| c.is_ascii_graphic() || c == b' ') {
            return Err(
                "the service provider name is 16 printable ASCII characters at most".into(),
            );
        }
        if self.forbidden_plmns.len() > 4 {
            return Err("4 forbidden PLMNs at most (EF_FPLMN)".into());
        }
        if let Some(bad) = self.forbidden_plmns.iter().find(|p| plmn(p).is_none()) {
            return Err(format!("forbidden PLMN {bad:?} is not MCC-MNC"));
        }
        if self.hpplmn_period.is_some_and(|n| n > 80) {
            return Err("the higher-priority PLMN search period is 80 (8 hours) at most".into());
        }
        Ok(())
    }

    /// What the UE wrote into EF `fid`, if it did.
    pub fn ue_file(&self, fid: u16) -> Option<Vec<u8>> {
        hex::decode(self.ue_files.get(&format!("{fid:04X}"))?).ok()
    }
}

/// "MCC-MNC" as its digits: 3 and 2 or 3.
pub fn plmn(s: &str) -> Option<(&str, &str)> {
    let (mcc, mnc) = s.split_once('-')?;
    let digits = |x: &str| x.bytes().all(|c| c.is_ascii_digit());
    (mcc.len() == 3 && (2..=3).contains(&mnc.len()) && digits(mcc) && digits(mnc))
        .then_some((mcc, mnc))
}

/// MILENAGE c1..c5 (hex) and r1..r5.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConstantsRecord {
    /// c1..c5, 32 hex digits each.
    pub c: [String; 5],
    /// r1..r5.
    pub r: [u32; 5],
}

impl From<&Constants> for ConstantsRecord {
    fn from(c: &Constants) -> Self {
        Self {
            c: c.c_blocks().map(hex::encode),
            r: c.rotations(),
        }
    }
}

impl ConstantsRecord {
    /// Back to MILENAGE constants; fails on malformed values.
    pub fn to_constants(&self) -> Result<Constants, String> {
        let mut c = [[0u8; 16]; 5];
        for (out, h) in c.iter_mut().zip(&self.c) {
            *out = hex::decode(h)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or("a MILENAGE constant is not 32 hex digits")?;
        }
        Constants::new(c, self.r).map_err(|e: InvalidConstants| e.to_string())
    }
}

/// PIN and PUK (TS 31.102 application PIN): TRE MACs of the values, never the values, and
/// the retry counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRecord {
    /// The TRE checks the PIN and PUK itself: they are the authValues of the MCIM's objects
    /// (`ProtectedSecrets::pin_bound`), and `pin_tag`/`puk_tag` are empty (a tag could be
    /// searched through the integrity key without the TRE counting a try).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_tre: bool,
    /// TRE MAC of the PIN (hex); empty when `in_tre`.
    pub pin_tag: String,
    /// Tries left before the MCIM is Blocked.
    pub pin_tries_left: u8,
    /// TRE MAC of the PUK (hex).
    pub puk_tag: String,
    /// PUK tries left; at 0 the PIN can never be reset.
    pub puk_tries_left: u8,
}

impl PinRecord {
    /// A new PIN and PUK the TRE checks itself (`in_tre`), all tries left.
    pub fn in_tre() -> Self {
        Self {
            in_tre: true,
            pin_tag: String::new(),
            pin_tries_left: PIN_TRIES,
            puk_tag: String::new(),
            puk_tries_left: PUK_TRIES,
        }
    }
}

/// Attempts allowed (TS 31.102 / ETSI TS 102 221 defaults).
pub const PIN_TRIES: u8 = 3;
/// PUK attempts allowed.
pub const PUK_TRIES: u8 = 10;

/// One MCIM as the header knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderEntry {
    /// The record's version.
    pub version: u64,
    /// TRE MAC of the record file (hex).
    pub mac: String,
}

/// The registry header: the commit point of every transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Format version.
    pub format: u32,
    /// The TRE counter value this header was committed with.
    pub counter: u64,
    /// The TRE's hybrid counter value this header was committed with, when the TRE has one
    /// (`Tre::hybrid_counter`): AKA commits advance it instead of `counter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hybrid_counter: Option<u64>,
    /// The TRE's reset epoch (`HybridCount::reset_epoch`) when this header was committed: a
    /// jump of the hybrid counter is accepted only across a reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm_epoch: Option<crate::tre::ResetEpoch>,
    /// Last committed audit entry: sequence number.
    pub audit_seq: u64,
    /// Last committed audit entry: hash (hex).
    pub audit_head: String,
    /// Every MCIM: id -> version and MAC.
    pub mcims: BTreeMap<String, HeaderEntry>,
    /// The MCIM the owner chose for connectivity (5.1.3.7.2), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connectivity: Option<String>,
    /// References (hex) of TRE objects that no MCIM refers to any more and that must be
    /// destroyed (a token's K and OPc after retire, delete, renewal, discard). Written in the
    /// same commit as the change that let go of them, so a crash before the destruction is
    /// finished at the next start; pruned once destroyed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub doomed: Vec<String>,
}
