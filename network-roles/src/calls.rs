//! Calls in flight on each connection: a layer in front of every role's server that counts a
//! call from its request until its answer ends (a unary answer, or a stream such as a
//! device's task stream or a long poll) against the connection it came on
//! ([`crate::tls::ConnectionLimits::call_started`]), so that a full acceptor making room for a
//! newcomer tells a connection the server owes an answer from an idle keep-alive one.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::tls::{CallInFlight, ConnectionLimits};

/// The layer: `Server::builder().layer(Calls::new(limits))`, first (outermost), so that a
/// call refused by a later layer is counted too while it is answered.
#[derive(Clone, Debug)]
pub struct Calls {
    limits: ConnectionLimits,
}

impl Calls {
    /// Counts calls on the connections `limits` holds.
    pub fn new(limits: ConnectionLimits) -> Self {
        Self { limits }
    }
}

impl<S> tower::Layer<S> for Calls {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            limits: self.limits.clone(),
        }
    }
}

/// A service whose calls are counted ([`Calls`]).
#[derive(Clone, Debug)]
pub struct Counted<S> {
    inner: S,
    limits: ConnectionLimits,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: http_body::Body + Send + 'static,
{
    type Response = http::Response<InFlightBody<RB>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let call = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.get_ref().local_addr().zip(i.get_ref().remote_addr()))
            .and_then(|addr| self.limits.call_started(addr));
        let answer = self.inner.call(req);
        Box::pin(async move {
            // Dropped with the call when the handler fails or the client goes away first.
            let response = answer.await?;
            Ok(response.map(|inner| InFlightBody { inner, call }))
        })
    }
}

pin_project_lite::pin_project! {
    /// An answer's body: its call is in flight until the body ends or is dropped.
    pub struct InFlightBody<B> {
        #[pin]
        inner: B,
        call: Option<CallInFlight>,
    }
}

impl<B: http_body::Body> http_body::Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        // The trailers (gRPC's status), the end or a break: the call is over.
        if let Poll::Ready(Some(Ok(f))) = &frame
            && !f.is_trailers()
        {
            return frame;
        }
        if frame.is_ready() {
            this.call.take();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
