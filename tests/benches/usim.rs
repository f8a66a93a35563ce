//! AUTHENTICATE per second through each way into the same MCIM on the same TRE (swtpm):
//! `tred`'s own AKA over its local gRPC API (the baseline), the USIM's raw APDU socket, and
//! the USIM as a PC/SC card (pcscd with vsmartcard's vpcd; libpcsclite through the pcsc crate,
//! as a modem does it on T=0: AUTHENTICATE then GET RESPONSE). Every call is a fresh vector
//! (consecutive SQNs, made in-process as an HSS would), so each is a full AKA in the TRE with
//! the SQN state committed; every answer is checked. A bench binary, not criterion: one run of
//! N calls per way, the ways one after another in the same command.
//!
//! ```sh
//! cargo build --release --bins && cargo bench -p mcim-e2e --bench usim     # N = 300
//! MCIM_BENCH_N=1000 cargo bench -p mcim-e2e --bench usim
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Instant;

use mcim_core::aka::network::generate_avs;
use mcim_core::aka::{Amf, Constants, HeSqnState, K, Milenage, Opc, Rand, SoftKernel, SqnProfile};
use mcim_e2e::test_set_1::{IMSI, K as K_HEX, OPC};
use mcim_e2e::{Pcscd, Swtpm};

/// The child's marker: it runs the PC/SC side (libpcsclite reads `PCSCLITE_CSOCK_NAME` from
/// its environment, which a process sets before it starts).
const CHILD: &str = "MCIM_BENCH_PCSC_CHILD";

