//! `elsinore catalog --admin ADDR` against a running process, and against
//! addresses where no gateway answers; `elsinore check` and `elsinore run`
//! on a bad config, and `run` on an address already taken.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::{Export, GatewaySpec, Net, Proc, WAIT, get_json, run_to_end, spawn_backend};

/// How long a failing command may take: its own 10 s admin timeout plus
/// room for a loaded machine.
const COMMAND_BOUND: Duration = Duration::from_secs(30);

fn mesh_a(net: &Net, dir: &std::path::Path) -> (GatewaySpec, std::path::PathBuf) {
    let backend = spawn_backend(net.ip(30), "reviews", Arc::new(|| {}));
    let b = GatewaySpec::new(net, 20, "mesh-b", dir);
    let mut a = GatewaySpec::new(net, 10, "mesh-a", dir);
    a.exports = vec![Export::new("reviews", backend, &["mesh-b"])];
    a.peers = vec![b.as_peer(false)];
    let config = a.config_path(dir);
    a.write(&config);
    (a, config)
}

#[test]
fn catalog_prints_the_catalog_of_a_running_gateway() {
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let (a, config) = mesh_a(&net, dir.path());
    let mut p = Proc::run("mesh-a", &config, &[]);
    p.wait_ready(a.admin);
    let admin = a.admin.to_string();
    let served = get_json(a.admin, "/catalog").unwrap();
    // By flag and by variable.
    for (args, env) in [
        (vec!["catalog", "--admin", admin.as_str()], vec![]),
        (vec!["catalog"], vec![("ELSINORE_ADMIN", admin.as_str())]),
    ] {
        let (status, stdout, stderr) = run_to_end(&args, &env, COMMAND_BOUND);
        assert_eq!(status.map(|s| s.code()), Some(Some(0)), "{stderr}");
        let printed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(printed, served);
        assert_eq!(printed["mesh"], "mesh-a");
        let exports = printed["exports"].as_array().unwrap();
        assert_eq!(exports.len(), 1, "{printed:#}");
        assert_eq!(exports[0]["name"], "reviews");
        assert_eq!(exports[0]["fqdn"], "reviews.mesh-a.global");
        assert_eq!(exports[0]["protocol"], "HTTP");
        assert_eq!(
            exports[0]["backends"],
            serde_json::json!([a.exports[0].backend.to_string()])
        );
        assert_eq!(exports[0]["peers"], serde_json::json!(["mesh-b"]));
        assert_eq!(
            printed["imports"]["mesh-b"]["services"],
            serde_json::json!([])
        );
    }
}

#[test]
fn catalog_as_peer_prints_what_that_peer_sees_and_refuses_an_unknown_peer() {
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let (a, config) = mesh_a(&net, dir.path());
    let mut p = Proc::run("mesh-a", &config, &[]);
    p.wait_ready(a.admin);
    let admin = a.admin.to_string();
    let served = get_json(a.admin, "/catalog?peer=mesh-b").unwrap();
    for (args, env) in [
        (
            vec!["catalog", "--admin", admin.as_str(), "--as-peer", "mesh-b"],
            vec![],
        ),
        (
            vec!["catalog", "--admin", admin.as_str()],
            vec![("ELSINORE_AS_PEER", "mesh-b")],
        ),
    ] {
        let (status, stdout, stderr) = run_to_end(&args, &env, COMMAND_BOUND);
        assert_eq!(status.map(|s| s.code()), Some(Some(0)), "{stderr}");
        let printed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(printed, served);
        assert_eq!(printed["peer"], "mesh-b");
        let receives = printed["receives"].as_array().unwrap();
        assert_eq!(receives.len(), 1, "{printed:#}");
        assert_eq!(receives[0]["fqdn"], "reviews.mesh-a.global");
        assert_eq!(
            receives[0]["instances"][0]["metadata"]["SNI"],
            "reviews.mesh-a.global"
        );
        assert_eq!(printed["held"], serde_json::json!([]));
        assert_eq!(printed["refused"], serde_json::json!([]));
    }
    let (status, _, stderr) = run_to_end(
        &["catalog", "--admin", admin.as_str(), "--as-peer", "mesh-x"],
        &[],
        COMMAND_BOUND,
    );
    assert_ne!(status.map(|s| s.code()), Some(Some(0)));
    assert!(
        stderr.contains("unknown peer \"mesh-x\" (configured peers: mesh-b)"),
        "{stderr}"
    );
    let (status, _, stderr) = run_to_end(
        &["catalog", "--admin", admin.as_str(), "--as-peer", "a&b=c"],
        &[],
        COMMAND_BOUND,
    );
    assert_ne!(status.map(|s| s.code()), Some(Some(0)));
    assert!(stderr.contains("is not a peer name"), "{stderr}");
}

