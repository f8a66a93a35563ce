//! `mcim-roles`: the network roles' gRPC servers over mutual TLS.
//!
//! ```text
//! mcim-roles all      --pki DIR --db sqlite://roles.db   # every role, one process, one database
//!                                                       # (and the lab's second SHO on its own)
//! mcim-roles supplier --pki DIR --listen 127.0.0.1:7401
//! mcim-roles ro       --pki DIR --db sqlite://ro.db  --listen 127.0.0.1:7402   # ICF, DRF, DPF
//! mcim-roles vno      --pki DIR --db sqlite://vno.db --listen 127.0.0.1:7403 \
//!                     --route 00101=icf:https://127.0.0.1:7402 --route 00102=sho:https://127.0.0.1:7404
//! mcim-roles sho      --pki DIR --db sqlite://sho.db --listen 127.0.0.1:7404
//! mcim-roles pva      --pki DIR --db sqlite://pva.db --listen 127.0.0.1:7405
//! mcim-roles all      --pki DIR --db postgres://mcim@db.example/mcim   # on PostgreSQL (any
//!                                                       # number of processes on one database)
//! ```
//! Every flag has an `MCIM_*` environment variable, and every flag can be set in a TOML file
//! given by `--config FILE` or `MCIM_CONFIG` (see `network-roles/mcim-roles.toml`; the
//! command line and the environment win over the file). Roles reach each other at
//! `https://` URLs and know each other by their certificates (`<role>.mcim.local`).
/// mimalloc: ~11 % of the roles' CPU was glibc's malloc and free; mimalloc cut the roles'
/// CPU per provisioning by ~15 % (BENCHMARKS.md, "Where the roles' CPU goes").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand};
use mcim_proto::mcim::pva::v1::pva_service_server::PvaServiceServer;
use mcim_proto::mcim::ro::v1::dpf_service_server::DpfServiceServer;
use mcim_proto::mcim::ro::v1::drf_service_server::DrfServiceServer;
use mcim_proto::mcim::ro::v1::icf_service_server::IcfServiceServer;
use mcim_proto::mcim::sho::v1::sho_service_server::ShoServiceServer;
use mcim_proto::mcim::supplier::v1::supplier_service_server::SupplierServiceServer;
use mcim_proto::mcim::vno::v1::vno_service_server::VnoServiceServer;
use mcim_roles::authz::Role;
use mcim_roles::pva::Pva;
use mcim_roles::ro::Ro;
use mcim_roles::ro::dpf::Dpf;
use mcim_roles::ro::drf::Drf;
use mcim_roles::ro::icf::Icf;
use mcim_roles::sho::{Sho, ShoApi, ShoConfig};
use mcim_roles::store::Db;
use mcim_roles::supplier::Supplier;
use mcim_roles::tls::{server_config, tls_incoming};
use mcim_roles::vno::{Route, Vno};

/// The mcim network roles.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// A TOML file of the same settings (mcim-roles.toml); flags and MCIM_* variables win
    /// over it.
    #[arg(long, env = "MCIM_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics (text format, `GET /metrics`, plain HTTP) on this address:
    /// calls by RPC and status, latency, provisionings by outcome, the RO's task queue, the
    /// database pools. Bind it where only the scraper reaches. Off unless set.
    #[arg(long, env = "MCIM_METRICS_LISTEN", global = true)]
    metrics_listen: Option<SocketAddr>,
    /// At most this many calls from devices and subscribers in flight per role server; past
    /// it a call is answered at once with RESOURCE_EXHAUSTED and a retry hint
    /// (`grpc-retry-pushback-ms`), which tred honours with jittered exponential backoff.
    /// Calls between roles are not limited.
    #[arg(long, env = "MCIM_MAX_CONCURRENT_CALLS", global = true, default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_concurrent_calls: u32,
    /// At most this many established client connections of devices and subscribers held by
    /// the whole process, over all its roles (the operators' roles have 128 more of their
    /// own); past it a newcomer displaces a connection of a client holding more than a fair
    /// share, else the idle connection (no call in flight) quiet for longest (at least 5 s;
    /// its client retries), or is
    /// closed at once when there is none. Default: the
    /// open-files limit (raised to its hard limit at start) less 896, at most 10,000.
    #[arg(long, env = "MCIM_MAX_CONNECTIONS", global = true,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: Option<u32>,
    /// At most this many client connections from one IP address, an IPv6 /64 counted as one
    /// (0: no limit but the total). Set it where devices do not share addresses (behind NAT
    /// they do).
    #[arg(
        long,
        env = "MCIM_MAX_CONNECTIONS_PER_PEER",
        global = true,
        default_value_t = 0
    )]
    max_connections_per_peer: u32,
    #[command(subcommand)]
    role: RoleCmd,
}

