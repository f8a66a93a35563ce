//! Who may use `tred`'s local API (TR 33.812 5.1.2.2: the TRE's functions are "usable only
//! under control of entities which are authorised"): every call's Unix peer credentials (uid,
//! gid, and the caller's supplementary groups from `/proc/<pid>/status`) against a policy of
//! three groups, decided by one layer in front of the service before any handler runs.
//!
//! | class | who | RPCs |
//! | --- | --- | --- |
//! | owner | root, `tred`'s own user, members of `owner_group` | everything |
//! | modem | members of `modem_group` | AKA and attach: the modem's use of the MCIM, plus reading |
//! | audit | members of `audit_group` | reading only: status, registry, audit record, parameters |
//!
//! Anyone else is refused (PERMISSION_DENIED) and logged. Without any group configured the
//! policy is open (everyone who can open the socket is an owner), as before it existed; `tred`
//! says so at start.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::codegen::http;
use tonic::transport::server::UdsConnectInfo;

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    /// Read status, the registry, the audit record and the device's parameters.
    Audit,
    /// AKA and attach with an MCIM (and reading).
    Modem,
    /// Everything: supply, lifecycle, PINs, provisioning, rehabilitation.
    Owner,
}

/// The class each RPC of `mcim.tre.v1.TreService` needs. A test checks it against the
/// contract: every RPC has exactly one row.
pub const RULES: &[(&str, Class)] = &[
    ("GetStatus", Class::Audit),
    ("GetDeviceParameters", Class::Audit),
    ("ListMcims", Class::Audit),
    ("GetMcim", Class::Audit),
    ("GetAuditLog", Class::Audit),
    ("VerifyAuditLog", Class::Audit),
    ("WatchProvisioning", Class::Audit),
    ("Authenticate", Class::Modem),
    ("NetworkAttach", Class::Modem),
    ("SelectMcim", Class::Modem),
    ("EndMcimSession", Class::Modem),
    ("InitDevice", Class::Owner),
    ("InstallCertificates", Class::Owner),
    ("InstallMcim", Class::Owner),
    ("ActivateMcim", Class::Owner),
    ("BlockMcim", Class::Owner),
    ("UnblockMcim", Class::Owner),
    ("RetireMcim", Class::Owner),
    ("DeleteMcim", Class::Owner),
    ("SetConnectivityMcim", Class::Owner),
    ("VerifyPin", Class::Owner),
    ("ChangePin", Class::Owner),
    ("UnblockPin", Class::Owner),
    ("EnablePin", Class::Owner),
    ("Attest", Class::Owner),
    ("StartProvisioning", Class::Owner),
    ("Reprovision", Class::Owner),
    ("Rehabilitate", Class::Owner),
    ("ProveOwnership", Class::Owner),
    ("DestroyOrphans", Class::Owner),
];

const SERVICE: &str = "/mcim.tre.v1.TreService/";

/// The class `method` (`/mcim.tre.v1.TreService/<Rpc>`) needs; none for an unknown method.
pub fn needed(method: &str) -> Option<Class> {
    let rpc = method.strip_prefix(SERVICE)?;
    RULES.iter().find(|(r, _)| *r == rpc).map(|(_, c)| *c)
}

/// The groups of the policy, as gids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Members may do everything.
    pub owner: Option<u32>,
    /// Members may run AKA and attach, and read.
    pub modem: Option<u32>,
    /// Members may read.
    pub audit: Option<u32>,
    /// `tred`'s own uid (always an owner, as is root).
    pub own_uid: u32,
}

/// A caller, as its peer credentials say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its uid.
    pub uid: u32,
    /// Its primary gid and supplementary groups.
    pub groups: Vec<u32>,
}

impl Policy {
    /// Whether any group is configured (otherwise the API is open to whoever can connect).
    pub fn enforced(&self) -> bool {
        self.owner.is_some() || self.modem.is_some() || self.audit.is_some()
    }

    /// The most a caller may do; none: nothing.
    pub fn class_of(&self, peer: &Peer) -> Option<Class> {
        if !self.enforced() || peer.uid == 0 || peer.uid == self.own_uid {
            return Some(Class::Owner);
        }
        let member = |g: Option<u32>| g.is_some_and(|g| peer.groups.contains(&g));
        if member(self.owner) {
            Some(Class::Owner)
        } else if member(self.modem) {
            Some(Class::Modem)
        } else if member(self.audit) {
            Some(Class::Audit)
        } else {
            None
        }
    }

    /// Admits `peer` to `method`, or says why not.
    pub fn admit(&self, peer: Option<&Peer>, method: &str) -> Result<(), String> {
        let need = needed(method).ok_or_else(|| format!("no such method {method}"))?;
        if !self.enforced() {
            return Ok(());
        }
        let peer = peer.ok_or("the caller's credentials are unknown")?;
        match self.class_of(peer) {
            Some(have) if have >= need => Ok(()),
            have => Err(format!(
                "uid {} ({}) may not call {method}, which needs the {need:?} class",
                peer.uid,
                have.map_or_else(
                    || "in no group of the policy".to_string(),
                    |c| format!("{c:?} class")
                )
            )),
        }
    }
}

/// A group given by name (looked up in `/etc/group`) or as a number.
pub fn gid(group: &str) -> Result<u32, String> {
    id_in("/etc/group", "group", group)
}

/// A user's uid: a number, or a name looked up in `/etc/passwd`.
pub fn uid(user: &str) -> Result<u32, String> {
    id_in("/etc/passwd", "user", user)
}

