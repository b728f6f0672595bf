//! The TLS record layer against rustls's own unbuffered API (issue 16,
//! item 4): does `elsinore_transport::tls` pay for itself?
//!
//! Two implementations of the same mTLS connection, compared in one run:
//!
//! - **ours**: `elsinore_transport::tls::connect` / `accept`, the product
//!   API (rustls's unbuffered handshake, then our own record layer);
//! - **rustls**: [`RustlsStream`] below, a tokio `AsyncRead`/`AsyncWrite`
//!   over rustls's `UnbufferedClientConnection` / `UnbufferedServerConnection`
//!   (`process_tls_records`, `ReadTraffic`, `WriteTraffic`, `EncodeTlsData`,
//!   `TransmitTlsData`), written the way a careful implementer would replace
//!   our layer with it: the same read sizes as ours (one record's worth,
//!   512 KiB per `recv` once a read filled what it asked for), records
//!   processed straight from the read buffer, plaintext handed to the
//!   reader's buffer (only what does not fit is kept), up to 512 KiB of
//!   sealed records queued before writes wait, both buffers given back when
//!   drained and a partial record moved to a one-record buffer while
//!   waiting (so an idle or trickled connection holds what ours holds), and
//!   a few drained buffers kept per thread, as ours does. No `unsafe`:
//!   buffers are zeroed once when allocated. rustls 0.23 decrypts each
//!   record in place in that buffer and then copies its plaintext into a
//!   new `Vec` (`ReadTraffic::next_record`); on the way out it seals each
//!   record in a `Vec` of its own and copies it into ours. That is the
//!   API's cost, not the driver's.
//!
//! Both variants use the same configs: mTLS as the gateway does it
//! (`elsinore_certs::{server_config, client_config}`: ECDSA P-256 SVIDs,
//! SPIFFE verifiers, aws-lc-rs, TLS 1.3 with AES-128-GCM preferred), passed
//! through `tls::server_config` / `tls::client_config`; the suite the
//! handshake chose is printed. Each measurement is one server process
//! pinned to core 1 and one client process pinned to core 0 (`taskset -c`),
//! both on a current-thread tokio runtime, over 127.0.0.1, started afresh
//! for every (workload, variant). The client reads the server's CPU time
//! (`/proc/<pid>/stat`) and RSS (`/proc/<pid>/status`) and its own at the
//! edges of its measurement window.
//!
//! Workloads, each run for both variants in every round (ours first in odd
//! rounds, rustls first in even ones, so neither always runs second):
//!
//! - **bulk**: one connection; the client writes 64 KiB writes for
//!   `--duration` seconds, the server reads (64 KiB reads) and discards.
//!   Gbit/s, CPU ms per GB of each side.
//! - **held**: `--held` connections (default 5,000; handshake plus one byte
//!   echoed each, 32 opening at a time), then idle for a second; RSS growth
//!   per connection of the server and of the client (after 64 warm-up
//!   connections, opened and closed, so one-time allocations do not count).
//! - **http**: 64 connections, each a request/response ping-pong (120-byte
//!   request, 200-byte response) for `--duration` seconds after half a
//!   second of warm-up; exchanges/s and CPU µs per exchange of each side.
//!
//! Every round checks the bytes: bulk data carries a block counter and a
//! fixed pattern the server compares every byte against (it answers with
//! the count and the mismatches), responses carry the request's sequence
//! number and checksum, held connections echo their byte. A run with a
//! wrong byte fails.
//!
//! ```text
//! ulimit -n $(ulimit -Hn)   # held: about 5,100 descriptors per process
//! cargo run --release -p elsinore-bench --bin records -- \
//!     [--rounds 3] [--duration 5] [--workloads bulk,held,http] [--held 5000] \
//!     [--markdown FILE]
//! ```
//!
//! `--rounds 3 --duration 5` takes about 2 minutes. Every child is killed by
//! its pid when its run ends, on error, and on Ctrl-C (`dataplane`'s
//! process guard).

#[allow(dead_code)]
#[path = "dataplane/procs.rs"]
mod procs;

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use elsinore_bench::{
    clock_ticks, command_line, cpu_model, cpu_ms, free_port, load_average, median, status_kib, tail,
};
use elsinore_certs::{Ca, Identity, SpiffeId, TrustBundle, TrustDomain};
use elsinore_transport::tls;
use procs::Proc;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, UnbufferedStatus,
};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Bulk writes and reads, and the period of the bulk pattern.
const BLOCK: usize = 64 * 1024;
/// The HTTP-like exchange: a small request head, a small response.
const REQUEST: usize = 120;
const RESPONSE: usize = 200;
/// Connections of the http workload.
const HTTP_CONNECTIONS: usize = 64;
/// Handshakes in flight while the held workload opens its connections.
const HELD_PARALLEL: usize = 32;
const HELD_WARMUP: usize = 64;
/// Descriptors a process needs besides the held connections.
const FD_SPARE: u64 = 256;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => child(&args[1..], Role::Server),
        Some("drive") => child(&args[1..], Role::Client),
        _ => orchestrate(&args),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    Bulk,
    Held,
    Http,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Bulk => "bulk",
            Workload::Held => "held",
            Workload::Http => "http",
        }
    }

    fn parse(s: &str) -> Result<Workload> {
        match s {
            "bulk" => Ok(Workload::Bulk),
            "held" => Ok(Workload::Held),
            "http" => Ok(Workload::Http),
            other => bail!("unknown workload {other:?} (bulk, held, http)"),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Which {
    Ours,
    Rustls,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Ours => "ours",
            Which::Rustls => "rustls",
        }
    }

    fn parse(s: &str) -> Result<Which> {
        match s {
            "ours" => Ok(Which::Ours),
            "rustls" => Ok(Which::Rustls),
            other => bail!("unknown variant {other:?} (ours, rustls)"),
        }
    }
}

/// The value after `--name` in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn flag_parse<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    match flag(args, name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|e| anyhow!("{name} {v:?}: {e}")),
    }
}

