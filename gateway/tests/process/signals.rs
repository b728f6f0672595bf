//! Stopping the process: SIGTERM (what Kubernetes and systemd send) and
//! SIGINT end `elsinore run` with status 0, promptly, without cutting a
//! request that is in flight, and with every listener closed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use elsinore_certs::{Identity, TrustBundle};

use crate::harness::{
    EXIT_BOUND, Export, GatewaySpec, Net, Proc, WAIT, accepts, parse_response, spawn_backend,
};

/// One HTTP/1.1 request to `fqdn` over mTLS to `ingress`, presenting
/// `client`'s gateway certificate and verifying `server`'s, as a peer
/// gateway would send it. Returns the status and body.
fn request_over_mtls(
    ingress: SocketAddr,
    client: &GatewaySpec,
    server: &GatewaySpec,
    fqdn: &str,
) -> Result<(u16, String), String> {
    let identity = Identity::load(
        &client.certs.join("gateway.pem"),
        &client.certs.join("gateway.key"),
    )
    .unwrap();
    let bundle = TrustBundle::load(
        server.trust_domain.parse().unwrap(),
        &server.certs.join("ca.pem"),
    )
    .unwrap();
    let tls = elsinore_certs::client_config(&identity, &bundle, None, &[b"http/1.1"]).unwrap();
    let name = rustls::pki_types::ServerName::try_from(fqdn.to_owned()).unwrap();
    let conn = rustls::ClientConnection::new(tls, name).unwrap();
    let tcp = TcpStream::connect_timeout(&ingress, Duration::from_secs(2))
        .map_err(|e| format!("connect {ingress}: {e}"))?;
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    tcp.set_write_timeout(Some(WAIT)).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(tls, "GET / HTTP/1.1\r\nHost: {fqdn}\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    // Read the head, then exactly content-length bytes of body.
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tls
            .read(&mut buf)
            .map_err(|e| format!("read after {:?}: {e}", String::from_utf8_lossy(&raw)))?;
        if n == 0 {
            return Err(format!(
                "connection closed after {:?}",
                String::from_utf8_lossy(&raw)
            ));
        }
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        if let Some(head_end) = text.find("\r\n\r\n") {
            let length: usize = text[..head_end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| format!("no content-length in {text:?}"))?;
            if raw.len() >= head_end + 4 + length {
                return parse_response(&raw);
            }
        }
    }
}

#[test]
fn sigterm_exits_zero_promptly_after_finishing_a_request_in_flight() {
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    // A backend that holds each request until the test releases it.
    let (arrived_tx, arrived_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let (arrived_tx, release_rx) = (Mutex::new(arrived_tx), Mutex::new(release_rx));
    let backend = spawn_backend(
        net.ip(30),
        "reviews",
        Arc::new(move || {
            arrived_tx.lock().unwrap().send(()).unwrap();
            release_rx.lock().unwrap().recv_timeout(WAIT).unwrap();
        }),
    );
    let b = GatewaySpec::new(&net, 20, "mesh-b", dir.path());
    let mut a = GatewaySpec::new(&net, 10, "mesh-a", dir.path());
    a.exports = vec![Export::new("reviews", backend, &["mesh-b"])];
    a.peers = vec![b.as_peer(false)];
    let config = a.config_path(dir.path());
    a.write(&config);
    let mut p = Proc::run("mesh-a", &config, &[]);
    p.wait_ready(a.admin);

    let client = {
        let (a, b) = (a.clone(), b.clone());
        std::thread::spawn(move || request_over_mtls(a.ingress, &b, &a, "reviews.mesh-a.global"))
    };
    arrived_rx
        .recv_timeout(WAIT)
        .expect("the request did not reach the backend");
    // The request is in flight at the backend: stop the gateway.
    let mark = p.mark();
    let signalled = Instant::now();
    p.signal("TERM");
    p.wait_log_after(mark, &["shutting down"], WAIT);
    // Released only once ingress has stopped accepting and is draining
    // the open connection, so a cut would cut this request.
    p.wait_log_after(mark, &["ingress draining connections", "open=1"], WAIT);
    release_tx.send(()).unwrap();

    let response = client.join().unwrap();
    assert_eq!(
        response,
        Ok((
            200,
            "hello from reviews (called by spiffe://mesh-b.test/ns/elsinore/sa/gateway)".to_owned()
        )),
        "the request in flight at SIGTERM was cut"
    );
    let status = p.wait_exit(EXIT_BOUND);
    assert_eq!(
        status.map(|s| s.code()),
        Some(Some(0)),
        "no exit with status 0 within {EXIT_BOUND:?} of SIGTERM"
    );
    eprintln!("exited {:?} after SIGTERM", signalled.elapsed());
    for (what, addr) in [
        ("federation", a.federation),
        ("admin", a.admin),
        ("ingress", a.ingress),
        ("egress", a.egress),
        ("dns", a.dns),
    ] {
        assert!(!accepts(addr), "{what} listener {addr} still accepts");
    }
}

#[test]
fn sigint_exits_zero() {
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let b = GatewaySpec::new(&net, 20, "mesh-b", dir.path());
    let mut a = GatewaySpec::new(&net, 10, "mesh-a", dir.path());
    a.peers = vec![b.as_peer(false)];
    let config = a.config_path(dir.path());
    a.write(&config);
    let mut p = Proc::run("mesh-a", &config, &[]);
    p.wait_ready(a.admin);
    p.signal("INT");
    let status = p.wait_exit(EXIT_BOUND);
    assert_eq!(status.map(|s| s.code()), Some(Some(0)));
    assert!(!accepts(a.admin));
}

/// A SIGHUP that arrives while the gateway is still starting (a `systemctl
/// reload` right after start, a config-map sync) must not end the process:
/// the handlers are installed before the config is read, and the gateway
/// comes up and serves.
#[test]
fn sighup_during_start_does_not_end_the_process() {
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let b = GatewaySpec::new(&net, 20, "mesh-b", dir.path());
    let mut a = GatewaySpec::new(&net, 10, "mesh-a", dir.path());
    a.peers = vec![b.as_peer(false)];
    let config = a.config_path(dir.path());
    a.write(&config);
    let mut p = Proc::run("mesh-a", &config, &[]);
    // The first line the process logs: from here on, a SIGHUP is handled.
    p.wait_log_after(0, &["starting"], WAIT);
    for _ in 0..3 {
        p.signal("HUP");
    }
    p.wait_ready(a.admin);
    assert_eq!(
        p.wait_exit(Duration::from_millis(200)),
        None,
        "SIGHUP ended the process"
    );
    p.signal("TERM");
    let status = p.wait_exit(EXIT_BOUND);
    assert_eq!(status.map(|s| s.code()), Some(Some(0)));
}
