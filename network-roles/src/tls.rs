//! Mutual TLS for every role connection (rustls): a role serves with its certificate from
//! the PKI directory on an acceptor of its own ([`server_config`], [`tls_incoming`]: handshakes
//! in tasks of their own with a timeout, a client chain bounded before webpki builds a path)
//! and accepts only clients whose certificates chain to an operator CA or the supplier root; a
//! client presents its role certificate (through tonic). Who a caller is and what it may do is
//! decided from its certificate by [`crate::gate`] and [`crate::authz`].

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::authz::Role;
use mcim_pki::{PkiError, dev};

/// The roots a role accepts client certificates from: every operator's CA and the supplier
/// root. Which of them may vouch for the role a certificate claims is the gate's check
/// ([`crate::gate`], `mcim_pki::dev::trust_anchors`).
fn client_roots(pki: &Path) -> Result<Certificate, PkiError> {
    let mut roots = dev::ca_pem(pki)?;
    if let Ok(supplier) = dev::supplier_root_pem(pki) {
        roots.extend_from_slice(&supplier);
    }
    Ok(Certificate::from_pem(roots))
}

/// Server side: the identity in `<party>.pem` (a role's file, `sho2` for a second SHO),
/// client certificates required and verified by [`BoundedClientChain`]; HTTP/2 by ALPN.
pub fn server_config(pki: &Path, party: &str) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |e: &dyn std::fmt::Display| PkiError::Cert(e.to_string());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(client_roots(pki)?.get_ref()) {
        roots.add(ca.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    let webpki = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| bad(&e))?;
    let (cert, key) = dev::party_file_pem(pki, party)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&e))?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| bad(&e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_client_cert_verifier(Arc::new(BoundedClientChain(webpki)))
        .with_single_cert(chain, key)
        .map_err(|e| bad(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The client certificate verifier of every role's server: webpki's, after refusing a chain
/// with more intermediates than [`mcim_pki::party::MAX_CHAIN`] allows (the gate would refuse
/// it anyway). Found by an outside attack: a client with no valid certificate at all could
/// make webpki build paths through dozens of junk intermediates named like a trusted CA,
/// ~12 ms of CPU per handshake (25 times a plain refusal), before any gate runs.
#[derive(Debug)]
pub struct BoundedClientChain(pub Arc<dyn rustls::server::danger::ClientCertVerifier>);

impl rustls::server::danger::ClientCertVerifier for BoundedClientChain {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        if intermediates.len() >= mcim_pki::party::MAX_CHAIN {
            // Debug, as every other refused handshake: a client without any valid
            // certificate must not be able to fill the log (counted in the
            // `tls_connections_refused` metric as a failed handshake).
            tracing::debug!(
                intermediates = intermediates.len(),
                "refused: a client certificate chain longer than {}",
                mcim_pki::party::MAX_CHAIN
            );
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ));
        }
        self.0.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }

    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

/// How long a client has to complete its TLS handshake, and then to send its first bytes
/// (the HTTP/2 preface).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an established connection may send nothing before it is closed. A live client is
/// never that quiet: the server pings a quiet connection every [`KEEPALIVE`] and the client's
/// HTTP/2 stack answers (a device waiting on the RO's task stream included).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The interval of the HTTP/2 pings a role's server sends on a connection it hears nothing
/// on (`Server::http2_keepalive_interval`); an unanswered ping closes the connection.
pub const KEEPALIVE: Duration = Duration::from_secs(30);

/// The connections one process's acceptors hold at most, over all its roles (they share the
/// process's file descriptors). Found by outside attacks: with no limit, anyone with a
/// certificate the verifier accepts (a subscriber's) held idle connections until the process
/// ran out of file descriptors, and every role stopped accepting; with the limit counted from
/// the TCP accept, anyone without any certificate filled it with handshakes that never end.
///
/// - **Handshakes in progress**: at most [`MAX_HANDSHAKES`]; past it one is dropped for the
///   newcomer (outcome `evicted`): one silent (no whole ClientHello) for over
///   [`SILENT_GRACE`]; else, within the address prefix holding the most if it holds more
///   than three, the one that has waited longest on its client, a moment without a
///   ClientHello counting five of one after it ([`Handshakes::victim`]), so a flood of
///   connections that never finish their handshake cannot keep a genuine client (whose
///   handshake takes a few round trips, hundreds of ms on a cellular link) out: a silent or
///   dribbling flood makes way first, a flood of ClientHellos from few networks at its own
///   prefixes' expense, one from many as long as its handshakes wait longer than a genuine
///   one's ([`ConnectionLimits::begin_handshake`]).
/// - **Established connections** (counted from a handshake that succeeded): at most `total`
///   from devices, subscribers and anyone else, at most `per_peer` of them from one address
///   and at most an eighth of `total` (at least 4) from one client certificate's key
///   ([`CertId`]) (outcomes `limit`, `peer_limit`, `client_limit`); past that the connection
///   is closed at once. The
///   operators' roles (the supplier, ROs, VNOs, SHOs, PVAs, by the gate's judgment of their
///   certificates) have [`OPERATOR_RESERVE`] places of their own beyond `total`, so that a
///   crowd of devices cannot cut the roles off from each other.
/// - **A full acceptor makes room**: when `total` is reached, a newcomer holding less than a
///   fair share displaces a connection of the client holding the most beyond it, an idle one
///   first, else busy or not; otherwise an established connection (not an operator's) that
///   has sent nothing for at least [`DISPLACE_QUIET`], one with no call in flight
///   ([`ConnectionLimits::call_started`]) first, a call cut only from a client holding two
///   or more, or for a device in the middle of its flow (holding one already) from another
///   device:
///   of the client (by certificate, [`CertId`]) holding the most, the one silent longest,
///   among the clients holding at least as many as the newcomer's (outcome `displaced`,
///   [`ConnectionLimits::displace_quietest`]), as web servers close idle keep-alive
///   connections; it is refused when there is none. A displaced busy connection with calls
///   in flight breaks once they end, or after [`DRAIN`], new calls on it refused meanwhile
///   ([`Displaced`]). Found by outside
///   attacks: a provisioning device holds two or three connections (its VNO connection stays
///   open, quiet, while it registers), so with a small limit the devices held every place and
///   each waited for one more until they gave up; and without the "at least as many", one
///   subscriber certificate holding the limit with busy connections displaced every quiet
///   device.
///
/// Refusals are counted in the `tls_connections_refused` metric; a limit refusal is logged as
/// a warning at most every 10 s, the others at debug level.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    total: Arc<tokio::sync::Semaphore>,
    max_total: usize,
    operators: Arc<tokio::sync::Semaphore>,
    per_peer: usize,
    per_client: usize,
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    handshakes: Arc<Mutex<Handshakes>>,
    established: Arc<Mutex<Established>>,
    epoch: tokio::time::Instant,
    warned: Arc<mcim_telemetry::Throttle>,
}

/// The established connections a newcomer may displace (those counted against the total),
/// and how many each client (by certificate) holds.
#[derive(Debug, Default)]
struct Established {
    next: u64,
    conns: HashMap<u64, (Option<CertId>, Arc<Liveness>)>,
    by_client: HashMap<Option<CertId>, usize>,
    /// The connections by their addresses, for [`ConnectionLimits::call_started`].
    by_addr: HashMap<ConnAddr, Arc<Liveness>>,
}

/// A TCP connection's local and remote address: what tonic tells a call of its connection
/// (`TcpConnectInfo`), unique among the connections open at once.
pub type ConnAddr = (SocketAddr, SocketAddr);

/// A client as the limits count it: the SHA-256 of its end-entity certificate's public key
/// (SubjectPublicKeyInfo): one device, one subscriber, whatever its addresses (devices behind
/// one NAT are not lumped together) and however its certificate is encoded (found by an
/// outside attack: a hash of the whole certificate made two clients of one, its signature's
/// `s` replaced by `n - s`).
pub type CertId = [u8; 32];

