//! Identities of TR 33.812: the M2ME's Provisional Connectivity ID (PCID), an MCIM's IMSI,
//! and the supplier's device identity.
//!
//! Annex x.2.1: "the M2ME will use a PCID which has the same format as an IMSI, so that the
//! VNO does not have to be M2M-aware. The MCC and MNC fields ... will indicate ... which entity
//! it should contact to obtain authentication vectors". Both are therefore [`Imsi`]-shaped:
//! 6 to 15 decimal digits, MCC first (3 digits), then a 2- or 3-digit MNC whose length the
//! routing table knows (TS 23.003 2.2).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why an identity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Not 6..=15 decimal digits.
    #[error("{what} must be 6 to 15 decimal digits (IMSI format, TS 23.003 2.2), got {got:?}")]
    BadImsi {
        /// "PCID" or "IMSI"
        what: &'static str,
        /// the refused text, cut to 32 characters
        got: String,
    },
    /// Empty, too long, or with characters outside `[A-Za-z0-9._-]`.
    #[error("{what} must be 1 to 64 characters of A-Z a-z 0-9 . _ -, got {got:?}")]
    BadLabel {
        /// "device id" or "model"
        what: &'static str,
        /// the refused text, cut to 32 characters
        got: String,
    },
}

fn cut(s: &str) -> String {
    s.chars().take(32).collect()
}

fn check_imsi(what: &'static str, s: &str) -> Result<(), IdentityError> {
    if (6..=15).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(IdentityError::BadImsi { what, got: cut(s) })
    }
}

fn check_label(what: &'static str, s: &str) -> Result<(), IdentityError> {
    let ok = (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadLabel { what, got: cut(s) })
    }
}

macro_rules! imsi_like {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks the format.
            pub fn new(s: impl Into<String>) -> Result<Self, IdentityError> {
                let s = s.into();
                check_imsi($what, &s)?;
                Ok(Self(s))
            }

            /// The digits.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The mobile country code (first three digits).
            pub fn mcc(&self) -> &str {
                &self.0[..3]
            }

            /// MCC followed by the first `mnc_len` (2 or 3) digits of the MNC: the routing
            /// key of annex x.2.1.
            pub fn plmn(&self, mnc_len: usize) -> &str {
                &self.0[..3 + mnc_len.clamp(2, 3)]
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdentityError;
            fn try_from(s: String) -> Result<Self, IdentityError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdentityError;
            fn from_str(s: &str) -> Result<Self, IdentityError> {
                Self::new(s)
            }
        }
    };
}

imsi_like!(
    /// Provisional Connectivity ID, in IMSI format (TR 33.812 5.1.3.6.2 step 1, annex x.2.1).
    Pcid,
    "PCID"
);
imsi_like!(
    /// The IMSI of an operational MCIM.
    Imsi,
    "IMSI"
);

/// The supplier's identity of one piece of equipment, fixed at supply time (5.1.3.3.4) and
/// stored by the TRE (5.1.2.2: "securely store the identity of the M2ME platform").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceIdentity {
    /// Serial number or other supplier identifier.
    pub device_id: String,
    /// The PCID.
    pub pcid: Pcid,
    /// The model, which keys the PVA's reference values.
    pub model: String,
}

impl DeviceIdentity {
    /// Checks every field.
    pub fn new(
        device_id: impl Into<String>,
        pcid: Pcid,
        model: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let (device_id, model) = (device_id.into(), model.into());
        check_label("device id", &device_id)?;
        check_label("model", &model)?;
        Ok(Self {
            device_id,
            pcid,
            model,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcid_is_imsi_shaped_and_routes_by_mcc_mnc() {
        let p = Pcid::new("001010000000042").unwrap();
        assert_eq!(p.mcc(), "001");
        assert_eq!(p.plmn(2), "00101");
        assert_eq!(p.plmn(3), "001010");
        assert!(Pcid::new("00101").is_err());
        assert!(Pcid::new("0010100000000421").is_err());
        assert!(Pcid::new("00101x000000042").is_err());
        let e = Imsi::new("abc").unwrap_err().to_string();
        assert!(e.contains("IMSI"), "{e}");
    }

    #[test]
    fn serde_checks_the_format() {
        let ok: Pcid = serde_json::from_str("\"001010000000042\"").unwrap();
        assert_eq!(ok.as_str(), "001010000000042");
        assert!(serde_json::from_str::<Pcid>("\"12\"").is_err());
    }

    #[test]
    fn device_identity_checks_labels() {
        let p = Pcid::new("001010000000042").unwrap();
        assert!(DeviceIdentity::new("SN-0001", p.clone(), "m2m.meter_v2").is_ok());
        assert!(DeviceIdentity::new("", p.clone(), "m").is_err());
        assert!(DeviceIdentity::new("a b", p.clone(), "m").is_err());
        assert!(DeviceIdentity::new("a", p, "x".repeat(65)).is_err());
    }
}
