//! What the process tests share: a loopback address block of their own,
//! certificates minted by the binary, config files, and a guard around a
//! running `elsinore` that captures its log and kills it however the test
//! ends. Every wait here is bounded and polls a condition.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_elsinore");

/// How long a gateway gets to answer `/ready`, a reload to show, a peer to
/// sync: generous, since two cores run seven engineers' builds and tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// How long a gateway may take to exit once signalled (SIGTERM, SIGINT)
/// with at most one short request in flight. The one place to change if
/// shutdown learns a longer drain.
pub const EXIT_BOUND: Duration = Duration::from_secs(20);

const POLL: Duration = Duration::from_millis(50);

/// Re-checks `check` every 50 ms until it returns `Ok`, for at most
/// `timeout`; panics naming `desc` and the last observation otherwise.
pub fn wait_for<T>(
    desc: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {desc}; last observation: {last}")
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// A /24 of loopback addresses that only this test uses (127.A.B.0/24 with
/// A in 200..=249, B random), so fixed ports reserved on them cannot be
/// taken by another test between reservation and the gateway's bind.
pub struct Net {
    prefix: [u8; 3],
    /// Ports handed out so far: a probe port is released at once, so the
    /// kernel may offer it again to the next probe (two listeners of one
    /// gateway on one port: the config is refused).
    given: Mutex<std::collections::HashSet<SocketAddr>>,
}

impl Net {
    pub fn new() -> Net {
        loop {
            let prefix = [127, rand::random_range(200..=249u8), rand::random::<u8>()];
            // A probe bind: the block is usable (and, very likely, unused).
            let probe = Ipv4Addr::new(prefix[0], prefix[1], prefix[2], 1);
            if TcpListener::bind((probe, 0)).is_ok() {
                return Net {
                    prefix,
                    given: Mutex::default(),
                };
            }
        }
    }

    /// Host `n` of the block.
    pub fn ip(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], n)
    }

    /// A port free on host `n` over both TCP and UDP (so it also suits the
    /// DNS listener), reserved by a probe bind that is released at once.
    pub fn port(&self, n: u8) -> SocketAddr {
        let ip = self.ip(n);
        loop {
            let tcp = TcpListener::bind((ip, 0)).expect("bind a probe on the test's block");
            let addr = tcp.local_addr().unwrap();
            if UdpSocket::bind(addr).is_ok() && self.given.lock().unwrap().insert(addr) {
                return addr;
            }
        }
    }

    /// A `/26` of the block for a gateway's VIPs (hosts 128.. or 192..).
    pub fn vip_range(&self, quarter: u8) -> String {
        let base = 128 + 64 * (quarter % 2);
        format!("{}/26", self.ip(base))
    }
}

