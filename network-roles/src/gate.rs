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
fn decide<B>(req: &http::Request<B>, anchors: &TrustAnchors) -> Result<Authorized, Status> {
    let chain = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let leaf = chain
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let caller = mcim_pki::party::caller_from_cert(leaf)
        .map_err(|e| Status::unauthenticated(e.to_string()))?;
    // Each anchor vouches only for the roles it may issue: the supplier root for devices,
    // each operator's CA for that operator's roles (annex x.3).
    if !anchors.vouches(&chain, caller.role) {
        tracing::warn!(role = %caller.role, name = %caller.name, "refused: the certificate's issuer may not issue {} certificates", caller.role);
        return Err(Status::unauthenticated(format!(
            "the certificate's issuer may not issue {} certificates",
            caller.role
        )));
    }
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
    anchors: Arc<TrustAnchors>,
}

impl Gate {
    /// The gate, trusting each of `anchors` for its roles only.
    pub fn new(anchors: TrustAnchors) -> Self {
        Self {
            anchors: Arc::new(anchors),
        }
    }
}

impl<S> tower::Layer<S> for Gate {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Gated<S> {
        Gated {
            inner,
            anchors: self.anchors.clone(),
        }
    }
}

/// A service behind the gate.
#[derive(Clone, Debug)]
pub struct Gated<S> {
    inner: S,
    anchors: Arc<TrustAnchors>,
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
        match decide(&req, &self.anchors) {
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
