//! `mcimctl card`: a USIM in a PC/SC reader, as a UE's modem would use it (ETSI TS 102 221,
//! 3GPP TS 31.102): list the readers, read the card's identity, run AUTHENTICATE. Any USIM
//! works; `tred`'s MCIM appears as one through vsmartcard's vpcd (`usim_vpcd`).
//!
//! pcscd is found where libpcsclite looks: `/run/pcscd/pcscd.comm`, or `PCSCLITE_CSOCK_NAME`.
//! A PIN on the command line is visible to other local users in the process list: this is
//! a test tool.

use std::ffi::CString;

use clap::{Args, Subcommand};
use pcsc::{Context, Protocols, Scope, ShareMode};
use serde_json::json;

use crate::error::CliError;
use crate::hexarg;

/// ADF.USIM's AID prefix: the 3GPP RID and the USIM application code (TS 101 220 annex E);
/// a card answers SELECT by this partial AID with its USIM.
const USIM_AID_PREFIX: [u8; 7] = [0xa0, 0x00, 0x00, 0x00, 0x87, 0x10, 0x02];

/// `mcimctl card ...`
#[derive(Subcommand)]
pub enum CardCommand {
    /// The PC/SC readers, and the ATR of the card in each.
    List,
    /// The card's ICCID, and its IMSI, MNC length and service provider name (the IMSI needs
    /// the PIN when the card has one).
    Read(CardArgs),
    /// AUTHENTICATE in 3G context (TS 31.102 7.1.2): RES, CK, IK and Kc, or AUTS.
    Authenticate(AuthenticateArgs),
}

