//! The `elsinore` binary as a user runs it: `certs init`, `check` (errors
//! named by YAML path, exit status) and `demo` (the README's first command).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::harness::{BIN, Guard, certs_init};

fn write_config(dir: &Path, export_peer: &str) -> std::path::PathBuf {
    let path = dir.join("mesh-a.yaml");
    std::fs::write(
        &path,
        format!(
            r#"
mesh: {{ name: mesh-a, trustDomain: mesh-a.test }}
identity: {{ certificate: a/gateway.pem, privateKey: a/gateway.key }}
listeners: {{ federation: "127.0.0.1:0", admin: "127.0.0.1:0", ingress: "127.0.0.1:0", egress: "127.0.0.1:0", dns: "127.0.0.1:0" }}
advertise: {{ address: 127.0.0.1, port: 15443 }}
exports:
  - name: reviews
    protocol: HTTP
    backends: ["127.0.0.1:9080"]
    peers: [{export_peer}]
peers:
  - name: mesh-b
    trustDomain: mesh-b.test
    trustBundle: b/ca.pem
"#
        ),
    )
    .unwrap();
    path
}

#[test]
fn certs_init_then_check_accepts_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    certs_init(&dir.path().join("a"), "mesh-a.test");
    certs_init(&dir.path().join("b"), "mesh-b.test");
    let config = write_config(dir.path(), "mesh-b");
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("OK (mesh mesh-a, 1 export(s), 1 peer(s))"),
        "{stdout}"
    );
}

#[test]
fn certs_init_refuses_to_overwrite_a_ca_key() {
    let dir = tempfile::tempdir().unwrap();
    certs_init(dir.path(), "mesh-a.test");
    let out = Command::new(BIN)
        .args(["certs", "init", "--trust-domain", "mesh-a.test", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ca.key"));
}

#[test]
fn check_names_each_error_by_yaml_path_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    certs_init(&dir.path().join("a"), "mesh-a.test");
    // No b/ca.pem on disk and an export to a peer that does not exist.
    let config = write_config(dir.path(), "mesh-z");
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check accepted a bad config");
    assert!(stderr.contains("exports[0].peers[0]"), "{stderr}");
    assert!(stderr.contains("mesh-z"), "{stderr}");
}

#[test]
fn check_also_verifies_the_certificates_it_names() {
    let dir = tempfile::tempdir().unwrap();
    certs_init(&dir.path().join("a"), "mesh-a.test");
    certs_init(&dir.path().join("b"), "mesh-b.test");
    let config = write_config(dir.path(), "mesh-b");
    std::fs::write(dir.path().join("b/ca.pem"), "not a certificate\n").unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("peers[0].trustBundle"), "{stderr}");
}

/// Runs the demo's printed command as a user would, in `sh`, with a bound:
/// curl gets `--max-time`, and the whole command is killed (by its pid)
/// if it outlives [`COMMAND_TIMEOUT`]. The tools it needs must be there:
/// a missing one fails the test saying how to install it.
fn run_bounded(command: &str) -> std::process::Output {
    let curl = which("curl").unwrap_or_else(|| {
        panic!(
            "the demo's command needs `curl`, which is not on PATH \
             (Debian: apt-get install curl; .ci/run installs it)"
        )
    });
    let only_curl = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(curl, only_curl.path().join("curl")).unwrap();
    let bounded = command.replacen(
        "curl ",
        &format!("curl --max-time {} ", CURL_MAX_TIME.as_secs()),
        1,
    );
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(&bounded)
        .env("PATH", only_curl.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("`{bounded}` did not finish within {COMMAND_TIMEOUT:?}");
        }
    }
}

/// curl's own limit on the demo request.
const CURL_MAX_TIME: Duration = Duration::from_secs(10);
/// The limit on the whole printed command (a DNS query, then curl).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn demo_federates_two_meshes_and_prints_the_imports() {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(BIN)
        .arg("demo")
        .arg("--dir")
        .arg(dir.path())
        .env("ELSINORE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = Guard(child);
    let stdout = guard.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !seen.iter().any(|l: &String| l.starts_with("Inspect:")) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("demo did not finish starting; output so far: {seen:#?}"),
        }
    }
    let text = seen.join("\n");
    assert!(text.contains("imported reviews.mesh-a.global"), "{text}");
    assert!(text.contains("imported ratings.mesh-a.global"), "{text}");
    assert!(text.contains("imported details.mesh-b.global"), "{text}");

    // The printed command is the README's second step: it must work as printed.
    let command = seen
        .iter()
        .find_map(|l| {
            l.trim_start()
                .starts_with("curl ")
                .then(|| l.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("demo printed no curl command: {text}"));
    // A fresh machine has curl but not dig: run the command with a PATH
    // that holds curl and nothing else.
    assert!(
        command.contains(" resolve reviews.mesh-a.global --dns "),
        "{command}"
    );
    assert!(!command.contains("dig"), "{command}");
    let out = run_bounded(&command);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && body.contains("hello from reviews in mesh-a"),
        "`{command}` gave {:?}: {body} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        body.contains("spiffe://mesh-b.demo/ns/elsinore/sa/gateway"),
        "{body}"
    );
}

/// The first `name` on this process's PATH.
fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}
