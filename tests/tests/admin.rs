//! The admin listener's probes: `/live` always answers; `/ready` waits for
//! every dialed peer to have synced or failed once, and says which it waits for.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;

use elsinore_tests::{ConfigSpec, ExportSpec, MeshFixture, PeerSpec, WAIT, run_test, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A plain HTTP/1.1 GET; returns the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_a_peer_that_has_neither_synced_nor_failed() {
    run_test(async {
        // A "peer" that accepts TCP and never answers the TLS handshake: the
        // consumer neither syncs nor fails for the handshake timeout.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let a = MeshFixture::new("mesh-a").await;
        let b = MeshFixture::new("mesh-b").await;
        let gb = b
            .start(
                &ConfigSpec::new().peer(
                    PeerSpec::new("mesh-a", "mesh-a.test", &a.ca_pem).federation(silent_addr),
                ),
            )
            .await;
        assert_eq!(get(gb.admin_addr, "/live").await.0, 200);
        let (status, body) = get(gb.admin_addr, "/ready").await;
        assert_eq!(
            status, 503,
            "ready before the peer synced or failed: {body}"
        );
        assert!(body.contains("peer mesh-a"), "{body}");
        gb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_once_every_peer_has_synced_or_failed() {
    run_test(async {
        let a = MeshFixture::new("mesh-a").await;
        let b = MeshFixture::new("mesh-b").await;
        let c = MeshFixture::new("mesh-c").await;
        let ga = a
            .start(
                &ConfigSpec::new()
                    .export(ExportSpec::new("reviews", &["mesh-b"]))
                    .peer(b.peer()),
            )
            .await;
        // mesh-c is dialed but not running: its attempt fails, which also counts.
        let gb = b
            .start(&ConfigSpec::new().peer(a.dial()).peer(c.dial()))
            .await;
        wait_for("mesh-b ready", WAIT, || async {
            let (status, body) = get(gb.admin_addr, "/ready").await;
            if status == 200 {
                Ok(())
            } else {
                Err(format!("{status}: {body}"))
            }
        })
        .await;
        let state = gb.import_state("mesh-a").await;
        assert_eq!(state, "synced");

        // /metrics: Prometheus text with bounded labels.
        let (status, metrics) = get(gb.admin_addr, "/metrics").await;
        assert_eq!(status, 200);
        for line in [
            "elsinore_federation_consumer_imported{peer=\"mesh-a\"} 1",
            "elsinore_federation_consumer_connected{peer=\"mesh-a\"} 1",
            "elsinore_federation_consumer_connected{peer=\"mesh-c\"} 0",
            "elsinore_imports 1",
            "# TYPE elsinore_federation_consumer_acks_total counter",
        ] {
            assert!(
                metrics.lines().any(|l| l == line),
                "missing {line:?} in:\n{metrics}"
            );
        }
        let (_, owner_metrics) = get(ga.admin_addr, "/metrics").await;
        assert!(
            owner_metrics
                .lines()
                .any(|l| l == "elsinore_federation_owner_acks_total{peer=\"mesh-b\"} 1"),
            "{owner_metrics}"
        );
        gb.stop().await;
        ga.stop().await;
    })
    .await;
}
