//! The device's parameters as the owner exports them from `tred` (`mcimctl device
//! parameters`) and the subscriber hands them to an SHO (`mcimctl subscriber register`;
//! TR 33.812 5.1.3.5.2): one JSON file.

use std::path::Path;

use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::sho::v1 as sho;
use mcim_proto::mcim::tre::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::error::{CliError, fail};

/// The device's parameters as the owner hands them to the subscriber: a JSON file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceParameters {
    /// The supplier's device identifier.
    pub device_id: String,
    /// The PCID (IMSI format).
    pub pcid: String,
    /// The equipment model.
    pub model: String,
    /// "tpm2" or "pkcs11".
    pub tre_kind: String,
    /// The storage key's public area or SPKI, hex: the SHO wraps the MCIM to it.
    pub storage_public: String,
    /// The platform credential, DER certificates in hex, leaf first.
    pub platform_credential: Vec<String>,
    /// "in_tre" or "unsealed_in_host".
    pub aka_execution: String,
    /// The owner's proof that it controls the device, for one subscriber at one SHO (annex
    /// x.2.3; `mcimctl device parameters --for-subscriber --sho-id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ownership_proof: Option<ProofFile>,
}

/// An ownership proof in the parameters file, hex.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofFile {
    /// The statement the device signed.
    pub payload: String,
    /// Its signature by the device's TRE-held TLS key, DER.
    pub signature: String,
    /// That key's certificate chain, DER, leaf first.
    pub tls_certificate: Vec<String>,
}

impl ProofFile {
    /// From tred's ProveOwnership.
    pub fn from_pb(p: common::OwnershipProof) -> Self {
        Self {
            payload: hex::encode(p.payload),
            signature: hex::encode(p.signature),
            tls_certificate: p.tls_certificate.iter().map(hex::encode).collect(),
        }
    }
}

impl DeviceParameters {
    /// From tred's GetDeviceParameters.
    pub fn from_pb(r: pb::GetDeviceParametersResponse) -> Self {
        let id = r.identity.unwrap_or_default();
        Self {
            device_id: id.device_id,
            pcid: id.pcid,
            model: id.model,
            tre_kind: match common::TreKind::try_from(r.tre_kind) {
                Ok(common::TreKind::Pkcs11) => "pkcs11",
                _ => "tpm2",
            }
            .into(),
            storage_public: hex::encode(r.storage_public),
            platform_credential: r.platform_credential.iter().map(hex::encode).collect(),
            aka_execution: match common::AkaExecution::try_from(r.aka_execution) {
                Ok(common::AkaExecution::InTre) => "in_tre",
                Ok(common::AkaExecution::UnsealedInHost) => "unsealed_in_host",
                _ => "unspecified",
            }
            .into(),
            ownership_proof: None,
        }
    }

    /// The SHO's CreateSubscription for `account`; a malformed file is refused here.
    pub fn subscription(
        &self,
        account: &str,
        require_aka_in_tre: bool,
    ) -> Result<sho::CreateSubscriptionRequest, CliError> {
        let tre_kind = match self.tre_kind.as_str() {
            "tpm2" => common::TreKind::Tpm2,
            "pkcs11" => common::TreKind::Pkcs11,
            other => return Err(fail(format!("tre_kind {other:?}: tpm2 or pkcs11"))),
        };
        let unhex = |what: &str, s: &str| {
            hex::decode(s).map_err(|e| fail(format!("{what}: not hex ({e})")))
        };
        Ok(sho::CreateSubscriptionRequest {
            subscriber: account.into(),
            device: Some(common::DeviceIdentity {
                device_id: self.device_id.clone(),
                pcid: self.pcid.clone(),
                model: self.model.clone(),
            }),
            tre_kind: tre_kind as i32,
            storage_public: unhex("storage_public", &self.storage_public)?,
            platform_credential: self
                .platform_credential
                .iter()
                .map(|c| unhex("platform_credential", c))
                .collect::<Result<_, _>>()?,
            require_aka_in_tre,
            ownership_proof: self
                .ownership_proof
                .as_ref()
                .map(|p| {
                    Ok::<_, CliError>(common::OwnershipProof {
                        payload: unhex("ownership_proof.payload", &p.payload)?,
                        signature: unhex("ownership_proof.signature", &p.signature)?,
                        tls_certificate: p
                            .tls_certificate
                            .iter()
                            .map(|c| unhex("ownership_proof.tls_certificate", c))
                            .collect::<Result<_, _>>()?,
                    })
                })
                .transpose()?,
        })
    }

    /// Reads a parameters file.
    pub fn read(path: &Path) -> Result<Self, CliError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| fail(format!("{}: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> DeviceParameters {
        DeviceParameters {
            device_id: "D-1".into(),
            pcid: "001010000000001".into(),
            model: "m".into(),
            tre_kind: "tpm2".into(),
            storage_public: "0102".into(),
            platform_credential: vec!["30".into()],
            aka_execution: "in_tre".into(),
            ownership_proof: None,
        }
    }

    #[test]
    fn the_file_becomes_the_shos_request_and_bad_fields_are_refused() {
        let r = params().subscription("acct", true).unwrap_or_default();
        assert_eq!(r.storage_public, vec![1, 2]);
        assert_eq!(r.platform_credential, vec![vec![0x30]]);
        assert_eq!(r.tre_kind, common::TreKind::Tpm2 as i32);
        assert!(r.require_aka_in_tre);
        assert_eq!(r.device.map(|d| d.pcid), Some("001010000000001".into()));
        let mut p = params();
        p.tre_kind = "tpm1".into();
        assert!(p.subscription("a", false).is_err());
        let mut p = params();
        p.storage_public = "zz".into();
        assert!(p.subscription("a", false).is_err());
        assert!(serde_json::from_str::<DeviceParameters>("{\"pcid\": \"1\"}").is_err());
    }
}