/// A number, or the id (third field) of the line that names `name` in `file`.
fn id_in(file: &str, what: &str, name: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let n = f.next()?;
            let id = f.nth(1)?;
            (n == name).then(|| id.parse::<u32>().ok()).flatten()
        })
        .next()
        .ok_or_else(|| format!("no {what} {name:?} in {file}"))
}

/// The peer of a Unix-socket call: uid, primary gid, and the supplementary groups of its
/// process (from `/proc/<pid>/status`).
fn peer_of<B>(req: &http::Request<B>) -> Option<Peer> {
    let cred = req.extensions().get::<UdsConnectInfo>()?.peer_cred?;
    Some(peer_from(cred))
}

/// A Unix peer's uid, primary gid, and the supplementary groups of its process.
pub fn peer_from(cred: tokio::net::unix::UCred) -> Peer {
    let mut groups = vec![cred.gid()];
    // The supplementary groups of the process behind the pid, only while that process is
    // still the caller's (same effective uid): a pid reused by another user's process lends
    // it nothing.
    let uid_of = |status: &str| {
        status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|u| u.parse::<u32>().ok())
    };
    if let Some(pid) = cred.pid()
        && let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
        && uid_of(&status) == Some(cred.uid())
        && let Some(line) = status.lines().find(|l| l.starts_with("Groups:"))
    {
        groups.extend(
            line.trim_start_matches("Groups:")
                .split_whitespace()
                .filter_map(|g| g.parse::<u32>().ok()),
        );
    }
    Peer {
        uid: cred.uid(),
        groups,
    }
}

/// Binds one of `tred`'s local sockets (the API, the USIM) at `path`, mode `mode`: its
/// folder made if absent, a stale socket of an earlier run replaced. Who may connect is the
/// mode's and the socket's group's; what a caller may do, the policy's.
pub fn bind_local_socket(
    path: &std::path::Path,
    mode: u32,
) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(socket = %path.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// The layer in front of the local API.
#[derive(Clone, Debug)]
pub struct Access {
    policy: Arc<Policy>,
}

impl Access {
    /// The layer enforcing `policy`.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl<S> tower::Layer<S> for Access {
    type Service = Admitted<S>;

    fn layer(&self, inner: S) -> Admitted<S> {
        Admitted {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The local API behind the policy.
#[derive(Clone, Debug)]
pub struct Admitted<S> {
    inner: S,
    policy: Arc<Policy>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Admitted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let peer = peer_of(&req);
        let method = req.uri().path().to_string();
        match self.policy.admit(peer.as_ref(), &method) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(why) => {
                tracing::warn!(
                    uid = peer.as_ref().map(|p| p.uid),
                    method,
                    "local API: refused: {why}"
                );
                Box::pin(async move { Ok(Status::permission_denied(why).into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn every_rpc_of_the_local_api_has_one_class() {
        let set = prost_types::FileDescriptorSet::decode(mcim_proto::FILE_DESCRIPTOR_SET)
            .unwrap_or_default();
        let rpcs: Vec<String> = set
            .file
            .iter()
            .filter(|f| f.package() == "mcim.tre.v1")
            .flat_map(|f| f.service.iter())
            .flat_map(|s| s.method.iter().map(|m| m.name().to_string()))
            .collect();
        assert!(rpcs.len() >= 25, "{rpcs:?}");
        for rpc in &rpcs {
            assert_eq!(RULES.iter().filter(|(r, _)| r == rpc).count(), 1, "{rpc}");
        }
        for (r, _) in RULES {
            assert!(rpcs.iter().any(|x| x == r), "{r} is not in the contract");
        }
    }

    #[test]
    fn each_class_reaches_exactly_its_rpcs() {
        let policy = Policy {
            owner: Some(100),
            modem: Some(200),
            audit: Some(300),
            own_uid: 999,
        };
        let peer = |uid, g| Peer {
            uid,
            groups: vec![g],
        };
        let m = |rpc: &str| format!("{SERVICE}{rpc}");
        for (rpc, need) in RULES {
            assert!(policy.admit(Some(&peer(1000, 100)), &m(rpc)).is_ok());
            assert_eq!(
                policy.admit(Some(&peer(1000, 200)), &m(rpc)).is_ok(),
                *need <= Class::Modem,
                "modem on {rpc}"
            );
            assert_eq!(
                policy.admit(Some(&peer(1000, 300)), &m(rpc)).is_ok(),
                *need == Class::Audit,
                "audit on {rpc}"
            );
            assert!(policy.admit(Some(&peer(1000, 400)), &m(rpc)).is_err());
            assert!(policy.admit(None, &m(rpc)).is_err());
            assert!(policy.admit(Some(&peer(0, 400)), &m(rpc)).is_ok());
            assert!(policy.admit(Some(&peer(999, 400)), &m(rpc)).is_ok());
        }
        assert!(policy.admit(Some(&peer(0, 0)), "/other.Service/X").is_err());
        // No group configured: open.
        assert!(
            Policy::default()
                .admit(Some(&peer(1000, 400)), &m("DeleteMcim"))
                .is_ok()
        );
    }

    #[test]
    fn groups_are_names_or_numbers() {
        assert_eq!(gid("4242"), Ok(4242));
        assert_eq!(gid("root"), Ok(0));
        assert!(gid("no-such-group-here").is_err());
    }
}
