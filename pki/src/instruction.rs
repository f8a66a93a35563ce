//! Remote instructions from an authorised stakeholder (TR 33.812 5.1.1.3 remote management;
//! 5.1.2.4): an SHO instructs a device about *its own* MCIM on it (discover, block, unblock,
//! retire, delete), and the device reports what it did.
//!
//! The [`Instruction`] is a COSE_Sign1 by the SHO (`mcim_core::signed`, its certificate in the
//! protected header, issued by the SHO CA): bound to the device (its PCID), the MCIM (its
//! IMSI) and a sequence number per SHO and device that only grows, so the device refuses a
//! replayed or reordered one. The RO's DPF only carries it (on the device's task stream); it
//! cannot make one, and neither can another SHO for this SHO's MCIM.
//!
//! The [`Report`] is signed in the device's TRE with its TLS key (the key the supplier root
//! certified for its PCID), like the discard notice; ten lines:
//!
//! ```text
//! mcim-instruction-report-v1
//! <PCID>
//! <IMSI named by the instruction, or "unknown">
//! <SHO that signed it, or "unknown">
//! <sequence number>
//! <SHA-256 of the instruction's bytes, hex>
//! <done | refused>
//! <the MCIM's state after it, or "unknown">
//! <reason: "none" when done, else one of the REFUSED_* codes>
//! <reported at, seconds since the epoch>
//! ```

use serde::{Deserialize, Serialize};

/// [`Instruction::kind`].
pub const KIND: &str = "mcim-instruction-v1";
/// The report's first line.
pub const REPORT_DOMAIN: &str = "mcim-instruction-report-v1";

/// What an SHO may instruct.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Report whether the device holds the MCIM, and its state; nothing changes.
    Discover,
    /// Activated -> Blocked (an open session ends first).
    Block,
    /// Blocked -> Activated.
    Unblock,
    /// -> Retired: the secrets leave the TRE.
    Retire,
    /// -> Deleted (retired first).
    Delete,
}

impl Action {
    /// Its name on the wire and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Discover => "discover",
            Action::Block => "block",
            Action::Unblock => "unblock",
            Action::Retire => "retire",
            Action::Delete => "delete",
        }
    }
}

/// The SHO's instruction (the payload of its COSE_Sign1). Nothing else is accepted in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instruction {
    /// Always [`KIND`].
    pub kind: String,
    /// The device.
    pub pcid: String,
    /// The SHO's MCIM on it.
    pub imsi: String,
    /// The SHO instructing (its certificate's identity).
    pub sho: String,
    /// Above every earlier instruction of this SHO for this device.
    pub seq: u64,
    /// What to do.
    pub action: Action,
    /// When the SHO signed it.
    pub issued_at: u64,
}

/// [`Report::outcome`] of an instruction carried out.
pub const DONE: &str = "done";
/// [`Report::outcome`] of an instruction refused; nothing changed.
pub const REFUSED: &str = "refused";
/// [`Report::reason`] when done.
pub const NO_REASON: &str = "none";
/// The signature is not an SHO's under the SHO CA the device trusts, or not in the form.
pub const REFUSED_SIGNATURE: &str = "signature";
/// It names another device.
pub const REFUSED_ANOTHER_DEVICE: &str = "another-device";
/// The device holds no MCIM of that SHO with that IMSI (the same answer whether the IMSI is
/// absent or another SHO's: nothing is learnt about other SHOs' MCIMs).
pub const REFUSED_NOT_YOURS: &str = "not-yours";
/// Its sequence number is not above the last one of that SHO: replayed or reordered.
pub const REFUSED_REPLAYED: &str = "replayed";
/// Its sequence number is above [`MAX_SEQ`] (it would leave the SHO no number after it).
pub const REFUSED_SEQ_RANGE: &str = "sequence-out-of-range";
/// Signed by an SHO, but not an instruction in this form (a field missing, unknown or
/// mistyped).
pub const REFUSED_MALFORMED: &str = "malformed";
/// The largest sequence number a device accepts: 2^53, far above an SHO's numbering (it
/// numbers by the millisecond), so that no instruction, even one the SHO signed by mistake,
/// locks that SHO out of the device for good.
pub const MAX_SEQ: u64 = 1 << 53;
/// The lifecycle does not allow it from the MCIM's state (5.1.1.1).
pub const REFUSED_LIFECYCLE: &str = "lifecycle";
/// The TRE or the registry failed.
pub const REFUSED_DEVICE: &str = "device-error";
/// A field the device could not attribute.
pub const UNKNOWN: &str = "unknown";

