//! MILENAGE against 3GPP TS 35.208 test sets 1-20 (sets 1-6 equal TS 35.207's), from OP and
//! from OPc, and AKA round trips between the network and the device sides.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mcim_core::aka::device::DeviceAkaError;
use mcim_core::aka::milenage::{derive_opc, infallible};
use mcim_core::aka::network::NetworkAkaError;
use mcim_core::aka::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct TestSet {
    set: u32,
    k: String,
    rand: String,
    sqn: String,
    amf: String,
    op: String,
    opc: String,
    f1: String,
    f1star: String,
    f2: String,
    f3: String,
    f4: String,
    f5: String,
    f5star: String,
}

fn arr<const N: usize>(h: &str) -> [u8; N] {
    hex::decode(h).unwrap().try_into().unwrap()
}

fn sets() -> Vec<TestSet> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/testdata/milenage_ts35208.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn check_outputs(t: &TestSet, m: &Milenage<SoftKernel>) {
    let out = infallible(m.compute(&Rand(arr(&t.rand)), &arr(&t.sqn), &Amf(arr(&t.amf))));
    let s = t.set;
    assert_eq!(hex::encode(out.mac_a), t.f1, "set {s} f1");
    assert_eq!(hex::encode(out.mac_s), t.f1star, "set {s} f1*");
    assert_eq!(hex::encode(out.f2345.res.0), t.f2, "set {s} f2");
    assert_eq!(hex::encode(out.f2345.ck.expose()), t.f3, "set {s} f3");
    assert_eq!(hex::encode(out.f2345.ik.expose()), t.f4, "set {s} f4");
    assert_eq!(hex::encode(out.f2345.ak), t.f5, "set {s} f5");
    assert_eq!(hex::encode(out.f2345.ak_star), t.f5star, "set {s} f5*");
    // The split entry points agree with the batched one.
    let rand = Rand(arr(&t.rand));
    let (a, b) = infallible(m.f1(&rand, &arr(&t.sqn), &Amf(arr(&t.amf))));
    assert_eq!((a, b), (out.mac_a, out.mac_s), "set {s} f1 split");
    let f = infallible(m.f2345(&rand));
    assert_eq!(f.ak_star, out.f2345.ak_star, "set {s} f2345 split");
}

#[test]
fn all_ts35208_sets_from_op() {
    let sets = sets();
    assert_eq!(sets.len(), 20);
    for t in &sets {
        let k = K::new(arr(&t.k));
        let m = infallible(Milenage::with_op(
            SoftKernel::new(&k),
            &Op::new(arr(&t.op)),
            Constants::default(),
        ));
        assert_eq!(hex::encode(m.opc().expose()), t.opc, "set {} OPc", t.set);
        check_outputs(t, &m);
    }
}

#[test]
fn all_ts35208_sets_from_opc() {
    for t in &sets() {
        let k = K::new(arr(&t.k));
        let m = Milenage::with_opc(
            SoftKernel::new(&k),
            Opc::new(arr(&t.opc)),
            Constants::default(),
        );
        check_outputs(t, &m);
    }
}

#[test]
fn sets_1_to_6_equal_the_shared_ts35207_file_when_present() {
    let shared = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/testdata/milenage_ts35207.json"
    );
    let Ok(text) = std::fs::read_to_string(shared) else {
        // Outside the workplace the shared folder does not exist; our own file is the source.
        return;
    };
    let theirs: Vec<TestSet> = serde_json::from_str(&text).unwrap();
    let ours = sets();
    for t in theirs {
        let o = ours.iter().find(|o| o.set == t.set).unwrap();
        assert_eq!(
            (&o.k, &o.op, &o.f3, &o.f5star),
            (&t.k, &t.op, &t.f3, &t.f5star)
        );
    }
}

