//! The egress socket-level suite: real remote gateways (rustls servers
//! with minted certificates) and real apps on loopback, driving the
//! listeners, routing, pooling, splicing and budget end to end.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use ::http::{HeaderMap, Request, Response, header};
use elsinore_certs::SpiffeId;
use elsinore_federation_api::{Endpoint, Instance, Protocol};
use http_body_util::BodyExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::http::strip_hop_by_hop;
use super::listener::{bind_backoff, bind_import_listener};
use super::routes::{self, AuthorityMemo, Route, split_host, upstream_authority};
use super::*;
use crate::catalog::ExportCatalog;
use crate::catalog::imports::{resolve, resolve_reusing};
use crate::catalog::routes::{TablePlan, VipAllocator};
use crate::config::EgressMode;
use crate::config::ProxyTuning;
use crate::config::defaults::EGRESS_BIND_RETRY_MAX as BIND_RETRY_MAX;
use crate::test_support::{WAIT, wait_until};
use ::http::HeaderValue;
use elsinore_certs::{Ca, Identity, TrustBundle, TrustDomain};
use elsinore_federation_api::FederatedService;
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::BTreeSet;
use std::convert::Infallible;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

const A_GATEWAY: &str = "spiffe://mesh-a.example/ns/elsinore/sa/gateway";

struct World {
    ca_a: Ca,
    bundle_a: TrustBundle,
    bundle_b: TrustBundle,
    ident_b: Identity,
}

fn world() -> World {
    let td_a: TrustDomain = "mesh-a.example".parse().unwrap();
    let td_b: TrustDomain = "mesh-b.example".parse().unwrap();
    let ca_a = Ca::new(&td_a).unwrap();
    let ca_b = Ca::new(&td_b).unwrap();
    let leaf_b = ca_b
        .issue(&SpiffeId::gateway(td_b.clone()), &[], &[])
        .unwrap();
    World {
        bundle_a: TrustBundle::from_pem(td_a, ca_a.cert_pem().as_bytes()).unwrap(),
        bundle_b: TrustBundle::from_pem(td_b, ca_b.cert_pem().as_bytes()).unwrap(),
        ident_b: Identity::from_pem(leaf_b.cert_pem.as_bytes(), leaf_b.key_pem.as_bytes()).unwrap(),
        ca_a,
    }
}

fn context(w: &World, tuning: ProxyTuning) -> ProxyContext {
    ProxyContext {
        shared: crate::state::new_shared("mesh-b".into(), ExportCatalog::default(), &[]),
        credentials: Arc::new(
            crate::credentials::Credentials::fixed(
                w.ident_b.clone(),
                [("mesh-a".to_owned(), w.bundle_a.clone())].into(),
            )
            .unwrap(),
        ),
        tuning,
        shutdown: CancellationToken::new(),
        abort: CancellationToken::new(),
        drain_timeout: Duration::from_secs(5),
    }
}

fn service(
    name: &str,
    protocol: Protocol,
    port: u16,
    endpoints: &[SocketAddr],
    sans: &[&str],
) -> Arc<FederatedService> {
    Arc::new(FederatedService {
        name: name.into(),
        description: String::new(),
        tags: vec![],
        labels: Default::default(),
        fqdn: format!("{name}.mesh-a.global"),
        endpoints: endpoints
            .iter()
            .map(|a| Endpoint {
                address: a.ip().to_string(),
                port: a.port(),
                labels: vec![],
                description: String::new(),
            })
            .collect(),
        sans: sans.iter().map(|s| (*s).to_owned()).collect(),
        instances: vec![Instance {
            id: "gw".into(),
            protocol,
            metadata: [
                ("SNI".to_owned(), format!("{name}.sni.mesh-a")),
                ("PORT".to_owned(), port.to_string()),
            ]
            .into_iter()
            .collect(),
            endpoint_selector: vec![],
            description: String::new(),
        }],
    })
}

/// Publishes the imports the way the merger does. Each test uses its own
/// VIP range so parallel tests never share an address.
fn publish(ctx: &ProxyContext, range: &str, services: Vec<Arc<FederatedService>>) {
    let view = resolve(&BTreeSet::new(), &[("mesh-a".to_owned(), services)]);
    let table = VipAllocator::new(range.parse().unwrap()).update(&view);
    ctx.shared.vips.send_replace(Arc::new(table));
}

/// A random /24 of loopback for one test: tests of this module may run
/// in several processes at once (each helper's `cargo test`), and two
/// egresses must not race for the same VIPs. Avoids the default range.
fn test_range() -> String {
    let second = 128 + rand::random::<u8>() % 120;
    format!("127.{second}.{}.0/24", rand::random::<u8>())
}

fn vip_of(ctx: &ProxyContext, fqdn: &str) -> SocketAddr {
    let table = ctx.shared.vips.borrow().clone();
    let e = table.lookup_name(fqdn).unwrap();
    SocketAddr::new(IpAddr::V4(e.vip), e.port)
}

/// Runs an egress with a catch-all listener on loopback: its address, its
/// stats and the task.
async fn run_with_catch_all(
    ctx: &ProxyContext,
) -> (SocketAddr, Arc<EgressStats>, tokio::task::JoinHandle<()>) {
    let catch_all = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = catch_all.local_addr().unwrap();
    let stats = Arc::new(EgressStats::default());
    let task = tokio::spawn(run(ctx.clone(), Some(catch_all), stats.clone()));
    (addr, stats, task)
}

