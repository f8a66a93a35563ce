//! Authentication vectors per second served over gRPC by the RO's ICF (a PCID's, TR 33.812
//! 5.1.3.6.2 step 1) and by the SHO (an operational IMSI's), as the VNO asks for them
//! (`GetAuthVectors`, five at a time), beside `mcim_core::aka`'s in-process rate measured in the
//! same command (the baseline). Issue 16's benchmark target. A bench binary, not criterion:
//! one real device is provisioned first (swtpm, `tred`, `mcim-roles all`, release binaries),
//! then C tasks ask for vectors for D seconds through one mutual-TLS channel per task. Every
//! call is a database transaction (the SQN is read, advanced and written back, wrapped K/OPc
//! unwrapped), so this is the per-subscriber rate, on SQLite, or on PostgreSQL when
//! `MCIM_TEST_POSTGRES` names a server (as the tests).
//!
//! ```sh
//! cargo build --release --bins && cargo bench -p mcim-e2e --bench vectors
//! MCIM_BENCH_SECONDS=10 MCIM_BENCH_CONCURRENCY=16 cargo bench -p mcim-e2e --bench vectors
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::time::{Duration, Instant};

use mcim_core::aka::{
    Amf, Constants, HeSqnState, K, Milenage, Opc, Rand, SoftKernel, SqnProfile, generate_avs,
};
use mcim_e2e::CliDevice;
use mcim_proto::mcim::ro::v1 as ro;
use mcim_proto::mcim::ro::v1::icf_service_client::IcfServiceClient;
use mcim_proto::mcim::sho::v1 as sho;
use mcim_proto::mcim::sho::v1::sho_service_client::ShoServiceClient;
use mcim_roles::authz::Role;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `mcim_core::aka` on one thread: vectors per second, five per batch.
fn in_process(seconds: f64) -> f64 {
    let m = Milenage::with_opc(
        SoftKernel::new(&K::new([0x46; 16])),
        Opc::new([0xcd; 16]),
        Constants::default(),
    );
    let (p, mut he, mut rng) = (SqnProfile::default(), HeSqnState::default(), rand::rng());
    let (start, mut n) = (Instant::now(), 0u64);
    while start.elapsed().as_secs_f64() < seconds {
        for _ in 0..1000 {
            let rands: [Rand; 5] = std::array::from_fn(|_| Rand::random(&mut rng));
            std::hint::black_box(generate_avs(&m, &mut he, &p, Amf([0x80, 0]), &rands).unwrap());
            n += 5;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// `calls` run by `c` tasks for `seconds`: vectors per second and the median call time.
async fn over_grpc<F, Fut>(c: usize, seconds: f64, call: F) -> (f64, Duration)
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = usize> + Send,
{
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..c {
        let call = call.clone();
        tasks.spawn(async move {
            let (mut n, mut times) = (0usize, Vec::new());
            while Instant::now() < deadline {
                let t = Instant::now();
                n += call(i).await;
                times.push(t.elapsed());
            }
            (n, times)
        });
    }
    let (mut n, mut times) = (0usize, Vec::new());
    while let Some(r) = tasks.join_next().await {
        let (k, t) = r.unwrap();
        n += k;
        times.extend(t);
    }
    times.sort_unstable();
    (
        n as f64 / start.elapsed().as_secs_f64(),
        times.get(times.len() / 2).copied().unwrap_or_default(),
    )
}

fn main() {
    let seconds = env("MCIM_BENCH_SECONDS", 5) as f64;
    let c = env("MCIM_BENCH_CONCURRENCY", 8) as usize;
    let d = CliDevice::provisioned(false, "001010000000201", &[], "3gpp");
    let db = if d.roles.db_url.starts_with("postgres") {
        "postgres"
    } else {
        "sqlite"
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (pcid, imsi) = (d.pcid.clone(), d.imsi.clone());
    let sho_pcid = pcid.clone();
    let mut icf = Vec::new();
    let mut shos = Vec::new();
    for _ in 0..c {
        icf.push(IcfServiceClient::new(
            rt.block_on(d.roles.channel(Role::Vno, Role::Ro)),
        ));
        shos.push(ShoServiceClient::new(
            rt.block_on(d.roles.channel(Role::Vno, Role::Sho)),
        ));
    }
    let base = in_process(seconds);
    let (icf_rate, icf_p50) = rt.block_on(over_grpc(c, seconds, move |i| {
        let mut client = icf[i].clone();
        let pcid = pcid.clone();
        async move {
            let r = client
                .get_auth_vectors(ro::GetAuthVectorsRequest {
                    pcid,
                    count: 5,
                    resync: None,
                    serving_network: "001-01".into(),
                })
                .await
                .unwrap();
            r.into_inner().vectors.len()
        }
    }));
    let (sho_rate, sho_p50) = rt.block_on(over_grpc(c, seconds, move |i| {
        let mut client = shos[i].clone();
        let imsi = imsi.clone();
        let pcid = sho_pcid.clone();
        async move {
            let r = client
                .get_auth_vectors(sho::GetAuthVectorsRequest {
                    imsi,
                    count: 5,
                    resync: None,
                    serving_network: "001-01".into(),
                    pcid,
                })
                .await
                .unwrap();
            r.into_inner().vectors.len()
        }
    }));
    println!("authentication vectors per second ({db}, {c} tasks, {seconds} s each, 5 per call)");
    println!("| served by | vectors/s | median call | vs in-process |");
    println!("| --- | --- | --- | --- |");
    println!("| `mcim_core::aka` in process, one thread (baseline) | {base:.0} | | 1.00x |");
    for (who, rate, p50) in [
        (
            "ICF (`IcfService/GetAuthVectors`, one PCID)",
            icf_rate,
            icf_p50,
        ),
        (
            "SHO (`ShoService/GetAuthVectors`, one IMSI)",
            sho_rate,
            sho_p50,
        ),
    ] {
        println!(
            "| {who} | {rate:.0} | {:.2} ms | {:.5}x |",
            p50.as_secs_f64() * 1000.0,
            rate / base
        );
    }
}