/// Runs `elsinore catalog --admin addr` and requires a non-zero exit within
/// [`COMMAND_BOUND`], nothing on stdout, and every one of `needles` in the
/// error.
fn catalog_fails(addr: &str, needles: &[&str]) {
    let started = Instant::now();
    let (status, stdout, stderr) = run_to_end(&["catalog", "--admin", addr], &[], COMMAND_BOUND);
    let status = status.unwrap_or_else(|| {
        panic!("`elsinore catalog --admin {addr}` still running after {COMMAND_BOUND:?}")
    });
    assert_eq!(status.code(), Some(1), "{addr}: {stderr}");
    assert_eq!(stdout, "", "{addr}");
    for n in needles {
        assert!(stderr.contains(n), "{addr}: {n:?} not in {stderr:?}");
    }
    eprintln!("{addr}: failed after {:?}: {stderr}", started.elapsed());
}

#[test]
fn catalog_with_a_wrong_admin_address_fails_clearly_and_does_not_hang() {
    let net = Net::new();
    // Nothing listening.
    let closed = net.port(40).to_string();
    catalog_fails(
        &closed,
        &["error: connect to admin listener", &closed, "refused"],
    );
    // Not an address.
    catalog_fails("admin.invalid-name", &["admin.invalid-name"]);
    // Something that accepts and never answers.
    let silent = TcpListener::bind((net.ip(41), 0)).unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    catalog_fails(
        &silent_addr,
        &[&silent_addr, "did not answer", "within 10s"],
    );
    drop(silent);
    // An HTTP server that is not a gateway's admin listener.
    let backend = spawn_backend(net.ip(42), "reviews", Arc::new(|| {})).to_string();
    catalog_fails(
        &backend,
        &[
            &backend,
            "not an Elsinore admin listener",
            "hello from reviews",
        ],
    );
}

#[test]
fn check_and_run_by_elsinore_config_report_each_error_as_path_and_message() {
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let (mut a, config) = mesh_a(&net, dir.path());
    let path = config.to_str().unwrap();

    let (status, stdout, stderr) =
        run_to_end(&["check"], &[("ELSINORE_CONFIG", path)], COMMAND_BOUND);
    assert_eq!(status.map(|s| s.code()), Some(Some(0)), "{stderr}");
    assert_eq!(
        stdout,
        format!("{path}: OK (mesh mesh-a, 1 export(s), 1 peer(s))")
    );

    // Two problems, both reported, each as `<yaml path>: <message>`.
    a.exports[0].peers = vec!["mesh-z".to_owned()];
    let yaml = a.yaml().replace("name: mesh-a,", "name: Mesh-A,");
    std::fs::write(&config, yaml).unwrap();
    let (status, stdout, stderr) =
        run_to_end(&["check"], &[("ELSINORE_CONFIG", path)], COMMAND_BOUND);
    assert_eq!(status.map(|s| s.code()), Some(Some(1)), "{stderr}");
    assert_eq!(stdout, "");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [
            "error: mesh.name: \"Mesh-A\" is not a DNS label (lower-case letters, digits and '-', 1 to 63 long, not starting or ending with '-')",
            "error: exports[0].peers[0]: unknown peer \"mesh-z\" (configured peers: mesh-b)",
            &format!("{path}: 2 error(s)"),
        ],
        "{stderr}"
    );

    // `run` refuses the same file at once, naming the same problems.
    let (status, _, stderr) = run_to_end(&["run"], &[("ELSINORE_CONFIG", path)], COMMAND_BOUND);
    assert_eq!(status.map(|s| s.code()), Some(Some(1)), "{stderr}");
    assert!(
        stderr.starts_with(&format!("{path}: invalid config:")),
        "{stderr}"
    );
    assert!(
        stderr.contains("exports[0].peers[0]: unknown peer \"mesh-z\""),
        "{stderr}"
    );
}

#[test]
fn run_fails_at_once_when_a_configured_address_is_taken() {
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let (a, config) = mesh_a(&net, dir.path());
    let _taken = TcpListener::bind(a.admin).unwrap();
    let (status, _, stderr) = run_to_end(&["run", "--config", config.to_str().unwrap()], &[], WAIT);
    assert_eq!(status.map(|s| s.code()), Some(Some(1)), "{stderr}");
    assert!(
        stderr.contains(&format!("error: bind admin listener on {}", a.admin)),
        "{stderr}"
    );
    assert!(stderr.contains("in use"), "{stderr}");
}
