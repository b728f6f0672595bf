//! Processes the benchmark starts and what it reads about them: a guard that
//! kills its child by pid when dropped, a registry of live pids emptied by a
//! signal handler (Ctrl-C, SIGTERM, SIGHUP) so nothing outlives the run,
//! `/proc` readers (CPU time, RSS, peak RSS), loopback port allocation and
//! readiness waits.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Pids of every child still running; the signal handler kills these.
static LIVE: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn live() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    // A poisoned lock only means another thread panicked mid-insert; the set
    // itself is still a valid set of pids.
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// On SIGINT, SIGTERM or SIGHUP: SIGKILL every registered child by its pid,
/// then exit. Without this, a benchmark stopped from outside would leave
/// gateways and backends bound to their ports.
pub fn install_signal_cleanup() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("build the signal runtime")?;
    // Registered here, before returning, so a signal right after start is caught.
    let (mut int, mut term, mut hup) = runtime
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
                signal(SignalKind::hangup())?,
            ))
        })
        .context("install signal handlers")?;
    std::thread::spawn(move || {
        let name = runtime.block_on(async {
            tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
                _ = hup.recv() => "SIGHUP",
            }
        });
        let pids: Vec<u32> = live().iter().copied().collect();
        eprintln!("{name}: stopping {} child process(es) {pids:?}", pids.len());
        for pid in pids {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        std::process::exit(130);
    });
    Ok(())
}

/// A child process, killed (SIGKILL to its own pid) and reaped when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program args…` pinned to `cpus` (a `taskset -c` list; `taskset`
    /// execs, so the pid is the program's own), stdout and stderr to `log`.
    pub fn spawn(
        name: impl Into<String>,
        cpus: Option<&str>,
        program: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Result<Proc> {
        let name = name.into();
        let file =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut command = match cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpus]).arg(program);
                c
            }
            None => Command::new(program),
        };
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        // Register under the lock so a signal arriving between spawn and
        // insert cannot miss this child.
        let mut registry = live();
        let child = command
            .spawn()
            .with_context(|| format!("spawn {name}: {} {}", program.display(), args.join(" ")))?;
        registry.insert(child.id());
        drop(registry);
        Ok(Proc { name, child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has exited, quoting the end of its log.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited early ({status}); end of its log ({}):\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 25)
            );
        }
        Ok(())
    }

    /// Waits for the process to end by itself, killing it after `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{} did not finish within {timeout:?}; killed", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.child.id();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Only after the reap: until then the pid is ours and still worth killing.
        live().remove(&pid);
    }
}

/// Runs a load tool to completion (pinned, output to `log`) and returns its
/// output; the tool is registered like any child, so Ctrl-C stops it too.
pub fn run_tool(
    name: &str,
    cpus: Option<&str>,
    program: &str,
    args: &[String],
    log: PathBuf,
    timeout: Duration,
) -> Result<String> {
    let mut proc = Proc::spawn(name, cpus, Path::new(program), args, log.clone())?;
    let status = proc.wait_timeout(timeout)?;
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    if !status.success() {
        bail!(
            "{name} failed ({status}): {program} {}\n{}",
            args.join(" "),
            tail(&log, 25)
        );
    }
    Ok(output)
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A loopback port that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Waits until `addr` accepts TCP connections, checking `procs` stay alive.
pub fn wait_port(addr: SocketAddr, procs: &mut [&mut Proc], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        for p in procs.iter_mut() {
            p.check_alive()?;
        }
        if Instant::now() >= deadline {
            bail!("nothing accepted connections on {addr} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One plain HTTP/1.1 GET with `Connection: close`: (status, body). Enough
/// for admin endpoints and for checking a path end to end.
pub fn http_get(addr: SocketAddr, host: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP status line in {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// CPU time (user + system, all threads) a process has used so far, in ms.
pub fn cpu_ms(pid: u32, ticks_per_sec: f64) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // The command name sits in parentheses and may hold spaces; utime and
    // stime are fields 14 and 15 of the whole line.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("{path}: no ')' in {stat:?}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("{path}: field {} missing or not a number", i + 3))
    };
    Ok((tick(11)? + tick(12)?) * 1000.0 / ticks_per_sec)
}

/// A `/proc/<pid>/status` memory field (`VmRSS`, `VmHWM`) in KiB.
pub fn status_kib(pid: u32, field: &str) -> Result<f64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .ok_or_else(|| anyhow!("{path} has no {field} line"))?;
    line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("{path}: {line:?}"))
}

/// Clock ticks per second for `/proc/<pid>/stat` (almost always 100).
pub fn clock_ticks() -> f64 {
    command_line("getconf", &["CLK_TCK"])
        .parse()
        .unwrap_or(100.0)
}

/// The first line of a command's stdout (or stderr, where tools print their
/// version), or a note that it could not be run.
pub fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let out = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            let text = if out.is_empty() {
                String::from_utf8_lossy(&o.stderr).trim().to_owned()
            } else {
                out
            };
            text.lines().next().unwrap_or("").trim().to_owned()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("({program} unavailable)"))
}

/// The 1/5/15-minute load averages: other work on a shared machine skews every figure.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}
