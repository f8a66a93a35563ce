//! Authentication vectors per second per core (issue 2, BENCHMARKS.md).
//!
//! Three measurements in one run, each producing one UMTS AV (or its AES work) per
//! iteration:
//! - `aes_floor`: six independent AES-128 block encryptions in a plain loop with a cached key
//!   schedule (the AES work of one AV: TEMP, then OUT1..OUT5), the floor;
//! - `mcim_core`: `generate_av` with the software kernel (RAND from a CSPRNG, SQN state);
//! - `milenage_crate`: the `milenage` crate doing the same AV (f1, f2345, AUTN, SQN, RAND);
//! - `mcim_core_given_rand`: `generate_av` without the RAND generation, to show its share;
//! - `mcim_core_batch5`: `generate_avs` for five vectors at once (what GetAuthVectors asks).
//!
//! Run: `cargo bench -p mcim-core --bench aka`
#![allow(missing_docs, clippy::unwrap_used)]

use aes::Aes128;
use aes::cipher::{Array, BlockCipherEncrypt, KeyInit};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mcim_core::aka::*;
use std::hint::black_box;

const K_BYTES: [u8; 16] = [0x46; 16];
const OPC_BYTES: [u8; 16] = [0xcd; 16];
const AMF_V: Amf = Amf([0x80, 0x00]);

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("auth_vector");
    g.throughput(Throughput::Elements(1));

    let aes = Aes128::new(&Array::from(K_BYTES));
    g.bench_function("aes_floor", |b| {
        // Six independent blocks, one encrypt_block call each: the CPU may overlap them.
        let mut blocks = [Array::from([7u8; 16]); 6];
        let mut n = 0u8;
        b.iter(|| {
            n = n.wrapping_add(1);
            for (i, blk) in blocks.iter_mut().enumerate() {
                blk[0] = n ^ i as u8;
                aes.encrypt_block(blk);
            }
            black_box(&blocks);
        })
    });

    let m = Milenage::with_opc(
        SoftKernel::new(&K::new(K_BYTES)),
        Opc::new(OPC_BYTES),
        Constants::default(),
    );
    let p = SqnProfile::default();
    g.bench_function("mcim_core", |b| {
        let mut rng = rand::rng();
        let mut he = HeSqnState::default();
        b.iter(|| {
            let av = generate_av(&m, &mut he, &p, AMF_V, Rand::random(&mut rng)).unwrap();
            black_box(av);
        })
    });
    g.bench_function("mcim_core_given_rand", |b| {
        let mut he = HeSqnState::default();
        let mut r = 0u128;
        b.iter(|| {
            r = r.wrapping_add(1);
            let av = generate_av(&m, &mut he, &p, AMF_V, Rand(r.to_be_bytes())).unwrap();
            black_box(av);
        })
    });

    g.throughput(Throughput::Elements(5));
    g.bench_function("mcim_core_batch5", |b| {
        let mut rng = rand::rng();
        let mut he = HeSqnState::default();
        b.iter(|| {
            let rands: [Rand; 5] = std::array::from_fn(|_| Rand::random(&mut rng));
            black_box(generate_avs(&m, &mut he, &p, AMF_V, &rands).unwrap());
        })
    });
    g.throughput(Throughput::Elements(1));

    g.bench_function("milenage_crate", |b| {
        let mut rng = rand::rng();
        let mut seq: u64 = 0;
        let mut mc = ::milenage::Milenage::new_with_opc(K_BYTES, OPC_BYTES);
        b.iter(|| {
            let rand = Rand::random(&mut rng).0;
            seq += 1;
            let sqn_full = (seq << 5).to_be_bytes();
            let sqn: [u8; 6] = sqn_full[2..].try_into().unwrap();
            let mac_a = mc.f1(&rand, &sqn, &AMF_V.0);
            let (xres, ck, ik, ak) = mc.f2345(&rand);
            let mut autn = [0u8; 16];
            for i in 0..6 {
                autn[i] = sqn[i] ^ ak[i];
            }
            autn[6..8].copy_from_slice(&AMF_V.0);
            autn[8..].copy_from_slice(&mac_a);
            black_box((rand, xres, ck, ik, autn));
        })
    });
    g.finish();

    let mut parts = c.benchmark_group("parts");
    parts.bench_function("milenage_compute", |b| {
        let mut r = 0u128;
        b.iter(|| {
            r = r.wrapping_add(1);
            black_box(
                m.compute(&Rand(r.to_be_bytes()), &[0, 0, 0, 0, 1, 0], &AMF_V)
                    .unwrap(),
            );
        })
    });
    parts.bench_function("milenage_temp", |b| {
        let mut r = 0u128;
        b.iter(|| {
            r = r.wrapping_add(1);
            black_box(m.temp(&Rand(r.to_be_bytes())).unwrap());
        })
    });
    parts.bench_function("rand_random", |b| {
        let mut rng = rand::rng();
        b.iter(|| black_box(Rand::random(&mut rng)))
    });
    parts.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
