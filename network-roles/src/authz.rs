//! Who may call what, on whose objects: the one authorization table of the network roles
//! (TR 33.812 annex x.3, the trust model; 5.1.3.5 the roles).
//!
//! Every RPC of every role's service has exactly one [`Rule`]: the roles that may call it, and
//! the ownership relation of what it touches ([`Owner`]). A caller is known by its mutual-TLS
//! certificate ([`Caller`], `mcim_pki`). Two checks, both decided here:
//!
//! 1. [`decide`]: the caller's role against the rule, from the method and the certificate
//!    alone, before any handler runs (the layer in [`crate::gate`] applies it to every call of
//!    every role's server). A role that may not call the RPC learns nothing about which
//!    objects exist.
//! 2. [`check_owner`]: once the handler has the object (from the request, or loaded from the
//!    store), its owner must be the caller when the rule says the object is the caller's kind
//!    of party's. Handlers call it through [`crate::gate::Authorized::owns`]; they never spell
//!    a method name.
//!
//! A test checks the table against the wire contract (every RPC exactly one rule), and the
//! end-to-end sweep calls every RPC with every role the rule does not list and with a wrong
//! owner for every rule that has one.

pub use mcim_pki::party::{ALL_ROLES, Caller, Role};

/// Whose object an RPC touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// No party's: the RPC creates the object, or reads or changes what the caller's role as a
    /// whole is trusted with (an AuC answering its VNO, the supplier's own tooling).
    Nobody,
    /// The caller's own, found by the caller's identity alone (a device's task stream): the
    /// request names no owner to check.
    TheCaller,
    /// A device's: the PCID the request names, or the stored object's (attach attempt, grant,
    /// registration, validation), must be the calling device's.
    Device,
    /// An SHO's: the registration or subscription must be held by the calling SHO.
    Sho,
    /// A subscriber's: the contract must be the calling subscriber's.
    Subscriber,
    /// An RO's: the registration at the SHO must be one the calling RO registered (5.1.3.6.2
    /// step 7); another RO's certificate under the same CA may not report on it.
    Ro,
}

impl Owner {
    /// The role whose callers must own the object (none for [`Owner::Nobody`] and
    /// [`Owner::TheCaller`]).
    pub fn role(self) -> Option<Role> {
        match self {
            Owner::Nobody | Owner::TheCaller => None,
            Owner::Device => Some(Role::Device),
            Owner::Sho => Some(Role::Sho),
            Owner::Subscriber => Some(Role::Subscriber),
            Owner::Ro => Some(Role::Ro),
        }
    }
}

/// One rule: an RPC, the roles that may call it, and whose object it touches.
#[derive(Debug)]
pub struct Rule {
    /// `/package.Service/Method`.
    pub method: &'static str,
    /// Who may call it.
    pub callers: &'static [Role],
    /// Whose object it touches.
    pub owner: Owner,
}

use Role::{Device as D, Pva as P, Ro as R, Sho as S, Subscriber as U, Supplier as M, Vno as V};

const fn rule(method: &'static str, callers: &'static [Role], owner: Owner) -> Rule {
    Rule {
        method,
        callers,
        owner,
    }
}

/// A device acting on its own objects.
const fn own(method: &'static str) -> Rule {
    rule(method, &[D], Owner::Device)
}

use Owner::{Nobody, Ro as RoOwns, Sho as ShoOwns, Subscriber as SubscriberOwns, TheCaller};

