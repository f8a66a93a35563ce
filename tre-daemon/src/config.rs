//! `tred`'s configuration: a TOML file, then `MCIM_*` environment variables over it: every key
//! `k` has the variable `MCIM_K` (`tred --config-keys` lists them with their defaults, taken
//! from the type itself).
//!
//! ```toml
//! backend = "tpm"                      # MCIM_BACKEND: "tpm" or "pkcs11"
//! tcti = "device:/dev/tpmrm0"          # MCIM_TCTI; swtpm:host=127.0.0.1,port=2321; tabrmd:
//! pkcs11_module = "/usr/lib/softhsm/libsofthsm2.so"   # MCIM_PKCS11_MODULE
//! pkcs11_token = "mcim"                # MCIM_PKCS11_TOKEN: the token's label
//! pkcs11_pin_file = "/etc/mcim/pin"    # the user PIN, or MCIM_PKCS11_PIN (never logged)
//! pkcs11_unwrap = "auto"               # MCIM_PKCS11_UNWRAP: "auto" or "rsa-oaep"
//! tpm_aka = "auto"                     # MCIM_TPM_AKA: "auto" (K in the TPM when it has
//!                                      # TPM2_EncryptDecrypt2) or "sealed" (K as sealed data,
//!                                      # unsealed for each AKA: for a TPM whose
//!                                      # EncryptDecrypt2 is unusable; also exercises it)
//! state_dir = "/var/lib/mcim/tred"     # MCIM_STATE_DIR
//! socket = "/run/mcim/tred.sock"       # MCIM_SOCKET
//! socket_mode = "0660"                 # MCIM_SOCKET_MODE (octal)
//! owner_group = "mcim-owner"           # MCIM_OWNER_GROUP: may do everything (with root and
//!                                      # tred's own user)
//! modem_group = "mcim-modem"           # MCIM_MODEM_GROUP: AKA and attach, and reading
//! audit_group = "mcim-audit"           # MCIM_AUDIT_GROUP: reading only
//!                                      # (names or gids; none set: the socket is open to
//!                                      # whoever can connect, as `crate::access` says)
//! quote_pcrs = [0, 1, 2, 3, 4, 5, 6, 7] # MCIM_QUOTE_PCRS ("0,1,2")
//! log = "info"                         # MCIM_LOG (tracing filter)
//! rehabilitation_key = "04..."         # MCIM_REHABILITATION_KEY: the supplier's P-256 key
//!                                      # (SEC1 hex) whose tokens lift a lockdown
//! ca_file = "/etc/mcim/ca.pem"         # MCIM_CA_FILE: the roles' CA (provisioning)
//! ca_dir = "/etc/mcim/ca"              # MCIM_CA_DIR: ca-<role>.pem per role: each role's
//!                                      # server trusted under its own CA only
//! sho_ca_file = "/etc/mcim/ca-sho.pem" # MCIM_SHO_CA_FILE: the CA(s) that issue SHO
//!                                      # certificates; a package's signer must be one of
//!                                      # theirs (default: ca_file)
//! ro_url = "https://ro.example:7402"   # MCIM_RO_URL: the RO's DRF and DPF (replicas:
//!                                      # "https://ro-a:7402,https://ro-b:7402")
//! vno_url = "https://vno.example:7403" # MCIM_VNO_URL: the VNO (3GPP access; likewise)
//! usim_socket = "/run/mcim/usim.sock"  # MCIM_USIM_SOCKET: the USIM as raw APDUs (modem
//!                                      # bridges), for the modem and owner classes
//! usim_vpcd = "127.0.0.1:35963"        # MCIM_USIM_VPCD: the USIM as a PC/SC card, through
//!                                      # vsmartcard's vpcd (loopback only)
//! usim_vpcd_user = "root"              # MCIM_USIM_VPCD_USER: who must own vpcd's end (pcscd)
//! usim_vpcd_class = "modem"            # MCIM_USIM_VPCD_CLASS: "modem", or "owner" (PC/SC
//!                                      # applications may also change and unblock the PIN)
//! metrics_listen = "127.0.0.1:9464"    # MCIM_METRICS_LISTEN: Prometheus metrics, /metrics
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The daemon's settings.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Which TRE: "tpm" or "pkcs11".
    pub backend: String,
    /// The TPM's TCTI.
    pub tcti: String,
    /// The PKCS#11 module.
    pub pkcs11_module: PathBuf,
    /// The PKCS#11 token's label.
    pub pkcs11_token: String,
    /// A file holding the token's user PIN (MCIM_PKCS11_PIN takes precedence).
    pub pkcs11_pin_file: Option<PathBuf>,
    /// "auto" (ECDH + AES-KWP when the token has it, else RSA-OAEP) or "rsa-oaep".
    pub pkcs11_unwrap: String,
    /// "auto" (AKA in the TPM when it has TPM2_EncryptDecrypt2, else K unsealed) or "sealed"
    /// (always the sealed-K form, as if the TPM lacked EncryptDecrypt2).
    pub tpm_aka: String,
    /// Registry, audit log and records.
    pub state_dir: PathBuf,
    /// The local API's Unix socket.
    pub socket: PathBuf,
    /// The socket's permissions, octal.
    pub socket_mode: String,
    /// PCRs quoted when the caller names none.
    pub quote_pcrs: Vec<u8>,
    /// tracing filter.
    pub log: String,
    /// The supplier's rehabilitation key, SEC1 hex (5.1.2.2); none: lockdown is permanent.
    pub rehabilitation_key: Option<String>,
    /// Local API policy (5.1.2.2, [`crate::access`]): members may do everything.
    pub owner_group: Option<String>,
    /// Members may run AKA and attach, and read.
    pub modem_group: Option<String>,
    /// Members may read.
    pub audit_group: Option<String>,
    /// The roles' CA certificate(s), PEM: the device trusts servers under it.
    pub ca_file: Option<PathBuf>,
    /// A directory of per-role CAs (`ca-<role>.pem`, as `mcimctl pki init` writes them): each
    /// role's server is trusted under its own CA only (another operator's CA cannot stand in
    /// for it), and package signers under `ca-sho.pem` unless `sho_ca_file` is set.
    pub ca_dir: Option<PathBuf>,
    /// The CA certificate(s) that issue SHO certificates, PEM: an MCIM package is accepted
    /// only from a signer they issued (another operator's CA cannot vouch for an SHO).
    /// Default: `ca_file`.
    pub sho_ca_file: Option<PathBuf>,
    /// The RO (DRF and DPF), `https://host:port`, or its replicas' addresses separated by
    /// commas (spread and failed over).
    pub ro_url: Option<String>,
    /// The VNO, `https://host:port` (3GPP access), or several, comma-separated.
    pub vno_url: Option<String>,
    /// The USIM as raw APDUs for modem bridges (`mcim_tre::usim`): a Unix socket, mode
    /// `socket_mode`, for the modem and owner classes; none by default.
    pub usim_socket: Option<PathBuf>,
    /// The USIM as a PC/SC card (`mcim_tre::usim::vpcd`): the address of vsmartcard's vpcd
    /// (the pcscd driver of Debian's vsmartcard-vpcd), which `tred` connects to as the
    /// virtual ICC; on this machine only (a loopback address). None by default.
    pub usim_vpcd: Option<String>,
    /// The user that must own vpcd's end of that connection (pcscd's: root on Debian), a
    /// name or uid: another local program listening on the port is not served.
    pub usim_vpcd_user: String,
    /// What PC/SC applications may do with the card: "modem" (read, VERIFY, AUTHENTICATE)
    /// or "owner" (also CHANGE and UNBLOCK PIN). pcscd admits its own clients.
    pub usim_vpcd_class: String,
    /// Prometheus metrics (text format, `GET /metrics`, plain HTTP) on this address, as
    /// 127.0.0.1:9464: local API calls by RPC and status, provisioning runs and AKA runs by
    /// outcome. Off by default.
    pub metrics_listen: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            backend: "tpm".into(),
            tcti: "device:/dev/tpmrm0".into(),
            pkcs11_module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            pkcs11_token: "mcim".into(),
            pkcs11_pin_file: None,
            pkcs11_unwrap: "auto".into(),
            tpm_aka: "auto".into(),
            state_dir: "/var/lib/mcim/tred".into(),
            socket: "/run/mcim/tred.sock".into(),
            socket_mode: "0660".into(),
            quote_pcrs: (0..8).collect(),
            log: "info".into(),
            rehabilitation_key: None,
            owner_group: None,
            modem_group: None,
            audit_group: None,
            ca_file: None,
            ca_dir: None,
            sho_ca_file: None,
            ro_url: None,
            vno_url: None,
            usim_socket: None,
            usim_vpcd: None,
            usim_vpcd_user: "root".into(),
            usim_vpcd_class: "modem".into(),
            metrics_listen: None,
        }
    }
}

