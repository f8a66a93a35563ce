//! `mcim-roles`: the network roles' gRPC servers over mutual TLS.
//!
//! ```text
//! mcim-roles supplier --pki DIR --listen 127.0.0.1:7401
//! mcim-roles pva      --pki DIR --listen 127.0.0.1:7405 --db sqlite://pva.db
//! mcim-roles all      --pki DIR --db sqlite://roles.db   # every role so far, one process
//! ```
//! Other roles join as they are built (issue 5).
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use mcim_proto::mcim::pva::v1::pva_service_server::PvaServiceServer;
use mcim_proto::mcim::supplier::v1::supplier_service_server::SupplierServiceServer;
use mcim_roles::authz::Role;
use mcim_roles::pva::Pva;
use mcim_roles::supplier::Supplier;
use mcim_roles::tls::server_tls;

/// The mcim network roles.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    role: RoleCmd,
}

#[derive(Subcommand)]
enum RoleCmd {
    /// The equipment supplier (certifies devices' attestation and TLS keys).
    Supplier {
        /// PKI directory (`mcimctl pki init`).
        #[arg(long, env = "MCIM_PKI")]
        pki: PathBuf,
        /// Address to listen on.
        #[arg(long, env = "MCIM_LISTEN", default_value = "127.0.0.1:7401")]
        listen: SocketAddr,
    },
    /// Every role built so far in one process, on one database, each on its own port.
    All {
        /// PKI directory (`mcimctl pki init`).
        #[arg(long, env = "MCIM_PKI")]
        pki: PathBuf,
        /// The database (SQLite URL).
        #[arg(long, env = "MCIM_DB", default_value = "sqlite://mcim-roles.db")]
        db: String,
        /// The supplier's address.
        #[arg(long, default_value = "127.0.0.1:7401")]
        supplier_listen: SocketAddr,
        /// The PVA's address.
        #[arg(long, default_value = "127.0.0.1:7405")]
        pva_listen: SocketAddr,
    },
    /// The Platform Validation Authority (validates devices; signs results).
    Pva {
        /// PKI directory (`mcimctl pki init`).
        #[arg(long, env = "MCIM_PKI")]
        pki: PathBuf,
        /// The database (SQLite URL).
        #[arg(long, env = "MCIM_DB", default_value = "sqlite://mcim-roles.db")]
        db: String,
        /// Address to listen on.
        #[arg(long, env = "MCIM_LISTEN", default_value = "127.0.0.1:7405")]
        listen: SocketAddr,
    },
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MCIM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mcim-roles: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args.role)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcim-roles: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(cmd: RoleCmd) -> Result<(), String> {
    match cmd {
        RoleCmd::Supplier { pki, listen } => serve_role(Role::Supplier, pki, listen, None).await,
        RoleCmd::Pva { pki, listen, db } => {
            let pool = mcim_roles::store::open(&db)
                .await
                .map_err(|e| e.to_string())?;
            serve_role(Role::Pva, pki, listen, Some(pool)).await
        }
        RoleCmd::All {
            pki,
            db,
            supplier_listen,
            pva_listen,
        } => {
            // One process, one database, each role on its own port with its own identity.
            let pool = mcim_roles::store::open(&db)
                .await
                .map_err(|e| e.to_string())?;
            tokio::try_join!(
                serve_role(Role::Supplier, pki.clone(), supplier_listen, None),
                serve_role(Role::Pva, pki, pva_listen, Some(pool)),
            )
            .map(|_| ())
        }
    }
}

/// Serves one role over mutual TLS, with gRPC health and reflection.
async fn serve_role(
    role: Role,
    pki: PathBuf,
    listen: SocketAddr,
    db: Option<sqlx::SqlitePool>,
) -> Result<(), String> {
    let tls = server_tls(&pki, role).map_err(|e| e.to_string())?;
    let mut builder = tonic::transport::Server::builder()
        .tls_config(tls)
        .map_err(|e| e.to_string())?;
    // gRPC health and reflection on every server (authenticated by mutual TLS like the rest).
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(mcim_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| e.to_string())?;
    let router = builder.add_service(health).add_service(reflection);
    let router = match (role, db) {
        (Role::Pva, Some(pool)) => {
            reporter.set_serving::<PvaServiceServer<Pva>>().await;
            router.add_service(PvaServiceServer::new(
                Pva::new(pki, pool).map_err(|e| e.to_string())?,
            ))
        }
        (Role::Supplier, _) => {
            reporter
                .set_serving::<SupplierServiceServer<Supplier>>()
                .await;
            router.add_service(SupplierServiceServer::new(Supplier::new(pki)))
        }
        (other, _) => return Err(format!("the {other} role is not built yet")),
    };
    tracing::info!(%listen, %role, "serving (mutual TLS)");
    router
        .serve_with_shutdown(listen, shutdown())
        .await
        .map_err(|e| e.to_string())
}

/// SIGTERM or Ctrl-C.
async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