/// The table (annex x.3; the seed's step for each edge is in the proto comment of the RPC).
pub const RULES: &[Rule] = &[
    // The supplier's own tooling certifies devices and hands connectivity credentials on;
    // its root is public to every authenticated party.
    rule(
        "/mcim.supplier.v1.SupplierService/CertifyDevice",
        &[M],
        Nobody,
    ),
    rule(
        "/mcim.supplier.v1.SupplierService/IssueConnectivityCredentials",
        &[M],
        Nobody,
    ),
    rule(
        "/mcim.supplier.v1.SupplierService/RecordConnectivityCredentials",
        &[M],
        Nobody,
    ),
    rule(
        "/mcim.supplier.v1.SupplierService/GetSupplierRoot",
        &[M, R, V, S, P, D, U],
        Nobody,
    ),
    // RO / ICF: initial credentials from the CCIF or the subscriber; AVs and attach reports
    // only to the VNO; delayed activation by the subscriber.
    rule(
        "/mcim.ro.v1.IcfService/RegisterInitialCredentials",
        &[M, U],
        Nobody,
    ),
    rule("/mcim.ro.v1.IcfService/GetAuthVectors", &[V], Nobody),
    rule("/mcim.ro.v1.IcfService/ReportAttach", &[V], Nobody),
    rule("/mcim.ro.v1.IcfService/ActivatePcid", &[U], SubscriberOwns),
    // A device renews its own PCID's initial credential (5.1.3.7.4.3).
    own("/mcim.ro.v1.IcfService/RenewInitialCredentials"),
    own("/mcim.ro.v1.IcfService/ConfirmInitialCredentials"),
    // The RO's own operator pushes a renewal to a device.
    rule("/mcim.ro.v1.IcfService/OfferRenewal", &[R], Nobody),
    // RO / DRF: the device registers itself (its PCID in the request); an SHO records its
    // own subscriptions and offers (its id in the request).
    own("/mcim.ro.v1.DrfService/GetBootstrap"),
    own("/mcim.ro.v1.DrfService/RegisterDevice"),
    rule("/mcim.ro.v1.DrfService/SetSubscription", &[S], ShoOwns),
    // RO / DPF: the SHO the device registered at authorises or refuses; the device fetches
    // its own tasks and package, and reports on its own registration.
    rule(
        "/mcim.ro.v1.DpfService/AuthorizeProvisioning",
        &[S],
        ShoOwns,
    ),
    rule("/mcim.ro.v1.DpfService/RefuseProvisioning", &[S], ShoOwns),
    rule("/mcim.ro.v1.DpfService/WatchDeviceTasks", &[D], TheCaller),
    own("/mcim.ro.v1.DpfService/DownloadPackage"),
    own("/mcim.ro.v1.DpfService/ReportProvisioningStatus"),
    own("/mcim.ro.v1.DpfService/RelayDiscardAck"),
    // Remote instructions (5.1.1.3): an SHO queues for a device it registered once and reads
    // the reports of its own instructions; the device reports on its own.
    rule("/mcim.ro.v1.DpfService/QueueInstruction", &[S], ShoOwns),
    own("/mcim.ro.v1.DpfService/ReportInstruction"),
    rule("/mcim.ro.v1.DpfService/GetInstructionReport", &[S], ShoOwns),
    // VNO: a device attaches with its own PCID (the one its certificate names); an
    // operational IMSI is not in the certificate, so the VNO hands the caller's PCID to the
    // SHO, which answers only for the device it provisioned the IMSI to (and AKA decides).
    // Completing and detaching are for the device that attached.
    own("/mcim.vno.v1.VnoService/Attach"),
    own("/mcim.vno.v1.VnoService/CompleteAttach"),
    own("/mcim.vno.v1.VnoService/Detach"),
    // SHO: subscribers contract; the RO registers devices, and reports and relays the
    // filtered discard acknowledgment on the registrations it made; the VNO fetches AVs for
    // the SHO's IMSIs (for the device each was provisioned to); the device the MCIM was
    // provisioned to tells its old SHO it discarded it (5.1.3.7.4.2 step 9).
    rule(
        "/mcim.sho.v1.ShoService/CreateSubscription",
        &[U],
        SubscriberOwns,
    ),
    rule("/mcim.sho.v1.ShoService/RegisterDevice", &[R], Nobody),
    rule(
        "/mcim.sho.v1.ShoService/GetRegistration",
        &[U],
        SubscriberOwns,
    ),
    rule("/mcim.sho.v1.ShoService/GetAuthVectors", &[V], Nobody),
    rule(
        "/mcim.sho.v1.ShoService/ReportProvisioningStatus",
        &[R],
        RoOwns,
    ),
    own("/mcim.sho.v1.ShoService/NotifyDiscard"),
    rule("/mcim.sho.v1.ShoService/ReceiveDiscardAck", &[R], RoOwns),
    // The SHO's own operator (its own certificate) instructs devices about its MCIMs.
    rule("/mcim.sho.v1.ShoService/InstructDevice", &[S], ShoOwns),
    rule("/mcim.sho.v1.ShoService/GetInstruction", &[S], ShoOwns),
    // PVA: reference values from the supplier; validations asked and read by the SHO;
    // evidence from the device the validation is for.
    rule(
        "/mcim.pva.v1.PvaService/RegisterReferenceValues",
        &[M],
        Nobody,
    ),
    rule("/mcim.pva.v1.PvaService/RequestValidation", &[S], Nobody),
    own("/mcim.pva.v1.PvaService/SubmitEvidence"),
    rule("/mcim.pva.v1.PvaService/GetValidationResult", &[S], ShoOwns),
];

/// Standard services every server also offers to any authenticated caller: gRPC health and
/// reflection (they describe the server, and touch no party's object).
pub const STANDARD_SERVICES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// The rule that lets any authenticated caller use a standard service.
pub const STANDARD: Rule = rule("(standard services)", ALL_ROLES_REF, Nobody);

const ALL_ROLES_REF: &[Role] = &ALL_ROLES;

