//! The `elsinore` command line: `run`, `check`, `certs init`, `demo`,
//! `catalog`, `resolve`, `completions`. Every flag can also be set through
//! an `ELSINORE_*` variable.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use elsinore_certs::TrustDomain;

use crate::config::Config;

/// The package version and the commit it was built from (see `build.rs`):
/// what `elsinore --version` prints and `elsinore_build_info` reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit the binary was built from (12 hex digits), or `unknown`.
pub const COMMIT: &str = env!("ELSINORE_COMMIT");
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("ELSINORE_COMMIT"),
    ")"
);

#[derive(Debug, Parser)]
#[command(
    name = "elsinore",
    version = LONG_VERSION,
    about = "Elsinore: a multi-mesh federation gateway (Hamlet API over mTLS)"
)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "ELSINORE_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Log filter (tracing env-filter syntax), e.g. `info,elsinore_gateway=debug`.
    #[arg(long, global = true, env = "ELSINORE_LOG", default_value = "info")]
    pub log: String,
    /// Runtime worker threads; 0 = one per core. 1 runs everything on a
    /// single-threaded runtime (how the benchmarks compare gateways).
    #[arg(
        long,
        global = true,
        env = "ELSINORE_WORKER_THREADS",
        default_value_t = 0
    )]
    pub worker_threads: usize,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a gateway from a config file.
    Run {
        #[arg(long, env = "ELSINORE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file (and the certificates it names) without starting anything.
    Check {
        #[arg(long, env = "ELSINORE_CONFIG")]
        config: PathBuf,
    },
    /// Certificate helpers.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Start two meshes federating on loopback, print what each imported, run until Ctrl-C.
    Demo {
        /// Where to write the demo's certificates and caches (default: a fresh temporary directory).
        #[arg(long, env = "ELSINORE_DEMO_DIR")]
        dir: Option<PathBuf>,
    },
    /// Print a running gateway's catalog (from its admin listener).
    Catalog {
        #[arg(long, env = "ELSINORE_ADMIN", default_value = "127.0.0.1:15000")]
        admin: String,
        /// Show the catalog as this peer sees it instead: what it receives
        /// from us, and what we hold from it with each entry's state
        /// (imported, aliased, dropped, refused and why).
        #[arg(long, env = "ELSINORE_AS_PEER", value_name = "NAME")]
        as_peer: Option<String>,
    },
    /// Ask a DNS server (e.g. a gateway's DNS listener) for a name's IPv4
    /// addresses over UDP and print them, one per line; what `dig +short`
    /// does, for machines without dig.
    Resolve {
        /// The name to look up, e.g. `reviews.mesh-a.global`.
        name: String,
        /// The DNS server, `IP:PORT`.
        #[arg(long, env = "ELSINORE_DNS", default_value = "127.0.0.1:15053")]
        dns: SocketAddr,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Mint a mesh CA and a gateway certificate (spiffe://TD/ns/elsinore/sa/gateway).
    Init {
        #[arg(long, env = "ELSINORE_TRUST_DOMAIN")]
        trust_domain: String,
        #[arg(long, env = "ELSINORE_CERTS_OUT")]
        out: PathBuf,
        /// DNS names for the gateway certificate (repeatable).
        #[arg(long = "dns", env = "ELSINORE_CERTS_DNS", value_delimiter = ',')]
        dns: Vec<String>,
        /// IP addresses for the gateway certificate (repeatable).
        #[arg(long = "ip", env = "ELSINORE_CERTS_IP", value_delimiter = ',')]
        ip: Vec<IpAddr>,
    },
}

/// The async runtime for `--worker-threads`: 1 is a current-thread runtime
/// (one thread does all the work: how benchmarks compare gateways one core
/// each), 0 one worker per core, n that many workers.
pub fn build_runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                builder.worker_threads(n);
            }
            builder
        }
    };
    builder.enable_all().build()
}

