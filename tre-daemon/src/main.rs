//! `tred`: the TRE daemon (TR 33.812 5.1.2). Opens the device's TRE (a TPM or a PKCS#11
//! token), keeps the MCIM registry, serves the local API `mcim.tre.v1` on a Unix socket and
//! runs the device's side of provisioning.
//!
//! ```text
//! tred [--config /etc/mcim/tred.toml]      # MCIM_* variables override the file
//! ```
use std::path::PathBuf;

use clap::Parser;
use mcim_proto::mcim::tre::v1::tre_service_server::TreServiceServer;
use mcim_tre::config::Config;
use mcim_tre::device::Device;
use mcim_tre::engine::{Engine, EngineHandle};
use mcim_tre::service::TreApi;
use mcim_tre::tre::Tre;
#[cfg(feature = "pkcs11")]
use mcim_tre::tre::pkcs11::{Pkcs11Config, Pkcs11Tre};
#[cfg(feature = "tpm")]
use mcim_tre::tre::tpm::{TpmConfig, TpmTre};
use tokio_stream::wrappers::UnixListenerStream;

/// The mcim TRE daemon: the device's MCIM registry, AKA inside its TPM or PKCS#11 token, and
/// the device's side of provisioning (TR 33.812 Alternative 1a).
#[derive(Parser)]
#[command(name = "tred", version)]
struct Args {
    /// TOML configuration file (see tre-daemon/tred.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Lists every configuration key, its MCIM_* variable and its default, and exits.
    #[arg(long)]
    config_keys: bool,
    /// Writes the man page tred.8 into a folder (what the Debian package installs), and exits.
    #[arg(long, hide = true, value_name = "DIR")]
    generate_man: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(dir) = &args.generate_man {
        return match write_man_page(dir) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tred: {}: {e}", dir.display());
                std::process::ExitCode::FAILURE
            }
        };
    }
    if args.config_keys {
        print!("{}", Config::key_table());
        return std::process::ExitCode::SUCCESS;
    }
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tred: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // Logs, and OTLP traces when OTEL_EXPORTER_OTLP_ENDPOINT is set (the exporter runs on the
    // runtime; `run` drops the telemetry before the runtime, so the last spans are sent).
    let (runtime, telemetry) = match mcim_telemetry::runtime("tred", &config.log) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tred: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match run(config, runtime, telemetry) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("tred: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(
    config: Config,
    runtime: tokio::runtime::Runtime,
    telemetry: mcim_telemetry::Telemetry,
) -> Result<(), String> {
    // Held for the daemon's life; the kernel releases it when the process ends, SIGKILL too.
    let _lock = lock_state_dir(&config.state_dir)?;
    let state_dir = config.state_dir.clone();
    let open = opener(&config)?;
    let (engine, tre_thread) =
        EngineHandle::spawn(move || Engine::new(open()?, state_dir).map_err(|e| e.to_string()))?;
    let served = runtime.block_on(serve(&config, engine));
    // The last spans go out while the runtime still runs the exporter.
    drop(telemetry);
    // Dropping the runtime drops the last engine handle; the TRE thread then ends.
    drop(runtime);
    let _ = tre_thread.join();
    served
}

/// One `tred` per state directory: an exclusive lock on `<state_dir>/tred.lock`. A second
/// daemon on the same directory would keep its own copy of the registry in memory and undo
/// the first one's transactions.
fn lock_state_dir(dir: &std::path::Path) -> Result<std::fs::File, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join("tred.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "another tred is running on the state directory {} (it holds {})",
            dir.display(),
            path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(format!("{}: {e}", path.display())),
    }
}

/// tred.8: the flags, then every configuration key with its variable and default, and the
/// files.
fn write_man_page(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let man = clap_mangen::Man::new(Args::command()).section("8");
    let mut page = std::fs::File::create(dir.join(man.get_filename()))?;
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    writeln!(
        page,
        ".SH CONFIGURATION\nThe TOML file's keys; each key's variable overrides the file.\n.PP\n.nf"
    )?;
    for line in Config::key_table().lines() {
        // A line starting with a dot or a quote would be a roff request.
        writeln!(page, "\\&{}", line.replace('\\', "\\e"))?;
    }
    writeln!(
        page,
        ".fi\n.SH FILES\n.TP\n/etc/mcim/tred.toml\nthe configuration (--config)\n.TP\n\
         /var/lib/mcim/tred\nthe MCIM registry and audit record (state_dir)\n.TP\n\
         /run/mcim/tred.sock\nthe local API (socket)"
    )?;
    man.render_version_section(&mut page)?;
    page.flush()
}

type Opener = Box<dyn FnOnce() -> Result<Box<dyn Tre>, String> + Send>;

/// What opens the configured TRE, on the TRE thread.
fn opener(config: &Config) -> Result<Opener, String> {
    match config.backend.as_str() {
        #[cfg(feature = "pkcs11")]
        "pkcs11" => {
            let pkcs11 = Pkcs11Config {
                module: config.pkcs11_module.clone(),
                token_label: config.pkcs11_token.clone(),
                pin: config.pkcs11_pin().map_err(|e| e.to_string())?,
                force_rsa_unwrap: config.pkcs11_unwrap == "rsa-oaep",
            };
            Ok(Box::new(move || {
                Pkcs11Tre::open(&pkcs11)
                    .map(|t| Box::new(t) as Box<dyn Tre>)
                    .map_err(|e| e.to_string())
            }))
        }
        #[cfg(feature = "tpm")]
        "tpm" => {
            let tcti = config.tcti.clone();
            let sealed = config.tpm_aka == "sealed";
            Ok(Box::new(move || {
                TpmTre::open(&TpmConfig { tcti })
                    .map(|t| {
                        Box::new(if sealed { t.with_sealed_k_only() } else { t }) as Box<dyn Tre>
                    })
                    .map_err(|e| e.to_string())
            }))
        }
        other => Err(format!("the {other} backend is not built into this tred")),
    }
}

