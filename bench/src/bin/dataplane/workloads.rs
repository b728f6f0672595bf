//! The workloads: each drives load through one deployment, reads the
//! gateways' CPU time around it and their memory after it, and returns named
//! figures. Load tools run pinned to the client core; their output is parsed
//! here (wrk's text, h2load's text, iperf3's JSON, connrate's JSON).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;

use crate::Args;
use crate::contenders::{CLIENT_CPU, Deployment, Env, SERVER_CPU, WEB_HOST};
use crate::procs::run_tool;
use elsinore_bench::{clock_ticks, cpu_split_ms, status_kib};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Http1,
    Http2,
    Connect,
    ConnectResume,
    Bulk,
    BulkDown,
    IdleTcp,
    IdleHttp,
    Catalog,
}

impl Workload {
    pub const ALL: [Workload; 9] = [
        Workload::Http1,
        Workload::Http2,
        Workload::Connect,
        Workload::ConnectResume,
        Workload::Bulk,
        Workload::BulkDown,
        Workload::IdleTcp,
        Workload::IdleHttp,
        Workload::Catalog,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Http1 => "http1",
            Workload::Http2 => "http2",
            Workload::Connect => "connect",
            Workload::ConnectResume => "connect-resume",
            Workload::Bulk => "bulk",
            Workload::BulkDown => "bulk-down",
            Workload::IdleTcp => "idle-tcp",
            Workload::IdleHttp => "idle-http",
            Workload::Catalog => "catalog",
        }
    }

    pub fn parse(s: &str) -> Result<Workload> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| {
                anyhow!(
                    "unknown workload {s:?} (http1, http2, connect, connect-resume, bulk, bulk-down, idle-tcp, idle-http, catalog)"
                )
            })
    }

    /// Idle-memory workloads measure gateways only; direct has none.
    /// Whether `proxy.yieldToClients` acts in this workload (it counts
    /// responses written to HTTP/1.1 clients; the HTTP/2 row shows that it
    /// costs nothing there).
    pub fn yield_acts(self) -> bool {
        matches!(self, Workload::Http1 | Workload::Http2)
    }

    pub fn needs_gateways(self) -> bool {
        matches!(self, Workload::IdleTcp | Workload::IdleHttp)
    }

    /// Whether the product gateways may resume TLS sessions between
    /// egress and ingress (only the like-for-like variant of the
    /// new-connection test; Elsinore's behaviour is its own either way).
    pub fn resumption(self) -> bool {
        self == Workload::ConnectResume
    }

    /// Client connections a gateway must admit at once (HAProxy's
    /// `maxconn`; nginx's `worker_connections` counts both sides, so twice
    /// this). Kept small where the load needs few, since nginx preallocates.
    pub fn max_sessions(self, idle: usize) -> usize {
        if self.needs_gateways() {
            idle + 1024
        } else {
            2048
        }
    }
}

/// Figures of one workload run: (metric key, value).
pub type Figures = Vec<(String, f64)>;

