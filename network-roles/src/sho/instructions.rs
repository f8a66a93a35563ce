//! Remote instructions (TR 33.812 5.1.1.3 remote management by an authorised stakeholder;
//! 5.1.2.4): this SHO's own operator instructs a device about this SHO's MCIM on it. The SHO
//! signs the instruction (`mcim_pki::instruction`), numbered per device above every earlier
//! one, and queues it at the RO's DPF, which carries it on the device's task stream; the
//! device's report, signed in its TRE, comes back through the DPF and is kept once it
//! verifies. A retire or delete the device reports done ends the IMSI's vectors.

use mcim_core::identity::Pcid;
use mcim_pki::instruction::{Action, Instruction, KIND, instruction_id, verify_report};
use mcim_proto::mcim::ro::v1 as ro;
use mcim_proto::mcim::sho::v1 as pb;
use tonic::Code;

use super::{Sho, St};
use crate::authz::Role;
use crate::error::RoleError;
use crate::gate::Authorized;
use crate::store::{db_err, now};

/// An instruction as the SHO keeps it.
struct Kept {
    pcid: String,
    imsi: String,
    dpf_url: String,
    seq: i64,
    action: String,
    body: Vec<u8>,
    outcome: Option<String>,
    mcim_state: Option<String>,
    reason: Option<String>,
    reported_at: Option<i64>,
}

impl<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> for Kept {
    fn from_row(row: &'r sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok(Self {
            pcid: row.try_get("pcid")?,
            imsi: row.try_get("imsi")?,
            dpf_url: row.try_get("dpf_url")?,
            seq: row.try_get("seq")?,
            action: row.try_get("action")?,
            body: row.try_get("body")?,
            outcome: row.try_get("outcome")?,
            mcim_state: row.try_get("mcim_state")?,
            reason: row.try_get("reason")?,
            reported_at: row.try_get("reported_at")?,
        })
    }
}

/// The wire's action.
fn wire(a: i32) -> Result<Action, RoleError> {
    match pb::InstructionAction::try_from(a) {
        Ok(pb::InstructionAction::Discover) => Ok(Action::Discover),
        Ok(pb::InstructionAction::Block) => Ok(Action::Block),
        Ok(pb::InstructionAction::Unblock) => Ok(Action::Unblock),
        Ok(pb::InstructionAction::Retire) => Ok(Action::Retire),
        Ok(pb::InstructionAction::Delete) => Ok(Action::Delete),
        _ => Err(RoleError::invalid(
            "the action is discover, block, unblock, retire or delete",
        )),
    }
}

fn wire_action(name: &str) -> pb::InstructionAction {
    match name {
        "discover" => pb::InstructionAction::Discover,
        "block" => pb::InstructionAction::Block,
        "unblock" => pb::InstructionAction::Unblock,
        "retire" => pb::InstructionAction::Retire,
        "delete" => pb::InstructionAction::Delete,
        _ => pb::InstructionAction::Unspecified,
    }
}

impl Sho {
    /// Signs and queues an instruction about this SHO's MCIM on `pcid`. Returns (id, seq,
    /// IMSI).
    pub(super) async fn instruct(
        &self,
        auth: &Authorized,
        pcid: String,
        action: i32,
    ) -> Result<(String, u64, String), RoleError> {
        // This SHO's own operator only.
        auth.owns(&self.id)?;
        let action = wire(action)?;
        let pcid = Pcid::new(pcid).map_err(|e| RoleError::invalid(e.to_string()))?;
        let pcid = pcid.as_str();
        // The MCIM this SHO provisioned on the device, not since discarded by it.
        let mcim: Option<(String, String)> = sqlx::query_as(
            "SELECT s.imsi, r.dpf_url FROM sho_subscription s JOIN sho_registration r \
             ON r.pcid = s.pcid WHERE s.pcid = $1 AND r.state = $2 \
             AND (r.imsi = s.imsi OR r.imsi = '') ORDER BY r.made DESC LIMIT 1",
        )
        .bind(pcid)
        .bind(St::Provisioned as i64)
        .fetch_optional(&self.db)
        .await
        .map_err(db_err)?;
        let (imsi, dpf_url) = mcim.ok_or_else(|| {
            RoleError::conflict("this SHO has provisioned no MCIM on that device")
        })?;
        let discarded: Option<(i64,)> =
            sqlx::query_as("SELECT acknowledged_at FROM sho_discard WHERE imsi = $1")
                .bind(&imsi)
                .fetch_optional(&self.db)
                .await
                .map_err(db_err)?;
        if discarded.is_some() {
            return Err(RoleError::conflict(format!(
                "the device discarded this SHO's MCIM {imsi} (change of SHO)"
            )));
        }
        // Numbered and kept in one transaction: a sequence number is never given twice.
        let mut tx = crate::store::begin_write(&self.db).await?;
        let (last,): (i64,) =
            sqlx::query_as("SELECT COALESCE(MAX(seq), 0) FROM sho_instruction WHERE pcid = $1")
                .bind(pcid)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err)?;
        // Numbered by the millisecond (and above the last): a restored database or a second
        // process of this SHO still numbers above what the device has seen.
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let seq = (last + 1).max(millis);
        let body = mcim_core::signed::sign(
            &self.key,
            &Instruction {
                kind: KIND.into(),
                pcid: pcid.into(),
                imsi: imsi.clone(),
                sho: self.id.clone(),
                seq: u64::try_from(seq).unwrap_or(0),
                action,
                issued_at: u64::try_from(now()).unwrap_or(0),
            },
            Some(&self.cert),
        )
        .map_err(|e| RoleError::internal(e.to_string()))?;
        let id = instruction_id(&body);
        sqlx::query(
            "INSERT INTO sho_instruction (id, pcid, imsi, dpf_url, seq, action, body, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&id)
        .bind(pcid)
        .bind(&imsi)
        .bind(&dpf_url)
        .bind(seq)
        .bind(action.as_str())
        .bind(&body)
        .bind(now())
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        // Queued after it is kept: a failure here is queued again by GetInstruction.
        self.queue(pcid, &dpf_url, body).await?;
        tracing::info!(%pcid, %imsi, seq, action = action.as_str(), instruction = %id, "instruction queued");
        Ok((id, u64::try_from(seq).unwrap_or(0), imsi))
    }