/// Mints a CA and gateway certificate for `trust_domain` into `dir` with
/// `elsinore certs init`.
pub fn certs_init(dir: &Path, trust_domain: &str) {
    let out = Command::new(BIN)
        .args(["certs", "init", "--trust-domain", trust_domain, "--out"])
        .arg(dir)
        .args(["--ip", "127.0.0.1", "--dns", "localhost"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "certs init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["ca.pem", "ca.key", "gateway.pem", "gateway.key"] {
        assert!(dir.join(f).is_file(), "{f} not written");
    }
}

/// Kills a child started without [`Proc`] by its own pid when the test
/// ends, however it ends.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One export of a [`GatewaySpec`].
#[derive(Clone)]
pub struct Export {
    pub name: String,
    pub backend: SocketAddr,
    pub peers: Vec<String>,
}

impl Export {
    pub fn new(name: &str, backend: SocketAddr, peers: &[&str]) -> Export {
        Export {
            name: name.to_owned(),
            backend,
            peers: peers.iter().map(|p| (*p).to_owned()).collect(),
        }
    }
}

/// A peer of a [`GatewaySpec`].
#[derive(Clone)]
pub struct Peer {
    pub name: String,
    pub trust_domain: String,
    pub bundle: PathBuf,
    pub federation: Option<SocketAddr>,
}

/// One gateway's config: the mesh, its certificates (minted on creation),
/// five listeners on ports reserved on one host of the test's block, its
/// exports and peers. `yaml()` renders the file `elsinore run` reads.
#[derive(Clone)]
pub struct GatewaySpec {
    pub name: String,
    pub trust_domain: String,
    pub certs: PathBuf,
    pub federation: SocketAddr,
    pub admin: SocketAddr,
    pub ingress: SocketAddr,
    pub egress: SocketAddr,
    pub dns: SocketAddr,
    pub vip_range: String,
    pub exports: Vec<Export>,
    pub peers: Vec<Peer>,
    /// Extra top-level YAML appended verbatim (e.g. a `federation:` block).
    pub extra: String,
}

impl GatewaySpec {
    /// Mesh `name` (trust domain `<name>.test`) on host `host` of `net`,
    /// with certificates under `dir/<name>/certs`.
    pub fn new(net: &Net, host: u8, name: &str, dir: &Path) -> GatewaySpec {
        let trust_domain = format!("{name}.test");
        let certs = dir.join(name).join("certs");
        certs_init(&certs, &trust_domain);
        GatewaySpec {
            name: name.to_owned(),
            trust_domain,
            certs,
            federation: net.port(host),
            admin: net.port(host),
            ingress: net.port(host),
            egress: net.port(host),
            dns: net.port(host),
            vip_range: net.vip_range(host / 10),
            exports: Vec::new(),
            peers: Vec::new(),
            extra: String::new(),
        }
    }

    /// This gateway as a peer of another: its trust domain, its CA, and,
    /// if `dial`, its federation listener.
    pub fn as_peer(&self, dial: bool) -> Peer {
        Peer {
            name: self.name.clone(),
            trust_domain: self.trust_domain.clone(),
            bundle: self.certs.join("ca.pem"),
            federation: dial.then_some(self.federation),
        }
    }

    pub fn yaml(&self) -> String {
        let mut y = String::new();
        let c = |f: &str| self.certs.join(f).display().to_string();
        writeln!(
            y,
            "mesh: {{ name: {}, trustDomain: {} }}",
            self.name, self.trust_domain
        )
        .unwrap();
        writeln!(
            y,
            "identity: {{ certificate: {:?}, privateKey: {:?} }}",
            c("gateway.pem"),
            c("gateway.key")
        )
        .unwrap();
        writeln!(y, "listeners:").unwrap();
        for (key, addr) in [
            ("federation", self.federation),
            ("admin", self.admin),
            ("ingress", self.ingress),
            ("egress", self.egress),
            ("dns", self.dns),
        ] {
            writeln!(y, "  {key}: \"{addr}\"").unwrap();
        }
        writeln!(
            y,
            "advertise: {{ address: {}, port: {} }}",
            self.ingress.ip(),
            self.ingress.port()
        )
        .unwrap();
        writeln!(y, "proxy: {{ vipRange: {} }}", self.vip_range).unwrap();
        if self.exports.is_empty() {
            writeln!(y, "exports: []").unwrap();
        } else {
            writeln!(y, "exports:").unwrap();
        }
        for e in &self.exports {
            writeln!(y, "  - name: {}", e.name).unwrap();
            writeln!(y, "    protocol: HTTP").unwrap();
            writeln!(y, "    backends: [\"{}\"]", e.backend).unwrap();
            writeln!(y, "    peers: [{}]", e.peers.join(", ")).unwrap();
        }
        if self.peers.is_empty() {
            writeln!(y, "peers: []").unwrap();
        } else {
            writeln!(y, "peers:").unwrap();
        }
        for p in &self.peers {
            writeln!(y, "  - name: {}", p.name).unwrap();
            writeln!(y, "    trustDomain: {}", p.trust_domain).unwrap();
            writeln!(y, "    trustBundle: {:?}", p.bundle.display().to_string()).unwrap();
            if let Some(f) = p.federation {
                writeln!(y, "    federation: \"{f}\"").unwrap();
            }
        }
        y.push_str(&self.extra);
        y
    }

    /// `dir/<name>/config/<name>.yaml`, alone in its directory (which the
    /// gateway watches); the directory is created.
    pub fn config_path(&self, dir: &Path) -> PathBuf {
        let config_dir = dir.join(&self.name).join("config");
        std::fs::create_dir_all(&config_dir).unwrap();
        config_dir.join(format!("{}.yaml", self.name))
    }

    /// Writes the config to `path` in place (truncate and write).
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.yaml()).unwrap();
    }

    /// Writes the config beside `path` and renames it over `path`, the way
    /// most editors and config management tools replace a file.
    pub fn replace(&self, path: &Path) {
        let tmp = path.with_extension("yaml.tmp");
        std::fs::write(&tmp, self.yaml()).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
}