/// The [`CertId`] of a connection's client certificates.
fn cert_id(chain: &[rustls::pki_types::CertificateDer<'_>]) -> Option<CertId> {
    use sha2::Digest;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(chain.first()?.as_ref()).ok()?;
    Some(sha2::Sha256::digest(cert.tbs_certificate.subject_pki.raw).into())
}

/// The share of `--max-connections` one client ([`CertId`]) holds at most: an eighth, at
/// least [`MIN_PER_CLIENT`] (a provisioning device holds two or three). Found by an outside
/// attack: one subscriber certificate held the whole limit.
const PER_CLIENT_SHARE: usize = 8;

/// The fewest connections one client may hold, however small the total.
const MIN_PER_CLIENT: usize = 4;

/// A full acceptor with no idle quiet connection to take cuts a call in flight, for a newcomer
/// holding no connection, only from a client holding at least this many
/// ([`ConnectionLimits::displace_quietest`]): never a watcher's only connection, but not every
/// newcomer refused either when certificates hold the limit with quiet streams. A device
/// already holding one (opening its next role's connection while its RO task stream waits)
/// may cut another device's quiet call: otherwise devices each holding their task stream
/// fill the limit and none can reach the PVA (round 9: 400 devices at 200 under a limit of 64
/// stalled with 201-240 provisioned). Only a device ([`ClientKind::Device`], certified at its
/// supply): a subscriber key holding one connection and cycling a second cut a watcher's only
/// call with each handshake (round 9's case (b): 3 of 10 watchers cut); and only another
/// device's call: one device certificate cycling its second connection beside subscribers'
/// churn cut every watcher again (round 10: 10 of 10). What is left: a device's certificate
/// (its key in its TRE) can cut other devices' quiet task streams the same way; they reconnect.
const CUT_A_CALL_FROM: usize = 2;

/// What [`Guarded`] and the limits share about one connection: when it was last heard from
/// (milliseconds after [`ConnectionLimits`]'s epoch), whether it was displaced and when its
/// reads fail then ([`DRAIN`]; with the waker of its reader, so that it learns at once), and
/// how many calls are in flight on it ([`ConnectionLimits::call_started`]).
#[derive(Debug, Default)]
struct Liveness {
    heard_ms: AtomicU64,
    displaced: AtomicBool,
    /// Once displaced: when its reads fail (milliseconds after the epoch).
    cut_at_ms: AtomicU64,
    reader: Mutex<Option<Waker>>,
    calls: AtomicUsize,
    /// A device's ([`ClientKind::Device`]): only such a connection's call may be cut for a
    /// device in the middle of its flow ([`CUT_A_CALL_FROM`]).
    device: bool,
}

/// How long a displaced busy connection's calls in flight (heard from within
/// [`DISPLACE_QUIET`]: a client over its fair share) are given to end before its reads fail
/// (the server then closes it, and whatever is still in flight on it breaks); new calls on it
/// are refused with UNAVAILABLE and a retry hint meanwhile (`crate::calls`), as HTTP/2's
/// GOAWAY would. Shorter than [`DISPLACE_WAIT`]: the newcomer waits for this place. (Round
/// 8's C1: a client over its fair share lost its calls in flight when the acceptor was full,
/// their answers cut mid-way, and a call that had done its work was answered with a broken
/// connection.) A quiet one's call (a stream or a long poll waiting, silent for
/// [`DISPLACE_QUIET`]) is not drained: it would not end within the drain, and round 10 found
/// that waiting for it let a burst of newcomers, none seated for a second, each cut another
/// (60 newcomers at once cut 60 streams, against 19-29 when cut at once, and waited ~1 s).
pub const DRAIN: Duration = Duration::from_secs(1);

/// How long a displaced connection is still read from after its last call ended (or at
/// once, when it had none): the call's last frames reach the client before the connection
/// breaks.
const SETTLE: Duration = Duration::from_millis(50);

/// Milliseconds of a duration, for [`Liveness`]'s clock.
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Liveness {
    /// Its reads fail at `ms` or before (the earliest of what is asked stays).
    fn cut_by(&self, ms: u64) {
        self.cut_at_ms.fetch_min(ms, Ordering::AcqRel);
        if let Ok(mut reader) = self.reader.lock()
            && let Some(waker) = reader.take()
        {
            waker.wake();
        }
    }
}

/// A connection's entry in [`Established`], removed when the connection ends.
#[derive(Debug)]
struct LiveSlot {
    id: u64,
    liveness: Arc<Liveness>,
    established: Arc<Mutex<Established>>,
    /// Its addresses, once known ([`Admission::at`]).
    addr: Option<ConnAddr>,
}

/// One call in flight on a connection ([`ConnectionLimits::call_started`]), until dropped.
#[derive(Debug)]
pub struct CallInFlight {
    liveness: Arc<Liveness>,
    epoch: tokio::time::Instant,
}

impl Drop for CallInFlight {
    fn drop(&mut self) {
        let l = &self.liveness;
        // The last call of a displaced connection: it breaks once the answer is out.
        if l.calls.fetch_sub(1, Ordering::AcqRel) == 1 && l.displaced.load(Ordering::Acquire) {
            let now = ms(self.epoch.elapsed());
            l.cut_by(now.saturating_add(ms(SETTLE)));
        }
    }
}

/// A call on a connection a newcomer displaced ([`ConnectionLimits::call_started`]): the
/// caller is told to retry (on another connection).
#[derive(Debug)]
pub struct Displaced;

impl Established {
    /// How many established connections `client` holds.
    fn holds(&self, client: &Option<CertId>) -> usize {
        self.by_client.get(client).copied().unwrap_or(0)
    }
}

impl Drop for LiveSlot {
    fn drop(&mut self) {
        if let Ok(mut e) = self.established.lock() {
            if let Some((client, _)) = e.conns.remove(&self.id) {
                crate::shed::give_back(&mut e.by_client, &client);
            }
            // Another connection's entry now, should the addresses have been taken again
            // before this one was dropped, stays.
            if let Some(addr) = self.addr
                && e.by_addr
                    .get(&addr)
                    .is_some_and(|l| Arc::ptr_eq(l, &self.liveness))
            {
                e.by_addr.remove(&addr);
            }
        }
    }
}

/// The handshakes in progress, oldest first.
#[derive(Debug, Default)]
struct Handshakes {
    next: u64,
    pending: std::collections::VecDeque<Pending>,
}

/// One handshake in progress: from whom, when its whole ClientHello came (if it did), its
/// task, and a second descriptor of its socket to look at what waits there unread.
#[derive(Debug)]
struct Pending {
    id: u64,
    peer: Option<IpAddr>,
    hello_at: Option<std::time::Instant>,
    task: tokio::task::AbortHandle,
    probe: Option<std::net::TcpStream>,
    started: std::time::Instant,
}

impl Pending {
    /// Whether bytes wait unread on its socket (a genuine client's ClientHello, or its
    /// answer to the server's flight, waiting for the handshake's task to run).
    fn unread(&self) -> bool {
        self.probe
            .as_ref()
            .is_some_and(|s| s.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0))
    }

    /// How long it has been waiting on its client, on one scale for both halves: before its
    /// ClientHello, the time since it connected times [`SILENT_WEIGHT`]; after, the time
    /// since the ClientHello (the server's flight went out then). A genuine client sends
    /// its ClientHello at once (within ~100 ms on a slow stack) but answers the flight only
    /// a round trip later (~500 ms on a slow cellular link): this puts both at ~500 ms when
    /// overdue. Bytes waiting unread are not counted here ([`Pending::unread`]).
    fn waited(&self, now: std::time::Instant) -> Duration {
        match self.hello_at {
            Some(h) => now.saturating_duration_since(h),
            None => now
                .saturating_duration_since(self.started)
                .saturating_mul(SILENT_WEIGHT),
        }
    }
}

/// How much more a moment without a ClientHello counts than a moment waiting for the
/// client's answer after it ([`Pending::waited`]).
const SILENT_WEIGHT: u32 = 5;

/// A prefix is taken for a flood's only when it holds more than this many handshakes at once:
/// genuine clients behind one NAT or in one office handshake a few at a time (the seventh
/// outside attack: a /16 with two or three at once was the first dropped for a flood spread
/// over a few hundred /16s holding one each). No more than a few: the eighth attack spread a
/// flood over 16 /16s (or 16 IPv6 /48s) holding 16 each, under a threshold of "16 and its
/// share", and 80-88 % of genuine handshakes with a 500 ms round trip were lost.
const FEW_HANDSHAKES: usize = 3;

impl Handshakes {
    /// Which handshake makes way for a newcomer:
    /// 1. the one silent longest (no ClientHello, nothing unread), if for [`SILENT_GRACE`];
    /// 2. else, from the widest address prefix to the narrowest ([`prefix`]: IPv4 /16, /24,
    ///    /32; IPv6 /48, /56, /64), narrowing to the prefix holding the most when it holds
    ///    more than [`FEW_HANDSHAKES`] (a flood from fewer than ~256 / 4 networks makes way
    ///    at its own expense; ties go to the prefix of the handshake that has waited longest);
    /// 3. then the one that has waited on its client longest ([`Pending::waited`]; one with
    ///    bytes unread last), the oldest of equals.
    ///
    /// Found by outside attacks: dropping any silent one first dropped genuine clients whose
    /// ClientHello comes a few ms after the connection; ties broken towards silent ones
    /// dropped them under a flood of ClientHellos from a few hundred /16s; the prefix holding
    /// the most, however few, dropped genuine clients sharing a network under such a flood;
    /// only a prefix past its share and 16 let a flood spread over 16 networks through.
    /// What is left: a flood fast enough that its handshakes are all younger than a genuine
    /// one's wait (~256 / round trip per second), spread over ~64 networks or more holding
    /// three or fewer each, still drops the genuine one (the README recommends a per-prefix
    /// rate limit in front); genuine clients of one network handshaking more than three at
    /// once (a carrier's NAT) are taken for a flood against one spread over many networks.
    fn victim(&self, now: std::time::Instant) -> Option<usize> {
        let n = self.pending.len();
        // Longest wait first, the oldest of equals.
        let mut order: Vec<(Duration, usize)> = self
            .pending
            .iter()
            .enumerate()
            .map(|(i, p)| (p.waited(now), i))
            .collect();
        order.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        // Whether bytes wait unread, looked at only for those considered (a peek each).
        let mut unread: Vec<Option<bool>> = vec![None; n];
        let mut waiting = |i: usize| match unread.get_mut(i) {
            Some(u) => !*u.get_or_insert_with(|| self.pending.get(i).is_some_and(Pending::unread)),
            None => false,
        };
        let silent_grace = SILENT_GRACE.saturating_mul(SILENT_WEIGHT);
        if let Some(&(_, i)) =
            order
                .iter()
                .take_while(|(w, _)| *w >= silent_grace)
                .find(|(_, i)| {
                    self.pending.get(*i).is_some_and(|p| p.hello_at.is_none()) && waiting(*i)
                })
        {
            return Some(i);
        }
        let mut set = vec![true; n];
        for level in 0..PREFIX_LEVELS {
            let key = |i: usize| {
                self.pending
                    .get(i)
                    .and_then(|p| p.peer)
                    .map(|ip| prefix(ip, level))
            };
            let mut counts: HashMap<Option<IpAddr>, usize> = HashMap::new();
            for i in (0..n).filter(|i| set[*i]) {
                *counts.entry(key(i)).or_insert(0) += 1;
            }
            let most = counts.values().copied().max()?;
            if most <= FEW_HANDSHAKES {
                continue;
            }
            let heaviest = |i: usize| set[i] && counts.get(&key(i)) == Some(&most);
            let chosen = order
                .iter()
                .map(|(_, i)| *i)
                .find(|i| heaviest(*i) && waiting(*i))
                .or_else(|| (0..n).find(|i| heaviest(*i)))
                .map(key)?;
            for (i, s) in set.iter_mut().enumerate() {
                *s = *s && key(i) == chosen;
            }
        }
        order
            .iter()
            .map(|(_, i)| *i)
            .find(|i| set[*i] && waiting(*i))
            .or_else(|| (0..n).find(|i| set[*i]))
    }
}

/// How long a handshake may have sent nothing (no whole ClientHello) before it is the first
/// to make way: longer than a slow client stack or a lost segment takes.
pub const SILENT_GRACE: Duration = Duration::from_secs(1);

/// How many prefix lengths [`prefix`] knows.
const PREFIX_LEVELS: u8 = 3;

/// The address prefix of `ip` at `level` (0: the widest): an IPv4 address's /16, /24, /32;
/// an IPv6 address's /48, /56, /64 (a site's delegation, a home's, one network: an attacker
/// has all of one's addresses); an IPv4-mapped IPv6 address is its IPv4 address.
fn prefix(ip: IpAddr, level: u8) -> IpAddr {
    let level = usize::from(level.min(PREFIX_LEVELS - 1));
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            let bits = [16, 24, 32][level];
            IpAddr::V4((u32::from(v4) & (u32::MAX << (32 - bits))).into())
        }
        IpAddr::V6(v6) => {
            let bits = [48, 56, 64][level];
            IpAddr::V6((u128::from(v6) & (u128::MAX << (128 - bits))).into())
        }
    }
}

/// What `--max-connections-per-peer` counts as one peer: an IPv4 address, an IPv6 /64 (one
/// host's network: an IPv6 host may use any address of its /64, so counting addresses let
/// one host hold the limit times 2^64).
fn peer_key(ip: IpAddr) -> IpAddr {
    prefix(ip, PREFIX_LEVELS - 1)
}

/// Handshakes in progress at once, over all the roles of a process.
pub const MAX_HANDSHAKES: usize = 256;

/// Established connections kept for the operators' roles beyond the limit of the others.
pub const OPERATOR_RESERVE: usize = 128;

/// How long an established connection must have sent nothing before a newcomer may displace
/// it from a full acceptor: longer than the pauses between a busy client's calls.
pub const DISPLACE_QUIET: Duration = Duration::from_secs(5);

