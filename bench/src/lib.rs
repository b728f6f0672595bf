//! What the benchmark programs (`catalog`, `dataplane`) share: readers of
//! `/proc` and of the host (CPU time, memory, clock ticks, CPU model, load
//! average), a small HTTP/1.1 GET for admin endpoints, loopback ports,
//! certificate minting through `elsinore certs init`, medians and log tails.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};

/// CPU time (user + system, all threads) a process has used so far, in ms.
pub fn cpu_ms(pid: u32, ticks_per_sec: f64) -> Result<f64> {
    let (user, system) = cpu_split_ms(pid, ticks_per_sec)?;
    Ok(user + system)
}

/// CPU time a process has used so far in user space and in the kernel (all
/// threads), in ms.
pub fn cpu_split_ms(pid: u32, ticks_per_sec: f64) -> Result<(f64, f64)> {
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
            .map(|t| t * 1000.0 / ticks_per_sec)
            .ok_or_else(|| anyhow!("{path}: field {} missing or not a number", i + 3))
    };
    Ok((tick(11)?, tick(12)?))
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

/// The CPU model from `/proc/cpuinfo`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The last `lines` lines of a log file (empty if it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A loopback port that was free a moment ago (bound to port 0, then
/// released) and that this process has not handed out before: the kernel
/// may give the same released port to two binds in a row, and a gateway
/// then (rightly) refuses a config with two listeners on one port.
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    for _ in 0..1000 {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    Err(anyhow!(
        "no loopback port that was not handed out already, in 1,000 binds"
    ))
}

/// One `GET` with `Connection: close`: the status and the body. A chunked
/// body is refused rather than returned with its framing in it.
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
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Err(std::io::Error::other(format!(
            "chunked response from {addr}{path} not supported"
        )));
    }
    Ok((status, body.to_owned()))
}

/// A CA and gateway certificate for `<mesh>.bench` in `dir/<mesh>-certs`,
/// by `elsinore certs init`, with an extra DNS SAN when given.
pub fn mint_certs(elsinore: &Path, dir: &Path, mesh: &str, dns: Option<&str>) -> Result<PathBuf> {
    let out = dir.join(format!("{mesh}-certs"));
    let mut cmd = Command::new(elsinore);
    cmd.args(["certs", "init", "--trust-domain"])
        .arg(format!("{mesh}.bench"))
        .arg("--out")
        .arg(&out)
        .args(["--ip", "127.0.0.1"]);
    if let Some(dns) = dns {
        cmd.arg("--dns").arg(dns);
    }
    let output = cmd
        .output()
        .with_context(|| format!("run {} certs init", elsinore.display()))?;
    ensure!(
        output.status.success(),
        "elsinore certs init for {mesh} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    for file in ["ca.pem", "gateway.pem", "gateway.key"] {
        ensure!(
            out.join(file).is_file(),
            "certs init for {mesh} did not write {file}"
        );
    }
    Ok(out)
}

/// The median of the finite values (NaN when there are none).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.retain(|x| x.is_finite());
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_never_handed_out_twice() {
        // 2,000 binds to port 0 draw from ~28,000 ephemeral ports: without
        // the memory of what was handed out, a repeat is all but certain.
        let ports: Vec<u16> = (0..2000).map_while(|_| free_port().ok()).collect();
        assert_eq!(ports.len(), 2000);
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
    }

    #[test]
    fn median_skips_what_is_not_a_number() {
        assert!(median(vec![]).is_nan());
        assert!(median(vec![f64::NAN]).is_nan());
        assert_eq!(median(vec![3.0, f64::NAN, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn cpu_time_of_this_process_is_read() {
        let ms = cpu_ms(std::process::id(), clock_ticks());
        assert!(ms.is_ok_and(|ms| ms >= 0.0));
        assert!(cpu_ms(u32::MAX, 100.0).is_err());
    }

    #[test]
    fn time_spent_in_syscalls_is_read_as_kernel_time() -> Result<()> {
        let (pid, ticks) = (std::process::id(), clock_ticks());
        let (user0, system0) = cpu_split_ms(pid, ticks)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let (mut user, mut system) = (user0, system0);
        // Opening and reading a /proc file is almost all kernel work.
        while system - system0 < 100.0 && std::time::Instant::now() < deadline {
            for _ in 0..200 {
                let _ = std::fs::read_to_string("/proc/self/stat");
            }
            (user, system) = cpu_split_ms(pid, ticks)?;
        }
        assert!(
            system - system0 >= 100.0 && system - system0 > user - user0,
            "kernel {:.0} ms, user {:.0} ms",
            system - system0,
            user - user0
        );
        Ok(())
    }
}