// ---------------------------------------------------------------------------
// The orchestrator: rounds, processes, the report.

struct Settings {
    rounds: usize,
    duration: u64,
    held: usize,
    /// Bulk: how many 64 KiB blocks the client hands over per write.
    write_blocks: usize,
    workloads: Vec<Workload>,
    markdown: Option<PathBuf>,
}

fn settings(args: &[String]) -> Result<Settings> {
    const KNOWN: [&str; 6] = [
        "--rounds",
        "--duration",
        "--workloads",
        "--held",
        "--write-kib",
        "--markdown",
    ];
    for (i, a) in args.iter().enumerate() {
        if i % 2 == 0 && !KNOWN.contains(&a.as_str()) {
            bail!(
                "unknown argument {a:?}; usage: records [--rounds 3] [--duration 5] \
                 [--workloads bulk,held,http] [--held 5000] [--write-kib 64] [--markdown FILE]"
            );
        }
    }
    let workloads = flag(args, "--workloads")
        .unwrap_or("bulk,held,http")
        .split(',')
        .map(Workload::parse)
        .collect::<Result<Vec<_>>>()?;
    let write_kib: usize = flag_parse(args, "--write-kib", BLOCK / 1024)?;
    ensure!(
        write_kib >= BLOCK / 1024 && write_kib.is_multiple_of(BLOCK / 1024),
        "--write-kib must be a multiple of {}",
        BLOCK / 1024
    );
    let s = Settings {
        rounds: flag_parse(args, "--rounds", 3)?,
        duration: flag_parse(args, "--duration", 5)?,
        held: flag_parse(args, "--held", 5000)?,
        write_blocks: write_kib * 1024 / BLOCK,
        workloads,
        markdown: flag(args, "--markdown").map(PathBuf::from),
    };
    ensure!(
        s.rounds >= 1 && s.duration >= 1,
        "--rounds and --duration must be at least 1"
    );
    Ok(s)
}

/// One run's figures, in the order the report shows them.
struct Figures {
    values: Vec<(String, f64)>,
    suite: String,
}

