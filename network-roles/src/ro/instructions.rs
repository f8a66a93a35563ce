//! The DPF's part in remote instructions (TR 33.812 5.1.1.3 remote management by an
//! authorised stakeholder; 5.1.2.4): it carries an SHO's signed instruction to the device on
//! the device's task stream and keeps the device's signed report for that SHO. It cannot make
//! an instruction (the device checks the SHO's signature under the SHO CA it trusts), and it
//! carries one only from an SHO that is a party to the device (one the device registered at)
//! and signed by that very SHO for that device.

use mcim_pki::instruction::{Instruction, KIND, instruction_id, verify_report};
use mcim_proto::mcim::ro::v1 as pb;

use super::Ro;
use crate::authz::Role;
use crate::error::RoleError;
use crate::gate::Authorized;
use crate::store::{db_err, now};

/// The largest instruction the DPF carries (a COSE_Sign1 with one certificate is about 1 KiB).
const MAX_INSTRUCTION: usize = 16 * 1024;

/// An instruction as the DPF keeps it.
struct Carried {
    pcid: String,
    sho_id: String,
    body: Vec<u8>,
    report: Option<Vec<u8>>,
    signature: Option<Vec<u8>>,
    certificate: Option<Vec<u8>>,
}

impl<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> for Carried {
    fn from_row(row: &'r sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok(Self {
            pcid: row.try_get("pcid")?,
            sho_id: row.try_get("sho_id")?,
            body: row.try_get("body")?,
            report: row.try_get("report")?,
            signature: row.try_get("signature")?,
            certificate: row.try_get("certificate")?,
        })
    }
}

impl Ro {
    /// Queues `instruction` from the calling SHO for `pcid`'s task stream; the same one again
    /// changes nothing. Returns its id.
    pub(crate) async fn queue_instruction(
        &self,
        auth: &Authorized,
        pcid: &str,
        instruction: Vec<u8>,
    ) -> Result<String, RoleError> {
        // A party to the device: an SHO the device registered at (the table's owner rule).
        let parties: Vec<(String,)> =
            sqlx::query_as("SELECT DISTINCT sho_id FROM ro_registration WHERE pcid = $1")
                .bind(pcid)
                .fetch_all(&self.db)
                .await
                .map_err(db_err)?;
        if parties.is_empty() {
            return Err(RoleError::not_found("no device registered with this PCID"));
        }
        let me = parties
            .into_iter()
            .map(|(s,)| s)
            .find(|s| *s == auth.caller.name)
            .unwrap_or_default();
        auth.owns(&me)?;
        if instruction.len() > MAX_INSTRUCTION {
            return Err(RoleError::invalid(format!(
                "the instruction is larger than {MAX_INSTRUCTION} octets"
            )));
        }
        // The caller's own signature under the SHO CA, for this device.
        let cert = mcim_core::signed::signer_certificate(&instruction)
            .map_err(|e| RoleError::invalid(format!("the instruction: {e}")))?;
        let anchors = mcim_pki::dev::trust_anchors(&self.pki)?;
        let key = mcim_pki::party::party_key(&anchors, &cert, Role::Sho, &auth.caller.name)
            .map_err(|e| RoleError::denied(format!("the instruction: {e}")))?;
        let i: Instruction = mcim_core::signed::open(&instruction, &key)
            .map_err(|e| RoleError::denied(format!("the instruction: {e}")))?;
        if i.kind != KIND || i.pcid != pcid || i.sho != auth.caller.name {
            return Err(RoleError::invalid(
                "the instruction is not the calling SHO's for this device",
            ));
        }
        let id = instruction_id(&instruction);
        let queued = self
            .change_with_task(
                sqlx::query(
                    "INSERT INTO ro_instruction (id, pcid, sho_id, body, queued_at) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
                )
                .bind(&id)
                .bind(pcid)
                .bind(&auth.caller.name)
                .bind(&instruction)
                .bind(now()),
                pcid,
                pb::watch_device_tasks_response::Task::Instruction(pb::InstructionTask {
                    instruction_id: id.clone(),
                    instruction: instruction.clone(),
                }),
            )
            .await?;
        if queued {
            tracing::info!(%pcid, sho = %auth.caller.name, instruction = %id, seq = i.seq, action = i.action.as_str(), "instruction queued for the device");
        }
        Ok(id)
    }

    /// One carried instruction.
    async fn carried(&self, id: &str) -> Result<Carried, RoleError> {
        sqlx::query_as::<_, Carried>(
            "SELECT pcid, sho_id, body, report, signature, certificate \
             FROM ro_instruction WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.db)
        .await
        .map_err(db_err)?
        .ok_or_else(|| RoleError::not_found("no such instruction"))
    }

    /// Keeps the calling device's report on instruction `id` (the first one; a repeated report
    /// changes nothing).
    pub(crate) async fn report_instruction(
        &self,
        auth: &Authorized,
        r: pb::ReportInstructionRequest,
    ) -> Result<(), RoleError> {
        let c = self.carried(&r.instruction_id).await?;
        auth.owns(&c.pcid)?;
        let root = mcim_pki::dev::ca_der(&self.pki, "supplier-root")?;
        verify_report(
            &root,
            &r.report,
            &r.signature,
            &r.device_certificate,
            &c.pcid,
            &c.body,
        )
        .map_err(|e| RoleError::denied(e.to_string()))?;
        let leaf = r.device_certificate.first().cloned().unwrap_or_default();
        sqlx::query(
            "UPDATE ro_instruction SET report = $1, signature = $2, certificate = $3, \
             reported_at = $4 WHERE id = $5 AND report IS NULL",
        )
        .bind(&r.report)
        .bind(&r.signature)
        .bind(leaf)
        .bind(now())
        .bind(&r.instruction_id)
        .execute(&self.db)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    /// The device's report on instruction `id`, for the SHO that queued it.
    pub(crate) async fn instruction_report(
        &self,
        auth: &Authorized,
        id: &str,
    ) -> Result<pb::GetInstructionReportResponse, RoleError> {
        let c = self.carried(id).await?;
        auth.owns(&c.sho_id)?;
        Ok(match (c.report, c.signature, c.certificate) {
            (Some(report), Some(signature), Some(cert)) => pb::GetInstructionReportResponse {
                reported: true,
                report,
                signature,
                device_certificate: vec![cert],
            },
            _ => pb::GetInstructionReportResponse::default(),
        })
    }
}
