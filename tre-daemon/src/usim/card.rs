//! The UICC with its USIM application, answering command APDUs (ETSI TS 102 221 clause 11,
//! 3GPP TS 31.102 clause 7) for the MCIM the owner chose for connectivity (TR 33.812
//! 5.1.3.7.2). AUTHENTICATE runs the same AKA, in the TRE, with the same SQN state, as
//! `tred`'s own `Authenticate`; VERIFY / CHANGE / UNBLOCK PIN are the MCIM's PIN and PUK.

use mcim_core::aka::device::DeviceResponse;
use mcim_core::aka::{Autn, Rand};
use mcim_core::lifecycle::{LifecycleOp, McimState};

use super::apdu::*;
use super::files::{ADF, Ef, Files, MF, Profile, Structure, USIM_AID};
use crate::device::{Credential, Device, DeviceError};
use crate::registry::RegistryError;
use crate::registry::record::UE_PERSISTED;
use crate::tre::TreError;

/// The answer to reset: T=1 direct convention, historical bytes naming a UICC
/// (ISO/IEC 7816-3 8.2; TCK at the end).
pub fn atr() -> Vec<u8> {
    let mut atr = vec![
        0x3b, 0x9f, 0x96, 0x80, 0x1f, 0xc7, 0x80, 0x31, 0xe0, 0x73, 0xfe, 0x21, 0x1b, 0x63, 0x3a,
        0x20, 0x4e, 0x83, 0x00, 0x90, 0x00,
    ];
    let tck = atr[1..].iter().fold(0u8, |a, b| a ^ b);
    atr.push(tck);
    atr
}

/// Where the card's file pointer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Df {
    Mf,
    Usim,
}

/// The application's state with the MCIM it presents.
struct Session {
    mcim: String,
    files: Files,
    df: Df,
    ef: Option<(Df, usize)>,
    has_pin: bool,
    pin_verified: bool,
    /// ADF.USIM is the current application (selecting files of the MF keeps it so).
    app: bool,
    /// This card opened the MCIM's session in the TRE (VERIFY, or AUTHENTICATE without a
    /// PIN): it ends it when the card is reset, powered off or disconnected.
    opened: bool,
}

/// One card: powered on by its reader (or socket), reset, answering APDUs.
pub struct Card {
    device: Device,
    session: Option<Session>,
    /// The caller may change and unblock the PIN (the owner class; as on the local API).
    pin_admin: bool,
    /// A case 4 command's data waiting for GET RESPONSE.
    pending: Option<Vec<u8>>,
}

/// TS 102 221 instruction codes.
mod ins {
    pub const SELECT: u8 = 0xa4;
    pub const STATUS: u8 = 0xf2;
    pub const READ_BINARY: u8 = 0xb0;
    pub const UPDATE_BINARY: u8 = 0xd6;
    pub const READ_RECORD: u8 = 0xb2;
    pub const UPDATE_RECORD: u8 = 0xdc;
    pub const VERIFY: u8 = 0x20;
    pub const CHANGE_PIN: u8 = 0x24;
    pub const UNBLOCK_PIN: u8 = 0x2c;
    pub const AUTHENTICATE: u8 = 0x88;
    pub const GET_RESPONSE: u8 = 0xc0;
}

impl Card {
    /// A card over `device`'s registry and TRE; `pin_admin`: its caller may change and
    /// unblock the PIN.
    pub fn new(device: Device, pin_admin: bool) -> Self {
        Self {
            device,
            session: None,
            pin_admin,
            pending: None,
        }
    }

    /// Reset (or power on or off): the application is closed, the PIN no longer verified, the
    /// MCIM's session this card opened in the TRE ended; the answer to reset.
    pub async fn reset(&mut self) -> Vec<u8> {
        self.close().await;
        atr()
    }

    /// The card goes away: the MCIM's session it opened ends (5.1.1.1 Selected -> Activated),
    /// so that no session outlives the card that verified its PIN.
    pub async fn close(&mut self) {
        self.pending = None;
        if let Some(s) = self.session.take()
            && s.opened
        {
            let _ = self.device.apply(&s.mcim, LifecycleOp::EndSession).await;
        }
    }

