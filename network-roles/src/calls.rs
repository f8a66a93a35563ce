//! Calls in flight on each connection: a layer in front of every role's server that counts a
//! call from its request until its answer ends (a unary answer, or a stream such as a
//! device's task stream or a long poll) against the connection it came on
//! ([`crate::tls::ConnectionLimits::call_started`]), so that a full acceptor making room for a
//! newcomer tells a connection the server owes an answer from an idle keep-alive one. A call
//! on a connection a newcomer displaced is refused at once with UNAVAILABLE and a retry hint
//! (the connection breaks once its calls in flight end: [`crate::tls`]'s drain), as HTTP/2's
//! GOAWAY would: the client retries on a new connection, the call never reached a handler.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::tls::{CallInFlight, ConnectionLimits, Displaced};

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
        let call = match req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.get_ref().local_addr().zip(i.get_ref().remote_addr()))
            .map(|addr| self.limits.call_started(addr))
        {
            Some(Err(Displaced)) => {
                mcim_telemetry::metrics::count(
                    "calls_refused",
                    "Calls refused before any handler, by why (displaced: on a connection \
                     displaced for a newcomer, while its calls in flight end)",
                    "displaced",
                );
                let answer = crate::shed::told_to_retry::<()>(|ms| {
                    tonic::Status::unavailable(format!(
                        "this connection was displaced for a newcomer (the server holds as \
                         many connections as allowed): retry after {ms} ms on a new one"
                    ))
                });
                // Trailers-only: the status is in the headers, the body is empty.
                return Box::pin(async move {
                    Ok(answer.map(|()| InFlightBody {
                        inner: None,
                        call: None,
                    }))
                });
            }
            Some(Ok(call)) => call,
            None => None,
        };
        let answer = self.inner.call(req);
        Box::pin(async move {
            // Dropped with the call when the handler fails or the client goes away first.
            let response = answer.await?;
            Ok(response.map(|inner| InFlightBody {
                inner: Some(inner),
                call,
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// An answer's body: its call is in flight until the body ends or is dropped. None: the
    /// empty body of a refusal before any handler.
    pub struct InFlightBody<B> {
        #[pin]
        inner: Option<B>,
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
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(None);
        };
        let frame = inner.poll_frame(cx);
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
        self.inner.as_ref().is_none_or(B::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| http_body::SizeHint::with_exact(0), B::size_hint)
    }
}
