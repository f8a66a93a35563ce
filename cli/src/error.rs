//! The command line's one error type: what a command reports and how `mcimctl` exits.

use std::path::Path;

/// What went wrong: tred's or a role's refusal, a file, bad input.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No connection.
    #[error("cannot reach tred at {path}: {detail}")]
    Connect {
        /// socket
        path: String,
        /// why
        detail: String,
    },
    /// tred refused.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Refused(tonic::Status),
    /// A local file.
    #[error("{path}: {detail}")]
    File {
        /// file
        path: String,
        /// why
        detail: String,
    },
    /// Bad input.
    #[error("{0}")]
    Input(String),
    /// A card refused a command (its status word, TS 102 221 10.2).
    #[error("the card answered {sw:04X} to INS {ins:02X}")]
    Card {
        /// the instruction
        ins: u8,
        /// SW1 SW2
        sw: u16,
    },
    /// The audit record does not verify.
    #[error("the audit record does not verify: {0}")]
    AuditBroken(String),
}

fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match c {
        C::InvalidArgument => "invalid argument",
        C::NotFound => "not found",
        C::AlreadyExists => "already exists",
        C::PermissionDenied => "permission denied",
        C::FailedPrecondition => "refused",
        C::Unauthenticated => "unauthenticated",
        C::Unimplemented => "not implemented",
        C::Unavailable => "unavailable",
        _ => "error",
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        CliError::Refused(s)
    }
}

/// Bad input, in the command's words.
pub fn fail(what: impl std::fmt::Display) -> CliError {
    CliError::Input(what.to_string())
}

/// Reads a local file.
pub fn read(path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::File {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// Writes a local file.
pub fn write(path: &Path, data: &[u8]) -> Result<(), CliError> {
    std::fs::write(path, data).map_err(|e| CliError::File {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// A runtime for one command.
pub fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Input(e.to_string()))
}