/// How long a newcomer waits for the place of the connection it displaced.
const DISPLACE_WAIT: Duration = Duration::from_secs(2);

/// What [`ConnectionLimits::default_total`] leaves of the file-descriptor limit for the rest
/// of the process (database connections and files, outbound channels, logs, metrics), beyond
/// [`MAX_HANDSHAKES`] and [`OPERATOR_RESERVE`].
pub const FD_RESERVE: u64 = 256;

impl ConnectionLimits {
    /// At most `total` established connections (at least 1) from others than the operators'
    /// roles, at most `per_peer` from one address (0: no limit per address beyond the total).
    pub fn new(total: usize, per_peer: usize) -> Self {
        let total = total.max(1);
        Self {
            total: Arc::new(tokio::sync::Semaphore::new(total)),
            max_total: total,
            operators: Arc::new(tokio::sync::Semaphore::new(OPERATOR_RESERVE)),
            per_peer,
            per_client: (total / PER_CLIENT_SHARE).max(MIN_PER_CLIENT),
            peers: Arc::default(),
            handshakes: Arc::default(),
            established: Arc::default(),
            epoch: tokio::time::Instant::now(),
            warned: Arc::new(mcim_telemetry::Throttle::new(Duration::from_secs(10))),
        }
    }

    /// Milliseconds since this process's limits were made (the clock of [`Liveness`]).
    fn now_ms(&self) -> u64 {
        self.ms_at(tokio::time::Instant::now())
    }

    /// [`ConnectionLimits::now_ms`] at `t`.
    fn ms_at(&self, t: tokio::time::Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// The total a process with `fd_limit` file descriptors holds by default: what
    /// [`FD_RESERVE`], twice [`MAX_HANDSHAKES`] and [`OPERATOR_RESERVE`] leave, at most 10,000
    /// (each held connection costs 25-40 KB of memory), at least 16.
    pub fn default_total(fd_limit: u64) -> usize {
        // A handshake in progress holds two descriptors (`Pending::probe`).
        let others = FD_RESERVE + (2 * MAX_HANDSHAKES + OPERATOR_RESERVE) as u64;
        usize::try_from(fd_limit.saturating_sub(others).clamp(16, 10_000)).unwrap_or(16)
    }

    /// The most established connections held at once from others than the operators.
    pub fn max_total(&self) -> usize {
        self.max_total
    }

    /// The established connections held now (the operators' included).
    pub fn open(&self) -> usize {
        self.max_total
            .saturating_sub(self.total.available_permits())
            .saturating_add(OPERATOR_RESERVE.saturating_sub(self.operators.available_permits()))
    }

    /// The handshakes in progress now.
    pub fn handshakes(&self) -> usize {
        self.handshakes.lock().map_or(0, |h| h.pending.len())
    }

    /// Starts a handshake from `peer`: `spawn` starts its task (given its number, for
    /// [`ConnectionLimits::hello`] and [`ConnectionLimits::end_handshake`]). Past
    /// [`MAX_HANDSHAKES`] one in progress is dropped first ([`Handshakes::victim`], which
    /// says how and why). Found by outside attacks: dropping the oldest of all, ~256/RTT
    /// connections/s from one address without any certificate evicted every client with that
    /// round trip; dropping the oldest of the address holding the most, the same flood spread
    /// over ~300 addresses (ties broken in hash-table order) failed 60-90 % of genuine calls,
    /// local clients included.
    fn begin_handshake(
        &self,
        peer: Option<IpAddr>,
        probe: Option<std::net::TcpStream>,
        spawn: impl FnOnce(u64) -> tokio::task::AbortHandle,
    ) {
        let Ok(mut h) = self.handshakes.lock() else {
            return;
        };
        let mut evicted = false;
        while h.pending.len() >= MAX_HANDSHAKES {
            let i = h.victim(std::time::Instant::now()).unwrap_or(0);
            if let Some(p) = h.pending.remove(i) {
                p.task.abort();
                evicted = true;
            }
        }
        let id = h.next;
        h.next = h.next.wrapping_add(1);
        // Under the lock: the task cannot end (and look for itself) before it is listed.
        let task = spawn(id);
        h.pending.push_back(Pending {
            id,
            peer,
            hello_at: None,
            task,
            probe,
            started: std::time::Instant::now(),
        });
        drop(h);
        if evicted {
            self.refused("evicted", None);
        }
    }

    /// The handshake `id` has received its whole ClientHello.
    fn hello(&self, id: u64) {
        if let Ok(mut h) = self.handshakes.lock()
            && let Some(p) = h.pending.iter_mut().find(|p| p.id == id)
        {
            p.hello_at = Some(std::time::Instant::now());
        }
    }

    /// The handshake `id` ended (either way).
    fn end_handshake(&self, id: u64) {
        if let Ok(mut h) = self.handshakes.lock()
            && let Some(i) = h.pending.iter().position(|p| p.id == id)
        {
            h.pending.remove(i);
        }
    }

    /// A place for an established connection from `peer` with certificate `client` (an
    /// operator's role or not), or why there is none. Past the total, a quiet connection of a
    /// client holding at least as many is displaced ([`ConnectionLimits::displace_quietest`])
    /// and its place awaited.
    async fn admit(
        &self,
        peer: Option<IpAddr>,
        client: Option<CertId>,
        kind: ClientKind,
    ) -> Result<Admission, &'static str> {
        let operator = kind == ClientKind::Operator;
        match self.try_admit(peer, client, kind) {
            Err("limit")
                if self.peer_has_room(peer, operator)
                    && self.client_has_room(client)
                    && self.displace_quietest(client, kind) =>
            {
                let place = tokio::time::timeout(DISPLACE_WAIT, self.total.clone().acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .ok_or("limit")?;
                self.seat(place, peer, client, kind)
            }
            other => other,
        }
    }

    /// [`ConnectionLimits::admit`] without displacing anyone.
    fn try_admit(
        &self,
        peer: Option<IpAddr>,
        client: Option<CertId>,
        kind: ClientKind,
    ) -> Result<Admission, &'static str> {
        let operator = kind == ClientKind::Operator;
        if operator && let Ok(place) = self.operators.clone().try_acquire_owned() {
            return Ok(Admission {
                _place: place,
                _peer: None,
                live: None,
            });
        }
        let place = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| "limit")?;
        self.seat(place, peer, client, kind)
    }

    /// Whether `peer` may hold one more connection under the per-address limit.
    fn peer_has_room(&self, peer: Option<IpAddr>, operator: bool) -> bool {
        match (peer.map(peer_key), self.per_peer) {
            (Some(ip), n) if n > 0 && !operator => self
                .peers
                .lock()
                .is_ok_and(|peers| peers.get(&ip).copied().unwrap_or(0) < n),
            _ => true,
        }
    }

    /// Whether `client` may hold one more connection ([`PER_CLIENT_SHARE`]).
    fn client_has_room(&self, client: Option<CertId>) -> bool {
        client.is_none()
            || self
                .established
                .lock()
                .is_ok_and(|e| e.holds(&client) < self.per_client)
    }

    /// A connection from `peer` with certificate `client` in `place` (one of the total's):
    /// counted against its address (if there is a per-address limit), and, unless it is an
    /// operator's, listed among those a newcomer may displace.
    fn seat(
        &self,
        place: tokio::sync::OwnedSemaphorePermit,
        peer: Option<IpAddr>,
        client: Option<CertId>,
        kind: ClientKind,
    ) -> Result<Admission, &'static str> {
        let operator = kind == ClientKind::Operator;
        let peer_slot = match (peer.map(peer_key), self.per_peer) {
            (Some(ip), n) if n > 0 && !operator => {
                let mut peers = self.peers.lock().map_err(|_| "limit")?;
                let held = peers.entry(ip).or_insert(0);
                if *held >= n {
                    return Err("peer_limit");
                }
                *held += 1;
                Some(PeerSlot {
                    ip,
                    peers: self.peers.clone(),
                })
            }
            _ => None,
        };
        let live = if operator {
            None
        } else {
            let liveness = Arc::new(Liveness {
                device: kind == ClientKind::Device,
                ..Liveness::default()
            });
            liveness.heard_ms.store(self.now_ms(), Ordering::Relaxed);
            let mut e = self.established.lock().map_err(|_| "limit")?;
            if client.is_some() && e.holds(&client) >= self.per_client {
                return Err("client_limit");
            }
            let id = e.next;
            e.next = e.next.wrapping_add(1);
            e.conns.insert(id, (client, liveness.clone()));
            *e.by_client.entry(client).or_insert(0) += 1;
            Some(LiveSlot {
                id,
                liveness,
                established: self.established.clone(),
                addr: None,
            })
        };
        Ok(Admission {
            _place: place,
            _peer: peer_slot,
            live,
        })
    }

    /// Closes, for a newcomer with certificate `newcomer`, one established connection;
    /// whether there was one to close:
    /// - when the newcomer holds less than a fair share ([`ConnectionLimits::fair_share`]:
    ///   the limit over the clients holding any, the newcomer counted, at least
    ///   [`MIN_PER_CLIENT`]), a connection of the client holding the most beyond that share,
    ///   busy or not: one with no call in flight first, then the one that has sent nothing
    ///   for longest;
    /// - else, among the clients holding at least as many as the newcomer (itself included),
    ///   a connection that has sent nothing for at least [`DISPLACE_QUIET`]: an idle one (no
    ///   call in flight: [`ConnectionLimits::call_started`]) first, then one with a call in
    ///   flight (only of a client holding at least [`CUT_A_CALL_FROM`], or, for a device
    ///   newcomer (`kind`) holding one already, another device's); of the client holding the
    ///   most, the one silent longest.
    ///
    /// Found by outside attacks: a subscriber certificate holding the whole limit with busy
    /// connections otherwise displaced every device waiting quietly on a long poll or stream,
    /// one new connection at a time; eight certificates, each within its eighth, did the same
    /// until the fair share; and many certificates, each holding no more than the floor of
    /// the share, still did (every quiet connection was fair game, a watcher's stream
    /// included) until idle connections went first: a call in flight (a device's task
    /// stream, a subscriber's long poll) is work the server owes an answer, an idle
    /// connection is a keep-alive the client can open again. For a fresh newcomer a call in
    /// flight is cut only from a client holding several connections, so that certificates
    /// holding their connections with quiet streams cannot keep every newcomer out, and never
    /// a watcher's only one; a device in the middle of its flow (holding one already) may cut
    /// another device's quiet call, as devices waiting on their task streams must reach the
    /// next role (a subscriber's key may not, nor may a device cut a subscriber's call: either
    /// would cut a watcher per handshake). A
    /// client within its share that keeps calling is never displaced (a device holds two or
    /// three).
    fn displace_quietest(&self, newcomer: Option<CertId>, kind: ClientKind) -> bool {
        let now = self.now_ms();
        let quiet = u64::try_from(DISPLACE_QUIET.as_millis()).unwrap_or(u64::MAX);
        let Ok(e) = self.established.lock() else {
            return false;
        };
        let newcomer_holds = e.holds(&newcomer);
        let share = self.fair_share(&e, newcomer_holds == 0);
        let fair = newcomer_holds < share;
        let victim = e
            .conns
            .values()
            .filter(|(_, l)| !l.displaced.load(Ordering::Relaxed))
            .filter_map(|(client, l)| {
                let silent = now.saturating_sub(l.heard_ms.load(Ordering::Relaxed));
                let idle = l.calls.load(Ordering::Relaxed) == 0;
                let held = e.holds(client);
                let over = fair && held > share;
                // A call may be cut from a client's only connection for a device in the
                // middle of its flow, another device's ([`CUT_A_CALL_FROM`]).
                let call_cut = held >= CUT_A_CALL_FROM
                    || (kind == ClientKind::Device
                        && newcomer_holds > 0
                        && *client != newcomer
                        && l.device);
                let quiet_rule = silent >= quiet && held >= newcomer_holds && (idle || call_cut);
                (over || quiet_rule).then_some(((over, idle, held, silent), l))
            })
            .max_by_key(|(rank, _)| *rank);
        let Some(((_, _, _, silent), liveness)) = victim else {
            return false;
        };
        // A busy one's calls in flight are given [`DRAIN`] to end; an idle or quiet one breaks
        // at once (its last frames out first).
        liveness
            .cut_at_ms
            .store(now.saturating_add(ms(DRAIN)), Ordering::Release);
        liveness.displaced.store(true, Ordering::Release);
        let wait = if liveness.calls.load(Ordering::Acquire) == 0 || silent >= quiet {
            SETTLE
        } else {
            DRAIN
        };
        liveness.cut_by(now.saturating_add(ms(wait)));
        drop(e);
        self.refused("displaced", None);
        true
    }

    /// A client's fair share of the established connections: `--max-connections` over the
    /// clients holding any (and one more for a newcomer holding none), at least
    /// [`MIN_PER_CLIENT`].
    fn fair_share(&self, e: &Established, newcomer: bool) -> usize {
        let clients = e.by_client.len() + usize::from(newcomer);
        (self.max_total / clients.max(1)).max(MIN_PER_CLIENT)
    }

    /// A call starts on the connection at `addr`: it counts as in flight until the guard is
    /// dropped (the call's answer ended, or the call was dropped). None for a connection the
    /// limits do not list (an operator's); [`Displaced`] when a newcomer displaced the
    /// connection: the call is refused while the calls in flight end ([`DRAIN`]).
    pub fn call_started(&self, addr: ConnAddr) -> Result<Option<CallInFlight>, Displaced> {
        let Some(liveness) = self
            .established
            .lock()
            .ok()
            .and_then(|e| e.by_addr.get(&addr).cloned())
        else {
            return Ok(None);
        };
        // Counted first, then looked at: a displacement in between sees it in flight.
        liveness.calls.fetch_add(1, Ordering::AcqRel);
        let call = CallInFlight {
            liveness,
            epoch: self.epoch,
        };
        if call.liveness.displaced.load(Ordering::Acquire) {
            return Err(Displaced);
        }
        Ok(Some(call))
    }

    /// Counts a refused connection; a limit refusal is a warning at most every 10 s.
    fn refused(&self, reason: &'static str, peer: Option<SocketAddr>) {
        mcim_telemetry::metrics::count(
            "tls_connections_refused",
            "Connections closed by the acceptor (past a limit, a failed or evicted handshake, \
             silent, idle or displaced for a newcomer), by reason",
            reason,
        );
        let warn = matches!(reason, "limit" | "peer_limit" | "client_limit")
            .then(|| self.warned.due())
            .flatten();
        if let Some(held_back) = warn {
            tracing::warn!(
                ?peer,
                reason,
                open = self.open(),
                held_back,
                "connection refused: the acceptor holds as many connections as allowed \
                 (--max-connections, --max-connections-per-peer, a client's share) and none \
                 may make way; further refusals in the next 10 s are only counted"
            );
        } else {
            tracing::debug!(?peer, reason, "connection refused");
        }
    }
}

