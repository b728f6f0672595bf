//! The ingress's socket-level tests: real gateways of mesh-a on loopback,
//! peers with minted certificates, real backends (HTTP/1.1, h2c, gRPC,
//! TCP), exercising the handshake's refusals, routing, forwarding and
//! draining end to end.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use elsinore_certs::{Ca, Identity, SpiffeId, TrustBundle, TrustDomain};
use elsinore_federation_api::Protocol;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::http::{strip_hop_by_hop, within};
use super::{IngressStats, Refusal, serve};
use crate::catalog::ExportCatalog;
use crate::catalog::exports::tests::config;
use crate::config::{Export, HostPort, ProxyTuning};
use crate::proxy::error::ProxyError;
use crate::proxy::{PEER_IDENTITY_HEADER, ProxyContext};
use crate::state::new_shared;

const FORGED: &str = "spiffe://mesh-b.example/ns/prod/sa/admin";

fn td(s: &str) -> TrustDomain {
    s.parse().unwrap()
}

fn identity(ca: &Ca, id: &SpiffeId) -> Identity {
    let issued = ca.issue(id, &[], &[]).unwrap();
    Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap()
}

fn bundle(ca: &Ca, domain: &str) -> TrustBundle {
    TrustBundle::from_pem(td(domain), ca.cert_pem().as_bytes()).unwrap()
}

fn export(name: &str, protocol: Protocol, backends: &[SocketAddr], peers: &[&str]) -> Export {
    Export {
        name: name.to_owned(),
        fqdn: format!("{name}.mesh-a.global"),
        protocol,
        port: 80,
        backends: backends
            .iter()
            .map(|a| HostPort {
                host: a.ip().to_string(),
                port: a.port(),
            })
            .collect(),
        peers: peers.iter().map(|p| (*p).to_owned()).collect(),
    }
}

fn tuning() -> ProxyTuning {
    ProxyTuning {
        connect_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
        ..ProxyTuning::default()
    }
}

fn catalog(exports: Vec<Export>) -> ExportCatalog {
    let mut cfg = config();
    cfg.exports = exports;
    ExportCatalog::from_config(&cfg, &SpiffeId::gateway(td("mesh-a.example")))
}

/// An ingress of mesh-a on loopback, with peers mesh-b and mesh-c.
struct Gateway {
    addr: SocketAddr,
    shared: Arc<crate::state::Shared>,
    stats: Arc<IngressStats>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ProxyError>>,
    a_bundle: TrustBundle,
    b_ca: Ca,
    c_ca: Ca,
}

async fn start(exports: Vec<Export>, tuning: ProxyTuning) -> Gateway {
    let a_td = td("mesh-a.example");
    let a_ca = Ca::new(&a_td).unwrap();
    let b_ca = Ca::new(&td("mesh-b.example")).unwrap();
    let c_ca = Ca::new(&td("mesh-c.example")).unwrap();
    let gateway_id = SpiffeId::gateway(a_td);
    let shared = new_shared("mesh-a".to_owned(), catalog(exports), &config().peers);
    let bundles = HashMap::from([
        ("mesh-b".to_owned(), bundle(&b_ca, "mesh-b.example")),
        ("mesh-c".to_owned(), bundle(&c_ca, "mesh-c.example")),
    ]);
    let shutdown = CancellationToken::new();
    let ctx_shared = Arc::clone(&shared);
    let credentials =
        crate::credentials::Credentials::fixed(identity(&a_ca, &gateway_id), bundles).unwrap();
    let ctx = ProxyContext {
        shared,
        credentials: Arc::new(credentials),
        tuning,
        shutdown: shutdown.clone(),
        abort: CancellationToken::new(),
        drain_timeout: Duration::from_secs(5),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = IngressStats::new();
    let task = tokio::spawn(serve(listener, ctx, Arc::clone(&stats)));
    Gateway {
        addr,
        shared: Arc::clone(&ctx_shared),
        stats,
        shutdown,
        task,
        a_bundle: bundle(&a_ca, "mesh-a.example"),
        b_ca,
        c_ca,
    }
}

impl Gateway {
    /// Connects as `id` (certificate signed by `ca`) with `sni`.
    async fn connect_as(
        &self,
        ca: &Ca,
        id: &str,
        sni: &str,
        alpn: &[&[u8]],
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let id: SpiffeId = id.parse().unwrap();
        let cfg =
            elsinore_certs::client_config(&identity(ca, &id), &self.a_bundle, None, alpn).unwrap();
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
            .await
            .unwrap()
    }

    /// Connects as mesh-b's gateway.
    async fn connect_b(
        &self,
        sni: &str,
        alpn: &[&[u8]],
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        self.connect_as(
            &self.b_ca,
            "spiffe://mesh-b.example/ns/elsinore/sa/gateway",
            sni,
            alpn,
        )
        .await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// A TCP echo backend counting its connections.
async fn echo_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&count);
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, count)
}

