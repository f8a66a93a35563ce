//! Command and response APDUs (ISO/IEC 7816-4 short APDUs, as ETSI TS 102 221 10.1 uses them)
//! and the status words a UICC answers (TS 102 221 10.2.1).

/// A command APDU: CLA INS P1 P2 [Lc data] [Le].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// Class byte (00 for TS 102 221, A0 for GSM 11.11 callers).
    pub cla: u8,
    /// Instruction.
    pub ins: u8,
    /// Parameter 1.
    pub p1: u8,
    /// Parameter 2.
    pub p2: u8,
    /// The command data (Lc octets).
    pub data: Vec<u8>,
    /// How many octets the caller expects (Le; 0 in the APDU means 256).
    pub le: Option<usize>,
}

/// Why bytes are not a command APDU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApduError {
    /// Shorter than CLA INS P1 P2.
    #[error("an APDU has at least 4 octets")]
    TooShort,
    /// Lc does not match the octets that follow (or an extended length, not supported).
    #[error("Lc does not match the command's length")]
    WrongLength,
}

impl Command {
    /// Parses a short APDU (cases 1 to 4 of ISO/IEC 7816-3 12.1.2).
    pub fn parse(b: &[u8]) -> Result<Self, ApduError> {
        let [cla, ins, p1, p2, body @ ..] = b else {
            return Err(ApduError::TooShort);
        };
        let (data, le) = match body {
            [] => (Vec::new(), None),
            [le] => (
                Vec::new(),
                Some(if *le == 0 { 256 } else { usize::from(*le) }),
            ),
            [lc, rest @ ..] if *lc != 0 && rest.len() == usize::from(*lc) => (rest.to_vec(), None),
            [lc, rest @ ..] if *lc != 0 && rest.len() == usize::from(*lc) + 1 => {
                let le = rest[usize::from(*lc)];
                (
                    rest[..usize::from(*lc)].to_vec(),
                    Some(if le == 0 { 256 } else { usize::from(le) }),
                )
            }
            _ => return Err(ApduError::WrongLength),
        };
        Ok(Self {
            cla: *cla,
            ins: *ins,
            p1: *p1,
            p2: *p2,
            data,
            le,
        })
    }
}

/// A response APDU: data and the status word SW1 SW2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The response data.
    pub data: Vec<u8>,
    /// SW1 SW2.
    pub sw: u16,
}

impl Response {
    /// Normal ending with data.
    pub fn ok(data: Vec<u8>) -> Self {
        Self { data, sw: SW_OK }
    }

    /// A status word alone.
    pub fn status(sw: u16) -> Self {
        Self {
            data: Vec::new(),
            sw,
        }
    }

    /// The octets on the wire: data, SW1, SW2.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.data.clone();
        out.extend_from_slice(&self.sw.to_be_bytes());
        out
    }
}

/// Normal ending of the command.
pub const SW_OK: u16 = 0x9000;
/// Memory problem: the update could not be kept.
pub const SW_MEMORY_PROBLEM: u16 = 0x6581;
/// Wrong length (Lc or Le).
pub const SW_WRONG_LENGTH: u16 = 0x6700;
/// Command incompatible with the file structure.
pub const SW_INCOMPATIBLE_FILE: u16 = 0x6981;
/// Security status not satisfied (the PIN is not verified).
pub const SW_SECURITY_NOT_SATISFIED: u16 = 0x6982;
/// Authentication method blocked (PIN blocked).
pub const SW_BLOCKED: u16 = 0x6983;
/// Referenced data invalidated (the application is not usable: no MCIM, blocked MCIM).
pub const SW_INVALIDATED: u16 = 0x6984;
/// Conditions of use not satisfied.
pub const SW_CONDITIONS: u16 = 0x6985;
/// Command not allowed: no EF selected.
pub const SW_NO_EF: u16 = 0x6986;
/// Incorrect parameters in the data field.
pub const SW_WRONG_DATA: u16 = 0x6a80;
/// File or application not found.
pub const SW_NOT_FOUND: u16 = 0x6a82;
/// Record not found.
pub const SW_RECORD_NOT_FOUND: u16 = 0x6a83;
/// Incorrect P1 or P2.
pub const SW_WRONG_P1P2: u16 = 0x6a86;
/// Reference data not found (no such PIN).
pub const SW_NO_REFERENCE: u16 = 0x6a88;
/// Wrong parameters P1-P2 (offset outside the EF).
pub const SW_WRONG_OFFSET: u16 = 0x6b00;
/// Instruction code not supported.
pub const SW_INS_NOT_SUPPORTED: u16 = 0x6d00;
/// Class not supported.
pub const SW_CLA_NOT_SUPPORTED: u16 = 0x6e00;
/// Technical problem, no precise diagnosis.
pub const SW_TECHNICAL: u16 = 0x6f00;
/// AUTHENTICATE: MAC failure (TS 102 221 10.2.1.4, TS 31.102 7.1.2.1).
pub const SW_AUTH_MAC_FAILURE: u16 = 0x9862;
/// Normal ending, `n` octets waiting for GET RESPONSE: 61 xx (00 for 256 or more).
pub fn sw_bytes_available(n: usize) -> u16 {
    0x6100 | u16::try_from(n).ok().filter(|n| *n < 256).unwrap_or(0)
}
/// A wrong PIN with `n` tries left: 63 Cn.
pub fn sw_tries_left(n: u32) -> u16 {
    0x63c0 | u16::try_from(n.min(15)).unwrap_or(15)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_four_cases_parse_and_bad_lengths_are_refused() {
        let c1 = Command::parse(&[0x00, 0xf2, 0x00, 0x00]).unwrap();
        assert_eq!((c1.data.len(), c1.le), (0, None));
        let c2 = Command::parse(&[0x00, 0xb0, 0x00, 0x00, 0x00]).unwrap();
        assert_eq!(c2.le, Some(256));
        let c3 = Command::parse(&[0x00, 0xa4, 0x00, 0x04, 0x02, 0x3f, 0x00]).unwrap();
        assert_eq!((c3.data, c3.le), (vec![0x3f, 0x00], None));
        let c4 = Command::parse(&[0x00, 0xa4, 0x00, 0x04, 0x02, 0x3f, 0x00, 0x10]).unwrap();
        assert_eq!((c4.data, c4.le), (vec![0x3f, 0x00], Some(16)));
        assert_eq!(
            Command::parse(&[0x00, 0xa4, 0x00]),
            Err(ApduError::TooShort)
        );
        assert_eq!(
            Command::parse(&[0x00, 0xa4, 0x00, 0x04, 0x05, 0x3f]),
            Err(ApduError::WrongLength)
        );
        assert_eq!(sw_tries_left(2), 0x63c2);
        assert_eq!(Response::ok(vec![1]).to_bytes(), [1, 0x90, 0x00]);
    }
}
