//! `mcimctl ro ...`: the Registration Operator's own tools. `offer-renewal` pushes a renewal
//! of a PCID's initial connectivity credential to its device (TR 33.812 5.1.3.7.4.3): the
//! device hears it on its task stream and renews over the ICF.

use std::path::PathBuf;

use clap::Subcommand;
use mcim_pki::Role;
use mcim_proto::mcim::ro::v1 as ro;
use mcim_proto::mcim::ro::v1::icf_service_client::IcfServiceClient;

use crate::error::{CliError, fail, runtime};

/// `mcimctl ro ...`
#[derive(Subcommand)]
pub enum RoCommand {
    /// Ask a device to renew its PCID's initial credential now (or before its next change).
    OfferRenewal {
        /// The RO, `https://host:port`.
        #[arg(long, env = "MCIM_RO_URL", value_parser = crate::net::role_url)]
        ro_url: String,
        /// The PKI directory with the RO's certificate (ro.pem, ro.key) and the CAs.
        #[arg(long, env = "MCIM_PKI")]
        pki: PathBuf,
        /// The device's PCID.
        #[arg(long)]
        pcid: String,
    },
}

/// Runs `mcimctl ro ...`.
pub fn run(cmd: RoCommand) -> Result<(), CliError> {
    let RoCommand::OfferRenewal { ro_url, pki, pcid } = cmd;
    runtime()?.block_on(async {
        let ch = crate::net::role_channel(&pki, Role::Ro, Role::Ro, &ro_url).await?;
        IcfServiceClient::new(ch)
            .offer_renewal(ro::OfferRenewalRequest { pcid: pcid.clone() })
            .await
            .map_err(|s| fail(format!("the RO refused: {}: {}", s.code(), s.message())))?;
        println!("renewal offered to {pcid}: the device renews on its task stream");
        Ok(())
    })
}