impl Config {
    /// The local API's policy: the groups resolved to gids, and this process's own uid.
    pub fn access_policy(&self) -> Result<crate::access::Policy, ConfigError> {
        let gid = |what: &str, g: &Option<String>| {
            g.as_deref()
                .map(crate::access::gid)
                .transpose()
                .map_err(|e| ConfigError::Invalid(format!("{what}: {e}")))
        };
        use std::os::unix::fs::MetadataExt;
        let own_uid = std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .map_err(|e| ConfigError::Invalid(format!("/proc/self: {e}")))?;
        Ok(crate::access::Policy {
            owner: gid("owner_group", &self.owner_group)?,
            modem: gid("modem_group", &self.modem_group)?,
            audit: gid("audit_group", &self.audit_group)?,
            own_uid,
        })
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {detail}")]
    Read {
        /// the file
        path: PathBuf,
        /// why
        detail: String,
    },
    /// The file or a variable does not parse.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Reads `path` (if given) and applies the environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut c = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                    path: p.to_path_buf(),
                    detail: e.to_string(),
                })?;
                toml::from_str(&text)
                    .map_err(|e| ConfigError::Invalid(format!("{}: {e}", p.display())))?
            }
            None => Config::default(),
        };
        c.apply_env(|k| match std::env::var(k) {
            Ok(v) => Some(Ok(v)),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(_)) => Some(Err(())),
        })?;
        if c.quote_pcrs.is_empty()
            || c.quote_pcrs.iter().any(|p| *p > 23)
            || (1..c.quote_pcrs.len()).any(|i| c.quote_pcrs[..i].contains(&c.quote_pcrs[i]))
        {
            return Err(ConfigError::Invalid(format!(
                "quote_pcrs {:?}: one to 24 distinct PCRs, 0 to 23",
                c.quote_pcrs
            )));
        }
        c.socket_mode()?;
        c.rehabilitation_key()?;
        if c.pkcs11_unwrap != "auto" && c.pkcs11_unwrap != "rsa-oaep" {
            return Err(ConfigError::Invalid(format!(
                "pkcs11_unwrap {:?}: \"auto\" or \"rsa-oaep\"",
                c.pkcs11_unwrap
            )));
        }
        if c.tpm_aka != "auto" && c.tpm_aka != "sealed" {
            return Err(ConfigError::Invalid(format!(
                "tpm_aka {:?}: \"auto\" or \"sealed\"",
                c.tpm_aka
            )));
        }
        c.usim_vpcd()?;
        c.metrics_listen()?;
        for (key, urls) in [("ro_url", &c.ro_url), ("vno_url", &c.vno_url)] {
            if let Some(urls) = urls {
                mcim_telemetry::channel::authorities(urls)
                    .map_err(|e| ConfigError::Invalid(format!("{key}: {e}")))?;
            }
        }
        if c.backend != "tpm" && c.backend != "pkcs11" {
            return Err(ConfigError::Invalid(format!(
                "backend {:?}: \"tpm\" or \"pkcs11\"",
                c.backend
            )));
        }
        Ok(c)
    }

    /// The token's user PIN: `MCIM_PKCS11_PIN`, else the first line of `pkcs11_pin_file`.
    pub fn pkcs11_pin(&self) -> Result<secrecy::SecretString, ConfigError> {
        if let Ok(p) = std::env::var("MCIM_PKCS11_PIN") {
            return Ok(p.into());
        }
        let path = self.pkcs11_pin_file.as_ref().ok_or_else(|| {
            ConfigError::Invalid("pkcs11: set pkcs11_pin_file or MCIM_PKCS11_PIN".into())
        })?;
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            ConfigError::Read {
                path: path.clone(),
                detail: e.to_string(),
            }
        })?);
        Ok(text.lines().next().unwrap_or_default().to_string().into())
    }

    /// Every key of the file, in the type's order: taken from the type itself (serde's
    /// refusal of an unknown field lists them), so the list cannot drift from it.
    pub fn keys() -> Vec<String> {
        let refusal = match toml::from_str::<Config>("__not_a_key__ = 0") {
            Err(e) => e.to_string(),
            Ok(_) => String::new(),
        };
        let listed = refusal.split("expected one of").nth(1).unwrap_or_default();
        listed
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    /// The environment variable of a key: `MCIM_` and the key in capitals.
    pub fn env_var(key: &str) -> String {
        format!("MCIM_{}", key.to_ascii_uppercase())
    }

    /// Applies `MCIM_*` overrides from `get`, one per key ([`Config::env_var`]): a list
    /// (`quote_pcrs`) as comma-separated numbers, anything else as the string it is. Each
    /// goes through the same deserialisation as the file, so a bad value is the same error.
    /// A variable that is set but empty, or not UTF-8 (`get` gives `Err`), is refused: it
    /// must not quietly stand for the default (a state directory, an owner group).
    pub fn apply_env(
        &mut self,
        get: impl Fn(&str) -> Option<Result<String, ()>>,
    ) -> Result<(), ConfigError> {
        for key in Self::keys() {
            let var = Self::env_var(&key);
            let v = match get(&var) {
                None => continue,
                Some(Err(())) => {
                    return Err(ConfigError::Invalid(format!("{var} is not UTF-8")));
                }
                Some(Ok(v)) if v.trim().is_empty() => {
                    return Err(ConfigError::Invalid(format!(
                        "{var} is set but empty: unset it for the default"
                    )));
                }
                Some(Ok(v)) => v,
            };
            let value = if key == "quote_pcrs" {
                let list = v
                    .split(',')
                    .map(|s| s.trim().parse::<i64>().map(toml::Value::Integer))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ConfigError::Invalid(format!("{var}: {e}")))?;
                toml::Value::Array(list)
            } else {
                toml::Value::String(v)
            };
            let mut table = toml::Table::try_from(&*self)
                .map_err(|e| ConfigError::Invalid(format!("{var}: {e}")))?;
            table.insert(key.clone(), value);
            *self = table
                .try_into()
                .map_err(|e| ConfigError::Invalid(format!("{var}: {e}")))?;
        }
        Ok(())
    }

    /// `tred --config-keys`: every key, its variable and its default, one per line.
    pub fn key_table() -> String {
        let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
        let mut out = String::from("key                  variable                  default\n");
        for key in Self::keys() {
            let default = defaults
                .get(&key)
                .map_or_else(|| "(none)".to_string(), shown);
            out.push_str(&format!(
                "{key:<20} {:<25} {default}\n",
                Self::env_var(&key)
            ));
        }
        out
    }

    /// The PC/SC card's settings, checked: vpcd's address (loopback), the uid that must own
    /// its end, and whether PC/SC applications may change and unblock the PIN.
    pub fn usim_vpcd(&self) -> Result<Option<(std::net::SocketAddr, u32, bool)>, ConfigError> {
        let Some(a) = &self.usim_vpcd else {
            return Ok(None);
        };
        let addr: std::net::SocketAddr = a.parse().map_err(|_| {
            ConfigError::Invalid(format!(
                "usim_vpcd {a:?}: an address and port, as 127.0.0.1:35963"
            ))
        })?;
        if addr.port() == 0 {
            return Err(ConfigError::Invalid(format!(
                "usim_vpcd {a:?}: vpcd's port (35963 as Debian configures it), not 0"
            )));
        }
        if !addr.ip().is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "usim_vpcd {a:?}: vpcd on this machine only (a loopback address): what \
                 answers elsewhere could not be checked"
            )));
        }
        let uid = crate::access::uid(&self.usim_vpcd_user)
            .map_err(|e| ConfigError::Invalid(format!("usim_vpcd_user: {e}")))?;
        let pin_admin = match self.usim_vpcd_class.as_str() {
            "modem" => false,
            "owner" => true,
            other => {
                return Err(ConfigError::Invalid(format!(
                    "usim_vpcd_class {other:?}: \"modem\" or \"owner\""
                )));
            }
        };
        Ok(Some((addr, uid, pin_admin)))
    }

    /// The metrics listener's address, checked.
    pub fn metrics_listen(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        self.metrics_listen
            .as_deref()
            .map(|a| {
                a.parse().map_err(|_| {
                    ConfigError::Invalid(format!(
                        "metrics_listen {a:?}: an address and port, as 127.0.0.1:9464"
                    ))
                })
            })
            .transpose()
    }

    /// The supplier's rehabilitation key, parsed.
    pub fn rehabilitation_key(&self) -> Result<Option<p256::ecdsa::VerifyingKey>, ConfigError> {
        let Some(h) = &self.rehabilitation_key else {
            return Ok(None);
        };
        let bytes = hex::decode(h.trim())
            .map_err(|e| ConfigError::Invalid(format!("rehabilitation_key: {e}")))?;
        p256::ecdsa::VerifyingKey::from_sec1_bytes(&bytes)
            .map(Some)
            .map_err(|_| ConfigError::Invalid("rehabilitation_key is not a P-256 point".into()))
    }

    /// The socket mode as bits.
    pub fn socket_mode(&self) -> Result<u32, ConfigError> {
        u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                ConfigError::Invalid(format!("socket_mode {:?} is not octal", self.socket_mode))
            })
    }
}