/// A connection's place under [`ConnectionLimits`], given back when the connection ends.
#[derive(Debug)]
struct Admission {
    _place: tokio::sync::OwnedSemaphorePermit,
    _peer: Option<PeerSlot>,
    /// Its entry among the connections a newcomer may displace (none for an operator's).
    live: Option<LiveSlot>,
}

impl Admission {
    /// The connection holding this place is at `addr`: calls on it are counted
    /// ([`ConnectionLimits::call_started`]).
    fn at(&mut self, addr: ConnAddr) {
        if let Some(live) = &mut self.live
            && let Ok(mut e) = live.established.lock()
        {
            e.by_addr.insert(addr, live.liveness.clone());
            live.addr = Some(addr);
        }
    }
}

/// One connection counted against its peer address ([`peer_key`]).
#[derive(Debug)]
struct PeerSlot {
    ip: IpAddr,
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Ok(mut peers) = self.peers.lock() {
            crate::shed::give_back(&mut peers, &self.ip);
        }
    }
}

/// An accepted connection as the server reads it: its place under the limits, held until it
/// is dropped, and a quiet timer: the first bytes must come within [`HANDSHAKE_TIMEOUT`],
/// then no silence longer than [`IDLE_TIMEOUT`] (a read then fails with `TimedOut`, and the
/// server closes the connection).
#[derive(Debug)]
pub struct Guarded<S> {
    inner: S,
    admission: Admission,
    last_read: tokio::time::Instant,
    quiet: Duration,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    limits: ConnectionLimits,
}

impl<S> Guarded<S> {
    /// `inner` in its place under the limits: its first bytes due within `first`, then
    /// silences of at most `idle` ([`HANDSHAKE_TIMEOUT`] and [`IDLE_TIMEOUT`] on the
    /// roles' ports).
    fn new(
        inner: S,
        admission: Admission,
        limits: ConnectionLimits,
        (first, idle): (Duration, Duration),
    ) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            inner,
            admission,
            last_read: now,
            quiet: first,
            idle,
            timer: Box::pin(tokio::time::sleep_until(now + first)),
            limits,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.cut_due() {
            return Poll::Ready(Err(displaced()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    // Heard from: the quiet time starts again (the timer is moved only when
                    // it fires, not on every read).
                    let now = tokio::time::Instant::now();
                    self.last_read = now;
                    self.quiet = self.idle;
                    if let Some(live) = &self.admission.live {
                        let ms = self.limits.ms_at(now);
                        live.liveness.heard_ms.store(ms, Ordering::Relaxed);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                // A newcomer that displaces this connection wakes this reader.
                if let Some(live) = &self.admission.live {
                    if let Ok(mut reader) = live.liveness.reader.lock()
                        && !reader.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
                    {
                        *reader = Some(cx.waker().clone());
                    }
                    if self.cut_due() {
                        return Poll::Ready(Err(displaced()));
                    }
                }
                // Displaced: the timer fires at the cut, if that comes first.
                if let Some(cut) = self.cut_at()
                    && cut < self.timer.deadline()
                {
                    self.timer.as_mut().reset(cut);
                }
                loop {
                    if self.timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    if self.cut_due() {
                        return Poll::Ready(Err(displaced()));
                    }
                    let due = self.last_read + self.quiet;
                    if due <= tokio::time::Instant::now() {
                        let reason = if self.quiet == self.idle {
                            "idle"
                        } else {
                            "silent"
                        };
                        self.limits.refused(reason, None);
                        return Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("nothing heard for {:?}", self.quiet),
                        )));
                    }
                    let next = self.cut_at().map_or(due, |cut| cut.min(due));
                    self.timer.as_mut().reset(next);
                }
            }
            other => other,
        }
    }
}

/// The error a displaced connection's reads fail with (the server then closes it).
fn displaced() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "displaced by a newer connection: the acceptor is full and this one was the quietest",
    )
}

impl<S> Guarded<S> {
    /// When this connection's reads fail, if a newcomer displaced it
    /// ([`ConnectionLimits::displace_quietest`], [`DRAIN`]).
    fn cut_at(&self) -> Option<tokio::time::Instant> {
        let l = &self.admission.live.as_ref()?.liveness;
        l.displaced.load(Ordering::Acquire).then(|| {
            let ms = l.cut_at_ms.load(Ordering::Acquire);
            self.limits.epoch + Duration::from_millis(ms)
        })
    }

