//! The USIM as a PC/SC card: `tred` connects to vsmartcard's vpcd (the pcscd driver of
//! Debian's vsmartcard-vpcd, which listens for its virtual ICC on port 35963) and is the card
//! in that reader, so that every PC/SC application (pcsc_scan, pyscard, osmocom's and pySim's
//! tools) sees the MCIM as a USIM. The framing is the raw socket's ([`super::socket`]).
//!
//! vpcd listens on every interface and serves whoever connects first as the card; `tred`
//! therefore talks only to a vpcd on this machine whose end of the connection belongs to the
//! configured user (pcscd's), read from `/proc/net/tcp`: another local program listening on
//! the port gets no answers. Who may use the card is then pcscd's business (its clients); the
//! card grants them the modem class, or the owner's with `usim_vpcd_class = "owner"`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::card::Card;
use super::socket::{Watch, session};
use crate::device::Device;

/// The first wait before connecting again; doubled up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest wait between tries (pcscd started after `tred`, or restarted).
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Is the card in vpcd's reader at `addr` until the task is dropped, connecting again
/// whenever the connection ends. `owner`: the uid vpcd's end must belong to; `pin_admin`:
/// PC/SC applications may change and unblock the PIN.
pub async fn serve(addr: SocketAddr, owner: u32, pin_admin: bool, device: Device) {
    tracing::info!(%addr, owner, "USIM: a PC/SC card through vpcd");
    let mut wait = RETRY_MIN;
    let mut said: Option<String> = None;
    loop {
        let outcome = match TcpStream::connect(addr).await {
            Ok(stream) => match checked(&stream, owner) {
                Ok(()) => {
                    let _ = stream.set_nodelay(true);
                    let _ = stream.set_quickack(true);
                    tracing::info!(%addr, "USIM: the card is in vpcd's reader");
                    said = None;
                    wait = RETRY_MIN;
                    let mut card = Card::new(device.clone(), pin_admin);
                    let watch = Watch {
                        idle: None,
                        after_control: Some(Duration::from_secs(3)),
                    };
                    let ended = session(QuickAck(stream), &mut card, watch).await;
                    card.close().await;
                    match ended {
                        Ok(()) => "vpcd closed the card's connection".to_string(),
                        Err(e) => format!("the card's connection ended: {e}"),
                    }
                }
                Err(why) => why,
            },
            Err(e) => format!("vpcd at {addr}: {e} (pcscd with vsmartcard-vpcd not running?)"),
        };
        // Once per distinct reason, not at every retry.
        if said.as_deref() != Some(outcome.as_str()) {
            tracing::warn!("USIM: {outcome}; connecting again");
            said = Some(outcome);
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RETRY_MAX);
    }
}

/// A TCP stream that acknowledges at once whatever it reads. vpcd sends each message as two
/// segments (the length, then the APDU), holding the second until the first is acknowledged
/// (Nagle); with the usual delayed ACK every message would wait some 40 ms.
struct QuickAck(TcpStream);

impl tokio::io::AsyncRead for QuickAck {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.0).poll_read(cx, buf);
        if r.is_ready() {
            let _ = self.0.set_quickack(true);
        }
        r
    }
}

impl tokio::io::AsyncWrite for QuickAck {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// vpcd's end of `stream` belongs to `owner`.
fn checked(stream: &TcpStream, owner: u32) -> Result<(), String> {
    let (local, peer) = stream
        .local_addr()
        .and_then(|l| Ok((l, stream.peer_addr()?)))
        .map_err(|e| format!("vpcd's connection: {e}"))?;
    let file = if peer.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    let table = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
    match socket_owner(&table, &peer, &local) {
        Some(uid) if uid == owner => Ok(()),
        Some(uid) => Err(format!(
            "{peer} belongs to uid {uid}, not to {owner} (pcscd's): not vpcd, not served"
        )),
        None => Err(format!("{peer}'s end of the connection is not in {file}")),
    }
}

/// The uid owning the socket `local` connected to `remote`, from a `/proc/net/tcp[6]` table.
fn socket_owner(table: &str, local: &SocketAddr, remote: &SocketAddr) -> Option<u32> {
    let (l, r) = (proc_addr(local), proc_addr(remote));
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&l.as_str()) && f.get(2) == Some(&r.as_str()))
            .then(|| f.get(7)?.parse().ok())
            .flatten()
    })
}

/// An address as `/proc/net/tcp[6]` prints it: the address's 32-bit words in host order,
/// in hex, then the port.
fn proc_addr(a: &SocketAddr) -> String {
    let words: Vec<[u8; 4]> = match a {
        SocketAddr::V4(v) => vec![v.ip().octets()],
        SocketAddr::V6(v) => v
            .ip()
            .octets()
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect(),
    };
    let mut s: String = words
        .iter()
        .map(|w| format!("{:08X}", u32::from_ne_bytes(*w)))
        .collect();
    s.push_str(&format!(":{:04X}", a.port()));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_of_a_connections_far_end_is_read_from_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:8C7B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   1: 0100007F:8C7B 0100007F:D431 01 00000000:00000000 00:00000000 00000000   107        0 2 1 0 20 4 30 10 -1\n   2: 0100007F:D431 0100007F:8C7B 01 00000000:00000000 00:00000000 00000000  1000        0 3 1 0 20 4 30 10 -1\n";
        let vpcd: SocketAddr = "127.0.0.1:35963".parse().unwrap();
        let us: SocketAddr = "127.0.0.1:54321".parse().unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(proc_addr(&vpcd), "0100007F:8C7B");
            assert_eq!(socket_owner(table, &vpcd, &us), Some(107));
            assert_eq!(socket_owner(table, &us, &vpcd), Some(1000));
        }
        let other: SocketAddr = "127.0.0.1:54322".parse().unwrap();
        assert_eq!(socket_owner(table, &vpcd, &other), None);
    }
}
