//! One provisioning is one trace across the device and the roles (issue 5, tracing): the
//! real `mcimctl lab run` with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at a minimal OTLP/gRPC
//! collector in this test; `tred` and `mcim-roles` export their spans, and the device's
//! `provisioning` span is the root of the roles' spans for the calls it caused, two hops deep
//! (the RO's call to the SHO, the SHO's to the PVA) and in the SHO's background follower.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};

use mcim_e2e::workspace_bin;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::{Request, Response, Status};

/// (service.name, trace id, span id, parent span id, span name)
type SpanSeen = (String, Vec<u8>, Vec<u8>, Vec<u8>, String);
type Seen = Arc<Mutex<Vec<SpanSeen>>>;

struct Collector(Seen);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut seen = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    seen.push((
                        service.clone(),
                        s.trace_id,
                        s.span_id,
                        s.parent_span_id,
                        s.name,
                    ));
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_provisioning_is_one_trace_across_the_device_and_the_roles() {
    let seen: Seen = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(seen.clone())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(workspace_bin("mcimctl"))
            .args(["lab", "run", "--json"])
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{port}"),
            )
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.abort();
    let seen = seen.lock().unwrap().clone();
    let root = seen
        .iter()
        .find(|s| s.4 == "provisioning")
        .unwrap_or_else(|| panic!("no provisioning span: {:?}", names(&seen)));
    assert!(root.0.contains("tred"), "{root:?}");
    assert!(root.3.is_empty(), "the provisioning span is a root");
    let trace = &root.1;
    let in_trace: Vec<&SpanSeen> = seen.iter().filter(|s| &s.1 == trace).collect();
    for (service, name) in [
        ("tred", "attach"),
        ("mcim-roles", "/mcim.vno.v1.VnoService/Attach"),
        ("mcim-roles", "/mcim.ro.v1.IcfService/GetAuthVectors"),
        ("mcim-roles", "/mcim.ro.v1.DrfService/RegisterDevice"),
        ("mcim-roles", "/mcim.sho.v1.ShoService/RegisterDevice"),
        ("mcim-roles", "/mcim.pva.v1.PvaService/RequestValidation"),
        ("mcim-roles", "/mcim.pva.v1.PvaService/SubmitEvidence"),
        ("mcim-roles", "follow_validation"),
        ("mcim-roles", "/mcim.ro.v1.DpfService/AuthorizeProvisioning"),
        ("mcim-roles", "/mcim.ro.v1.DpfService/DownloadPackage"),
        (
            "mcim-roles",
            "/mcim.sho.v1.ShoService/ReportProvisioningStatus",
        ),
    ] {
        assert!(
            in_trace
                .iter()
                .any(|s| s.0.contains(service) && s.4 == name),
            "{service} span {name} is not in the provisioning trace; in it: {:?}",
            names(&in_trace.iter().map(|s| (*s).clone()).collect::<Vec<_>>())
        );
    }
    // Every span of the trace hangs from another span of it: one tree, no orphans.
    for s in &in_trace {
        assert!(
            s.3.is_empty() || in_trace.iter().any(|p| p.2 == s.3),
            "{} has no parent in the trace",
            s.4
        );
    }
    // The impostor's attach and the lab's own calls are not part of it.
    assert!(
        seen.iter()
            .any(|s| &s.1 != trace && s.4 == "/mcim.vno.v1.VnoService/Attach"),
        "other calls make traces of their own"
    );
}

fn names(v: &[SpanSeen]) -> Vec<String> {
    v.iter().map(|s| format!("{}:{}", s.0, s.4)).collect()
}