/// Sets up logging as asked.
pub fn init_tracing(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: a pipe (journald, `kubectl
    // logs`, a log shipper) would get the escape codes as text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs a parsed command line.
pub async fn main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config } => run(&config).await,
        Command::Check { config } => Ok(check(&config)),
        Command::Certs {
            command:
                CertsCommand::Init {
                    trust_domain,
                    out,
                    dns,
                    ip,
                },
        } => {
            let td: TrustDomain = trust_domain
                .parse()
                .with_context(|| format!("--trust-domain {trust_domain:?}"))?;
            let files = elsinore_certs::mint::init(&td, &out, &dns, &ip)?;
            println!(
                "minted CA {} and gateway certificate {} (spiffe://{}/ns/elsinore/sa/gateway)",
                files.ca_cert.display(),
                files.gateway_cert.display(),
                td
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { dir } => demo(dir).await,
        Command::Catalog { admin, as_peer } => catalog(&admin, as_peer.as_deref()).await,
        Command::Resolve { name, dns } => resolve(&name, dns).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "elsinore", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `elsinore resolve`: one A query over UDP, retried on silence.
async fn resolve(name: &str, server: SocketAddr) -> anyhow::Result<ExitCode> {
    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};
    let qname = Name::from_ascii(name).with_context(|| format!("{name:?} is not a DNS name"))?;
    let bind: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(bind).await?;
    socket
        .connect(server)
        .await
        .with_context(|| format!("DNS server {server}"))?;
    let mut query = Message::query();
    query.metadata.id = rand::random();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(qname, RecordType::A));
    let packet = query.to_vec()?;
    let mut buf = vec![0u8; 4096];
    for _ in 0..3 {
        socket
            .send(&packet)
            .await
            .with_context(|| format!("send a DNS query to {server}"))?;
        let n = match tokio::time::timeout(std::time::Duration::from_secs(2), socket.recv(&mut buf))
            .await
        {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => anyhow::bail!("no DNS answer from {server} for {name}: {e}"),
            Err(_) => continue,
        };
        let Ok(reply) = Message::from_vec(&buf[..n]) else {
            anyhow::bail!("undecodable DNS answer from {server} for {name}");
        };
        if reply.metadata.id != query.metadata.id {
            continue;
        }
        let addrs: Vec<_> = reply
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        if addrs.is_empty() {
            let code = reply.metadata.response_code;
            if code == ResponseCode::NoError {
                anyhow::bail!("{server} has no IPv4 address for {name}");
            }
            anyhow::bail!("{server} answered {name} with {code}");
        }
        for a in addrs {
            println!("{a}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    anyhow::bail!("no DNS answer from {server} for {name} after 3 tries of 2s")
}

fn check(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.0 {
                if e.path.is_empty() {
                    eprintln!("error: {}", e.message);
                } else {
                    eprintln!("error: {}: {}", e.path, e.message);
                }
            }
            eprintln!("{}: {} error(s)", path.display(), errors.0.len());
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    match elsinore_certs::Identity::load(&config.identity.certificate, &config.identity.private_key)
    {
        Ok(id) if id.spiffe_id().trust_domain() != &config.mesh.trust_domain => {
            eprintln!(
                "error: identity.certificate: SPIFFE ID {} is not in trust domain {}",
                id.spiffe_id(),
                config.mesh.trust_domain
            );
            failed = true;
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("error: identity: {e}");
            failed = true;
        }
    }
    for (i, peer) in config.peers.iter().enumerate() {
        if let Err(e) =
            elsinore_certs::TrustBundle::load(peer.trust_domain.clone(), &peer.trust_bundle)
        {
            eprintln!("error: peers[{i}].trustBundle: {e}");
            failed = true;
        }
    }
    if failed {
        return ExitCode::FAILURE;
    }
    println!(
        "{}: OK (mesh {}, {} export(s), {} peer(s))",
        path.display(),
        config.mesh.name,
        config.exports.len(),
        config.peers.len()
    );
    ExitCode::SUCCESS
}

async fn run(path: &Path) -> anyhow::Result<ExitCode> {
    // Signal handlers first: a SIGHUP (a reload) or a SIGTERM/SIGINT that
    // arrives while the gateway starts must not take the default action,
    // which ends the process. A SIGTERM received during the start begins
    // the drain once the gateway is up; a SIGHUP then is a no-op (the
    // config is read after this point anyway).
    let mut stop = ShutdownSignals::register();
    #[cfg(unix)]
    let _hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{}: invalid config:\n{errors}", path.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    tracing::info!(config = %path.display(), mesh = %config.mesh.name, "starting");
    let gateway = crate::runtime::Gateway::start(
        config,
        crate::runtime::StartOptions {
            config_path: Some(path.to_owned()),
            ..Default::default()
        },
    )
    .await?;
    stop.recv().await;
    tracing::info!("shutting down: draining (a second signal stops at once)");
    tokio::select! {
        () = gateway.drain() => {}
        () = stop.recv() => tracing::warn!("second shutdown signal: stopping without finishing the drain"),
    }
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM and SIGINT, registered once: a signal that arrives before
/// anyone waits is kept until [`ShutdownSignals::recv`].
struct ShutdownSignals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    fn register() -> ShutdownSignals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            ShutdownSignals {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        ShutdownSignals {}
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            if self.term.is_none() && self.int.is_none() {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
            tokio::select! {
                () = next(&mut self.term) => {}
                () = next(&mut self.int) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn demo(dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let (dir, _temp) = match dir {
        Some(d) => (d, None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("elsinore-demo-")
                .tempdir()?;
            (t.path().to_owned(), Some(t))
        }
    };
    let demo = crate::demo::Demo::start(&dir).await?;
    demo.wait_ready(std::time::Duration::from_secs(30)).await?;
    demo.wait_routable(std::time::Duration::from_secs(30))
        .await?;
    println!(
        "Elsinore demo: two meshes federating over mTLS on loopback ({})",
        dir.display()
    );
    print!("{}", demo.summary());
    println!("Send a request from mesh-b to reviews in mesh-a (DNS, egress, mTLS, ingress):");
    println!("  {}", demo.curl_command());
    println!(
        "Inspect: curl http://{}/catalog   (Ctrl-C to stop)",
        demo.b.admin_addr
    );
    shutdown_signal().await;
    demo.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// How long `elsinore catalog` waits for the admin listener: connecting and
/// answering together. A wrong address must give an error, not a hang.
const CATALOG_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn catalog(admin: &str, as_peer: Option<&str>) -> anyhow::Result<ExitCode> {
    match tokio::time::timeout(CATALOG_TIMEOUT, fetch_catalog(admin, as_peer)).await {
        Ok(result) => result,
        Err(_) => anyhow::bail!(
            "admin listener {admin} did not answer GET /catalog within {CATALOG_TIMEOUT:?}"
        ),
    }
}

async fn fetch_catalog(admin: &str, as_peer: Option<&str>) -> anyhow::Result<ExitCode> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| format!("connect to admin listener {admin}"))?;
    let context = || format!("GET /catalog from admin listener {admin}");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .with_context(context)?;
    tokio::spawn(conn);
    let path = match as_peer {
        // A peer name is a DNS label; anything else cannot name a peer and
        // must not be pasted into the query string.
        Some(peer) if !elsinore_federation_api::is_dns_label(peer) => {
            anyhow::bail!("--as-peer {peer:?} is not a peer name (a DNS label)")
        }
        Some(peer) => format!("/catalog?peer={peer}"),
        None => "/catalog".to_owned(),
    };
    let req = http::Request::get(path.as_str())
        .header(http::header::HOST, admin)
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())?;
    let resp = sender.send_request(req).await.with_context(context)?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .with_context(context)?
        .to_bytes();
    // Something else listening there (a backend, another service) must not
    // pass for an empty or odd catalog.
    let is_catalog = serde_json::from_slice::<serde_json::Value>(&body).is_ok_and(|v| {
        if as_peer.is_some() {
            v.get("receives").is_some() && v.get("held").is_some()
        } else {
            v.get("exports").is_some() && v.get("imports").is_some()
        }
    });
    if status == http::StatusCode::NOT_FOUND && body.starts_with(b"unknown peer") {
        anyhow::bail!("{admin}: {}", String::from_utf8_lossy(&body).trim_end());
    }
    if !status.is_success() || !is_catalog {
        let text = String::from_utf8_lossy(&body);
        let text: String = text.chars().take(200).collect();
        anyhow::bail!(
            "{admin} is not an Elsinore admin listener: GET /catalog answered {status}: {text:?}"
        );
    }
    println!("{}", String::from_utf8_lossy(&body));
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tokio::runtime::RuntimeFlavor;

    #[test]
    fn worker_threads_choose_the_runtime() {
        let flavor = |n| super::build_runtime(n).unwrap().handle().runtime_flavor();
        assert_eq!(flavor(1), RuntimeFlavor::CurrentThread);
        assert_eq!(flavor(0), RuntimeFlavor::MultiThread);
        let rt = super::build_runtime(3).unwrap();
        assert_eq!(rt.metrics().num_workers(), 3);
    }
}