/// Which card, and its PIN.
#[derive(Args)]
pub struct CardArgs {
    /// The reader (its name, or the start of it); default: the first with a card.
    #[arg(long)]
    reader: Option<String>,
    /// How long to wait for a card to be in the reader, in seconds.
    #[arg(long, default_value_t = 10)]
    wait: u64,
    /// The application PIN (4 to 8 digits), verified first.
    #[arg(long)]
    pin: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// `mcimctl card authenticate`.
#[derive(Args)]
pub struct AuthenticateArgs {
    #[command(flatten)]
    card: CardArgs,
    /// RAND, 32 hex digits.
    #[arg(long, value_name = "HEX", value_parser = hexarg::parse::<16>)]
    rand: [u8; 16],
    /// AUTN, 32 hex digits.
    #[arg(long, value_name = "HEX", value_parser = hexarg::parse::<16>)]
    autn: [u8; 16],
}

/// Runs `mcimctl card ...`.
pub fn run(cmd: CardCommand) -> Result<(), CliError> {
    match cmd {
        CardCommand::List => {
            let ctx = context()?;
            for name in readers(&ctx)? {
                let atr = ctx
                    .connect(&name, ShareMode::Shared, Protocols::ANY)
                    .ok()
                    .and_then(|c| c.status2_owned().ok())
                    .map(|s| s.atr().to_vec());
                match atr {
                    Some(a) => println!("{}: ATR {}", name.to_string_lossy(), hex::encode(a)),
                    None => println!("{}: no card", name.to_string_lossy()),
                }
            }
            Ok(())
        }
        CardCommand::Read(a) => {
            let mut usim = Usim::open(&a)?;
            let iccid = usim.read(&[0x2fe2], 10)?;
            let mut out = json!({"reader": usim.reader, "iccid": swapped_digits(&iccid)});
            usim.select_adf()?;
            if let Some(pin) = &a.pin {
                usim.verify(pin)?;
            }
            let ad = usim.read(&[0x7fff, 0x6fad], 4)?;
            let mnc_len = ad.get(3).copied().unwrap_or(2);
            out["mnc_length"] = json!(mnc_len);
            let spn = usim.read(&[0x7fff, 0x6f46], 17)?;
            out["service_provider_name"] = json!(
                String::from_utf8_lossy(spn.get(1..).unwrap_or_default())
                    .trim_end_matches('\u{fffd}')
                    .to_string()
            );
            match usim.read(&[0x7fff, 0x6f07], 9) {
                Ok(ef) => out["imsi"] = json!(imsi_of(&ef)),
                Err(CliError::Card { sw: 0x6982, .. }) => out["imsi"] = json!(null),
                Err(e) => return Err(e),
            }
            if a.json {
                println!("{out}");
            } else {
                for (k, v) in out.as_object().into_iter().flatten() {
                    println!(
                        "{k}: {}",
                        v.as_str().map_or_else(|| v.to_string(), str::to_string)
                    );
                }
            }
            Ok(())
        }
        CardCommand::Authenticate(a) => {
            let mut usim = Usim::open(&a.card)?;
            usim.select_adf()?;
            if let Some(pin) = &a.card.pin {
                usim.verify(pin)?;
            }
            let out = usim.authenticate(&a.rand, &a.autn)?;
            if a.card.json {
                println!("{out}");
            } else {
                for (k, v) in out.as_object().into_iter().flatten() {
                    println!("{k}: {}", v.as_str().unwrap_or_default());
                }
            }
            Ok(())
        }
    }
}

fn context() -> Result<Context, CliError> {
    Context::establish(Scope::User).map_err(|e| {
        CliError::Input(format!(
            "PC/SC: {e} (is pcscd running? PCSCLITE_CSOCK_NAME names another socket)"
        ))
    })
}

fn readers(ctx: &Context) -> Result<Vec<CString>, CliError> {
    let names = ctx
        .list_readers_owned()
        .map_err(|e| CliError::Input(format!("PC/SC readers: {e}")))?;
    Ok(names)
}

/// A USIM in a reader, over PC/SC.
pub struct Usim {
    card: pcsc::Card,
    /// The reader's name.
    pub reader: String,
}

impl Usim {
    /// The card in `a.reader` (or the first reader with one), waiting `a.wait` seconds for
    /// one to be inserted.
    pub fn open(a: &CardArgs) -> Result<Self, CliError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(a.wait);
        loop {
            match Self::connect(a) {
                Ok(u) => return Ok(u),
                Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
    }

    fn connect(a: &CardArgs) -> Result<Self, CliError> {
        let ctx = context()?;
        let mut last = String::from("no PC/SC reader");
        for name in readers(&ctx)? {
            let shown = name.to_string_lossy().to_string();
            if a.reader
                .as_ref()
                .is_some_and(|r| !shown.starts_with(r.as_str()))
            {
                continue;
            }
            match ctx.connect(&name, ShareMode::Shared, Protocols::ANY) {
                Ok(card) => {
                    return Ok(Self {
                        card,
                        reader: shown,
                    });
                }
                Err(e) => last = format!("{shown}: {e}"),
            }
        }
        Err(CliError::Input(format!("no card: {last}")))
    }

    /// Sends one APDU; the data on 9000, following 61xx with GET RESPONSE.
    pub fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, CliError> {
        let mut buf = [0u8; pcsc::MAX_BUFFER_SIZE];
        let r = self
            .card
            .transmit(apdu, &mut buf)
            .map_err(|e| CliError::Input(format!("PC/SC transmit: {e}")))?;
        let (data, sw) = split_sw(r);
        match sw {
            0x9000 => Ok(data.to_vec()),
            sw if sw >> 8 == 0x61 => {
                let get = [0x00, 0xc0, 0x00, 0x00, (sw & 0xff) as u8];
                self.transmit(&get)
            }
            sw => Err(CliError::Card {
                ins: apdu.get(1).copied().unwrap_or(0),
                sw,
            }),
        }
    }

    /// Selects ADF.USIM by its AID's prefix.
    pub fn select_adf(&mut self) -> Result<(), CliError> {
        let mut apdu = vec![0x00, 0xa4, 0x04, 0x0c, USIM_AID_PREFIX.len() as u8];
        apdu.extend_from_slice(&USIM_AID_PREFIX);
        self.transmit(&apdu).map(|_| ())
    }

    /// Verifies the application PIN (key reference 01).
    pub fn verify(&mut self, pin: &str) -> Result<(), CliError> {
        if !(4..=8).contains(&pin.len()) || !pin.bytes().all(|c| c.is_ascii_digit()) {
            return Err(CliError::Input("--pin: 4 to 8 digits".into()));
        }
        let mut apdu = vec![0x00, 0x20, 0x00, 0x01, 0x08];
        apdu.extend_from_slice(pin.as_bytes());
        apdu.resize(13, 0xff);
        self.transmit(&apdu).map(|_| ())
    }

    /// Reads `len` octets of the transparent EF at `path` from the MF (the MF's own id
    /// left out; 7FFF for the current ADF).
    pub fn read(&mut self, path: &[u16], len: u8) -> Result<Vec<u8>, CliError> {
        let mut select = vec![0x00, 0xa4, 0x08, 0x0c, (path.len() * 2) as u8];
        for fid in path {
            select.extend_from_slice(&fid.to_be_bytes());
        }
        self.transmit(&select)?;
        self.transmit(&[0x00, 0xb0, 0x00, 0x00, len])
    }

    /// AUTHENTICATE in 3G context: `{"res","ck","ik","kc"}` or `{"auts"}`, hex.
    pub fn authenticate(
        &mut self,
        rand: &[u8; 16],
        autn: &[u8; 16],
    ) -> Result<serde_json::Value, CliError> {
        let mut apdu = vec![0x00, 0x88, 0x00, 0x81, 0x22, 0x10];
        apdu.extend_from_slice(rand);
        apdu.push(0x10);
        apdu.extend_from_slice(autn);
        let r = self.transmit(&apdu)?;
        parse_authenticate(&r).ok_or_else(|| {
            CliError::Input(format!(
                "AUTHENTICATE: an answer that does not parse: {}",
                hex::encode(&r)
            ))
        })
    }
}

/// The data and SW1SW2 of a response APDU.
fn split_sw(r: &[u8]) -> (&[u8], u16) {
    match r.len() {
        0 | 1 => (&[], 0x6f00),
        n => (&r[..n - 2], u16::from_be_bytes([r[n - 2], r[n - 1]])),
    }
}

/// TS 31.102 7.1.2.1's answers: DB then RES, CK, IK, Kc (length-prefixed), or DC then AUTS.
fn parse_authenticate(r: &[u8]) -> Option<serde_json::Value> {
    let mut fields = Vec::new();
    let (tag, mut rest) = r.split_first()?;
    while let Some((len, tail)) = rest.split_first() {
        let len = usize::from(*len);
        fields.push(hex::encode(tail.get(..len)?));
        rest = &tail[len..];
    }
    match (tag, fields.as_slice()) {
        (0xdb, [res, ck, ik, kc]) => Some(json!({"res": res, "ck": ck, "ik": ik, "kc": kc})),
        (0xdb, [res, ck, ik]) => Some(json!({"res": res, "ck": ck, "ik": ik})),
        (0xdc, [auts]) => Some(json!({"auts": auts})),
        _ => None,
    }
}

/// Digits in swapped-nibble BCD, F padding dropped (EF_ICCID).
fn swapped_digits(b: &[u8]) -> String {
    b.iter()
        .flat_map(|x| [x & 0x0f, x >> 4])
        .filter(|n| *n < 10)
        .map(|n| char::from(b'0' + n))
        .collect()
}

/// The IMSI in an EF_IMSI (TS 31.102 4.2.2): after the length, the identity type and parity
/// nibble, then the digits.
fn imsi_of(ef: &[u8]) -> String {
    let len = usize::from(ef.first().copied().unwrap_or(0)).min(ef.len().saturating_sub(1));
    ef[1..=len]
        .iter()
        .flat_map(|x| [x & 0x0f, x >> 4])
        .skip(1)
        .filter(|n| *n < 10)
        .map(|n| char::from(b'0' + n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authenticate_answers_and_ef_imsi_parse() {
        let r = hex::decode("db08aabbccddeeff001110000102030405060708090a0b0c0d0e0f10101112131415161718191a1b1c1d1e1f08a0a1a2a3a4a5a6a7").unwrap();
        let v = parse_authenticate(&r).unwrap();
        assert_eq!(v["res"], "aabbccddeeff0011");
        assert_eq!(v["kc"], "a0a1a2a3a4a5a6a7");
        let auts =
            parse_authenticate(&hex::decode("dc0e000102030405060708090a0b0c0d").unwrap()).unwrap();
        assert_eq!(auts["auts"], "000102030405060708090a0b0c0d");
        assert!(parse_authenticate(&[0xdb, 0x08, 0x01]).is_none());
        assert_eq!(
            imsi_of(&hex::decode("080910101032547698").unwrap()),
            "001010123456789"
        );
    }
}
