//! A hostile owner against a real consumer gateway (issue 13, items 1 and
//! 2): an owner built from the generated v1alpha2 stubs, speaking for
//! mesh-a, sends names no peer may claim (cluster-local, an IP literal,
//! a name under another peer's more specific suffix, one of our own
//! export names), entries over the per-peer limits, and a message over
//! `limits.messageBytes`. Each is refused naming its rule, a valid entry
//! sent after them is imported and answered in DNS, and an import held
//! from before keeps routing to its backend through egress the whole time.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use elsinore_certs::Identity;
use elsinore_federation_api::proto::federation::resourcediscovery::v1alpha2 as rd2;
use elsinore_federation_api::proto::federation::types::v1alpha2 as t2;
use elsinore_tests::foreign::{OwnerStreamV2, STEP, delete_v2, serve_v2, upsert_v2};
use elsinore_tests::scripted::Advertised;
use elsinore_tests::{
    Backend, ConfigSpec, ExportSpec, GatewayHandle, MeshFixture, PeerSpec, WAIT, dns_query, get,
    http1_send, names, run_test, wait_for,
};
use hickory_proto::rr::RecordType;
use http::StatusCode;
use tokio::sync::mpsc;

const A: &str = "mesh-a";
const B: &str = "mesh-b";
const C: &str = "mesh-c";

/// B's limits for peer A: small enough to hit in a test.
const LIMITS: &str = "{ services: 3, instancesPerService: 2, messageBytes: 65536 }";

/// The owner's side of one stream: sends one UPSERT or DELETE at a time
/// and reads Elsinore's answer to it.
struct Hostile {
    stream: OwnerStreamV2,
    context: String,
    nonce: u64,
}

impl Hostile {
    async fn accept(streams: &mut mpsc::Receiver<OwnerStreamV2>) -> Hostile {
        let mut stream = tokio::time::timeout(STEP, streams.recv())
            .await
            .expect("B never opened a stream to the hostile owner")
            .expect("the hostile owner's server stopped");
        let first = stream.recv().await.expect("B's first request");
        assert!(first.status.is_none(), "{first:?}");
        Hostile {
            context: first.context,
            stream,
            nonce: 0,
        }
    }

    async fn answer(&mut self, response: rd2::StreamResponse) -> rd2::StreamRequest {
        let nonce = response.nonce.clone();
        self.stream.send(response).await.expect("send a response");
        let reply = self.stream.recv().await.expect("B's answer");
        assert_eq!(reply.response_nonce, nonce, "{reply:?}");
        reply
    }

    fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        format!("h-{}", self.nonce)
    }

    async fn upsert(&mut self, service: &t2::FederatedService) -> rd2::StreamRequest {
        let nonce = self.next_nonce();
        let response = upsert_v2(&nonce, &self.context, service);
        self.answer(response).await
    }

    async fn acked(&mut self, service: &t2::FederatedService) {
        let reply = self.upsert(service).await;
        assert!(
            reply.status.as_ref().is_none_or(|s| s.code == 0),
            "B NACKed {}: {reply:?}",
            service.name
        );
    }

    /// Expects a NACK whose message names `rule`.
    async fn nacked(&mut self, service: &t2::FederatedService, rule: &str) {
        let reply = self.upsert(service).await;
        let status = reply
            .status
            .unwrap_or_else(|| panic!("B ACKed {}", service.name));
        assert_ne!(status.code, 0, "B ACKed {}", service.name);
        assert!(
            status.message.contains(rule),
            "the NACK of {} should name {rule:?}: {:?}",
            service.name,
            status.message
        );
    }

    async fn delete(&mut self, name: &str) {
        let nonce = self.next_nonce();
        let reply = self.answer(delete_v2(&nonce, &self.context, name)).await;
        assert!(
            reply.status.as_ref().is_none_or(|s| s.code == 0),
            "{reply:?}"
        );
    }
}

/// A service routed to A's `reviews` export (A's ingress routes on the SNI).
fn service(a: &MeshFixture, ga: &GatewayHandle, name: &str, fqdn: &str) -> t2::FederatedService {
    Advertised {
        name,
        fqdn,
        endpoint: ga.ingress_addr(),
        sni: "reviews.mesh-a.global",
        sans: vec![a.gateway_id().to_string()],
        port: 9080,
        protocol: "HTTP",
    }
    .to_wire()
}