fn orchestrate(args: &[String]) -> Result<()> {
    let s = settings(args)?;
    procs::install_signal_cleanup()?;
    if s.workloads.contains(&Workload::Held) {
        raise_fd_limit(s.held as u64 + FD_SPARE)?;
    }
    let exe = std::env::current_exe().context("find this program")?;
    let dir = tempfile::tempdir().context("create a temporary directory")?;
    mint(dir.path())?;
    let load_before = load_average();
    let started = command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    // (workload, variant) → one Figures per round.
    let mut runs: Vec<((Workload, Which), Vec<Figures>)> = Vec::new();
    for round in 1..=s.rounds {
        for &workload in &s.workloads {
            let order = if round % 2 == 1 {
                [Which::Ours, Which::Rustls]
            } else {
                [Which::Rustls, Which::Ours]
            };
            for which in order {
                let figures = run_one(&exe, dir.path(), &s, round, workload, which)?;
                eprintln!(
                    "round {round} {} {}: {}",
                    workload.name(),
                    which.name(),
                    figures
                        .values
                        .iter()
                        .map(|(k, v)| format!("{k} {v:.2}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                match runs.iter_mut().find(|(k, _)| *k == (workload, which)) {
                    Some((_, v)) => v.push(figures),
                    None => runs.push(((workload, which), vec![figures])),
                }
            }
        }
    }
    let report = report(&s, &runs, &started, &load_before)?;
    println!("{report}");
    if let Some(path) = &s.markdown {
        std::fs::write(path, &report).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// The held workload needs a descriptor per connection in each process;
/// children inherit the limit, so raise our own soft limit to the hard one
/// (`prlimit`, no `unsafe`) when it is too low.
fn raise_fd_limit(need: u64) -> Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits").context("read /proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .ok_or_else(|| anyhow!("/proc/self/limits has no 'Max open files' line"))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let parse = |s: Option<&&str>| -> u64 {
        match s {
            Some(&"unlimited") => u64::MAX,
            Some(v) => v.parse().unwrap_or(0),
            None => 0,
        }
    };
    let (soft, hard) = (parse(fields.get(3)), parse(fields.get(4)));
    if soft >= need {
        return Ok(());
    }
    ensure!(
        hard >= need,
        "the held workload needs {need} open files per process and the hard limit is {hard}; \
         raise it or pass a smaller --held"
    );
    let pid = std::process::id().to_string();
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={hard}:{hard}")])
        .status()
        .context("run prlimit")?;
    ensure!(
        status.success(),
        "prlimit could not raise the open-file limit to {hard}; run `ulimit -n $(ulimit -Hn)` first"
    );
    Ok(())
}

/// Mints the two gateways' CAs and SVIDs into `dir`, as PEM files the
/// children read: `a` is the server's trust domain, `b` the client's.
fn mint(dir: &Path) -> Result<()> {
    for side in ["a", "b"] {
        let td: TrustDomain = format!("{side}.example").parse()?;
        let ca = Ca::new(&td)?;
        let issued = ca.issue(&SpiffeId::gateway(td.clone()), &[], &[])?;
        std::fs::write(dir.join(format!("{side}-ca.pem")), ca.cert_pem())?;
        std::fs::write(dir.join(format!("{side}-cert.pem")), &issued.cert_pem)?;
        std::fs::write(dir.join(format!("{side}-key.pem")), &issued.key_pem)?;
    }
    Ok(())
}

fn run_one(
    exe: &Path,
    dir: &Path,
    s: &Settings,
    round: usize,
    workload: Workload,
    which: Which,
) -> Result<Figures> {
    let port = free_port()?.to_string();
    let tag = format!("r{round}-{}-{}", workload.name(), which.name());
    let certs = dir.display().to_string();
    let common = [
        "--variant".to_owned(),
        which.name().to_owned(),
        "--workload".to_owned(),
        workload.name().to_owned(),
        "--port".to_owned(),
        port,
        "--certs".to_owned(),
        certs,
    ];
    let mut server_args = vec!["serve".to_owned()];
    server_args.extend(common.iter().cloned());
    let server_log = dir.join(format!("{tag}-server.log"));
    let mut server = Proc::spawn(
        format!("{tag} server"),
        Some("1"),
        exe,
        &server_args,
        server_log.clone(),
    )?;
    wait_listening(&mut server, &server_log)?;
    let mut client_args = vec!["drive".to_owned()];
    client_args.extend(common.iter().cloned());
    client_args.extend([
        "--server-pid".to_owned(),
        server.pid().to_string(),
        "--duration".to_owned(),
        s.duration.to_string(),
        "--write-blocks".to_owned(),
        s.write_blocks.to_string(),
        "--held".to_owned(),
        s.held.to_string(),
    ]);
    let client_log = dir.join(format!("{tag}-client.log"));
    let mut client = Proc::spawn(
        format!("{tag} client"),
        Some("0"),
        exe,
        &client_args,
        client_log.clone(),
    )?;
    let status = client.wait_timeout(Duration::from_secs(s.duration + 120))?;
    let out = std::fs::read_to_string(&client_log).unwrap_or_default();
    if !status.success() {
        bail!(
            "{tag}: the client failed ({status}); end of its log:\n{}\nend of the server's log:\n{}",
            tail(&client_log, 20),
            tail(&server_log, 20)
        );
    }
    // A server that died mid-run would make the client fail; one that died
    // at the end (a panic on close) must not go unnoticed either.
    server.check_alive()?;
    let line = out
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("RESULT "))
        .ok_or_else(|| anyhow!("{tag}: no RESULT line in the client's log:\n{out}"))?;
    let v: Value = serde_json::from_str(line).with_context(|| format!("{tag}: parse {line}"))?;
    let values = v["figures"]
        .as_array()
        .ok_or_else(|| anyhow!("{tag}: no figures in {line}"))?
        .iter()
        .map(|pair| {
            let name = pair[0].as_str().unwrap_or("?").to_owned();
            (name, pair[1].as_f64().unwrap_or(f64::NAN))
        })
        .collect();
    Ok(Figures {
        values,
        suite: v["suite"].as_str().unwrap_or("?").to_owned(),
    })
}

fn wait_listening(server: &mut Proc, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if std::fs::read_to_string(log).is_ok_and(|l| l.contains("listening on")) {
            return Ok(());
        }
        server.check_alive()?;
        ensure!(
            Instant::now() < deadline,
            "{} did not listen within 20 s",
            server.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a larger figure is the better one, by its unit.
fn higher_is_better(name: &str) -> bool {
    name.ends_with("/s")
}

fn report(
    s: &Settings,
    runs: &[((Workload, Which), Vec<Figures>)],
    started: &str,
    load_before: &str,
) -> Result<String> {
    let mut md = String::new();
    let find = |w: Workload, v: Which| {
        runs.iter()
            .find(|(k, _)| *k == (w, v))
            .map(|(_, f)| f.as_slice())
            .unwrap_or(&[])
    };
    let suites: Vec<String> = runs
        .iter()
        .flat_map(|(_, f)| f.iter().map(|f| f.suite.clone()))
        .filter(|s| s != "-")
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"))
        .unwrap_or_default();
    let rustls = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"rustls\"\n"))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = ")))
        .unwrap_or("?")
        .trim_matches('"')
        .to_owned();
    writeln!(
        md,
        "`records --rounds {} --duration {} --workloads {} --held {} --write-kib {}`, {started}, git {}, \
         rustls {rustls}, suite {}, {} ({} cores), load average {load_before} before, {} after. \
         Medians of {} rounds, per round in brackets; ratio = ours ÷ rustls.\n",
        s.rounds,
        s.duration,
        s.workloads
            .iter()
            .map(|w| w.name())
            .collect::<Vec<_>>()
            .join(","),
        s.held,
        s.write_blocks * BLOCK / 1024,
        command_line("git", &["rev-parse", "--short", "HEAD"]),
        suites.join(", "),
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average(),
        s.rounds,
    )?;
    writeln!(md, "| workload | figure | ours | rustls | ours ÷ rustls |")?;
    writeln!(md, "|---|---|---:|---:|---:|")?;
    for &w in &s.workloads {
        let (ours, theirs) = (find(w, Which::Ours), find(w, Which::Rustls));
        let names: Vec<String> = ours
            .first()
            .map(|f| f.values.iter().map(|(k, _)| k.clone()).collect())
            .unwrap_or_default();
        for name in names {
            let column = |runs: &[Figures]| -> (f64, String) {
                let xs: Vec<f64> = runs
                    .iter()
                    .map(|f| {
                        f.values
                            .iter()
                            .find(|(k, _)| *k == name)
                            .map_or(f64::NAN, |(_, v)| *v)
                    })
                    .collect();
                let per_round = xs.iter().map(|x| fmt(*x)).collect::<Vec<_>>().join(" / ");
                let m = median(xs);
                (m, format!("**{}** ({per_round})", fmt(m)))
            };
            let (mo, so) = column(ours);
            let (mr, sr) = column(theirs);
            let better = if higher_is_better(&name) {
                "higher is better"
            } else {
                "lower is better"
            };
            writeln!(
                md,
                "| {} | {name} ({better}) | {so} | {sr} | {:.2} |",
                w.name(),
                mo / mr
            )?;
        }
    }
    Ok(md)
}

/// Three significant digits, thousands separated.
fn fmt(x: f64) -> String {
    if !x.is_finite() {
        return "–".to_owned();
    }
    let digits = if x.abs() >= 100.0 {
        0
    } else if x.abs() >= 10.0 {
        1
    } else {
        2
    };
    let s = format!("{x:.digits$}");
    let (int, frac) = s
        .split_once('.')
        .map_or((s.as_str(), None), |(i, f)| (i, Some(f)));
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 && c != '-' {
            grouped.push(',');
        }
        grouped.push(c);
    }
    match frac {
        Some(f) => format!("{grouped}.{f}"),
        None => grouped,
    }
}

// ---------------------------------------------------------------------------
// The children: one server, one client, on a current-thread runtime each.

#[derive(Clone, Copy)]
enum Role {
    Server,
    Client,
}

struct ChildArgs {
    which: Which,
    workload: Workload,
    addr: SocketAddr,
    certs: PathBuf,
    server_pid: u32,
    duration: Duration,
    held: usize,
    write_blocks: usize,
}

fn child(args: &[String], role: Role) -> Result<()> {
    let need = |name: &str| flag(args, name).ok_or_else(|| anyhow!("{name} is required"));
    let port: u16 = need("--port")?.parse().context("--port")?;
    let c = ChildArgs {
        which: Which::parse(need("--variant")?)?,
        workload: Workload::parse(need("--workload")?)?,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        certs: PathBuf::from(need("--certs")?),
        server_pid: flag_parse(args, "--server-pid", 0)?,
        duration: Duration::from_secs(flag_parse(args, "--duration", 5)?),
        held: flag_parse(args, "--held", 5000)?,
        write_blocks: flag_parse(args, "--write-blocks", 1)?.max(1),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("build the runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        match (role, c.which) {
            (Role::Server, Which::Ours) => serve::<Ours>(&c).await,
            (Role::Server, Which::Rustls) => serve::<Theirs>(&c).await,
            (Role::Client, Which::Ours) => drive::<Ours>(&c).await,
            (Role::Client, Which::Rustls) => drive::<Theirs>(&c).await,
        }
    })
}