/// Waits until the egress listens on `addr`.
/// Exactly one probe connection succeeds (the one that returns).
async fn wait_bound(addr: SocketAddr) {
    let what = format!("the egress to bind {addr}");
    wait_until(&what, WAIT, || async {
        TcpStream::connect(addr)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await;
}

enum Serve {
    /// HTTP/2 over TLS; answers `<:authority> <path>` plus a trailer.
    H2,
    /// Echoes bytes back.
    Echo,
}

/// A remote gateway's ingress: a real rustls server with a real
/// certificate (issued to `uri` by `ca`), accepting mesh-b clients.
struct Remote {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    snis: Arc<Mutex<Vec<Option<String>>>>,
}

async fn remote(ca: &Ca, uri: &str, clients: &TrustBundle, serve: Serve) -> Remote {
    let leaf = ca.issue_with_uris(&[uri], &[], &[]).unwrap();
    let ident = Identity::from_pem(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()).unwrap();
    let alpn: &[&[u8]] = match serve {
        Serve::H2 => &[b"h2"],
        Serve::Echo => &[],
    };
    let config =
        elsinore_certs::server_config(&ident, std::slice::from_ref(clients), alpn).unwrap();
    let acceptor = TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let snis = Arc::new(Mutex::new(Vec::new()));
    let h2 = matches!(serve, Serve::H2);
    let (count, names) = (accepted.clone(), snis.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            let names = names.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().map(str::to_owned);
                names.lock().unwrap().push(sni);
                if h2 {
                    let svc = hyper::service::service_fn(answer);
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                } else {
                    let (mut r, mut w) = tokio::io::split(tls);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    Remote {
        addr,
        accepted,
        snis,
    }
}

async fn answer(
    req: Request<hyper::body::Incoming>,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    if req.uri().path() == "/slow" {
        // Never answers: the egress's request timeout must.
        std::future::pending::<()>().await;
    }
    let text = format!(
        "{} {}",
        req.uri().authority().map(|a| a.as_str()).unwrap_or("-"),
        req.uri().path()
    );
    let mut trailers = HeaderMap::new();
    trailers.insert("x-trailer", HeaderValue::from_static("yes"));
    let frames = vec![
        Ok(Frame::data(Bytes::from(text))),
        Ok(Frame::trailers(trailers)),
    ];
    Ok(Response::new(
        StreamBody::new(futures_util::stream::iter(frames)).boxed(),
    ))
}

/// One HTTP/1.1 request on a fresh connection.
async fn h1_get(addr: SocketAddr, host: &str, path: &str) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(path)
        .header(header::HOST, host)
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn snapshot(stats: &EgressStats) -> EgressStatsSnapshot {
    stats.snapshot()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_http_requests_share_a_few_pooled_tls_connections() {
    let _limit = crate::test_support::limit();
    let w = world();
    let remote = remote(&w.ca_a, A_GATEWAY, &w.bundle_b, Serve::H2).await;
    let ctx = context(&w, ProxyTuning::default());
    publish(
        &ctx,
        &test_range(),
        vec![service(
            "ratings",
            Protocol::Http,
            19080,
            &[remote.addr],
            &[A_GATEWAY],
        )],
    );
    let stats = Arc::new(EgressStats::default());
    let task = tokio::spawn(run(ctx.clone(), None, stats.clone()));
    let vip = vip_of(&ctx, "ratings.mesh-a.global");
    wait_bound(vip).await;

    // Four waves of 50 concurrent requests: never more than 50 streams
    // in flight, half of what makes the pool dial a second connection.
    for wave in 0..4 {
        let mut requests = Vec::new();
        for i in wave * 50..(wave + 1) * 50 {
            requests.push(tokio::spawn(async move {
                // Half address the VIP, half the imported name.
                let host = if i % 2 == 0 {
                    vip.to_string()
                } else {
                    "ratings.mesh-a.global:19080".to_owned()
                };
                (i, h1_get(vip, &host, &format!("/r{i}")).await)
            }));
        }
        for r in requests {
            let (i, (status, body)) = r.await.unwrap();
            assert_eq!(status, 200, "{body}");
            assert_eq!(body, format!("ratings.mesh-a.global:19080 /r{i}"));
        }
    }

    // h2c prior knowledge from the app, with trailers coming back.
    let tcp = TcpStream::connect(vip).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("http://ratings.mesh-a.global:19080/grpc.Svc/Call")
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["x-trailer"], "yes");
    assert_eq!(
        collected.to_bytes(),
        "ratings.mesh-a.global:19080 /grpc.Svc/Call"
    );

    let accepted = remote.accepted.load(Ordering::SeqCst);
    // The pool rule (docs/data-plane.md): a new connection only when
    // there is none or every one carries 100+ streams.
    assert_eq!(accepted, 1, "{accepted} TLS connections for 201 requests");
    let s = snapshot(&stats);
    assert_eq!(s.upstream_connects, accepted);
    assert_eq!(s.requests, 201);
    assert_eq!(
        s.errors_upstream + s.errors_downstream + s.errors_internal,
        0
    );
    for sni in remote.snis.lock().unwrap().iter() {
        assert_eq!(sni.as_deref(), Some("ratings.sni.mesh-a"));
    }
    // The pool key came computed with the route table, with the SNI the
    // instance names.
    let table = ctx.shared.vips.borrow().clone();
    let entry = table.lookup_name("ratings.mesh-a.global").unwrap();
    assert!(
        entry
            .upstreams
            .iter()
            .all(|u| u.key.sni == "ratings.sni.mesh-a")
    );
    ctx.shutdown.cancel();
    task.await.unwrap();
}

// Long: four remotes with four ways of being the wrong peer share one
// egress, so the counters at the end add up over all of them.
#[tokio::test]
async fn refuses_remotes_without_the_expected_identity() {
    let _limit = crate::test_support::limit();
    let w = world();
    // Right CA, wrong workload; right CA, wrong trust domain.
    let impostor = remote(
        &w.ca_a,
        "spiffe://mesh-a.example/ns/other/sa/impostor",
        &w.bundle_b,
        Serve::H2,
    )
    .await;
    let foreign = remote(
        &w.ca_a,
        "spiffe://mesh-c.example/ns/elsinore/sa/gateway",
        &w.bundle_b,
        Serve::H2,
    )
    .await;
    let impostor_tcp = remote(
        &w.ca_a,
        "spiffe://mesh-a.example/ns/other/sa/impostor",
        &w.bundle_b,
        Serve::Echo,
    )
    .await;
    let no_san = remote(&w.ca_a, A_GATEWAY, &w.bundle_b, Serve::H2).await;
    let ctx = context(&w, ProxyTuning::default());
    publish(
        &ctx,
        &test_range(),
        vec![
            service(
                "impostor",
                Protocol::Http,
                19081,
                &[impostor.addr],
                &[A_GATEWAY],
            ),
            service(
                "foreign",
                Protocol::Http,
                19082,
                &[foreign.addr],
                &[A_GATEWAY],
            ),
            service(
                "rawimp",
                Protocol::Tcp,
                19083,
                &[impostor_tcp.addr],
                &[A_GATEWAY],
            ),
            service(
                "nosan",
                Protocol::Http,
                19084,
                &[no_san.addr],
                &["not a spiffe id"],
            ),
        ],
    );
    let stats = Arc::new(EgressStats::default());
    let task = tokio::spawn(run(ctx.clone(), None, stats.clone()));

    let vip = vip_of(&ctx, "impostor.mesh-a.global");
    wait_bound(vip).await;
    let (status, body) = h1_get(vip, "impostor.mesh-a.global", "/").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.starts_with("upstream"), "{body}");
    assert!(
        body.contains("is not one of the allowed SPIFFE IDs"),
        "{body}"
    );

    let vip = vip_of(&ctx, "foreign.mesh-a.global");
    wait_bound(vip).await;
    let (status, body) = h1_get(vip, "foreign.mesh-a.global", "/").await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("is not in trust domain mesh-a.example"),
        "{body}"
    );

    // Raw TCP: the app's connection is closed without a byte.
    let vip = vip_of(&ctx, "rawimp.mesh-a.global");
    wait_bound(vip).await;
    let mut app = TcpStream::connect(vip).await.unwrap();
    let _ = app.write_all(b"secret").await;
    let mut got = Vec::new();
    let _ = app.read_to_end(&mut got).await;
    assert!(got.is_empty());

    // No SAN to expect: we never even connect.
    let vip = vip_of(&ctx, "nosan.mesh-a.global");
    wait_bound(vip).await;
    let (status, body) = h1_get(vip, "nosan.mesh-a.global", "/").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("lists no SPIFFE ID"), "{body}");
    assert_eq!(no_san.accepted.load(Ordering::SeqCst), 0);

    let s = snapshot(&stats);
    assert_eq!(s.upstream_connects, 0);
    assert!(s.upstream_handshake_failures >= 3, "{s:?}");
    assert!(s.errors_upstream >= 4, "{s:?}");
    ctx.shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn tcp_is_spliced_over_mtls_skipping_a_dead_endpoint() {
    let _limit = crate::test_support::limit();
    let w = world();
    let echo = remote(&w.ca_a, A_GATEWAY, &w.bundle_b, Serve::Echo).await;
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let ctx = context(&w, ProxyTuning::default());
    publish(
        &ctx,
        &test_range(),
        vec![service(
            "db",
            Protocol::Mongo,
            27017,
            &[dead, echo.addr],
            &[A_GATEWAY],
        )],
    );
    let stats = Arc::new(EgressStats::default());
    let task = tokio::spawn(run(ctx.clone(), None, stats.clone()));
    let vip = vip_of(&ctx, "db.mesh-a.global");
    wait_bound(vip).await;
    // The probe's connection dials upstream too: count from after its
    // mTLS connection is up (one accepted connection, one upstream).
    wait_until("the probe's upstream connection", WAIT, || async {
        let s = snapshot(&stats);
        if s.connections == 1 && s.upstream_connects == 1 {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
    let before = snapshot(&stats).upstream_connects;
    for i in 0..4u8 {
        let mut app = TcpStream::connect(vip).await.unwrap();
        let payload = vec![i; 50_000];
        app.write_all(&payload).await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);
    }
    // One mTLS connection per client connection, the dead endpoint skipped.
    assert_eq!(snapshot(&stats).upstream_connects, before + 4);
    assert!(
        echo.snis
            .lock()
            .unwrap()
            .iter()
            .all(|s| s.as_deref() == Some("db.sni.mesh-a"))
    );
    ctx.shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn withdrawn_vip_stops_accepting() {
    let _limit = crate::test_support::limit();
    let w = world();
    let echo = remote(&w.ca_a, A_GATEWAY, &w.bundle_b, Serve::Echo).await;
    let ctx = context(&w, ProxyTuning::default());
    let keep = service("keep", Protocol::Tcp, 7001, &[echo.addr], &[A_GATEWAY]);
    let gone = service("gone", Protocol::Tcp, 7002, &[echo.addr], &[A_GATEWAY]);
    let range = test_range();
    publish(&ctx, &range, vec![keep.clone(), gone]);
    let task = tokio::spawn(run(ctx.clone(), None, Arc::new(EgressStats::default())));
    let keep_vip = vip_of(&ctx, "keep.mesh-a.global");
    let gone_vip = vip_of(&ctx, "gone.mesh-a.global");
    wait_bound(keep_vip).await;
    wait_bound(gone_vip).await;

    publish(&ctx, &range, vec![keep]);
    let what = format!("{gone_vip} to refuse connections after the withdrawal");
    wait_until(&what, WAIT, || async {
        match TcpStream::connect(gone_vip).await {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // The other import is untouched.
    let mut app = TcpStream::connect(keep_vip).await.unwrap();
    app.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    app.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
    ctx.shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn catch_all_routes_by_host() {
    let _limit = crate::test_support::limit();
    let w = world();
    let h2 = remote(&w.ca_a, A_GATEWAY, &w.bundle_b, Serve::H2).await;
    let ctx = context(&w, ProxyTuning::default());
    publish(
        &ctx,
        &test_range(),
        vec![
            service("web", Protocol::Http2, 8080, &[h2.addr], &[A_GATEWAY]),
            service("raw", Protocol::Tcp, 9000, &[h2.addr], &[A_GATEWAY]),
        ],
    );
    let (addr, stats, task) = run_with_catch_all(&ctx).await;

    let (status, body) = h1_get(addr, "WEB.mesh-a.global:8080", "/x").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "web.mesh-a.global:8080 /x");
    let (status, body) = h1_get(addr, "nope.mesh-a.global", "/").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("nope.mesh-a.global"), "{body}");
    let (status, body) = h1_get(addr, "raw.mesh-a.global", "/").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("raw.mesh-a.global is a TCP import"), "{body}");
    assert_eq!(snapshot(&stats).errors_downstream, 2);
    ctx.shutdown.cancel();
    task.await.unwrap();
}

/// A Host or :authority with userinfo gets 400 before routing, over
/// HTTP/1.1 and h2c, at a VIP and at the catch-all; nothing reaches
/// the owner.
#[tokio::test]
async fn userinfo_in_host_or_authority_is_refused() {
    let _limit = crate::test_support::limit();
    let w = world();
    let h2 = remote(&w.ca_a, A_GATEWAY, &w.bundle_b, Serve::H2).await;
    let ctx = context(&w, ProxyTuning::default());
    publish(
        &ctx,
        &test_range(),
        vec![service(
            "web",
            Protocol::Http2,
            8080,
            &[h2.addr],
            &[A_GATEWAY],
        )],
    );
    let (addr, stats, task) = run_with_catch_all(&ctx).await;
    let vip = vip_of(&ctx, "web.mesh-a.global");
    wait_bound(vip).await;

    for (at, host) in [
        (vip, "user@web.mesh-a.global:8080"),
        (vip, "user:pw@other.example"),
        (addr, "user@web.mesh-a.global:8080"),
    ] {
        let (status, body) = h1_get(at, host, "/x").await;
        assert_eq!(status, 400, "{host}: {body}");
        assert!(body.contains("userinfo"), "{body}");
    }
    // Absolute-form target, and h2c's :authority.
    let (status, body) = h1_get(vip, "web.mesh-a.global", "http://u@web.mesh-a.global/x").await;
    assert_eq!(status, 400, "{body}");
    let tcp = TcpStream::connect(vip).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("http://user@web.mesh-a.global:8080/x")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 400);

    // The same requests without userinfo go through.
    let (status, body) = h1_get(vip, "web.mesh-a.global:8080", "/x").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "web.mesh-a.global:8080 /x");
    assert_eq!(snapshot(&stats).errors_downstream, 5);
    ctx.shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn slow_remote_gets_504_and_unreachable_502() {
    let _limit = crate::test_support::limit();
    let w = world();
    let h2 = remote(&w.ca_a, A_GATEWAY, &w.bundle_b, Serve::H2).await;
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let tuning = ProxyTuning {
        request_timeout: Duration::from_millis(300),
        ..ProxyTuning::default()
    };
    let ctx = context(&w, tuning);
    publish(
        &ctx,
        &test_range(),
        vec![
            service("slow", Protocol::Grpc, 8081, &[h2.addr], &[A_GATEWAY]),
            service("down", Protocol::Http, 8082, &[dead], &[A_GATEWAY]),
        ],
    );
    let task = tokio::spawn(run(ctx.clone(), None, Arc::new(EgressStats::default())));
    let vip = vip_of(&ctx, "slow.mesh-a.global");
    wait_bound(vip).await;
    let (status, body) = h1_get(vip, "slow.mesh-a.global", "/slow").await;
    assert_eq!(status, 504, "{body}");
    assert!(body.starts_with("upstream request timed out"), "{body}");
    // The connection is still good for the next request.
    let (status, _) = h1_get(vip, "slow.mesh-a.global", "/fast").await;
    assert_eq!(status, 200);

    let vip = vip_of(&ctx, "down.mesh-a.global");
    wait_bound(vip).await;
    let (status, body) = h1_get(vip, "down.mesh-a.global", "/").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.starts_with("upstream connect failed"), "{body}");
    // A gRPC client gets a trailers-only answer with the gRPC code.
    let tcp = TcpStream::connect(vip).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("http://down.mesh-a.global/pkg.Svc/Call")
        .header(header::CONTENT_TYPE, "application/grpc")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "14");
    assert!(
        resp.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .starts_with("upstream connect failed")
    );
    ctx.shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn connections_over_the_cap_are_closed() {
    let _limit = crate::test_support::limit();
    let w = world();
    let echo = remote(&w.ca_a, A_GATEWAY, &w.bundle_b, Serve::Echo).await;
    let tuning = ProxyTuning {
        max_connections: 1,
        ..ProxyTuning::default()
    };
    let ctx = context(&w, tuning);
    publish(
        &ctx,
        &test_range(),
        vec![service(
            "capped",
            Protocol::Tcp,
            7003,
            &[echo.addr],
            &[A_GATEWAY],
        )],
    );
    let stats = Arc::new(EgressStats::default());
    let task = tokio::spawn(run(ctx.clone(), None, stats.clone()));
    let vip = vip_of(&ctx, "capped.mesh-a.global");
    // The probe holds the one slot until its splice ends: until then a
    // connection is closed at once. Retry until one is served.
    wait_bound(vip).await;
    let mut got = [0u8; 3];
    let mut first = wait_until("the probe's slot to be freed", WAIT, || async {
        let mut first = TcpStream::connect(vip).await.map_err(|e| e.to_string())?;
        first.write_all(b"one").await.map_err(|e| e.to_string())?;
        let mut got = [0u8; 3];
        match first.read_exact(&mut got).await {
            Ok(_) => Ok(first),
            Err(e) => Err(format!("closed, the slot still taken: {e}")),
        }
    })
    .await;
    let before = snapshot(&stats).refused_over_cap;
    let mut second = TcpStream::connect(vip).await.unwrap();
    let mut rest = Vec::new();
    let _ = second.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
    assert_eq!(snapshot(&stats).refused_over_cap, before + 1);
    // The first connection still works.
    first.write_all(b"two").await.unwrap();
    first.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"two");
    ctx.shutdown.cancel();
    task.await.unwrap();
}

/// The task of an HTTP connection is what every idle keep-alive client
/// costs (the bench's `idle-http` figure, target 2 KiB with the socket's
/// registration); it was 1 KiB with a span and a wrapper around the loop.
#[tokio::test]
async fn an_http_connection_task_stays_small() {
    let _limit = crate::test_support::limit();
    let w = world();
    let egress = Arc::new(Egress::new(
        context(&w, ProxyTuning::default()),
        Arc::new(EgressStats::default()),
    ));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (tcp, peer) = l.accept().await.unwrap();
    let permit = elsinore_transport::accept::Connections::new(1)
        .try_admit()
        .unwrap();
    let task = egress.serve_http(tcp, peer, Route::CatchAll, permit);
    let size = std::mem::size_of_val(&task);
    assert!(size <= 768, "HTTP connection task is {size} bytes");
}

#[tokio::test]
async fn idle_http_connections_are_closed() {
    let _limit = crate::test_support::limit();
    let w = world();
    let tuning = ProxyTuning {
        idle_timeout: Duration::from_millis(200),
        ..ProxyTuning::default()
    };
    let ctx = context(&w, tuning);
    let (addr, _, task) = run_with_catch_all(&ctx).await;
    let mut app = TcpStream::connect(addr).await.unwrap();
    app.write_all(b"GET / HTTP/1.1\r\nhost: nope.mesh-a.global\r\n\r\n")
        .await
        .unwrap();
    // The 404 arrives, then the keep-alive connection is closed for idleness.
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), app.read_to_end(&mut got))
        .await
        .expect("connection not closed after idleTimeout")
        .unwrap();
    assert!(
        got.starts_with(b"HTTP/1.1 404"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    ctx.shutdown.cancel();
    task.await.unwrap();
}

/// An app connection that sends no request is closed after
/// `requestTimeout`, not kept for `idleTimeout`.
#[tokio::test]
async fn an_app_connection_without_a_request_is_closed_after_the_request_timeout() {
    let _limit = crate::test_support::limit();
    let w = world();
    let tuning = ProxyTuning {
        request_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(3600),
        ..ProxyTuning::default()
    };
    let ctx = context(&w, tuning);
    let (addr, _, task) = run_with_catch_all(&ctx).await;
    // (A connection that opens with the h2 preface is the HTTP/2
    // server's: its preface timeout is not this loop's.)
    for sent in [&b""[..], b"GET / HTTP/1.1\r\n", b"PR"] {
        let mut app = TcpStream::connect(addr).await.unwrap();
        app.write_all(sent).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), app.read_to_end(&mut got))
            .await
            .unwrap_or_else(|_| panic!("still open after sending {sent:?}"))
            .unwrap();
        assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    }
    ctx.shutdown.cancel();
    task.await.unwrap();
}

#[test]
fn hop_by_hop_headers_and_host_are_not_forwarded() {
    let mut h = HeaderMap::new();
    h.insert(
        header::HOST,
        HeaderValue::from_static("reviews.mesh-a.global"),
    );
    h.insert(
        header::CONNECTION,
        HeaderValue::from_static("keep-alive, x-custom"),
    );
    h.insert("x-custom", HeaderValue::from_static("1"));
    let listed = elsinore_transport::http::HOP_BY_HOP.iter();
    for name in listed.chain(&elsinore_transport::http::PROXY_AUTH) {
        if *name != header::CONNECTION && *name != header::TE {
            h.insert(name, HeaderValue::from_static("x"));
        }
    }
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    h.insert("x-kept", HeaderValue::from_static("1"));
    strip_hop_by_hop(&mut h);
    assert_eq!(h.len(), 2, "{h:?}");
    assert_eq!(h[header::TE], "trailers");
    assert_eq!(h["x-kept"], "1");

    // Only Host: the common case, which skips the rest.
    let mut h = HeaderMap::new();
    h.insert(header::HOST, HeaderValue::from_static("reviews"));
    h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
    strip_hop_by_hop(&mut h);
    assert_eq!(h.len(), 1, "{h:?}");
    assert!(h.contains_key(header::ACCEPT));

    // HTTP/2 allows no `te` but `trailers`.
    let mut h = HeaderMap::new();
    h.insert(header::TE, HeaderValue::from_static("gzip"));
    strip_hop_by_hop(&mut h);
    assert!(h.is_empty(), "{h:?}");
}

#[test]
fn authority_for_the_owner() {
    let svc = service("reviews", Protocol::Http, 9080, &[], &[A_GATEWAY]);
    let view = resolve(&BTreeSet::new(), &[("mesh-a".to_owned(), vec![svc])]);
    let table = VipAllocator::new(test_range().parse().unwrap()).update(&view);
    let entry = table.lookup_name("reviews.mesh-a.global").unwrap();
    let vip = format!("{}:9080", entry.vip);
    assert_eq!(upstream_authority(None, entry), "reviews.mesh-a.global");
    assert_eq!(
        upstream_authority(Some(&vip), entry),
        "reviews.mesh-a.global:9080"
    );
    assert_eq!(
        upstream_authority(Some("localhost"), entry),
        "reviews.mesh-a.global"
    );
    assert_eq!(
        upstream_authority(Some("[::1]:80"), entry),
        "reviews.mesh-a.global:80"
    );
    assert_eq!(
        upstream_authority(Some("Reviews.Mesh-A.Global.:9080"), entry),
        "reviews.mesh-a.global:9080"
    );
    assert_eq!(
        upstream_authority(Some("gw.reviews.mesh-a.global"), entry),
        "reviews.mesh-a.global"
    );
    assert_eq!(
        upstream_authority(Some("other.example"), entry),
        "other.example"
    );
    // The memo answers as the function does, whatever Host came before.
    let memo = AuthorityMemo::default();
    for sent in [
        None,
        Some(vip.as_str()),
        Some(vip.as_str()),
        Some("other.example"),
        None,
        Some("localhost:81"),
    ] {
        assert_eq!(
            memo.get(sent, entry).unwrap().as_str(),
            upstream_authority(sent, entry),
            "Host {sent:?}"
        );
    }
    let err = memo.get(Some("bad host"), entry).unwrap_err();
    assert!(err.to_string().contains("bad host"), "{err}");
    assert_eq!(split_host("h:80"), ("h", ":80"));
    assert_eq!(split_host("h"), ("h", ""));
}

fn publish_plan(ctx: &ProxyContext, plan: TablePlan, services: Vec<Arc<FederatedService>>) {
    let view = resolve(&BTreeSet::new(), &[("mesh-a".to_owned(), services)]);
    let table = VipAllocator::with_plan(plan).update(&view);
    ctx.shared.vips.send_replace(Arc::new(table));
}

async fn wait_sync(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Never the last descriptor: beyond the budget, imports get no
/// listener and are reported; the first ones by name get theirs.
#[tokio::test]
async fn import_listeners_stay_within_the_budget() {
    let _limit = crate::test_support::limit();
    let w = world();
    let echo = remote(&w.ca_a, A_GATEWAY, &w.bundle_b, Serve::Echo).await;
    let ctx = context(
        &w,
        ProxyTuning {
            vip_listener_budget: Some(10),
            ..ProxyTuning::default()
        },
    );
    let range = test_range();
    let services: Vec<_> = (0..30)
        .map(|i| {
            service(
                &format!("s{i:02}"),
                Protocol::Tcp,
                7000,
                &[echo.addr],
                &[A_GATEWAY],
            )
        })
        .collect();
    publish(&ctx, &range, services.clone());
    let stats = Arc::new(EgressStats::default());
    let task = tokio::spawn(run(ctx.clone(), None, stats.clone()));
    wait_sync("20 imports reported beyond the budget", || {
        stats.unbound().len() == 20
    })
    .await;
    assert_eq!(stats.listeners.load(Ordering::Relaxed), 10);
    assert_eq!(stats.listener_budget.load(Ordering::Relaxed), 10);
    let unbound = stats.unbound();
    assert!(unbound.iter().all(|u| u.reason == "budget"));
    assert_eq!(unbound[0].what, "s10.mesh-a.global");
    // The first ten by name are served, the others refused.
    let mut app = TcpStream::connect(vip_of(&ctx, "s00.mesh-a.global"))
        .await
        .unwrap();
    app.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    app.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
    let refused = TcpStream::connect(vip_of(&ctx, "s29.mesh-a.global")).await;
    assert!(
        refused.is_err(),
        "an import beyond the budget has no listener"
    );
    // Fewer imports: everyone fits again.
    publish(&ctx, &range, services[20..].to_vec());
    wait_sync("every import bound", || {
        stats.unbound().is_empty() && stats.listeners.load(Ordering::Relaxed) == 10
    })
    .await;
    wait_bound(vip_of(&ctx, "s29.mesh-a.global")).await;
    ctx.shutdown.cancel();
    task.await.unwrap();
}

#[test]
fn bind_retries_back_off_exponentially() {
    let delays: Vec<u64> = (1..=9).map(|n| bind_backoff(n).as_secs()).collect();
    assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
    assert_eq!(bind_backoff(u32::MAX), BIND_RETRY_MAX);
}

/// A VIP whose port another process holds is retried with backoff, not
/// on every catalog change, and bound once the port is free.
#[tokio::test]
async fn a_failing_bind_is_not_retried_on_every_change() {
    let _limit = crate::test_support::limit();
    let w = world();
    let echo = remote(&w.ca_a, A_GATEWAY, &w.bundle_b, Serve::Echo).await;
    let ctx = context(&w, ProxyTuning::default());
    let range = test_range();
    let db = service("db", Protocol::Tcp, 7100, &[echo.addr], &[A_GATEWAY]);
    publish(&ctx, &range, vec![db.clone()]);
    let vip = vip_of(&ctx, "db.mesh-a.global");
    let squatter = std::net::TcpListener::bind(vip).unwrap();
    let stats = Arc::new(EgressStats::default());
    let task = tokio::spawn(run(ctx.clone(), None, stats.clone()));
    wait_sync("the failed bind reported", || {
        stats.unbound().first().is_some_and(|u| u.reason == "bind")
    })
    .await;
    // A burst of catalog changes (another import coming and going).
    for i in 0..50 {
        let mut services = vec![db.clone()];
        if i % 2 == 0 {
            services.push(service(
                "other",
                Protocol::Tcp,
                7101,
                &[echo.addr],
                &[A_GATEWAY],
            ));
        }
        publish(&ctx, &range, services);
        tokio::task::yield_now().await;
    }
    let failures = stats.bind_failures.load(Ordering::Relaxed);
    assert!(
        failures <= 2,
        "{failures} bind attempts for one busy VIP in a burst"
    );
    drop(squatter);
    wait_bound(vip).await;
    wait_sync("nothing unbound", || stats.unbound().is_empty()).await;
    ctx.shutdown.cancel();
    task.await.unwrap();
}

/// Import listeners bind addresses not (yet) configured on any
/// interface (IP_FREEBIND), which a plain bind refuses.
#[tokio::test]
async fn import_listeners_bind_addresses_not_on_any_interface() {
    let _limit = crate::test_support::limit();
    // TEST-NET-3: never configured on this machine.
    let addr: SocketAddr = "203.0.113.77:0".parse().unwrap();
    let nonlocal = std::fs::read_to_string("/proc/sys/net/ipv4/ip_nonlocal_bind")
        .map(|s| s.trim() == "1")
        .unwrap_or(false);
    if !nonlocal {
        let plain = std::net::TcpListener::bind(addr);
        assert_eq!(
            plain.unwrap_err().raw_os_error(),
            Some(99),
            "EADDRNOTAVAIL without freebind"
        );
    }
    let l = bind_import_listener(addr).unwrap();
    assert_eq!(l.local_addr().unwrap().ip(), addr.ip());
}

/// Shared mode: one listener per port on the bind address; HTTP imports
/// on one port routed by Host, a TCP import by its port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_mode_routes_http_by_host_and_tcp_by_port() {
    let _limit = crate::test_support::limit();
    let w = world();
    let h2 = remote(&w.ca_a, A_GATEWAY, &w.bundle_b, Serve::H2).await;
    let echo = remote(&w.ca_a, A_GATEWAY, &w.bundle_b, Serve::Echo).await;
    // A loopback address of its own, so fixed ports never clash with
    // another test process.
    let bind = std::net::Ipv4Addr::new(127, 128 + rand::random::<u8>() % 120, rand::random(), 1);
    let ctx = context(
        &w,
        ProxyTuning {
            mode: EgressMode::Shared {
                answer: crate::config::SharedAnswer::Address(bind),
                bind: IpAddr::V4(bind),
            },
            ..ProxyTuning::default()
        },
    );
    let plan = TablePlan {
        range: test_range().parse().unwrap(),
        shared: Some(crate::config::SharedAnswer::Address(bind)),
        port_overrides: Default::default(),
    };
    publish_plan(
        &ctx,
        plan,
        vec![
            service("web", Protocol::Http, 18080, &[h2.addr], &[A_GATEWAY]),
            service("api", Protocol::Grpc, 18080, &[h2.addr], &[A_GATEWAY]),
            service("db", Protocol::Tcp, 18081, &[echo.addr], &[A_GATEWAY]),
        ],
    );
    let stats = Arc::new(EgressStats::default());
    let task = tokio::spawn(run(ctx.clone(), None, stats.clone()));
    let http = SocketAddr::from((bind, 18080));
    wait_bound(http).await;
    wait_sync("two listeners", || {
        stats.listeners.load(Ordering::Relaxed) == 2
    })
    .await;
    let (status, body) = h1_get(http, "web.mesh-a.global:18080", "/w").await;
    assert_eq!((status, body.as_str()), (200, "web.mesh-a.global:18080 /w"));
    let (status, body) = h1_get(http, "API.mesh-a.global", "/a").await;
    assert_eq!((status, body.as_str()), (200, "api.mesh-a.global /a"));
    let (status, body) = h1_get(http, "db.mesh-a.global", "/").await;
    assert_eq!(status, 404, "{body}");
    let mut app = TcpStream::connect((bind, 18081)).await.unwrap();
    app.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    app.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
    ctx.shutdown.cancel();
    task.await.unwrap();
}

/// Issue 15: 100,000 imports in shared mode are served by one socket
/// per distinct port (four here), and a request still finds its import
/// by Host among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_mode_serves_100k_imports_with_a_few_sockets() {
    let _limit = crate::test_support::limit();
    const N: usize = 100_000;
    let w = world();
    let h2 = remote(&w.ca_a, A_GATEWAY, &w.bundle_b, Serve::H2).await;
    let bind = std::net::Ipv4Addr::new(127, 128 + rand::random::<u8>() % 120, rand::random(), 2);
    let answer = crate::config::SharedAnswer::Address(bind);
    let ctx = context(
        &w,
        ProxyTuning {
            mode: EgressMode::Shared {
                answer: answer.clone(),
                bind: IpAddr::V4(bind),
            },
            ..ProxyTuning::default()
        },
    );
    let services: Vec<_> = (0..N)
        .map(|i| {
            service(
                &format!("svc-{i}"),
                Protocol::Http,
                18090 + (i % 4) as u16,
                &[h2.addr],
                &[A_GATEWAY],
            )
        })
        .collect();
    let started = std::time::Instant::now();
    publish_plan(
        &ctx,
        TablePlan {
            range: test_range().parse().unwrap(),
            shared: Some(answer),
            port_overrides: Default::default(),
        },
        services,
    );
    let stats = Arc::new(EgressStats::default());
    let task = tokio::spawn(run(ctx.clone(), None, stats.clone()));
    wait_sync("four listeners", || {
        stats.listeners.load(Ordering::Relaxed) == 4
    })
    .await;
    let port = 18090 + (99_999 % 4) as u16;
    let (status, body) = h1_get(
        SocketAddr::from((bind, port)),
        "svc-99999.mesh-a.global",
        "/last",
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (200, "svc-99999.mesh-a.global /last")
    );
    println!(
        "shared mode: {N} imports published and served on {} sockets; first request answered {:?} after publishing",
        stats.listeners.load(Ordering::Relaxed),
        started.elapsed()
    );
    assert!(stats.unbound().is_empty());
    ctx.shutdown.cancel();
    task.await.unwrap();
}