async fn reviews_routes(gb: &GatewayHandle, backend: &Backend, when: &str) {
    let before = backend.hits();
    let vip = gb.wait_vip("reviews.mesh-a.global").await;
    let reply = http1_send(vip, get("reviews.mesh-a.global", "/still-there"))
        .await
        .unwrap_or_else(|e| panic!("request for reviews {when}: {e}"));
    assert_eq!(reply.status, StatusCode::OK, "{when}: {}", reply.text());
    assert_eq!(backend.hits(), before + 1, "{when}");
}

async fn resolves(gb: &GatewayHandle, name: &str) -> bool {
    !dns_query(gb.dns_addr(), name, RecordType::A)
        .await
        .answers
        .is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_owner_is_refused_rule_by_rule_while_valid_imports_keep_routing() {
    run_test(async {
        let a = MeshFixture::data_plane(A).await;
        let b = MeshFixture::data_plane(B).await;
        let c = MeshFixture::new(C).await;
        let reviews = Backend::http1("reviews").await;
        let ga = a
            .start(
                &ConfigSpec::new()
                    .export(
                        ExportSpec::new("reviews", &[B])
                            .port(9080)
                            .backend(&reviews.host_port()),
                    )
                    .peer(b.peer()),
            )
            .await;
        let id = MeshFixture::spiffe_id(a.trust_domain.as_str(), "/ns/hamlet/sa/hostile-owner");
        let issued = a.issue(&id);
        let identity =
            Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
        let (server, mut streams) = serve_v2(&identity, &b.bundle()).await.unwrap();
        let gb = b
            .start(
                &ConfigSpec::new()
                    .snapshot_quiet_period("300ms")
                    // A local export of B (seen by A): its name is B's alone.
                    .export(ExportSpec::new("ledger", &[A]))
                    .peer(
                        PeerSpec::new(A, a.trust_domain.as_str(), &a.ca_pem)
                            .federation(server.addr)
                            // The hostile owner is the identity this peer
                            // speaks with (peers[].identities): what it
                            // may claim is the point here, not who it is.
                            .identity(&id)
                            .key("limits", LIMITS),
                    )
                    .peer(c.peer().key("allowedNames", "[mesh-c.global]")),
            )
            .await;

        let mut owner = Hostile::accept(&mut streams).await;
        owner
            .acked(&service(&a, &ga, "reviews", "reviews.mesh-a.global"))
            .await;
        reviews_routes(&gb, &reviews, "once imported").await;

        // Names no peer may claim, and one only mesh-c may.
        for (name, fqdn, rule) in [
            (
                "k8s",
                "kubernetes.default.svc.cluster.local",
                "fqdn \"kubernetes.default.svc.cluster.local\" is under the cluster-local zone cluster.local, which no peer may claim",
            ),
            ("ip", "10.0.0.1", "fqdn \"10.0.0.1\" is an IP literal"),
            (
                "stars",
                "stars.mesh-c.global",
                "under mesh-c.global, which peer mesh-c may claim",
            ),
            (
                "ledger",
                "ledger.mesh-b.global",
                "the name of one of this mesh's own exports",
            ),
            ("elsewhere", "x.example.com", "allowedNames: global"),
        ] {
            owner.nacked(&service(&a, &ga, name, fqdn), rule).await;
        }

        // Too many instances in one service.
        let mut many = service(&a, &ga, "many", "many.mesh-a.global");
        for id in ["v2", "v3"] {
            let mut extra = many.instances[0].clone();
            extra.id = id.to_owned();
            many.instances.push(extra);
        }
        owner
            .nacked(&many, "instances: 3, more than limits.instancesPerService")
            .await;

        // Too many services: the fourth new name is refused, an update of
        // a held one is not, and room made by a delete is usable again.
        owner.acked(&service(&a, &ga, "s2", "s2.mesh-a.global")).await;
        owner.acked(&service(&a, &ga, "s3", "s3.mesh-a.global")).await;
        owner
            .nacked(
                &service(&a, &ga, "s4", "s4.mesh-a.global"),
                "more than limits.services allows for peer mesh-a (3)",
            )
            .await;
        owner
            .acked(&service(&a, &ga, "reviews", "reviews.mesh-a.global"))
            .await;
        owner.delete("s3").await;
        owner
            .acked(&service(&a, &ga, "after", "after.mesh-a.global"))
            .await;

        wait_for("B to import after and resolve it", WAIT, || async {
            let got = gb.imported_names(A).await;
            if got != names(&["after", "reviews", "s2"]) {
                return Err(format!("imports from {A}: {got:?}"));
            }
            if !resolves(&gb, "after.mesh-a.global").await {
                return Err("after.mesh-a.global does not resolve".to_owned());
            }
            Ok(())
        })
        .await;
        for refused in ["kubernetes.default.svc.cluster.local", "stars.mesh-c.global"] {
            assert!(!resolves(&gb, refused).await, "{refused} resolves");
        }
        reviews_routes(&gb, &reviews, "after the refusals").await;

        // A message over limits.messageBytes: tonic refuses it before
        // decoding; B says so (RESOURCE_EXHAUSTED, no nonce could be read)
        // and ends the stream, keeping what it holds.
        let mut big = service(&a, &ga, "big", "big.mesh-a.global");
        big.description = "x".repeat(100_000);
        let nonce = owner.next_nonce();
        owner
            .stream
            .send(upsert_v2(&nonce, &owner.context, &big))
            .await
            .unwrap();
        let last = owner.stream.recv().await.expect("B's refusal");
        let status = last.status.expect("a status");
        assert_eq!(status.code, tonic::Code::ResourceExhausted as i32, "{status:?}");
        assert!(
            status.message.contains("limits.messageBytes (65536)"),
            "{status:?}"
        );
        assert!(last.response_nonce.is_empty());
        assert!(owner.stream.recv().await.is_err(), "the stream should end");
        reviews_routes(&gb, &reviews, "with the stream lost").await;

        // B dials again (backoff) and the owner replays its catalog.
        let mut owner = Hostile::accept(&mut streams).await;
        for (name, fqdn) in [
            ("after", "after.mesh-a.global"),
            ("reviews", "reviews.mesh-a.global"),
            ("s2", "s2.mesh-a.global"),
        ] {
            owner.acked(&service(&a, &ga, name, fqdn)).await;
        }
        wait_for("B to sync the replayed catalog", WAIT, || async {
            let consumer = gb.consumer(A).await;
            let got = gb.imported_names(A).await;
            (consumer["connected"] == true && got == names(&["after", "reviews", "s2"]))
                .then_some(())
                .ok_or(format!("{consumer}; imports {got:?}"))
        })
        .await;
        reviews_routes(&gb, &reviews, "after the reconnect").await;

        // Every refusal was counted by its rule, in /peers and /metrics.
        let expected = [
            ("cluster-local", 1),
            ("ip-literal", 1),
            ("other-peer", 1),
            ("local-export", 1),
            ("allowed-names", 1),
            ("limits.instancesPerService", 1),
            ("limits.services", 1),
            ("limits.messageBytes", 1),
        ];
        let refused = gb.consumer(A).await["refused"].clone();
        for (rule, n) in expected {
            assert_eq!(refused[rule], n, "{rule}: {refused}");
        }
        // What B holds from A and refused, as `elsinore catalog --as-peer`
        // shows it; and what A receives from B.
        let seen = gb.get_json(&format!("/catalog?peer={A}")).await;
        assert_eq!(seen["receives"][0]["fqdn"], "ledger.mesh-b.global", "{seen:#}");
        let held: Vec<(String, String)> = seen["held"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["name"].as_str().unwrap().to_owned(), e["state"].as_str().unwrap().to_owned()))
            .collect();
        assert_eq!(
            held,
            [("after", "imported"), ("reviews", "imported"), ("s2", "imported")]
                .map(|(n, s)| (n.to_owned(), s.to_owned())),
            "{seen:#}"
        );
        let refused: Vec<(String, String)> = seen["refused"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["name"].as_str().unwrap().to_owned(), e["rule"].as_str().unwrap().to_owned()))
            .collect();
        assert_eq!(
            refused,
            [
                ("k8s", "cluster-local"),
                ("ip", "ip-literal"),
                ("stars", "other-peer"),
                ("ledger", "local-export"),
                ("elsewhere", "allowed-names"),
                ("many", "limits.instancesPerService"),
                ("s4", "limits.services"),
            ]
            .map(|(n, r)| (n.to_owned(), r.to_owned())),
            "{seen:#}"
        );
        let metrics = http1_send(gb.admin_addr, get("127.0.0.1", "/metrics"))
            .await
            .unwrap()
            .text();
        for (rule, n) in expected {
            let line =
                format!("elsinore_imports_refused_total{{peer=\"{A}\",rule=\"{rule}\"}} {n}");
            assert!(metrics.contains(&line), "no {line:?} in /metrics");
        }

        drop(owner);
        drop(server);
        gb.stop().await;
        ga.stop().await;
    })
    .await;
}
