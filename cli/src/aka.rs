//! `mcimctl aka`: MILENAGE and AUTS at the command line, for checking an implementation
//! against test data or a network trace.
//!
//! K and OP/OPc given on the command line are visible to other local users through the
//! process list: this is a test tool, not a way to handle production keys.

use crate::hexarg;
use clap::{Args, Subcommand};
use mcim_core::aka::milenage::{InvalidConstants, infallible};
use mcim_core::aka::{
    Amf, Auts, Constants, K, Milenage, Op, Opc, Rand, SoftKernel, recover_sqn_ms,
};
use serde::Serialize;

/// `mcimctl aka ...`
#[derive(Subcommand)]
pub enum AkaCommand {
    /// Compute f1, f1*, f2, f3, f4, f5, f5* (and OPc when --op is given).
    Milenage(MilenageArgs),
    /// Recover SQN_MS from AUTS after verifying MAC-S (TS 33.102 6.3.5).
    Auts(AutsArgs),
}

/// K, OP or OPc, and the optional operator constants.
#[derive(Args)]
pub struct SubscriberArgs {
    /// Subscriber key K, 32 hex digits.
    #[arg(long, value_name = "HEX", value_parser = hexarg::parse::<16>)]
    k: [u8; 16],
    /// Operator variant OP, 32 hex digits (OPc is derived from it).
    #[arg(long, value_name = "HEX", value_parser = hexarg::parse::<16>, conflicts_with = "opc", required_unless_present = "opc")]
    op: Option<[u8; 16]>,
    /// OPc, 32 hex digits.
    #[arg(long, value_name = "HEX", value_parser = hexarg::parse::<16>, required_unless_present = "op")]
    opc: Option<[u8; 16]>,
    /// Operator-defined constants c1..c5 (32 hex digits each, in order; default TS 35.206).
    #[arg(long = "c", value_name = "HEX", num_args = 5, value_parser = hexarg::parse::<16>)]
    constants: Option<Vec<[u8; 16]>>,
    /// Operator-defined rotations r1..r5 in bits (0..=127, in order; default 64 0 32 64 96).
    #[arg(long = "r", value_name = "BITS", num_args = 5, value_parser = clap::value_parser!(u32).range(0..128))]
    rotations: Option<Vec<u32>>,
}

/// Arguments of `mcimctl aka milenage`.
#[derive(Args)]
pub struct MilenageArgs {
    #[command(flatten)]
    subscriber: SubscriberArgs,
    /// RAND, 32 hex digits.
    #[arg(long, value_name = "HEX", value_parser = hexarg::parse::<16>)]
    rand: [u8; 16],
    /// SQN, 12 hex digits.
    #[arg(long, value_name = "HEX", value_parser = hexarg::parse::<6>)]
    sqn: [u8; 6],
    /// AMF, 4 hex digits.
    #[arg(long, value_name = "HEX", value_parser = hexarg::parse::<2>)]
    amf: [u8; 2],
    /// Print exactly one JSON object.
    #[arg(long)]
    json: bool,
}

/// Arguments of `mcimctl aka auts`.
#[derive(Args)]
pub struct AutsArgs {
    #[command(flatten)]
    subscriber: SubscriberArgs,
    /// RAND of the failed challenge, 32 hex digits.
    #[arg(long, value_name = "HEX", value_parser = hexarg::parse::<16>)]
    rand: [u8; 16],
    /// AUTS from the device, 28 hex digits.
    #[arg(long, value_name = "HEX", value_parser = hexarg::parse::<14>)]
    auts: [u8; 14],
    /// Print exactly one JSON object.
    #[arg(long)]
    json: bool,
}

/// What can go wrong after the arguments parsed.
#[derive(Debug, thiserror::Error)]
pub enum AkaCliError {
    /// --r out of range, say.
    #[error("{0}")]
    Constants(#[from] InvalidConstants),
    /// AUTS did not verify.
    #[error(
        "AUTS rejected: MAC-S does not verify (wrong K or OP/OPc, another RAND, or a corrupted AUTS)"
    )]
    MacS,
}