    /// Whether this connection's reads fail now.
    fn cut_due(&self) -> bool {
        self.cut_at()
            .is_some_and(|cut| cut <= tokio::time::Instant::now())
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// tonic reads the peer's certificates (`TlsConnectInfo`, which the gate reads) through this.
impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Guarded<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// A pause after a failed `accept` that is not the client's doing (out of file descriptors or
/// memory): retrying at once would spin a core and starve the connections being served.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Who a connection's client certificates are, as far as the limits care
/// ([`crate::gate::Gate::client_kind`]).
pub type Classify =
    Arc<dyn Fn(&[rustls::pki_types::CertificateDer<'static>]) -> ClientKind + Send + Sync>;

/// What the acceptor knows of a connection's client from its certificates, as the gate
/// judges them (the issuer may issue the role the leaf claims: annex x.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientKind {
    /// An operator's role (supplier, RO, VNO, SHO, PVA): places of its own beyond the limit
    /// ([`OPERATOR_RESERVE`]), never displaced.
    Operator,
    /// A device, certified at its supply: in the middle of its flow it may cut another
    /// device's quiet call to open its next role's connection ([`CUT_A_CALL_FROM`]).
    Device,
    /// A subscriber, or a chain the gate will refuse at the first call.
    Other,
}

/// The mutual-TLS connections accepted on `tcp` with `config`, for
/// `Server::serve_with_incoming` (tonic reads the peer's certificates from them for the
/// gate, as from its own TLS), within `limits` ([`ConnectionLimits`]; `classify` tells the
/// operators' and the devices' connections). Each handshake runs in a task of its own, bounded by
/// [`HANDSHAKE_TIMEOUT`]: a slow or silent client holds up no other; an established
/// connection is closed when quiet ([`Guarded`]). A failed handshake is counted and logged at
/// debug level; accepting stops when the server stops reading.
pub fn tls_incoming(
    mut tcp: tonic::transport::server::TcpIncoming,
    config: Arc<rustls::ServerConfig>,
    limits: ConnectionLimits,
    classify: Classify,
) -> impl tokio_stream::Stream<
    Item = Result<Guarded<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>, std::io::Error>,
> {
    use tokio_stream::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let accept_warned = mcim_telemetry::Throttle::new(Duration::from_secs(10));
        loop {
            let next = tokio::select! {
                _ = tx.closed() => break,
                next = tcp.next() => next,
            };
            let stream = match next {
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    // ECONNABORTED and the like are one client's; running out of descriptors
                    // or memory is the process's: wait before accepting again (and say so
                    // at most every 10 s).
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::Interrupted
                    ) {
                        tracing::debug!("accept: {e}");
                    } else {
                        if let Some(held_back) = accept_warned.due() {
                            tracing::warn!(
                                held_back,
                                "accept: {e}; pausing {ACCEPT_PAUSE:?} after each such error \
                                 (said at most every 10 s)"
                            );
                        }
                        tokio::time::sleep(ACCEPT_PAUSE).await;
                    }
                    continue;
                }
                None => break,
            };
            let peer = stream.peer_addr().ok();
            let addr = stream.local_addr().ok().zip(peer);
            let (config, tx, task_limits, classify) =
                (config.clone(), tx.clone(), limits.clone(), classify.clone());
            // A second descriptor of the socket, to tell a silent handshake from one whose
            // ClientHello waits for its task (`Pending::unread`).
            let probe = std::os::fd::AsFd::as_fd(&stream)
                .try_clone_to_owned()
                .ok()
                .map(std::net::TcpStream::from);
            limits.begin_handshake(peer.map(|p| p.ip()), probe, move |id| {
                tokio::spawn(async move {
                    let limits = task_limits;
                    // The ClientHello first (a handshake that has not sent it is the first
                    // to make way for a newcomer), then the rest, within one timeout.
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                        let start = tokio_rustls::LazyConfigAcceptor::new(
                            rustls::server::Acceptor::default(),
                            stream,
                        )
                        .await?;
                        limits.hello(id);
                        start.into_stream(config).await
                    })
                    .await;
                    limits.end_handshake(id);
                    let tls = match handshake {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(?peer, "TLS handshake: {e}");
                            return limits.refused("handshake", peer);
                        }
                        Err(_) => {
                            tracing::debug!(
                                ?peer,
                                "TLS handshake: no answer within {HANDSHAKE_TIMEOUT:?}"
                            );
                            return limits.refused("handshake_timeout", peer);
                        }
                    };
                    let chain = tls.get_ref().1.peer_certificates();
                    let kind = chain.map_or(ClientKind::Other, |chain| classify(chain));
                    // A certificate webpki took but x509-parser cannot read counts as one
                    // client with all such: never as none (fail closed under the limits).
                    let client = Some(chain.and_then(cert_id).unwrap_or([0; 32]));
                    match limits.admit(peer.map(|p| p.ip()), client, kind).await {
                        Ok(mut admission) => {
                            if let Some(addr) = addr {
                                admission.at(addr);
                            }
                            let _ = tx
                                .send(Ok(Guarded::new(
                                    tls,
                                    admission,
                                    limits,
                                    (HANDSHAKE_TIMEOUT, IDLE_TIMEOUT),
                                )))
                                .await;
                        }
                        Err(reason) => limits.refused(reason, peer),
                    }
                })
                .abort_handle()
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Raises this process's soft limit on open files to its hard limit (as servers do: the soft
/// limit is often 1,024) and returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        let raised = rustix::process::Rlimit {
            current: l.maximum,
            maximum: l.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            l = raised;
        }
    }
    l.current.unwrap_or(u64::MAX)
}

/// Client side: present `role`'s certificate to the server of `peer`, trusting only the CA
/// that issues `peer`'s certificates (another operator's CA cannot stand in for it).
pub fn client_tls(pki: &Path, role: Role, peer: Role) -> Result<ClientTlsConfig, PkiError> {
    client_tls_as(pki, role.as_str(), peer)
}

/// [`client_tls`] presenting the certificate in `<party>.pem` (a second SHO's).
pub fn client_tls_as(pki: &Path, party: &str, peer: Role) -> Result<ClientTlsConfig, PkiError> {
    let (cert, key) = dev::party_file_pem(pki, party)?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(dev::role_ca_pem(pki, peer)?))
        .identity(Identity::from_pem(cert, key))
        .domain_name(mcim_pki::party::server_name(peer)))
}