/// CPU time of each gateway, to subtract around a measurement.
struct CpuMark {
    ticks: f64,
    /// (role, pid, user ms, kernel ms) at the mark.
    per_gateway: Vec<(&'static str, u32, f64, f64)>,
    /// (busy, total) jiffies of the client core and the server core.
    cores: [(u64, u64); 2],
}

/// (busy, total) jiffies of CPU `n` from /proc/stat; idle and iowait are
/// not busy.
fn core_jiffies(stat: &str, n: &str) -> Result<(u64, u64)> {
    let name = format!("cpu{n}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .ok_or_else(|| anyhow!("/proc/stat has no {name} line"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

fn cores_now() -> Result<[(u64, u64); 2]> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    Ok([
        core_jiffies(&stat, CLIENT_CPU)?,
        core_jiffies(&stat, SERVER_CPU)?,
    ])
}

impl CpuMark {
    fn take(dep: &Deployment) -> Result<CpuMark> {
        let ticks = clock_ticks();
        let per_gateway = dep
            .gateways()
            .into_iter()
            .map(|(role, pid)| {
                let (user, kernel) = cpu_split_ms(pid, ticks)?;
                Ok((role, pid, user, kernel))
            })
            .collect::<Result<_>>()?;
        Ok(CpuMark {
            ticks,
            per_gateway,
            cores: cores_now()?,
        })
    }

    /// How busy the client core and the server core were since the mark,
    /// in percent (everything on them, the load generator and backends too).
    fn busy_since(&self) -> Result<[f64; 2]> {
        let now = cores_now()?;
        let pct = |(b0, t0): (u64, u64), (b1, t1): (u64, u64)| {
            100.0 * (b1 - b0) as f64 / (t1 - t0).max(1) as f64
        };
        Ok([pct(self.cores[0], now[0]), pct(self.cores[1], now[1])])
    }

    /// (role, ms of CPU used since the mark) per gateway.
    fn since(&self) -> Result<Vec<(&'static str, f64)>> {
        Ok(self
            .split_since()?
            .into_iter()
            .map(|(role, user, kernel)| (role, user + kernel))
            .collect())
    }

    /// (role, user ms, kernel ms used since the mark) per gateway.
    fn split_since(&self) -> Result<Vec<(&'static str, f64, f64)>> {
        self.per_gateway
            .iter()
            .map(|&(role, pid, user0, kernel0)| {
                let (user, kernel) = cpu_split_ms(pid, self.ticks)?;
                Ok((role, user - user0, kernel - kernel0))
            })
            .collect()
    }
}

/// CPU per unit of work (`per` units; `scale` converts ms to the unit shown),
/// in total and per gateway; peak RSS per gateway.
fn cost_figures(
    out: &mut Figures,
    prefix: &str,
    dep: &Deployment,
    cpu: &[(&'static str, f64)],
    units: f64,
    scale: f64,
) -> Result<()> {
    if dep.egress.is_none() {
        return Ok(());
    }
    let total: f64 = cpu.iter().map(|(_, ms)| ms).sum();
    out.push((format!("{prefix}.cpu"), total * scale / units));
    for (role, ms) in cpu {
        out.push((format!("{prefix}.cpu_{role}"), ms * scale / units));
    }
    for (role, pid) in dep.gateways() {
        out.push((
            format!("{prefix}.hwm_{role}"),
            status_kib(pid, "VmHWM")? / 1024.0,
        ));
    }
    Ok(())
}

/// HTTP/1.1 keep-alive: wrk, 1 thread, `connections` connections.
pub fn http1(dep: &mut Deployment, args: &Args, log_dir: &Path) -> Result<Figures> {
    let url = format!("http://{}/", dep.targets.http1);
    let wrk = |duration: u64, log: &str| -> Result<String> {
        run_tool(
            "wrk",
            Some(CLIENT_CPU),
            "wrk",
            &[
                "-t1".to_owned(),
                format!("-c{}", args.connections),
                format!("-d{}s", duration),
                "--latency".to_owned(),
                "-H".to_owned(),
                format!("Host: {WEB_HOST}"),
                url.clone(),
            ],
            log_dir.join(log),
            Duration::from_secs(duration + 60),
        )
    };
    if args.warmup > 0 {
        wrk(args.warmup, "wrk-warmup.log")?;
    }
    let mark = CpuMark::take(dep)?;
    let text = wrk(args.duration, "wrk.log")?;
    let split = mark.split_since()?;
    let cpu: Vec<_> = split.iter().map(|&(r, u, k)| (r, u + k)).collect();
    let kernel_ms: f64 = split.iter().map(|&(_, _, k)| k).sum();
    let busy = mark.busy_since()?;
    dep.check_alive()?;
    let w = parse_wrk(&text).with_context(|| format!("parse wrk output:\n{text}"))?;
    ensure!(
        w.requests > 0.0,
        "wrk completed no requests through {url}:\n{text}"
    );
    let mut out = vec![
        ("http1.rps".to_owned(), w.rps),
        ("http1.p50".to_owned(), w.p50_ms),
        ("http1.p99".to_owned(), w.p99_ms),
        ("http1.errors".to_owned(), w.errors),
        // Whether a core was the limit, or the round trip was.
        ("http1.busy_client_core".to_owned(), busy[0]),
        ("http1.busy_server_core".to_owned(), busy[1]),
    ];
    cost_figures(&mut out, "http1", dep, &cpu, w.requests, 1000.0)?;
    if dep.egress.is_some() {
        // How much of it the kernel's share is: what no user-space change
        // takes away.
        out.push((
            "http1.cpu_kernel".to_owned(),
            kernel_ms * 1000.0 / w.requests,
        ));
    }
    Ok(out)
}

struct Wrk {
    requests: f64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: f64,
}

fn parse_wrk(text: &str) -> Result<Wrk> {
    let mut w = Wrk {
        requests: f64::NAN,
        rps: f64::NAN,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        errors: 0.0,
    };
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().context("Requests/sec")?;
        } else if line.contains(" requests in ") {
            w.requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| anyhow!("bad line {line:?}"))?;
        } else if let Some(v) = line.strip_prefix("50%") {
            w.p50_ms = duration_ms(v.trim())?;
        } else if let Some(v) = line.strip_prefix("99%") {
            w.p99_ms = duration_ms(v.trim())?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            w.errors += v.trim().parse::<f64>().unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for part in v.split(',') {
                if let Some(n) = part.split_whitespace().nth(1) {
                    w.errors += n.parse::<f64>().unwrap_or(0.0);
                }
            }
        }
    }
    ensure!(
        w.rps.is_finite() && w.requests.is_finite() && w.p99_ms.is_finite(),
        "missing Requests/sec, request count or latency distribution"
    );
    Ok(w)
}

/// "588.00us", "1.23ms", "2.00s", "1.5m" → ms.
fn duration_ms(v: &str) -> Result<f64> {
    let split = v
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| anyhow!("no unit in {v:?}"))?;
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().with_context(|| format!("number in {v:?}"))?;
    Ok(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        other => bail!("unknown unit {other:?} in {v:?}"),
    })
}