fn milenage(s: &SubscriberArgs) -> Result<Milenage<SoftKernel>, AkaCliError> {
    let consts = match (&s.constants, &s.rotations) {
        (None, None) => Constants::default(),
        (c, r) => {
            let d = [[0u8; 16], one(1), one(2), one(4), one(8)];
            let c: [[u8; 16]; 5] = c
                .as_ref()
                .and_then(|v| v.as_slice().try_into().ok())
                .unwrap_or(d);
            let r: [u32; 5] = r
                .as_ref()
                .and_then(|v| v.as_slice().try_into().ok())
                .unwrap_or([64, 0, 32, 64, 96]);
            Constants::new(c, r)?
        }
    };
    let kernel = SoftKernel::new(&K::new(s.k));
    Ok(match (s.op, s.opc) {
        (Some(op), _) => infallible(Milenage::with_op(kernel, &Op::new(op), consts)),
        (None, Some(opc)) => Milenage::with_opc(kernel, Opc::new(opc), consts),
        // clap requires one of --op and --opc.
        (None, None) => Milenage::with_opc(kernel, Opc::new([0; 16]), consts),
    })
}

fn one(v: u8) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[15] = v;
    b
}

#[derive(Serialize)]
struct MilenageJson {
    f1: String,
    f1star: String,
    f2: String,
    f3: String,
    f4: String,
    f5: String,
    f5star: String,
    /// AUTN = SQN ⊕ AK || AMF || MAC-A, what a network sends with RAND.
    autn: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    opc: Option<String>,
}

/// Runs one `mcimctl aka` command.
pub fn run(cmd: AkaCommand) -> Result<(), AkaCliError> {
    match cmd {
        AkaCommand::Milenage(a) => {
            let m = milenage(&a.subscriber)?;
            let out = infallible(m.compute(&Rand(a.rand), &a.sqn, &Amf(a.amf)));
            let f = &out.f2345;
            let j = MilenageJson {
                f1: hex::encode(out.mac_a),
                f1star: hex::encode(out.mac_s),
                f2: hex::encode(f.res.0),
                f3: hex::encode(f.ck.expose()),
                f4: hex::encode(f.ik.expose()),
                f5: hex::encode(f.ak),
                f5star: hex::encode(f.ak_star),
                autn: {
                    let mut autn = Vec::with_capacity(16);
                    autn.extend(a.sqn.iter().zip(f.ak).map(|(s, k)| s ^ k));
                    autn.extend_from_slice(&a.amf);
                    autn.extend_from_slice(&out.mac_a);
                    hex::encode(autn)
                },
                opc: a.subscriber.op.map(|_| hex::encode(m.opc().expose())),
            };
            if a.json {
                println!("{}", json(&j));
            } else {
                for (name, v) in [
                    ("f1", &j.f1),
                    ("f1star", &j.f1star),
                    ("f2", &j.f2),
                    ("f3", &j.f3),
                    ("f4", &j.f4),
                    ("f5", &j.f5),
                    ("f5star", &j.f5star),
                    ("autn", &j.autn),
                ] {
                    println!("{name:<7}{v}");
                }
                if let Some(opc) = &j.opc {
                    println!("{:<7}{opc}", "opc");
                }
            }
            Ok(())
        }
        AkaCommand::Auts(a) => {
            let m = milenage(&a.subscriber)?;
            let sqn =
                recover_sqn_ms(&m, &Rand(a.rand), &Auts(a.auts)).map_err(|_| AkaCliError::MacS)?;
            let h = hex::encode(sqn.to_bytes());
            if a.json {
                println!("{}", json(&serde_json::json!({ "sqn_ms": h })));
            } else {
                println!("sqn_ms {h}");
            }
            Ok(())
        }
    }
}

fn json<T: Serialize>(v: &T) -> String {
    // Serialising plain strings into a String cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}
