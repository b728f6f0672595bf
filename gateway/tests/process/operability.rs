//! What a platform team expects of the `elsinore` binary, run as a user
//! runs it: a version naming the commit, shell completions that a shell
//! accepts, the `/config` admin endpoint (effective config, no key
//! material), and a reload that changes a key needing a restart is logged
//! naming that key, never ignored silently.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::harness::{BIN, Guard, certs_init, http_get};

fn git_commit() -> Option<String> {
    let out = Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short=12",
            "HEAD",
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[test]
fn version_names_the_commit() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    // The commit the test binary was built from is HEAD (cargo rebuilds
    // when HEAD moves); without git at all it is `unknown`.
    let expected = git_commit().unwrap_or_else(|| "unknown".to_owned());
    assert_eq!(
        text.trim(),
        format!("elsinore {} (commit {expected})", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn bash_accepts_the_completion_script() {
    let out = Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("elsinore.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    // Source it in a real bash and ask bash what completes `elsinore`,
    // then what it offers after `elsinore ` (the subcommands).
    let check = format!(
        r#"source {script} && complete -p elsinore && COMP_WORDS=(elsinore "") && COMP_CWORD=1 && COMP_LINE="elsinore " && COMP_POINT=9 && _elsinore elsinore "" elsinore && printf '%s\n' "${{COMPREPLY[@]}}""#,
        script = script.display()
    );
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &check])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bash refused the script: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("-F _elsinore elsinore"), "{stdout}");
    for sub in [
        "run",
        "check",
        "certs",
        "demo",
        "catalog",
        "resolve",
        "completions",
    ] {
        assert!(
            stdout.lines().any(|l| l == sub),
            "bash does not offer {sub}: {stdout}"
        );
    }
}

#[test]
fn zsh_and_fish_scripts_name_the_subcommands() {
    for (shell, marker) in [
        ("zsh", "#compdef elsinore"),
        ("fish", "complete -c elsinore"),
    ] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(marker), "{shell}: {text}");
        assert!(text.contains("resolve"), "{shell}: {text}");
    }
    let out = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tcsh"));
}

fn config_text(idle_timeout: &str, export_port: u16) -> String {
    format!(
        r#"
mesh: {{ name: mesh-a, trustDomain: mesh-a.test }}
identity: {{ certificate: a/gateway.pem, privateKey: a/gateway.key }}
listeners: {{ federation: "127.0.0.1:0", admin: "127.0.0.1:0", ingress: off, egress: off, dns: off }}
advertise: {{ address: 127.0.0.1, port: 15443 }}
exports:
  - name: reviews
    protocol: HTTP
    port: {export_port}
    backends: ["127.0.0.1:9080"]
    peers: [mesh-b]
peers:
  - name: mesh-b
    trustDomain: mesh-b.test
    trustBundle: b/ca.pem
proxy: {{ idleTimeout: {idle_timeout} }}
"#
    )
}

/// Waits for a stderr line containing `needle`, up to `timeout`.
fn wait_line(rx: &mpsc::Receiver<String>, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(_) => panic!("no log line with {needle:?} within {timeout:?}"),
        }
    }
}

#[test]
fn reload_applies_exports_and_names_each_key_that_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    certs_init(&dir.path().join("a"), "mesh-a.test");
    certs_init(&dir.path().join("b"), "mesh-b.test");
    let config = dir.path().join("mesh-a.yaml");
    std::fs::write(&config, config_text("5m", 9080)).unwrap();
    let child = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("ELSINORE_LOG", "info")
        .env("ELSINORE_LOG_FORMAT", "text")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = Guard(child);
    let stderr = guard.0.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // Strip ANSI colour codes, if any.
            let plain: String = strip_ansi(&line);
            if tx.send(plain).is_err() {
                break;
            }
        }
    });
    let started = wait_line(&rx, "gateway started", Duration::from_secs(30));
    let admin: SocketAddr = started
        .split_whitespace()
        .find_map(|w| w.strip_prefix("admin="))
        .unwrap_or_else(|| panic!("no admin address in {started:?}"))
        .parse()
        .unwrap();

    // Before the reload: the effective config, with defaults filled in,
    // key named by path and no key material.
    let (status, body) = http_get(admin, "/config").unwrap();
    assert_eq!(status, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["config"]["proxy"]["idleTimeout"], "5m");
    assert_eq!(doc["config"]["proxy"]["connectTimeout"], "5s");
    assert_eq!(doc["config"]["exports"][0]["port"], 9080);
    assert_eq!(doc["config"]["listeners"]["egress"], "off");
    assert!(
        doc["config"]["identity"]["privateKey"]
            .as_str()
            .unwrap()
            .ends_with("a/gateway.key"),
        "{body}"
    );
    assert_eq!(doc["pendingRestart"], serde_json::json!([]));
    let key_pem = std::fs::read_to_string(dir.path().join("a/gateway.key")).unwrap();
    let key_body = key_pem.lines().nth(1).unwrap();
    assert!(!body.contains("PRIVATE KEY") && !body.contains(key_body));
    assert_eq!(doc["commit"], git_commit().unwrap_or("unknown".into()));

    // A reload that changes both a live key and one needing a restart.
    std::fs::write(&config, config_text("7m", 9090)).unwrap();
    let warning = wait_line(&rx, "need a restart", Duration::from_secs(30));
    assert!(warning.contains("proxy.idleTimeout"), "{warning}");
    assert!(!warning.contains("exports"), "{warning}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let doc = loop {
        let (_, body) = http_get(admin, "/config").unwrap();
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        if doc["config"]["exports"][0]["port"] == 9090 {
            break doc;
        }
        assert!(Instant::now() < deadline, "exports not reloaded: {body}");
        std::thread::sleep(Duration::from_millis(50));
    };
    // The running value stays until a restart, and /config says so.
    assert_eq!(doc["config"]["proxy"]["idleTimeout"], "5m");
    assert_eq!(
        doc["pendingRestart"],
        serde_json::json!(["proxy.idleTimeout"])
    );
    let (_, catalog) = http_get(admin, "/catalog").unwrap();
    assert!(catalog.contains("9090"), "{catalog}");
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `elsinore resolve` against a DNS server played by this test over real
/// UDP: an NXDOMAIN answer and a malformed name are clear errors naming
/// the name, with exit status 1 (the success path is the demo test's).
#[test]
fn resolve_reports_nxdomain_and_bad_names() {
    use hickory_proto::op::{Message, MessageType, ResponseCode};
    let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let addr = server.local_addr().unwrap();
    let answering = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        let (n, from) = server.recv_from(&mut buf).unwrap();
        let query = Message::from_vec(&buf[..n]).unwrap();
        let mut reply = query.clone();
        reply.metadata.message_type = MessageType::Response;
        reply.metadata.response_code = ResponseCode::NXDomain;
        server.send_to(&reply.to_vec().unwrap(), from).unwrap();
        query.queries[0]
            .name()
            .to_string()
            .trim_end_matches('.')
            .to_owned()
    });
    let out = Command::new(BIN)
        .args(["resolve", "nosuch.mesh-a.global", "--dns"])
        .arg(addr.to_string())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains("nosuch.mesh-a.global") && stderr.contains("Non-Existent Domain"),
        "{stderr}"
    );
    assert_eq!(answering.join().unwrap(), "nosuch.mesh-a.global");

    let out = Command::new(BIN)
        .args(["resolve", "a..b", "--dns", "127.0.0.1:9"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("\"a..b\" is not a DNS name"), "{stderr}");
}
