//! Who may speak for a peer (`peers[].identities`, issue 13 item 3): a
//! certificate that chains to the peer's bundle only proves its holder is
//! some workload of the peer's mesh. These tests present such workloads to
//! mesh A's federation listener and ingress, and point mesh B's consumer at
//! an owner whose ID it does not allow; each refusal has a control with the
//! allowed identity on the same gateway, so the refusal is the identity
//! rule's doing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use elsinore_gateway::proxy::ingress::Refusal;
use elsinore_tests::dataplane::{Backend, peer_client_config, tls_connect_sni};
use elsinore_tests::{
    ConfigSpec, ExportSpec, GatewayHandle, MeshFixture, WAIT, establish_v1alpha2, grpc_channel,
    mtls_client_config, run_test, wait_for,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const A: &str = "mesh-a";
const B: &str = "mesh-b";
const C: &str = "mesh-c";

/// A workload of mesh-b and of mesh-c (not their gateways).
const B_WORKLOAD: &str = "/ns/prod/sa/web";
const C_WORKLOAD: &str = "/ns/edge/sa/federation";

/// Opens a v1alpha2 stream to `addr` with `config` and waits for the
/// owner's first message; `Err` is the status it failed with.
async fn try_stream(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<(), tonic::Status> {
    let channel = grpc_channel(addr, config)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("dial: {e}")))?;
    let mut stream = establish_v1alpha2(channel, "identity-test", &[]).await?;
    match tokio::time::timeout(Duration::from_secs(10), stream.rx.message()).await {
        Err(_) => Err(tonic::Status::deadline_exceeded("no snapshot within 10s")),
        Ok(Err(status)) => Err(status),
        Ok(Ok(None)) => Err(tonic::Status::aborted("stream closed without a message")),
        Ok(Ok(Some(_))) => Ok(()),
    }
}

/// `GET /metrics` from the admin listener, the body only.
async fn metrics(admin: SocketAddr) -> String {
    let exchange = async {
        let mut s = TcpStream::connect(admin).await.expect("connect to admin");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .await
            .expect("send GET /metrics");
        let mut text = String::new();
        s.read_to_string(&mut text).await.expect("read /metrics");
        text
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("/metrics answered in time")
}

/// The value of the sample `line_prefix` (name and labels) in `text`.
fn sample(text: &str, line_prefix: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix)?.trim().parse().ok())
}

/// Dials A's ingress with `config` and SNI `sni`, sends an HTTP/1.1
/// request and reads the answer: `Ok(status line)` or `Err(how it ended)`.
async fn ingress_get(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    sni: &str,
) -> Result<String, String> {
    let mut tls = tls_connect_sni(addr, config, sni)
        .await
        .map_err(|e| format!("handshake failed: {e}"))?;
    let request = format!("GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write failed: {e}"))?;
    let mut reply = Vec::new();
    match tokio::time::timeout(WAIT, tls.read_to_end(&mut reply)).await {
        Err(_) => Err("no answer in time".to_owned()),
        Ok(Err(e)) if reply.is_empty() => Err(format!("read failed: {e}")),
        Ok(_) if reply.is_empty() => Err("closed without data".to_owned()),
        Ok(_) => Ok(String::from_utf8_lossy(&reply)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()),
    }
}

