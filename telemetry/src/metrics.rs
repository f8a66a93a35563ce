//! Prometheus metrics for `tred` and `mcim-roles` (issue 16 item 6): a registry of the
//! process's metrics, a tower layer that counts every gRPC call by method and status code and
//! times it, and an HTTP listener that serves them in the text format at `/metrics`.
//!
//! The gRPC status is read where gRPC puts it: the `grpc-status` header of a trailers-only
//! answer (a refusal before any message), else the trailers at the end of the body. A call
//! whose body ends without a status (the client went away) counts as `CANCELLED`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The labels of a gRPC call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `/package.Service/Method`.
    pub method: String,
    /// The gRPC status code's name (`OK`, `NOT_FOUND`, ...).
    pub code: String,
}

/// The labels of a method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// `/package.Service/Method`.
    pub method: String,
}

/// One label: an outcome (of a provisioning run, an AKA, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// What happened.
    pub outcome: String,
}

/// One label: a name (a role's database, a queue).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabels {
    /// Which.
    pub name: String,
}

/// A process's metrics: the gRPC calls it served, and what its code registers beside them.
pub struct Metrics {
    registry: std::sync::Mutex<Registry>,
    calls: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Histogram>,
    /// Gauge families by name, registered on first use.
    gauges: std::sync::Mutex<std::collections::HashMap<String, Family<NameLabels, Gauge>>>,
    /// Outcome counters by name, registered on first use.
    outcomes: std::sync::Mutex<std::collections::HashMap<String, Family<OutcomeLabels, Counter>>>,
    /// Run before each exposition: gauges read at scrape time (a pool's connections).
    on_scrape: std::sync::Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
}

static GLOBAL: std::sync::OnceLock<Arc<Metrics>> = std::sync::OnceLock::new();

/// The process's metrics, made on first use with `prefix` (later prefixes are ignored: call
/// this first where the process starts).
pub fn init(prefix: &str) -> Arc<Metrics> {
    GLOBAL.get_or_init(|| Metrics::new(prefix)).clone()
}

/// Counts one `outcome` in the counter `name` of the process's metrics (registered with
/// `help` on first use): provisionings, AKA runs.
pub fn count(name: &str, help: &str, outcome: &str) {
    init("mcim").outcome(name, help, outcome);
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Latency buckets in seconds: 1 ms to 10 s.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

impl Metrics {
    /// A registry with the gRPC call metrics, every name prefixed `prefix_` (`mcim_roles`,
    /// `tred`).
    pub fn new(prefix: &str) -> Arc<Self> {
        let mut registry = Registry::with_prefix(prefix);
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "grpc_server_calls",
            "gRPC calls served, by method and status code",
            calls.clone(),
        );
        let latency = Family::<MethodLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(BUCKETS)) as fn() -> Histogram,
        );
        registry.register(
            "grpc_server_call_duration_seconds",
            "gRPC call latency, from the request to the end of the answer, by method",
            latency.clone(),
        );
        Arc::new(Self {
            registry: std::sync::Mutex::new(registry),
            calls,
            latency,
            gauges: Default::default(),
            outcomes: Default::default(),
            on_scrape: Default::default(),
        })
    }

    /// Counts one `outcome` in the counter family `name` (registered with `help` on first
    /// use).
    pub fn outcome(&self, name: &str, help: &str, outcome: &str) {
        let Ok(mut families) = self.outcomes.lock() else {
            return;
        };
        let family = families
            .entry(name.to_string())
            .or_insert_with(|| self.outcomes_family(name, help));
        family
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Runs `f` before every exposition (to set gauges read at scrape time).
    pub fn on_scrape(&self, f: impl Fn() + Send + Sync + 'static) {
        if let Ok(mut v) = self.on_scrape.lock() {
            v.push(Box::new(f));
        }
    }

    /// A counter family labelled by outcome, registered as `name`.
    fn outcomes_family(&self, name: &str, help: &str) -> Family<OutcomeLabels, Counter> {
        let f = Family::<OutcomeLabels, Counter>::default();
        if let Ok(mut r) = self.registry.lock() {
            r.register(name, help, f.clone());
        }
        f
    }

    /// The gauge family labelled by name registered as `name` (registered with `help` on
    /// first use; later calls get the same family, so that each name is exposed once).
    pub fn gauges(&self, name: &str, help: &str) -> Family<NameLabels, Gauge> {
        let Ok(mut families) = self.gauges.lock() else {
            return Family::default();
        };
        families
            .entry(name.to_string())
            .or_insert_with(|| {
                let f = Family::<NameLabels, Gauge>::default();
                if let Ok(mut r) = self.registry.lock() {
                    r.register(name, help, f.clone());
                }
                f
            })
            .clone()
    }

    /// The text exposition (OpenMetrics, which Prometheus reads).
    pub fn encode(&self) -> String {
        if let Ok(v) = self.on_scrape.lock() {
            for f in v.iter() {
                f();
            }
        }
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }

    fn record(&self, method: &str, code: tonic::Code, started: Instant) {
        self.calls
            .get_or_create(&CallLabels {
                method: method.to_string(),
                code: code_name(code).to_string(),
            })
            .inc();
        self.latency
            .get_or_create(&MethodLabels {
                method: method.to_string(),
            })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// The name Prometheus users know a gRPC code by.
fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match c {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The gRPC status in a header map (`grpc-status`), if there is one.
fn grpc_code(h: &http::HeaderMap) -> Option<tonic::Code> {
    let v = h.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(tonic::Code::from(v))
}

/// A tower layer counting and timing every gRPC call into [`Metrics`]. A call is labelled
/// with its method only when `known` says the server has that method; any other path counts
/// as `other`, so that callers (before any authentication) cannot mint label values without
/// end.
#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
    known: fn(&str) -> bool,
}

impl std::fmt::Debug for MetricsLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsLayer").finish_non_exhaustive()
    }
}