fn read_pem(dir: &Path, name: &str) -> Result<Vec<u8>> {
    let path = dir.join(name);
    std::fs::read(&path).with_context(|| format!("read {}", path.display()))
}

fn identity(dir: &Path, side: &str) -> Result<Identity> {
    Ok(Identity::from_pem(
        &read_pem(dir, &format!("{side}-cert.pem"))?,
        &read_pem(dir, &format!("{side}-key.pem"))?,
    )?)
}

fn bundle(dir: &Path, side: &str) -> Result<TrustBundle> {
    let td: TrustDomain = format!("{side}.example").parse()?;
    Ok(TrustBundle::from_pem(
        td,
        &read_pem(dir, &format!("{side}-ca.pem"))?,
    )?)
}

/// The gateway's server config (mTLS), with our layer's additions.
fn server_config(dir: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let config =
        elsinore_certs::server_config(&identity(dir, "a")?, &[bundle(dir, "b")?], &[b"h2"])?;
    Ok(tls::server_config((*config).clone()))
}

fn client_config(dir: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let config =
        elsinore_certs::client_config(&identity(dir, "b")?, &bundle(dir, "a")?, None, &[b"h2"])?;
    Ok(tls::client_config((*config).clone()))
}

/// One way of turning a TCP connection into a TLS stream.
trait Variant {
    type Client: AsyncRead + AsyncWrite + Unpin + 'static;
    type Server: AsyncRead + AsyncWrite + Unpin + 'static;
    async fn connect(config: Arc<rustls::ClientConfig>, io: TcpStream) -> io::Result<Self::Client>;
    async fn accept(config: Arc<rustls::ServerConfig>, io: TcpStream) -> io::Result<Self::Server>;
    /// The negotiated suite, where the stream says.
    fn suite(stream: &Self::Client) -> Option<String>;
}

fn server_name() -> io::Result<ServerName<'static>> {
    ServerName::try_from("gw.a.example").map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

struct Ours;

impl Variant for Ours {
    type Client = tls::TlsStream;
    type Server = tls::TlsStream;

    async fn connect(
        config: Arc<rustls::ClientConfig>,
        io: TcpStream,
    ) -> io::Result<tls::TlsStream> {
        tls::connect(config, server_name()?, io).await
    }

    async fn accept(
        config: Arc<rustls::ServerConfig>,
        io: TcpStream,
    ) -> io::Result<tls::TlsStream> {
        tls::accept(config, io).await.map(|(s, _)| s)
    }

    fn suite(_: &tls::TlsStream) -> Option<String> {
        None
    }
}

struct Theirs;

impl Variant for Theirs {
    type Client = RustlsStream<UnbufferedClientConnection>;
    type Server = RustlsStream<UnbufferedServerConnection>;

    async fn connect(config: Arc<rustls::ClientConfig>, io: TcpStream) -> io::Result<Self::Client> {
        let conn = UnbufferedClientConnection::new(config, server_name()?).map_err(tls_err)?;
        RustlsStream::handshake(conn, io).await
    }

    async fn accept(config: Arc<rustls::ServerConfig>, io: TcpStream) -> io::Result<Self::Server> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_err)?;
        RustlsStream::handshake(conn, io).await
    }

    fn suite(stream: &Self::Client) -> Option<String> {
        stream
            .conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
    }
}

async fn serve<V: Variant>(c: &ChildArgs) -> Result<()> {
    let config = server_config(&c.certs)?;
    let listener = TcpListener::bind(c.addr)
        .await
        .with_context(|| format!("bind {}", c.addr))?;
    println!("listening on {}", c.addr);
    let workload = c.workload;
    loop {
        let io = match listener.accept().await {
            Ok((io, _)) => io,
            Err(e) => {
                // Out of descriptors: say so once in a while, keep serving.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let config = Arc::clone(&config);
        tokio::task::spawn_local(async move {
            let result = async {
                io.set_nodelay(true)?;
                let stream = V::accept(config, io).await?;
                match workload {
                    Workload::Bulk => sink(stream).await,
                    Workload::Held => respond(stream, 1, 1).await,
                    Workload::Http => respond(stream, REQUEST, RESPONSE).await,
                }
            }
            .await;
            if let Err(e) = result {
                // Clients leave without close_notify when their process
                // ends (held); anything else is worth a line.
                if !matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ) {
                    eprintln!("connection: {e}");
                }
            }
        });
    }
}

/// Reads to the end, checking every byte against the bulk pattern, then
/// answers with the count and the number of mismatched segments.
async fn sink<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> io::Result<()> {
    let pattern = pattern();
    let mut buf = vec![0u8; BLOCK];
    let (mut pos, mut bad) = (0u64, 0u64);
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        bad += verify(&buf[..n], pos, &pattern);
        pos += n as u64;
    }
    let mut reply = [0u8; 16];
    reply[..8].copy_from_slice(&pos.to_le_bytes());
    reply[8..].copy_from_slice(&bad.to_le_bytes());
    s.write_all(&reply).await?;
    s.shutdown().await
}