/// What every role needs.
#[derive(ClapArgs, Clone)]
struct Common {
    /// PKI directory (`mcimctl pki init`).
    #[arg(long, env = "MCIM_PKI")]
    pki: PathBuf,
    /// The database: `sqlite://PATH` (created if missing) or
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/NAME` (created if missing and the user may);
    /// any number of processes of a role may share one PostgreSQL database.
    #[arg(long, env = "MCIM_DB", default_value = "sqlite://mcim-roles.db")]
    db: String,
}

/// Where the roles are (URLs other roles and devices use).
#[derive(ClapArgs, Clone)]
struct Peers {
    /// The RO (ICF, DRF, DPF).
    #[arg(long, env = "MCIM_RO_URL", default_value = "https://127.0.0.1:7402")]
    ro_url: String,
    /// The SHO.
    #[arg(long, env = "MCIM_SHO_URL", default_value = "https://127.0.0.1:7404")]
    sho_url: String,
    /// The PVA.
    #[arg(long, env = "MCIM_PVA_URL", default_value = "https://127.0.0.1:7405")]
    pva_url: String,
}

/// The SHO's numbering.
#[derive(ClapArgs, Clone)]
struct ShoArgs {
    /// MCC+MNC of the SHO's IMSIs.
    #[arg(long, env = "MCIM_SHO_PLMN", default_value = "00102")]
    sho_plmn: String,
    /// The SHO's service provider name.
    #[arg(long, env = "MCIM_SHO_NAME", default_value = "mcim lab SHO")]
    sho_name: String,
    /// The SHO's files in the PKI directory (`<party>.pem`, `<party>.key`).
    #[arg(long, env = "MCIM_SHO_PARTY", default_value = "sho")]
    sho_party: String,
}

/// Where a replica of `mcim-roles all` listens (`--replica-base-ports`): its base port, on this
/// process's `--host` or on a host of its own.
#[derive(Clone, Copy, Debug)]
struct ReplicaAt {
    host: Option<std::net::IpAddr>,
    port: u16,
}

impl std::str::FromStr for ReplicaAt {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Ok(port) = s.parse::<u16>() {
            return Ok(Self { host: None, port });
        }
        let a: SocketAddr = s
            .parse()
            .map_err(|_| format!("{s:?}: a base port, or HOST:PORT with HOST an IP address"))?;
        Ok(Self {
            host: Some(a.ip()),
            port: a.port(),
        })
    }
}

#[derive(Subcommand)]
enum RoleCmd {
    /// Every role in one process, on one database, each on its own port with its own identity.
    All {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        sho: ShoArgs,
        /// MCC+MNC of the PCIDs the RO's ICF serves.
        #[arg(long, env = "MCIM_PCID_PLMN", default_value = "00101")]
        pcid_plmn: String,
        /// The address every role listens on.
        #[arg(long, env = "MCIM_HOST", default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// The first of six consecutive ports: supplier, RO, VNO, SHO, PVA, and the second
        /// SHO.
        #[arg(long, env = "MCIM_BASE_PORT", default_value_t = 7401)]
        base_port: u16,
        /// MCC+MNC of the second SHO's IMSIs (the lab's operator to change to, 5.1.3.7; served
        /// when the PKI directory holds `sho2.pem`, on its own database beside `--db`).
        #[arg(long, env = "MCIM_SHO2_PLMN", default_value = "00103")]
        sho2_plmn: String,
        /// The base ports of every replica of this process (this one's included), all on one
        /// PostgreSQL `--db`: `PORT` on `--host`, or `HOST:PORT` (`[V6]:PORT`) for a replica on
        /// another host. The addresses the roles give each other (the SHO's to the RO, the
        /// DPF's to the SHO) and call each other at list them all, so that work a replica began
        /// goes on when it dies.
        #[arg(long, env = "MCIM_REPLICA_BASE_PORTS", value_delimiter = ',')]
        replica_base_ports: Vec<ReplicaAt>,
    },
    /// The equipment supplier (certifies devices' attestation and TLS keys). It keeps no
    /// database, so it takes no `--db`.
    Supplier {
        /// PKI directory (`mcimctl pki init`).
        #[arg(long, env = "MCIM_PKI")]
        pki: PathBuf,
        /// Address to listen on.
        #[arg(long, env = "MCIM_LISTEN", default_value = "127.0.0.1:7401")]
        listen: SocketAddr,
        /// The RO whose ICF receives the connectivity credentials (CCIF mode 2).
        #[arg(long, env = "MCIM_RO_URL")]
        ro_url: Option<String>,
    },
    /// The Registration Operator: ICF, DRF and DPF.
    Ro {
        #[command(flatten)]
        common: Common,
        /// Address to listen on.
        #[arg(long, env = "MCIM_LISTEN", default_value = "127.0.0.1:7402")]
        listen: SocketAddr,
        /// Where SHOs reach this RO's DPF.
        #[arg(long, env = "MCIM_RO_URL", default_value = "https://127.0.0.1:7402")]
        ro_url: String,
    },
    /// The Visited Network Operator.
    Vno {
        #[command(flatten)]
        common: Common,
        /// Address to listen on.
        #[arg(long, env = "MCIM_LISTEN", default_value = "127.0.0.1:7403")]
        listen: SocketAddr,
        /// Roaming routes, MCCMNC=icf:URL or MCCMNC=sho:URL (repeatable, or several in one
        /// value separated by commas; a URL may list the role's replicas, comma-separated).
        #[arg(long = "route", env = "MCIM_ROUTES", required = true)]
        routes: Vec<String>,
    },
    /// The Selected Home Operator.
    Sho {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        peers: Peers,
        #[command(flatten)]
        sho: ShoArgs,
        /// Address to listen on.
        #[arg(long, env = "MCIM_LISTEN", default_value = "127.0.0.1:7404")]
        listen: SocketAddr,
    },
    /// Writes the man pages (mcim-roles.8 and one per role, mcim-roles-sho.8, ...) into a
    /// folder: what the Debian package installs.
    #[command(hide = true)]
    Man {
        /// The folder (created if absent).
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// The Platform Validation Authority (validates devices; signs results).
    Pva {
        #[command(flatten)]
        common: Common,
        /// Address to listen on.
        #[arg(long, env = "MCIM_LISTEN", default_value = "127.0.0.1:7405")]
        listen: SocketAddr,
    },
}

fn main() -> std::process::ExitCode {
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(file) = mcim_roles::config::config_path(&argv) {
        use clap::CommandFactory;
        // Built, so that every role's command carries the global settings (metrics, limits).
        let mut cmd = Args::command();
        cmd.build();
        argv = match mcim_roles::config::with_file(&cmd, argv, file.as_ref()) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("mcim-roles: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
    }
    let args = Args::parse_from(argv);
    if let RoleCmd::Man { out_dir } = &args.role {
        return match write_man_pages(out_dir) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mcim-roles: {}: {e}", out_dir.display());
                std::process::ExitCode::FAILURE
            }
        };
    }
    // Logs (MCIM_LOG), and OTLP traces when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    // rustls's own warnings are about what peers send (anyone can make them): errors only.
    let filter = std::env::var("MCIM_LOG").unwrap_or_else(|_| "info,rustls=error".into());
    let (runtime, telemetry) = match mcim_telemetry::runtime("mcim-roles", &filter) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mcim-roles: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let fd_limit = mcim_roles::tls::raise_fd_limit();
    let limits = Limits {
        max_calls: args.max_concurrent_calls,
        connections: mcim_roles::tls::ConnectionLimits::new(
            args.max_connections.map_or_else(
                || mcim_roles::tls::ConnectionLimits::default_total(fd_limit),
                |n| usize::try_from(n).unwrap_or(usize::MAX),
            ),
            usize::try_from(args.max_connections_per_peer).unwrap_or(usize::MAX),
        ),
    };
    // SIGTERM: the servers stop accepting and drain the calls in flight, for DRAIN at most
    // (clients that keep idle connections or streams open would hold a drain forever).
    let served = runtime.block_on(async {
        tokio::select! {
            r = serve(args.role, args.metrics_listen, limits) => r,
            _ = async { shutdown().await; tokio::time::sleep(DRAIN).await } => {
                tracing::warn!("calls still open {} s after the signal: stopping", DRAIN.as_secs());
                Ok(())
            }
        }
    });
    // The last spans go out while the runtime still runs the exporter.
    drop(telemetry);
    drop(runtime);
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcim-roles: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// mcim-roles.8, and a page per role (section 8: daemons).
fn write_man_pages(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    let mut cmd = Args::command().disable_help_subcommand(true);
    cmd.build();
    for role in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
        clap_mangen::Man::new(role.clone())
            .section("8")
            .generate_to(dir)?;
    }
    clap_mangen::Man::new(cmd).section("8").generate_to(dir)?;
    Ok(())
}

/// A role's services, built.
enum Service {
    Supplier(Supplier),
    Ro(std::sync::Arc<Ro>),
    Vno(Vno),
    Sho(std::sync::Arc<Sho>),
    Pva(Pva),
}

/// Opens a role's database; its pool's connections are metrics (by the database's name).
async fn open(db: &str) -> Result<Db, String> {
    let pool = mcim_roles::store::open(db)
        .await
        .map_err(|e| format!("database {}: {e}", db_name(db)))?;
    let metrics = mcim_telemetry::metrics::init("mcim_roles");
    let size = metrics.gauges(
        "db_pool_connections",
        "connections a database pool holds, by database",
    );
    let idle = metrics.gauges(
        "db_pool_idle_connections",
        "idle connections of a database pool, by database",
    );
    let name = db_name(db);
    let p = pool.clone();
    metrics.on_scrape(move || {
        let label = mcim_telemetry::metrics::NameLabels { name: name.clone() };
        size.get_or_create(&label).set(i64::from(p.size()));
        idle.get_or_create(&label)
            .set(i64::try_from(p.num_idle()).unwrap_or(i64::MAX));
    });
    Ok(pool)
}

/// A database's name for messages and metrics, never its URL (which may carry a password).
fn db_name(db: &str) -> String {
    db.split('?')
        .next()
        .and_then(|p| p.rsplit('/').next())
        .unwrap_or("db")
        .to_string()
}

/// Keeps the gauge of tasks queued for devices and not yet sent (the RO's `ro_task` beyond
/// each device's last sent one) up to date, every 5 s.
async fn task_queue_depth(pool: Db) {
    let metrics = mcim_telemetry::metrics::init("mcim_roles");
    let depth = metrics.gauges(
        "task_queue_depth",
        "tasks queued for devices and not yet sent, by queue (refreshed every 5 s)",
    );
    let label = mcim_telemetry::metrics::NameLabels {
        name: "ro_task".into(),
    };
    loop {
        let n: Result<(i64,), _> = sqlx::query_as(
            "SELECT COUNT(*) FROM ro_task t LEFT JOIN ro_task_sent s ON s.pcid = t.pcid \
             WHERE s.last_seq IS NULL OR t.seq > s.last_seq",
        )
        .fetch_one(&pool)
        .await;
        if let Ok((n,)) = n {
            depth.get_or_create(&label).set(n);
        }
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    }
}

fn sho_config(url: String, peers: &Peers, sho: ShoArgs) -> ShoConfig {
    ShoConfig {
        url,
        ro_url: peers.ro_url.clone(),
        pva_url: peers.pva_url.clone(),
        plmn: sho.sho_plmn,
        name: sho.sho_name,
        party: sho.sho_party,
    }
}

/// The second SHO's database beside `db` (`sqlite://roles.db` -> `sqlite://roles-sho2.db`):
/// another operator keeps its own.
fn second_sho_db(db: &str) -> String {
    let (path, query) = db.split_once('?').map_or((db, None), |(p, q)| (p, Some(q)));
    let path = match path.strip_suffix(".db") {
        Some(stem) => format!("{stem}-sho2.db"),
        None => format!("{path}-sho2"),
    };
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    }
}