async fn dead_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

/// What an HTTP backend saw, returned in response headers.
fn seen(req: &Request<Incoming>) -> Response<String> {
    let join = |name: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join(",")
    };
    Response::builder()
        .header("x-seen-peer", join(PEER_IDENTITY_HEADER))
        .header("x-seen-xfcc", join("x-forwarded-client-cert"))
        .header("x-seen-host", join("host"))
        .header("x-seen-conn-token", join("x-drop-me"))
        .header(
            "x-seen-authority",
            req.uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default(),
        )
        .header("x-seen-version", format!("{:?}", req.version()))
        .body(format!("path={}", req.uri()))
        .unwrap()
}

/// An HTTP/1.1 backend answering with what it saw; counts requests.
async fn http1_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&count);
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    c.fetch_add(1, Ordering::SeqCst);
                    async move { Ok::<_, Infallible>(seen(&req).map(|s| Full::new(Bytes::from(s)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, count)
}

/// An h2c backend whose responses stream a body and end with trailers.
async fn h2c_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let head = seen(&req);
                    // Echo the request body back, then trailers.
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static("0"));
                    trailers.insert("x-trailer", HeaderValue::from_static("kept"));
                    let frames = vec![
                        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"echo:"))),
                        Ok(Frame::data(body)),
                        Ok(Frame::trailers(trailers)),
                    ];
                    let (parts, _) = head.into_parts();
                    Ok::<_, Infallible>(Response::from_parts(
                        parts,
                        StreamBody::new(futures_util::stream::iter(frames)),
                    ))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// An HTTP/1.1 sender over a fresh connection as mesh-b.