/// Why a call was refused (maps to PERMISSION_DENIED; never says more than needed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No rule: the RPC is unknown to the table (refused by default).
    #[error("no rule for {0}")]
    NoRule(String),
    /// The caller's role may not call this RPC.
    #[error("{role} may not call {method}")]
    Role {
        /// caller's role
        role: Role,
        /// the RPC
        method: String,
    },
    /// The object belongs to another party of the caller's kind.
    #[error("the {role} {caller} may not act on another {role}'s object")]
    NotOwner {
        /// the caller's role
        role: Role,
        /// the caller's name
        caller: String,
    },
}

/// The rule for `method`, if the caller's role may call it.
pub fn decide(caller: &Caller, method: &str) -> Result<&'static Rule, Denied> {
    let rule = if STANDARD_SERVICES.iter().any(|p| method.starts_with(p)) {
        &STANDARD
    } else {
        RULES
            .iter()
            .find(|r| r.method == method)
            .ok_or_else(|| Denied::NoRule(method.to_string()))?
    };
    if !rule.callers.contains(&caller.role) {
        return Err(Denied::Role {
            role: caller.role,
            method: method.to_string(),
        });
    }
    Ok(rule)
}

/// The object the call touches belongs to `owner` (a PCID, an SHO's id, a subscriber): under
/// `rule`'s ownership relation, a caller of the owning kind must be that owner.
pub fn check_owner(caller: &Caller, rule: &Rule, owner: &str) -> Result<(), Denied> {
    match rule.owner.role() {
        Some(kind) if caller.role == kind && caller.name != owner => Err(Denied::NotOwner {
            role: caller.role,
            caller: caller.name.clone(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Every RPC of the network roles' services (everything but the device-local
    /// `mcim.tre.v1`) has exactly one rule, and every rule names a real RPC.
    #[test]
    fn the_table_covers_the_contract_exactly() {
        let set = prost_types::FileDescriptorSet::decode(mcim_proto::FILE_DESCRIPTOR_SET)
            .unwrap_or_default();
        let mut rpcs = Vec::new();
        for file in &set.file {
            let package = file.package();
            if package == "mcim.tre.v1" {
                continue;
            }
            for svc in &file.service {
                for m in &svc.method {
                    rpcs.push(format!("/{package}.{}/{}", svc.name(), m.name()));
                }
            }
        }
        assert!(rpcs.len() >= 30, "{rpcs:?}");
        for rpc in &rpcs {
            let n = RULES.iter().filter(|r| r.method == rpc).count();
            assert_eq!(n, 1, "{rpc} has {n} rules");
        }
        for r in RULES {
            assert!(
                rpcs.iter().any(|x| x == r.method),
                "rule for unknown RPC {}",
                r.method
            );
            // An owner of a kind that may not even call the RPC would be a rule that can
            // never be satisfied as written.
            if let Some(kind) = r.owner.role() {
                assert!(r.callers.contains(&kind), "{}: owner {kind}", r.method);
            }
        }
    }

    /// Every edge: exactly the listed roles pass, every other role is refused.
    #[test]
    fn each_edge_admits_only_its_roles() {
        for r in RULES {
            for role in ALL_ROLES {
                let caller = Caller {
                    role,
                    name: "001010000000001".into(),
                };
                let got = decide(&caller, r.method);
                assert_eq!(
                    got.is_ok(),
                    r.callers.contains(&role),
                    "{role} on {}",
                    r.method
                );
            }
        }
        let sho = Caller {
            role: Role::Sho,
            name: "x".into(),
        };
        assert!(matches!(
            decide(&sho, "/mcim.pva.v1.PvaService/Nope"),
            Err(Denied::NoRule(_))
        ));
        assert!(decide(&sho, "/grpc.health.v1.Health/Check").is_ok());
        assert!(matches!(
            decide(&sho, "/grpc.health.v2.Health/Check"),
            Err(Denied::NoRule(_))
        ));
    }

    #[test]
    fn an_owner_of_the_callers_kind_must_be_the_caller() {
        let me = Caller {
            role: Role::Device,
            name: "001010000000001".into(),
        };
        let rule = decide(&me, "/mcim.ro.v1.DpfService/DownloadPackage").unwrap();
        assert_eq!(check_owner(&me, rule, "001010000000001"), Ok(()));
        assert!(matches!(
            check_owner(&me, rule, "001010000000002"),
            Err(Denied::NotOwner { .. })
        ));
        let sho = Caller {
            role: Role::Sho,
            name: "sho-a".into(),
        };
        let rule = decide(&sho, "/mcim.ro.v1.DpfService/AuthorizeProvisioning").unwrap();
        assert_eq!(check_owner(&sho, rule, "sho-a"), Ok(()));
        assert!(check_owner(&sho, rule, "sho-b").is_err());
        // Nobody's objects have no owner to check.
        let vno = Caller {
            role: Role::Vno,
            name: "v".into(),
        };
        let rule = decide(&vno, "/mcim.sho.v1.ShoService/GetAuthVectors").unwrap();
        assert_eq!(check_owner(&vno, rule, "anything"), Ok(()));
    }
}
