//! End-to-end tests of the cross-mesh data plane: real gateways on loopback
//! with minted certificates, the consumer's DNS responder queried over UDP,
//! local apps talking to the consumer's egress VIPs (raw TCP, HTTP/1.1,
//! h2c, gRPC), the owner's ingress forwarding to real backends, and the
//! refusals on both sides (SNI, Host, trust domain, server SAN). Where a
//! test needs the catalog to say something an Elsinore owner would not
//! (another SAN) or the federation stream to die while the owner's ingress
//! lives, a scripted foreign owner advertises the real ingress.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, SocketAddr};

use elsinore_gateway::proxy::PEER_IDENTITY_HEADER;
use elsinore_gateway::proxy::ingress::Refusal;
use elsinore_tests::scripted::{Advertised, ScriptedOwner};
use elsinore_tests::{
    Backend, ConfigSpec, ExportSpec, GatewayHandle, MeshFixture, PeerSpec, WAIT, dns_resolve, get,
    h2_send_over, h2c_connect, h2c_exchange, http_request, http1_connect, http1_exchange,
    http1_send, http1_send_over, names, peer_client_config, run_test, tls_connect_sni, wait_for,
};
use hickory_proto::op::ResponseCode;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const A: &str = "mesh-a";
const B: &str = "mesh-b";
const C: &str = "mesh-c";

/// An export of `backend` under `name` with `protocol`, on `port`.
fn export(name: &str, protocol: &str, port: u16, backend: &Backend, peers: &[&str]) -> ExportSpec {
    ExportSpec::new(name, peers)
        .protocol(protocol)
        .port(port)
        .backend(&backend.host_port())
}

/// Owner A with `exports` (serving peer B), consumer B dialing A; returns
/// both once B imported every export.
async fn owner_and_consumer(
    a: &MeshFixture,
    b: &MeshFixture,
    exports: Vec<ExportSpec>,
) -> (GatewayHandle, GatewayHandle) {
    let names: Vec<String> = exports.iter().map(|e| e.name.clone()).collect();
    let ga = a
        .start(&ConfigSpec::new().with_exports(exports).peer(b.peer()))
        .await;
    let gb = b.start(&ConfigSpec::new().peer(a.dial())).await;
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    gb.wait_imported(A, &names).await;
    (ga, gb)
}

/// Whether the VIP is inside the fixture's `127.R1.R2.0/24`.
fn in_range(fixture: &MeshFixture, ip: IpAddr) -> bool {
    let prefix = fixture.vip_range.trim_end_matches("0/24");
    ip.to_string().starts_with(prefix)
}