/// [`client_tls_as`] as a rustls configuration (HTTP/2 by ALPN), for channels that pick among
/// several addresses of a role themselves ([`mcim_telemetry::channel`]).
pub fn client_config_as(
    pki: &Path,
    party: &str,
    peer: Role,
) -> Result<rustls::ClientConfig, String> {
    dev::party_client_config(pki, party, peer).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const FIRST: Duration = Duration::from_millis(200);
    const IDLE: Duration = Duration::from_millis(500);
    /// Far beyond either timeout: a read still pending then is a connection never closed.
    const NEVER: Duration = Duration::from_secs(10);

    fn guarded(
        limits: &ConnectionLimits,
    ) -> (Guarded<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (server, client) = tokio::io::duplex(64);
        let admission = limits.try_admit(None, None, ClientKind::Other).unwrap();
        (
            Guarded::new(server, admission, limits.clone(), (FIRST, IDLE)),
            client,
        )
    }

    async fn read_fails_timed_out(server: &mut Guarded<tokio::io::DuplexStream>) {
        let mut b = [0u8; 8];
        let r = tokio::time::timeout(NEVER, server.read(&mut b)).await;
        let e = r.expect("closed well before NEVER").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    }

    /// Nothing within the first timeout: the read fails with TimedOut; the connection's place
    /// is held until it is dropped.
    #[tokio::test]
    async fn a_connection_that_says_nothing_is_closed() {
        let limits = ConnectionLimits::new(4, 0);
        let (mut server, _client) = guarded(&limits);
        let started = tokio::time::Instant::now();
        read_fails_timed_out(&mut server).await;
        assert!(started.elapsed() >= FIRST, "{:?}", started.elapsed());
        assert_eq!(limits.open(), 1);
        drop(server);
        assert_eq!(limits.open(), 0);
    }

    /// Once heard from, a connection may be quiet for the idle timeout, counted from the last
    /// bytes read: a client that speaks more often than that is never closed.
    #[tokio::test]
    async fn a_quiet_connection_is_closed_after_the_idle_timeout() {
        let limits = ConnectionLimits::new(4, 0);
        let (mut server, mut client) = guarded(&limits);
        let mut b = [0u8; 8];
        client.write_all(b"PRI").await.unwrap();
        assert_eq!(server.read(&mut b).await.unwrap(), 3);
        // Speaking every IDLE/3 for 4 idle timeouts: each read answered, never closed.
        for _ in 0..12 {
            tokio::time::sleep(IDLE / 3).await;
            client.write_all(b"x").await.unwrap();
            assert_eq!(server.read(&mut b).await.unwrap(), 1);
        }
        let heard = tokio::time::Instant::now();
        read_fails_timed_out(&mut server).await;
        assert!(heard.elapsed() >= IDLE, "{:?}", heard.elapsed());
        // The server's writes were never timed: they still reach the client.
        server.write_all(b"bye").await.unwrap();
        assert_eq!(client.read(&mut b).await.unwrap(), 3);
    }

    /// The limits: the total, the per-address share, each place given back when its
    /// connection ends (an address with none left is forgotten); the operators' reserve
    /// beyond the total.
    #[test]
    fn connections_are_admitted_within_the_limits_and_given_back() {
        let ip = |n: u8| Some(IpAddr::from([192, 0, 2, n]));
        let limits = ConnectionLimits::new(3, 2);
        let a = limits.try_admit(ip(1), None, ClientKind::Other).unwrap();
        let b = limits.try_admit(ip(1), None, ClientKind::Other).unwrap();
        assert_eq!(
            limits
                .try_admit(ip(1), None, ClientKind::Other)
                .unwrap_err(),
            "peer_limit"
        );
        assert_eq!(limits.open(), 2, "a refusal holds nothing");
        let c = limits.try_admit(ip(2), None, ClientKind::Other).unwrap();
        assert_eq!(
            limits
                .try_admit(ip(3), None, ClientKind::Other)
                .unwrap_err(),
            "limit"
        );
        assert_eq!(
            limits.try_admit(None, None, ClientKind::Other).unwrap_err(),
            "limit"
        );
        // The others' places are all taken: an operator's role still gets one of its own,
        // per-address limit or not.
        let ops: Vec<_> = (0..OPERATOR_RESERVE)
            .map(|_| limits.try_admit(ip(1), None, ClientKind::Operator).unwrap())
            .collect();
        assert_eq!(limits.open(), 3 + OPERATOR_RESERVE);
        assert_eq!(
            limits
                .try_admit(ip(1), None, ClientKind::Operator)
                .unwrap_err(),
            "limit"
        );
        drop(ops);
        drop(a);
        assert_eq!(limits.open(), 2);
        let d = limits.try_admit(ip(1), None, ClientKind::Other).unwrap();
        drop((b, c, d));
        assert_eq!(limits.open(), 0);
        assert!(limits.peers.lock().unwrap().is_empty());
        // No per-address limit: the total only.
        let total = ConnectionLimits::new(2, 0);
        let held: Vec<_> = (0..2)
            .map(|_| total.try_admit(ip(1), None, ClientKind::Other).unwrap())
            .collect();
        assert_eq!(
            total.try_admit(ip(1), None, ClientKind::Other).unwrap_err(),
            "limit"
        );
        assert!(total.peers.lock().unwrap().is_empty());
        drop(held);
        // An IPv6 /64 is one peer (a host may use any of its addresses), an IPv4-mapped
        // address its IPv4 address.
        let v6 = ConnectionLimits::new(8, 1);
        let a = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let first = v6
            .try_admit(a("2001:db8:1:2::1"), None, ClientKind::Other)
            .unwrap();
        assert_eq!(
            v6.try_admit(a("2001:db8:1:2:ffff::9"), None, ClientKind::Other)
                .unwrap_err(),
            "peer_limit"
        );
        let next = v6
            .try_admit(a("2001:db8:1:3::1"), None, ClientKind::Other)
            .unwrap();
        let v4 = v6.try_admit(ip(1), None, ClientKind::Other).unwrap();
        assert_eq!(
            v6.try_admit(a("::ffff:192.0.2.1"), None, ClientKind::Other)
                .unwrap_err(),
            "peer_limit"
        );
        assert_eq!(v6.open(), 3);
        drop((first, next, v4));
        assert!(v6.peers.lock().unwrap().is_empty());
        // One client (certificate) holds at most an eighth of the total, at least four.
        let shared = ConnectionLimits::new(64, 0);
        let one = Some([7u8; 32]);
        let held: Vec<_> = (0..8)
            .map(|_| shared.try_admit(ip(1), one, ClientKind::Other).unwrap())
            .collect();
        assert_eq!(
            shared.try_admit(ip(2), one, ClientKind::Other).unwrap_err(),
            "client_limit"
        );
        let other = shared
            .try_admit(ip(1), Some([8u8; 32]), ClientKind::Other)
            .unwrap();
        drop(held);
        let again = shared.try_admit(ip(2), one, ClientKind::Other).unwrap();
        drop((other, again));
        assert_eq!(ConnectionLimits::new(2, 0).per_client, MIN_PER_CLIENT);
        assert_eq!(ConnectionLimits::default_total(1024), 128);
        assert_eq!(ConnectionLimits::default_total(1 << 20), 10_000);
        assert_eq!(ConnectionLimits::default_total(100), 16);
    }

    /// Limits of `total` whose clock started a minute ago (so that a connection can be made
    /// to look quiet for longer than [`DISPLACE_QUIET`]).
    fn displacing_limits(total: usize) -> ConnectionLimits {
        let mut limits = ConnectionLimits::new(total, 0);
        limits.epoch = tokio::time::Instant::now()
            .checked_sub(Duration::from_secs(60))
            .unwrap();
        limits
    }

    /// An established connection of `client` under `limits`: its reader (waiting, it ends
    /// with the error its read fails with when displaced), its liveness, and the peer's end.
    fn established(
        limits: &ConnectionLimits,
        client: u8,
    ) -> (
        tokio::task::JoinHandle<Result<usize, std::io::ErrorKind>>,
        Arc<Liveness>,
        tokio::io::DuplexStream,
    ) {
        established_at(limits, client, None)
    }

    /// [`established`], its addresses `addr` (for [`ConnectionLimits::call_started`]).
    fn established_at(
        limits: &ConnectionLimits,
        client: u8,
        addr: Option<ConnAddr>,
    ) -> (
        tokio::task::JoinHandle<Result<usize, std::io::ErrorKind>>,
        Arc<Liveness>,
        tokio::io::DuplexStream,
    ) {
        established_as(limits, client, addr, ClientKind::Other)
    }

    /// [`established_at`], a client of `kind`.
    fn established_as(
        limits: &ConnectionLimits,
        client: u8,
        addr: Option<ConnAddr>,
        kind: ClientKind,
    ) -> (
        tokio::task::JoinHandle<Result<usize, std::io::ErrorKind>>,
        Arc<Liveness>,
        tokio::io::DuplexStream,
    ) {
        let (server, peer) = tokio::io::duplex(64);
        let mut admission = limits.try_admit(None, Some([client; 32]), kind).unwrap();
        if let Some(addr) = addr {
            admission.at(addr);
        }
        let live = admission.live.as_ref().unwrap().liveness.clone();
        let mut server = Guarded::new(server, admission, limits.clone(), (NEVER, NEVER));
        let reader = tokio::spawn(async move {
            let mut b = [0u8; 8];
            let r = server.read(&mut b).await.map_err(|e| e.kind());
            drop(server);
            r
        });
        (reader, live, peer)
    }

    /// A full acceptor makes room: nobody is displaced while every connection is busy (the
    /// newcomer is refused); once some are quiet, the quietest of the client (certificate)
    /// holding the most is closed (its reader, waiting, wakes with an error) and the newcomer
    /// gets its place; the others are untouched. A client holding more than the others
    /// displaces only its own connections, and is refused when they are busy (the fifth
    /// outside attack: busy connections of one subscriber certificate filling the limit, then
    /// a new one at a time, displaced every quiet device).
    #[tokio::test]
    async fn a_full_acceptor_displaces_the_quietest_connection_of_the_busiest_client() {
        let limits = displacing_limits(4);
        let connect = |client: u8| established(&limits, client);
        let (a, a_live, _a) = connect(1);
        let (b, b_live, _b) = connect(1);
        let (c, c_live, _c) = connect(3);
        let (d, _d_live, _d) = connect(4);
        // All just heard from: none may be displaced, the newcomer is refused.
        let newcomer = Some([9; 32]);
        assert_eq!(
            limits
                .admit(None, newcomer, ClientKind::Other)
                .await
                .unwrap_err(),
            "limit"
        );
        assert_eq!(limits.open(), 4);
        // c is the quietest of all, but a is the quietest of the client holding two.
        let now = limits.now_ms();
        a_live.heard_ms.store(now - 10_000, Ordering::Relaxed);
        b_live.heard_ms.store(now - 6_000, Ordering::Relaxed);
        c_live.heard_ms.store(0, Ordering::Relaxed);
        let admitted = tokio::time::timeout(NEVER, limits.admit(None, newcomer, ClientKind::Other))
            .await
            .expect("the newcomer did not wait for the displaced place");
        assert!(admitted.is_ok());
        assert_eq!(
            a.await.unwrap(),
            Err(std::io::ErrorKind::ConnectionAborted),
            "the displaced connection's read fails"
        );
        assert_eq!(limits.open(), 4);
        // Client 9 now holds one more place (its newcomer's, busy): two with another; client
        // 1 holds one (b, quiet), 3 one (c, quietest), 4 one (d, busy).
        let held = admitted.unwrap();
        // A newcomer of client 9 (holding one) may displace only a client holding at least
        // one: b or c; the quietest of those of the most (all hold one): c.
        let again = tokio::time::timeout(NEVER, limits.admit(None, newcomer, ClientKind::Other))
            .await
            .unwrap();
        assert!(again.is_ok());
        assert_eq!(c.await.unwrap(), Err(std::io::ErrorKind::ConnectionAborted));
        // Client 9 now holds two, everyone else at most one: its next newcomer may displace
        // none of theirs (b is quiet), and its own are busy: refused.
        assert_eq!(
            limits
                .admit(None, newcomer, ClientKind::Other)
                .await
                .unwrap_err(),
            "limit"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!b.is_finished() && !d.is_finished(), "b and d kept");
        drop((held, again));
        // Operators' connections are never listed for displacement.
        assert!(
            limits
                .try_admit(None, None, ClientKind::Operator)
                .unwrap()
                .live
                .is_none()
        );
    }

    /// Several certificates, each within its eighth, filling the limit with busy connections
    /// do not push quiet devices out: a newcomer holding less than a fair share (the limit
    /// over the clients) displaces a connection of the client holding the most beyond it,
    /// busy or not, never a quiet device's holding one (the seventh outside attack: eight
    /// subscriber certificates filled a limit of 64, and every quiet watch stream was
    /// displaced by a ninth).
    #[tokio::test]
    async fn certificates_over_their_fair_share_make_way_before_quiet_devices() {
        let limits = displacing_limits(64);
        let connect = |client: u8| established(&limits, client);
        // Seven certificates hold eight busy connections each, eight devices one quiet each.
        let attack: Vec<_> = (1..=7)
            .flat_map(|k| (0..8).map(move |_| k))
            .map(connect)
            .collect();
        let devices: Vec<_> = (100..108).map(connect).collect();
        let now = limits.now_ms();
        for (_, live, _) in &devices {
            live.heard_ms.store(now - 60_000, Ordering::Relaxed);
        }
        assert_eq!(limits.open(), 64);
        let finished = |v: &[(tokio::task::JoinHandle<_>, Arc<Liveness>, _)]| {
            v.iter().filter(|(r, _, _)| r.is_finished()).count()
        };
        // An eighth certificate, then a new device: each displaces a busy connection of a
        // certificate over its share (16 clients: 4), not a quiet device.
        let eighth = limits
            .admit(None, Some([8; 32]), ClientKind::Other)
            .await
            .unwrap();
        let device = limits
            .admit(None, Some([108; 32]), ClientKind::Other)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(finished(&attack), 2);
        assert_eq!(finished(&devices), 0, "no device displaced");
        // A certificate holding seven, over its share, may not displace: its newcomer is
        // refused (the others' are busy), and nothing else is closed.
        let holds = |k: u8| limits.established.lock().unwrap().holds(&Some([k; 32]));
        let over = (1..=7u8).find(|k| holds(*k) == 7).unwrap();
        assert_eq!(
            limits
                .admit(None, Some([over; 32]), ClientKind::Other)
                .await
                .unwrap_err(),
            "limit"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(finished(&attack), 2);
        assert_eq!(finished(&devices), 0);
        assert_eq!(limits.open(), 64);
        drop((eighth, device));
    }

    /// Only a connection without a call in flight makes way under the quiet rule. Many
    /// certificates each holding four busy connections (within their share, never over it)
    /// fill the limit beside quiet devices, each waiting on a call (a task stream, a long
    /// poll): a newcomer is refused rather than cut a device's call (round 8's C2: such
    /// watchers were displaced one per newcomer); once a device's call has ended its idle
    /// connection makes way, and only that one; once the certificates' connections are quiet
    /// with calls in flight too, one of theirs makes way, still no device's.
    #[tokio::test]
    async fn a_full_acceptor_takes_an_idle_connection_never_one_with_a_call_in_flight() {
        let limits = displacing_limits(64);
        let local: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let addr = |i: u16| (local, SocketAddr::from(([10, 0, 0, 1], 40_000 + i)));
        let busy: Vec<_> = (1..=14u8)
            .flat_map(|k| (0..4).map(move |_| k))
            .enumerate()
            .map(|(i, k)| established_at(&limits, k, Some(addr(1000 + i as u16))))
            .collect();
        let devices: Vec<_> = (0..8u16)
            .map(|i| established_at(&limits, 100 + i as u8, Some(addr(i))))
            .collect();
        let mut calls: Vec<_> = (0..8u16)
            .map(|i| limits.call_started(addr(i)).unwrap())
            .collect();
        let now = limits.now_ms();
        for (_, live, _) in &devices {
            live.heard_ms.store(now - 60_000, Ordering::Relaxed);
        }
        assert_eq!(limits.open(), 64);
        assert!(
            limits.call_started(addr(99)).unwrap().is_none(),
            "an unknown connection"
        );
        let finished = |v: &[(tokio::task::JoinHandle<_>, Arc<Liveness>, _)]| {
            v.iter().filter(|(r, _, _)| r.is_finished()).count()
        };
        for newcomer in [200u8, 201, 202] {
            assert_eq!(
                limits
                    .admit(None, Some([newcomer; 32]), ClientKind::Other)
                    .await
                    .unwrap_err(),
                "limit"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(finished(&devices), 0, "no call in flight cut");
        assert_eq!(finished(&busy), 0);
        // Device 3's call ends: its connection, idle and quiet, makes way, and only it.
        calls[3].take();
        assert_eq!(devices[3].1.calls.load(Ordering::Relaxed), 0);
        let newcomer = limits
            .admit(None, Some([200; 32]), ClientKind::Other)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(devices[3].0.is_finished());
        assert_eq!(finished(&devices), 1);
        assert_eq!(finished(&busy), 0);
        assert_eq!(
            limits
                .admit(None, Some([201; 32]), ClientKind::Other)
                .await
                .unwrap_err(),
            "limit"
        );
        // The certificates now hold theirs quiet, each with a call in flight (a stream that
        // says nothing): with no idle connection left, a call is cut from a client holding
        // four, never a device's only one.
        let mut held_calls = Vec::new();
        for (i, (_, live, _)) in busy.iter().enumerate() {
            live.heard_ms.store(now - 30_000, Ordering::Relaxed);
            held_calls.push(limits.call_started(addr(1000 + i as u16)).unwrap());
        }
        let second = limits
            .admit(None, Some([201; 32]), ClientKind::Other)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(finished(&busy), 1, "a certificate's quiet call cut");
        assert_eq!(finished(&devices), 1, "no other device displaced");
        drop((newcomer, second, calls, held_calls));
    }

    /// A device in the middle of its flow (holding its RO task stream, a call in flight) may
    /// cut another device's quiet call to open its next connection, at once (a quiet call is
    /// not drained), where a fresh newcomer may not; never its own nor a subscriber's; and a
    /// subscriber's key holding one may not. (Round 9: with only fresh newcomers allowed,
    /// devices each holding their task stream filled a limit of 64 and none could reach the
    /// PVA: 201-240 of 400 provisioned; with any newcomer holding one allowed, a subscriber
    /// key cycling a second connection cut a watcher's only call with each handshake; round
    /// 10: so did one device's certificate, while a device could cut a subscriber's call.)
    #[tokio::test]
    async fn a_device_in_the_middle_of_its_flow_may_cut_a_quiet_call_but_not_its_own() {
        let limits = displacing_limits(4);
        let local: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let addr = |i: u8| {
            (
                local,
                SocketAddr::from(([10, 0, 0, 2], 40_000 + u16::from(i))),
            )
        };
        let (device, subscriber) = (ClientKind::Device, ClientKind::Other);
        // Devices 1, 2 and 3 and subscriber 4, each with one connection and a call in flight.
        let held: Vec<_> = (1..=4u8)
            .map(|c| {
                let kind = if c == 4 { subscriber } else { device };
                established_as(&limits, c, Some(addr(c)), kind)
            })
            .collect();
        let calls: Vec<_> = (1..=4u8)
            .map(|c| limits.call_started(addr(c)).unwrap())
            .collect();
        let now = limits.now_ms();
        // Device 1's own is the quietest, then the subscriber's, then device 2's.
        for (c, ago) in [(0, 50_000), (3, 45_000), (1, 40_000), (2, 30_000)] {
            held[c].1.heard_ms.store(now - ago, Ordering::Relaxed);
        }
        let finished = || held.iter().filter(|(r, _, _)| r.is_finished()).count();
        assert_eq!(
            limits.admit(None, Some([9; 32]), device).await.unwrap_err(),
            "limit",
            "a fresh newcomer cuts no client's only call"
        );
        assert_eq!(
            limits
                .admit(None, Some([4; 32]), subscriber)
                .await
                .unwrap_err(),
            "limit",
            "a subscriber holding one cuts no client's only call"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(finished(), 0);
        assert_eq!(limits.open(), 4);
        let started = std::time::Instant::now();
        let next = limits.admit(None, Some([1; 32]), device).await.unwrap();
        assert!(started.elapsed() < DRAIN / 2, "a quiet call is cut at once");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(held[1].0.is_finished(), "device 2's quiet call cut");
        assert!(!held[0].0.is_finished(), "not the newcomer's own");
        assert!(!held[3].0.is_finished(), "not the subscriber's");
        assert_eq!(finished(), 1);
        drop((next, calls));
    }

    /// A connection displaced while calls are in flight on it is not cut at once: new calls
    /// on it are refused ([`Displaced`], not counted), and it breaks once its last call has
    /// ended ([`SETTLE`] later), or [`DRAIN`] after its displacement when a call never ends;
    /// the newcomer gets its place then. (Round 8's C1: a client over its fair share lost its
    /// calls in flight, their answers cut mid-way.)
    #[tokio::test]
    async fn a_displaced_connection_ends_its_calls_in_flight_and_refuses_new_ones() {
        let limits = displacing_limits(64);
        let local: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let addr = |i: u16| (local, SocketAddr::from(([10, 0, 0, 3], 40_000 + i)));
        // Client 1 holds 8 (its eighth), each with a call in flight, 56 others one each: the
        // limit. A fresh newcomer's fair share is 4: client 1 is over it.
        let heavy: Vec<_> = (0..8u16)
            .map(|i| established_at(&limits, 1, Some(addr(i))))
            .collect();
        let mut calls: Vec<_> = (0..8u16)
            .map(|i| limits.call_started(addr(i)).unwrap())
            .collect();
        let others: Vec<_> = (0..56u8)
            .map(|c| established_at(&limits, 10 + c, None))
            .collect();
        assert_eq!(limits.open(), 64);
        let now = limits.now_ms();
        // Connections 0 and 1 of client 1 the quietest: the first two to make way.
        heavy[0].1.heard_ms.store(now - 2_000, Ordering::Relaxed);
        heavy[1].1.heard_ms.store(now - 1_000, Ordering::Relaxed);
        let admit = |c: u8| {
            let limits = limits.clone();
            tokio::spawn(async move { limits.admit(None, Some([c; 32]), ClientKind::Other).await })
        };
        let short = Duration::from_millis(300);

        // Its call ends: it breaks then, and the newcomer is seated.
        let first = admit(200);
        tokio::time::sleep(short).await;
        assert!(
            !heavy[0].0.is_finished(),
            "kept while its call is in flight"
        );
        assert!(!first.is_finished(), "the newcomer waits for the place");
        assert!(matches!(limits.call_started(addr(0)), Err(Displaced)));
        assert_eq!(heavy[0].1.calls.load(Ordering::Relaxed), 1, "not counted");
        assert!(
            limits.call_started(addr(2)).unwrap().is_some(),
            "others served"
        );
        // How long until connection `i` of client 1 breaks (at most NEVER).
        let broken_in = |i: usize| {
            let reader = &heavy[i].0;
            async move {
                let a = std::time::Instant::now();
                while !reader.is_finished() && a.elapsed() < NEVER {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                a.elapsed()
            }
        };
        calls[0].take();
        assert!(
            broken_in(0).await < short,
            "broken soon after its call ended"
        );
        let first = tokio::time::timeout(NEVER, first).await.unwrap().unwrap();
        assert!(first.is_ok(), "the newcomer seated");

        // A call that never ends: broken after the drain.
        let second = admit(201);
        tokio::time::sleep(short).await;
        assert!(
            !heavy[1].0.is_finished(),
            "kept while its call is in flight"
        );
        let second = tokio::time::timeout(NEVER, second).await.unwrap().unwrap();
        assert!(second.is_ok(), "the newcomer seated");
        assert!(broken_in(1).await < short, "broken after the drain");
        let finished = |v: &[(tokio::task::JoinHandle<_>, Arc<Liveness>, _)]| {
            v.iter().filter(|(r, _, _)| r.is_finished()).count()
        };
        assert_eq!(finished(&heavy), 2);
        assert_eq!(finished(&others), 0, "nobody else displaced");
        drop((calls, first, second));
    }

    /// A client is its certificate's public key: another encoding of one certificate (here
    /// its signature changed, which no parser checks) is the same client (the sixth outside
    /// attack: `s` replaced by `n - s` made a second client of one certificate), another
    /// key another client.
    #[test]
    fn a_client_is_its_public_key_not_its_certificates_encoding() {
        let a = rcgen::generate_simple_self_signed(vec!["a".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["a".into()]).unwrap();
        let der = a.cert.der().to_vec();
        let mut twin = der.clone();
        let last = twin.len() - 1;
        twin[last] ^= 1;
        let id = |d: &[u8]| cert_id(&[rustls::pki_types::CertificateDer::from(d.to_vec())]);
        assert!(id(&der).is_some());
        assert_eq!(id(&der), id(&twin));
        assert_ne!(id(&der), id(b.cert.der()));
        assert_eq!(id(b"not a certificate"), None);
    }

    /// Starts a pretend handshake from `peer` that never ends by itself (its task is
    /// returned, to see whether it was dropped); `hello`: its ClientHello came.
    fn pending(
        limits: &ConnectionLimits,
        peer: IpAddr,
        hello: bool,
    ) -> tokio::task::JoinHandle<()> {
        pending_with(limits, peer, hello, None)
    }

    /// [`pending`] with a probe of a real socket.
    fn pending_with(
        limits: &ConnectionLimits,
        peer: IpAddr,
        hello: bool,
        probe: Option<std::net::TcpStream>,
    ) -> tokio::task::JoinHandle<()> {
        let mut handle = None;
        limits.begin_handshake(Some(peer), probe, |id| {
            let t = tokio::spawn(std::future::pending::<()>());
            let a = t.abort_handle();
            handle = Some((t, id));
            a
        });
        let (t, id) = handle.unwrap();
        if hello {
            limits.hello(id);
        }
        t
    }

    /// Makes every handshake in progress look older than [`SILENT_GRACE`].
    fn age_all(limits: &ConnectionLimits) {
        age(limits, SILENT_GRACE * 2);
    }

    /// Makes every handshake in progress look `by` older (its connection and its ClientHello).
    fn age(limits: &ConnectionLimits, by: Duration) {
        let mut h = limits.handshakes.lock().unwrap();
        for p in h.pending.iter_mut() {
            p.started = p.started.checked_sub(by).unwrap();
            p.hello_at = p.hello_at.map(|t| t.checked_sub(by).unwrap());
        }
    }

    /// One address in each of `n` IPv4 /16s.
    fn spread(n: usize) -> impl Iterator<Item = IpAddr> {
        (0..n).map(|i| IpAddr::from([20 + (i >> 8) as u8, i as u8, 0, 1]))
    }

    /// A flood of whole ClientHellos from a few hundred /16s, one handshake each (a botnet):
    /// a genuine client 20 ms after connecting, its ClientHello not yet come, is kept while
    /// the flood's handshakes, waiting longer, make way (the seventh outside attack: ties went
    /// to the prefix of the oldest silent handshake, the genuine one: 0-6 of 80 served).
    #[tokio::test]
    async fn a_client_before_its_client_hello_is_kept_in_a_flood_of_client_hellos_from_many_networks()
     {
        let limits = ConnectionLimits::new(4, 0);
        let flood: Vec<_> = spread(MAX_HANDSHAKES - 1)
            .map(|ip| pending(&limits, ip, true))
            .collect();
        // The flood's have waited 2 s since their ClientHellos, the genuine one 20 ms since
        // connecting (100 ms on the common scale; the margin is for the test's own time,
        // which counts five times for the genuine one: 1 s was not enough on a loaded
        // machine).
        age(&limits, Duration::from_millis(1980));
        let genuine = pending(&limits, IpAddr::from([192, 0, 2, 1]), false);
        age(&limits, Duration::from_millis(20));
        let newcomers: Vec<_> = spread(2 * MAX_HANDSHAKES)
            .skip(MAX_HANDSHAKES)
            .take(100)
            .map(|ip| pending(&limits, ip, true))
            .collect();
        assert_eq!(dropped(&[genuine]).await, 0, "the genuine one kept");
        assert_eq!(dropped(&flood).await, 100);
        assert_eq!(dropped(&newcomers).await, 0);
    }

    /// Genuine clients of one network (an office, a carrier's NAT) handshaking a few at once
    /// are not taken for a flood when a flood is spread over a few hundred /16s holding one
    /// each (the seventh outside attack: their /16, holding two or three, was the heaviest
    /// and lost 20-80 %); a prefix holding more than [`FEW_HANDSHAKES`] still makes way
    /// first, waiting or not.
    #[tokio::test]
    async fn clients_sharing_a_network_are_kept_in_a_flood_spread_over_many_networks() {
        let limits = ConnectionLimits::new(4, 0);
        let flood: Vec<_> = spread(MAX_HANDSHAKES - 3)
            .map(|ip| pending(&limits, ip, true))
            .collect();
        age(&limits, Duration::from_millis(300));
        let office: Vec<_> = (1..=3)
            .map(|i| pending(&limits, IpAddr::from([198, 51, 100, i]), true))
            .collect();
        let newcomers: Vec<_> = spread(2 * MAX_HANDSHAKES)
            .skip(MAX_HANDSHAKES)
            .take(100)
            .map(|ip| pending(&limits, ip, true))
            .collect();
        assert_eq!(dropped(&office).await, 0, "the office's kept");
        assert_eq!(dropped(&flood).await, 100);
        assert_eq!(dropped(&newcomers).await, 0);
        // A network holding more than FEW_HANDSHAKES: its own make way, although the
        // others have waited longer.
        let busy: Vec<_> = (0..=FEW_HANDSHAKES as u8)
            .map(|i| pending(&limits, IpAddr::from([203, 0, 113, i]), true))
            .collect();
        age(&limits, Duration::from_millis(300));
        let more: Vec<_> = (0..4)
            .map(|i| pending(&limits, IpAddr::from([203, 0, 113, 100 + i]), true))
            .collect();
        assert_eq!(dropped(&busy).await + dropped(&more).await, 4);
        assert_eq!(dropped(&office).await, 0);
    }

    /// A flood spread evenly over 16 /16s holding 16 each makes way at its own expense, not a
    /// genuine client's whose handshake has waited longer than the flood's (a 500 ms round
    /// trip): the eighth outside attack, against a prefix rule that waited for a prefix to
    /// hold more than 16 and its share (80-88 % of such genuine handshakes lost).
    #[tokio::test]
    async fn a_flood_spread_evenly_over_a_few_networks_makes_way_at_its_own_expense() {
        let limits = ConnectionLimits::new(4, 0);
        let genuine = pending(&limits, IpAddr::from([192, 0, 2, 1]), true);
        age(&limits, Duration::from_millis(300));
        let net = |i: usize| IpAddr::from([20 + (i % 16) as u8, 0, (i / 16) as u8, 1]);
        let flood: Vec<_> = (0..MAX_HANDSHAKES - 1)
            .map(|i| pending(&limits, net(i), true))
            .collect();
        age(&limits, Duration::from_millis(200));
        let newcomers: Vec<_> = (MAX_HANDSHAKES..MAX_HANDSHAKES + 100)
            .map(|i| pending(&limits, net(i), true))
            .collect();
        assert_eq!(dropped(&[genuine]).await, 0, "the genuine one kept");
        assert_eq!(dropped(&flood).await, 100);
        assert_eq!(dropped(&newcomers).await, 0);
    }

    /// A handshake silent for longer than the grace makes way first, before any prefix's; one
    /// whose ClientHello waits unread (its task has not run yet) is not taken for silent.
    #[tokio::test]
    async fn a_handshake_silent_past_the_grace_makes_way_first_and_unread_bytes_are_not_silence() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let connect = |bytes: &[u8]| {
            let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().unwrap();
            server.set_nonblocking(true).unwrap();
            client.write_all(bytes).unwrap();
            (client, server)
        };
        let (_quiet_client, quiet) = connect(b"");
        let (_genuine_client, genuine) = connect(b"\x16\x03\x01\x02\x00");
        while !genuine.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let limits = ConnectionLimits::new(4, 0);
        let quiet = pending_with(&limits, IpAddr::from([192, 0, 2, 9]), false, Some(quiet));
        let genuine = pending_with(&limits, IpAddr::from([192, 0, 2, 1]), false, Some(genuine));
        age_all(&limits);
        // Then whole ClientHellos, read, from one /16: after the silent one, the flood makes
        // way for itself.
        let flood: Vec<_> = (0..MAX_HANDSHAKES)
            .map(|i| pending(&limits, IpAddr::from([10, 1, 0, i as u8]), true))
            .collect();
        assert_eq!(
            dropped(std::slice::from_ref(&quiet)).await,
            1,
            "silent: dropped first"
        );
        assert_eq!(dropped(&[genuine]).await, 0, "its ClientHello waits: kept");
        assert_eq!(dropped(&flood).await, 1);
    }

    /// A genuine client whose ClientHello comes a while after its connection (a slow stack, a
    /// lost segment) is not dropped for a flood of ClientHellos from one address (the fifth
    /// and sixth outside attacks: with every silent handshake dropped first, 100 % of such
    /// clients lost at 300 ClientHellos/s).
    #[tokio::test]
    async fn a_slow_client_hello_is_not_dropped_for_a_flood_of_client_hellos() {
        let limits = ConnectionLimits::new(4, 0);
        let slow = pending(&limits, IpAddr::from([192, 0, 2, 1]), false);
        let flood: Vec<_> = (0..MAX_HANDSHAKES * 2)
            .map(|_| pending(&limits, IpAddr::from([10, 1, 0, 1]), true))
            .collect();
        assert_eq!(dropped(&[slow]).await, 0);
        assert_eq!(dropped(&flood).await, MAX_HANDSHAKES + 1);
    }

    /// How many of `tasks` were dropped (an aborted task ends when the runtime next polls it).
    async fn dropped(tasks: &[tokio::task::JoinHandle<()>]) -> usize {
        tokio::time::sleep(Duration::from_millis(200)).await;
        tasks.iter().filter(|t| t.is_finished()).count()
    }

    /// A flood that sends no ClientHello makes way first, whatever its addresses: each of
    /// its connections from a prefix of its own (the fourth outside attack's bypass of the
    /// per-address rule: ~1,000 addresses, 60-90 % of genuine calls failed), a genuine
    /// client whose ClientHello came is kept, oldest or not.
    #[tokio::test]
    async fn handshakes_without_a_client_hello_make_way_first() {
        let limits = ConnectionLimits::new(4, 0);
        let genuine = pending(&limits, IpAddr::from([192, 0, 2, 1]), true);
        let flood: Vec<_> = (0..MAX_HANDSHAKES * 4)
            .map(|i| {
                pending(
                    &limits,
                    IpAddr::from([20 + (i >> 8) as u8, i as u8, 0, 1]),
                    false,
                )
            })
            .collect();
        let late = pending(&limits, IpAddr::from([198, 51, 100, 7]), true);
        assert_eq!(limits.handshakes(), MAX_HANDSHAKES);
        assert_eq!(dropped(&[genuine, late]).await, 0, "the genuine ones kept");
        assert_eq!(dropped(&flood).await, flood.len() - (MAX_HANDSHAKES - 2));
    }

    /// A flood that sends whole ClientHellos makes way at the expense of the widest prefix
    /// holding the most, then the narrower within it: from a thousand addresses of one IPv4
    /// /16 it drops only its own, not a genuine client's nor a NATted address's several
    /// handshakes (the fourth attack's F2: an address with two in progress was the first
    /// dropped once the flood spread over more addresses); an IPv6 /48 is one prefix too.
    #[tokio::test]
    async fn a_flood_of_client_hellos_makes_way_at_its_own_prefixes_expense() {
        let limits = ConnectionLimits::new(4, 0);
        let mut kept = vec![pending(&limits, IpAddr::from([192, 0, 2, 1]), true)];
        // A NAT: three handshakes from one address.
        for _ in 0..3 {
            kept.push(pending(&limits, IpAddr::from([198, 51, 100, 7]), true));
        }
        // Three /64s of one IPv6 /48 and a thousand addresses of one IPv4 /16.
        let v6: Vec<_> = (0..MAX_HANDSHAKES)
            .map(|i| {
                let mut a = [0x20, 0x01, 0x0d, 0xb8, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
                a[7] = (i % 3) as u8;
                a[15] = i as u8;
                pending(&limits, IpAddr::from(a), true)
            })
            .collect();
        let v4: Vec<_> = (0..1000)
            .map(|i| {
                pending(
                    &limits,
                    IpAddr::from([10, 1, (i >> 8) as u8, i as u8]),
                    true,
                )
            })
            .collect();
        assert_eq!(limits.handshakes(), MAX_HANDSHAKES);
        assert_eq!(dropped(&kept).await, 0, "the others kept");
        // The two floods' prefixes end sharing what the others leave: each made way for the
        // other until they held about as many (the newcomer is counted after the choice).
        let v6_left = v6.len() - dropped(&v6).await;
        let v4_left = v4.len() - dropped(&v4).await;
        assert_eq!(v6_left + v4_left, MAX_HANDSHAKES - kept.len());
        assert!(v6_left.abs_diff(v4_left) <= 2, "{v6_left} {v4_left}");
        // IPv4-mapped IPv6 is its IPv4 address; the prefixes.
        assert_eq!(
            prefix("::ffff:192.0.2.1".parse().unwrap(), 2),
            IpAddr::from([192, 0, 2, 1])
        );
        assert_eq!(
            prefix("::ffff:192.0.2.1".parse().unwrap(), 0),
            IpAddr::from([192, 0, 0, 0])
        );
        assert_eq!(
            prefix("2001:db8:7:1:2:3:4:5".parse().unwrap(), 1),
            "2001:db8:7::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            prefix("2001:db8:7:1:2:3:4:5".parse().unwrap(), 2),
            "2001:db8:7:1::".parse::<IpAddr>().unwrap()
        );
    }

    /// Past MAX_HANDSHAKES in progress, the oldest is dropped for the newcomer; one that
    /// ended is no longer counted.
    #[tokio::test]
    async fn the_oldest_handshake_makes_way_for_a_new_one() {
        let limits = ConnectionLimits::new(4, 0);
        let mut tasks = Vec::new();
        let mut start = |limits: &ConnectionLimits| {
            let mut handle = None;
            limits.begin_handshake(None, None, |_| {
                let t = tokio::spawn(std::future::pending::<()>());
                let a = t.abort_handle();
                handle = Some(t);
                a
            });
            tasks.extend(handle);
        };
        for _ in 0..MAX_HANDSHAKES {
            start(&limits);
        }
        assert_eq!(limits.handshakes(), MAX_HANDSHAKES);
        start(&limits);
        assert_eq!(limits.handshakes(), MAX_HANDSHAKES);
        let first = tasks.remove(0).await.unwrap_err();
        assert!(first.is_cancelled(), "the oldest was dropped");
        for t in &tasks {
            assert!(!t.is_finished(), "only the oldest");
        }
        // A handshake that ends is no longer in progress.
        limits.begin_handshake(None, None, |id| {
            let l = limits.clone();
            tokio::spawn(async move { l.end_handshake(id) }).abort_handle()
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(limits.handshakes(), MAX_HANDSHAKES - 1);
        for t in tasks.iter().skip(1) {
            assert!(
                !t.is_finished(),
                "room was made by the ended one, not by dropping"
            );
        }
    }
}
