//! The wire contract as built: every package is there, every RPC is documented with the
//! seed clause it serves, and messages round-trip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mcim_proto::FILE_DESCRIPTOR_SET;
use prost::Message;
use prost_types::FileDescriptorSet;

fn fds() -> FileDescriptorSet {
    FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap()
}

#[test]
fn every_area_has_its_versioned_package_and_services() {
    let fds = fds();
    let mut found: Vec<(String, Vec<String>)> = fds
        .file
        .iter()
        .filter(|f| f.package().starts_with("mcim."))
        .map(|f| {
            (
                f.package().to_string(),
                f.service.iter().map(|s| s.name().to_string()).collect(),
            )
        })
        .collect();
    found.sort();
    let expect: Vec<(&str, Vec<&str>)> = vec![
        ("mcim.common.v1", vec![]),
        ("mcim.pva.v1", vec!["PvaService"]),
        ("mcim.ro.v1", vec!["IcfService", "DrfService", "DpfService"]),
        ("mcim.sho.v1", vec!["ShoService"]),
        ("mcim.supplier.v1", vec!["SupplierService"]),
        ("mcim.tre.v1", vec!["TreService"]),
        ("mcim.vno.v1", vec!["VnoService"]),
    ];
    let got: Vec<(&str, Vec<&str>)> = found
        .iter()
        .map(|(p, s)| (p.as_str(), s.iter().map(String::as_str).collect()))
        .collect();
    assert_eq!(got, expect);
}

/// Every RPC's leading comment names the clause of TR 33.812 (or of a 3GPP TS) it serves.
#[test]
fn every_rpc_cites_a_clause() {
    let fds = fds();
    let mut rpcs = 0;
    let mut missing = Vec::new();
    for f in fds.file.iter().filter(|f| f.package().starts_with("mcim.")) {
        let info = f
            .source_code_info
            .as_ref()
            .expect("descriptor set carries source info");
        for (si, s) in f.service.iter().enumerate() {
            for (mi, m) in s.method.iter().enumerate() {
                rpcs += 1;
                // path: service = 6, index, method = 2, index
                let path = [6, si as i32, 2, mi as i32];
                let comment = info
                    .location
                    .iter()
                    .find(|l| l.path == path)
                    .and_then(|l| l.leading_comments.clone())
                    .unwrap_or_default();
                let cites = comment.contains("5.1.")
                    || comment.contains("annex x.")
                    || comment.contains("TS 33.102");
                if !cites {
                    missing.push(format!("{}.{}", s.name(), m.name()));
                }
            }
        }
    }
    assert!(missing.is_empty(), "RPCs that cite no clause: {missing:?}");
    assert!(rpcs >= 50, "only {rpcs} RPCs found");
}

#[test]
fn messages_round_trip() {
    use mcim_proto::mcim::common::v1::{AuthChallenge, Evidence, TpmQuote, evidence};
    use mcim_proto::mcim::vno::v1::{CompleteAttachRequest, complete_attach_request};
    let e = Evidence {
        kind: Some(evidence::Kind::TpmQuote(TpmQuote {
            attest: vec![1, 2, 3],
            signature: vec![4],
            pcrs: vec![],
            pcr_bank: "sha256".into(),
        })),
        aka_execution: 1,
        platform_credential: vec![vec![9; 4]],
    };
    assert_eq!(Evidence::decode(e.encode_to_vec().as_slice()).unwrap(), e);
    let c = CompleteAttachRequest {
        attach_id: "a1".into(),
        answer: Some(complete_attach_request::Answer::Res(vec![0xa5; 8])),
    };
    assert_eq!(
        CompleteAttachRequest::decode(c.encode_to_vec().as_slice()).unwrap(),
        c
    );
    let ch = AuthChallenge {
        rand: vec![1; 16],
        autn: vec![2; 16],
    };
    assert_eq!(
        AuthChallenge::decode(ch.encode_to_vec().as_slice()).unwrap(),
        ch
    );
}