    /// Answers one command APDU (malformed bytes too, with the status word that says why).
    /// A command with data and without Le (case 4 as T=0 carries it, TS 102 221 7.3.1.1.4)
    /// is answered 61xx: its data waits for GET RESPONSE. With Le, the data comes at once.
    pub async fn transmit(&mut self, apdu: &[u8]) -> Vec<u8> {
        let response = match Command::parse(apdu) {
            Ok(c) if c.ins == ins::GET_RESPONSE => self.get_response(&c),
            Ok(c) => {
                self.pending = None;
                let r = self.command(&c).await;
                if !c.data.is_empty() && c.le.is_none() && !r.data.is_empty() && r.sw == SW_OK {
                    let sw = sw_bytes_available(r.data.len());
                    self.pending = Some(r.data);
                    Response::status(sw)
                } else {
                    r
                }
            }
            Err(ApduError::TooShort) => Response::status(SW_WRONG_LENGTH),
            Err(ApduError::WrongLength) => Response::status(SW_WRONG_LENGTH),
        };
        response.to_bytes()
    }

    /// GET RESPONSE (TS 102 221 11.1.13): the waiting data, Le octets of it at a time (the
    /// rest announced with 61xx again).
    fn get_response(&mut self, c: &Command) -> Response {
        if c.p1 != 0x00 || c.p2 != 0x00 {
            return Response::status(SW_WRONG_P1P2);
        }
        let Some(mut data) = self.pending.take() else {
            return Response::status(SW_CONDITIONS);
        };
        let le = c.le.unwrap_or(256);
        if le >= data.len() {
            return Response::ok(data);
        }
        let rest = data.split_off(le);
        let r = Response {
            data,
            sw: sw_bytes_available(rest.len()),
        };
        self.pending = Some(rest);
        r
    }

    async fn command(&mut self, c: &Command) -> Response {
        // Logical channels are not offered; the class is ISO (0X) or proprietary 8X for
        // STATUS, or GSM's A0.
        if !matches!(c.cla, 0x00 | 0x80 | 0xa0) {
            return Response::status(SW_CLA_NOT_SUPPORTED);
        }
        if let Err(sw) = self.refresh().await {
            return Response::status(sw);
        }
        match c.ins {
            ins::SELECT => self.select(c),
            ins::STATUS => self.status(c),
            ins::READ_BINARY => self.read_binary(c),
            ins::UPDATE_BINARY => self.update_binary(c).await,
            ins::READ_RECORD => self.read_record(c),
            ins::UPDATE_RECORD => self.update_record(c).await,
            ins::VERIFY => self.verify(c).await,
            ins::CHANGE_PIN => self.change_pin(c).await,
            ins::UNBLOCK_PIN => self.unblock_pin(c).await,
            ins::AUTHENTICATE => self.authenticate(c).await,
            _ => Response::status(SW_INS_NOT_SUPPORTED),
        }
    }

    /// Opens the application on first use; afterwards follows the owner: another MCIM
    /// chosen for connectivity is another card (this one's session ends), a PIN enabled
    /// since must be verified.
    async fn refresh(&mut self) -> Result<(), u16> {
        let Some(s) = self.session.as_mut() else {
            self.session = self.open().await?;
            return Ok(());
        };
        let status = self.device.status().await.map_err(|_| SW_TECHNICAL)?;
        if status.connectivity.as_deref() != Some(s.mcim.as_str()) {
            self.close().await;
            self.session = self.open().await?;
            return Ok(());
        }
        let view = self.device.get(&s.mcim).await.map_err(|_| SW_TECHNICAL)?;
        if view.has_pin != s.has_pin {
            s.has_pin = view.has_pin;
            s.pin_verified = false;
        }
        Ok(())
    }

    /// The connectivity MCIM's files, or no application (`None`) when there is none.
    async fn open(&self) -> Result<Option<Session>, u16> {
        let status = self.device.status().await.map_err(|_| SW_TECHNICAL)?;
        let Some(id) = status.connectivity else {
            return Ok(None);
        };
        let view = self.device.get(&id).await.map_err(|_| SW_TECHNICAL)?;
        Ok(Some(Session {
            files: Files::for_profile(&Profile::of(&view.id, &view.sho, &view.usim)),
            mcim: view.id,
            df: Df::Mf,
            ef: None,
            has_pin: view.has_pin,
            pin_verified: false,
            app: false,
            opened: false,
        }))
    }