/// What the device did with one instruction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The device.
    pub pcid: String,
    /// The IMSI the instruction named, or [`UNKNOWN`].
    pub imsi: String,
    /// The SHO that signed it, or [`UNKNOWN`].
    pub sho: String,
    /// The instruction's sequence number (0 when unknown).
    pub seq: u64,
    /// [`digest`] of the instruction's bytes.
    pub instruction_sha256: String,
    /// [`DONE`] or [`REFUSED`].
    pub outcome: String,
    /// The MCIM's state after it (lowercase), or [`UNKNOWN`].
    pub state: String,
    /// [`NO_REASON`] or a `REFUSED_*` code.
    pub reason: String,
    /// When the device reported.
    pub at: u64,
}

/// Why a report does not show what this device did with this instruction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// Not in the report's form.
    #[error("the instruction report is malformed: {0}")]
    Malformed(String),
    /// Not signed by the device's TRE.
    #[error("the instruction report is not signed by this device's TRE: {0}")]
    NotTheDevice(String),
    /// The signature does not verify.
    #[error("the instruction report's signature does not verify")]
    Signature,
    /// It names another device or instruction.
    #[error("the instruction report is for another {0}")]
    Another(&'static str),
}

impl From<crate::lines::NotSigned> for ReportError {
    fn from(e: crate::lines::NotSigned) -> Self {
        use crate::lines::NotSigned as N;
        match e {
            N::NoCertificate => ReportError::Malformed("no certificate".into()),
            N::NotTheDevice(w) => ReportError::NotTheDevice(w.into()),
            N::AnotherDevice => ReportError::Another("device"),
            N::Signature => ReportError::Signature,
        }
    }
}

impl Report {
    /// The report's bytes (what the device signs).
    pub fn to_bytes(&self) -> Result<Vec<u8>, ReportError> {
        crate::lines::write(
            REPORT_DOMAIN,
            &[
                &self.pcid,
                &self.imsi,
                &self.sho,
                &self.seq.to_string(),
                &self.instruction_sha256,
                &self.outcome,
                &self.state,
                &self.reason,
            ],
            self.at,
        )
        .map_err(|w| ReportError::Malformed(w.into()))
    }

    /// Parses a report.
    pub fn parse(bytes: &[u8]) -> Result<Self, ReportError> {
        let bad = |w: &str| ReportError::Malformed(w.to_string());
        let (f, at) = crate::lines::read(bytes, REPORT_DOMAIN, 8).map_err(bad)?;
        let [pcid, imsi, sho, seq, digest, outcome, state, reason] = f.as_slice() else {
            return Err(bad("not ten lines"));
        };
        if ![DONE, REFUSED].contains(outcome) {
            return Err(bad("the outcome is neither done nor refused"));
        }
        Ok(Self {
            pcid: (*pcid).into(),
            imsi: (*imsi).into(),
            sho: (*sho).into(),
            seq: seq.parse().map_err(|_| bad("the sequence number"))?,
            instruction_sha256: (*digest).into(),
            outcome: (*outcome).into(),
            state: (*state).into(),
            reason: (*reason).into(),
            at,
        })
    }
}

/// SHA-256 of an instruction's bytes, hex (what the report names; the DPF's id is its first
/// 32 digits).
pub fn digest(instruction: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(instruction))
}

/// The DPF's id of an instruction.
pub fn instruction_id(instruction: &[u8]) -> String {
    digest(instruction)[..32].to_string()
}