async fn h1_client(
    gw: &Gateway,
    sni: &str,
) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let tls = gw.connect_b(sni, &[b"http/1.1"]).await;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn body_text(resp: Response<Incoming>) -> String {
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

/// Asserts the connection carries no data: EOF (close_notify) or an
/// error, whatever we write.
async fn assert_closed(mut tls: tokio_rustls::client::TlsStream<TcpStream>) {
    let _ = tls.write_all(b"hello").await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .expect("the connection must be closed, not left open");
    assert!(matches!(read, Ok(0) | Err(_)), "got data: {read:?}");
}

#[tokio::test]
async fn tcp_export_is_spliced_to_a_backend_skipping_a_dead_one() {
    let _limit = crate::test_support::limit();
    let (echo, count) = echo_backend().await;
    let dead = dead_addr().await;
    let gw = start(
        vec![export("db", Protocol::Tcp, &[dead, echo], &["mesh-b"])],
        tuning(),
    )
    .await;
    for i in 0..3 {
        // SNI is matched case-insensitively, trailing dot ignored.
        let sni = if i == 1 {
            "DB.Mesh-A.Global."
        } else {
            "db.mesh-a.global"
        };
        let mut tls = gw.connect_b(sni, &[]).await;
        tls.write_all(b"ping over the mesh").await.unwrap();
        // Half-close: the echo still comes back.
        tls.shutdown().await.unwrap();
        let mut got = Vec::new();
        tls.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping over the mesh");
    }
    assert_eq!(count.load(Ordering::SeqCst), 3);
    assert_eq!(get(&gw.stats.authorized), 3);
    assert_eq!(get(&gw.stats.spliced), 3);
    gw.stop().await;
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

#[tokio::test]
async fn refusals_close_the_connection_and_are_counted() {
    let _limit = crate::test_support::limit();
    let (echo, count) = echo_backend().await;
    let gw = start(
        vec![
            export("db", Protocol::Tcp, &[echo], &["mesh-b"]),
            export("secret", Protocol::Tcp, &[echo], &["mesh-c"]),
        ],
        tuning(),
    )
    .await;

    // Export not given to mesh-b, whatever SNI it sends.
    assert_closed(gw.connect_b("secret.mesh-a.global", &[]).await).await;
    assert_eq!(gw.stats.refused(Refusal::Unauthorized), 1);

    // No export with that FQDN (no default route).
    assert_closed(gw.connect_b("nothing.mesh-a.global", &[]).await).await;
    assert_eq!(gw.stats.refused(Refusal::UnknownSni), 1);

    // A trust domain that is no peer, signed by a CA we trust for
    // mesh-b: the handshake completes, the connection is refused.
    let stranger = gw
        .connect_as(
            &gw.b_ca,
            "spiffe://mesh-x.example/ns/elsinore/sa/gateway",
            "db.mesh-a.global",
            &[],
        )
        .await;
    assert_closed(stranger).await;
    assert_eq!(gw.stats.refused(Refusal::UnknownPeer), 1);

    // No SNI: an IP address as server name sends none.
    let tls = gw.connect_b("127.0.0.1", &[]).await;
    assert_closed(tls).await;
    assert_eq!(gw.stats.refused(Refusal::NoSni), 1);

    // mesh-c reaches its own export, through the same listener.
    let mut tls = gw
        .connect_as(
            &gw.c_ca,
            "spiffe://mesh-c.example/ns/elsinore/sa/gateway",
            "secret.mesh-a.global",
            &[],
        )
        .await;
    tls.write_all(b"c").await.unwrap();
    let mut one = [0u8; 1];
    tls.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"c");

    // Only mesh-c's connection reached the backend.
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert_eq!(get(&gw.stats.authorized), 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_client_without_a_trusted_certificate_fails_the_handshake() {
    let _limit = crate::test_support::limit();
    let (echo, _) = echo_backend().await;
    let gw = start(
        vec![export("db", Protocol::Tcp, &[echo], &["mesh-b"])],
        tuning(),
    )
    .await;
    let rogue = Ca::new(&td("mesh-b.example")).unwrap();
    let id: SpiffeId = "spiffe://mesh-b.example/ns/elsinore/sa/gateway"
        .parse()
        .unwrap();
    let cfg =
        elsinore_certs::client_config(&identity(&rogue, &id), &gw.a_bundle, None, &[]).unwrap();
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let res = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("db.mesh-a.global").unwrap(), tcp)
        .await;
    // TLS 1.3: the client may finish before the server's alert arrives.
    if let Ok(tls) = res {
        assert_closed(tls).await;
    }
    for _ in 0..50 {
        if gw.stats.refused(Refusal::HandshakeFailed) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gw.stats.refused(Refusal::HandshakeFailed), 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_resumed_session_does_not_outlive_the_peer_certificate() {
    let _limit = crate::test_support::limit();
    let (echo, count) = echo_backend().await;
    let gw = start(
        vec![export("db", Protocol::Tcp, &[echo], &["mesh-b"])],
        tuning(),
    )
    .await;
    let id: SpiffeId = "spiffe://mesh-b.example/ns/elsinore/sa/gateway"
        .parse()
        .unwrap();
    let issued = gw
        .b_ca
        .issue_valid_for(&id, Duration::from_secs(2))
        .unwrap();
    let short = Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
    // One client config, so one session cache across both connections.
    let cfg = elsinore_certs::client_config(&short, &gw.a_bundle, None, &[]).unwrap();
    let dial = || async {
        let tcp = TcpStream::connect(gw.addr).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::clone(&cfg))
            .connect(ServerName::try_from("db.mesh-a.global").unwrap(), tcp)
            .await
            .unwrap()
    };
    // While valid: a full handshake, traffic (which also delivers the
    // session ticket).
    let mut first = dial().await;
    first.write_all(b"1").await.unwrap();
    let mut one = [0u8; 1];
    first.read_exact(&mut one).await.unwrap();
    drop(first);

    // Once the certificate expired, the client resumes (it does not
    // check), and ingress refuses the identity the ticket carries.
    let not_after = elsinore_certs::not_after(&short.cert_chain()[0]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::SystemTime::now() <= not_after + Duration::from_millis(1100) {
        assert!(
            std::time::Instant::now() < deadline,
            "certificate never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = dial().await;
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    assert_closed(second).await;
    assert_eq!(gw.stats.refused(Refusal::NoPeerIdentity), 1);
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "only the first reached the backend"
    );
    gw.stop().await;
}

#[tokio::test]
async fn connection_cap_closes_new_connections() {
    let _limit = crate::test_support::limit();
    let (echo, _) = echo_backend().await;
    let gw = start(
        vec![export("db", Protocol::Tcp, &[echo], &["mesh-b"])],
        ProxyTuning {
            max_connections: 1,
            ..tuning()
        },
    )
    .await;
    let mut first = gw.connect_b("db.mesh-a.global", &[]).await;
    first.write_all(b"1").await.unwrap();
    let mut one = [0u8; 1];
    first.read_exact(&mut one).await.unwrap();

    let id: SpiffeId = "spiffe://mesh-b.example/ns/elsinore/sa/gateway"
        .parse()
        .unwrap();
    let cfg =
        elsinore_certs::client_config(&identity(&gw.b_ca, &id), &gw.a_bundle, None, &[]).unwrap();
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let second = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("db.mesh-a.global").unwrap(), tcp)
        .await;
    assert!(
        second.is_err(),
        "over the cap the connection is closed before tls"
    );
    assert_eq!(gw.stats.refused(Refusal::Overloaded), 1);
    gw.stop().await;
}

#[tokio::test]
async fn http_export_forwards_with_the_verified_identity() {
    let _limit = crate::test_support::limit();
    let (backend, count) = http1_backend().await;
    let gw = start(
        vec![export("reviews", Protocol::Http, &[backend], &["mesh-b"])],
        tuning(),
    )
    .await;
    let mut sender = h1_client(&gw, "reviews.mesh-a.global").await;
    for _ in 0..2 {
        let req = Request::builder()
            .uri("/reviews/1?x=y")
            .header(HOST, "reviews.mesh-a.global:15443")
            .header(PEER_IDENTITY_HEADER, FORGED)
            .header("x-forwarded-client-cert", "By=forged")
            .header(CONNECTION, "x-drop-me")
            .header("x-drop-me", "1")
            .body(Empty::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let h = resp.headers();
        assert_eq!(
            h["x-seen-peer"],
            "spiffe://mesh-b.example/ns/elsinore/sa/gateway"
        );
        assert_eq!(h["x-seen-xfcc"], "");
        assert_eq!(h["x-seen-conn-token"], "");
        assert_eq!(h["x-seen-host"], "reviews.mesh-a.global:15443");
        assert_eq!(h["x-seen-version"], "HTTP/1.1");
        // Origin-form on the wire to the HTTP/1 backend.
        assert_eq!(body_text(resp).await, "path=/reviews/1?x=y");
    }
    assert_eq!(count.load(Ordering::SeqCst), 2);
    assert_eq!(get(&gw.stats.http_requests), 2);
    gw.stop().await;
}

/// An HTTP/1.1 backend echoing the request body after what it saw of
/// the framing; counts accepted connections.
async fn http1_echo_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let a = Arc::clone(&accepts);
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let framing = if req.headers().contains_key(TRANSFER_ENCODING) {
                        "chunked"
                    } else {
                        "length"
                    };
                    let host = req.headers()[HOST].to_str().unwrap().to_owned();
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let text = format!("{framing} {host} {}", String::from_utf8_lossy(&body));
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, accepts)
}

#[tokio::test]
async fn http_export_streams_bodies_over_one_pooled_backend_connection() {
    let _limit = crate::test_support::limit();
    let (backend, accepts) = http1_echo_backend().await;
    let gw = start(
        vec![export("reviews", Protocol::Http, &[backend], &["mesh-b"])],
        tuning(),
    )
    .await;

    // HTTP/1.1 peer, body of known length.
    let tls = gw.connect_b("reviews.mesh-a.global", &[b"http/1.1"]).await;
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::post("/r")
        .header(HOST, "reviews.mesh-a.global")
        .body(Full::new(Bytes::from_static(b"five stars")))
        .unwrap();
    let resp = h1.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        body_text(resp).await,
        "length reviews.mesh-a.global five stars"
    );

    // HTTP/2 peer, streamed body of unknown length, no Host header:
    // the backend gets it chunked, with Host from :authority.
    let tls = gw.connect_b("reviews.mesh-a.global", &[b"h2"]).await;
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let frames = vec![
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"two "))),
        Ok(Frame::data(Bytes::from_static(b"parts"))),
    ];
    let req = Request::post("https://reviews.mesh-a.global/r")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        body_text(resp).await,
        "chunked reviews.mesh-a.global two parts"
    );

    // Both peers' requests went over the one backend connection.
    assert_eq!(accepts.load(Ordering::SeqCst), 1);
    gw.stop().await;
}

