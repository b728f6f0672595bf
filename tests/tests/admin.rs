//! The admin listener's probes: `/live` always answers; `/ready` waits for
//! every dialed peer to have synced or failed once, and says which it waits for.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;

use elsinore_tests::{
    ConfigSpec, ExportSpec, MeshFixture, PeerSpec, WAIT, admin_get, run_test, wait_for,
};

/// A TCP relay to `target` that holds every connection, unanswered, until
/// `gate` is opened, then carries it both ways.
async fn gated_relay(target: SocketAddr, gate: tokio::sync::watch::Receiver<bool>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let mut gate = gate.clone();
            tokio::spawn(async move {
                if gate.wait_for(|open| *open).await.is_err() {
                    return;
                }
                let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    addr
}

/// `/ready` answers 503, naming the peer, for as long as a dialed peer has
/// neither synced nor failed (its TLS handshake is held), and 200 once that
/// same peer has synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_a_peer_that_has_neither_synced_nor_failed() {
    run_test(async {
        let a = MeshFixture::new("mesh-a").await;
        let b = MeshFixture::new("mesh-b").await;
        let ga = a
            .start(
                &ConfigSpec::new()
                    .export(ExportSpec::new("reviews", &["mesh-b"]))
                    .peer(b.peer()),
            )
            .await;
        let (open, gate) = tokio::sync::watch::channel(false);
        let relay = gated_relay(ga.federation_addr, gate).await;
        let gb = b
            .start(
                &ConfigSpec::new()
                    .peer(PeerSpec::new("mesh-a", "mesh-a.test", &a.ca_pem).federation(relay)),
            )
            .await;
        assert_eq!(admin_get(gb.admin_addr, "/live").await.0, 200);
        // Not ready, again and again, while the handshake is held (well
        // within handshakeTimeout, 10s: the attempt neither syncs nor fails).
        let held_since = std::time::Instant::now();
        let mut probes = 0;
        while held_since.elapsed() < std::time::Duration::from_secs(2) {
            let (status, body) = admin_get(gb.admin_addr, "/ready").await;
            assert_eq!(
                (status, body.as_str()),
                (503, "not ready: waiting for peer mesh-a\n"),
                "while mesh-a's handshake is held"
            );
            assert_eq!(gb.import_state("mesh-a").await, "connecting");
            probes += 1;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(probes >= 3, "{probes} probes");

        open.send_replace(true);
        wait_for("mesh-b ready once mesh-a synced", WAIT, || async {
            let (status, body) = admin_get(gb.admin_addr, "/ready").await;
            if status == 200 {
                Ok(body)
            } else {
                Err(format!("{status}: {body}"))
            }
        })
        .await;
        // Ready because the peer synced, not because its attempt failed.
        assert_eq!(gb.import_state("mesh-a").await, "synced");
        gb.wait_imported("mesh-a", &["reviews"]).await;
        gb.stop().await;
        ga.stop().await;
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
            let (status, body) = admin_get(gb.admin_addr, "/ready").await;
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
        let (status, metrics) = admin_get(gb.admin_addr, "/metrics").await;
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
        let (_, owner_metrics) = admin_get(ga.admin_addr, "/metrics").await;
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