fn main() {
    if std::env::var_os(CHILD).is_some() {
        return pcsc_child();
    }
    let n: usize = std::env::var("MCIM_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let tpm = Swtpm::start();
    let pcscd = Pcscd::start();
    let work = tempfile::tempdir().unwrap();
    let vpcd = pcscd.vpcd();
    let (tred, usim) =
        mcim_e2e::usim_device(&tpm, work.path(), &[("MCIM_USIM_VPCD", vpcd.as_str())]);
    let mut vectors = vectors(3 * n + 3).into_iter();

    // The baseline: tred's Authenticate over its local API (after VERIFY PIN by SelectMcim).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let grpc = rt.block_on(async {
        use mcim_proto::mcim::common::v1::AuthChallenge;
        use mcim_proto::mcim::tre::v1 as pb;
        let mut c = tred.client().await;
        c.select_mcim(pb::SelectMcimRequest {
            mcim_id: IMSI.into(),
            pin: "1234".into(),
        })
        .await
        .unwrap();
        let batch: Vec<_> = vectors.by_ref().take(n).collect();
        let t = Instant::now();
        for (rand, autn, xres) in batch {
            let r = c
                .authenticate(pb::AuthenticateRequest {
                    credential: Some(pb::authenticate_request::Credential::McimId(IMSI.into())),
                    challenge: Some(AuthChallenge {
                        rand: rand.to_vec(),
                        autn: autn.to_vec(),
                    }),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(
                format!("{r:?}").contains(&format!("{:?}", xres.to_vec())),
                "{r:?}"
            );
        }
        let e = t.elapsed();
        c.end_mcim_session(pb::EndMcimSessionRequest {
            mcim_id: IMSI.into(),
        })
        .await
        .unwrap();
        e
    });

    // The raw APDU socket (as a modem bridge).
    let mut s = UnixStream::connect(&usim).unwrap();
    let mut msg = |m: &[u8]| -> Vec<u8> {
        let mut out = u16::try_from(m.len()).unwrap().to_be_bytes().to_vec();
        out.extend_from_slice(m);
        s.write_all(&out).unwrap();
        if m.len() == 1 && m[0] != 4 {
            return Vec::new();
        }
        let mut len = [0u8; 2];
        s.read_exact(&mut len).unwrap();
        let mut a = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut a).unwrap();
        a
    };
    msg(&[1]);
    assert_eq!(
        msg(&hex::decode("00a4040c07a0000000871002").unwrap()),
        [0x90, 0]
    );
    assert_eq!(
        msg(&hex::decode("002000010831323334ffffffff").unwrap()),
        [0x90, 0]
    );
    let batch: Vec<_> = vectors.by_ref().take(n).collect();
    let t = Instant::now();
    for (rand, autn, xres) in &batch {
        let sw = msg(&authenticate(rand, autn));
        assert_eq!(sw, [0x61, 0x35]);
        let r = msg(&[0x00, 0xc0, 0x00, 0x00, 0x35]);
        assert_eq!(&r[2..10], xres, "RES");
    }
    let raw = t.elapsed();
    msg(&[0]);
    drop(s);

    // PC/SC, in a child whose environment names this pcscd.
    let batch: Vec<_> = vectors.by_ref().take(n).collect();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(CHILD, "1")
        .env("PCSCLITE_CSOCK_NAME", pcscd.socket())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut w = child.stdin.take().unwrap();
        for (rand, autn, xres) in &batch {
            writeln!(
                w,
                "{} {} {}",
                hex::encode(rand),
                hex::encode(autn),
                hex::encode(xres)
            )
            .unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let pcsc_us: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let pcsc = std::time::Duration::from_micros(pcsc_us);

    let per_s = |d: std::time::Duration| n as f64 / d.as_secs_f64();
    println!("AUTHENTICATE with fresh vectors on swtpm, {n} calls each (sequential, one caller):");
    println!(
        "  tred's AKA over the local gRPC API (baseline): {:>8.1}/s  {:>6.2} ms/call  1.00",
        per_s(grpc),
        grpc.as_secs_f64() * 1000.0 / n as f64
    );
    for (what, d) in [
        ("the USIM over the raw APDU socket (2 APDUs)", raw),
        ("the USIM over PC/SC, pcscd + vpcd (2 APDUs)", pcsc),
    ] {
        println!(
            "  {what:<47}{:>8.1}/s  {:>6.2} ms/call  {:.2}",
            per_s(d),
            d.as_secs_f64() * 1000.0 / n as f64,
            per_s(d) / per_s(grpc)
        );
    }
}

/// AUTHENTICATE (3G context) without Le, as T=0 carries it.
fn authenticate(rand: &[u8; 16], autn: &[u8; 16]) -> Vec<u8> {
    let mut a = vec![0x00, 0x88, 0x00, 0x81, 0x22, 0x10];
    a.extend_from_slice(rand);
    a.push(0x10);
    a.extend_from_slice(autn);
    a
}

/// `n` vectors for test set 1 with consecutive SQNs: (RAND, AUTN, XRES).
fn vectors(n: usize) -> Vec<([u8; 16], [u8; 16], Vec<u8>)> {
    let k = K::from_slice(&hex::decode(K_HEX).unwrap()).unwrap();
    let opc = Opc::from_slice(&hex::decode(OPC).unwrap()).unwrap();
    let m = Milenage::with_opc(SoftKernel::new(&k), opc, Constants::default());
    let profile = SqnProfile::default();
    let mut he = HeSqnState::default();
    let rands: Vec<Rand> = (0..n).map(|_| Rand(rand::random())).collect();
    generate_avs(&m, &mut he, &profile, Amf([0xb9, 0xb9]), &rands)
        .unwrap()
        .into_iter()
        .map(|v| (v.rand.0, v.autn.0, v.xres.0.to_vec()))
        .collect()
}

/// The PC/SC side: reads "RAND AUTN XRES" lines, connects to the card, VERIFY, then times the
/// AUTHENTICATEs (each followed by GET RESPONSE) and prints the microseconds.
fn pcsc_child() {
    let lines: Vec<String> = std::io::stdin()
        .lock()
        .lines()
        .map(Result::unwrap)
        .collect();
    let ctx = pcsc::Context::establish(pcsc::Scope::User).unwrap();
    let readers = ctx.list_readers_owned().unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    let card = loop {
        match ctx.connect(&readers[0], pcsc::ShareMode::Shared, pcsc::Protocols::ANY) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("no card: {e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    };
    let mut buf = [0u8; pcsc::MAX_BUFFER_SIZE];
    let mut tx = |a: &[u8]| card.transmit(a, &mut buf).unwrap().to_vec();
    assert_eq!(
        tx(&hex::decode("00a4040c07a0000000871002").unwrap()),
        [0x90, 0]
    );
    assert_eq!(
        tx(&hex::decode("002000010831323334ffffffff").unwrap()),
        [0x90, 0]
    );
    let batch: Vec<([u8; 16], [u8; 16], Vec<u8>)> = lines
        .iter()
        .map(|l| {
            let f: Vec<Vec<u8>> = l.split(' ').map(|x| hex::decode(x).unwrap()).collect();
            (
                f[0].clone().try_into().unwrap(),
                f[1].clone().try_into().unwrap(),
                f[2].clone(),
            )
        })
        .collect();
    let t = Instant::now();
    for (rand, autn, xres) in &batch {
        assert_eq!(tx(&authenticate(rand, autn)), [0x61, 0x35]);
        let r = tx(&[0x00, 0xc0, 0x00, 0x00, 0x35]);
        assert_eq!(&r[2..10], xres.as_slice(), "RES");
    }
    println!("{}", t.elapsed().as_micros());
}
