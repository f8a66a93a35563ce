//! The Visited Network Operator (TR 33.812 5.1.3.5.5): a device attaches with its PCID
//! (initial connectivity, 5.1.3.6.2 steps 1-4) or with an MCIM's IMSI (operational
//! connectivity, 5.1.3.3.2.2). The identity's MCC/MNC routes the request for AVs to the RO's
//! ICF or to an SHO (annex x.2.1); the device's TRE answers the challenge; RES is compared in
//! constant time with XRES; then the VNO grants connectivity and, for a PCID, tells the ICF
//! (step 4) so the RO's DRF accepts the device (step 5). One identity attaches once at a time.

use std::path::PathBuf;

use crate::store::Db;
use mcim_core::identity::Imsi;
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::ro::v1 as ro;
use mcim_proto::mcim::ro::v1::icf_service_client::IcfServiceClient;
use mcim_proto::mcim::sho::v1 as sho;
use mcim_proto::mcim::sho::v1::sho_service_client::ShoServiceClient;
use mcim_proto::mcim::vno::v1 as pb;
use mcim_proto::mcim::vno::v1::vno_service_server::VnoService;
use mcim_telemetry::Channel;
use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status};

use crate::authz::Role;
use crate::error::{RoleError, role};
use crate::gate::authorized;
use crate::peers;
use crate::store::{db_err, new_id, now};

/// How long a challenge waits for its answer.
const CHALLENGE_SECS: i64 = 60;
/// How long an operational grant lasts (an initial one: [`crate::ro::GRANT_LIFETIME_SECS`]).
const OPERATIONAL_GRANT_SECS: i64 = 3600;
/// The VNO's own network, "MCC-MNC", as the serving network in AV requests.
const SERVING_NETWORK: &str = "001-03";

/// Where identities of one PLMN get their vectors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// PCIDs of an RO: its ICF.
    Icf(String),
    /// IMSIs of an SHO.
    Sho(String),
}

/// One routing rule: identities starting with `prefix` (MCC+MNC) go to `target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// MCC and MNC digits.
    pub prefix: String,
    /// Where their AVs come from.
    pub target: Target,
}

impl std::str::FromStr for Route {
    type Err = String;
    /// `00101=icf:https://host:port` or `00102=sho:https://host:port`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (prefix, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("route {s:?}: MCCMNC=icf:URL or MCCMNC=sho:URL"))?;
        if !(5..=6).contains(&prefix.len()) || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "route {s:?}: the prefix is MCC and MNC, 5 or 6 digits"
            ));
        }
        let target = match rest.split_once(':') {
            Some(("icf", url)) => Target::Icf(url.to_string()),
            Some(("sho", url)) => Target::Sho(url.to_string()),
            _ => return Err(format!("route {s:?}: the target is icf:URL or sho:URL")),
        };
        Ok(Route {
            prefix: prefix.to_string(),
            target,
        })
    }
}

/// Routes from the command line, the environment (`MCIM_ROUTES`) or a file: each value holds
/// one route or several separated by commas, and a route's URL may itself list replicas
/// separated by commas (`00101=icf:https://ro-a:7402,https://ro-b:7402,00102=sho:...`): a
/// comma starts a new route only where `MCCMNC=` follows it.
pub fn parse_routes(values: &[String]) -> Result<Vec<Route>, String> {
    let mut routes: Vec<String> = Vec::new();
    for value in values {
        for part in value.split(',') {
            let starts_route = part
                .split_once('=')
                .is_some_and(|(p, _)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
            match routes.last_mut() {
                Some(last) if !starts_route => {
                    last.push(',');
                    last.push_str(part);
                }
                _ => routes.push(part.to_string()),
            }
        }
    }
    if routes.is_empty() {
        return Err("at least one route: MCCMNC=icf:URL or MCCMNC=sho:URL".into());
    }
    routes.iter().map(|r| r.parse()).collect()
}

/// The VNO's service.
pub struct Vno {
    pki: PathBuf,
    db: Db,
    routes: Vec<(Route, Channel)>,
}

impl std::fmt::Debug for Vno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vno")
            .field("pki", &self.pki)
            .finish_non_exhaustive()
    }
}