/// Dials `addr` with `config` and SNI `sni`, sends the HTTP/2 preface and
/// reports whether anything came back: `Ok(())` = the server spoke,
/// `Err(what)` = the connection was refused or closed without data.
async fn probe_ingress(
    addr: SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
    sni: &str,
) -> Result<(), String> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let mut tls = tls_connect_sni(addr, config, sni)
        .await
        .map_err(|e| format!("handshake failed: {e}"))?;
    tls.write_all(PREFACE)
        .await
        .map_err(|e| format!("write failed: {e}"))?;
    tls.flush()
        .await
        .map_err(|e| format!("flush failed: {e}"))?;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(WAIT, tls.read(&mut buf)).await {
        Err(_) => Err("no answer in time".to_owned()),
        Ok(Err(e)) => Err(format!("read failed: {e}")),
        Ok(Ok(0)) => Err("closed without data".to_owned()),
        Ok(Ok(_)) => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// 1. DNS + raw TCP across, with half-close.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_service_resolves_by_dns_and_splices_across_with_half_close() {
    run_test(async {
        let a = MeshFixture::data_plane(A).await;
        let b = MeshFixture::data_plane(B).await;
        let echo = Backend::tcp_echo("echo").await;
        let (ga, gb) =
            owner_and_consumer(&a, &b, vec![export("echo", "TCP", 7000, &echo, &[B])]).await;

        // B's DNS responder, over real UDP, answers the imported name with
        // a VIP from B's range; an unknown name in the zone is NXDOMAIN.
        let ip = wait_for("B's DNS to resolve echo.mesh-a.global", WAIT, || async {
            dns_resolve(gb.dns_addr(), "echo.mesh-a.global")
                .await
                .map_err(|code| format!("answer code {code}"))
        })
        .await;
        assert!(
            in_range(&b, IpAddr::V4(ip)),
            "{ip} is not in B's {}",
            b.vip_range
        );
        assert_eq!(
            dns_resolve(gb.dns_addr(), "nothing.mesh-a.global").await,
            Err(ResponseCode::NXDomain)
        );
        let vip = SocketAddr::from((ip, 7000));
        assert_eq!(gb.wait_vip("echo.mesh-a.global").await, vip);

        // The backend answers only after our half-close reached it, so the
        // echo proves both the payload and the EOF crossed both gateways
        // while the way back stayed open.
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let before = echo.hits();
        let stream = TcpStream::connect(vip).await.expect("connect to the VIP");
        let (mut rd, mut wr) = stream.into_split();
        let writer = async {
            wr.write_all(&payload).await?;
            wr.shutdown().await?;
            Ok::<_, std::io::Error>(wr)
        };
        let reader = async {
            let mut got = Vec::new();
            rd.read_to_end(&mut got).await.map(|_| got)
        };
        let (written, got) = tokio::time::timeout(WAIT, async { tokio::join!(writer, reader) })
            .await
            .expect("the echo did not come back in time");
        written.expect("write and half-close through the VIP");
        let got = got.expect("read the echo");
        assert_eq!(got.len(), payload.len(), "echoed length");
        assert!(got == payload, "echoed bytes differ");
        assert!(echo.hits() > before, "the echo backend saw no connection");
        assert!(
            ga.ingress_stats()
                .spliced
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 1
        );

        gb.stop().await;
        ga.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 2. HTTP/1.1 across: verified identity, forged one dropped.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_reaches_backend_with_verified_identity_not_a_forged_one() {
    run_test(async {
        let a = MeshFixture::data_plane(A).await;
        let b = MeshFixture::data_plane(B).await;
        let reviews = Backend::http1("reviews").await;
        let (ga, gb) = owner_and_consumer(
            &a,
            &b,
            vec![export("reviews", "HTTP", 9080, &reviews, &[B])],
        )
        .await;
        let vip = gb.wait_vip("reviews.mesh-a.global").await;
        let b_id = b.gateway_id().to_string();

        // The app forges the identity header (and another trusted one).
        let forged = "spiffe://mesh-b.test/ns/evil/sa/forged";
        let reply = http1_send(
            vip,
            http_request(
                Method::POST,
                Some("reviews.mesh-a.global"),
                "/hello",
                &[
                    (PEER_IDENTITY_HEADER, forged),
                    ("x-forwarded-client-cert", "By=forged"),
                ],
                "ping",
            ),
        )
        .await
        .expect("request through B's egress");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let seen = reply.json();
        assert_eq!(seen["backend"], "reviews", "{seen}");
        assert_eq!(seen["identity"], b_id.as_str(), "{seen}");
        assert_eq!(seen["identities"].as_array().unwrap().len(), 1, "{seen}");
        assert_eq!(seen["body"], "ping", "{seen}");
        assert_eq!(seen["path"], "/hello", "{seen}");
        assert_eq!(seen["host"], "reviews.mesh-a.global", "{seen}");
        let request = reviews.requests().pop().expect("the backend saw it");
        assert_eq!(request.peer_identity, vec![b_id.clone()]);
        assert!(
            request.headers.get("x-forwarded-client-cert").is_none(),
            "{request:?}"
        );

        // Addressed by the VIP only: egress names the owner's FQDN (port
        // kept), so A's Host check passes.
        let reply = http1_send(vip, get(&vip.to_string(), "/by-vip"))
            .await
            .expect("request by VIP");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let seen = reply.json();
        assert_eq!(seen["host"], "reviews.mesh-a.global:9080", "{seen}");
        assert_eq!(seen["identity"], b_id.as_str(), "{seen}");
        assert_eq!(reviews.hits(), 2);

        gb.stop().await;
        ga.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 3. HTTP/2 cleartext from the app.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_from_the_app_reaches_an_http2_backend() {
    run_test(async {
        let a = MeshFixture::data_plane(A).await;
        let b = MeshFixture::data_plane(B).await;
        let ratings = Backend::h2c("ratings").await;
        let (ga, gb) = owner_and_consumer(
            &a,
            &b,
            vec![export("ratings", "HTTP2", 9081, &ratings, &[B])],
        )
        .await;
        let vip = gb.wait_vip("ratings.mesh-a.global").await;

        let mut conn = h2c_connect(vip).await.expect("h2c to B's egress");
        for i in 0..3 {
            let body = format!("stars={i}");
            let reply = h2c_exchange(
                &mut conn,
                http_request(
                    Method::POST,
                    Some("ratings.mesh-a.global:9081"),
                    &format!("/rate/{i}"),
                    &[],
                    body.clone(),
                ),
            )
            .await
            .expect("h2c request through B's egress");
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            assert_eq!(reply.version, http::Version::HTTP_2);
            let seen = reply.json();
            assert_eq!(seen["backend"], "ratings", "{seen}");
            assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
            assert_eq!(seen["body"], body.as_str(), "{seen}");
            assert_eq!(seen["path"], format!("/rate/{i}"), "{seen}");
            assert_eq!(seen["identity"], b.gateway_id().to_string(), "{seen}");
        }
        assert_eq!(ratings.hits(), 3);

        gb.stop().await;
        ga.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 4. gRPC across.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_call_crosses_with_status_and_streaming() {
    run_test(async {
        let a = MeshFixture::data_plane(A).await;
        let b = MeshFixture::data_plane(B).await;
        let details = Backend::grpc_health("details", &["elsinore.test.Details"]).await;
        let (ga, gb) = owner_and_consumer(
            &a,
            &b,
            vec![export("details", "GRPC", 9082, &details, &[B])],
        )
        .await;
        let vip = gb.wait_vip("details.mesh-a.global").await;

        let channel = tonic::transport::Endpoint::from_shared(format!("http://{vip}"))
            .unwrap()
            .connect_timeout(WAIT)
            .connect()
            .await
            .expect("tonic channel to B's egress VIP");
        let mut client = HealthClient::new(channel);
        let reply = tokio::time::timeout(
            WAIT,
            client.check(HealthCheckRequest {
                service: "elsinore.test.Details".to_owned(),
            }),
        )
        .await
        .expect("unary call in time")
        .expect("unary gRPC call through B's egress");
        assert_eq!(reply.into_inner().status(), ServingStatus::Serving);

        // A non-OK gRPC status crosses intact (trailers pass through).
        let status = tokio::time::timeout(
            WAIT,
            client.check(HealthCheckRequest {
                service: "no.such.Service".to_owned(),
            }),
        )
        .await
        .expect("unary call in time")
        .expect_err("an unknown service is NOT_FOUND");
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");

        // A server-streaming call delivers its first message.
        let mut watch = tokio::time::timeout(
            WAIT,
            client.watch(HealthCheckRequest {
                service: "elsinore.test.Details".to_owned(),
            }),
        )
        .await
        .expect("streaming call in time")
        .expect("Watch through B's egress")
        .into_inner();
        let first = tokio::time::timeout(WAIT, watch.message())
            .await
            .expect("first Watch message in time")
            .expect("Watch stream")
            .expect("a first Watch message");
        assert_eq!(first.status(), ServingStatus::Serving);
        drop(watch);

        let seen = details.requests();
        assert_eq!(seen.len(), 3, "{seen:?}");
        for request in &seen {
            assert_eq!(request.peer_identity, vec![b.gateway_id().to_string()]);
        }

        gb.stop().await;
        ga.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 5. Connection reuse between the gateways.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_requests_share_a_handful_of_connections() {
    run_test(async {
        const CLIENTS: usize = 50;
        const PER_CLIENT: usize = 10;
        let a = MeshFixture::data_plane(A).await;
        let b = MeshFixture::data_plane(B).await;
        let reviews = Backend::http1("reviews").await;
        let (ga, gb) = owner_and_consumer(
            &a,
            &b,
            vec![export("reviews", "HTTP", 9080, &reviews, &[B])],
        )
        .await;
        let vip = gb.wait_vip("reviews.mesh-a.global").await;

        let egress_before = gb.egress_stats().upstream_connects;
        let accepted = || {
            ga.ingress_stats()
                .accepted
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let ingress_before = accepted();

        let mut clients = JoinSet::new();
        for c in 0..CLIENTS {
            clients.spawn(async move {
                let mut conn = http1_connect(vip).await?;
                let mut ok = 0usize;
                for r in 0..PER_CLIENT {
                    let path = format!("/c{c}/r{r}");
                    let reply =
                        http1_exchange(&mut conn, get("reviews.mesh-a.global", &path)).await?;
                    if reply.status != StatusCode::OK {
                        return Err(format!("{path}: {} {}", reply.status, reply.text()));
                    }
                    let seen = reply.json();
                    if seen["path"] != path.as_str() {
                        return Err(format!("{path}: answered for {}", seen["path"]));
                    }
                    ok += 1;
                }
                Ok::<usize, String>(ok)
            });
        }
        let mut ok = 0;
        while let Some(joined) = clients.join_next().await {
            ok += joined
                .expect("client task")
                .expect("every request succeeds");
        }
        assert_eq!(ok, CLIENTS * PER_CLIENT);
        assert_eq!(reviews.hits(), (CLIENTS * PER_CLIENT) as u64);

        let new_upstream = gb.egress_stats().upstream_connects - egress_before;
        let new_ingress = accepted() - ingress_before;
        // The pool rule (docs/data-plane.md): a new connection only when there
        // is none or every one carries 100+ streams. 50 clients have at most
        // 50 requests in flight, so one connection carries them all.
        assert_eq!(
            new_upstream, 1,
            "B's egress opened {new_upstream} TLS connections to A for {ok} requests"
        );
        assert_eq!(
            new_ingress, 1,
            "A's ingress accepted {new_ingress} connections for {ok} requests"
        );

        gb.stop().await;
        ga.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 6. Refusals at ingress: by SNI and by Host.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_refuses_a_service_not_exported_to_the_peer_by_sni_and_by_host() {
    run_test(async {
        let a = MeshFixture::data_plane(A).await;
        let b = MeshFixture::data_plane(B).await;
        let c = MeshFixture::data_plane(C).await;
        let reviews = Backend::http1("reviews").await;
        let secret = Backend::http1("secret").await;
        let ga = a
            .start(
                &ConfigSpec::new()
                    .export(export("reviews", "HTTP", 9080, &reviews, &[B]))
                    .export(export("secret", "HTTP", 9081, &secret, &[C]))
                    .peer(b.peer())
                    .peer(c.peer()),
            )
            .await;
        let ingress = ga.ingress_addr();
        let b_cert = b.issue(&b.gateway_id());
        let h2 = peer_client_config(&b_cert, &a, &[b"h2"]);
        let h1 = peer_client_config(&b_cert, &a, &[b"http/1.1"]);
        let stats = ga.ingress_stats();

        // Control: mesh-b reaches what it was given, dialing A directly.
        let tls = tls_connect_sni(ingress, h2.clone(), "reviews.mesh-a.global")
            .await
            .expect("mTLS to A's ingress");
        let reply = h2_send_over(tls, get("reviews.mesh-a.global", "/ok"))
            .await
            .expect("allowed request");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["identity"], b.gateway_id().to_string());

        // By SNI: closed without a byte of application data, and counted.
        let before = stats.refused(Refusal::Unauthorized);
        let outcome = probe_ingress(ingress, h2.clone(), "secret.mesh-a.global").await;
        assert!(outcome.is_err(), "A answered mesh-b on secret's SNI");
        wait_for("the unauthorized refusal to be counted", WAIT, || async {
            stats.refused(Refusal::Unauthorized) == before + 1
        })
        .await;

        // By Host, over HTTP/2 and HTTP/1.1: SNI of the allowed service,
        // Host of the other → 421, and nothing reaches the backend.
        let misdirected = stats.misdirected.load(std::sync::atomic::Ordering::Relaxed);
        let tls = tls_connect_sni(ingress, h2.clone(), "reviews.mesh-a.global")
            .await
            .expect("mTLS to A's ingress");
        let reply = h2_send_over(tls, get("secret.mesh-a.global", "/steal"))
            .await
            .expect("an answer to the misdirected request");
        assert_eq!(
            reply.status,
            StatusCode::MISDIRECTED_REQUEST,
            "{}",
            reply.text()
        );
        let tls = tls_connect_sni(ingress, h1, "reviews.mesh-a.global")
            .await
            .expect("mTLS to A's ingress (http/1.1)");
        let reply = http1_send_over(tls, get("secret.mesh-a.global:9081", "/steal"))
            .await
            .expect("an answer to the misdirected request");
        assert_eq!(
            reply.status,
            StatusCode::MISDIRECTED_REQUEST,
            "{}",
            reply.text()
        );
        assert_eq!(
            stats.misdirected.load(std::sync::atomic::Ordering::Relaxed),
            misdirected + 2
        );

        assert_eq!(secret.hits(), 0, "the secret backend was reached");
        assert_eq!(reviews.hits(), 1);
        ga.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 7. A certificate from a trusted CA naming another trust domain.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_refuses_a_trusted_ca_certificate_of_another_trust_domain() {
    run_test(async {
        let a = MeshFixture::data_plane(A).await;
        let b = MeshFixture::data_plane(B).await;
        let c = MeshFixture::data_plane(C).await;
        let echo = Backend::http1("reviews").await;
        let ga = a
            .start(
                &ConfigSpec::new()
                    .export(export("reviews", "HTTP", 9080, &echo, &[B, C]))
                    .peer(b.peer())
                    .peer(c.peer()),
            )
            .await;
        let ingress = ga.ingress_addr();
        let stats = ga.ingress_stats();
        let sni = "reviews.mesh-a.global";

        // Control: mesh-b's own identity is let in.
        let legit = peer_client_config(&b.issue(&b.gateway_id()), &a, &[b"h2"]);
        probe_ingress(ingress, legit, sni)
            .await
            .expect("mesh-b's gateway certificate is accepted");

        // Mesh-b's CA signing an identity of a domain that is no peer.
        let stranger = MeshFixture::spiffe_id("mesh-z.test", "/ns/elsinore/sa/gateway");
        let config = peer_client_config(&b.issue(&stranger), &a, &[b"h2"]);
        let unknown = stats.refused(Refusal::UnknownPeer);
        let outcome = probe_ingress(ingress, config, sni).await;
        assert!(outcome.is_err(), "A let {stranger} in");
        wait_for("the unknown_peer refusal to be counted", WAIT, || async {
            stats.refused(Refusal::UnknownPeer) == unknown + 1
        })
        .await;

        // Mesh-b's CA signing an identity of mesh-c, a peer with its own CA.
        let impostor = c.gateway_id();
        let config = peer_client_config(&b.issue(&impostor), &a, &[b"h2"]);
        let failed = stats.refused(Refusal::HandshakeFailed);
        let outcome = probe_ingress(ingress, config, sni).await;
        assert!(outcome.is_err(), "A let a mesh-b-signed {impostor} in");
        wait_for(
            "the handshake_failed refusal to be counted",
            WAIT,
            || async { stats.refused(Refusal::HandshakeFailed) == failed + 1 },
        )
        .await;

        assert_eq!(echo.hits(), 0);
        ga.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 8. Egress refuses a remote certificate without the advertised SAN.
// ---------------------------------------------------------------------------

/// Mesh A's real gateway (exports `reviews` and `ratings` to B, advertising
/// its real ingress), and mesh B's gateway importing from a scripted owner
/// that speaks for mesh-a (a workload of mesh-a.test) and advertises A's
/// ingress with the `sans` the test chooses per service.
struct ScriptedSetup {
    ga: GatewayHandle,
    gb: GatewayHandle,
    owner: ScriptedOwner,
    reviews: Backend,
    ratings: Backend,
}

async fn scripted_setup(
    a: &MeshFixture,
    b: &MeshFixture,
    reviews_sans: Vec<String>,
) -> ScriptedSetup {
    let reviews = Backend::http1("reviews").await;
    let ratings = Backend::http1("ratings").await;
    let ga = a
        .start(
            &ConfigSpec::new()
                .export(export("reviews", "HTTP", 9080, &reviews, &[B]))
                .export(export("ratings", "HTTP", 9081, &ratings, &[B]))
                .peer(b.peer()),
        )
        .await;
    let mut owner = ScriptedOwner::start(a, &b.bundle()).await;
    let gb = b
        .start(
            &ConfigSpec::new().snapshot_quiet_period("300ms").peer(
                PeerSpec::new(A, a.trust_domain.as_str(), &a.ca_pem)
                    .federation(owner.addr())
                    .any_identity(),
            ),
        )
        .await;
    owner.accept().await;
    let endpoint = ga.ingress_addr();
    owner
        .publish(&[
            Advertised {
                name: "reviews",
                fqdn: "reviews.mesh-a.global",
                endpoint,
                sni: "reviews.mesh-a.global",
                sans: reviews_sans,
                port: 9080,
                protocol: "HTTP",
            },
            Advertised {
                name: "ratings",
                fqdn: "ratings.mesh-a.global",
                endpoint,
                sni: "ratings.mesh-a.global",
                sans: vec![a.gateway_id().to_string()],
                port: 9081,
                protocol: "HTTP",
            },
        ])
        .await;
    // Not `wait_imported`: it also waits for `snapshotComplete`, which a
    // quiet-period snapshot that removes nothing never publishes (see the
    // report on gateway/src/federation/consumer.rs `on_tick`).
    wait_for(
        "B to import ratings and reviews from the scripted owner",
        WAIT,
        || async {
            let got = gb.imported_names(A).await;
            (got == names(&["ratings", "reviews"]))
                .then_some(())
                .ok_or(format!("imports from {A}: {got:?}"))
        },
    )
    .await;
    ScriptedSetup {
        ga,
        gb,
        owner,
        reviews,
        ratings,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_refuses_a_remote_certificate_without_the_advertised_san() {
    run_test(async {
        let a = MeshFixture::data_plane(A).await;
        let b = MeshFixture::data_plane(B).await;
        let wrong = MeshFixture::spiffe_id("mesh-a.test", "/ns/other/sa/impostor").to_string();
        let s = scripted_setup(&a, &b, vec![wrong.clone()]).await;

        // Control: the same catalog source, endpoint and CA, with the SAN
        // A's certificate really carries, goes through.
        let vip = s.gb.wait_vip("ratings.mesh-a.global").await;
        let reply = http1_send(vip, get("ratings.mesh-a.global", "/ok"))
            .await
            .expect("request for ratings");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(s.ratings.hits(), 1);

        // A's certificate (spiffe://mesh-a.test/ns/elsinore/sa/gateway) is
        // not what the catalog allows for reviews: 502, nothing sent.
        let failures = s.gb.egress_stats().upstream_handshake_failures;
        let authorized =
            s.ga.ingress_stats()
                .authorized
                .load(std::sync::atomic::Ordering::Relaxed);
        let vip = s.gb.wait_vip("reviews.mesh-a.global").await;
        let reply = http1_send(vip, get("reviews.mesh-a.global", "/leak"))
            .await
            .expect("an answer from B's egress");
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
        assert_eq!(
            reply
                .headers
                .get("x-elsinore-error")
                .and_then(|v| v.to_str().ok()),
            Some("handshake_failed"),
            "{reply:?}"
        );
        assert!(
            reply.text().contains(&wrong),
            "the error should name the allowed SAN: {}",
            reply.text()
        );
        assert!(s.gb.egress_stats().upstream_handshake_failures > failures);
        assert_eq!(s.reviews.hits(), 0, "the request reached the backend");
        assert_eq!(
            s.ga.ingress_stats()
                .authorized
                .load(std::sync::atomic::Ordering::Relaxed),
            authorized,
            "A's ingress admitted a connection B should have refused"
        );

        s.owner.cut();
        s.gb.stop().await;
        s.ga.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 9. A withdrawn import stops routing; a stale one keeps routing.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawn_import_stops_routing_and_resolving() {
    run_test(async {
        let a = MeshFixture::data_plane(A).await;
        let b = MeshFixture::data_plane(B).await;
        let reviews = Backend::http1("reviews").await;
        let ratings = Backend::http1("ratings").await;
        let keep = export("reviews", "HTTP", 9080, &reviews, &[B]);
        let (mut ga, gb) = owner_and_consumer(
            &a,
            &b,
            vec![
                keep.clone(),
                export("ratings", "HTTP", 9081, &ratings, &[B]),
            ],
        )
        .await;
        let ratings_vip = gb.wait_vip("ratings.mesh-a.global").await;
        let reviews_vip = gb.wait_vip("reviews.mesh-a.global").await;
        let reply = http1_send(ratings_vip, get("ratings.mesh-a.global", "/"))
            .await
            .expect("ratings before the withdrawal");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

        ga.rewrite_exports(vec![keep]);
        gb.wait_imported(A, &["reviews"]).await;
        wait_for("ratings to stop resolving", WAIT, || async {
            match dns_resolve(gb.dns_addr(), "ratings.mesh-a.global").await {
                Err(ResponseCode::NXDomain) => Ok(()),
                other => Err(format!("DNS answered {other:?}")),
            }
        })
        .await;
        wait_for("ratings' VIP to refuse connections", WAIT, || async {
            match TcpStream::connect(ratings_vip).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
                other => Err(format!("connect {ratings_vip}: {other:?}")),
            }
        })
        .await;
        assert_eq!(ratings.hits(), 1);

        // The other import is untouched.
        let reply = http1_send(reviews_vip, get("reviews.mesh-a.global", "/"))
            .await
            .expect("reviews after the withdrawal");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(
            dns_resolve(gb.dns_addr(), "reviews.mesh-a.global")
                .await
                .map(|ip| SocketAddr::from((ip, 9080))),
            Ok(reviews_vip)
        );

        gb.stop().await;
        ga.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_import_keeps_routing_after_the_federation_stream_is_lost() {
    run_test(async {
        let a = MeshFixture::data_plane(A).await;
        let b = MeshFixture::data_plane(B).await;
        let s = scripted_setup(&a, &b, vec![a.gateway_id().to_string()]).await;
        let vip = s.gb.wait_vip("reviews.mesh-a.global").await;
        let reply = http1_send(vip, get("reviews.mesh-a.global", "/before"))
            .await
            .expect("request while synced");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

        // The catalog source goes away; A's ingress stays up.
        s.owner.cut();
        wait_for("B to notice the lost stream", WAIT, || async {
            let state = s.gb.import_state(A).await;
            if state == "synced" || state == "syncing" {
                Err(format!("state is still {state}"))
            } else {
                Ok(())
            }
        })
        .await;
        assert_eq!(s.gb.imported_names(A).await.len(), 2, "stale imports kept");

        let reply = http1_send(vip, get("reviews.mesh-a.global", "/while-stale"))
            .await
            .expect("request while stale");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["path"], "/while-stale");
        assert_eq!(
            dns_resolve(s.gb.dns_addr(), "reviews.mesh-a.global")
                .await
                .map(|ip| SocketAddr::from((ip, 9080))),
            Ok(vip)
        );
        assert_eq!(s.reviews.hits(), 2);

        s.gb.stop().await;
        s.ga.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 10. Three meshes: two consumers of one owner.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_each_reach_the_owner_through_their_own_egress() {
    run_test(async {
        let a = MeshFixture::data_plane(A).await;
        let b = MeshFixture::data_plane(B).await;
        let c = MeshFixture::data_plane(C).await;
        let reviews = Backend::http1("reviews").await;
        let ga = a
            .start(
                &ConfigSpec::new()
                    .export(export("reviews", "HTTP", 9080, &reviews, &[B, C]))
                    .peer(b.peer())
                    .peer(c.peer()),
            )
            .await;
        let gb = b.start(&ConfigSpec::new().peer(a.dial())).await;
        let gc = c.start(&ConfigSpec::new().peer(a.dial())).await;
        for (fixture, gateway) in [(&b, &gb), (&c, &gc)] {
            gateway.wait_imported(A, &["reviews"]).await;
            let ip = wait_for("the consumer's DNS to resolve reviews", WAIT, || async {
                dns_resolve(gateway.dns_addr(), "reviews.mesh-a.global")
                    .await
                    .map_err(|code| format!("answer code {code}"))
            })
            .await;
            assert!(
                in_range(fixture, IpAddr::V4(ip)),
                "{ip} for {}",
                fixture.name
            );
            let vip = gateway.wait_vip("reviews.mesh-a.global").await;
            assert_eq!(vip, SocketAddr::from((ip, 9080)));
            let reply = http1_send(
                vip,
                get("reviews.mesh-a.global", &format!("/{}", fixture.name)),
            )
            .await
            .expect("request through the consumer's egress");
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            let seen = reply.json();
            assert_eq!(seen["identity"], fixture.gateway_id().to_string(), "{seen}");
            assert_eq!(seen["path"], format!("/{}", fixture.name), "{seen}");
        }
        assert_eq!(reviews.hits(), 2);

        gc.stop().await;
        gb.stop().await;
        ga.stop().await;
    })
    .await;
}