/// What bounds the work a process takes: calls in flight per role, connections in all.
struct Limits {
    max_calls: u32,
    connections: mcim_roles::tls::ConnectionLimits,
}

async fn serve(
    cmd: RoleCmd,
    metrics_listen: Option<SocketAddr>,
    limits: Limits,
) -> Result<(), String> {
    let Limits {
        max_calls,
        connections,
    } = limits;
    let e = |e: mcim_roles::error::RoleError| e.to_string();
    let metrics = mcim_telemetry::metrics::init("mcim_roles");
    {
        let open = metrics.gauges(
            "tls_connections_open",
            "Client connections the process holds (all roles; `open` established, `max` the most \
             for others than the operators' roles, `handshaking` in their TLS handshake)",
        );
        let c = connections.clone();
        metrics.on_scrape(move || {
            open.get_or_create(&mcim_telemetry::metrics::NameLabels {
                name: "open".into(),
            })
            .set(i64::try_from(c.open()).unwrap_or(i64::MAX));
            open.get_or_create(&mcim_telemetry::metrics::NameLabels { name: "max".into() })
                .set(i64::try_from(c.max_total()).unwrap_or(i64::MAX));
            open.get_or_create(&mcim_telemetry::metrics::NameLabels {
                name: "handshaking".into(),
            })
            .set(i64::try_from(c.handshakes()).unwrap_or(i64::MAX));
        });
    }
    let mut servers = tokio::task::JoinSet::new();
    if let Some(addr) = metrics_listen {
        let listener = mcim_telemetry::metrics::bind(addr).await?;
        tracing::info!(%addr, "metrics: GET /metrics");
        let m = metrics.clone();
        servers.spawn(async move {
            mcim_telemetry::metrics::serve(listener, m).await;
            Ok::<(), String>(())
        });
    }
    let roles: Vec<(Role, String, PathBuf, SocketAddr, Service)> = match cmd {
        RoleCmd::Supplier {
            pki,
            listen,
            ro_url,
        } => {
            let s = Service::Supplier(Supplier::new(pki.clone(), ro_url.as_deref()).map_err(e)?);
            vec![(Role::Supplier, "supplier".into(), pki, listen, s)]
        }
        RoleCmd::Man { .. } => return Err("man is not a role".into()),
        RoleCmd::Pva { common, listen } => {
            let pool = open(&common.db).await?;
            let s = Service::Pva(Pva::new(common.pki.clone(), pool).map_err(|x| x.to_string())?);
            vec![(Role::Pva, "pva".into(), common.pki, listen, s)]
        }
        RoleCmd::Ro {
            common,
            listen,
            ro_url,
        } => {
            let pool = open(&common.db).await?;
            let s = Service::Ro(Ro::new(common.pki.clone(), pool, ro_url).map_err(e)?);
            vec![(Role::Ro, "ro".into(), common.pki, listen, s)]
        }
        RoleCmd::Vno {
            common,
            listen,
            routes,
        } => {
            let routes = mcim_roles::vno::parse_routes(&routes)?;
            let pool = open(&common.db).await?;
            let s = Service::Vno(Vno::new(common.pki.clone(), pool, routes).map_err(e)?);
            vec![(Role::Vno, "vno".into(), common.pki, listen, s)]
        }
        RoleCmd::Sho {
            common,
            peers,
            sho,
            listen,
        } => {
            let pool = open(&common.db).await?;
            let cfg = sho_config(peers.sho_url.clone(), &peers, sho);
            let party = cfg.party.clone();
            let s = Sho::new(common.pki.clone(), pool, cfg).map_err(e)?;
            s.resume().await.map_err(e)?;
            vec![(Role::Sho, party, common.pki, listen, Service::Sho(s))]
        }
        RoleCmd::All {
            common,
            sho,
            pcid_plmn,
            host,
            base_port,
            sho2_plmn,
            replica_base_ports,
        } => {
            // Six ports from each base (the second SHO's last): none may wrap or be port 0.
            for p in std::iter::once(base_port).chain(replica_base_ports.iter().map(|r| r.port)) {
                if p == 0 || p > u16::MAX - 5 {
                    return Err(format!(
                        "base port {p}: the roles listen on it and the five ports after it \
                         (1 to {})",
                        u16::MAX - 5
                    ));
                }
            }
            if replica_base_ports.len() > mcim_telemetry::channel::MAX_ADDRESSES {
                return Err(format!(
                    "--replica-base-ports: at most {} replicas",
                    mcim_telemetry::channel::MAX_ADDRESSES
                ));
            }
            let pki = common.pki;
            // Both databases' URLs are checked before either is opened.
            let sho2_db = second_sho_db(&common.db);
            for db in [&common.db, &sho2_db] {
                mcim_roles::store::check_url(db).map_err(|e| e.to_string())?;
            }
            let pool = open(&common.db).await?;
            let port = |i: u16| base_port.saturating_add(i);
            let addr = |i: u16| SocketAddr::new(host, port(i));
            // The role at offset i: this process's, or every replica's.
            let me = SocketAddr::new(host, base_port);
            let mut bases = vec![me];
            bases.extend(
                replica_base_ports
                    .iter()
                    .map(|r| SocketAddr::new(r.host.unwrap_or(host), r.port))
                    .filter(|a| *a != me),
            );
            let url = |i: u16| {
                bases
                    .iter()
                    .map(|b| {
                        format!(
                            "https://{}",
                            SocketAddr::new(b.ip(), b.port().saturating_add(i))
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let peers = Peers {
                ro_url: url(1),
                sho_url: url(3),
                pva_url: url(4),
            };
            let mut routes = vec![
                format!("{pcid_plmn}=icf:{}", url(1)).parse::<Route>()?,
                format!("{}=sho:{}", sho.sho_plmn, url(3)).parse::<Route>()?,
            ];
            // The lab's second SHO (5.1.3.7), when the PKI has one.
            let (sho2_file, _) = mcim_pki::dev::SECOND_SHO;
            let sho2 = if pki.join(format!("{sho2_file}.pem")).exists() {
                routes.push(format!("{sho2_plmn}=sho:{}", url(5)).parse::<Route>()?);
                let cfg = sho_config(
                    url(5),
                    &peers,
                    ShoArgs {
                        sho_plmn: sho2_plmn,
                        sho_name: "mcim lab SHO 2".into(),
                        sho_party: sho2_file.into(),
                    },
                );
                let pool2 = open(&sho2_db).await?;
                let s = Sho::new(pki.clone(), pool2, cfg).map_err(e)?;
                s.resume().await.map_err(e)?;
                Some(s)
            } else {
                tracing::info!("no {sho2_file}.pem in the PKI directory: one SHO only");
                None
            };
            let supplier = Service::Supplier(Supplier::new(pki.clone(), Some(&url(1))).map_err(e)?);
            let ro = Service::Ro(Ro::new(pki.clone(), pool.clone(), url(1)).map_err(e)?);
            let vno = Service::Vno(Vno::new(pki.clone(), pool.clone(), routes).map_err(e)?);
            let sho =
                Sho::new(pki.clone(), pool.clone(), sho_config(url(3), &peers, sho)).map_err(e)?;
            sho.resume().await.map_err(e)?;
            let pva = Service::Pva(Pva::new(pki.clone(), pool).map_err(|x| x.to_string())?);
            let mut roles = vec![
                (
                    Role::Supplier,
                    "supplier".into(),
                    pki.clone(),
                    addr(0),
                    supplier,
                ),
                (Role::Ro, "ro".into(), pki.clone(), addr(1), ro),
                (Role::Vno, "vno".into(), pki.clone(), addr(2), vno),
                (
                    Role::Sho,
                    "sho".into(),
                    pki.clone(),
                    addr(3),
                    Service::Sho(sho),
                ),
                (Role::Pva, "pva".into(), pki.clone(), addr(4), pva),
            ];
            if let Some(s) = sho2 {
                roles.push((Role::Sho, sho2_file.into(), pki, addr(5), Service::Sho(s)));
            }
            roles
        }
    };
    // Every port is bound before systemd hears "ready" (Type=notify): a unit ordered after
    // this one finds the roles listening.
    // (A port that cannot be bound ends `serve`; dropping the set aborts the roles started.)
    // One gate per PKI directory (all of them share one in `mcim-roles all`): a device's
    // certificate chain vouched for by one role is known to the others.
    let mut gates: Vec<(PathBuf, mcim_roles::gate::Gate)> = Vec::new();
    for (role, party, pki, listen, service) in roles {
        let gate = match gates.iter().find(|(p, _)| *p == pki) {
            Some((_, g)) => g.clone(),
            None => {
                let g = mcim_roles::gate::Gate::new(
                    mcim_pki::dev::trust_anchors(&pki).map_err(|e| e.to_string())?,
                );
                gates.push((pki.clone(), g.clone()));
                g
            }
        };
        if let Service::Ro(ro) = &service {
            servers.spawn({
                let pool = ro.pool();
                async move {
                    task_queue_depth(pool).await;
                    Ok(())
                }
            });
        }
        let incoming = tonic::transport::server::TcpIncoming::bind(listen)
            .map_err(|e| format!("{role} ({party}) on {listen}: {e}"))?
            .with_nodelay(Some(true));
        servers.spawn(serve_role(
            role,
            party,
            pki,
            listen,
            incoming,
            service,
            CallLayers {
                metrics: metrics.clone(),
                gate,
                shed: mcim_roles::shed::Shed::new(usize::try_from(max_calls).unwrap_or(usize::MAX)),
                connections: connections.clone(),
            },
        ));
    }
    mcim_telemetry::notify_ready();
    // The first role to stop (an error, or SIGTERM's drain) ends the process.
    match servers.join_next().await {
        Some(Ok(r)) => r,
        Some(Err(join)) => Err(format!("a role's server ended: {join}")),
        None => Ok(()),
    }
}

/// What every call to a role server passes: its metrics, the gate, the overload limit.
struct CallLayers {
    metrics: std::sync::Arc<mcim_telemetry::metrics::Metrics>,
    gate: mcim_roles::gate::Gate,
    shed: mcim_roles::shed::Shed,
    connections: mcim_roles::tls::ConnectionLimits,
}

/// Serves one role over mutual TLS, with gRPC health and reflection.
async fn serve_role(
    role: Role,
    party: String,
    pki: PathBuf,
    listen: SocketAddr,
    incoming: tonic::transport::server::TcpIncoming,
    service: Service,
    layers: CallLayers,
) -> Result<(), String> {
    let CallLayers {
        metrics,
        gate,
        shed,
        connections,
    } = layers;
    let tls = server_config(&pki, &party).map_err(|e| e.to_string())?;
    // The operators' connections have places of their own, a device's may cut a quiet call
    // in the middle of its flow (`tls::ConnectionLimits`).
    let classify: mcim_roles::tls::Classify = {
        let gate = gate.clone();
        std::sync::Arc::new(move |chain| gate.client_kind(chain))
    };
    // Each call is a span whose parent is the caller's (trace context in the metadata).
    let mut builder = tonic::transport::Server::builder()
        // A quiet connection is pinged; one that does not answer is closed (and one that sends
        // nothing at all is closed by the acceptor: `tls::Guarded`).
        .http2_keepalive_interval(Some(mcim_roles::tls::KEEPALIVE))
        .trace_fn(mcim_telemetry::server_span)
        // Each call in flight counted on its connection: a full acceptor makes room from idle
        // connections, not from those the server owes an answer (`tls::ConnectionLimits`).
        .layer(mcim_roles::calls::Calls::new(connections.clone()))
        // Every call counted and timed, refusals included.
        .layer(mcim_telemetry::metrics::MetricsLayer::new(metrics, |m| {
            mcim_roles::authz::RULES.iter().any(|r| r.method == m)
                || mcim_telemetry::metrics::standard_method(m)
        }))
        // The authorization table decides every call before any handler runs.
        .layer(gate)
        // Past its capacity, a device's call is refused at once with a retry hint.
        .layer(shed);
    // gRPC health and reflection (v1 and v1alpha) on every server, authenticated by mutual
    // TLS like the rest; reflection lists only this port's services.
    use tonic::server::NamedService;
    let (reporter, health) = tonic_health::server::health_reporter();
    let names: Vec<&'static str> = match &service {
        Service::Supplier(_) => vec![SupplierServiceServer::<Supplier>::NAME],
        Service::Ro(_) => vec![
            IcfServiceServer::<Icf>::NAME,
            DrfServiceServer::<Drf>::NAME,
            DpfServiceServer::<Dpf>::NAME,
        ],
        Service::Vno(_) => vec![VnoServiceServer::<Vno>::NAME],
        Service::Sho(_) => vec![ShoServiceServer::<ShoApi>::NAME],
        Service::Pva(_) => vec![PvaServiceServer::<Pva>::NAME],
    };
    let reflection = || {
        names.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(mcim_proto::FILE_DESCRIPTOR_SET)
                .with_service_name("grpc.health.v1.Health"),
            |b, n| b.with_service_name(*n),
        )
    };
    // On SIGTERM the RO ends its devices' task streams, which never end by themselves, so the
    // server drains and stops (the devices reconnect to whatever serves next).
    let ro_streams = match &service {
        Service::Ro(ro) => Some(ro.clone()),
        _ => None,
    };
    let reflection_v1 = reflection().build_v1().map_err(|e| e.to_string())?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(|e| e.to_string())?;
    let router = builder
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let router = match service {
        Service::Pva(p) => {
            reporter.set_serving::<PvaServiceServer<Pva>>().await;
            router.add_service(PvaServiceServer::new(p))
        }
        Service::Supplier(s) => {
            reporter
                .set_serving::<SupplierServiceServer<Supplier>>()
                .await;
            router.add_service(SupplierServiceServer::new(s))
        }
        Service::Ro(ro) => {
            reporter.set_serving::<IcfServiceServer<Icf>>().await;
            reporter.set_serving::<DrfServiceServer<Drf>>().await;
            reporter.set_serving::<DpfServiceServer<Dpf>>().await;
            router
                .add_service(IcfServiceServer::new(Icf(ro.clone())))
                .add_service(DrfServiceServer::new(Drf(ro.clone())))
                .add_service(DpfServiceServer::new(Dpf(ro)))
        }
        Service::Vno(v) => {
            reporter.set_serving::<VnoServiceServer<Vno>>().await;
            router.add_service(VnoServiceServer::new(v))
        }
        Service::Sho(s) => {
            reporter.set_serving::<ShoServiceServer<ShoApi>>().await;
            router.add_service(ShoServiceServer::new(ShoApi(s)))
        }
    };
    tracing::info!(%listen, %role, party, "serving (mutual TLS)");
    router
        // Mutual TLS on our own acceptor: the client verifier bounds the chain it will build.
        .serve_with_incoming_shutdown(
            tls_incoming(incoming, tls, connections, classify),
            async move {
                shutdown().await;
                if let Some(ro) = ro_streams {
                    ro.stop_streams();
                }
            },
        )
        .await
        .map_err(|e| e.to_string())
}

/// How long a stopping role drains its calls in flight.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(3);

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