/// What egress keeps per entry is made once, kept while the catalog shares
/// the entry (an unrelated import changing republishes the table), and
/// made anew when the entry's own import changes.
#[tokio::test]
async fn per_entry_routes_follow_the_entries_of_the_table() {
    let w = world();
    let ctx = context(&w, ProxyTuning::default());
    let egress = Egress::new(ctx, Arc::new(EgressStats::default()));
    let mut alloc = VipAllocator::new(test_range().parse().unwrap());
    let ratings_80 = service("ratings", Protocol::Http, 80, &[], &[A_GATEWAY]);
    let reviews = |port| service("reviews", Protocol::Http, port, &[], &[A_GATEWAY]);
    let v1 = resolve(
        &BTreeSet::new(),
        &[("mesh-a".to_owned(), vec![ratings_80.clone(), reviews(80)])],
    );
    let first = routes::View::new(Arc::new(alloc.update(&v1)));
    let entry = |v: &routes::View, name: &str| Arc::clone(v.table.lookup_name(name).unwrap());
    let ratings = egress.routes(&first, &entry(&first, "ratings.mesh-a.global"));
    assert!(Arc::ptr_eq(
        &ratings,
        &egress.routes(&first, &entry(&first, "ratings.mesh-a.global"))
    ));

    // reviews changes; ratings's entry is shared, and so are its routes.
    let v2 = resolve_reusing(
        &BTreeSet::new(),
        &[("mesh-a".to_owned(), vec![ratings_80, reviews(81)])],
        &v1,
    );
    let second = routes::View::next(Arc::new(alloc.update(&v2)), Some(&first));
    let kept = egress.routes(&second, &entry(&second, "ratings.mesh-a.global"));
    assert!(Arc::ptr_eq(&ratings, &kept));

    // ratings changes: new entry, new routes.
    let ratings_82 = service("ratings", Protocol::Http, 82, &[], &[A_GATEWAY]);
    let v3 = resolve_reusing(
        &BTreeSet::new(),
        &[("mesh-a".to_owned(), vec![ratings_82, reviews(81)])],
        &v2,
    );
    let third = routes::View::next(Arc::new(alloc.update(&v3)), Some(&second));
    let remade = egress.routes(&third, &entry(&third, "ratings.mesh-a.global"));
    assert!(!Arc::ptr_eq(&ratings, &remade));

    // An entry the view does not hold (a request that looked it up in an
    // older table) still gets routes, not kept.
    let stale = entry(&first, "ratings.mesh-a.global");
    let once = egress.routes(&third, &stale);
    assert!(!Arc::ptr_eq(&once, &egress.routes(&third, &stale)));
}
