//! Who may call what: the one authorization table of the network roles (TR 33.812 annex x.3,
//! the trust model; 5.1.3.5 the roles). Every RPC of every role's service has exactly one
//! rule here; a test checks that against the wire contract, so a new RPC cannot ship without
//! one. A caller is known by its mutual-TLS certificate (`Caller`); a device may only act for
//! itself.

pub use mcim_pki::party::{ALL_ROLES, Caller, Role};

/// One rule: an RPC, the roles that may call it, and whether a device caller must be the
/// device the request is about.
#[derive(Debug)]
pub struct Rule {
    /// `/package.Service/Method`.
    pub method: &'static str,
    /// Who may call it.
    pub callers: &'static [Role],
    /// A device may act only for itself: the request's device must be the caller.
    pub own_device: bool,
}

use Role::{Device as D, Pva as P, Ro as R, Sho as S, Subscriber as U, Supplier as M, Vno as V};

const fn rule(method: &'static str, callers: &'static [Role]) -> Rule {
    Rule {
        method,
        callers,
        own_device: false,
    }
}

const fn own(method: &'static str) -> Rule {
    Rule {
        method,
        callers: &[D],
        own_device: true,
    }
}

/// The table (annex x.3; the seed's step for each edge is in the proto comment of the RPC).
pub const RULES: &[Rule] = &[
    // The supplier's own tooling certifies devices and hands connectivity credentials on;
    // its root is public to every authenticated party.
    rule("/mcim.supplier.v1.SupplierService/CertifyDevice", &[M]),
    rule(
        "/mcim.supplier.v1.SupplierService/IssueConnectivityCredentials",
        &[M],
    ),
    rule(
        "/mcim.supplier.v1.SupplierService/RecordConnectivityCredentials",
        &[M],
    ),
    rule(
        "/mcim.supplier.v1.SupplierService/GetSupplierRoot",
        &[M, R, V, S, P, D, U],
    ),
    // RO / ICF: initial credentials from the CCIF or the subscriber; AVs and attach reports
    // only to the VNO; delayed activation by the subscriber.
    rule("/mcim.ro.v1.IcfService/RegisterInitialCredentials", &[M, U]),
    rule("/mcim.ro.v1.IcfService/GetAuthVectors", &[V]),
    rule("/mcim.ro.v1.IcfService/ReportAttach", &[V]),
    rule("/mcim.ro.v1.IcfService/ActivatePcid", &[U]),
    rule("/mcim.ro.v1.IcfService/RenewInitialCredentials", &[S]),
    // RO / DRF: the device registers itself; SHOs record their subscriptions.
    own("/mcim.ro.v1.DrfService/GetBootstrap"),
    own("/mcim.ro.v1.DrfService/RegisterDevice"),
    rule("/mcim.ro.v1.DrfService/SetSubscription", &[S]),
    // RO / DPF: the SHO authorises or refuses; the device fetches its own tasks and package.
    rule("/mcim.ro.v1.DpfService/AuthorizeProvisioning", &[S]),
    rule("/mcim.ro.v1.DpfService/RefuseProvisioning", &[S]),
    own("/mcim.ro.v1.DpfService/WatchDeviceTasks"),
    own("/mcim.ro.v1.DpfService/DownloadPackage"),
    own("/mcim.ro.v1.DpfService/ReportProvisioningStatus"),
    own("/mcim.ro.v1.DpfService/RelayDiscardAck"),
    // VNO: any device may attach with any identity, as on the air interface: AKA decides
    // (the IMSI of an operational MCIM is not in the device's certificate). Completing and
    // detaching are for the device that attached.
    rule("/mcim.vno.v1.VnoService/Attach", &[D]),
    own("/mcim.vno.v1.VnoService/CompleteAttach"),
    own("/mcim.vno.v1.VnoService/Detach"),
    // SHO: subscribers contract; the RO registers devices and reports; the VNO fetches AVs
    // for the SHO's IMSIs; the device tells its old SHO it discarded the MCIM.
    rule("/mcim.sho.v1.ShoService/CreateSubscription", &[U]),
    rule("/mcim.sho.v1.ShoService/RegisterDevice", &[R]),
    rule("/mcim.sho.v1.ShoService/GetRegistration", &[U]),
    rule("/mcim.sho.v1.ShoService/GetAuthVectors", &[V]),
    rule("/mcim.sho.v1.ShoService/ReportProvisioningStatus", &[R]),
    own("/mcim.sho.v1.ShoService/NotifyDiscard"),
    rule("/mcim.sho.v1.ShoService/ReceiveDiscardAck", &[R]),
    // PVA: reference values from the supplier; validations asked and read by the SHO;
    // evidence from the device itself.
    rule("/mcim.pva.v1.PvaService/RegisterReferenceValues", &[M]),
    rule("/mcim.pva.v1.PvaService/RequestValidation", &[S]),
    own("/mcim.pva.v1.PvaService/SubmitEvidence"),
    rule("/mcim.pva.v1.PvaService/GetValidationResult", &[S]),
];

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
    /// A device acting for another device.
    #[error("a device may only act for itself")]
    NotItself,
}

/// Decides one call. `device` is the device the request is about, when it names one.
pub fn check(caller: &Caller, method: &str, device: Option<&str>) -> Result<(), Denied> {
    let rule = RULES
        .iter()
        .find(|r| r.method == method)
        .ok_or_else(|| Denied::NoRule(method.to_string()))?;
    if !rule.callers.contains(&caller.role) {
        return Err(Denied::Role {
            role: caller.role,
            method: method.to_string(),
        });
    }
    if rule.own_device && caller.role == Role::Device && device != Some(caller.name.as_str()) {
        return Err(Denied::NotItself);
    }
    Ok(())
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
                let got = check(&caller, r.method, Some("001010000000001"));
                assert_eq!(
                    got.is_ok(),
                    r.callers.contains(&role),
                    "{role} on {}",
                    r.method
                );
            }
        }
        assert!(matches!(
            check(
                &Caller {
                    role: Role::Sho,
                    name: "x".into()
                },
                "/mcim.pva.v1.PvaService/Nope",
                None
            ),
            Err(Denied::NoRule(_))
        ));
    }

    #[test]
    fn a_device_acts_only_for_itself() {
        let me = Caller {
            role: Role::Device,
            name: "001010000000001".into(),
        };
        let m = "/mcim.ro.v1.DpfService/DownloadPackage";
        assert_eq!(check(&me, m, Some("001010000000001")), Ok(()));
        assert_eq!(
            check(&me, m, Some("001010000000002")),
            Err(Denied::NotItself)
        );
        assert_eq!(check(&me, m, None), Err(Denied::NotItself));
    }
}