impl Vno {
    /// A VNO routing by `routes` (the longest matching prefix wins).
    pub fn new(pki: PathBuf, db: Db, routes: Vec<Route>) -> Result<Self, RoleError> {
        let mut chans = Vec::new();
        for r in routes {
            let (role, url) = match &r.target {
                Target::Icf(u) => (Role::Ro, u),
                Target::Sho(u) => (Role::Sho, u),
            };
            let c = peers::channel(&pki, Role::Vno, role, url)?;
            chans.push((r, c));
        }
        chans.sort_by_key(|(r, _)| std::cmp::Reverse(r.prefix.len()));
        Ok(Self {
            pki,
            db,
            routes: chans,
        })
    }

    fn route(&self, identity: &str) -> Result<&(Route, Channel), RoleError> {
        self.routes
            .iter()
            .find(|(r, _)| identity.starts_with(&r.prefix))
            .ok_or_else(|| RoleError::not_found("no roaming agreement for this identity's PLMN"))
    }

    /// One vector from the home of `identity` for the device `device` (the caller's PCID),
    /// (steps 2-3), after `resync` if given.
    async fn vector(
        &self,
        identity: &str,
        device: &str,
        resync: Option<common::ResyncInfo>,
    ) -> Result<(bool, common::AuthVector), RoleError> {
        let (route, chan) = self.route(identity)?;
        let (operational, mut vectors) = match &route.target {
            Target::Icf(_) => (
                false,
                IcfServiceClient::new(chan.clone())
                    .get_auth_vectors(ro::GetAuthVectorsRequest {
                        pcid: identity.to_string(),
                        count: 1,
                        resync,
                        serving_network: SERVING_NETWORK.into(),
                    })
                    .await
                    .map_err(RoleError::peer(Role::Ro))?
                    .into_inner()
                    .vectors,
            ),
            Target::Sho(_) => (
                true,
                ShoServiceClient::new(chan.clone())
                    .get_auth_vectors(sho::GetAuthVectorsRequest {
                        imsi: identity.to_string(),
                        count: 1,
                        resync,
                        serving_network: SERVING_NETWORK.into(),
                        pcid: device.to_string(),
                    })
                    .await
                    .map_err(RoleError::peer(Role::Sho))?
                    .into_inner()
                    .vectors,
            ),
        };
        let av = vectors
            .pop()
            .ok_or_else(|| RoleError::unavailable("the home network sent no vector"))?;
        Ok((operational, av))
    }
}