async fn serve(config: &Config, engine: EngineHandle) -> Result<(), String> {
    let path = &config.socket;
    let mode = config.socket_mode().map_err(|e| e.to_string())?;
    let listener = mcim_tre::access::bind_local_socket(path, mode)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    tracing::info!(socket = %path.display(), mode = format!("{mode:o}"), backend = %config.backend, state = %config.state_dir.display(), "tred serving");

    let key = config.rehabilitation_key().map_err(|e| e.to_string())?;
    // Computed on first use, once: only a TRE without quotes needs it.
    let conf = config.clone();
    let cell = std::sync::Arc::new(std::sync::OnceLock::new());
    let measure = std::sync::Arc::new(move || *cell.get_or_init(|| measurement(&conf)));
    let certs = mcim_tre::certificates::Certificates::new(&config.state_dir);
    let device = Device::new(engine, config.quote_pcrs.clone(), key, measure, certs);
    let net = match (&config.ca_file, &config.ro_url) {
        (Some(ca), Some(ro)) => Some(mcim_tre::provision::Network::load(
            ca,
            config.sho_ca_file.as_deref(),
            config.ca_dir.as_deref(),
            ro.clone(),
            config.vno_url.clone(),
        )?),
        _ => None,
    };
    // The process's metrics, named before anything counts (a resumed run, say).
    let metrics = mcim_telemetry::metrics::init("tred");
    let provisioner =
        mcim_tre::provision::Provisioner::start(device.clone(), config.state_dir.clone(), net)?;
    let policy = config.access_policy().map_err(|e| e.to_string())?;
    // The USIM for modem bridges (raw APDUs), when configured.
    let usim = match &config.usim_socket {
        Some(p) => {
            let listener = mcim_tre::access::bind_local_socket(p, mode)
                .map_err(|e| format!("usim_socket {}: {e}", p.display()))?;
            Some(tokio::spawn(mcim_tre::usim::socket::serve(
                listener,
                p.clone(),
                device.clone(),
                std::sync::Arc::new(policy.clone()),
            )))
        }
        None => None,
    };
    // The USIM as a PC/SC card, when configured.
    let vpcd = config
        .usim_vpcd()
        .map_err(|e| e.to_string())?
        .map(|(addr, owner, pin_admin)| {
            tokio::spawn(mcim_tre::usim::vpcd::serve(
                addr,
                owner,
                pin_admin,
                device.clone(),
            ))
        });
    // Prometheus metrics, when configured.
    let metrics_task = match config.metrics_listen().map_err(|e| e.to_string())? {
        Some(addr) => {
            let listener = mcim_telemetry::metrics::bind(addr).await?;
            tracing::info!(%addr, "metrics: GET /metrics");
            Some(tokio::spawn(mcim_telemetry::metrics::serve(
                listener,
                metrics.clone(),
            )))
        }
        None => None,
    };
    let api = TreApi::new(device, Some(provisioner));
    mcim_telemetry::notify_ready();
    if policy.enforced() {
        tracing::info!(?policy, "local API: callers admitted by group");
    } else {
        tracing::warn!(
            "local API: no owner_group, modem_group or audit_group: whoever can open the socket may call everything"
        );
    }
    let server = tonic::transport::Server::builder()
        .layer(mcim_telemetry::metrics::MetricsLayer::new(metrics, |m| {
            mcim_tre::access::needed(m).is_some()
        }))
        .layer(mcim_tre::access::Access::new(policy))
        .add_service(TreServiceServer::new(api))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown());
    // SIGTERM: stop accepting and drain the calls in flight, for DRAIN at most (a client that
    // keeps its connection or a stream open would hold the drain forever). The TRE thread
    // finishes the job it runs; registry transactions are atomic.
    let result = tokio::select! {
        r = server => r.map_err(|e| e.to_string()),
        _ = async { shutdown().await; tokio::time::sleep(DRAIN).await } => {
            tracing::warn!("calls still open {} s after the signal: stopping", DRAIN.as_secs());
            Ok(())
        }
    };
    let _ = std::fs::remove_file(path);
    if let (Some(task), Some(p)) = (usim, &config.usim_socket) {
        task.abort();
        let _ = std::fs::remove_file(p);
    }
    for task in [vpcd, metrics_task].into_iter().flatten() {
        task.abort();
    }
    tracing::info!("tred stopped");
    result
}

/// SHA-256 of this executable and the effective configuration: what a TRE without quotes
/// signs as the daemon's state (mcim_core::token_evidence).
fn measurement(config: &Config) -> [u8; 32] {
    let exe = std::env::current_exe()
        .and_then(std::fs::read)
        .unwrap_or_default();
    let conf = format!("{config:?}");
    mcim_core::tpm::kdf::sha256(&[
        &mcim_core::tpm::kdf::sha256(&[&exe]),
        &mcim_core::tpm::kdf::sha256(&[conf.as_bytes()]),
    ])
}

/// How long a stopping `tred` drains its calls in flight.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(3);

/// SIGTERM or SIGINT: stop accepting, finish the calls in flight, exit.
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
    tracing::info!("shutting down");
}