    fn select(&mut self, c: &Command) -> Response {
        let Some(s) = self.session.as_mut() else {
            // No MCIM for connectivity: only the MF exists.
            return if c.data == MF.to_be_bytes() {
                Response::ok(Vec::new())
            } else {
                Response::status(SW_NOT_FOUND)
            };
        };
        let fids: Vec<u16> = c
            .data
            .chunks_exact(2)
            .map(|p| u16::from_be_bytes([p[0], p[1]]))
            .collect();
        let target = match c.p1 {
            // By file id: the MF, the current ADF, or an EF of the current DF or the MF.
            0x00 if c.data.len() == 2 => resolve(s, s.df, fids.iter().copied()),
            // By DF name: ADF.USIM by its AID or a prefix of 5 octets or more.
            0x04 if c.data.len() >= 5 && USIM_AID.starts_with(&c.data) => Some((Df::Usim, None)),
            0x04 => None,
            // By path from the MF, or from the current DF.
            0x08 if !c.data.is_empty() && c.data.len().is_multiple_of(2) => {
                resolve(s, Df::Mf, fids.iter().copied())
            }
            0x09 if !c.data.is_empty() && c.data.len().is_multiple_of(2) => {
                resolve(s, s.df, fids.iter().copied())
            }
            0x00 | 0x08 | 0x09 => return Response::status(SW_WRONG_DATA),
            _ => return Response::status(SW_WRONG_P1P2),
        };
        let Some((df, ef)) = target else {
            return Response::status(SW_NOT_FOUND);
        };
        s.df = df;
        s.ef = ef.map(|i| (df, i));
        s.app |= df == Df::Usim;
        // P2 0C: no data; otherwise the FCP template.
        if c.p2 & 0x0c == 0x0c {
            return Response::ok(Vec::new());
        }
        Response::ok(match ef {
            Some(i) => ef_fcp(&files_of(s, df)[i]),
            None => df_fcp(df, s.has_pin && !s.pin_verified),
        })
    }

    fn status(&self, c: &Command) -> Response {
        let Some(s) = self.session.as_ref() else {
            return Response::ok(df_fcp(Df::Mf, false));
        };
        if c.p2 == 0x0c {
            return Response::ok(Vec::new());
        }
        Response::ok(df_fcp(s.df, s.has_pin && !s.pin_verified))
    }

    /// The selected EF, when reading or writing it is allowed.
    fn ef(&mut self, write: bool, structure_linear: bool) -> Result<&mut Ef, u16> {
        let s = self.session.as_mut().ok_or(SW_NO_EF)?;
        let (df, i) = s.ef.ok_or(SW_NO_EF)?;
        let locked = s.has_pin && !s.pin_verified;
        let ef = match df {
            Df::Mf => s.files.mf.get_mut(i),
            Df::Usim => s.files.usim.get_mut(i),
        }
        .ok_or(SW_NO_EF)?;
        if matches!(ef.structure, Structure::LinearFixed(_)) != structure_linear {
            return Err(SW_INCOMPATIBLE_FILE);
        }
        if write && !ef.writable {
            return Err(SW_SECURITY_NOT_SATISFIED);
        }
        if (write || ef.pin_to_read) && locked {
            return Err(SW_SECURITY_NOT_SATISFIED);
        }
        Ok(ef)
    }

    fn read_binary(&mut self, c: &Command) -> Response {
        if c.p1 & 0x80 != 0 {
            return Response::status(SW_WRONG_P1P2); // short file ids are not offered
        }
        let ef = match self.ef(false, false) {
            Ok(ef) => ef,
            Err(sw) => return Response::status(sw),
        };
        let offset = usize::from(u16::from_be_bytes([c.p1, c.p2]));
        if offset >= ef.body.len() {
            return Response::status(SW_WRONG_OFFSET);
        }
        let end = offset
            .saturating_add(c.le.unwrap_or(256))
            .min(ef.body.len());
        Response::ok(ef.body[offset..end].to_vec())
    }