#[test]
fn agrees_with_the_milenage_crate_on_random_inputs() {
    let mut rng = rand::rng();
    for _ in 0..200 {
        let mut b = [0u8; 16 * 3 + 6 + 2];
        rand::Rng::fill_bytes(&mut rng, &mut b);
        let k: [u8; 16] = b[..16].try_into().unwrap();
        let op: [u8; 16] = b[16..32].try_into().unwrap();
        let rand_: [u8; 16] = b[32..48].try_into().unwrap();
        let sqn: [u8; 6] = b[48..54].try_into().unwrap();
        let amf: [u8; 2] = b[54..56].try_into().unwrap();
        let ours = infallible(Milenage::with_op(
            SoftKernel::new(&K::new(k)),
            &Op::new(op),
            Constants::default(),
        ));
        let out = infallible(ours.compute(&Rand(rand_), &sqn, &Amf(amf)));
        let mut theirs = ::milenage::Milenage::new_with_op(k, op);
        assert_eq!(theirs.opc(), ours.opc().expose());
        assert_eq!(theirs.f1(&rand_, &sqn, &amf), out.mac_a);
        assert_eq!(theirs.f1star(&rand_, &sqn, &amf), out.mac_s);
        let (res, ck, ik, ak) = theirs.f2345(&rand_);
        assert_eq!(res, out.f2345.res.0);
        assert_eq!(&ck, out.f2345.ck.expose());
        assert_eq!(&ik, out.f2345.ik.expose());
        assert_eq!(ak, out.f2345.ak);
        assert_eq!(theirs.f5star(&rand_), out.f2345.ak_star);
    }
}

#[test]
fn operator_constants_change_every_output() {
    let k = K::new([0x11; 16]);
    let opc = Opc::new([0x22; 16]);
    let std_m = Milenage::with_opc(SoftKernel::new(&k), opc.clone(), Constants::default());
    let c = [[0x5a; 16], [0x01; 16], [0x02; 16], [0x04; 16], [0x08; 16]];
    let custom = Milenage::with_opc(
        SoftKernel::new(&k),
        opc,
        Constants::new(c, [8, 16, 24, 40, 56]).unwrap(),
    );
    let (r, s, a) = (Rand([3; 16]), [0, 0, 0, 0, 0, 1], Amf([0x80, 0]));
    let x = infallible(std_m.compute(&r, &s, &a));
    let y = infallible(custom.compute(&r, &s, &a));
    assert_ne!(x.mac_a, y.mac_a);
    assert_ne!(x.f2345.res.0, y.f2345.res.0);
    assert_ne!(x.f2345.ck, y.f2345.ck);
    assert_ne!(x.f2345.ik, y.f2345.ik);
    assert_ne!(x.f2345.ak, y.f2345.ak);
    assert_ne!(x.f2345.ak_star, y.f2345.ak_star);
}

#[test]
fn opc_from_op_matches_set_1() {
    let t = &sets()[0];
    let opc = infallible(derive_opc(
        &SoftKernel::new(&K::new(arr(&t.k))),
        &Op::new(arr(&t.op)),
    ));
    assert_eq!(hex::encode(opc.expose()), t.opc);
}

fn subscriber(k: [u8; 16]) -> Milenage<SoftKernel> {
    Milenage::with_opc(
        SoftKernel::new(&K::new(k)),
        Opc::new([0x5c; 16]),
        Constants::default(),
    )
}

const AMF: Amf = Amf([0x80, 0x00]);

#[test]
fn round_trip_av_to_device_res_equals_xres() {
    let (net, dev) = (subscriber([7; 16]), subscriber([7; 16]));
    let p = SqnProfile::default();
    let mut he = HeSqnState::default();
    let mut ms = MsSqnState::new(&p);
    let mut rng = rand::rng();
    for _ in 0..40 {
        let av = generate_av(&net, &mut he, &p, AMF, Rand::random(&mut rng)).unwrap();
        match authenticate(&dev, &mut ms, &p, &av.rand, &av.autn).unwrap() {
            DeviceResponse::Success { res, ck, ik } => {
                assert!(res.ct_matches(&av.xres));
                assert_eq!(ck, av.ck);
                assert_eq!(ik, av.ik);
            }
            other => panic!("expected success, got {other:?}"),
        }
    }
}

