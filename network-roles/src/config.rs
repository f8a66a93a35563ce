//! `mcim-roles --config FILE`: a TOML file of the same settings as the flags. Precedence, most
//! specific first: a flag on the command line, its `MCIM_*` environment variable, the file, the
//! built-in default. The file's keys are the flags' long names (`base_port` or `base-port`);
//! top-level keys apply to every role that has the setting (so one file can serve a split
//! deployment), a `[role]` table only to that role. A key no role knows, or a key in a role's
//! table that the role does not have, is an error: a typo must not silently run defaults.
//!
//! ```toml
//! pki = "/etc/mcim/pki"
//! db = "sqlite:///var/lib/mcim/roles.db"
//! [all]
//! base_port = 7401
//! [vno]
//! route = ["00101=icf:https://ro.example:7402", "00102=sho:https://sho.example:7404"]
//! ```
//!
//! The file becomes command-line arguments in front of the user's (so clap validates both the
//! same way); nothing here knows the roles' settings by name: they come from the clap command.

use std::ffi::OsString;
use std::path::Path;

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable.
    #[error("{0}: {1}")]
    Read(String, std::io::Error),
    /// Not TOML.
    #[error("{0}: {1}")]
    Parse(String, toml::de::Error),
    /// A key no role has, or one the role's table cannot have.
    #[error("{file}: unknown setting {key:?}{}", if role.is_empty() { String::new() } else { format!(" for mcim-roles {role}") })]
    Unknown {
        /// the file
        file: String,
        /// the role's table ("" at top level)
        role: String,
        /// the key
        key: String,
    },
    /// A value that is not a string, number, boolean or array of those.
    #[error("{file}: {key}: use a string, a number, a boolean or an array of them")]
    Value {
        /// the file
        file: String,
        /// the key
        key: String,
    },
}

/// The path given by `--config FILE`, `--config=FILE`, or `MCIM_CONFIG`.
pub fn config_path(argv: &[OsString]) -> Option<OsString> {
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().cloned();
        }
        if let Some(p) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some(p.into());
        }
    }
    std::env::var_os("MCIM_CONFIG")
}