/// HTTP/2 from the client (h2c prior knowledge): h2load, 1 thread.
pub fn http2(dep: &mut Deployment, args: &Args, log_dir: &Path) -> Result<Figures> {
    let url = format!("http://{}/", dep.targets.h2c);
    let h2load = |duration: u64, log: &str| -> Result<String> {
        run_tool(
            "h2load",
            Some(CLIENT_CPU),
            "h2load",
            &[
                "-t1".to_owned(),
                format!("-c{}", args.connections),
                format!("-m{}", args.streams),
                format!("-D{}", duration),
                "-H".to_owned(),
                format!(":authority: {WEB_HOST}"),
                url.clone(),
            ],
            log_dir.join(log),
            Duration::from_secs(duration + 60),
        )
    };
    if args.warmup > 0 {
        h2load(args.warmup, "h2load-warmup.log")?;
    }
    let mark = CpuMark::take(dep)?;
    let text = h2load(args.duration, "h2load.log")?;
    let cpu = mark.since()?;
    dep.check_alive()?;
    let h = parse_h2load(&text).with_context(|| format!("parse h2load output:\n{text}"))?;
    ensure!(
        h.succeeded > 0.0,
        "h2load completed no requests through {url}:\n{text}"
    );
    let mut out = vec![
        ("http2.rps".to_owned(), h.rps),
        ("http2.errors".to_owned(), h.failed),
    ];
    cost_figures(&mut out, "http2", dep, &cpu, h.succeeded, 1000.0)?;
    Ok(out)
}

struct H2load {
    seconds: f64,
    rps: f64,
    succeeded: f64,
    failed: f64,
}

