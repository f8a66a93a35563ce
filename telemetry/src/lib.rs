//! # mcim-telemetry: logs and distributed traces
//!
//! One set-up for `tred` and `mcim-roles` (issue 5, "one provisioning is one trace across
//! device and roles"):
//!
//! - [`init`]: `tracing` to standard error, filtered by a variable (`MCIM_LOG`); and, when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the OpenTelemetry convention; also
//!   `OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_*`), every span exported over OTLP/gRPC as well.
//! - [`Channel`] / [`traced`]: a client channel that puts the current span's context into each
//!   request's metadata (W3C `traceparent`); [`server_span`]: the server side, a span per call
//!   whose parent is that context. So a call from the device to the RO, the RO's call to the
//!   SHO, and the SHO's to the PVA all belong to the device's provisioning trace.
//!
//! - [`notify_ready`]: systemd's readiness notification (`Type=notify` units).
//!
//! Nothing secret is ever a span field: spans carry RPC names, PCIDs, registration ids.

pub mod channel;
pub mod metrics;
pub mod retry;
pub mod throttle;

pub use throttle::Throttle;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// A client channel whose requests carry the caller's trace context.
pub type Channel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Propagate>;

/// Wraps a channel so that its requests carry the current span's trace context.
pub fn traced(channel: tonic::transport::Channel) -> Channel {
    tonic::service::interceptor::InterceptedService::new(channel, Propagate)
}

/// The interceptor behind [`Channel`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Propagate;

impl tonic::service::Interceptor for Propagate {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let cx = tracing::Span::current().context();
        TraceContextPropagator::new()
            .inject_context(&cx, &mut MetadataInjector(req.metadata_mut()));
        Ok(req)
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a tonic::codegen::http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The span of one incoming gRPC call (for `Server::builder().trace_fn(server_span)`): named
/// by the RPC, child of the caller's span when the request carries a trace context.
pub fn server_span<B>(req: &tonic::codegen::http::Request<B>) -> tracing::Span {
    let span = tracing::info_span!(
        "grpc",
        otel.name = %req.uri().path(),
        otel.kind = "server",
        rpc.method = %req.uri().path(),
    );
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
    // A request without a context starts a trace of its own.
    let _ = span.set_parent(parent);
    span
}

/// Keeps the exporter alive; dropping it sends the spans not exported yet.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans go to an OTLP collector.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Sets up logging (a `tracing` filter such as `info` or `mcim_roles=debug`; an invalid one
/// means `info`) and, with `OTEL_EXPORTER_OTLP_ENDPOINT` set, OTLP export under the service
/// name `service` (or `OTEL_SERVICE_NAME`). Call it inside the tokio runtime (the exporter's
/// gRPC client runs on it). An exporter that cannot be built is reported on standard error and
/// the daemon runs without it: tracing is never a reason not to serve.
pub fn init(service: &'static str, filter: &str) -> Telemetry {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(std::io::stderr);
    let provider = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT")
        .filter(|v| !v.is_empty())
        .and_then(|_| match exporter(service) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("{service}: OTLP export disabled: {e}");
                None
            }
        });
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::OpenTelemetryLayer::new(p.tracer(service)));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    Telemetry { provider }
}

fn exporter(service: &'static str) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| e.to_string())?;
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_string());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// A daemon's tokio runtime (two workers: the machines are small) with [`init`] run inside
/// it. Drop the [`Telemetry`] before the runtime, so that the last spans go out.
pub fn runtime(
    service: &'static str,
    filter: &str,
) -> Result<(tokio::runtime::Runtime, Telemetry), std::io::Error> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let telemetry = {
        let _in_runtime = runtime.enter();
        init(service, filter)
    };
    Ok((runtime, telemetry))
}

/// Tells systemd (`Type=notify`) that the daemon serves, when it runs under one (tred once its
/// socket listens, mcim-roles once every role's port does): the datagram `READY=1` to
/// `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace).
pub fn notify_ready() {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = std::os::unix::net::UnixDatagram::unbound().and_then(|s| {
        match target.as_encoded_bytes().strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                s.send_to_addr(b"READY=1", &addr)
            }
            None => s.send_to(b"READY=1", &target),
        }
    });
    match sent {
        Ok(_) => tracing::info!("told systemd: ready"),
        Err(e) => tracing::warn!("NOTIFY_SOCKET {}: {e}", target.to_string_lossy()),
    }
}