/// `argv` with the file's settings for the chosen subcommand inserted after its name, leaving
/// out what the command line or the environment already sets.
pub fn with_file(
    cmd: &clap::Command,
    argv: Vec<OsString>,
    file: &Path,
) -> Result<Vec<OsString>, ConfigError> {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|e| ConfigError::Read(name.clone(), e))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| ConfigError::Parse(name.clone(), e))?;
    let unknown = |role: &str, key: &str| ConfigError::Unknown {
        file: name.clone(),
        role: role.into(),
        key: key.into(),
    };
    let flag = |key: &str| key.replace('_', "-");
    let has = |sub: &clap::Command, key: &str| {
        sub.get_arguments()
            .any(|a| a.get_long() == Some(flag(key).as_str()))
    };
    // Every key must mean something somewhere.
    for (key, value) in &table {
        if let Some(sub) = cmd.find_subcommand(key) {
            let Some(t) = value.as_table() else {
                return Err(unknown("", key));
            };
            for k in t.keys() {
                if !has(sub, k) {
                    return Err(unknown(key, k));
                }
            }
        } else if key != "config" && !cmd.get_subcommands().any(|s| has(s, key)) {
            return Err(unknown("", key));
        } else if value.is_table() {
            return Err(ConfigError::Value {
                file: name.clone(),
                key: key.clone(),
            });
        }
    }
    // The chosen subcommand: the first argument that names one.
    let Some(pos) = argv
        .iter()
        .skip(1)
        .position(|a| a.to_str().is_some_and(|s| cmd.find_subcommand(s).is_some()))
        .map(|p| p + 1)
    else {
        return Ok(argv);
    };
    let role = argv[pos].to_string_lossy().into_owned();
    let Some(sub) = cmd.find_subcommand(&role) else {
        return Ok(argv);
    };
    let given = |long: &str| {
        argv.iter().any(|a| {
            a.to_str()
                .is_some_and(|s| s == format!("--{long}") || s.starts_with(&format!("--{long}=")))
        })
    };
    let mut settings: Vec<(&String, &toml::Value)> = table
        .iter()
        .filter(|(k, v)| !v.is_table() && *k != "config")
        .collect();
    if let Some(t) = table.get(&role).and_then(|v| v.as_table()) {
        // The role's own value wins over a top-level one.
        settings.retain(|(k, _)| !t.contains_key(*k));
        settings.extend(t.iter());
    }
    let mut extra = Vec::new();
    for (key, value) in settings {
        let Some(arg) = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(flag(key).as_str()))
        else {
            continue; // a shared setting this role does not have
        };
        let long = flag(key);
        if given(&long) || arg.get_env().is_some_and(|e| std::env::var_os(e).is_some()) {
            continue;
        }
        let scalar = |v: &toml::Value| -> Option<String> {
            match v {
                toml::Value::String(s) => Some(s.clone()),
                toml::Value::Integer(i) => Some(i.to_string()),
                toml::Value::Float(f) => Some(f.to_string()),
                toml::Value::Boolean(b) => Some(b.to_string()),
                _ => None,
            }
        };
        let values: Vec<String> = match value {
            toml::Value::Array(a) => a.iter().map(scalar).collect::<Option<_>>(),
            v => scalar(v).map(|s| vec![s]),
        }
        .ok_or_else(|| ConfigError::Value {
            file: name.clone(),
            key: key.clone(),
        })?;
        for v in values {
            extra.push(OsString::from(format!("--{long}={v}")));
        }
    }
    let mut out = argv;
    out.splice(pos + 1..pos + 1, extra);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser, Subcommand};

    #[derive(Parser, Debug)]
    struct Cli {
        #[arg(long, global = true)]
        config: Option<std::path::PathBuf>,
        #[command(subcommand)]
        role: Role,
    }

    #[derive(Subcommand, Debug, PartialEq)]
    enum Role {
        Vno {
            #[arg(long, env = "MCIM_TEST_CONFIG_PKI")]
            pki: String,
            #[arg(long, default_value_t = 1)]
            base_port: u16,
            #[arg(long = "route")]
            routes: Vec<String>,
        },
        Pva {
            #[arg(long)]
            pki: String,
        },
    }

    fn run(file: &str, args: &[&str]) -> Result<Role, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("roles.toml");
        std::fs::write(&path, file).map_err(|e| e.to_string())?;
        let argv: Vec<OsString> = std::iter::once("mcim-roles")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        let argv = with_file(&Cli::command(), argv, &path).map_err(|e| e.to_string())?;
        Cli::try_parse_from(argv)
            .map(|c| c.role)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_file_fills_in_and_the_command_line_wins() {
        let file = "pki = \"/etc/pki\"\n[vno]\nbase_port = 7\nroute = [\"a\", \"b\"]\n";
        assert_eq!(
            run(file, &["vno"]),
            Ok(Role::Vno {
                pki: "/etc/pki".into(),
                base_port: 7,
                routes: vec!["a".into(), "b".into()],
            })
        );
        assert_eq!(
            run(file, &["vno", "--base-port", "9", "--route=c"]),
            Ok(Role::Vno {
                pki: "/etc/pki".into(),
                base_port: 9,
                routes: vec!["c".into()],
            })
        );
        // A shared key applies to every role that has it; the VNO's table is not the PVA's.
        assert_eq!(
            run(file, &["pva"]),
            Ok(Role::Pva {
                pki: "/etc/pki".into()
            })
        );
    }

    #[test]
    fn typos_and_odd_values_are_refused() {
        let e = run("pkii = \"x\"\n", &["pva"]).unwrap_err();
        assert!(e.contains("unknown setting \"pkii\""), "{e}");
        let e = run("[pva]\nbase_port = 3\n", &["pva"]).unwrap_err();
        assert!(e.contains("\"base_port\" for mcim-roles pva"), "{e}");
        let e = run("pki = { a = 1 }\n", &["pva"]).unwrap_err();
        assert!(e.contains("pki: use a string"), "{e}");
        let e = run("pki = \n", &["pva"]).unwrap_err();
        assert!(e.contains("roles.toml"), "{e}");
    }
}
