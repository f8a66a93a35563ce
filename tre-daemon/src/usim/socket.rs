//! Raw APDUs on a Unix socket, for modem bridges (SIM-access adapters): each connection is one
//! card. The framing is vsmartcard's vpcd protocol, so that one codec serves both: every
//! message is a 2-octet big-endian length and that many octets. A 1-octet message is a
//! control: 0 power off, 1 power on, 2 reset, 4 the ATR (answered with the ATR); a longer one
//! is a command APDU, answered with its response APDU. Callers are admitted by the local API's
//! policy: the modem and owner classes.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::card::Card;
use crate::access::{Class, Policy, peer_from};
use crate::device::Device;

/// The longest message accepted: a short APDU is 261 octets at most.
const MAX_MESSAGE: usize = 512;

/// Binds `path` (a stale socket is replaced), mode `mode`.
pub fn bind(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Serves cards on `listener` until the task is dropped.
pub async fn serve(listener: UnixListener, path: PathBuf, device: Device, policy: Arc<Policy>) {
    tracing::info!(socket = %path.display(), "USIM: raw APDUs");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("USIM socket: {e}");
                continue;
            }
        };
        let peer = stream.peer_cred().ok().map(peer_from);
        let admitted = match &peer {
            _ if !policy.enforced() => true,
            Some(p) => policy.class_of(p).is_some_and(|c| c >= Class::Modem),
            None => false,
        };
        if !admitted {
            tracing::warn!(
                ?peer,
                "USIM socket: refused (needs the modem or owner class)"
            );
            continue;
        }
        tracing::info!(?peer, "USIM socket: a card session");
        let card = Card::new(device.clone());
        tokio::spawn(async move {
            if let Err(e) = session(stream, card).await {
                tracing::info!("USIM socket: session ended: {e}");
            }
        });
    }
}

/// One connection: messages in, answers out, until the peer closes.
async fn session(mut stream: UnixStream, mut card: Card) -> std::io::Result<()> {
    let mut powered = false;
    loop {
        let mut len = [0u8; 2];
        match stream.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = usize::from(u16::from_be_bytes(len));
        if len == 0 || len > MAX_MESSAGE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a message of {len} octets"),
            ));
        }
        let mut msg = vec![0u8; len];
        stream.read_exact(&mut msg).await?;
        let answer = match msg.as_slice() {
            [0] => {
                powered = false;
                card.reset();
                None
            }
            [1] | [2] => {
                powered = true;
                card.reset();
                None
            }
            [4] => Some(super::card::atr()),
            [_] => None,
            apdu if powered => Some(card.transmit(apdu).await),
            // Not powered: no answer but the status "conditions of use".
            _ => Some(0x6985u16.to_be_bytes().to_vec()),
        };
        if let Some(a) = answer {
            let n = u16::try_from(a.len()).unwrap_or(u16::MAX);
            stream.write_all(&n.to_be_bytes()).await?;
            stream.write_all(&a).await?;
        }
    }
}