/// Mesh A exporting `reviews` to B and C; B with the default identities
/// (its gateway), C allowing one workload only.
async fn owner(
    a: &MeshFixture,
    b: &MeshFixture,
    c: &MeshFixture,
    backend: &Backend,
) -> GatewayHandle {
    let c_workload = MeshFixture::spiffe_id(c.trust_domain.as_str(), C_WORKLOAD);
    a.start(
        &ConfigSpec::new()
            .export(
                ExportSpec::new("reviews", &[B, C])
                    .port(9080)
                    .backend(&backend.host_port()),
            )
            .peer(b.peer())
            .peer(c.peer().identity(c_workload)),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_of_the_peers_trust_domain_may_not_open_the_stream() {
    run_test(async {
        let (a, b, c) = (
            MeshFixture::new(A).await,
            MeshFixture::new(B).await,
            MeshFixture::new(C).await,
        );
        let backend = Backend::http1("reviews").await;
        let ga = owner(&a, &b, &c, &backend).await;
        let addr = a.federation_addr;

        // mesh-b's CA, mesh-b's trust domain, but not mesh-b's gateway.
        let workload = MeshFixture::spiffe_id(b.trust_domain.as_str(), B_WORKLOAD);
        let status = try_stream(addr, mtls_client_config(&b.issue(&workload), &a))
            .await
            .expect_err("A must refuse a stream from a workload of mesh-b");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains(&workload.to_string()) && status.message().contains(B),
            "the refusal names the identity and the peer: {status:?}"
        );
        assert_eq!(
            ga.owner(B).await["streamsTotal"],
            0,
            "no stream reached A as mesh-b"
        );

        // Control: the peer's gateway (the default) is let in.
        try_stream(addr, mtls_client_config(&b.issue(&b.gateway_id()), &a))
            .await
            .expect("A serves mesh-b's gateway");

        // mesh-c lists one workload: it replaces the default, so mesh-c's
        // gateway is refused and that workload is served.
        let status = try_stream(addr, mtls_client_config(&c.issue(&c.gateway_id()), &a))
            .await
            .expect_err("mesh-c's gateway is not in mesh-c's identities");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        let c_workload = MeshFixture::spiffe_id(c.trust_domain.as_str(), C_WORKLOAD);
        try_stream(addr, mtls_client_config(&c.issue(&c_workload), &a))
            .await
            .expect("A serves mesh-c's listed identity");

        let text = metrics(ga.admin_addr).await;
        assert_eq!(
            sample(
                &text,
                "elsinore_federation_refused_total{reason=\"identity_not_allowed\"}"
            ),
            Some(2),
            "{text}"
        );
        ga.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_of_the_peers_trust_domain_may_not_reach_the_ingress() {
    run_test(async {
        let (a, b, c) = (
            MeshFixture::data_plane(A).await,
            MeshFixture::data_plane(B).await,
            MeshFixture::data_plane(C).await,
        );
        let backend = Backend::http1("reviews").await;
        let ga = owner(&a, &b, &c, &backend).await;
        let ingress = ga.ingress_addr();
        let stats = ga.ingress_stats();
        let sni = "reviews.mesh-a.global";

        let workload = MeshFixture::spiffe_id(b.trust_domain.as_str(), B_WORKLOAD);
        let config = peer_client_config(&b.issue(&workload), &a, &[b"http/1.1"]);
        let outcome = ingress_get(ingress, config, sni).await;
        assert!(outcome.is_err(), "A let {workload} in: {outcome:?}");
        wait_for(
            "the identity_not_allowed refusal to be counted",
            WAIT,
            || async { stats.refused(Refusal::IdentityNotAllowed) == 1 },
        )
        .await;
        assert_eq!(backend.hits(), 0, "nothing reached the backend");

        // Control: mesh-b's gateway reaches the export.
        let config = peer_client_config(&b.issue(&b.gateway_id()), &a, &[b"http/1.1"]);
        let status = ingress_get(ingress, config, sni)
            .await
            .expect("mesh-b's gateway is served");
        assert!(status.contains("200"), "{status}");

        // mesh-c: its gateway is not listed, its listed workload is.
        let config = peer_client_config(&c.issue(&c.gateway_id()), &a, &[b"http/1.1"]);
        assert!(ingress_get(ingress, config, sni).await.is_err());
        wait_for("the second refusal to be counted", WAIT, || async {
            stats.refused(Refusal::IdentityNotAllowed) == 2
        })
        .await;
        let c_workload = MeshFixture::spiffe_id(c.trust_domain.as_str(), C_WORKLOAD);
        let config = peer_client_config(&c.issue(&c_workload), &a, &[b"http/1.1"]);
        let status = ingress_get(ingress, config, sni)
            .await
            .expect("mesh-c's listed identity is served");
        assert!(status.contains("200"), "{status}");
        assert_eq!(backend.hits(), 2);

        let text = metrics(ga.admin_addr).await;
        assert_eq!(
            sample(
                &text,
                "elsinore_ingress_refused_total{reason=\"identity_not_allowed\"}"
            ),
            Some(2),
            "{text}"
        );
        ga.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_dial_refuses_an_owner_that_is_not_an_allowed_identity() {
    run_test(async {
        let (a, b) = (MeshFixture::new(A).await, MeshFixture::new(B).await);
        let ga = a
            .start(
                &ConfigSpec::new()
                    .export(ExportSpec::new("reviews", &[B]))
                    .peer(b.peer()),
            )
            .await;
        // B allows only a workload of mesh-a to speak for it; A's gateway
        // presents spiffe://mesh-a.test/ns/elsinore/sa/gateway.
        let only = MeshFixture::spiffe_id(a.trust_domain.as_str(), "/ns/other/sa/owner");
        let gb = b
            .start(&ConfigSpec::new().peer(a.dial().identity(&only)))
            .await;
        // Each attempt fails in B's TLS handshake (A's certificate is not
        // an allowed ID), so B retries and no stream ever reaches A.
        wait_for("B to retry its dial of A twice", WAIT, || async {
            let consumer = gb.consumer(A).await;
            if consumer["reconnects"].as_u64().unwrap_or(0) >= 2 {
                Ok(())
            } else {
                Err(consumer.to_string())
            }
        })
        .await;
        assert_ne!(gb.consumer(A).await["state"], "synced");
        assert_eq!(ga.owner(B).await["streamsTotal"], 0, "no stream reached A");
        assert!(gb.imported_names(A).await.is_empty());
        gb.stop().await;

        // Control: the default (A's gateway) syncs.
        let gb = b.start(&ConfigSpec::new().peer(a.dial())).await;
        gb.wait_imported(A, &["reviews"]).await;
        gb.stop().await;
        ga.stop().await;
    })
    .await;
}