#[test]
fn replayed_challenge_gives_auts_and_changes_nothing() {
    let (net, dev) = (subscriber([7; 16]), subscriber([7; 16]));
    let p = SqnProfile::default();
    let mut he = HeSqnState::default();
    let mut ms = MsSqnState::new(&p);
    let av = generate_av(&net, &mut he, &p, AMF, Rand([1; 16])).unwrap();
    assert!(matches!(
        authenticate(&dev, &mut ms, &p, &av.rand, &av.autn).unwrap(),
        DeviceResponse::Success { .. }
    ));
    let before = ms.clone();
    let again = authenticate(&dev, &mut ms, &p, &av.rand, &av.autn).unwrap();
    assert!(
        matches!(again, DeviceResponse::SyncFailure { .. }),
        "{again:?}"
    );
    assert_eq!(ms, before);
}

#[test]
fn forced_desync_then_auts_then_resync_then_next_av_accepted() {
    let (net, dev) = (subscriber([9; 16]), subscriber([9; 16]));
    let p = SqnProfile::default();
    let mut ms = MsSqnState::new(&p);
    // The device has already used vectors up to SEQ 5000 (from another AuC copy, say) ...
    let mut ahead = HeSqnState {
        seq_he: 4999,
        next_ind: 0,
    };
    for _ in 0..32 {
        let av = generate_av(&net, &mut ahead, &p, AMF, Rand([2; 16])).unwrap();
        authenticate(&dev, &mut ms, &p, &av.rand, &av.autn).unwrap();
    }
    // ... while this AuC's counter is far behind: its vector is stale.
    let mut he = HeSqnState {
        seq_he: 10,
        next_ind: 0,
    };
    let stale = generate_av(&net, &mut he, &p, AMF, Rand([3; 16])).unwrap();
    let auts = match authenticate(&dev, &mut ms, &p, &stale.rand, &stale.autn).unwrap() {
        DeviceResponse::SyncFailure { auts, .. } => auts,
        other => panic!("expected AUTS, got {other:?}"),
    };
    let sqn_ms = resynchronise(&net, &mut he, &p, &stale.rand, &auts).unwrap();
    assert_eq!(p.seq(sqn_ms), 5031);
    assert_eq!(he.seq_he, 5031);
    let next = generate_av(&net, &mut he, &p, AMF, Rand([4; 16])).unwrap();
    match authenticate(&dev, &mut ms, &p, &next.rand, &next.autn).unwrap() {
        DeviceResponse::Success { res, .. } => assert!(res.ct_matches(&next.xres)),
        other => panic!("expected success after resync, got {other:?}"),
    }
}

#[test]
fn auts_with_bad_mac_s_is_refused_and_changes_nothing() {
    let (net, dev) = (subscriber([9; 16]), subscriber([9; 16]));
    let p = SqnProfile::default();
    let mut ms = MsSqnState::from_entries(&p, vec![100; 32]).unwrap();
    let mut he = HeSqnState::default();
    let av = generate_av(&net, &mut he, &p, AMF, Rand([5; 16])).unwrap();
    let DeviceResponse::SyncFailure { auts, .. } =
        authenticate(&dev, &mut ms, &p, &av.rand, &av.autn).unwrap()
    else {
        panic!("expected AUTS")
    };
    let before = he.clone();
    let mut bad = auts;
    bad.0[13] ^= 1;
    assert!(matches!(
        resynchronise(&net, &mut he, &p, &av.rand, &bad),
        Err(NetworkAkaError::MacS)
    ));
    assert_eq!(he, before);
    // A good AUTS under another RAND is refused too.
    assert!(matches!(
        resynchronise(&net, &mut he, &p, &Rand([6; 16]), &auts),
        Err(NetworkAkaError::MacS)
    ));
    assert_eq!(he, before);
    // And the genuine one works.
    assert_eq!(
        p.seq(resynchronise(&net, &mut he, &p, &av.rand, &auts).unwrap()),
        100
    );
}

#[test]
fn wrong_k_is_a_mac_failure_and_changes_nothing() {
    let (net, dev) = (subscriber([7; 16]), subscriber([8; 16]));
    let p = SqnProfile::default();
    let mut he = HeSqnState::default();
    let mut ms = MsSqnState::new(&p);
    let av = generate_av(&net, &mut he, &p, AMF, Rand([1; 16])).unwrap();
    let before = ms.clone();
    assert!(matches!(
        authenticate(&dev, &mut ms, &p, &av.rand, &av.autn),
        Err(DeviceAkaError::MacFailure)
    ));
    assert_eq!(ms, before);
}

