//! The device's certificates from supply time (public material, kept as a file in the state
//! directory): the platform credential (the attestation key's chain to the supplier root,
//! 5.1.3.5.8 PfC) and the TLS key's chain, both as the supplier's CertifyDevice returned them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::registry::files::{read_optional, write_atomic};

/// The chains, DER, leaf first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCertificates {
    /// The attestation key's chain.
    #[serde(with = "hex_list")]
    pub platform_credential: Vec<Vec<u8>>,
    /// The TLS key's chain.
    #[serde(with = "hex_list")]
    pub tls_certificate: Vec<Vec<u8>>,
}

mod hex_list {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(hex::encode))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|h| hex::decode(h).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// Where they are kept.
#[derive(Clone, Debug)]
pub struct Certificates {
    path: PathBuf,
}

impl Certificates {
    /// `certificates.json` in `state_dir`.
    pub fn new(state_dir: &std::path::Path) -> Self {
        Self {
            path: state_dir.join("certificates.json"),
        }
    }

    /// The stored chains, if any.
    pub fn load(&self) -> Result<Option<DeviceCertificates>, String> {
        read_optional(&self.path)
            .map_err(|e| format!("{}: {e}", self.path.display()))?
            .map(|b| {
                serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", self.path.display()))
            })
            .transpose()
    }

    /// Replaces them.
    pub fn store(&self, c: &DeviceCertificates) -> Result<(), String> {
        if c.platform_credential.is_empty() || c.tls_certificate.is_empty() {
            return Err("both certificate chains are required".into());
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let json = serde_json::to_vec_pretty(c).map_err(|e| e.to_string())?;
        write_atomic(&self.path, &json).map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

/// Whether the certificate `der` certifies the key `spki` (DER SubjectPublicKeyInfo).
pub fn certifies(der: &[u8], spki: &[u8]) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(der)
        .map(|(_, c)| c.public_key().raw == spki)
        .unwrap_or(false)
}
