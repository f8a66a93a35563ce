//! Raw APDUs on a Unix socket, for modem bridges (SIM-access adapters): each connection is one
//! card. The framing is vsmartcard's vpcd protocol, so that one codec serves both: every
//! message is a 2-octet big-endian length and that many octets. A 1-octet message is a
//! control: 0 power off, 1 power on, 2 reset, 4 the ATR (answered with the ATR); a longer one
//! is a command APDU, answered with its response APDU. Callers are admitted by the local API's
//! policy: the modem and owner classes.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;

use super::card::Card;
use crate::access::{Class, Policy, peer_from};
use crate::device::Device;

/// The longest message accepted: a short APDU is 261 octets at most.
const MAX_MESSAGE: usize = 512;
/// Card sessions at once: a device has a modem or two, not thousands; past this, a connection
/// is closed at once (so that idle connections cannot exhaust `tred`'s descriptors).
const MAX_SESSIONS: usize = 8;
/// A message whose length has arrived must arrive whole within this.
const FRAME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// A session with no message for this long is closed, freeing its slot (a modem polls its
/// card with STATUS every 30 s or so while it is attached, TS 102 221 14.5.2).
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Serves cards on `listener` until the task is dropped.
pub async fn serve(listener: UnixListener, path: PathBuf, device: Device, policy: Arc<Policy>) {
    tracing::info!(socket = %path.display(), "USIM: raw APDUs");
    let sessions = Arc::new(tokio::sync::Semaphore::new(MAX_SESSIONS));
    // At most one warning a second, whatever a flood of connections does.
    let throttle = mcim_telemetry::Throttle::new(std::time::Duration::from_secs(1));
    let warn = |what: String| {
        if let Some(held_back) = throttle.due() {
            tracing::warn!(held_back, "USIM socket: {what}");
        }
    };
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                warn(e.to_string());
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let peer = stream.peer_cred().ok().map(peer_from);
        let class = match &peer {
            _ if !policy.enforced() => Some(Class::Owner),
            Some(p) => policy.class_of(p),
            None => None,
        };
        if class.is_none_or(|c| c < Class::Modem) {
            warn(format!("refused {peer:?}: needs the modem or owner class"));
            continue;
        }
        let Ok(permit) = sessions.clone().try_acquire_owned() else {
            warn(format!(
                "refused {peer:?}: {MAX_SESSIONS} card sessions are open"
            ));
            continue;
        };
        tracing::info!(?peer, ?class, "USIM socket: a card session");
        // Changing or unblocking the PIN is the owner's, as on the local API; the modem
        // class verifies it and authenticates.
        let mut card = Card::new(device.clone(), class == Some(Class::Owner));
        tokio::spawn(async move {
            let _permit = permit;
            let watch = Watch {
                idle: Some(IDLE_TIMEOUT),
                after_control: None,
            };
            if let Err(e) = session(stream, &mut card, watch).await {
                tracing::info!("USIM socket: session ended: {e}");
            }
            card.close().await;
        });
    }
}

/// Reads one framed message: `None` when the peer closed between messages; an error after
/// `idle` without one.
async fn message<S: AsyncRead + Unpin>(
    stream: &mut S,
    idle: Option<std::time::Duration>,
) -> std::io::Result<Option<Vec<u8>>> {
    // The first octet may be long in coming (an idle card); the second, like the rest of a
    // message, must follow at once.
    let mut len = [0u8; 2];
    let read = stream.read_exact(&mut len[..1]);
    let got = match idle {
        Some(t) => tokio::time::timeout(t, read)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "idle"))?,
        None => read.await,
    };
    match got {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    tokio::time::timeout(FRAME_TIMEOUT, stream.read_exact(&mut len[1..]))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "a partial length"))??;
    let len = usize::from(u16::from_be_bytes(len));
    if len == 0 || len > MAX_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a message of {len} octets"),
        ));
    }
    let mut msg = vec![0u8; len];
    tokio::time::timeout(FRAME_TIMEOUT, stream.read_exact(&mut msg))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "a partial message"))??;
    Ok(Some(msg))
}

/// How a session's peer is watched.
#[derive(Clone, Copy, Debug)]
pub(super) struct Watch {
    /// A peer silent this long between messages is gone (none: wait for ever).
    pub idle: Option<std::time::Duration>,
    /// vpcd only: silence this long after a one-octet message that needs no answer (power
    /// off, on, reset) means it was an APDU of one octet that vpcd framed like a control and
    /// now waits an answer for, holding the reader (pcscd otherwise asks for the ATR every
    /// 400 ms); the connection is closed, vpcd ejects the card, and `tred` connects again.
    pub after_control: Option<std::time::Duration>,
}

/// One connection in vpcd's framing: messages in, answers out, until the peer closes (or
/// goes silent as `watch` says).
pub(super) async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    card: &mut Card,
    watch: Watch,
) -> std::io::Result<()> {
    let mut powered = false;
    let mut unanswered = false;
    loop {
        let wait = match (unanswered, watch.after_control) {
            (true, Some(t)) => Some(t),
            _ => watch.idle,
        };
        let msg = match message(&mut stream, wait).await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e)
                if e.kind() == std::io::ErrorKind::TimedOut
                    && unanswered
                    && watch.after_control.is_some() =>
            {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "vpcd went silent after a one-octet message: an APDU of one octet waits for an answer; reconnecting",
                ));
            }
            Err(e) => return Err(e),
        };
        tracing::trace!(
            len = msg.len(),
            first = msg.first().copied().unwrap_or(0),
            "USIM: message"
        );
        let answer = match msg.as_slice() {
            [0] => {
                powered = false;
                card.reset().await;
                None
            }
            [1] | [2] => {
                powered = true;
                card.reset().await;
                None
            }
            [4] => Some(super::card::atr()),
            // No control: an APDU of one octet, which is no APDU.
            [_] => Some(0x6700u16.to_be_bytes().to_vec()),
            apdu if powered => Some(card.transmit(apdu).await),
            // Not powered: no answer but the status "conditions of use".
            _ => Some(0x6985u16.to_be_bytes().to_vec()),
        };
        unanswered = answer.is_none();
        if let Some(a) = answer {
            // One write: length and answer in one segment on TCP.
            let n = u16::try_from(a.len()).unwrap_or(u16::MAX);
            let mut out = n.to_be_bytes().to_vec();
            out.extend_from_slice(&a);
            stream.write_all(&out).await?;
        }
    }
    Ok(())
}
