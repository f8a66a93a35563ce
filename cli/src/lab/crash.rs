//! `mcimctl lab run --crash tred:N|roles:N`: shows that provisioning survives a crash. Right
//! after the device reports step N (N = 0: as soon as the run has started, which lands inside
//! the first exchange), the lab kills (SIGKILL: no clean shutdown) either the
//! device's daemon or the process running every network role, and starts it again on the same
//! state. `tred` resumes its persisted run (the state machine of 5.1.3.6.2 in
//! `provisioning.json`); the roles resume from their database (the SHO follows pending
//! validations again, the DPF replays unacknowledged tasks) while the device retries. The
//! provisioning must still complete, each step reported once.

use std::str::FromStr;

/// How the lab stops the process (`--crash-signal`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Signal {
    /// SIGKILL: a crash or a power cut, no clean shutdown.
    #[default]
    Kill,
    /// SIGTERM: a clean shutdown (an operator's restart, an upgrade); the process drains.
    Term,
}

impl Signal {
    /// Its name in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Kill => "kill",
            Signal::Term => "term",
        }
    }
}

/// Which process to crash, and after which step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crash {
    /// The process.
    pub what: Crashed,
    /// The step after which it is killed.
    pub after_step: u32,
}

/// A process the lab can crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crashed {
    /// The device's `tred`.
    Tred,
    /// `mcim-roles all`.
    Roles,
}

impl Crashed {
    /// Its name in `--crash` and the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Crashed::Tred => "tred",
            Crashed::Roles => "roles",
        }
    }
}

impl FromStr for Crash {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = || {
            format!(
                "{s:?}: expected tred:N or roles:N with N a step before the flow's last (1 to 13; \
                 to 16 with --flow pristine), or 0 (as soon as the run starts)"
            )
        };
        let (what, step) = s.split_once(':').ok_or_else(usage)?;
        let what = match what {
            "tred" => Crashed::Tred,
            "roles" => Crashed::Roles,
            _ => return Err(usage()),
        };
        let after_step: u32 = step.parse().map_err(|_| usage())?;
        if !(0..=16).contains(&after_step) {
            return Err(usage());
        }
        Ok(Crash { what, after_step })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_process_and_the_step_and_refuses_the_rest() {
        assert_eq!(
            "tred:7".parse::<Crash>(),
            Ok(Crash {
                what: Crashed::Tred,
                after_step: 7
            })
        );
        assert_eq!(
            "roles:13".parse::<Crash>().map(|c| c.what),
            Ok(Crashed::Roles)
        );
        assert_eq!("tred:0".parse::<Crash>().map(|c| c.after_step), Ok(0));
        for bad in ["tred", "tred:-1", "tred:17", "vno:3", "roles:x", ""] {
            assert!(bad.parse::<Crash>().is_err(), "{bad}");
        }
    }
}
