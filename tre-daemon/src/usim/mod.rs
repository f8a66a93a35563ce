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
//! - [`vpcd`]: the PC/SC card, `tred` being the virtual ICC of vsmartcard's vpcd
//!   (`usim_vpcd`).
//!
//! The package's data part (home PLMN, name, forbidden PLMNs, search period) sets the files'
//! contents over the defaults; the UE's updates of EF_FPLMN, EF_LOCI, EF_PSLOCI and EF_EPSLOCI
//! are kept in the MCIM's registry record (`registry::record::UE_PERSISTED`).

pub mod apdu;
pub mod card;
pub mod files;
pub mod socket;
pub mod vpcd;