    async fn update_binary(&mut self, c: &Command) -> Response {
        if c.p1 & 0x80 != 0 {
            return Response::status(SW_WRONG_P1P2);
        }
        let ef = match self.ef(true, false) {
            Ok(ef) => ef,
            Err(sw) => return Response::status(sw),
        };
        let offset = usize::from(u16::from_be_bytes([c.p1, c.p2]));
        let Some(end) = offset.checked_add(c.data.len()) else {
            return Response::status(SW_WRONG_LENGTH);
        };
        if c.data.is_empty() || end > ef.body.len() {
            return Response::status(SW_WRONG_LENGTH);
        }
        let mut body = ef.body.clone();
        body[offset..end].copy_from_slice(&c.data);
        self.store(body).await
    }

    /// The selected EF's new contents: kept in the registry first when the UE's updates of
    /// it outlive the session (`record::UE_PERSISTED`), then on the card. A write the
    /// registry refuses changes nothing and answers "memory problem".
    async fn store(&mut self, body: Vec<u8>) -> Response {
        let Some((mcim, fid)) = self.session.as_ref().and_then(|s| {
            let (df, i) = s.ef?;
            Some((s.mcim.clone(), files_of(s, df).get(i)?.fid))
        }) else {
            return Response::status(SW_NO_EF);
        };
        if UE_PERSISTED.iter().any(|(f, _)| *f == fid)
            && let Err(e) = self.device.update_usim_file(&mcim, fid, body.clone()).await
        {
            tracing::warn!("USIM: EF {fid:04X} not kept: {e}");
            return Response::status(SW_MEMORY_PROBLEM);
        }
        if let Some(s) = self.session.as_mut()
            && let Some((df, i)) = s.ef
            && let Some(ef) = match df {
                Df::Mf => s.files.mf.get_mut(i),
                Df::Usim => s.files.usim.get_mut(i),
            }
        {
            ef.body = body;
        }
        Response::ok(Vec::new())
    }

    /// The record `p1` (absolute mode, P2 04) of the selected linear fixed EF.
    fn record(&mut self, c: &Command, write: bool) -> Result<(&mut Ef, usize, usize), u16> {
        if c.p2 != 0x04 || c.p1 == 0 {
            return Err(SW_WRONG_P1P2);
        }
        let ef = self.ef(write, true)?;
        let Structure::LinearFixed(len) = ef.structure else {
            return Err(SW_INCOMPATIBLE_FILE);
        };
        let start = (usize::from(c.p1) - 1) * len;
        if start + len > ef.body.len() {
            return Err(SW_RECORD_NOT_FOUND);
        }
        Ok((ef, start, len))
    }

    fn read_record(&mut self, c: &Command) -> Response {
        match self.record(c, false) {
            Ok((ef, start, len)) => Response::ok(ef.body[start..start + len].to_vec()),
            Err(sw) => Response::status(sw),
        }
    }

    async fn update_record(&mut self, c: &Command) -> Response {
        let body = match self.record(c, true) {
            Ok((_, _, len)) if c.data.len() != len => return Response::status(SW_WRONG_LENGTH),
            Ok((ef, start, len)) => {
                let mut body = ef.body.clone();
                body[start..start + len].copy_from_slice(&c.data);
                body
            }
            Err(sw) => return Response::status(sw),
        };
        self.store(body).await
    }

    /// The application's MCIM, once ADF.USIM is selected.
    fn application(&self) -> Result<&Session, u16> {
        match self.session.as_ref() {
            Some(s) if s.app => Ok(s),
            Some(_) => Err(SW_CONDITIONS),
            None => Err(SW_NOT_FOUND),
        }
    }