fn parse_h2load(text: &str) -> Result<H2load> {
    let mut h = H2load {
        seconds: f64::NAN,
        rps: f64::NAN,
        succeeded: f64::NAN,
        failed: 0.0,
    };
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in") {
            // "finished in 10.00s, 12345.60 req/s, 1.23MB/s": h2load's req/s
            // counts failed requests too, so only the duration is taken.
            let first = rest.split(',').next().unwrap_or("").trim();
            h.seconds = duration_ms(first).with_context(|| format!("bad line {line:?}"))? / 1000.0;
        } else if let Some(rest) = line.strip_prefix("requests:") {
            // "N total, N started, N done, N succeeded, N failed, N errored, N timeout"
            for part in rest.split(',') {
                let mut words = part.split_whitespace();
                let (Some(n), Some(what)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: f64 = n.parse().unwrap_or(0.0);
                match what {
                    "succeeded" => h.succeeded = n,
                    "failed" | "errored" | "timeout" => h.failed += n,
                    _ => {}
                }
            }
        }
    }
    ensure!(
        h.seconds > 0.0 && h.succeeded.is_finite(),
        "missing 'finished in' or 'requests:' line"
    );
    h.rps = h.succeeded / h.seconds;
    Ok(h)
}

/// New connections: connrate's loops of connect → 1 byte echo → close.
/// `prefix` names the figures (`connect` or `connect_resume`).
pub fn connect(
    dep: &mut Deployment,
    args: &Args,
    env: &Env,
    log_dir: &Path,
    prefix: &str,
) -> Result<Figures> {
    let mark = CpuMark::take(dep)?;
    let text = run_tool(
        "connrate",
        Some(CLIENT_CPU),
        &env.programs.connrate.display().to_string(),
        &[
            "run".to_owned(),
            "--target".to_owned(),
            dep.targets.echo.to_string(),
            "--parallel".to_owned(),
            args.parallel.to_string(),
            "--duration".to_owned(),
            args.duration.to_string(),
        ],
        log_dir.join("connrate.log"),
        Duration::from_secs(args.duration + 60),
    )?;
    let cpu = mark.since()?;
    dep.check_alive()?;
    let doc: Value = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| anyhow!("no JSON line in connrate output:\n{text}"))?;
    let num = |k: &str| doc.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let connections = num("connections");
    ensure!(
        connections > 0.0,
        "connrate completed no connections through {}: {text}",
        dep.targets.echo
    );
    let mut out = vec![
        (format!("{prefix}.cps"), num("connections_per_second")),
        (format!("{prefix}.errors"), num("errors")),
    ];
    cost_figures(&mut out, prefix, dep, &cpu, connections, 1000.0)?;
    Ok(out)
}

/// Bulk TCP: one iperf3 stream through the mTLS path, from the client to
/// the backend (`bulk`), or with `down` from the backend to the client
/// (`bulk-down`, iperf3 `-R`): the egress then opens records and the
/// ingress seals them.
pub fn bulk(dep: &mut Deployment, args: &Args, log_dir: &Path, down: bool) -> Result<Figures> {
    let target = dep.targets.bulk;
    let prefix = if down { "bulk_down" } else { "bulk" };
    let mut flags = vec![
        "-c".to_owned(),
        target.ip().to_string(),
        "-p".to_owned(),
        target.port().to_string(),
        "-t".to_owned(),
        args.duration.to_string(),
        "-P1".to_owned(),
        "--json".to_owned(),
    ];
    if down {
        flags.push("-R".to_owned());
    }
    let mark = CpuMark::take(dep)?;
    let text = run_tool(
        "iperf3",
        Some(CLIENT_CPU),
        "iperf3",
        &flags,
        log_dir.join(format!("iperf3-{prefix}.json")),
        Duration::from_secs(args.duration + 60),
    )?;
    let cpu = mark.since()?;
    dep.check_alive()?;
    let doc: Value =
        serde_json::from_str(&text).with_context(|| format!("parse iperf3 JSON:\n{text}"))?;
    if let Some(e) = doc.get("error").and_then(Value::as_str) {
        bail!("iperf3 via {target}: {e}");
    }
    let received = doc
        .pointer("/end/sum_received")
        .ok_or_else(|| anyhow!("iperf3 JSON has no end.sum_received:\n{text}"))?;
    let bytes = received
        .get("bytes")
        .and_then(Value::as_f64)
        .unwrap_or(f64::NAN);
    let bps = received
        .get("bits_per_second")
        .and_then(Value::as_f64)
        .unwrap_or(f64::NAN);
    ensure!(bytes > 0.0, "iperf3 moved no bytes via {target}");
    let mut out = vec![(format!("{prefix}.gbps"), bps / 1e9)];
    // ms of CPU per GB (10^9 bytes) delivered.
    cost_figures(&mut out, prefix, dep, &cpu, bytes / 1e9, 1.0)?;
    Ok(out)
}

