//! The authorization layer in front of every role's server (TR 33.812 annex x.3): for each
//! call, the caller from its verified mutual-TLS certificate and the rule of
//! [`crate::authz`] for the request's method, decided before any handler runs.
//!
//! - no usable client certificate: UNAUTHENTICATED;
//! - a method without a rule, or a role the rule does not list: PERMISSION_DENIED;
//! - otherwise the decision ([`Authorized`]) rides in the request's extensions, and the
//!   handler reads it with [`authorized`] and checks the owner of what it loaded with
//!   [`Authorized::owns`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Status};

use mcim_pki::TrustAnchors;

use crate::authz::{self, Caller, Rule};
use crate::error::RoleError;

/// The gate's decision for one call.
#[derive(Clone, Debug)]
pub struct Authorized {
    /// Who is calling.
    pub caller: Caller,
    /// The rule that let them.
    pub rule: &'static Rule,
}

impl Authorized {
    /// The object the call touches belongs to `owner` (a PCID, an SHO, a subscriber): refused
    /// when the rule says it must be the caller's and it is another party's.
    pub fn owns(&self, owner: &str) -> Result<(), RoleError> {
        authz::check_owner(&self.caller, self.rule, owner).map_err(|d| {
            tracing::warn!(role = %self.caller.role, name = %self.caller.name, method = self.rule.method, "denied: {d}");
            RoleError::denied(d.to_string())
        })
    }
}

/// The gate's decision for `req` (INTERNAL when the server runs without the gate: fail
/// closed).
pub fn authorized<T>(req: &Request<T>) -> Result<Authorized, RoleError> {
    req.extensions()
        .get::<Authorized>()
        .cloned()
        .ok_or_else(|| RoleError::internal("the call did not pass the authorization layer"))
}

/// The caller and rule for an HTTP/2 request of a gRPC call, or the refusal.
fn decide<B>(req: &http::Request<B>, known: &Vouched) -> Result<Authorized, Status> {
    let chain = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let caller = known.caller(&chain)?;
    let method = req.uri().path();
    match authz::decide(&caller, method) {
        Ok(rule) => {
            tracing::info!(role = %caller.role, name = %caller.name, method, "call");
            Ok(Authorized { caller, rule })
        }
        Err(d) => {
            tracing::warn!(role = %caller.role, name = %caller.name, method, "denied: {d}");
            Err(Status::permission_denied(d.to_string()))
        }
    }
}

/// The gate's judgments of certificate chains. The TLS handshake verified each chain to some
/// trusted root; the gate then checks that the root may issue the role the leaf claims
/// ([`TrustAnchors::vouches`]: parsing the chain and the anchors and ECDSA verifications, 12 %
/// of the roles' CPU in a fleet run when it was done for every call). The answer depends on
/// the chain's bytes and the anchors alone, so it is remembered under the chain's SHA-256 for
/// the next calls on that connection and the next connections of that caller: the callers of
/// chains that passed, and, apart (so that refused chains never push out good ones), the
/// refusals, so that a peer repeating a refused chain's calls costs a hash each. Bounded:
/// each map starts over when full.
#[derive(Debug)]
struct Vouched {
    anchors: TrustAnchors,
    known: std::sync::Mutex<Judged>,
}

/// What [`Vouched`] remembers.
#[derive(Debug, Default)]
struct Judged {
    passed: std::collections::HashMap<[u8; 32], Caller>,
    refused: std::collections::HashMap<[u8; 32], String>,
}

/// How many chains that passed [`Vouched`] remembers (a few MB at most).
const VOUCHED_CAPACITY: usize = 16_384;

/// How many refused chains [`Vouched`] remembers.
const REFUSED_CAPACITY: usize = 4_096;

impl Vouched {
    fn new(anchors: TrustAnchors) -> Self {
        Self {
            anchors,
            known: std::sync::Mutex::default(),
        }
    }