    /// VERIFY PIN (key reference 01, the application PIN): with no data, the tries left.
    async fn verify(&mut self, c: &Command) -> Response {
        if c.p1 != 0x00 || c.p2 != 0x01 {
            return Response::status(SW_NO_REFERENCE);
        }
        let (id, has_pin, verified) = match self.application() {
            Ok(s) => (s.mcim.clone(), s.has_pin, s.pin_verified),
            Err(sw) => return Response::status(sw),
        };
        if !has_pin {
            self.mark_verified();
            return Response::ok(Vec::new());
        }
        if c.data.is_empty() {
            if verified {
                return Response::ok(Vec::new());
            }
            return match self.device.get(&id).await {
                Ok(v) if pin_blocked(&v) => Response::status(SW_BLOCKED),
                Ok(v) => Response::status(sw_tries_left(v.pin_tries_left)),
                Err(_) => Response::status(SW_TECHNICAL),
            };
        }
        let Some(pin) = pin_value(&c.data) else {
            // Eight octets that are not a PIN field: wrong data; any other length: wrong length.
            return Response::status(if c.data.len() == 8 {
                SW_WRONG_DATA
            } else {
                SW_WRONG_LENGTH
            });
        };
        // The PIN opens the MCIM's session (5.1.1.1 Selected), or is checked in one.
        let state = match self.device.get(&id).await {
            // Blocked by its PIN: only UNBLOCK PIN (with the PUK) opens it again.
            Ok(v) if pin_blocked(&v) => return Response::status(SW_BLOCKED),
            Ok(v) => v.state,
            Err(_) => return Response::status(SW_TECHNICAL),
        };
        let opens = state != McimState::Selected;
        let checked = if opens {
            self.device.select(&id, Some(pin)).await.map(|_| ())
        } else {
            self.device.verify_pin(&id, pin).await.map(|_| ())
        };
        match checked {
            Ok(()) => {
                self.mark_verified();
                if opens && let Some(s) = self.session.as_mut() {
                    s.opened = true;
                }
                Response::ok(Vec::new())
            }
            // The refusal's own count (another session's tries since do not change it).
            Err(e @ DeviceError::Registry(RegistryError::WrongPin { .. })) => {
                Response::status(pin_refusal(&e))
            }
            Err(e) => match self.device.get(&id).await {
                // The last try blocked it.
                Ok(v) if pin_blocked(&v) => Response::status(SW_BLOCKED),
                _ => Response::status(pin_refusal(&e)),
            },
        }
    }

    fn mark_verified(&mut self) {
        if let Some(s) = self.session.as_mut() {
            s.pin_verified = true;
        }
    }

    /// What CHANGE and UNBLOCK PIN both need: PIN 01, the owner class, an application whose
    /// MCIM has a PIN, and two 8-octet PIN fields; the MCIM and the two fields.
    fn pin_management(&self, c: &Command) -> Result<(String, String, String), u16> {
        if c.p1 != 0x00 || c.p2 != 0x01 {
            return Err(SW_NO_REFERENCE);
        }
        if !self.pin_admin {
            return Err(SW_SECURITY_NOT_SATISFIED);
        }
        let id = match self.application()? {
            s if !s.has_pin => return Err(SW_CONDITIONS),
            s => s.mcim.clone(),
        };
        match (pins(&c.data, 0), pins(&c.data, 8)) {
            (Some(first), Some(second)) => Ok((id, first, second)),
            _ => Err(SW_WRONG_LENGTH),
        }
    }

    /// CHANGE PIN: the old PIN and the new one, 8 octets each.
    async fn change_pin(&mut self, c: &Command) -> Response {
        let (id, old, new) = match self.pin_management(c) {
            Ok(t) => t,
            Err(sw) => return Response::status(sw),
        };
        match self.device.change_pin(&id, old, new).await {
            Ok(()) => {
                self.mark_verified();
                Response::ok(Vec::new())
            }
            Err(e) => Response::status(pin_refusal(&e)),
        }
    }

    /// UNBLOCK PIN: the PUK and the new PIN, 8 octets each.
    async fn unblock_pin(&mut self, c: &Command) -> Response {
        let (id, puk, new) = match self.pin_management(c) {
            Ok(t) => t,
            Err(sw) => return Response::status(sw),
        };
        match self.device.unblock_pin(&id, puk, new).await {
            Ok(_) => Response::ok(Vec::new()),
            Err(e) => Response::status(pin_refusal(&e)),
        }
    }

