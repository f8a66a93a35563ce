//! The MCIM as a USIM a modem can use (issue 17): the UICC and its USIM application over
//! command APDUs (ETSI TS 102 221, 3GPP TS 31.102), presenting the MCIM the owner chose for
//! connectivity, with AUTHENTICATE answered inside the TRE on the same SQN state as `tred`'s
//! own AKA.
//!
//! - [`apdu`]: command and response APDUs, status words.
//! - [`files`]: MF, EF_ICCID, EF_DIR, ADF.USIM and its EFs, made from the MCIM.
//! - [`card`]: the card's state machine (SELECT, READ/UPDATE BINARY and RECORD, STATUS,
//!   VERIFY / CHANGE / UNBLOCK PIN, AUTHENTICATE).
//! - [`socket`]: raw APDUs on a Unix socket for modem bridges (`usim_socket`).
//!
//! Not yet (issue 17's notes): the PC/SC virtual card through vpcd, the UE's writes
//! (EF_LOCI, EF_KEYS, ...) kept across resets (they live for the card session), the package's
//! data part overriding the defaults.

pub mod apdu;
pub mod card;
pub mod files;
pub mod socket;
