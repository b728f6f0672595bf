//! Drain on SIGTERM, in process (`Gateway::drain` is what the binary runs
//! on the signal): with a long HTTP request and a TCP stream in flight
//! between two gateways, the owner's `/ready` fails at once, its listeners
//! keep serving for `drain.delay`, then stop accepting, idle HTTP/2 and
//! HTTP/1.1 connections are closed, the in-flight request and stream
//! complete, and the consumer keeps the owner's imports as stale.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use elsinore_tests::{
    Backend, ConfigSpec, ExportSpec, GatewayHandle, MeshFixture, WAIT, admin_get, get, http1_send,
    names, peer_client_config, run_test, tls_connect_sni, wait_for,
};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const A: &str = "mesh-a";
const B: &str = "mesh-b";
const DELAY: Duration = Duration::from_secs(4);

/// An HTTP/1.1 backend that holds every request until the gate opens.
struct Gate {
    addr: SocketAddr,
    arrived: Arc<AtomicU64>,
    open: watch::Sender<bool>,
}

impl Gate {
    async fn start() -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let arrived = Arc::new(AtomicU64::new(0));
        let (open, _) = watch::channel(false);
        let (seen, gate) = (arrived.clone(), open.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (seen, gate) = (seen.clone(), gate.subscribe());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let mut gate = gate.clone();
                        seen.fetch_add(1, Ordering::SeqCst);
                        async move {
                            let _ = gate.wait_for(|open| *open).await;
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(
                                "finished after the drain began",
                            ))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Gate {
            addr,
            arrived,
            open,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drain_lets_a_long_request_and_a_stream_finish_and_the_peer_keeps_stale_imports() {
    run_test(async {
        let a = MeshFixture::data_plane(A).await;
        let b = MeshFixture::data_plane(B).await;
        let gate = Gate::start().await;
        let fast = Backend::http1("fast").await;
        let echo = Backend::tcp_echo("echo").await;
        let ga = a
            .start(
                &ConfigSpec::new()
                    .export(
                        ExportSpec::new("slow", &[B])
                            .protocol("HTTP")
                            .port(8080)
                            .backend(&gate.addr.to_string()),
                    )
                    .export(
                        ExportSpec::new("fast", &[B])
                            .protocol("HTTP")
                            .port(8081)
                            .backend(&fast.host_port()),
                    )
                    .export(
                        ExportSpec::new("echo", &[B])
                            .protocol("TCP")
                            .port(7000)
                            .backend(&echo.host_port()),
                    )
                    .peer(b.peer())
                    .drain(&format!("{}s", DELAY.as_secs()), "20s"),
            )
            .await;
        let gb = b.start(&ConfigSpec::new().peer(a.dial())).await;
        gb.wait_imported(A, &["echo", "fast", "slow"]).await;
        let slow_vip = gb.wait_vip("slow.mesh-a.global").await;
        let echo_vip = gb.wait_vip("echo.mesh-a.global").await;
        assert_eq!(admin_get(ga.admin_addr, "/ready").await.0, 200);

        // In flight when the drain begins: a request the backend holds...
        let long = tokio::spawn(http1_send(slow_vip, get("slow.mesh-a.global", "/long")));
        wait_for("the long request to reach the backend", WAIT, || async {
            gate.arrived.load(Ordering::SeqCst) == 1
        })
        .await;
        // ... and a TCP stream, spliced through to the echo backend.
        let mut stream = TcpStream::connect(echo_vip).await.unwrap();
        const BEFORE: &[u8] = b"before the drain; ";
        stream.write_all(BEFORE).await.unwrap();
        // Bytes, not connections: wait_vip's probe of the VIP may reach the
        // echo backend too, sooner or later.
        wait_for("the stream to reach the echo backend", WAIT, || async {
            if echo.bytes_received() == BEFORE.len() as u64 {
                Ok(())
            } else {
                Err(format!("B's egress: {:?}", gb.egress_stats()))
            }
        })
        .await;

        // Idle connections of a peer straight to A's ingress: HTTP/2 and
        // HTTP/1.1, each after one finished request.
        let peer = b.issue(&b.gateway_id());
        let fast_req = || {
            hyper::Request::get("https://fast.mesh-a.global/idle")
                .body(Empty::<Bytes>::new())
                .unwrap()
        };
        let tls = tls_connect_sni(
            ga.ingress_addr(),
            peer_client_config(&peer, &a, &[b"h2"]),
            "fast.mesh-a.global",
        )
        .await
        .unwrap();
        let (mut h2, h2_conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        let h2_conn = tokio::spawn(h2_conn);
        let resp = h2.send_request(fast_req()).await.unwrap();
        assert!(resp.status().is_success());
        resp.into_body().collect().await.unwrap();
        let tls = tls_connect_sni(
            ga.ingress_addr(),
            peer_client_config(&peer, &a, &[b"http/1.1"]),
            "fast.mesh-a.global",
        )
        .await
        .unwrap();
        let (mut h1, h1_conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        let h1_conn = tokio::spawn(h1_conn);
        let mut req = fast_req();
        *req.uri_mut() = "/idle".parse().unwrap();
        req.headers_mut()
            .insert(http::header::HOST, "fast.mesh-a.global".parse().unwrap());
        let resp = h1.send_request(req).await.unwrap();
        assert!(resp.status().is_success());
        resp.into_body().collect().await.unwrap();

        // SIGTERM.
        let (a_admin, a_ingress) = (ga.admin_addr, ga.ingress_addr());
        let GatewayHandle { gateway, .. } = ga;
        let began = Instant::now();
        let drain = tokio::spawn(gateway.drain());

        // /ready fails at once...
        let (status, body) = admin_get(a_admin, "/ready").await;
        assert_eq!(
            (status, body.as_str()),
            (503, "not ready: draining for shutdown\n")
        );
        let (_, metrics) = admin_get(a_admin, "/metrics").await;
        assert!(metrics.contains("elsinore_draining 1"), "{metrics}");
        // ... while the listeners still serve: a new peer connection
        // completes its handshake and gets an answer.
        let tls = tls_connect_sni(
            a_ingress,
            peer_client_config(&peer, &a, &[b"http/1.1"]),
            "fast.mesh-a.global",
        )
        .await
        .unwrap();
        let (mut late, late_conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(late_conn);
        let mut req = fast_req();
        *req.uri_mut() = "/during-delay".parse().unwrap();
        req.headers_mut()
            .insert(http::header::HOST, "fast.mesh-a.global".parse().unwrap());
        let resp = late.send_request(req).await.unwrap();
        assert!(resp.status().is_success());
        assert!(
            began.elapsed() < DELAY,
            "the checks during drain.delay took {:?}; the test proves nothing",
            began.elapsed()
        );

        // After drain.delay the ingress stops accepting.
        wait_for("A's ingress to stop accepting", WAIT, || async {
            TcpStream::connect(a_ingress).await.is_err()
        })
        .await;
        assert!(
            began.elapsed() >= DELAY,
            "stopped accepting after {:?}, before drain.delay",
            began.elapsed()
        );
        // The admin API answers through the drain.
        assert_eq!(admin_get(a_admin, "/ready").await.0, 503);
        // Idle connections are closed: HTTP/2 by GOAWAY, HTTP/1.1 keep-alive
        // by closing it; both client connections end without an error.
        tokio::time::timeout(WAIT, h2_conn)
            .await
            .expect("the idle HTTP/2 connection was not closed")
            .unwrap()
            .unwrap();
        tokio::time::timeout(WAIT, h1_conn)
            .await
            .expect("the idle HTTP/1.1 connection was not closed")
            .unwrap()
            .unwrap();
        // The federation stream ended cleanly: B keeps A's imports, stale.
        gb.wait_state(A, "disconnected", WAIT).await;
        assert_eq!(gb.imported_names(A).await, names(&["echo", "fast", "slow"]));
        assert_eq!(
            gb.import(A).await["detail"],
            "the owner ended the stream cleanly (draining or restarting)",
            "B reads A's end as a drain, not an error"
        );
        assert!(
            !drain.is_finished(),
            "the drain did not wait for the request in flight"
        );

        // What was in flight finishes.
        gate.open.send_replace(true);
        let reply = tokio::time::timeout(WAIT, long)
            .await
            .unwrap()
            .unwrap()
            .expect("the long request failed");
        assert_eq!(
            (reply.status.as_u16(), reply.text().as_str()),
            (200, "finished after the drain began")
        );
        stream.write_all(b"after it").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, b"before the drain; after it");

        // The drain ends with them, well before drain.timeout.
        tokio::time::timeout(WAIT, drain).await.unwrap().unwrap();
        assert!(began.elapsed() < Duration::from_secs(20));
        assert_eq!(gb.import_state(A).await, "disconnected");
        assert_eq!(gb.imported_names(A).await, names(&["echo", "fast", "slow"]));
        gb.stop().await;
    })
    .await;
}