#[tonic::async_trait]
impl VnoService for Vno {
    async fn attach(
        &self,
        req: Request<pb::AttachRequest>,
    ) -> Result<Response<pb::AttachResponse>, Status> {
        role(async move {
        let auth = authorized(&req)?;
        let caller = auth.caller.clone();
        let identity = Imsi::new(req.into_inner().identity)
            .map_err(|e| RoleError::invalid(e.to_string()))?;
        let identity = identity.as_str().to_string();
        // A PCID (routed to an RO's ICF) is the device's own: the one its certificate names
        // (the supplier certified it for that PCID). An operational IMSI is not in the
        // certificate: the SHO answers only for an IMSI it provisioned to the caller's PCID
        // (and as for an unknown IMSI otherwise), so no device gets a challenge, an SQN or a
        // say in the attach of another device's identity.
        let pcid_attach = matches!(self.route(&identity)?.0.target, Target::Icf(_));
        if pcid_attach {
            auth.owns(&identity)?;
        }
        let (operational, av) = self.vector(&identity, &caller.name, None).await?;
        // The same device attaching again (it restarted, or lost its answer) starts over: its
        // earlier attempt or grant ends, as a UE's new attach replaces its old context. Stale
        // attempts and grants of anyone end by themselves (in the same statement: one commit).
        sqlx::query(
            "DELETE FROM vno_attach WHERE (identity = $1 AND caller = $2) OR expires_at <= $3",
        )
        .bind(&identity)
        .bind(&caller.name)
        .bind(now())
        .execute(&self.db)
        .await
        .map_err(db_err)?;
        let id = new_id();
        // One attach per identity: another device's row (possible only where the home
        // network gave it a vector for this identity too) is never displaced; the
        // UNIQUE-less table is guarded by this conditional insert.
        let done = sqlx::query(
            "INSERT INTO vno_attach (attach_id, identity, caller, operational, rand, xres, state, expires_at) \
             SELECT $1, $2, $3, $4, $5, $6, 'challenged', $7 \
             WHERE NOT EXISTS (SELECT 1 FROM vno_attach WHERE identity = $8)",
        )
        .bind(&id)
        .bind(&identity)
        .bind(&caller.name)
        .bind(i64::from(operational))
        .bind(&av.rand)
        .bind(&av.xres)
        .bind(now() + CHALLENGE_SECS)
        .bind(&identity)
        .execute(&self.db)
        .await
        .map_err(db_err)?;
        if done.rows_affected() != 1 {
            return Err(RoleError::exists("this identity is already attached"));
        }
        tracing::info!(%identity, operational, "attach: challenge sent");
        Ok(Response::new(pb::AttachResponse {
            attach_id: id,
            challenge: Some(common::AuthChallenge {
                rand: av.rand,
                autn: av.autn,
            }),
        }))
        })
        .await
    }