    /// AUTHENTICATE in 3G context (TS 31.102 7.1.2): RAND and AUTN in, RES, CK, IK and Kc
    /// out, or AUTS; inside the TRE, on the MCIM's own SQN state.
    async fn authenticate(&mut self, c: &Command) -> Response {
        if c.p1 != 0x00 || c.p2 != 0x81 {
            return Response::status(SW_WRONG_P1P2);
        }
        let (id, has_pin, verified) = match self.application() {
            Ok(s) => (s.mcim.clone(), s.has_pin, s.pin_verified),
            Err(sw) => return Response::status(sw),
        };
        if has_pin && !verified {
            return Response::status(SW_SECURITY_NOT_SATISFIED);
        }
        let (rand, autn) = match c.data.as_slice() {
            [16, rand @ ..] if rand.len() == 33 && rand[16] == 16 => {
                let (r, a) = (&rand[..16], &rand[17..]);
                (block(r), block(a))
            }
            _ => return Response::status(SW_WRONG_DATA),
        };
        // A PIN-less MCIM opens its session here; one with a PIN did at VERIFY.
        match self.device.get(&id).await {
            Ok(v) if v.state == McimState::Activated && !has_pin => {
                if let Err(e) = self.device.select(&id, None).await {
                    return Response::status(pin_refusal(&e));
                }
                if let Some(s) = self.session.as_mut() {
                    s.opened = true;
                }
            }
            Ok(_) => {}
            Err(_) => return Response::status(SW_TECHNICAL),
        }
        match self
            .device
            .authenticate(Credential::Mcim(id), Rand(rand), Autn(autn))
            .await
        {
            Ok(DeviceResponse::Success { res, ck, ik }) => {
                let (ck, ik) = (ck.expose(), ik.expose());
                let mut kc = [0u8; 8];
                for (i, k) in kc.iter_mut().enumerate() {
                    // c3 (TS 33.102 6.8.1.2): Kc = CK1 ⊕ CK2 ⊕ IK1 ⊕ IK2.
                    *k = ck[i] ^ ck[i + 8] ^ ik[i] ^ ik[i + 8];
                }
                let mut out = vec![0xdb, 8];
                out.extend_from_slice(&res.0);
                out.push(16);
                out.extend_from_slice(ck);
                out.push(16);
                out.extend_from_slice(ik);
                out.push(8);
                out.extend_from_slice(&kc);
                Response::ok(out)
            }
            Ok(DeviceResponse::SyncFailure { auts, .. }) => {
                let mut out = vec![0xdc, 14];
                out.extend_from_slice(&auts.0);
                Response::ok(out)
            }
            Err(DeviceError::Registry(RegistryError::Tre(TreError::MacFailure))) => {
                Response::status(SW_AUTH_MAC_FAILURE)
            }
            Err(e) => Response::status(pin_refusal(&e)),
        }
    }
}

fn block(b: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&b[..16]);
    out
}

/// The EFs of a DF.
fn files_of(s: &Session, df: Df) -> &[Ef] {
    match df {
        Df::Mf => &s.files.mf,
        Df::Usim => &s.files.usim,
    }
}

/// Follows file ids from `from`: the MF, ADF.USIM (7FFF), or an EF of the DF reached (or of
/// the MF).
fn resolve(s: &Session, from: Df, path: impl Iterator<Item = u16>) -> Option<(Df, Option<usize>)> {
    let mut at = (from, None);
    for fid in path {
        if at.1.is_some() {
            return None; // nothing below an EF
        }
        at = match fid {
            MF => (Df::Mf, None),
            ADF => (Df::Usim, None),
            _ => {
                let in_df = files_of(s, at.0).iter().position(|e| e.fid == fid);
                match in_df {
                    Some(i) => (at.0, Some(i)),
                    None => (
                        Df::Mf,
                        Some(files_of(s, Df::Mf).iter().position(|e| e.fid == fid)?),
                    ),
                }
            }
        };
    }
    Some(at)
}

/// An EF's FCP template (TS 102 221 11.1.1.3).
fn ef_fcp(ef: &Ef) -> Vec<u8> {
    let descriptor = match ef.structure {
        Structure::Transparent => vec![0x82, 0x02, 0x41, 0x21],
        Structure::LinearFixed(len) => {
            let n = u8::try_from(ef.body.len() / len.max(1)).unwrap_or(u8::MAX);
            let len = u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes();
            vec![0x82, 0x05, 0x42, 0x21, len[0], len[1], n]
        }
    };
    let size = u16::try_from(ef.body.len())
        .unwrap_or(u16::MAX)
        .to_be_bytes();
    let mut body = descriptor;
    body.extend_from_slice(&[0x83, 0x02]);
    body.extend_from_slice(&ef.fid.to_be_bytes());
    body.extend_from_slice(&[0x8a, 0x01, 0x05, 0x80, 0x02, size[0], size[1]]);
    let mut fcp = vec![0x62, u8::try_from(body.len()).unwrap_or(0)];
    fcp.extend(body);
    fcp
}