/// An HTTP/2 peer's request trailers reach an HTTP export's backend
/// without the identity fields stripped from headers.
#[tokio::test]
async fn identity_fields_in_h2_request_trailers_do_not_reach_the_backend() {
    let _limit = crate::test_support::limit();
    // Answers with the trailer fields it received.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let collected = req.into_body().collect().await.unwrap();
                    let mut seen: Vec<String> = collected
                        .trailers()
                        .map(|t| t.iter().map(|(k, v)| format!("{k}={v:?}")).collect())
                        .unwrap_or_default();
                    seen.sort();
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(seen.join(",")))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let gw = start(
        vec![export("reviews", Protocol::Http, &[backend], &["mesh-b"])],
        tuning(),
    )
    .await;
    let tls = gw.connect_b("reviews.mesh-a.global", &[b"h2"]).await;
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut trailers = HeaderMap::new();
    for name in crate::proxy::STRIPPED_IDENTITY_HEADERS {
        trailers.insert(*name, HeaderValue::from_static(FORGED));
    }
    trailers.insert("x-kept", HeaderValue::from_static("yes"));
    let frames = vec![
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"body"))),
        Ok(Frame::trailers(trailers)),
    ];
    let req = Request::post("https://reviews.mesh-a.global/r")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "x-kept=\"yes\"");
    gw.stop().await;
}