impl MetricsLayer {
    /// Counts into `metrics`; `known`: the server has this method (`/package.Service/Method`).
    pub fn new(metrics: Arc<Metrics>, known: fn(&str) -> bool) -> Self {
        Self { metrics, known }
    }
}

/// The gRPC health and reflection methods every server here has.
pub fn standard_method(path: &str) -> bool {
    matches!(
        path,
        "/grpc.health.v1.Health/Check"
            | "/grpc.health.v1.Health/Watch"
            | "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
            | "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    )
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.metrics.clone(),
            known: self.known,
        }
    }
}

/// The service [`MetricsLayer`] makes.
#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
    known: fn(&str) -> bool,
}

impl<S> std::fmt::Debug for MetricsService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsService").finish_non_exhaustive()
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: http_body::Body + Send + 'static,
{
    type Response = http::Response<Observed<RB>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let method = if (self.known)(path) {
            path.to_string()
        } else {
            "other".to_string()
        };
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            let (parts, body) = res.into_parts();
            // A trailers-only answer carries its status in the headers: the call is over.
            let done = grpc_code(&parts.headers).map(|code| {
                metrics.record(&method, code, started);
            });
            let body = Observed {
                inner: body,
                pending: done.is_none().then_some(Pending {
                    metrics,
                    method,
                    started,
                }),
            };
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

/// A call whose status is still to come, in the body's trailers.
struct Pending {
    metrics: Arc<Metrics>,
    method: String,
    started: Instant,
}

impl Pending {
    fn finish(self, code: tonic::Code) {
        self.metrics.record(&self.method, code, self.started);
    }
}

pin_project_lite::pin_project! {
    /// An answer's body that records the call when its trailers (or its end) arrive.
    pub struct Observed<B> {
        #[pin]
        inner: B,
        pending: Option<Pending>,
    }

    impl<B> PinnedDrop for Observed<B> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before its status: the client went away.
            if let Some(p) = this.project().pending.take() {
                p.finish(tonic::Code::Cancelled);
            }
        }
    }
}

impl<B: http_body::Body> http_body::Body for Observed<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        match &frame {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(code) = f.trailers_ref().and_then(grpc_code)
                    && let Some(p) = this.pending.take()
                {
                    p.finish(code);
                }
            }
            // The answer broke off, or ended without a status: the call did not finish as
            // gRPC calls finish (the client reset or went away), CANCELLED as gRPC counts it.
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => {
                if let Some(p) = this.pending.take() {
                    p.finish(tonic::Code::Cancelled);
                }
            }
            Poll::Pending => {}
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

/// Serves `metrics` as `GET /metrics` (any other path: 404) on `listener` until the task is
/// dropped. Plain HTTP/1.1, as Prometheus scrapes; bind it where only the scraper reaches.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    // A scraper needs one connection at a time; a few more are served, the rest closed at
    // once, and each connection answers one request whose header must come within 5 s, so
    // that idle connections cannot hold the process's descriptors.
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let (status, ctype, body) = if req.uri().path() == "/metrics" {
                            (
                                http::StatusCode::OK,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                metrics.encode(),
                            )
                        } else {
                            (
                                http::StatusCode::NOT_FOUND,
                                "text/plain; charset=utf-8",
                                "not found: GET /metrics\n".to_string(),
                            )
                        };
                        http::Response::builder()
                            .status(status)
                            .header(http::header::CONTENT_TYPE, ctype)
                            .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .keep_alive(false)
                .serve_connection(io, svc);
            // A whole exchange within 30 s, whatever the client does.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}

/// Metrics connections served at once.
const MAX_CONNECTIONS: usize = 16;

/// Binds `addr` for [`serve`], naming it in the error.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("metrics listener {addr}: {e}"))
}