/// Answers each `request`-byte message with a `response`-byte one.
async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    request: usize,
    response: usize,
) -> io::Result<()> {
    let mut req = vec![0u8; request];
    let mut resp = vec![0u8; response];
    loop {
        match s.read_exact(&mut req).await {
            Ok(_) => {}
            // The client closed (close_notify) between messages.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        answer(&req, &mut resp);
        s.write_all(&resp).await?;
        s.flush().await?;
    }
}

/// The response to `req`: its first 8 bytes (its sequence number; the one
/// byte of a held connection), a checksum of all of it, filler.
fn answer(req: &[u8], resp: &mut [u8]) {
    let n = resp.len().min(8).min(req.len());
    resp[..n].copy_from_slice(&req[..n]);
    if resp.len() >= 16 {
        let sum = req
            .iter()
            .fold(0u64, |h, &b| h.rotate_left(5) ^ u64::from(b));
        resp[8..16].copy_from_slice(&sum.to_le_bytes());
        for (i, b) in resp[16..].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31);
        }
    }
}

/// The bulk block: a fixed pseudo-random pattern; the first 8 bytes of
/// each block sent are replaced by its index.
fn pattern() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..BLOCK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Mismatched segments of `chunk`, which starts at stream offset `pos`.
fn verify(chunk: &[u8], pos: u64, pattern: &[u8]) -> u64 {
    let mut bad = 0;
    let mut at = 0;
    while at < chunk.len() {
        let p = pos + at as u64;
        let offset = (p % BLOCK as u64) as usize;
        let index = (p / BLOCK as u64).to_le_bytes();
        let len = (BLOCK - offset).min(chunk.len() - at);
        let seg = &chunk[at..at + len];
        let head = if offset < 8 { (8 - offset).min(len) } else { 0 };
        if head > 0 && seg[..head] != index[offset..offset + head] {
            bad += 1;
        }
        if seg[head..] != pattern[offset + head..offset + len] {
            bad += 1;
        }
        at += len;
    }
    bad
}

async fn tcp(addr: SocketAddr) -> io::Result<TcpStream> {
    let io = TcpStream::connect(addr).await?;
    io.set_nodelay(true)?;
    Ok(io)
}

/// CPU ms of the server and of this process.
fn cpu_both(server: u32, ticks: f64) -> Result<(f64, f64)> {
    Ok((cpu_ms(server, ticks)?, cpu_ms(std::process::id(), ticks)?))
}

fn rss_both(server: u32) -> Result<(f64, f64)> {
    Ok((
        status_kib(server, "VmRSS")?,
        status_kib(std::process::id(), "VmRSS")?,
    ))
}

async fn drive<V: Variant>(c: &ChildArgs) -> Result<()> {
    let config = client_config(&c.certs)?;
    let (figures, suite) = match c.workload {
        Workload::Bulk => bulk::<V>(c, config).await?,
        Workload::Held => held::<V>(c, config).await?,
        Workload::Http => http::<V>(c, config).await?,
    };
    let figures: Vec<Value> = figures.into_iter().map(|(k, v)| json!([k, v])).collect();
    println!(
        "RESULT {}",
        json!({ "figures": figures, "suite": suite.unwrap_or_else(|| "-".to_owned()) })
    );
    Ok(())
}