    async fn queue(&self, pcid: &str, dpf_url: &str, body: Vec<u8>) -> Result<(), RoleError> {
        self.dpf(dpf_url)
            .await?
            .queue_instruction(ro::QueueInstructionRequest {
                pcid: pcid.into(),
                instruction: body,
            })
            .await
            .map_err(RoleError::peer(Role::Ro))?;
        Ok(())
    }

    /// An instruction and, once the device reported, its verified report (read from the DPF
    /// until then; an instruction the DPF does not hold is queued again).
    pub(super) async fn instruction(
        &self,
        auth: &Authorized,
        id: &str,
    ) -> Result<pb::GetInstructionResponse, RoleError> {
        auth.owns(&self.id)?;
        let mut k = sqlx::query_as::<_, Kept>(
            "SELECT pcid, imsi, dpf_url, seq, action, body, outcome, mcim_state, reason, \
             reported_at FROM sho_instruction WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.db)
        .await
        .map_err(db_err)?
        .ok_or_else(|| RoleError::not_found("no such instruction"))?;
        if k.outcome.is_none() {
            self.fetch_report(id, &mut k).await?;
        }
        Ok(pb::GetInstructionResponse {
            reported: k.outcome.is_some(),
            outcome: k.outcome.unwrap_or_default(),
            mcim_state: k.mcim_state.unwrap_or_default(),
            reason: k.reason.unwrap_or_default(),
            reported_at: k.reported_at.map(|s| prost_types::Timestamp {
                seconds: s,
                nanos: 0,
            }),
            action: wire_action(&k.action) as i32,
            seq: u64::try_from(k.seq).unwrap_or(0),
            imsi: k.imsi,
        })
    }

    /// Asks the DPF for the device's report on `id` and keeps it once it verifies: the
    /// device's TRE key under the supplier root, for this instruction, naming this SHO, its
    /// IMSI and sequence number.
    async fn fetch_report(&self, id: &str, k: &mut Kept) -> Result<(), RoleError> {
        let got = self
            .dpf(&k.dpf_url)
            .await?
            .get_instruction_report(ro::GetInstructionReportRequest {
                instruction_id: id.into(),
            })
            .await;
        let r = match got {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::NotFound => {
                self.queue(&k.pcid, &k.dpf_url, k.body.clone()).await?;
                return Ok(());
            }
            Err(s) => return Err(RoleError::peer(Role::Ro)(s)),
        };
        if !r.reported {
            return Ok(());
        }
        let root = mcim_pki::dev::ca_der(&self.pki, "supplier-root")?;
        let report = verify_report(
            &root,
            &r.report,
            &r.signature,
            &r.device_certificate,
            &k.pcid,
            &k.body,
        )
        .map_err(|e| RoleError::denied(e.to_string()))?;
        if report.sho != self.id
            || report.imsi != k.imsi
            || i64::try_from(report.seq).ok() != Some(k.seq)
        {
            return Err(RoleError::denied(
                "the device's report does not name this instruction's SHO, IMSI and number",
            ));
        }
        let at = i64::try_from(report.at).unwrap_or(0);
        sqlx::query(
            "UPDATE sho_instruction SET outcome = $1, mcim_state = $2, reason = $3, \
             reported_at = $4 WHERE id = $5 AND outcome IS NULL",
        )
        .bind(&report.outcome)
        .bind(&report.state)
        .bind(&report.reason)
        .bind(at)
        .bind(id)
        .execute(&self.db)
        .await
        .map_err(db_err)?;
        tracing::info!(pcid = %k.pcid, imsi = %k.imsi, seq = k.seq, outcome = %report.outcome, state = %report.state, "the device reported on an instruction");
        k.outcome = Some(report.outcome);
        k.mcim_state = Some(report.state);
        k.reason = Some(report.reason);
        k.reported_at = Some(at);
        Ok(())
    }
}