#[test]
fn altered_autn_is_a_mac_failure() {
    let (net, dev) = (subscriber([7; 16]), subscriber([7; 16]));
    let p = SqnProfile::default();
    let mut he = HeSqnState::default();
    let av = generate_av(&net, &mut he, &p, AMF, Rand([1; 16])).unwrap();
    for byte in [0usize, 6, 15] {
        let mut autn = av.autn;
        autn.0[byte] ^= 0x01;
        let mut ms = MsSqnState::new(&p);
        assert!(
            matches!(
                authenticate(&dev, &mut ms, &p, &av.rand, &autn),
                Err(DeviceAkaError::MacFailure)
            ),
            "flipped byte {byte}"
        );
    }
}

#[test]
fn exhausted_counter_makes_no_vector_and_changes_nothing() {
    let net = subscriber([7; 16]);
    let p = SqnProfile::default();
    let mut he = HeSqnState {
        seq_he: p.max_seq(),
        next_ind: 3,
    };
    let before = he.clone();
    assert!(matches!(
        generate_av(&net, &mut he, &p, AMF, Rand([1; 16])),
        Err(NetworkAkaError::Sqn(_))
    ));
    assert_eq!(he, before);
}

#[test]
fn recover_sqn_ms_matches_ts35208_set_1_resync_inputs() {
    // Build an AUTS by hand from set 1's f1* and f5* (AMF = 0000 is what AUTS uses, so
    // compute MAC-S for that AMF) and recover SQN.
    let t = &sets()[0];
    let m = Milenage::with_opc(
        SoftKernel::new(&K::new(arr(&t.k))),
        Opc::new(arr(&t.opc)),
        Constants::default(),
    );
    let rand = Rand(arr(&t.rand));
    let sqn: [u8; 6] = arr(&t.sqn);
    let (_, mac_s) = infallible(m.f1(&rand, &sqn, &Amf::RESYNC));
    let ak_star: [u8; 6] = arr(&t.f5star);
    let mut auts = [0u8; 14];
    for i in 0..6 {
        auts[i] = sqn[i] ^ ak_star[i];
    }
    auts[6..].copy_from_slice(&mac_s);
    assert_eq!(
        recover_sqn_ms(&m, &rand, &Auts(auts)).unwrap().to_bytes(),
        sqn
    );
}

#[test]
fn batch_of_vectors_equals_one_at_a_time_and_all_authenticate() {
    let (net, dev) = (subscriber([3; 16]), subscriber([3; 16]));
    let p = SqnProfile::default();
    let rands: Vec<Rand> = (0u8..5).map(|i| Rand([i; 16])).collect();
    let mut he_batch = HeSqnState::default();
    let batch = generate_avs(&net, &mut he_batch, &p, AMF, &rands).unwrap();
    let mut he_single = HeSqnState::default();
    let singles: Vec<AuthVector> = rands
        .iter()
        .map(|r| generate_av(&net, &mut he_single, &p, AMF, *r).unwrap())
        .collect();
    assert_eq!(he_batch, he_single);
    assert_eq!(batch.len(), 5);
    let mut ms = MsSqnState::new(&p);
    for (b, s) in batch.iter().zip(&singles) {
        assert_eq!(b.autn, s.autn);
        assert!(b.xres.ct_matches(&s.xres));
        assert_eq!(b.ck, s.ck);
        match authenticate(&dev, &mut ms, &p, &b.rand, &b.autn).unwrap() {
            DeviceResponse::Success { res, .. } => assert!(res.ct_matches(&b.xres)),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn batch_that_would_exhaust_the_counter_makes_nothing() {
    let net = subscriber([3; 16]);
    let p = SqnProfile::default();
    let mut he = HeSqnState {
        seq_he: p.max_seq() - 2,
        next_ind: 0,
    };
    let before = he.clone();
    let rands = [Rand([0; 16]); 5];
    assert!(matches!(
        generate_avs(&net, &mut he, &p, AMF, &rands),
        Err(NetworkAkaError::Sqn(_))
    ));
    assert_eq!(he, before);
}