/// A default as `--config-keys` shows it (TOML's own notation).
fn shown(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("{s:?}"),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Array(a) => {
            let items: Vec<String> = a.iter().map(shown).collect();
            format!("[{}]", items.join(", "))
        }
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_environment() {
        let mut c: Config =
            toml::from_str("tcti = \"swtpm:port=1\"\nquote_pcrs = [0, 7]\n").unwrap_or_default();
        assert_eq!(c.tcti, "swtpm:port=1");
        assert_eq!(c.quote_pcrs, [0, 7]);
        assert_eq!(c.socket_mode, "0660");
        c.apply_env(|k| match k {
            "MCIM_TCTI" => Some(Ok("device:/dev/tpm0".into())),
            "MCIM_QUOTE_PCRS" => Some(Ok("1, 2".into())),
            _ => None,
        })
        .unwrap_or_default();
        assert_eq!(c.tcti, "device:/dev/tpm0");
        assert_eq!(c.quote_pcrs, [1, 2]);
        assert_eq!(c.socket_mode().ok(), Some(0o660));
    }

    /// Every key of the type has its variable, and the variable reaches the key: the list
    /// `tred --config-keys` prints is the type's, and it cannot drift.
    #[test]
    fn every_key_has_its_variable() {
        let refusal = toml::from_str::<Config>("__not_a_key__ = 0")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(refusal.contains("`vno_url`"), "{refusal}");
        // The parse of serde's message finds every field (26 today).
        assert_eq!(Config::keys().len(), 26, "{:?}", Config::keys());
        for key in Config::keys() {
            let var = Config::env_var(&key);
            let value = if key == "quote_pcrs" { "3,4" } else { "/x" };
            let mut c = Config::default();
            c.apply_env(|k| (k == var).then(|| Ok(value.to_string())))
                .unwrap_or_else(|e| panic!("{var}: {e}"));
            assert_ne!(c, Config::default(), "{var} changes {key}");
        }
        let table = Config::key_table();
        assert!(
            table.contains("ca_file              MCIM_CA_FILE"),
            "{table}"
        );
        assert!(
            table.contains("MCIM_PKCS11_UNWRAP        \"auto\""),
            "{table}"
        );
    }

    #[test]
    fn quote_pcrs_are_one_to_24_distinct_pcrs() {
        let dir = std::env::temp_dir().join(format!("tred-config-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        for (list, ok) in [
            ("[0, 7, 23]", true),
            ("[24]", false),
            ("[1, 1]", false),
            ("[]", false),
        ] {
            let file = dir.join("tred.toml");
            let _ = std::fs::write(&file, format!("quote_pcrs = {list}\n"));
            assert_eq!(Config::load(Some(&file)).is_ok(), ok, "{list}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `ro_url` and `vno_url` are one `https://host:port` or several, comma-separated (the
    /// role's replicas); anything else stops tred at start with the key named.
    #[test]
    fn role_addresses_are_one_or_several_https_addresses() {
        let dir = std::env::temp_dir().join(format!("tred-urls-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        for (line, ok) in [
            ("ro_url = \"https://ro:7402\"", true),
            ("ro_url = \"https://ro-a:7402,https://ro-b:7402\"", true),
            ("vno_url = \"https://v:1, https://w:2\"", true),
            ("ro_url = \"http://ro:7402\"", false),
            ("ro_url = \"https://ro:7402,\"", true),
            ("ro_url = \",\"", false),
            ("vno_url = \"https://a:1,ftp://b\"", false),
        ] {
            let file = dir.join("tred.toml");
            let _ = std::fs::write(&file, format!("{line}\n"));
            let got = Config::load(Some(&file));
            assert_eq!(
                got.is_ok(),
                ok,
                "{line}: {:?}",
                got.err().map(|e| e.to_string())
            );
            if let Err(e) = got {
                let key = line.split(' ').next().unwrap_or_default();
                assert!(e.to_string().contains(key), "{e}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        assert!(toml::from_str::<Config>("tcti = 5").is_err());
        assert!(toml::from_str::<Config>("unknown = 1").is_err());
        let mut c = Config::default();
        assert!(
            c.apply_env(|k| (k == "MCIM_QUOTE_PCRS").then(|| Ok("a".into())))
                .is_err()
        );
        for (var, bad) in [
            ("MCIM_QUOTE_PCRS", Ok("1,,2".to_string())),
            ("MCIM_STATE_DIR", Ok(String::new())),
            ("MCIM_OWNER_GROUP", Ok(" ".to_string())),
            ("MCIM_TCTI", Err(())),
        ] {
            let mut c = Config::default();
            let err = c.apply_env(|k| (k == var).then(|| bad.clone()));
            assert!(err.is_err(), "{var} {bad:?}");
            assert_eq!(c, Config::default(), "{var}: nothing changed");
        }
        c.socket_mode = "999".into();
        assert!(c.socket_mode().is_err());
    }
}
