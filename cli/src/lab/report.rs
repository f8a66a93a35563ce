//! The lab's report: progress lines (stdout, or stderr under `--json`) and the one JSON
//! object `--json` prints at the end, whatever happened.

use std::path::Path;

use serde_json::json;

use super::{AccessChoice, FlowChoice, RunArgs, TreChoice, lab_inner};
use crate::error::CliError;

/// Progress: stdout normally, stderr under --json (stdout then holds only the JSON).
pub(super) struct Say(pub(super) bool);

impl Say {
    /// One line of progress.
    pub(super) fn line(&self, text: &str) {
        if self.0 {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }
}

pub(super) type LabResult = Result<serde_json::Value, (serde_json::Value, CliError)>;

/// Runs the lab and reports it: the JSON object, with the error when it failed.
pub(super) fn lab(a: &RunArgs, dir: &Path, say: &Say) -> LabResult {
    let mut report = json!({
        "flow": match a.flow {
            FlowChoice::Initial => "initial",
            FlowChoice::ChangeSho => "change-sho",
            FlowChoice::Pristine => "pristine",
            FlowChoice::Dual => "dual",
        },
        "tre": match a.tre { TreChoice::Tpm => "tpm", TreChoice::Pkcs11 => "pkcs11" },
        "access": match a.access { AccessChoice::ThreeGpp => "3gpp", AccessChoice::Non3gpp => "non-3gpp" },
        "steps": [],
        "ok": false,
    });
    let r = lab_inner(a, dir, say, &mut report);
    match r {
        Ok(()) => {
            report["ok"] = json!(true);
            Ok(report)
        }
        Err(e) => {
            report["error"] = json!(e.to_string());
            Err((report, e))
        }
    }
}