    /// The caller the leaf of `chain` names, if its issuer may vouch for that role.
    fn caller<C: AsRef<[u8]>>(&self, chain: &[C]) -> Result<Caller, Status> {
        let mut h = ring::digest::Context::new(&ring::digest::SHA256);
        for c in chain {
            let c = c.as_ref();
            h.update(&u64::try_from(c.len()).unwrap_or(u64::MAX).to_be_bytes());
            h.update(c);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(h.finish().as_ref());
        {
            let known = self.lock();
            if let Some(c) = known.passed.get(&key) {
                return Ok(c.clone());
            }
            if let Some(why) = known.refused.get(&key) {
                return Err(Status::unauthenticated(why.clone()));
            }
        }
        match self.judge(chain) {
            Ok(caller) => {
                let mut known = self.lock();
                if known.passed.len() >= VOUCHED_CAPACITY {
                    known.passed.clear();
                }
                known.passed.insert(key, caller.clone());
                Ok(caller)
            }
            Err(why) => {
                let mut known = self.lock();
                if known.refused.len() >= REFUSED_CAPACITY {
                    known.refused.clear();
                }
                known.refused.insert(key, why.clone());
                Err(Status::unauthenticated(why))
            }
        }
    }

    /// The caller of `chain`, or why it is refused.
    fn judge<C: AsRef<[u8]>>(&self, chain: &[C]) -> Result<Caller, String> {
        let leaf = chain
            .first()
            .ok_or_else(|| "no client certificate".to_string())?;
        let caller = mcim_pki::party::caller_from_cert(leaf.as_ref()).map_err(|e| e.to_string())?;
        // Each anchor vouches only for the roles it may issue: the supplier root for devices,
        // each operator's CA for that operator's roles (annex x.3).
        if !self.anchors.vouches(chain, caller.role) {
            tracing::warn!(role = %caller.role, name = %caller.name, certificates = chain.len(), "refused: the certificate's issuer may not issue {} certificates", caller.role);
            return Err(format!(
                "the certificate's issuer may not issue {} certificates",
                caller.role
            ));
        }
        Ok(caller)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Judged> {
        // A panic while holding it left maps of complete entries: still usable.
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A request whose message cannot be decoded is the caller's fault: INVALID_ARGUMENT, logged
/// (tonic answers INTERNAL, with the decoder's words naming our message fields).
fn undecodable_is_invalid_argument(
    response: &mut http::Response<tonic::body::Body>,
    a: &Authorized,
) {
    let headers = response.headers_mut();
    let internal = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"13");
    let decode = headers.get("grpc-message").is_some_and(|m| {
        let m = m.as_bytes();
        m.starts_with(b"failed%20to%20decode") || m.starts_with(b"failed to decode")
    });
    if internal && decode {
        tracing::warn!(
            role = %a.caller.role,
            name = %a.caller.name,
            method = a.rule.method,
            "refused: the request message cannot be decoded"
        );
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static("the%20request%20message%20cannot%20be%20decoded"),
        );
    }
}

/// The layer: `Server::builder().layer(Gate::new(anchors))`.
#[derive(Clone, Debug)]
pub struct Gate {
    known: Arc<Vouched>,
}

impl Gate {
    /// The gate, trusting each of `anchors` for its roles only.
    pub fn new(anchors: TrustAnchors) -> Self {
        Self {
            known: Arc::new(Vouched::new(anchors)),
        }
    }

    /// Who `chain` (a connection's client certificates) is for the acceptor's limits: an
    /// operator role's (the supplier, an RO, a VNO, a SHO or a PVA), a device's, each vouched
    /// for by an anchor that may issue it, or anyone else's (remembered like every judgment
    /// of the gate; the connection's first call finds it). The acceptor keeps places for the
    /// operators beyond the devices' and subscribers' limit, and lets a device in the middle
    /// of its flow cut a quiet call ([`crate::tls::ConnectionLimits`]).
    pub fn client_kind<C: AsRef<[u8]>>(&self, chain: &[C]) -> crate::tls::ClientKind {
        use crate::tls::ClientKind;
        use authz::Role;
        match self.known.caller(chain).map(|c| c.role) {
            Ok(Role::Supplier | Role::Ro | Role::Vno | Role::Sho | Role::Pva) => {
                ClientKind::Operator
            }
            Ok(Role::Device) => ClientKind::Device,
            Ok(Role::Subscriber) | Err(_) => ClientKind::Other,
        }
    }
}

impl<S> tower::Layer<S> for Gate {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Gated<S> {
        Gated {
            inner,
            known: self.known.clone(),
        }
    }
}

/// A service behind the gate.
#[derive(Clone, Debug)]
pub struct Gated<S> {
    inner: S,
    known: Arc<Vouched>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Gated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        match decide(&req, &self.known) {
            Ok(a) => {
                req.extensions_mut().insert(a.clone());
                let answer = self.inner.call(req);
                Box::pin(async move {
                    let mut response = answer.await?;
                    undecodable_is_invalid_argument(&mut response, &a);
                    Ok(response)
                })
            }
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcim_pki::Role;

    fn der(pem: &str) -> Vec<u8> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .map(|c| c.to_vec())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A lab PKI directory (every party's CA, the supplier root) and its trust anchors.
    fn lab_pki() -> (tempfile::TempDir, TrustAnchors) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        mcim_pki::dev::init(dir.path(), &mcim_pki::dev::LAB_PARTIES)
            .unwrap_or_else(|e| panic!("{e}"));
        let anchors = mcim_pki::dev::trust_anchors(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        (dir, anchors)
    }

    fn known_len(v: &Vouched) -> usize {
        v.lock().passed.len()
    }

    fn refused_len(v: &Vouched) -> usize {
        v.lock().refused.len()
    }

    /// A chain that passed is remembered and answered the same; a chain whose issuer may not
    /// issue its role is refused every time, and remembered apart as refused; a chain that
    /// differs in one octet is judged afresh.
    #[test]
    fn only_vouched_chains_are_remembered_and_each_is_judged_by_its_own_bytes() {
        let (dir, anchors) = lab_pki();
        let v = Vouched::new(anchors);
        let sho = mcim_pki::dev::ca_der(dir.path(), "sho").unwrap_or_else(|e| panic!("{e}"));
        let first = v
            .caller(std::slice::from_ref(&sho))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(first.role, Role::Sho);
        assert_eq!(known_len(&v), 1);
        let again = v
            .caller(std::slice::from_ref(&sho))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((again.role, again.name), (first.role, first.name));
        assert_eq!(known_len(&v), 1);

        // An SHO certificate from the VNO's CA: refused, twice, and not remembered as passed.
        let (forged, _) =
            mcim_pki::dev::issue_party_under(dir.path(), "ca-vno", Role::Sho, "sho.mcim.local")
                .unwrap_or_else(|e| panic!("{e}"));
        let forged = der(&forged);
        for _ in 0..2 {
            let e = v.caller(std::slice::from_ref(&forged)).err();
            assert_eq!(e.map(|s| s.code()), Some(tonic::Code::Unauthenticated));
        }
        assert_eq!(refused_len(&v), 1);
        // Nor does the genuine certificate appended to it make it pass.
        let e = v.caller(&[forged.clone(), sho.clone()]).err();
        assert_eq!(e.map(|s| s.code()), Some(tonic::Code::Unauthenticated));
        assert_eq!(known_len(&v), 1);
        assert_eq!(refused_len(&v), 2);

        // The genuine certificate with one octet of its signature changed is another chain.
        let mut bent = sho.clone();
        let last = bent.len() - 1;
        bent[last] ^= 1;
        assert!(v.caller(std::slice::from_ref(&bent)).is_err());
        assert_eq!(known_len(&v), 1);
        assert!(v.caller(&[] as &[Vec<u8>]).is_err());
    }

    /// The acceptor's classification follows the gate's judgment, not the leaf's claim: an
    /// operator role's chain is an operator's, a supplier-certified device's a device's; a
    /// subscriber's, and a device or SHO certificate from an issuer that may not issue it
    /// (here the subscribers' CA), are neither.
    #[test]
    fn a_chains_kind_is_the_role_its_issuer_may_vouch_for() {
        use crate::tls::ClientKind;
        let (dir, anchors) = lab_pki();
        let gate = Gate::new(anchors);
        let kind = |pem: &str| gate.client_kind(&[der(pem)]);
        let (sho, _) = mcim_pki::dev::issue_party(dir.path(), Role::Sho, "sho.mcim.local")
            .unwrap_or_else(|e| panic!("{e}"));
        let (device, _) = mcim_pki::dev::issue_software_device(dir.path(), "pcid-1")
            .unwrap_or_else(|e| panic!("{e}"));
        let (subscriber, _) =
            mcim_pki::dev::issue_party(dir.path(), Role::Subscriber, "alice.example")
                .unwrap_or_else(|e| panic!("{e}"));
        let forge = |role| {
            mcim_pki::dev::issue_party_under(dir.path(), "ca-subscriber", role, "pcid-2")
                .map(|(cert, _)| cert)
                .unwrap_or_else(|e| panic!("{e}"))
        };
        assert_eq!(kind(&sho), ClientKind::Operator);
        assert_eq!(kind(&device), ClientKind::Device);
        assert_eq!(kind(&subscriber), ClientKind::Other);
        assert_eq!(kind(&forge(Role::Device)), ClientKind::Other);
        assert_eq!(kind(&forge(Role::Sho)), ClientKind::Other);
        assert_eq!(gate.client_kind(&[] as &[Vec<u8>]), ClientKind::Other);
    }

    #[test]
    fn a_full_memory_starts_over_and_refusals_never_push_out_passed_chains() {
        let (dir, anchors) = lab_pki();
        let v = Vouched::new(anchors);
        {
            let mut known = v.lock();
            for i in 0..REFUSED_CAPACITY {
                let mut k = [0u8; 32];
                k[..8].copy_from_slice(&(i as u64).to_be_bytes());
                known.refused.insert(k, "no".into());
            }
            let known = &mut known.passed;
            for i in 0..VOUCHED_CAPACITY {
                let mut k = [0u8; 32];
                k[..8].copy_from_slice(&(i as u64).to_be_bytes());
                known.insert(
                    k,
                    Caller {
                        role: Role::Device,
                        name: format!("{i}"),
                    },
                );
            }
        }
        let sho = mcim_pki::dev::ca_der(dir.path(), "sho").unwrap_or_else(|e| panic!("{e}"));
        assert!(v.caller(std::slice::from_ref(&sho)).is_ok());
        assert_eq!(known_len(&v), 1);
        // A refusal when the refusals are full: they start over; the passed chain stays.
        let (forged, _) =
            mcim_pki::dev::issue_party_under(dir.path(), "ca-vno", Role::Sho, "sho.mcim.local")
                .unwrap_or_else(|e| panic!("{e}"));
        assert!(v.caller(&[der(&forged)]).is_err());
        assert_eq!(refused_len(&v), 1);
        assert_eq!(known_len(&v), 1);
    }
}