#[tokio::test]
async fn host_naming_another_service_is_misdirected() {
    let _limit = crate::test_support::limit();
    let (backend, count) = http1_backend().await;
    let gw = start(
        vec![
            export("reviews", Protocol::Http, &[backend], &["mesh-b"]),
            export("admin", Protocol::Http, &[backend], &["mesh-c"]),
        ],
        tuning(),
    )
    .await;
    let mut sender = h1_client(&gw, "reviews.mesh-a.global").await;
    let req = Request::builder()
        .uri("/")
        .header(HOST, "admin.mesh-a.global")
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::MISDIRECTED_REQUEST);
    assert!(
        body_text(resp)
            .await
            .starts_with("downstream misdirected request")
    );

    // Absolute-form URI naming another service: same answer.
    let req = Request::builder()
        .uri("http://admin.mesh-a.global/")
        .header(HOST, "reviews.mesh-a.global")
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::MISDIRECTED_REQUEST);

    assert_eq!(count.load(Ordering::SeqCst), 0);
    assert_eq!(get(&gw.stats.misdirected), 2);
    gw.stop().await;
}

#[tokio::test]
async fn upstream_failures_map_to_502_and_504() {
    let _limit = crate::test_support::limit();
    let dead = dead_addr().await;
    // Accepts and reads, never answers.
    let hang = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_addr = hang.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (s, _) = hang.accept().await.unwrap();
            held.push(s);
        }
    });
    let gw = start(
        vec![
            export("down", Protocol::Http, &[dead], &["mesh-b"]),
            export("slow", Protocol::Http, &[hang_addr], &["mesh-b"]),
        ],
        ProxyTuning {
            request_timeout: Duration::from_millis(300),
            ..tuning()
        },
    )
    .await;

    let mut sender = h1_client(&gw, "down.mesh-a.global").await;
    let req = Request::builder()
        .uri("/")
        .header(HOST, "down.mesh-a.global")
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(resp.headers()["x-elsinore-error"], "connect_failed");
    let text = body_text(resp).await;
    assert!(text.starts_with("upstream connect failed"), "{text}");
    assert!(text.contains(&dead.to_string()), "{text}");

    let mut sender = h1_client(&gw, "slow.mesh-a.global").await;
    let req = Request::builder()
        .uri("/")
        .header(HOST, "slow.mesh-a.global")
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        body_text(resp)
            .await
            .starts_with("upstream request timed out")
    );
    assert_eq!(get(&gw.stats.upstream_errors), 2);
    gw.stop().await;
}