/// A DF's FCP template, with the PIN status template (PIN 01 enabled, or not).
fn df_fcp(df: Df, pin_enabled: bool) -> Vec<u8> {
    let mut body = vec![0x82, 0x02, 0x78, 0x21];
    match df {
        Df::Mf => body.extend_from_slice(&[0x83, 0x02, 0x3f, 0x00]),
        Df::Usim => {
            body.extend_from_slice(&[0x84, 0x10]);
            body.extend_from_slice(&USIM_AID);
        }
    }
    body.extend_from_slice(&[0x8a, 0x01, 0x05]);
    body.extend_from_slice(&[
        0xc6,
        0x06,
        0x90,
        0x01,
        if pin_enabled { 0x80 } else { 0x00 },
        0x83,
        0x01,
        0x01,
    ]);
    let mut fcp = vec![0x62, u8::try_from(body.len()).unwrap_or(0)];
    fcp.extend(body);
    fcp
}

/// A PIN field: 8 octets, the digits then FF padding (TS 102 221 9.5.1).
fn pin_value(b: &[u8]) -> Option<String> {
    if b.len() != 8 {
        return None;
    }
    let digits: Vec<u8> = b.iter().copied().take_while(|&x| x != 0xff).collect();
    if digits.len() < 4
        || !digits.iter().all(u8::is_ascii_digit)
        || b[digits.len()..].iter().any(|&x| x != 0xff)
    {
        return None;
    }
    String::from_utf8(digits).ok()
}

/// The PIN field at `at` of a 16-octet data field.
fn pins(data: &[u8], at: usize) -> Option<String> {
    if data.len() != 16 {
        return None;
    }
    pin_value(&data[at..at + 8])
}

/// The PIN can no longer be tried: its tries are used up (or the MCIM is Blocked).
fn pin_blocked(v: &crate::device::McimView) -> bool {
    v.state == McimState::Blocked || (v.has_pin && v.pin_tries_left == 0)
}

/// The status word for a PIN, PUK or session refusal (logged: the refusal names no secret).
fn pin_refusal(e: &DeviceError) -> u16 {
    tracing::info!("USIM: refused: {e}");
    match e {
        DeviceError::Registry(RegistryError::WrongPin { tries_left })
        | DeviceError::Registry(RegistryError::WrongPuk { tries_left }) => {
            if *tries_left == 0 {
                SW_BLOCKED
            } else {
                sw_tries_left(u32::from(*tries_left))
            }
        }
        DeviceError::Registry(RegistryError::Lifecycle(_)) => SW_INVALIDATED,
        DeviceError::Registry(RegistryError::AnotherSelected(_)) => SW_CONDITIONS,
        DeviceError::Registry(RegistryError::BadRequest(_)) => SW_CONDITIONS,
        DeviceError::Registry(RegistryError::Lockdown(_)) => SW_INVALIDATED,
        _ => SW_TECHNICAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_atr_checks_and_pins_are_ff_padded() {
        let a = atr();
        assert_eq!(a[1..].iter().fold(0u8, |x, y| x ^ y), 0, "TCK");
        assert_eq!(
            pin_value(&[b'1', b'2', b'3', b'4', 0xff, 0xff, 0xff, 0xff]).as_deref(),
            Some("1234")
        );
        assert_eq!(
            pin_value(&[b'1', b'2', 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            None
        );
        assert_eq!(
            pin_value(&[b'1', b'2', b'3', b'4', 0xff, b'5', 0xff, 0xff]),
            None
        );
        assert_eq!(pin_value(b"1234"), None);
        assert_eq!(
            pin_value(&[b'1', b'2', b'3', b'4', 0x00, 0xff, 0xff, 0xff]),
            None
        );
    }
}
