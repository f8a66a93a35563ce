//! The `tred` client: `mcim.tre.v1` over the daemon's Unix socket, and how its provisioning
//! steps print.

use std::path::Path;

use mcim_proto::mcim::tre::v1 as pb;
use mcim_proto::mcim::tre::v1::tre_service_client::TreServiceClient;
use tonic::transport::Channel;

use crate::error::CliError;

/// Connects to `tred` at `socket`.
pub async fn connect(socket: &Path) -> Result<TreServiceClient<Channel>, CliError> {
    let path = socket.to_path_buf();
    let err = |detail: String| CliError::Connect {
        path: socket.display().to_string(),
        detail,
    };
    let channel = tonic::transport::Endpoint::try_from("http://tred.local")
        .map_err(|e| err(e.to_string()))?
        .connect_with_connector(tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .map_err(|e| err(format!("{e} (is tred running?)")))?;
    Ok(TreServiceClient::new(channel))
}

/// One provisioning step as a line: number, name, outcome, detail.
pub fn step_line(s: &pb::WatchProvisioningResponse) -> String {
    format!(
        "step {:>2}  {:<60} {}{}",
        s.step,
        s.name,
        if s.ok { "ok" } else { "FAILED" },
        if s.detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", s.detail)
        }
    )
}