    async fn complete_attach(
        &self,
        req: Request<pb::CompleteAttachRequest>,
    ) -> Result<Response<pb::CompleteAttachResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            type Row = (String, String, i64, Vec<u8>, Vec<u8>, String);
            let row: Option<Row> = sqlx::query_as(
                "SELECT identity, caller, operational, rand, xres, state FROM vno_attach \
             WHERE attach_id = $1 AND expires_at > $2",
            )
            .bind(&req.get_ref().attach_id)
            .bind(now())
            .fetch_optional(&self.db)
            .await
            .map_err(db_err)?;
            let (identity, attached_by, operational, rand, xres, state) = row
                .ok_or_else(|| RoleError::not_found("no such attach attempt (or it timed out)"))?;
            auth.owns(&attached_by)?;
            if state != "challenged" {
                return Err(RoleError::conflict("already answered"));
            }
            let r = req.into_inner();
            match r.answer {
                Some(pb::complete_attach_request::Answer::Res(res)) => {
                    if !bool::from(res.as_slice().ct_eq(xres.as_slice())) {
                        sqlx::query("DELETE FROM vno_attach WHERE attach_id = $1")
                            .bind(&r.attach_id)
                            .execute(&self.db)
                            .await
                            .map_err(db_err)?;
                        tracing::warn!(%identity, "attach: wrong RES");
                        return Err(RoleError::unauthenticated("authentication failed"));
                    }
                    let operational = operational != 0;
                    let grant = new_id();
                    let expires = now()
                        + if operational {
                            OPERATIONAL_GRANT_SECS
                        } else {
                            crate::ro::GRANT_LIFETIME_SECS
                        };
                    let ts = prost_types::Timestamp {
                        seconds: expires,
                        nanos: 0,
                    };
                    if !operational {
                        // Step 4: the RO learns the grant its DRF will accept.
                        let (_, chan) = self.route(&identity)?;
                        IcfServiceClient::new(chan.clone())
                            .report_attach(ro::ReportAttachRequest {
                                pcid: identity.clone(),
                                grant_id: grant.clone(),
                                expires_at: Some(ts),
                            })
                            .await
                            .map_err(RoleError::peer(Role::Ro))?;
                    }
                    sqlx::query(
                        "UPDATE vno_attach SET state = 'granted', grant_id = $1, expires_at = $2 \
                     WHERE attach_id = $3",
                    )
                    .bind(&grant)
                    .bind(expires)
                    .bind(&r.attach_id)
                    .execute(&self.db)
                    .await
                    .map_err(db_err)?;
                    tracing::info!(%identity, operational, "attach: granted");
                    Ok(Response::new(pb::CompleteAttachResponse {
                        result: Some(pb::complete_attach_response::Result::Grant(pb::Grant {
                            grant_id: grant,
                            expires_at: Some(ts),
                            operational,
                        })),
                    }))
                }
                Some(pb::complete_attach_request::Answer::Auts(auts)) => {
                    let (_, av) = self
                        .vector(&identity, &attached_by, Some(common::ResyncInfo { rand, auts }))
                        .await?;
                    sqlx::query(
                    "UPDATE vno_attach SET rand = $1, xres = $2, expires_at = $3 WHERE attach_id = $4",
                )
                .bind(&av.rand)
                .bind(&av.xres)
                .bind(now() + CHALLENGE_SECS)
                .bind(&r.attach_id)
                .execute(&self.db)
                .await
                .map_err(db_err)?;
                    Ok(Response::new(pb::CompleteAttachResponse {
                        result: Some(pb::complete_attach_response::Result::Challenge(
                            common::AuthChallenge {
                                rand: av.rand,
                                autn: av.autn,
                            },
                        )),
                    }))
                }
                None => Err(RoleError::invalid("RES or AUTS is required")),
            }
        })
        .await
    }

    async fn detach(
        &self,
        req: Request<pb::DetachRequest>,
    ) -> Result<Response<pb::DetachResponse>, Status> {
        role(async move {
            let auth = authorized(&req)?;
            let row: Option<(String,)> =
                sqlx::query_as("SELECT caller FROM vno_attach WHERE grant_id = $1")
                    .bind(&req.get_ref().grant_id)
                    .fetch_optional(&self.db)
                    .await
                    .map_err(db_err)?;
            let (attached_by,) = row.ok_or_else(|| RoleError::not_found("no such grant"))?;
            auth.owns(&attached_by)?;
            sqlx::query("DELETE FROM vno_attach WHERE grant_id = $1")
                .bind(&req.get_ref().grant_id)
                .execute(&self.db)
                .await
                .map_err(db_err)?;
            Ok(Response::new(pb::DetachResponse {}))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One value or several, with routes whose URLs list replicas.
    #[test]
    fn routes_split_at_commas_that_start_a_route() {
        let got = super::parse_routes(&[
            "00101=icf:https://a:1,https://b:2,00102=sho:https://c:3".to_string(),
            "00103=sho:https://d:4".to_string(),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let urls: Vec<(String, String)> = got
            .iter()
            .map(|r| match &r.target {
                super::Target::Icf(u) | super::Target::Sho(u) => (r.prefix.clone(), u.clone()),
            })
            .collect();
        assert_eq!(
            urls,
            vec![
                ("00101".into(), "https://a:1,https://b:2".into()),
                ("00102".into(), "https://c:3".into()),
                ("00103".into(), "https://d:4".into()),
            ]
        );
        assert!(super::parse_routes(&[]).is_err());
        assert!(super::parse_routes(&["https://a:1".to_string()]).is_err());
    }

    #[test]
    fn routes_parse_and_bad_ones_are_refused() {
        assert_eq!(
            "00101=icf:https://127.0.0.1:7402".parse::<Route>(),
            Ok(Route {
                prefix: "00101".into(),
                target: Target::Icf("https://127.0.0.1:7402".into())
            })
        );
        assert!("0010=icf:x".parse::<Route>().is_err());
        assert!("00101=hlr:x".parse::<Route>().is_err());
        assert!("00101".parse::<Route>().is_err());
    }
}