#[tokio::test]
async fn grpc_export_goes_over_h2c_with_trailers() {
    let _limit = crate::test_support::limit();
    let backend = h2c_backend().await;
    let gw = start(
        vec![export("ratings", Protocol::Grpc, &[backend], &["mesh-b"])],
        tuning(),
    )
    .await;
    let tls = gw.connect_b("ratings.mesh-a.global", &[b"h2"]).await;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    for i in 0..3 {
        let req = Request::builder()
            .method("POST")
            .uri("https://ratings.mesh-a.global/ratings.v1.Ratings/Get")
            .header(CONTENT_TYPE, "application/grpc")
            .header(TE, "trailers")
            .header(PEER_IDENTITY_HEADER, FORGED)
            .body(Full::new(Bytes::from(format!("req{i}"))))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let h = resp.headers().clone();
        assert_eq!(
            h["x-seen-peer"],
            "spiffe://mesh-b.example/ns/elsinore/sa/gateway"
        );
        assert_eq!(h["x-seen-version"], "HTTP/2.0");
        assert_eq!(h["x-seen-authority"], "ratings.mesh-a.global");
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected
            .trailers()
            .cloned()
            .expect("trailers pass through");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-trailer"], "kept");
        assert_eq!(collected.to_bytes(), format!("echo:req{i}"));
    }

    // A gRPC request for another service gets a gRPC status, not HTML.
    let req = Request::builder()
        .method("POST")
        .uri("https://other.mesh-a.global/x.Y/Z")
        .header(CONTENT_TYPE, "application/grpc")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["grpc-status"], "14");
    gw.stop().await;
}

#[tokio::test]
async fn catalog_changes_reroute_new_connections() {
    let _limit = crate::test_support::limit();
    let (echo, _) = echo_backend().await;
    let gw = start(
        vec![export("db", Protocol::Tcp, &[echo], &["mesh-c"])],
        tuning(),
    )
    .await;
    assert_closed(gw.connect_b("db.mesh-a.global", &[]).await).await;
    assert_eq!(gw.stats.refused(Refusal::Unauthorized), 1);

    // A config reload publishes a new catalog: db is now for mesh-b.
    gw.shared.exports.send_replace(Arc::new(catalog(vec![export(
        "db",
        Protocol::Tcp,
        &[echo],
        &["mesh-b"],
    )])));
    let mut tls = gw.connect_b("db.mesh-a.global", &[]).await;
    tls.write_all(b"now").await.unwrap();
    let mut got = [0u8; 3];
    tls.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"now");
    gw.stop().await;
}

