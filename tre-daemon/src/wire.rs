//! The device façade's types in their protobuf form (`mcim.common.v1`, `mcim.tre.v1`): used by
//! the local API ([`crate::service`]) and by the provisioning run where it sends them to the
//! roles (evidence to the PVA).

use mcim_core::identity::DeviceIdentity;
use mcim_core::lifecycle::{BlockReason, McimState};
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::tre::v1 as pb;

use crate::device::{Evidence, EvidenceKind, McimView};
use crate::tre::{AkaExecution, TreKind};

/// A lifecycle state.
pub fn state(s: McimState) -> common::McimState {
    match s {
        McimState::Installed => common::McimState::Installed,
        McimState::Activated => common::McimState::Activated,
        McimState::Selected => common::McimState::Selected,
        McimState::Blocked => common::McimState::Blocked,
        McimState::Retired => common::McimState::Retired,
        McimState::Deleted => common::McimState::Deleted,
    }
}

/// Where AKA runs.
pub fn aka_execution(a: AkaExecution) -> common::AkaExecution {
    match a {
        AkaExecution::InTre => common::AkaExecution::InTre,
        AkaExecution::UnsealedInHost => common::AkaExecution::UnsealedInHost,
    }
}

/// The kind of TRE.
pub fn tre_kind(k: TreKind) -> common::TreKind {
    match k {
        TreKind::Tpm2 => common::TreKind::Tpm2,
        TreKind::Pkcs11 => common::TreKind::Pkcs11,
    }
}

/// A device identity.
pub fn identity(i: &DeviceIdentity) -> common::DeviceIdentity {
    common::DeviceIdentity {
        device_id: i.device_id.clone(),
        pcid: i.pcid.as_str().to_string(),
        model: i.model.clone(),
    }
}

/// An MCIM's registry entry.
pub fn mcim(m: &McimView) -> pb::Mcim {
    pb::Mcim {
        mcim_id: m.id.clone(),
        imsi: m.id.clone(),
        sho_id: m.sho.clone(),
        state: state(m.state) as i32,
        blocked_reason: m
            .blocked
            .map(|b| match b {
                BlockReason::PinBlocked => "pin_blocked",
                BlockReason::Requested => "requested",
                BlockReason::Tampered => "tampered",
                BlockReason::BySho => "by_sho",
            })
            .unwrap_or_default()
            .into(),
        pin_retries_left: m.pin_tries_left,
        connectivity: m.connectivity,
        installed_at: None,
        expires_at: m.expires_at.map(|s| prost_types::Timestamp {
            seconds: i64::try_from(s).unwrap_or(i64::MAX),
            nanos: 0,
        }),
    }
}

/// Evidence for the PVA.
pub fn evidence(e: Evidence) -> common::Evidence {
    common::Evidence {
        kind: Some(match e.kind {
            EvidenceKind::TpmQuote(q) => common::evidence::Kind::TpmQuote(common::TpmQuote {
                attest: q.attest,
                signature: q.signature,
                pcrs: q
                    .pcrs
                    .iter()
                    .zip(&q.pcr_values)
                    .map(|(i, v)| common::PcrValue {
                        index: u32::from(*i),
                        digest: v.to_vec(),
                    })
                    .collect(),
                pcr_bank: "sha256".into(),
            }),
            EvidenceKind::TokenSignature { payload, signature } => {
                common::evidence::Kind::Pkcs11Signature(common::Pkcs11Signature {
                    payload,
                    signature,
                })
            }
        }),
        aka_execution: aka_execution(e.aka_execution) as i32,
        platform_credential: e.platform_credential,
    }
}
