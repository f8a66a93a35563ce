//! The roles' one error type: what went wrong, named for what happened, and the one place it
//! becomes a gRPC status ([`From<RoleError> for Status`]). Role logic returns [`RoleError`];
//! a handler runs its body through [`role`], so no role logic speaks in `Status`.

use std::future::Future;

use tonic::{Code, Status};

use crate::authz::Role;

/// Why a role refused or failed a call. Nothing changed unless the handler says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// The request is malformed (a field missing, out of range, not decodable).
    #[error("{0}")]
    Invalid(String),
    /// The object the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The object exists already, or another party holds it.
    #[error("{0}")]
    Exists(String),
    /// The object's state forbids it now (expired, refused, not yet validated, ...).
    #[error("{0}")]
    Conflict(String),
    /// The trust model forbids it (a wrong owner; refusals before any handler are the gate's).
    #[error("{0}")]
    Denied(String),
    /// The caller's certificate names nobody.
    #[error("{0}")]
    Unauthenticated(String),
    /// A range ran out (IMSI numbers).
    #[error("{0}")]
    Exhausted(String),
    /// This RPC is in the contract but not built yet.
    #[error("{0}")]
    NotBuilt(&'static str),
    /// The role's database failed (details in the log, not in the answer).
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The role's keys or certificates (the PKI directory) could not be used.
    #[error("PKI: {0}")]
    Pki(#[from] mcim_pki::PkiError),
    /// A call to another role failed.
    #[error("{peer}: {}", .status.message())]
    Peer {
        /// The role called.
        peer: Role,
        /// Its answer.
        status: Status,
    },
    /// A fault of this role (a bug, or data it stored that it cannot read back).
    #[error("{0}")]
    Internal(String),
    /// The role cannot serve now; the caller may retry.
    #[error("{0}")]
    Unavailable(String),
}

impl RoleError {
    /// [`RoleError::Invalid`].
    pub fn invalid(m: impl Into<String>) -> Self {
        RoleError::Invalid(m.into())
    }
    /// [`RoleError::NotFound`].
    pub fn not_found(m: impl Into<String>) -> Self {
        RoleError::NotFound(m.into())
    }
    /// [`RoleError::Exists`].
    pub fn exists(m: impl Into<String>) -> Self {
        RoleError::Exists(m.into())
    }
    /// [`RoleError::Conflict`].
    pub fn conflict(m: impl Into<String>) -> Self {
        RoleError::Conflict(m.into())
    }
    /// [`RoleError::Denied`].
    pub fn denied(m: impl Into<String>) -> Self {
        RoleError::Denied(m.into())
    }
    /// [`RoleError::Unauthenticated`].
    pub fn unauthenticated(m: impl Into<String>) -> Self {
        RoleError::Unauthenticated(m.into())
    }
    /// [`RoleError::Exhausted`].
    pub fn exhausted(m: impl Into<String>) -> Self {
        RoleError::Exhausted(m.into())
    }
    /// [`RoleError::NotBuilt`].
    pub fn not_built(m: &'static str) -> Self {
        RoleError::NotBuilt(m)
    }
    /// [`RoleError::Internal`].
    pub fn internal(m: impl Into<String>) -> Self {
        RoleError::Internal(m.into())
    }
    /// [`RoleError::Unavailable`].
    pub fn unavailable(m: impl Into<String>) -> Self {
        RoleError::Unavailable(m.into())
    }
    /// A failed call to `peer`, for `map_err`.
    pub fn peer(peer: Role) -> impl Fn(Status) -> RoleError {
        move |status| RoleError::Peer { peer, status }
    }
}

impl RoleError {
    /// Worth trying again later: the database, a peer that could not be reached or was
    /// cancelled (e.g. while this role shuts down), or this role unavailable.
    pub fn retryable(&self) -> bool {
        match self {
            RoleError::Database(_) | RoleError::Unavailable(_) => true,
            RoleError::Peer { status, .. } => matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
            ),
            _ => false,
        }
    }
}

impl From<RoleError> for Status {
    fn from(e: RoleError) -> Status {
        match e {
            RoleError::Invalid(m) => Status::invalid_argument(m),
            RoleError::NotFound(m) => Status::not_found(m),
            RoleError::Exists(m) => Status::already_exists(m),
            RoleError::Conflict(m) => Status::failed_precondition(m),
            RoleError::Denied(m) => Status::permission_denied(m),
            RoleError::Unauthenticated(m) => Status::unauthenticated(m),
            RoleError::Exhausted(m) => Status::resource_exhausted(m),
            RoleError::NotBuilt(m) => Status::unimplemented(m),
            RoleError::Database(e) => {
                tracing::error!("database: {e}");
                retry_later(Status::unavailable("database error"))
            }
            RoleError::Pki(e) => {
                tracing::error!("PKI: {e}");
                Status::internal("the role's keys or certificates are unusable")
            }
            // A peer's refusal keeps its code (the device acts on it: a missing subscription
            // at the SHO is step 6's refusal); an unreachable peer is this role unavailable.
            RoleError::Peer { peer, status } => match status.code() {
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                    retry_later(Status::unavailable(format!("{peer}: {}", status.message())))
                }
                _ => Status::new(status.code(), format!("{peer}: {}", status.message())),
            },
            RoleError::Internal(m) => {
                tracing::error!("internal: {m}");
                Status::internal(m)
            }
            RoleError::Unavailable(m) => retry_later(Status::unavailable(m)),
        }
    }
}

/// UNAVAILABLE with gRPC's server pushback (`grpc-retry-pushback-ms`, gRPC A6), 500-1500 ms
/// drawn at random: a database or a peer that is down for a moment is not hammered by every
/// caller at once, and callers that honour the hint (tred does) come back spread out.
fn retry_later(mut s: Status) -> Status {
    let ms = 500 + rand::random::<u32>() % 1000;
    s.metadata_mut().insert(
        "grpc-retry-pushback-ms",
        tonic::metadata::MetadataValue::from(ms),
    );
    s
}

/// Runs a handler's body and answers its error as a gRPC status (the one place).
pub async fn role<T>(body: impl Future<Output = Result<T, RoleError>>) -> Result<T, Status> {
    body.await.map_err(Status::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A role that cannot serve for a moment (its database, a peer) says UNAVAILABLE with a
    /// retry hint of 500-1500 ms; a refusal carries none.
    #[test]
    fn unavailable_carries_a_retry_hint_and_a_refusal_none() {
        let hint = |s: &Status| {
            s.metadata()
                .get("grpc-retry-pushback-ms")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok())
        };
        for e in [
            RoleError::Database(sqlx::Error::PoolTimedOut),
            RoleError::Unavailable("stopping".into()),
            RoleError::Peer {
                peer: Role::Pva,
                status: Status::unavailable("down"),
            },
        ] {
            let s = Status::from(e);
            assert_eq!(s.code(), Code::Unavailable);
            assert!(
                hint(&s).is_some_and(|ms| (500..1500).contains(&ms)),
                "{s:?}"
            );
        }
        assert_eq!(hint(&Status::from(RoleError::invalid("no"))), None);
    }
}