/// One connect → 1 byte → echo, with short timeouts (path checks).
pub fn echo_once(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(())
}

/// Open connections are made in batches: all of a batch connect and send,
/// then all are read, so the gateways see up to this many handshakes at once.
const IDLE_BATCH: usize = 200;

/// How the idle connections are opened and proven established.
#[derive(Clone, Copy)]
enum IdleKind {
    /// TCP service: 1 byte echoed (the whole mTLS path is up).
    Tcp,
    /// HTTP service: one request answered, then the connection sits in keep-alive.
    Http,
}

/// Memory per held connection: RSS of each gateway before and after opening
/// `count` connections that then sit idle.
pub fn idle(dep: &mut Deployment, args: &Args, http: bool) -> Result<Figures> {
    let (kind, prefix, target) = if http {
        (IdleKind::Http, "idle_http", dep.targets.http1)
    } else {
        (IdleKind::Tcp, "idle_tcp", dep.targets.echo)
    };
    let gateways = dep.gateways();
    ensure!(!gateways.is_empty(), "idle workloads need gateways");
    // Let the path check's connections settle before the baseline.
    std::thread::sleep(Duration::from_millis(500));
    let before: Vec<f64> = gateways
        .iter()
        .map(|&(_, pid)| status_kib(pid, "VmRSS"))
        .collect::<Result<_>>()?;
    let mut held = Vec::with_capacity(args.idle);
    let mut failed = 0usize;
    let mut first_error = None;
    while held.len() + failed < args.idle {
        let n = IDLE_BATCH.min(args.idle - held.len() - failed);
        let mut batch = Vec::with_capacity(n);
        for _ in 0..n {
            match open_idle(target, kind) {
                Ok(s) => batch.push(s),
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        for mut s in batch {
            match finish_idle(&mut s, kind) {
                Ok(()) => held.push(s),
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        dep.check_alive()?;
    }
    ensure!(
        failed * 100 <= args.idle,
        "{failed} of {} idle connections to {target} failed (first: {})",
        args.idle,
        first_error.unwrap_or_default()
    );
    // Memory a gateway frees lazily (TLS handshake buffers) should be gone
    // before we read what a held connection really costs.
    std::thread::sleep(Duration::from_secs(2));
    dep.check_alive()?;
    let mut out = vec![(format!("{prefix}.failed"), failed as f64)];
    for (&(role, pid), before) in gateways.iter().zip(before) {
        let after = status_kib(pid, "VmRSS")?;
        out.push((
            format!("{prefix}.kib_{role}"),
            (after - before) / held.len() as f64,
        ));
        out.push((
            format!("{prefix}.hwm_{role}"),
            status_kib(pid, "VmHWM")? / 1024.0,
        ));
    }
    drop(held);
    Ok(out)
}

fn open_idle(target: SocketAddr, kind: IdleKind) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    match kind {
        IdleKind::Tcp => s.write_all(b"x")?,
        IdleKind::Http => write!(s, "GET / HTTP/1.1\r\nHost: {WEB_HOST}\r\n\r\n")?,
    }
    Ok(s)
}

fn finish_idle(s: &mut TcpStream, kind: IdleKind) -> std::io::Result<()> {
    match kind {
        IdleKind::Tcp => {
            let mut b = [0u8; 1];
            s.read_exact(&mut b)
        }
        IdleKind::Http => {
            let status = read_response(s)?;
            if status == 200 {
                Ok(())
            } else {
                Err(std::io::Error::other(format!("HTTP status {status}")))
            }
        }
    }
}

/// Reads one HTTP/1.1 response (Content-Length or chunked body), leaving the
/// connection ready for keep-alive; returns the status.
fn read_response(s: &mut TcpStream) -> std::io::Result<u16> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::other(
                "connection closed before the response",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let length = head.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    let chunked = head
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    let done = |buf: &[u8]| -> bool {
        let body = &buf[head_end..];
        match (length, chunked) {
            (Some(n), _) => body.len() >= n,
            (None, true) => find(body, b"0\r\n\r\n").is_some(),
            (None, false) => true,
        }
    };
    while !done(&buf) {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::other("connection closed in the body"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(status)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Catalog delivery for `services` services: runs the catalog benchmark
/// (window 256) and returns (sync ms, consumer peak RSS MiB) medians.
pub fn catalog(env: &Env, services: usize, rounds: usize, log_dir: &Path) -> Result<Figures> {
    let text = run_tool(
        "catalog",
        None,
        &env.programs.catalog.display().to_string(),
        &[
            "--services".to_owned(),
            services.to_string(),
            "--rounds".to_owned(),
            rounds.to_string(),
            "--windows".to_owned(),
            "256".to_owned(),
            "--elsinore".to_owned(),
            env.programs.elsinore.display().to_string(),
            "--log".to_owned(),
            "warn".to_owned(),
        ],
        log_dir.join(format!("catalog-{services}.log")),
        Duration::from_secs(1800),
    )?;
    // The medians table row: | 256 | sync ms | transfer ms | messages |
    // owner CPU | consumer CPU | owner peak | owner RSS | consumer peak | consumer RSS |
    let row = text
        .lines()
        .find(|l| l.starts_with("| 256 |"))
        .ok_or_else(|| anyhow!("no '| 256 |' row in the catalog output:\n{text}"))?;
    let cells: Vec<f64> = row
        .split('|')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(f64::NAN)
        })
        .collect();
    ensure!(cells.len() >= 10, "unexpected catalog row {row:?}");
    Ok(vec![
        (format!("catalog{services}.sync"), cells[1]),
        (format!("catalog{services}.consumer_hwm"), cells[8]),
        (format!("catalog{services}.owner_hwm"), cells[6]),
    ])
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk() {
        let text = "Running 10s test @ http://127.0.0.1:1/\n  1 threads and 64 connections\n\
  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     1.20ms  300.00us   5.00ms   90.00%\n\
  Latency Distribution\n     50%  588.00us\n     75%    1.00ms\n     90%    1.50ms\n     99%    2.10ms\n\
  123456 requests in 10.00s, 20.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n\
  Non-2xx or 3xx responses: 4\nRequests/sec:  12345.60\nTransfer/sec:      2.00MB\n";
        let w = parse_wrk(text).unwrap();
        assert_eq!(w.requests, 123456.0);
        assert!((w.rps - 12345.6).abs() < 1e-9);
        assert!((w.p50_ms - 0.588).abs() < 1e-9);
        assert!((w.p99_ms - 2.1).abs() < 1e-9);
        assert_eq!(w.errors, 7.0);
    }

    #[test]
    fn parses_h2load() {
        let text = "finished in 10.00s, 54321.00 req/s, 2.00MB/s\n\
requests: 543210 total, 543210 started, 543210 done, 543200 succeeded, 10 failed, 0 errored, 0 timeout\n";
        let h = parse_h2load(text).unwrap();
        assert!((h.rps - 54320.0).abs() < 1e-6);
        assert_eq!(h.succeeded, 543200.0);
        assert_eq!(h.failed, 10.0);
    }
}
