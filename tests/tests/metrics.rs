//! Prometheus metrics (issue 16 item 6): `mcim-roles --metrics-listen` and tred's
//! `metrics_listen` serve the text format at `/metrics`; a provisioning end to end shows up in
//! both, a refused call under its status code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mcim_e2e::CliDevice;

/// The value of the sample `line_start` (the metric with its labels), if present.
fn sample(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_provisioning_shows_in_the_roles_and_treds_metrics() {
    let d = CliDevice::provisioned(false, "001010000000061", &[], "3gpp");
    let m = d.roles.metrics();
    assert!(m.ends_with("# EOF\n"), "OpenMetrics text: {m}");
    // Each family once (two databases, the second SHO's too, are two labels of one family:
    // a family twice is text a Prometheus parser refuses; found by an outside attack).
    let types: Vec<&str> = m.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    let mut unique = types.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(types.len(), unique.len(), "{m}");
    let sho2 = match d.roles.db_name().strip_suffix(".db") {
        Some(stem) => format!("{stem}-sho2.db"),
        None => format!("{}-sho2", d.roles.db_name()),
    };
    assert!(m.contains(&format!("name=\"{sho2}\"")), "{m}");
    // The SHO was told of one provisioning (step 14).
    assert_eq!(
        sample(
            &m,
            r#"mcim_roles_provisionings_total{outcome="provisioned"}"#
        ),
        Some(1.0),
        "{m}"
    );
    // Calls by method and status, and their latency.
    let report = r#"mcim_roles_grpc_server_calls_total{method="/mcim.sho.v1.ShoService/ReportProvisioningStatus",code="OK"}"#;
    assert!(sample(&m, report).is_some_and(|n| n >= 1.0), "{m}");
    assert!(
        sample(
            &m,
            r#"mcim_roles_grpc_server_call_duration_seconds_count{method="/mcim.sho.v1.ShoService/ReportProvisioningStatus"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{m}"
    );
    // The database pool and the RO's task queue (nothing left to send).
    assert!(
        sample(
            &m,
            &format!(
                "mcim_roles_db_pool_connections{{name=\"{}\"}}",
                d.roles.db_name()
            )
        )
        .is_some_and(|n| n >= 1.0),
        "{m}"
    );
    // tred: the provisioning run and the AKA runs (initial attach and operational attach).
    let t = d.tred.metrics();
    assert_eq!(
        sample(&t, r#"tred_provisioning_runs_total{outcome="provisioned"}"#),
        Some(1.0),
        "{t}"
    );
    assert!(
        sample(&t, r#"tred_aka_runs_total{outcome="success"}"#).is_some_and(|n| n >= 1.0),
        "{t}"
    );
    assert!(
        t.contains("tred_grpc_server_calls_total{method=\"/mcim.tre.v1.TreService/"),
        "{t}"
    );
}

/// A refused call is counted under its code; the count moves by exactly one.
#[test]
fn a_refused_call_is_counted_under_its_status_code() {
    let d = CliDevice::provisioned(false, "001010000000062", &[], "3gpp");
    let key = r#"tred_grpc_server_calls_total{method="/mcim.tre.v1.TreService/GetMcim",code="NOT_FOUND"}"#;
    let before = sample(&d.tred.metrics(), key).unwrap_or(0.0);
    let out = mcim_e2e::mcimctl(&["device", "--socket", &d.socket(), "get", "999999999999999"]);
    assert!(!out.status.success());
    assert_eq!(sample(&d.tred.metrics(), key), Some(before + 1.0));
}

/// Methods the server does not have are counted as `other`: callers cannot mint label values
/// (and memory) without end by calling made-up paths.
#[test]
fn made_up_methods_are_counted_as_other() {
    let d = CliDevice::provisioned(false, "001010000000063", &[], "3gpp");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut g = tonic::client::Grpc::new(d.tred.channel().await);
        for i in 0..20 {
            g.ready().await.unwrap();
            let path = tonic::codegen::http::uri::PathAndQuery::try_from(format!(
                "/mcim.tre.v1.TreService/MadeUp{i}"
            ))
            .unwrap();
            let r: Result<tonic::Response<()>, tonic::Status> = g
                .unary(
                    tonic::Request::new(()),
                    path,
                    tonic_prost::ProstCodec::default(),
                )
                .await;
            assert!(r.is_err(), "a made-up method answered");
        }
    });
    let t = d.tred.metrics();
    assert!(!t.contains("MadeUp"), "{t}");
    let other: f64 = t
        .lines()
        .filter(|l| l.starts_with("tred_grpc_server_calls_total{method=\"other\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(other, 20.0, "{t}");
}
