//! `mcimctl aka` end to end: the real binary against TS 35.208 sets 1-20.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output};

fn mcimctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mcimctl"))
        .args(args)
        .output()
        .expect("run mcimctl")
}

fn sets() -> Vec<serde_json::Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../core/testdata/milenage_ts35208.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn s<'a>(v: &'a serde_json::Value, k: &str) -> &'a str {
    v[k].as_str().unwrap()
}

#[test]
fn milenage_json_reproduces_every_set_from_op_and_from_opc() {
    let sets = sets();
    assert_eq!(sets.len(), 20);
    for t in &sets {
        for (flag, key) in [("--op", "op"), ("--opc", "opc")] {
            let out = mcimctl(&[
                "aka",
                "milenage",
                "--k",
                s(t, "k"),
                flag,
                s(t, key),
                "--rand",
                s(t, "rand"),
                "--sqn",
                s(t, "sqn"),
                "--amf",
                s(t, "amf"),
                "--json",
            ]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8(out.stdout).unwrap();
            assert_eq!(
                text.trim().lines().count(),
                1,
                "exactly one JSON object: {text}"
            );
            let j: serde_json::Value = serde_json::from_str(&text).unwrap();
            for f in ["f1", "f1star", "f2", "f3", "f4", "f5", "f5star"] {
                assert_eq!(j[f], t[f], "set {} {f} via {flag}", t["set"]);
            }
            if flag == "--op" {
                assert_eq!(j["opc"], t["opc"], "set {} opc", t["set"]);
            } else {
                assert!(j.get("opc").is_none());
            }
        }
    }
}

#[test]
fn milenage_text_output_names_every_function() {
    let t = &sets()[0];
    let out = mcimctl(&[
        "aka",
        "milenage",
        "--k",
        s(t, "k"),
        "--op",
        s(t, "op"),
        "--rand",
        s(t, "rand"),
        "--sqn",
        s(t, "sqn"),
        "--amf",
        s(t, "amf"),
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    for f in ["f1", "f1star", "f2", "f3", "f4", "f5", "f5star", "opc"] {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(f))
            .unwrap();
        assert_eq!(line.split_whitespace().nth(1), t[f].as_str(), "{f}");
    }
}

/// AUTS for set `t` and SQN_MS `sqn`, built with the CLI's own f1* (AMF 0000) and f5*.
fn auts_for(t: &serde_json::Value, sqn: &str) -> String {
    let out = mcimctl(&[
        "aka",
        "milenage",
        "--k",
        s(t, "k"),
        "--opc",
        s(t, "opc"),
        "--rand",
        s(t, "rand"),
        "--sqn",
        sqn,
        "--amf",
        "0000",
        "--json",
    ]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ak = hex::decode(j["f5star"].as_str().unwrap()).unwrap();
    let sq = hex::decode(sqn).unwrap();
    let conc: Vec<u8> = sq.iter().zip(&ak).map(|(a, b)| a ^ b).collect();
    format!("{}{}", hex::encode(conc), j["f1star"].as_str().unwrap())
}

#[test]
fn auts_recovers_sqn_ms() {
    for t in sets().iter().take(6) {
        let sqn = "00000000abcd";
        let auts = auts_for(t, sqn);
        let out = mcimctl(&[
            "aka",
            "auts",
            "--k",
            s(t, "k"),
            "--opc",
            s(t, "opc"),
            "--rand",
            s(t, "rand"),
            "--auts",
            &auts,
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["sqn_ms"], sqn);
        // The same from OP.
        let out = mcimctl(&[
            "aka",
            "auts",
            "--k",
            s(t, "k"),
            "--op",
            s(t, "op"),
            "--rand",
            s(t, "rand"),
            "--auts",
            &auts,
        ]);
        assert_eq!(
            String::from_utf8(out.stdout).unwrap().trim(),
            format!("sqn_ms {sqn}")
        );
    }
}

#[test]
fn auts_with_bad_mac_s_fails_clearly() {
    let t = &sets()[2];
    let mut auts = auts_for(t, "000000001000");
    let last = auts.pop().unwrap();
    auts.push(if last == '0' { '1' } else { '0' });
    let out = mcimctl(&[
        "aka",
        "auts",
        "--k",
        s(t, "k"),
        "--opc",
        s(t, "opc"),
        "--rand",
        s(t, "rand"),
        "--auts",
        &auts,
        "--json",
    ]);
    assert!(!out.status.success());
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "prints no SQN_MS");
    assert!(String::from_utf8_lossy(&out.stderr).contains("MAC-S does not verify"));
}

#[test]
fn bad_hex_or_length_names_the_argument_and_exits_2() {
    let t = &sets()[0];
    let base = |k: &str, rand: &str, sqn: &str, amf: &str| {
        mcimctl(&[
            "aka",
            "milenage",
            "--k",
            k,
            "--op",
            s(t, "op"),
            "--rand",
            rand,
            "--sqn",
            sqn,
            "--amf",
            amf,
        ])
    };
    let (k, r, q, a) = (s(t, "k"), s(t, "rand"), s(t, "sqn"), s(t, "amf"));
    for (out, arg) in [
        (base(&k[..30], r, q, a), "--k"),
        (base("zz5b5ce8b199b49faa5f0a2ee238a6bc", r, q, a), "--k"),
        (base(k, &format!("{r}00"), q, a), "--rand"),
        (base(k, r, "ff9bb4d0b6", a), "--sqn"),
        (base(k, r, q, "b9b9b9"), "--amf"),
    ] {
        assert_eq!(out.status.code(), Some(2), "{arg}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(arg), "error names {arg}: {err}");
        assert!(out.stdout.is_empty());
    }
    let out = mcimctl(&[
        "aka",
        "auts",
        "--k",
        k,
        "--opc",
        s(t, "opc"),
        "--rand",
        r,
        "--auts",
        "0011",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--auts"));
}

#[test]
fn op_or_opc_is_required_and_not_both() {
    let t = &sets()[0];
    let (k, r, q, a) = (s(t, "k"), s(t, "rand"), s(t, "sqn"), s(t, "amf"));
    let none = mcimctl(&[
        "aka", "milenage", "--k", k, "--rand", r, "--sqn", q, "--amf", a,
    ]);
    assert_eq!(none.status.code(), Some(2));
    let both = mcimctl(&[
        "aka",
        "milenage",
        "--k",
        k,
        "--op",
        s(t, "op"),
        "--opc",
        s(t, "opc"),
        "--rand",
        r,
        "--sqn",
        q,
        "--amf",
        a,
    ]);
    assert_eq!(both.status.code(), Some(2));
}

#[test]
fn operator_constants_are_accepted_and_checked() {
    let t = &sets()[0];
    let (k, r, q, a) = (s(t, "k"), s(t, "rand"), s(t, "sqn"), s(t, "amf"));
    let std_r = mcimctl(&[
        "aka",
        "milenage",
        "--k",
        k,
        "--opc",
        s(t, "opc"),
        "--rand",
        r,
        "--sqn",
        q,
        "--amf",
        a,
        "--r",
        "64",
        "0",
        "32",
        "64",
        "96",
        "--json",
    ]);
    let j: serde_json::Value = serde_json::from_slice(&std_r.stdout).unwrap();
    assert_eq!(
        j["f1"], t["f1"],
        "spec rotations given explicitly reproduce set 1"
    );
    let other = mcimctl(&[
        "aka",
        "milenage",
        "--k",
        k,
        "--opc",
        s(t, "opc"),
        "--rand",
        r,
        "--sqn",
        q,
        "--amf",
        a,
        "--r",
        "8",
        "16",
        "24",
        "40",
        "56",
        "--json",
    ]);
    let j: serde_json::Value = serde_json::from_slice(&other.stdout).unwrap();
    assert_ne!(j["f1"], t["f1"]);
    let bad = mcimctl(&[
        "aka",
        "milenage",
        "--k",
        k,
        "--opc",
        s(t, "opc"),
        "--rand",
        r,
        "--sqn",
        q,
        "--amf",
        a,
        "--r",
        "1",
        "2",
        "3",
        "4",
        "128",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--r"));
}