type Outcome = (Vec<(&'static str, f64)>, Option<String>);

async fn bulk<V: Variant>(c: &ChildArgs, config: Arc<rustls::ClientConfig>) -> Result<Outcome> {
    let mut s = V::connect(config, tcp(c.addr).await?).await?;
    let suite = V::suite(&s);
    let ticks = clock_ticks();
    let mut blocks = pattern().repeat(c.write_blocks);
    let (server0, client0) = cpu_both(c.server_pid, ticks)?;
    let t0 = Instant::now();
    let mut sent = 0u64;
    let mut index = 0u64;
    while t0.elapsed() < c.duration {
        for block in blocks.chunks_mut(BLOCK) {
            block[..8].copy_from_slice(&index.to_le_bytes());
            index += 1;
        }
        s.write_all(&blocks).await?;
        sent += blocks.len() as u64;
    }
    s.shutdown().await?;
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply)
        .await
        .context("read the server's count")?;
    let secs = t0.elapsed().as_secs_f64();
    let (server1, client1) = cpu_both(c.server_pid, ticks)?;
    let got = u64::from_le_bytes(reply[..8].try_into()?);
    let bad = u64::from_le_bytes(reply[8..].try_into()?);
    ensure!(
        got == sent && bad == 0,
        "bulk: sent {sent} bytes, the server read {got} with {bad} mismatched segments"
    );
    let gb = sent as f64 / 1e9;
    Ok((
        vec![
            ("Gbit/s", sent as f64 * 8.0 / secs / 1e9),
            ("server CPU ms per GB", (server1 - server0) / gb),
            ("client CPU ms per GB", (client1 - client0) / gb),
        ],
        suite,
    ))
}

/// A connection that has echoed its byte.
async fn open_held<V: Variant>(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    i: usize,
) -> Result<V::Client> {
    let mut s = V::connect(config, tcp(addr).await?).await?;
    let byte = [i as u8];
    s.write_all(&byte).await?;
    s.flush().await?;
    let mut back = [0u8; 1];
    s.read_exact(&mut back).await?;
    ensure!(
        back == byte,
        "held connection {i}: sent {byte:?}, echoed {back:?}"
    );
    Ok(s)
}

async fn held<V: Variant>(c: &ChildArgs, config: Arc<rustls::ClientConfig>) -> Result<Outcome> {
    let mut suite = None;
    for i in 0..HELD_WARMUP {
        let mut s = open_held::<V>(Arc::clone(&config), c.addr, i).await?;
        suite = V::suite(&s);
        s.shutdown().await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (server0, client0) = rss_both(c.server_pid)?;
    let held: Rc<RefCell<Vec<V::Client>>> = Rc::new(RefCell::new(Vec::with_capacity(c.held)));
    let next = Rc::new(Cell::new(0usize));
    let t0 = Instant::now();
    let workers: Vec<_> = (0..HELD_PARALLEL)
        .map(|_| {
            let (held, next, config) = (Rc::clone(&held), Rc::clone(&next), Arc::clone(&config));
            let (addr, n) = (c.addr, c.held);
            tokio::task::spawn_local(async move {
                loop {
                    let i = next.get();
                    if i >= n {
                        return Ok::<_, anyhow::Error>(());
                    }
                    next.set(i + 1);
                    let s = open_held::<V>(Arc::clone(&config), addr, i).await?;
                    held.borrow_mut().push(s);
                }
            })
        })
        .collect();
    for w in workers {
        w.await??;
    }
    let open = t0.elapsed().as_secs_f64();
    ensure!(
        held.borrow().len() == c.held,
        "held: not every connection opened"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (server1, client1) = rss_both(c.server_pid)?;
    let n = c.held as f64;
    Ok((
        vec![
            ("server KiB per held connection", (server1 - server0) / n),
            ("client KiB per held connection", (client1 - client0) / n),
            ("handshakes/s", n / open),
        ],
        suite,
    ))
}

async fn http<V: Variant>(c: &ChildArgs, config: Arc<rustls::ClientConfig>) -> Result<Outcome> {
    let mut streams = Vec::with_capacity(HTTP_CONNECTIONS);
    for _ in 0..HTTP_CONNECTIONS {
        streams.push(V::connect(Arc::clone(&config), tcp(c.addr).await?).await?);
    }
    let suite = streams.first().and_then(V::suite);
    let count = Rc::new(Cell::new(0u64));
    let stop = Rc::new(Cell::new(false));
    let tasks: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(conn, mut s)| {
            let (count, stop) = (Rc::clone(&count), Rc::clone(&stop));
            tokio::task::spawn_local(async move {
                let mut req = vec![0u8; REQUEST];
                for (i, b) in req.iter_mut().enumerate() {
                    *b = b"GET /svc HTTP/1.1\r\nhost: a.example\r\n"[i % 36];
                }
                let mut resp = vec![0u8; RESPONSE];
                let mut want = vec![0u8; RESPONSE];
                let mut seq = (conn as u64) << 40;
                while !stop.get() {
                    req[..8].copy_from_slice(&seq.to_le_bytes());
                    s.write_all(&req).await?;
                    s.flush().await?;
                    s.read_exact(&mut resp).await?;
                    answer(&req, &mut want);
                    ensure!(
                        resp == want,
                        "connection {conn}: the response to request {seq:#x} is not the one sent"
                    );
                    count.set(count.get() + 1);
                    seq += 1;
                }
                s.shutdown().await?;
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ticks = clock_ticks();
    let (server0, client0) = cpu_both(c.server_pid, ticks)?;
    let (n0, t0) = (count.get(), Instant::now());
    tokio::time::sleep(c.duration).await;
    let (server1, client1) = cpu_both(c.server_pid, ticks)?;
    let (n1, secs) = (count.get(), t0.elapsed().as_secs_f64());
    stop.set(true);
    for t in tasks {
        t.await??;
    }
    let n = (n1 - n0) as f64;
    ensure!(n > 0.0, "http: no exchange completed in the window");
    Ok((
        vec![
            ("exchanges/s", n / secs),
            (
                "server CPU µs per exchange",
                (server1 - server0) * 1000.0 / n,
            ),
            (
                "client CPU µs per exchange",
                (client1 - client0) * 1000.0 / n,
            ),
        ],
        suite,
    ))
}

// ---------------------------------------------------------------------------
// rustls's unbuffered API behind tokio's AsyncRead/AsyncWrite.

const HEADER: usize = 5;
const TAG: usize = 16;
const MAX_PLAINTEXT: usize = 16 * 1024;
/// One record at most (RFC 8446 §5.2), as ours reads when data is not flowing.
const READ_SMALL: usize = HEADER + MAX_PLAINTEXT + 256;
/// Per `recv` once a read filled what it asked for, as ours.
const READ_BIG: usize = 512 * 1024;
/// Sealed bytes queued before writes wait, as ours.
const OUT_HIGH: usize = 512 * 1024;
/// The two buffer sizes: a partial record plus a small read, or plus a big one.
const SMALL_BUF: usize = 2 * READ_SMALL;
const BIG_BUF: usize = READ_BIG + READ_SMALL;

/// Drained buffers kept per thread, with ours's budget (8 buffers, 2 MiB):
/// request/response traffic drains its buffers on every message, and taking
/// fresh zeroed ones from malloc each time would cost what ours avoids.
mod pool {
    use std::cell::RefCell;

    const KEEP: usize = 8;
    const KEEP_BYTES: usize = 4 * super::READ_BIG;

    thread_local! {
        static SPARE: RefCell<(Vec<Vec<u8>>, usize)> = const { RefCell::new((Vec::new(), 0)) };
    }

    /// A zeroed-once buffer of at least `min` bytes (its length is its size).
    pub fn take(min: usize) -> Vec<u8> {
        let size = if min <= super::SMALL_BUF {
            super::SMALL_BUF
        } else if min <= super::BIG_BUF {
            super::BIG_BUF
        } else {
            min
        };
        SPARE
            .with(|s| {
                let (list, bytes) = &mut *s.borrow_mut();
                let i = list.iter().position(|b| b.len() == size)?;
                let buf = list.swap_remove(i);
                *bytes -= buf.len();
                Some(buf)
            })
            .unwrap_or_else(|| vec![0; size])
    }

    pub fn give(buf: Vec<u8>) {
        if buf.is_empty() || buf.len() > super::BIG_BUF {
            return;
        }
        SPARE.with(|s| {
            let (list, bytes) = &mut *s.borrow_mut();
            if list.len() < KEEP && *bytes + buf.len() <= KEEP_BYTES {
                *bytes += buf.len();
                list.push(buf);
            }
        });
    }
}

/// Makes `need` bytes free after `end` in `buf` (holding `start..end`),
/// moving what is held to the front or into a larger buffer.
fn room(buf: &mut Vec<u8>, start: &mut usize, end: &mut usize, need: usize) {
    if *start == *end {
        *start = 0;
        *end = 0;
    }
    if buf.len() - *end >= need {
        return;
    }
    if *start > 0 {
        buf.copy_within(*start..*end, 0);
        *end -= *start;
        *start = 0;
        if buf.len() - *end >= need {
            return;
        }
    }
    let mut bigger = pool::take(*end + need);
    bigger[..*end].copy_from_slice(&buf[..*end]);
    pool::give(std::mem::replace(buf, bigger));
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn protocol(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("rustls stream: {what}"))
}

/// The two sides of rustls's unbuffered connection, as one type.
trait Side {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Side for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.process_tls_records(incoming)
    }
}

impl Side for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.process_tls_records(incoming)
    }
}

/// Appends the handshake bytes rustls has ready to `out`.
fn encode<D>(
    out: &mut Vec<u8>,
    start: &mut usize,
    end: &mut usize,
    enc: &mut EncodeTlsData<'_, D>,
) -> io::Result<()> {
    let need = match enc.encode(&mut []) {
        Ok(n) => n,
        Err(EncodeError::InsufficientSize(s)) => s.required_size,
        Err(e) => return Err(protocol(format!("encoding: {e}"))),
    };
    room(out, start, end, need);
    let n = enc
        .encode(&mut out[*end..])
        .map_err(|e| protocol(format!("encoding: {e}")))?;
    *end += n;
    Ok(())
}

/// A TLS connection after rustls's unbuffered handshake, records sealed and
/// opened by rustls.
struct RustlsStream<C> {
    io: TcpStream,
    conn: C,
    /// Ciphertext read, not yet processed: `inbuf[in_start..in_end]`.
    inbuf: Vec<u8>,
    in_start: usize,
    in_end: usize,
    /// Plaintext of a record the reader's buffer did not take.
    plain: Vec<u8>,
    plain_at: usize,
    /// Sealed bytes the socket has not taken: `out[out_start..out_end]`.
    out: Vec<u8>,
    out_start: usize,
    out_end: usize,
    flowing: bool,
    peer_closed: bool,
    write_closed: bool,
}

impl<C: Side + Unpin> RustlsStream<C> {
    async fn handshake(mut conn: C, mut io: TcpStream) -> io::Result<Self> {
        let (mut inbuf, mut start, mut end) = (Vec::new(), 0, 0);
        let (mut out, mut out_start, mut out_end) = (Vec::new(), 0, 0);
        let mut peer_closed = false;
        loop {
            let status = conn.process(&mut inbuf[start..end]);
            let discard = status.discard;
            let (mut read, mut send, mut done) = (false, false, false);
            match status.state.map_err(tls_err)? {
                ConnectionState::EncodeTlsData(mut enc) => {
                    encode(&mut out, &mut out_start, &mut out_end, &mut enc)?;
                }
                ConnectionState::TransmitTlsData(t) => {
                    // Sent right below, before rustls is asked again.
                    t.done();
                    send = true;
                }
                ConnectionState::BlockedHandshake => read = true,
                // Data that came with the peer's last flight stays with
                // rustls until the first read asks for it.
                ConnectionState::WriteTraffic(_) | ConnectionState::ReadTraffic(_) => done = true,
                ConnectionState::PeerClosed => peer_closed = true,
                other => return Err(protocol(format!("{other:?} during the handshake"))),
            }
            start += discard;
            if send {
                io.write_all(&out[out_start..out_end]).await?;
                (out_start, out_end) = (0, 0);
            }
            if done {
                break;
            }
            if read {
                room(&mut inbuf, &mut start, &mut end, READ_SMALL);
                let n = io.read(&mut inbuf[end..end + READ_SMALL]).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tls handshake: the peer closed the connection",
                    ));
                }
                end += n;
            }
        }
        if out_end > out_start {
            io.write_all(&out[out_start..out_end]).await?;
        }
        pool::give(out);
        let mut stream = RustlsStream {
            io,
            conn,
            inbuf,
            in_start: start,
            in_end: end,
            plain: Vec::new(),
            plain_at: 0,
            out: Vec::new(),
            out_start: 0,
            out_end: 0,
            flowing: false,
            peer_closed,
            write_closed: false,
        };
        stream.release_in();
        Ok(stream)
    }

    /// Gives the read buffer back once nothing is left in it.
    fn release_in(&mut self) {
        if self.in_start == self.in_end && !self.inbuf.is_empty() {
            pool::give(std::mem::take(&mut self.inbuf));
            (self.in_start, self.in_end) = (0, 0);
            self.flowing = false;
        }
    }

    /// Waiting for the rest of a record: keep it in a one-record buffer.
    fn shrink_waiting(&mut self) {
        if self.in_end > self.in_start && self.inbuf.len() > SMALL_BUF {
            let mut small = pool::take(SMALL_BUF);
            let held = self.in_end - self.in_start;
            small[..held].copy_from_slice(&self.inbuf[self.in_start..self.in_end]);
            pool::give(std::mem::replace(&mut self.inbuf, small));
            (self.in_start, self.in_end) = (0, held);
        }
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_start < self.out_end {
            let n = ready!(
                Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_start..self.out_end])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_start += n;
        }
        if !self.out.is_empty() {
            pool::give(std::mem::take(&mut self.out));
        }
        (self.out_start, self.out_end) = (0, 0);
        Poll::Ready(Ok(()))
    }

    /// Hands the plaintext of whole records in `inbuf` to `rb` until it is
    /// full, the records run out or the peer closed.
    fn process_incoming(&mut self, cx: &mut Context<'_>, rb: &mut ReadBuf<'_>) -> io::Result<()> {
        loop {
            let status = self
                .conn
                .process(&mut self.inbuf[self.in_start..self.in_end]);
            let mut discard = status.discard;
            let (mut stop, mut drain) = (false, false);
            match status.state.map_err(tls_err)? {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(tls_err)?;
                        discard += record.discard;
                        let n = record.payload.len().min(rb.remaining());
                        rb.put_slice(&record.payload[..n]);
                        self.plain.extend_from_slice(&record.payload[n..]);
                    }
                    stop = rb.remaining() == 0 || !self.plain.is_empty();
                }
                ConnectionState::EncodeTlsData(mut enc) => {
                    encode(
                        &mut self.out,
                        &mut self.out_start,
                        &mut self.out_end,
                        &mut enc,
                    )?;
                }
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    drain = true;
                }
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    self.peer_closed = true;
                    stop = true;
                }
                // No whole record left.
                ConnectionState::WriteTraffic(_) | ConnectionState::BlockedHandshake => stop = true,
                other => return Err(protocol(format!("{other:?} while reading"))),
            }
            self.in_start += discard;
            if drain && let Poll::Ready(Err(e)) = self.poll_drain(cx) {
                return Err(e);
            }
            if stop {
                return Ok(());
            }
        }
    }

    /// Seals `data` (or a close_notify) into `out`.
    fn seal(&mut self, data: &[u8], close: bool) -> io::Result<()> {
        loop {
            let status = self.conn.process(&mut []);
            match status.state.map_err(tls_err)? {
                ConnectionState::EncodeTlsData(mut enc) => {
                    encode(
                        &mut self.out,
                        &mut self.out_start,
                        &mut self.out_end,
                        &mut enc,
                    )?;
                }
                // Queued in `out`, in order, ahead of what follows.
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::WriteTraffic(mut w) => {
                    let records = data.len().div_ceil(MAX_PLAINTEXT).max(1);
                    let mut need = data.len() + records * (HEADER + 1 + TAG);
                    loop {
                        room(&mut self.out, &mut self.out_start, &mut self.out_end, need);
                        let at = self.out_end;
                        let sealed = if close {
                            w.queue_close_notify(&mut self.out[at..])
                        } else {
                            w.encrypt(data, &mut self.out[at..])
                        };
                        match sealed {
                            Ok(n) => {
                                self.out_end += n;
                                return Ok(());
                            }
                            Err(EncryptError::InsufficientSize(s)) if s.required_size > need => {
                                need = s.required_size;
                            }
                            Err(e) => return Err(protocol(format!("sealing: {e}"))),
                        }
                    }
                }
                other => return Err(protocol(format!("{other:?} while writing"))),
            }
        }
    }
}