/// Reads from `tls` into `buf` until `done(buf)` holds, the peer
/// closes, or 10 s pass (a failure naming what was read).
async fn read_until<S: tokio::io::AsyncRead + Unpin>(
    tls: &mut S,
    buf: &mut Vec<u8>,
    done: impl Fn(&str) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done(&String::from_utf8_lossy(buf)) {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, tls.read(&mut chunk)).await {
            Err(_) => panic!("timed out; got {:?}", String::from_utf8_lossy(buf)),
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Before hyper knows the protocol it has no header timer: the first
/// request is due `requestTimeout` after the connection opened, far
/// sooner than the idle timeout, whether the peer sends nothing or
/// the start of an h2 preface.
#[tokio::test]
async fn a_peer_that_sends_no_request_is_closed_after_the_request_timeout() {
    let _limit = crate::test_support::limit();
    let (backend, _) = http1_backend().await;
    let gw = start(
        vec![export("reviews", Protocol::Http, &[backend], &["mesh-b"])],
        ProxyTuning {
            request_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(3600),
            ..tuning()
        },
    )
    .await;
    for (alpn, sent) in [
        (&[&b"http/1.1"[..]][..], &b""[..]),
        (&[][..], &b""[..]),
        (&[&b"http/1.1"[..]][..], &b"PRI * HTTP/2.0\r\n"[..]),
    ] {
        let mut tls = gw.connect_b("reviews.mesh-a.global", alpn).await;
        tls.write_all(sent).await.unwrap();
        tls.flush().await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("still open after sending {sent:?}"));
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    // A request in time is served.
    let mut sender = h1_client(&gw, "reviews.mesh-a.global").await;
    let req = Request::get("/").header(HOST, "reviews.mesh-a.global");
    let resp = sender.send_request(req.body(Empty::new()).unwrap()).await;
    assert_eq!(resp.unwrap().status(), StatusCode::OK);
    gw.stop().await;
}

/// Userinfo in Host, in an absolute-form target or in `:authority`:
/// 400, nothing forwarded (the SNI check alone would look past it).
#[tokio::test]
async fn userinfo_in_host_or_authority_is_refused() {
    let _limit = crate::test_support::limit();
    let (backend, count) = http1_backend().await;
    let gw = start(
        vec![export("reviews", Protocol::Http, &[backend], &["mesh-b"])],
        tuning(),
    )
    .await;
    let mut sender = h1_client(&gw, "reviews.mesh-a.global").await;
    for (uri, host) in [
        ("/", "user@reviews.mesh-a.global"),
        ("/", "user:pw@reviews.mesh-a.global:15443"),
        (
            "http://user@reviews.mesh-a.global/",
            "reviews.mesh-a.global",
        ),
    ] {
        let req = Request::get(uri).header(HOST, host).body(Empty::new());
        let resp = sender.send_request(req.unwrap()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{uri} {host}");
        assert!(body_text(resp).await.contains("userinfo"));
    }
    let tls = gw.connect_b("reviews.mesh-a.global", &[b"h2"]).await;
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("https://user@reviews.mesh-a.global/r").body(Empty::<Bytes>::new());
    let resp = h2.send_request(req.unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(count.load(Ordering::SeqCst), 0);
    // Without userinfo, the same requests go through.
    let req = Request::get("https://reviews.mesh-a.global/r").body(Empty::<Bytes>::new());
    let resp = h2.send_request(req.unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let req = Request::get("/").header(HOST, "reviews.mesh-a.global");
    let resp = sender.send_request(req.body(Empty::new()).unwrap()).await;
    assert_eq!(resp.unwrap().status(), StatusCode::OK);
    assert_eq!(count.load(Ordering::SeqCst), 2);
    gw.stop().await;
}

/// An HTTP/1.1 backend answering with the request body and the trailers
/// it received, one `name=value` line each.
async fn trailer_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let collected = req.into_body().collect().await.unwrap();
                    let mut text = String::new();
                    for (name, value) in collected.trailers().into_iter().flatten() {
                        text.push_str(&format!("{name}={}\n", value.to_str().unwrap()));
                    }
                    let body = collected.to_bytes();
                    text.push_str(&format!("body={}", String::from_utf8_lossy(&body)));
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// Identity headers are stripped from trailers as from the header
/// section, for HTTP/1.1 (chunked) and HTTP/2 peers; other trailers
/// pass.
#[tokio::test]
async fn identity_headers_in_trailers_do_not_reach_the_backend() {
    let _limit = crate::test_support::limit();
    let backend = trailer_backend().await;
    let gw = start(
        vec![export("reviews", Protocol::Http, &[backend], &["mesh-b"])],
        tuning(),
    )
    .await;
    let mut tls = gw.connect_b("reviews.mesh-a.global", &[b"http/1.1"]).await;
    tls.write_all(
        format!(
            "POST /t HTTP/1.1\r\nHost: reviews.mesh-a.global\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
             5\r\nhello\r\n0\r\n{PEER_IDENTITY_HEADER}: {FORGED}\r\n\
             X-Forwarded-Client-Cert: By=forged\r\nx-kept: yes\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    read_until(&mut tls, &mut got, |_| false).await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.contains("x-kept=yes\n"), "{got}");
    assert!(got.contains("body=hello"), "{got}");
    assert!(!got.contains("forged"), "{got}");
    assert!(!got.contains(PEER_IDENTITY_HEADER), "{got}");

    let tls = gw.connect_b("reviews.mesh-a.global", &[b"h2"]).await;
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut trailers = HeaderMap::new();
    trailers.insert(PEER_IDENTITY_HEADER, HeaderValue::from_static(FORGED));
    trailers.insert("l5d-client-id", HeaderValue::from_static("forged"));
    trailers.insert("x-kept", HeaderValue::from_static("yes"));
    let frames = vec![
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"hello"))),
        Ok(Frame::trailers(trailers)),
    ];
    let req = Request::post("https://reviews.mesh-a.global/t")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = body_text(resp).await;
    assert_eq!(text, "x-kept=yes\nbody=hello");
    gw.stop().await;
}

/// An HTTP/1.0 backend (answers in HTTP/1.0 and closes; `/len` with a
/// Content-Length, anything else delimited by the close), as Python's
/// `http.server` does.
async fn http10_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                read_until(&mut s, &mut head, |h| h.contains("\r\n\r\n")).await;
                let head = String::from_utf8_lossy(&head).into_owned();
                let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                let body = format!("from 1.0 {path}");
                let length = if path == "/len" {
                    format!("Content-Length: {}\r\n", body.len())
                } else {
                    String::new()
                };
                let resp =
                    format!("HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6\r\n{length}\r\n{body}");
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// RFC 9110 §6.2: the ingress answers an HTTP/1.1 peer in HTTP/1.1
/// whatever the backend's version, and the peer's connection stays
/// open: a body the backend delimited by closing goes out chunked.
#[tokio::test]
async fn an_http10_backend_is_answered_in_http11_on_a_kept_connection() {
    let _limit = crate::test_support::limit();
    let backend = http10_backend().await;
    let gw = start(
        vec![export("reviews", Protocol::Http, &[backend], &["mesh-b"])],
        tuning(),
    )
    .await;
    let mut tls = gw.connect_b("reviews.mesh-a.global", &[b"http/1.1"]).await;
    // Close-delimited from the backend, then with a length, on one
    // connection.
    tls.write_all(b"GET /close HTTP/1.1\r\nHost: reviews.mesh-a.global\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    read_until(&mut tls, &mut got, |s| s.ends_with("\r\n0\r\n\r\n")).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
    assert!(text.contains("from 1.0 /close"), "{text}");
    assert!(!text.contains("connection: close"), "{text}");

    tls.write_all(b"GET /len HTTP/1.1\r\nHost: reviews.mesh-a.global\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    read_until(&mut tls, &mut got, |s| s.ends_with("from 1.0 /len")).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("content-length: 13\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nfrom 1.0 /len"), "{text}");
    assert!(!text.contains("connection: close"), "{text}");

    // An HTTP/1.0 peer gets HTTP/1.0 (hyper's choice), body to the close.
    let mut tls = gw.connect_b("reviews.mesh-a.global", &[b"http/1.1"]).await;
    tls.write_all(b"GET /close HTTP/1.0\r\nHost: reviews.mesh-a.global\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    read_until(&mut tls, &mut got, |_| false).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nfrom 1.0 /close"), "{text}");
    gw.stop().await;
}

/// Kills the child process when dropped (the test's backend).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a new user tries first: Python's `http.server` (HTTP/1.0,
/// `Content-Length` bodies) behind an HTTP export. The peer gets HTTP/1.1
/// answers on one kept connection.
#[tokio::test]
async fn python_http_server_behind_an_export_answers_in_http11() {
    use std::io::BufRead;
    let _limit = crate::test_support::limit();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), "hello from python\n").unwrap();
    let mut child = std::process::Command::new("python3")
        .args([
            "-u",
            "-m",
            "http.server",
            "0",
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 runs (CI installs it)");
    let stdout = child.stdout.take().unwrap();
    let child = Child(child);
    // "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line
    })
    .await
    .unwrap();
    let port: u16 = line
        .split(" port ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    let backend: SocketAddr = ([127, 0, 0, 1], port).into();
    let gw = start(
        vec![export("reviews", Protocol::Http, &[backend], &["mesh-b"])],
        tuning(),
    )
    .await;
    let mut tls = gw.connect_b("reviews.mesh-a.global", &[b"http/1.1"]).await;
    for _ in 0..2 {
        tls.write_all(b"GET /hello.txt HTTP/1.1\r\nHost: reviews.mesh-a.global\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        read_until(&mut tls, &mut got, |s| s.ends_with("hello from python\n")).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("content-length: 18\r\n"), "{text}");
        assert!(!text.contains("connection: close"), "{text}");
    }
    gw.stop().await;
    drop(child);
}

#[tokio::test]
async fn the_request_timeout_does_not_copy_the_exchange() {
    let _limit = crate::test_support::limit();
    // Every request's exchange lives in one heap block that is allocated
    // and filled per request; an `async fn` timeout wrapper once kept the
    // backend exchange twice (8 KiB per request in release builds).
    let exchange = async {
        let state = [7u8; 4096];
        tokio::task::yield_now().await;
        Ok::<_, ProxyError>(state[100])
    };
    let alone = std::mem::size_of_val(&exchange);
    let wrapped = within(Duration::from_secs(1), exchange);
    let size = std::mem::size_of_val(&wrapped);
    assert!(
        size < alone + 512,
        "the exchange is {alone} bytes, with its timeout {size}"
    );
}

#[test]
fn hop_by_hop_headers_are_removed() {
    let mut h = HeaderMap::new();
    h.insert(CONNECTION, HeaderValue::from_static("close, x-custom"));
    h.insert("x-custom", HeaderValue::from_static("1"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(TE, HeaderValue::from_static("gzip, trailers"));
    h.insert("x-kept", HeaderValue::from_static("1"));
    strip_hop_by_hop(&mut h);
    assert_eq!(h.len(), 2, "{h:?}");
    assert_eq!(h[TE], "trailers");
    assert_eq!(h["x-kept"], "1");

    let mut h = HeaderMap::new();
    h.insert(TE, HeaderValue::from_static("gzip"));
    strip_hop_by_hop(&mut h);
    assert!(h.is_empty());
}
