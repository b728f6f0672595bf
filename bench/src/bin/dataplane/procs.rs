//! Processes the benchmark starts and what it reads about them: a guard that
//! kills its child by pid when dropped, a registry of live pids emptied by a
//! signal handler (Ctrl-C, SIGTERM, SIGHUP) so nothing outlives the run,
//! `/proc` readers (CPU time, RSS, peak RSS), loopback port allocation and
//! readiness waits.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use elsinore_bench::tail;

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