impl<C: Side + Unpin> AsyncRead for RustlsStream<C> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        rb: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_at < this.plain.len() {
                let n = (this.plain.len() - this.plain_at).min(rb.remaining());
                rb.put_slice(&this.plain[this.plain_at..this.plain_at + n]);
                this.plain_at += n;
                if this.plain_at == this.plain.len() {
                    this.plain = Vec::new();
                    this.plain_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let before = rb.filled().len();
            this.process_incoming(cx, rb)?;
            if rb.filled().len() > before || this.peer_closed {
                this.release_in();
                return Poll::Ready(Ok(()));
            }
            this.release_in();
            // Wait for bytes before taking a buffer for them.
            if this.io.poll_read_ready(cx)?.is_pending() {
                this.shrink_waiting();
                return Poll::Pending;
            }
            let want = if this.flowing { READ_BIG } else { READ_SMALL };
            room(&mut this.inbuf, &mut this.in_start, &mut this.in_end, want);
            let end = this.in_end;
            match this.io.try_read(&mut this.inbuf[end..end + want]) {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "rustls stream: the peer closed without close_notify",
                    )));
                }
                Ok(n) => {
                    this.in_end += n;
                    this.flowing = n == want;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<C: Side + Unpin> AsyncWrite for RustlsStream<C> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "rustls stream: write after close_notify",
            )));
        }
        if this.out_end - this.out_start >= OUT_HIGH {
            if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
            if this.out_end - this.out_start >= OUT_HIGH {
                return Poll::Pending;
            }
        }
        let take = data.len().min(OUT_HIGH - (this.out_end - this.out_start));
        this.seal(&data[..take], false)?;
        // Send now; what the socket refuses waits for the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(take))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            this.seal(&[], true)?;
            this.write_closed = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn verify_counts_a_wrong_byte_and_a_wrong_index() {
        let p = pattern();
        let mut stream = p.clone();
        stream[..8].copy_from_slice(&0u64.to_le_bytes());
        let mut second = p.clone();
        second[..8].copy_from_slice(&1u64.to_le_bytes());
        stream.extend_from_slice(&second);
        // Any split of the stream into reads checks clean.
        for cut in [1, 7, 8, 9, 1000, BLOCK, BLOCK + 3] {
            let (a, b) = stream.split_at(cut);
            assert_eq!(verify(a, 0, &p) + verify(b, cut as u64, &p), 0, "cut {cut}");
        }
        let mut bad = stream.clone();
        bad[BLOCK + 4] ^= 1;
        assert_eq!(verify(&bad, 0, &p), 1);
        let mut bad = stream.clone();
        bad[500] ^= 1;
        assert_eq!(verify(&bad, 0, &p), 1);
    }
}
