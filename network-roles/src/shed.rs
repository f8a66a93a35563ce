//! Overload (issue 16 item 5): past `max_calls` calls in flight from devices and subscribers,
//! a role answers at once with RESOURCE_EXHAUSTED and a retry hint, instead of queueing the
//! call until the caller's deadline passes. The hint is gRPC's own server pushback
//! (`grpc-retry-pushback-ms`, gRPC A6), jittered so that a fleet told to wait does not come
//! back in step. A refused call never reached its handler: retrying it is always safe.
//!
//! Calls between roles (an SHO asking the PVA, the RO asking an SHO) are not shed: they are
//! few, each serves a device's call already admitted, and refusing them would fail work half
//! done. A long-lived stream (the RO's task stream) holds its slot only until its headers go
//! out.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Semaphore;
use tonic::codegen::http;

use crate::gate::Authorized;
use mcim_pki::Role;

/// The pushback's floor and spread, in milliseconds: a refused caller waits 100-400 ms, more
/// the longer the queue of refusals it is in.
const PUSHBACK_MS: (u64, u64) = (100, 300);

/// The layer: at most `max_calls` device and subscriber calls in flight.
#[derive(Clone, Debug)]
pub struct Shed {
    slots: Arc<Semaphore>,
    max_calls: usize,
}

impl Shed {
    /// At most `max_calls` (at least 1) calls from devices and subscribers at once.
    pub fn new(max_calls: usize) -> Self {
        let max_calls = max_calls.max(1);
        Self {
            slots: Arc::new(Semaphore::new(max_calls)),
            max_calls,
        }
    }
}

impl<S> tower::Layer<S> for Shed {
    type Service = ShedService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ShedService {
            inner,
            shed: self.clone(),
        }
    }
}

/// The service [`Shed`] makes.
#[derive(Clone, Debug)]
pub struct ShedService<S> {
    inner: S,
    shed: Shed,
}

/// The answer to a shed call: trailers-only RESOURCE_EXHAUSTED with the pushback.
fn refusal<RB: Default>(max_calls: usize) -> http::Response<RB> {
    let ms = PUSHBACK_MS.0 + rand::random::<u64>() % (PUSHBACK_MS.1 + 1);
    let mut r = http::Response::new(RB::default());
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", http::HeaderValue::from_static("8"));
    if let Ok(v) = http::HeaderValue::from_str(&format!(
        "overloaded: {max_calls} calls in flight; retry after {ms} ms"
    )) {
        h.insert("grpc-message", v);
    }
    h.insert("grpc-retry-pushback-ms", http::HeaderValue::from(ms));
    r
}

impl<S, B, RB> tower::Service<http::Request<B>> for ShedService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let from_the_field = req
            .extensions()
            .get::<Authorized>()
            .is_some_and(|a| matches!(a.caller.role, Role::Device | Role::Subscriber));
        if !from_the_field {
            return Box::pin(self.inner.call(req));
        }
        let Ok(slot) = self.shed.slots.clone().try_acquire_owned() else {
            let max = self.shed.max_calls;
            return Box::pin(async move { Ok(refusal(max)) });
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            drop(slot);
            r
        })
    }
}
