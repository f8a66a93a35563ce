//! `mcimctl sho instruct` and `mcimctl sho instruction`: an SHO's own operator instructs a
//! device about this SHO's MCIM on it (TR 33.812 5.1.1.3 remote management by an authorised
//! stakeholder; 5.1.2.4) and reads what the device reported. The SHO signs the instruction
//! and the RO's DPF carries it on the device's task stream; the device verifies it against
//! the trust roots it holds, executes it and reports, signed in its TRE. The command speaks
//! to the SHO with the SHO's own certificate (only it may instruct for the SHO).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use mcim_pki::Role;
use mcim_proto::mcim::sho::v1 as sho;
use mcim_proto::mcim::sho::v1::sho_service_client::ShoServiceClient;
use tonic::transport::Channel;

use crate::error::{CliError, fail, runtime};

/// What to instruct.
#[derive(Clone, Copy, ValueEnum)]
pub enum ActionArg {
    /// Report whether the device holds the MCIM and its state; nothing changes.
    Discover,
    /// Block it (a session on it ends first).
    Block,
    /// Unblock it.
    Unblock,
    /// Retire it: its secrets leave the TRE.
    Retire,
    /// Delete it (retired first).
    Delete,
}

impl ActionArg {
    fn wire(self) -> sho::InstructionAction {
        match self {
            ActionArg::Discover => sho::InstructionAction::Discover,
            ActionArg::Block => sho::InstructionAction::Block,
            ActionArg::Unblock => sho::InstructionAction::Unblock,
            ActionArg::Retire => sho::InstructionAction::Retire,
            ActionArg::Delete => sho::InstructionAction::Delete,
        }
    }
}

/// How the SHO's operator reaches its SHO.
#[derive(Args, Clone)]
pub struct ShoSelf {
    /// The SHO, `https://host:port`.
    #[arg(long, env = "MCIM_SHO_URL", value_parser = crate::net::role_url)]
    sho_url: String,
    /// The PKI directory holding the SHO's certificate and the roles' CAs.
    #[arg(long, env = "MCIM_PKI")]
    pki: PathBuf,
    /// The SHO's files in it: `<party>.pem`, `<party>.key` (`sho2` for the lab's second SHO).
    #[arg(long, default_value = "sho")]
    party: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `mcimctl sho instruct`.
#[derive(Args)]
pub struct InstructArgs {
    #[command(flatten)]
    sho: ShoSelf,
    /// The device's PCID.
    #[arg(long)]
    pcid: String,
    /// What to do with this SHO's MCIM on it.
    #[arg(long, value_enum)]
    action: ActionArg,
    /// Wait this many seconds for the device's report (0: only queue it; read it later with
    /// `mcimctl sho instruction ID`).
    #[arg(long, default_value_t = 60)]
    wait: u64,
}

/// Arguments of `mcimctl sho instruction`.
#[derive(Args)]
pub struct InstructionArgs {
    #[command(flatten)]
    sho: ShoSelf,
    /// The instruction's id (from `mcimctl sho instruct`).
    id: String,
}

async fn client(s: &ShoSelf) -> Result<ShoServiceClient<Channel>, CliError> {
    Ok(ShoServiceClient::new(
        crate::net::party_channel(&s.pki, &s.party, Role::Sho, &s.sho_url).await?,
    ))
}

fn status(s: tonic::Status) -> CliError {
    fail(format!("the SHO refused: {}: {}", s.code(), s.message()))
}

/// `mcimctl sho instruct`.
pub fn run(a: InstructArgs) -> Result<(), CliError> {
    runtime()?.block_on(async {
        let mut c = client(&a.sho).await?;
        let r = c
            .instruct_device(sho::InstructDeviceRequest {
                pcid: a.pcid.clone(),
                action: a.action.wire() as i32,
            })
            .await
            .map_err(status)?
            .into_inner();
        if !a.sho.json {
            println!(
                "instruction {} (#{}) about MCIM {} queued for {}",
                r.instruction_id, r.seq, r.imsi, a.pcid
            );
        }
        let deadline = Instant::now() + Duration::from_secs(a.wait);
        loop {
            let got = c
                .get_instruction(sho::GetInstructionRequest {
                    instruction_id: r.instruction_id.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            if got.reported || Instant::now() >= deadline {
                return show(&a.sho, &r.instruction_id, &got, a.wait > 0);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

/// `mcimctl sho instruction`.
pub fn run_status(a: InstructionArgs) -> Result<(), CliError> {
    runtime()?.block_on(async {
        let got = client(&a.sho)
            .await?
            .get_instruction(sho::GetInstructionRequest {
                instruction_id: a.id.clone(),
            })
            .await
            .map_err(status)?
            .into_inner();
        show(&a.sho, &a.id, &got, false)
    })
}

/// Prints what the device reported; an error when it refused, or (`waited`) when it did not
/// report in time.
fn show(
    s: &ShoSelf,
    id: &str,
    got: &sho::GetInstructionResponse,
    waited: bool,
) -> Result<(), CliError> {
    if s.json {
        println!(
            "{}",
            serde_json::json!({
                "instruction_id": id,
                "imsi": got.imsi,
                "seq": got.seq,
                "reported": got.reported,
                "outcome": got.outcome,
                "mcim_state": got.mcim_state,
                "reason": got.reason,
            })
        );
    } else if got.reported {
        println!(
            "the device reported: {} (MCIM {}{})",
            got.outcome,
            got.mcim_state,
            if got.reason == mcim_pki::instruction::NO_REASON {
                String::new()
            } else {
                format!(", reason: {}", got.reason)
            }
        );
    } else {
        println!("not reported yet");
    }
    if got.reported && got.outcome != mcim_pki::instruction::DONE {
        return Err(fail(format!("the device refused: {}", got.reason)));
    }
    if !got.reported && waited {
        return Err(fail(
            "the device has not reported yet (it may be offline): read it later with \
             `mcimctl sho instruction ID`",
        ));
    }
    Ok(())
}
