//! The real `elsinore run` process and a real SIGTERM: with a long request
//! in flight through its ingress, `/ready` fails first, the request still
//! completes, and the process exits 0 once it has.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use elsinore_certs::{Ca, Identity, SpiffeId, TrustBundle, TrustDomain};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::harness::{BIN, Guard};

const WAIT: Duration = Duration::from_secs(20);

/// Re-checks `check` every 50 ms for at most `WAIT`.
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three distinct free loopback ports (the kernel's picks, released for
/// the gateway: a released port may be offered again, so they are held
/// until all three are known).
async fn free_ports() -> (u16, u16, u16) {
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let port = |i: usize| held[i].local_addr().unwrap().port();
    (port(0), port(1), port(2))
}

/// The status of GET `path` on the admin listener, 0 if it does not answer.
async fn admin_status(addr: SocketAddr, path: &str) -> u16 {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    };
    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Ok(Ok(text)) => text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_fails_ready_first_finishes_the_request_in_flight_and_exits_0() {
    tokio::time::timeout(Duration::from_secs(90), run())
        .await
        .expect("test timed out");
}

async fn run() {
    let dir = tempfile::tempdir().unwrap();
    let (td_a, td_b): (TrustDomain, TrustDomain) = (
        "mesh-a.test".parse().unwrap(),
        "mesh-b.test".parse().unwrap(),
    );
    let (ca_a, ca_b) = (Ca::new(&td_a).unwrap(), Ca::new(&td_b).unwrap());
    let a = ca_a
        .issue(&SpiffeId::gateway(td_a.clone()), &[], &[])
        .unwrap();
    let b = ca_b
        .issue(&SpiffeId::gateway(td_b.clone()), &[], &[])
        .unwrap();
    write(&dir.path().join("a/gateway.pem"), &a.cert_pem);
    write(&dir.path().join("a/gateway.key"), &a.key_pem);
    write(&dir.path().join("b/ca.pem"), &ca_b.cert_pem());

    // The backend holds the request until the gate opens.
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let arrived = Arc::new(AtomicU64::new(0));
    let (gate, _) = watch::channel(false);
    let (seen, opened) = (arrived.clone(), gate.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = backend.accept().await {
            let (seen, opened) = (seen.clone(), opened.subscribe());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let mut opened = opened.clone();
                    seen.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let _ = opened.wait_for(|open| *open).await;
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from("done"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });

    let (admin, ingress, federation) = free_ports().await;
    let config = dir.path().join("mesh-a.yaml");
    write(
        &config,
        &format!(
            r#"
mesh: {{ name: mesh-a, trustDomain: mesh-a.test }}
identity: {{ certificate: a/gateway.pem, privateKey: a/gateway.key }}
listeners:
  federation: "127.0.0.1:{federation}"
  admin: "127.0.0.1:{admin}"
  ingress: "127.0.0.1:{ingress}"
  egress: "off"
  dns: "off"
advertise: {{ address: 127.0.0.1, port: {ingress} }}
exports:
  - name: slow
    protocol: HTTP
    backends: ["{backend_addr}"]
    peers: [mesh-b]
peers:
  - name: mesh-b
    trustDomain: mesh-b.test
    trustBundle: b/ca.pem
drain: {{ delay: 1s, timeout: 30s }}
"#
        ),
    );
    let child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env("ELSINORE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = Guard(child);
    let admin: SocketAddr = ([127, 0, 0, 1], admin).into();
    let ingress: SocketAddr = ([127, 0, 0, 1], ingress).into();
    wait_until("/ready to answer 200", || async {
        admin_status(admin, "/ready").await == 200
    })
    .await;

    // A peer of mesh-b sends a request the backend holds.
    let identity = Identity::from_pem(b.cert_pem.as_bytes(), b.key_pem.as_bytes()).unwrap();
    let bundle = TrustBundle::from_pem(td_a, ca_a.cert_pem().as_bytes()).unwrap();
    let tls_config =
        elsinore_certs::client_config(&identity, &bundle, None, &[b"http/1.1"]).unwrap();
    let tcp = TcpStream::connect(ingress).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("slow.mesh-a.global").unwrap();
    let tls = tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(tls_config).connect(name, tcp),
    )
    .await
    .unwrap()
    .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = hyper::Request::get("/long")
        .header(http::header::HOST, "slow.mesh-a.global")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = tokio::spawn(sender.send_request(request));
    wait_until("the request to reach the backend", || async {
        arrived.load(Ordering::SeqCst) == 1
    })
    .await;

    // SIGTERM, to the child's own pid.
    let pid = child.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    wait_until("/ready to fail after SIGTERM", || async {
        admin_status(admin, "/ready").await == 503
    })
    .await;
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "exited with a request in flight"
    );

    // Once the listeners stopped accepting, the request still completes.
    wait_until("the ingress to stop accepting", || async {
        TcpStream::connect(ingress).await.is_err()
    })
    .await;
    gate.send_replace(true);
    let response = tokio::time::timeout(WAIT, response)
        .await
        .unwrap()
        .unwrap()
        .expect("the request in flight failed");
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"done");

    // And the process exits 0, without waiting for drain.timeout.
    let stopped = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopped.elapsed() < WAIT,
            "the gateway did not exit after the drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
}