/// Checks a report: signed by the TLS key the supplier root (`supplier_root_der`) certified
/// for `pcid`, naming `pcid` and the instruction `instruction`. Returns it.
pub fn verify_report(
    supplier_root_der: &[u8],
    report: &[u8],
    signature_der: &[u8],
    tls_chain: &[Vec<u8>],
    pcid: &str,
    instruction: &[u8],
) -> Result<Report, ReportError> {
    crate::lines::check_device_signature(
        supplier_root_der,
        report,
        signature_der,
        tls_chain,
        pcid,
    )?;
    let r = Report::parse(report)?;
    if r.pcid != pcid {
        return Err(ReportError::Another("device"));
    }
    if r.instruction_sha256 != digest(instruction) {
        return Err(ReportError::Another("instruction"));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            pcid: "001010000000001".into(),
            imsi: "001020000000001".into(),
            sho: "sho.mcim.local".into(),
            seq: 3,
            instruction_sha256: digest(b"instruction"),
            outcome: DONE.into(),
            state: "blocked".into(),
            reason: NO_REASON.into(),
            at: 9,
        }
    }

    #[test]
    fn reports_round_trip_and_malformed_ones_are_refused() {
        let r = report();
        let b = r.to_bytes().unwrap();
        assert_eq!(Report::parse(&b), Ok(r.clone()));
        let mut bad = r.clone();
        bad.state = "a\nb".into();
        assert!(bad.to_bytes().is_err());
        let text = String::from_utf8(b).unwrap();
        assert!(Report::parse(text.replace("done", "maybe").as_bytes()).is_err());
        assert!(
            Report::parse(
                text.replace(REPORT_DOMAIN, crate::discard::DOMAIN)
                    .as_bytes()
            )
            .is_err()
        );
        assert!(Report::parse(text.replace("\n3\n", "\nthree\n").as_bytes()).is_err());
    }

    #[test]
    fn an_instruction_admits_no_other_field_and_only_known_actions() {
        let i = Instruction {
            kind: KIND.into(),
            pcid: "001010000000001".into(),
            imsi: "001020000000001".into(),
            sho: "sho.mcim.local".into(),
            seq: 1,
            action: Action::Block,
            issued_at: 5,
        };
        let json = serde_json::to_value(&i).unwrap();
        assert_eq!(json["action"], "block");
        let back: Instruction = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, i);
        let mut more = json.clone();
        more["also"] = serde_json::json!("delete everything");
        assert!(serde_json::from_value::<Instruction>(more).is_err());
        let mut unknown = json;
        unknown["action"] = serde_json::json!("format");
        assert!(serde_json::from_value::<Instruction>(unknown).is_err());
        assert_eq!(instruction_id(b"x").len(), 32);
    }

    /// Only the device's own TRE key, for this PCID and this instruction.
    #[test]
    fn a_report_verifies_only_for_the_device_and_its_instruction() {
        use p256::ecdsa::signature::Signer;
        let pcid = "001010000000001";
        let (_dir, key, chain, root) = crate::lines::test_device(pcid);
        let r = report().to_bytes().unwrap();
        let sig: p256::ecdsa::Signature = key.sign(&r);
        let sig = sig.to_der().as_bytes().to_vec();
        let check = |pcid: &str, instruction: &[u8], sig: &[u8]| {
            verify_report(&root, &r, sig, &chain, pcid, instruction)
        };
        assert_eq!(check(pcid, b"instruction", &sig), Ok(report()));
        assert_eq!(
            check(pcid, b"another instruction", &sig),
            Err(ReportError::Another("instruction"))
        );
        assert_eq!(
            check("001010000000002", b"instruction", &sig),
            Err(ReportError::Another("device"))
        );
        let other = p256::ecdsa::SigningKey::from_slice(&[8u8; 32]).unwrap();
        let forged: p256::ecdsa::Signature = other.sign(&r);
        assert_eq!(
            check(pcid, b"instruction", forged.to_der().as_bytes()),
            Err(ReportError::Signature)
        );
    }
}
