//! Federation between real Elsinore gateways on loopback: snapshot on
//! connect, live changes from config reloads, per-peer visibility, owner
//! and consumer restarts, stale imports and the on-disk cache, both API
//! versions, three meshes, a large catalog through the window, and aliasing
//! of an import that collides with a local export. Everything is observed
//! through the admin API over HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use elsinore_federation_api::message::{SNAPSHOT_SIZE_HEADER, WINDOW_HEADER};
use elsinore_tests::{
    ConfigSpec, ExportSpec, MeshFixture, WAIT, establish_v1alpha2, grpc_channel,
    mtls_client_config, names, run_test, wait_for,
};
use tokio::time::Instant;

const A: &str = "mesh-a";
const B: &str = "mesh-b";
const C: &str = "mesh-c";

fn fqdns(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(n, f)| ((*n).to_owned(), (*f).to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_on_connect() {
    run_test(async {
        let a = MeshFixture::new(A).await;
        let b = MeshFixture::new(B).await;
        let ga = a
            .start(
                &ConfigSpec::new()
                    .export(ExportSpec::new("reviews", &[B]))
                    .export(ExportSpec::new("ratings", &[B]))
                    .peer(b.peer()),
            )
            .await;
        let gb = b.start(&ConfigSpec::new().peer(a.dial())).await;

        gb.wait_imported(A, &["ratings", "reviews"]).await;
        gb.wait_state(A, "synced", WAIT).await;
        assert_eq!(
            gb.imported_fqdns(A).await,
            fqdns(&[
                ("ratings", "ratings.mesh-a.global"),
                ("reviews", "reviews.mesh-a.global")
            ])
        );
        for (name, entry) in gb.imported(A).await {
            assert_eq!(entry["aliased"], false, "{name}: {entry}");
            assert_eq!(entry["originalFqdn"], entry["fqdn"], "{name}: {entry}");
        }
        // The endpoint is A's advertised ingress, and the SAN A's gateway ID.
        let reviews = gb
            .imported_service(A, "reviews")
            .expect("reviews in B's state");
        assert_eq!(reviews.endpoints[0].address, "127.0.0.1");
        assert_eq!(reviews.endpoints[0].port, 15443);
        assert_eq!(reviews.sans, vec![a.gateway_id().to_string()]);

        let consumer = gb.consumer(A).await;
        assert_eq!(consumer["connected"], true, "{consumer}");
        assert!(consumer["acks"].as_u64().unwrap() >= 2, "{consumer}");
        assert_eq!(consumer["nacks"], 0, "{consumer}");
        assert_eq!(consumer["imported"], 2, "{consumer}");
        let owner = ga.owner(B).await;
        assert_eq!(owner["streamsOpen"], 1, "{owner}");
        assert!(owner["acks"].as_u64().unwrap() >= 2, "{owner}");
        // B exports nothing, so A imports nothing (and does not dial B).
        assert!(ga.imported_names(B).await.is_empty());
        assert_eq!(ga.import_state(B).await, "idle");

        gb.stop().await;
        ga.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upsert_and_delete_follow_config_reload() {
    run_test(async {
        let a = MeshFixture::new(A).await;
        let b = MeshFixture::new(B).await;
        let mut ga = a
            .start(
                &ConfigSpec::new()
                    .export(ExportSpec::new("reviews", &[B]).port(9080))
                    .export(ExportSpec::new("ratings", &[B]))
                    .peer(b.peer()),
            )
            .await;
        let gb = b.start(&ConfigSpec::new().peer(a.dial())).await;
        gb.wait_imported(A, &["ratings", "reviews"]).await;

        // Add `details`, change `reviews` (fqdn and port), remove `ratings`,
        // by editing the file the gateway watches.
        ga.rewrite_exports(vec![
            ExportSpec::new("reviews", &[B])
                .port(9090)
                .fqdn("reviews-v2.mesh-a.global"),
            ExportSpec::new("details", &[B]),
        ]);
        wait_for("B to follow A's reloaded exports", WAIT, || async {
            let got = gb.imported_fqdns(A).await;
            let want = fqdns(&[
                ("details", "details.mesh-a.global"),
                ("reviews", "reviews-v2.mesh-a.global"),
            ]);
            if got == want {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        })
        .await;
        let reviews = gb
            .imported_service(A, "reviews")
            .expect("reviews in B's state");
        assert_eq!(reviews.instances[0].port(), Some(9090));
        // A's own view agrees: the reload happened, not a restart.
        let exported: Vec<String> = ga.catalog().await["exports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(exported, ["details", "reviews"]);
        assert_eq!(gb.consumer(A).await["reconnects"], 0);

        gb.stop().await;
        ga.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sees_only_what_was_exported_to_it() {
    run_test(async {
        let a = MeshFixture::new(A).await;
        let b = MeshFixture::new(B).await;
        let c = MeshFixture::new(C).await;
        let ga = a
            .start(
                &ConfigSpec::new()
                    .export(ExportSpec::new("x", &[B]))
                    .export(ExportSpec::new("y", &[C]))
                    .export(ExportSpec::new("z", &[B, C]))
                    .peer(b.peer())
                    .peer(c.peer()),
            )
            .await;
        let gb = b.start(&ConfigSpec::new().peer(a.dial())).await;
        let gc = c.start(&ConfigSpec::new().peer(a.dial())).await;

        gb.wait_imported(A, &["x", "z"]).await;
        gc.wait_imported(A, &["y", "z"]).await;
        // Nothing else trickles in afterwards (e.g. a late upsert of y to B).
        let b_total = gb.consumer(A).await["messages"].as_u64().unwrap();
        assert_eq!(
            b_total, 2,
            "B received messages for services not exported to it"
        );
        let c_total = gc.consumer(A).await["messages"].as_u64().unwrap();
        assert_eq!(
            c_total, 2,
            "C received messages for services not exported to it"
        );

        gc.stop().await;
        gb.stop().await;
        ga.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_restart_reconciles_to_the_current_catalog() {
    run_test(async {
        let a = MeshFixture::new(A).await;
        let b = MeshFixture::new(B).await;
        let before = ConfigSpec::new()
            .export(ExportSpec::new("x", &[B]))
            .export(ExportSpec::new("y", &[B]))
            .peer(b.peer());
        let ga = a.start(&before).await;
        let gb = b.start(&ConfigSpec::new().peer(a.dial())).await;
        gb.wait_imported(A, &["x", "y"]).await;

        ga.stop().await;
        let after =
            before.with_exports(vec![ExportSpec::new("y", &[B]), ExportSpec::new("z", &[B])]);
        // Same federation port: B finds A where it was.
        let ga = a.start(&after).await;
        assert_eq!(ga.federation_addr, a.federation_addr);

        // x is gone (removed by reconciliation after the new snapshot), z is new.
        gb.wait_imported(A, &["y", "z"]).await;
        gb.wait_state(A, "synced", WAIT).await;
        let consumer = gb.consumer(A).await;
        assert!(consumer["reconnects"].as_u64().unwrap() >= 1, "{consumer}");
        assert_eq!(consumer["connected"], true, "{consumer}");

        gb.stop().await;
        ga.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_imports_are_kept_within_stale_after_then_dropped() {
    run_test(async {
        let a = MeshFixture::new(A).await;
        let b = MeshFixture::new(B).await;
        let ga = a
            .start(
                &ConfigSpec::new()
                    .export(ExportSpec::new("x", &[B]))
                    .peer(b.peer()),
            )
            .await;
        let gb = b
            .start(&ConfigSpec::new().peer(a.dial()).stale_after("4s"))
            .await;
        gb.wait_imported(A, &["x"]).await;

        // The staleness clock starts when B loses the stream: after `lost_from`
        // (A begins to stop) and before B reports the loss (`lost_by`).
        let lost_from = Instant::now();
        ga.stop().await;
        wait_for(
            "B to notice the lost stream and keep serving x",
            Duration::from_secs(3),
            || async {
                let import = gb.import(A).await;
                let names_now = gb.imported_names(A).await;
                if import["state"] == "disconnected" && names_now == names(&["x"]) {
                    Ok(())
                } else {
                    Err(format!("imports.mesh-a = {import}"))
                }
            },
        )
        .await;
        let lost_by = Instant::now();

        // Poll closely until x is gone. A read that finished before
        // `lost_from + staleAfter` must still see x (served until staleAfter);
        // the first read without x must come promptly after `lost_by + staleAfter`.
        const STALE_AFTER: Duration = Duration::from_secs(4);
        // Timer, catalog publication and one admin round trip on a loaded machine.
        const PROMPTLY: Duration = Duration::from_millis(1500);
        let gone_at = loop {
            let asked = Instant::now();
            let names_now = gb.imported_names(A).await;
            let answered = Instant::now();
            if names_now.is_empty() {
                break answered;
            }
            assert_eq!(names_now, names(&["x"]));
            assert!(
                answered < lost_by + STALE_AFTER + PROMPTLY,
                "x still served {:?} after B reported the lost stream (staleAfter 4s)",
                asked - lost_by
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            gone_at >= lost_from + STALE_AFTER,
            "x was dropped {:?} after the stream was lost, before staleAfter (4s)",
            gone_at - lost_from
        );
        assert!(
            gone_at <= lost_by + STALE_AFTER + PROMPTLY,
            "x was dropped {:?} after B reported the lost stream, later than staleAfter (4s) + {PROMPTLY:?}",
            gone_at - lost_by
        );
        assert_eq!(gb.consumer(A).await["imported"], 0);

        gb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_restart_with_owner_down_serves_cached_imports() {
    run_test(async {
        let a = MeshFixture::new(A).await;
        let b = MeshFixture::new(B).await;
        let ga = a
            .start(
                &ConfigSpec::new()
                    .export(ExportSpec::new("x", &[B]))
                    .export(ExportSpec::new("y", &[B]))
                    .peer(b.peer()),
            )
            .await;
        let b_spec = ConfigSpec::new().peer(a.dial()).cache_dir(&b.cache_dir());
        let gb = b.start(&b_spec).await;
        gb.wait_imported(A, &["x", "y"]).await;

        gb.stop().await;
        ga.stop().await;
        assert!(
            std::fs::read_dir(b.cache_dir()).unwrap().next().is_some(),
            "B wrote nothing to its cache directory"
        );

        let gb = b.start(&b_spec).await;
        wait_for(
            "B to serve x and y from its cache",
            Duration::from_secs(5),
            || async {
                let import = gb.import(A).await;
                let state = import["state"].as_str().unwrap_or_default().to_owned();
                let names_now = gb.imported_names(A).await;
                if names_now == names(&["x", "y"])
                    && (state == "connecting" || state == "disconnected")
                {
                    Ok(())
                } else {
                    Err(format!("imports.mesh-a = {import}"))
                }
            },
        )
        .await;
        assert_eq!(
            gb.imported_fqdns(A).await,
            fqdns(&[("x", "x.mesh-a.global"), ("y", "y.mesh-a.global")])
        );
        assert_eq!(gb.consumer(A).await["connected"], false);

        gb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1alpha1_consumer_imports_and_sees_deletes() {
    run_test(async {
        let a = MeshFixture::new(A).await;
        let b = MeshFixture::new(B).await;
        let mut ga = a
            .start(
                &ConfigSpec::new()
                    .export(ExportSpec::new("x", &[B]))
                    .export(ExportSpec::new("y", &[B]))
                    .peer(b.peer()),
            )
            .await;
        let gb = b
            .start(&ConfigSpec::new().peer(a.dial().api_version("v1alpha1")))
            .await;
        assert_eq!(gb.peer_entry(A).await["apiVersion"], "v1alpha1");

        gb.wait_imported(A, &["x", "y"]).await;
        assert_eq!(
            gb.imported_fqdns(A).await,
            fqdns(&[("x", "x.mesh-a.global"), ("y", "y.mesh-a.global")])
        );
        ga.rewrite_exports(vec![ExportSpec::new("x", &[B])]);
        gb.wait_imported(A, &["x"]).await;
        let consumer = gb.consumer(A).await;
        assert_eq!(consumer["nacks"], 0, "{consumer}");
        assert_eq!(consumer["reconnects"], 0, "{consumer}");

        gb.stop().await;
        ga.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_meshes_federate_pairwise() {
    run_test(async {
        let meshes = [
            MeshFixture::new(A).await,
            MeshFixture::new(B).await,
            MeshFixture::new(C).await,
        ];
        let mut gateways = Vec::new();
        for (i, mesh) in meshes.iter().enumerate() {
            let others: Vec<&MeshFixture> = meshes
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, m)| m)
                .collect();
            let other_names: Vec<&str> = others.iter().map(|m| m.name.as_str()).collect();
            let mut spec = ConfigSpec::new().export(ExportSpec::new(
                &format!("svc-{}", &mesh.name[5..]),
                &other_names,
            ));
            for other in &others {
                spec = spec.peer(other.dial());
            }
            gateways.push(mesh.start(&spec).await);
        }
        for (i, gateway) in gateways.iter().enumerate() {
            for (j, other) in meshes.iter().enumerate() {
                if i != j {
                    let svc = format!("svc-{}", &other.name[5..]);
                    gateway.wait_imported(&other.name, &[&svc]).await;
                    assert_eq!(
                        gateway.imported_fqdns(&other.name).await,
                        fqdns(&[(&svc, &format!("{svc}.{}.global", other.name))])
                    );
                }
            }
        }
        for gateway in gateways {
            gateway.stop().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_catalog_arrives_completely_through_the_window() {
    run_test(async {
        const N: usize = 2000;
        let a = MeshFixture::new(A).await;
        let b = MeshFixture::new(B).await;
        let exports: Vec<ExportSpec> = (0..N)
            .map(|i| ExportSpec::new(&format!("svc-{i:04}"), &[B]))
            .collect();
        let ga = a
            .start(&ConfigSpec::new().with_exports(exports).peer(b.peer()))
            .await;
        let gb = b.start(&ConfigSpec::new().peer(a.dial())).await;

        wait_for(
            "B to import all 2000 services",
            Duration::from_secs(40),
            || async {
                let import = gb.import(A).await;
                let n = import["services"].as_array().map_or(0, Vec::len);
                if n == N && import["snapshotComplete"] == true {
                    Ok(())
                } else {
                    Err(format!(
                        "{n} services, snapshotComplete {}",
                        import["snapshotComplete"]
                    ))
                }
            },
        )
        .await;
        let consumer = gb.consumer(A).await;
        assert!(
            consumer["messages"].as_u64().unwrap() >= N as u64,
            "{consumer}"
        );
        assert!(consumer["acks"].as_u64().unwrap() >= N as u64, "{consumer}");
        assert_eq!(consumer["nacks"], 0, "{consumer}");
        let owner = ga.owner(B).await;
        assert!(owner["sent"].as_u64().unwrap() >= N as u64, "{owner}");

        // The window is really open: a client of mesh-b that asks for 64
        // gets 64 granted and receives many messages before its first ACK
        // (with a window of one, the second message would never come).
        let identity = b.issue(&b.gateway_id());
        let channel = grpc_channel(a.federation_addr, mtls_client_config(&identity, &a))
            .await
            .expect("dial A as mesh-b");
        let mut stream = establish_v1alpha2(channel, "window-probe", &[(WINDOW_HEADER, "64")])
            .await
            .expect("open a stream to A");
        let granted = stream
            .headers
            .get(WINDOW_HEADER)
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(granted.as_deref(), Some("64"));
        let size = stream
            .headers
            .get(SNAPSHOT_SIZE_HEADER)
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(size, Some(N.to_string()));
        for i in 0..64 {
            let message = tokio::time::timeout(Duration::from_secs(5), stream.rx.message())
                .await
                .unwrap_or_else(|_| panic!("message {i} of the window did not arrive without ACKs"))
                .expect("stream healthy")
                .expect("stream open");
            assert!(message.response.is_some());
        }
        drop(stream);

        gb.stop().await;
        ga.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_colliding_with_a_local_export_is_aliased() {
    run_test(async {
        let a = MeshFixture::new(A).await;
        let b = MeshFixture::new(B).await;
        let ga = a
            .start(
                &ConfigSpec::new()
                    .export(ExportSpec::new("ratings", &[B]).fqdn("ratings.shared.global"))
                    .export(ExportSpec::new("reviews", &[B]))
                    .peer(b.peer()),
            )
            .await;
        // B imports `ratings`, then exports a service with the same FQDN
        // (sent after B's export exists, the entry would be refused: rule
        // local-export, see hostile_owner.rs).
        let mut gb = b.start(&ConfigSpec::new().peer(a.dial())).await;
        gb.wait_imported(A, &["ratings", "reviews"]).await;
        gb.rewrite_exports(vec![
            ExportSpec::new("ratings", &[A]).fqdn("ratings.shared.global"),
        ]);
        wait_for("B to alias A's ratings", WAIT, || async {
            let imported = gb.imported(A).await;
            (imported
                .get("ratings")
                .is_some_and(|r| r["aliased"] == true))
            .then_some(())
            .ok_or(format!("{imported:?}"))
        })
        .await;

        let imported = gb.imported(A).await;
        let ratings = &imported["ratings"];
        assert_eq!(ratings["aliased"], true, "{ratings}");
        assert_eq!(ratings["fqdn"], "ratings.mesh-a.global", "{ratings}");
        assert_eq!(
            ratings["originalFqdn"], "ratings.shared.global",
            "{ratings}"
        );
        assert_eq!(imported["reviews"]["aliased"], false);
        assert_eq!(imported["reviews"]["fqdn"], "reviews.mesh-a.global");

        let catalog = gb.catalog().await;
        let collisions = catalog["collisions"].as_array().expect("collisions list");
        assert_eq!(collisions.len(), 1, "{catalog:#}");
        let collision = &collisions[0];
        assert_eq!(collision["peer"], A, "{collision}");
        assert_eq!(collision["name"], "ratings", "{collision}");
        assert_eq!(collision["fqdn"], "ratings.shared.global", "{collision}");
        assert!(
            collision["resolution"]
                .as_str()
                .unwrap_or_default()
                .contains("ratings.mesh-a.global"),
            "{collision}"
        );
        // B's local export keeps its name.
        assert_eq!(catalog["exports"][0]["fqdn"], "ratings.shared.global");
        // A does not dial B, so it imports nothing and reports no collision.
        assert!(
            ga.catalog().await["collisions"]
                .as_array()
                .unwrap()
                .is_empty()
        );

        gb.stop().await;
        ga.stop().await;
    })
    .await;
}

/// A DNS server on loopback (UDP) that knows one name: A queries for it get
/// `ip`, other types of it get an empty answer, every other name NXDOMAIN.
/// Returns its address and how many queries asked for the name.
async fn one_name_dns_server(
    name: &'static str,
    ip: std::net::Ipv4Addr,
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use hickory_proto::op::{Message, Metadata, ResponseCode};
    use hickory_proto::rr::rdata::A as ARecord;
    use hickory_proto::rr::{RData, Record, RecordType};

    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let asked = Arc::new(AtomicUsize::new(0));
    let count = asked.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let Ok(request) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut response = Message::response(request.metadata.id, request.metadata.op_code);
            response.metadata = Metadata::response_from_request(&request.metadata);
            response.add_queries(request.queries.iter().cloned());
            for query in &request.queries {
                let asked_name = query.name().to_ascii().to_ascii_lowercase();
                if asked_name.trim_end_matches('.') != name {
                    response.metadata.response_code = ResponseCode::NXDomain;
                    continue;
                }
                count.fetch_add(1, Ordering::SeqCst);
                if query.query_type() == RecordType::A {
                    response.add_answer(Record::from_rdata(
                        query.name().clone(),
                        60,
                        RData::A(ARecord(ip)),
                    ));
                }
            }
            let _ = socket.send_to(&response.to_vec().unwrap(), from).await;
        }
    });
    (addr, asked)
}

/// A peer's `federation` address given as a DNS name is resolved through
/// DNS: the gateway's resolver is pointed at a DNS server this test runs,
/// which alone knows the name (it is in no hosts file and no other server
/// would answer it offline). The name is not `localhost`, which would skip
/// DNS for the OS resolver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_address_given_as_a_name_is_resolved() {
    run_test(async {
        const NAME: &str = "gateway.mesh-a.federation.test";
        let (dns, asked) = one_name_dns_server(NAME, std::net::Ipv4Addr::LOCALHOST).await;
        // This test has the process to itself under nextest (and no other
        // test in this file resolves a name), so the resolver is not built yet.
        elsinore_gateway::dns::resolver::use_name_servers(&[dns])
            .expect("point the gateway's resolver at the test's DNS server");

        let a = MeshFixture::new(A).await;
        let b = MeshFixture::new(B).await;
        let ga = a
            .start(
                &ConfigSpec::new()
                    .export(ExportSpec::new("reviews", &[B]))
                    .peer(b.peer()),
            )
            .await;
        let by_name = a
            .peer()
            .federation(format!("{NAME}:{}", a.federation_addr.port()));
        let gb = b.start(&ConfigSpec::new().peer(by_name)).await;
        gb.wait_imported(A, &["reviews"]).await;
        assert!(
            asked.load(Ordering::SeqCst) >= 1,
            "B imported from A without asking the DNS server for {NAME}"
        );
        gb.stop().await;
        ga.stop().await;
    })
    .await;
}