/// The child's output so far, shared with the threads that read it.
#[derive(Default)]
struct Log {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

impl Log {
    /// The lines, even after a panic elsewhere poisoned the lock.
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running `elsinore` child. Dropping it kills the process (SIGKILL) and
/// reaps it, then prints what it logged (nextest shows it for failing tests).
pub struct Proc {
    pub name: String,
    child: Child,
    log: Arc<Log>,
    readers: Vec<std::thread::JoinHandle<()>>,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Starts `elsinore` with `args` and `env` (on top of the test's own
    /// environment, minus any `ELSINORE_*` and `RUST_LOG` it inherited).
    pub fn spawn(name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars() {
            if k.starts_with("ELSINORE_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let log = Arc::new(Log::default());
        let mut readers = Vec::new();
        let stdout: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let stderr: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        for (stream, tag) in [(stdout, "stdout: "), (stderr, "")] {
            let log = log.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    log.lock().push(format!("{tag}{line}"));
                    log.grew.notify_all();
                }
            }));
        }
        Proc {
            name: name.to_owned(),
            child,
            log,
            readers,
            exited: None,
        }
    }

    /// `elsinore run --config PATH` with extra environment.
    pub fn run(name: &str, config: &Path, env: &[(&str, &str)]) -> Proc {
        Proc::spawn(name, &["run", "--config", config.to_str().unwrap()], env)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How many lines were logged so far: a mark for [`Proc::wait_log_after`].
    pub fn mark(&self) -> usize {
        self.log.lock().len()
    }

    /// Every line logged so far (stderr as is, stdout prefixed `stdout: `).
    pub fn lines(&self) -> Vec<String> {
        self.log.lock().clone()
    }

    /// Waits for a line logged after `mark` that contains every one of
    /// `needles`, and returns it.
    pub fn wait_log_after(&self, mark: usize, needles: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut lines = self.log.lock();
        loop {
            if let Some(l) = lines
                .iter()
                .skip(mark)
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "{}: no log line with {needles:?} within {timeout:?}; lines after mark {mark}:\n{}",
                    self.name,
                    lines
                        .iter()
                        .skip(mark)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            lines = self.log.grew.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Sends `signal` (a `kill -s` name: `HUP`, `TERM`) to the child.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -s {signal} {} failed", self.pid());
    }

    /// Waits at most `timeout` for the child to exit on its own; `None` if
    /// it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.exited = Some(status);
                // The pipes close with the process: take the last lines.
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and requires exit status 0 within [`EXIT_BOUND`] (after
    /// which every log line is in).
    pub fn stop(&mut self) {
        self.signal("TERM");
        let status = self.wait_exit(EXIT_BOUND);
        assert_eq!(
            status.map(|s| s.code()),
            Some(Some(0)),
            "{} did not exit 0 within {EXIT_BOUND:?} of SIGTERM",
            self.name
        );
    }

    /// Waits until `GET /ready` on `admin` answers 200.
    pub fn wait_ready(&mut self, admin: SocketAddr) {
        wait_for(&format!("{} /ready", self.name), WAIT, || {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited with {status} before it was ready:\n{}",
                    self.name,
                    self.lines().join("\n")
                );
            }
            match http_get(admin, "/ready") {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        eprintln!(
            "----- {} (pid {}) log -----\n{}\n----- end of {} log -----",
            self.name,
            self.child.id(),
            self.lines().join("\n"),
            self.name
        );
    }
}

/// Runs `elsinore` with `args` to completion, killing it after `timeout`.
/// Returns the exit status (`None` if it had to be killed), stdout, stderr.
pub fn run_to_end(
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> (Option<ExitStatus>, String, String) {
    let mut p = Proc::spawn("elsinore", args, env);
    let status = p.wait_exit(timeout);
    let lines = p.lines();
    let stdout: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("stdout: "))
        .collect();
    let stderr: Vec<&str> = lines
        .iter()
        .filter(|l| !l.starts_with("stdout: "))
        .map(String::as_str)
        .collect();
    (status, stdout.join("\n"), stderr.join("\n"))
}

/// One plain HTTP/1.1 GET with `Connection: close`, bounded in every step.
/// Returns the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    http_get_host(addr, &addr.to_string(), path)
}

/// [`http_get`] with the given `Host`.
pub fn http_get_host(addr: SocketAddr, host: &str, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    parse_response(&raw)
}

/// Parses a whole HTTP/1.1 response with a `content-length` body (or one
/// that ends at EOF). Returns the status and body.
pub fn parse_response(raw: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no complete response head in {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// `GET path` on `admin` as JSON (status 200 required).
pub fn get_json(admin: SocketAddr, path: &str) -> Result<serde_json::Value, String> {
    match http_get(admin, path)? {
        (200, body) => serde_json::from_str(&body).map_err(|e| format!("{e}: {body}")),
        (status, body) => Err(format!("{status}: {body}")),
    }
}

/// The export names in a `/catalog` document, name → fqdn.
pub fn export_names(catalog: &serde_json::Value) -> BTreeMap<String, String> {
    catalog["exports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or_default().to_owned(),
                e["fqdn"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The names of what `catalog` imports from `peer` (registered FQDNs).
pub fn imported_from(catalog: &serde_json::Value, peer: &str) -> Vec<String> {
    catalog["imports"][peer]["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["fqdn"].as_str().map(str::to_owned))
        .collect()
}

/// Whether something accepts TCP connections on `addr` right now.
pub fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

/// A plain HTTP/1.1 backend on `ip` (a port the kernel picks), one thread
/// per connection, keep-alive. Each request runs `before_answer` (which
/// may block to hold the request in flight), then gets 200 with the body
/// `hello from NAME (called by X-ELSINORE-PEER-IDENTITY)`.
pub fn spawn_backend(
    ip: Ipv4Addr,
    name: &str,
    before_answer: Arc<dyn Fn() + Send + Sync>,
) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let name = name.to_owned();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let (name, before_answer) = (name.clone(), before_answer.clone());
            std::thread::spawn(move || serve_backend_conn(conn, &name, &*before_answer));
        }
    });
    addr
}

fn serve_backend_conn(conn: TcpStream, name: &str, before_answer: &(dyn Fn() + Send + Sync)) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(120)));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut peer = String::from("nobody");
        let mut length = 0usize;
        let mut line = String::new();
        // Request line and headers.
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                if k == "x-elsinore-peer-identity" {
                    peer = v.trim().to_owned();
                } else if k == "content-length" {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        before_answer();
        let text = format!("hello from {name} (called by {peer})");
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        if conn.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// The A record for `name` from the DNS responder at `server`, over UDP
/// (three tries of 2 s each); `Err` says what came back instead.
pub fn dns_a(server: SocketAddr, name: &str) -> Result<Ipv4Addr, String> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    socket.connect(server).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut query = Message::query();
    query.metadata.id = rand::random();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let packet = query.to_vec().unwrap();
    let mut buf = [0u8; 4096];
    for _ in 0..3 {
        socket.send(&packet).map_err(|e| format!("send: {e}"))?;
        let Ok(n) = socket.recv(&mut buf) else {
            continue;
        };
        let reply = Message::from_vec(&buf[..n]).map_err(|e| format!("decode: {e}"))?;
        return reply
            .answers
            .iter()
            .find_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .ok_or_else(|| format!("no A record: {:?}", reply.metadata.response_code));
    }
    Err(format!("no answer from {server}"))
}
