//! Wire compatibility with a foreign Hamlet implementation: a scripted peer
//! built only from the generated stubs (see `elsinore_tests::foreign`) exchanges
//! catalogs with real Elsinore gateways over real mTLS on loopback, in both
//! API versions and both roles. The foreign peer sends none of Elsinore's
//! metadata extensions, so these tests pin down how Elsinore behaves with a
//! peer that only knows the published spec: one message in flight, snapshot
//! completion without a size header, NACKs with reasons, DELETE encodings.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

use elsinore_certs::{Identity, TrustBundle};
use elsinore_federation_api::proto::federation::resourcediscovery::{
    v1alpha1 as rd1, v1alpha2 as rd2,
};
use elsinore_federation_api::proto::federation::types::{v1alpha1 as t1, v1alpha2 as t2};
use elsinore_tests::foreign::{
    self, CODE_OK, ConsumerV1, ConsumerV2, STEP, TYPE_URL_V1, TYPE_URL_V2, delete_v1, delete_v2,
    dial, response_v1, serve_v1, serve_v2, service_v1, service_v2, upsert_v2,
};
use elsinore_tests::{
    ConfigSpec, ExportSpec, GatewayHandle, MeshFixture, WAIT, names, run_test, wait_for,
};
use prost::Message;
use serde_json::Value;
use std::time::Duration;

const SNAPSHOT_SIZE_HEADER: &str = "elsinore-snapshot-size";
const WINDOW_HEADER: &str = "elsinore-window";
/// The foreign mesh: its fixture name is also its peer name in Elsinore's
/// config, and its trust domain is `foreign.test`.
const FOREIGN: &str = "foreign";
/// The harness's advertised ingress port (nothing listens there; these tests
/// only look at the catalog exchange).
const ADVERTISE_PORT: u32 = 15443;

/// The foreign mesh's CA (a fixture, for its minted CA and `ca.pem`) and
/// the scripted peer's identity: not an Elsinore gateway path, since it is
/// not an Elsinore gateway.
async fn foreign_mesh() -> (MeshFixture, Identity) {
    let mesh = MeshFixture::new(FOREIGN).await;
    let id = MeshFixture::spiffe_id(mesh.trust_domain.as_str(), "/ns/hamlet/sa/scripted-peer");
    let issued = mesh.issue(&id);
    let identity =
        Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
    (mesh, identity)
}

fn header<'a>(headers: &'a tonic::metadata::MetadataMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Mesh A's exports for the consumer-role tests: three services for the
/// foreign mesh (name, protocol, port) and one for another peer only, which
/// the foreign mesh must never see.
const FOR_FOREIGN: &[(&str, &str, u16)] = &[
    ("details", "GRPC", 9082),
    ("ratings", "TCP", 9081),
    ("reviews", "HTTP", 9080),
];

fn exports(skip: Option<&str>) -> Vec<ExportSpec> {
    let mut out: Vec<ExportSpec> = FOR_FOREIGN
        .iter()
        .filter(|(name, _, _)| Some(*name) != skip)
        .map(|(name, protocol, port)| {
            ExportSpec::new(name, &[FOREIGN, "other"])
                .protocol(protocol)
                .backend(&format!("127.0.0.1:{port}"))
        })
        .collect();
    out.push(ExportSpec::new("secret", &["other"]));
    out
}

/// The protocol mesh A exports `name` with.
fn protocol_of(name: &str) -> &'static str {
    FOR_FOREIGN
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, p, _)| *p)
        .unwrap_or_else(|| panic!("unexpected service {name:?}"))
}

/// Elsinore mesh A exporting to the foreign mesh (which it only serves) and
/// to a second Elsinore mesh `other`.
struct OwnerSetup {
    a: MeshFixture,
    foreign_identity: Identity,
    gateway: GatewayHandle,
    _foreign: MeshFixture,
    _other: MeshFixture,
}

impl OwnerSetup {
    async fn start(api_version: &str) -> OwnerSetup {
        let a = MeshFixture::new("mesh-a").await;
        let other = MeshFixture::new("other").await;
        let (foreign, foreign_identity) = foreign_mesh().await;
        let mut spec = ConfigSpec::new()
            .peer(foreign.peer().api_version(api_version).any_identity())
            .peer(other.peer());
        spec.exports = exports(None);
        let gateway = a.start(&spec).await;
        OwnerSetup {
            a,
            foreign_identity,
            gateway,
            _foreign: foreign,
            _other: other,
        }
    }

    fn elsinore_bundle(&self) -> TrustBundle {
        self.a.bundle()
    }
}

// ---------------------------------------------------------------------------
// Foreign consumer, Elsinore owner.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_consumer_v1alpha2_snapshot_one_in_flight_and_nack() {
    run_test(async {
        let setup = OwnerSetup::start("v1alpha2").await;
        let channel = dial(
            setup.gateway.federation_addr,
            &setup.foreign_identity,
            &setup.elsinore_bundle(),
        )
        .await
        .unwrap();
        const CONTEXT: &str = "hamlet-scripted-peer/ctx-42";
        let mut stream = ConsumerV2::open(channel, CONTEXT).await.unwrap();

        // Elsinore announces its snapshot size in metadata a foreign peer may
        // ignore, and grants no window to a peer that asked for none.
        assert_eq!(header(&stream.headers, SNAPSHOT_SIZE_HEADER), Some("3"));
        assert_eq!(header(&stream.headers, WINDOW_HEADER), None);

        let first = stream.next().await.unwrap();
        // One message in flight: the next response must wait for our ACK.
        // "Not sent" can only be observed as a bounded absence: on loopback an
        // owner that did not wait would have the next entry here (tonic
        // buffers it) in far less than 500 ms.
        let early = stream
            .next_within(Duration::from_millis(500))
            .await
            .unwrap();
        assert!(
            early.is_none(),
            "a second response arrived before the first was ACKed: {early:?}"
        );
        stream.ack(&first.nonce).await.unwrap();
        let second = stream.next().await.unwrap();
        let early = stream
            .next_within(Duration::from_millis(300))
            .await
            .unwrap();
        assert!(
            early.is_none(),
            "third response before the second was ACKed: {early:?}"
        );
        stream.ack(&second.nonce).await.unwrap();
        let third = stream.next().await.unwrap();

        let mut seen = BTreeSet::new();
        let mut nonces = BTreeSet::new();
        for r in [&first, &second, &third] {
            assert_eq!(
                r.operation,
                rd2::stream_response::Operation::Upsert as i32,
                "{r:?}"
            );
            assert_eq!(r.resource_url, TYPE_URL_V2);
            assert_eq!(
                r.context, CONTEXT,
                "context not echoed on {}",
                r.resource_id
            );
            assert!(!r.nonce.is_empty());
            assert!(nonces.insert(r.nonce.clone()), "nonce {} reused", r.nonce);
            let any = r.resource.as_ref().expect("UPSERT without a resource");
            assert_eq!(any.type_url, TYPE_URL_V2);
            let svc = t2::FederatedService::decode(any.value.as_slice()).unwrap();
            assert_eq!(
                svc.name, r.resource_id,
                "resource_id must be the service name"
            );
            let protocol = protocol_of(&svc.name);
            assert!(seen.insert(svc.name.clone()), "{} sent twice", svc.name);
            assert_eq!(svc.fqdn, format!("{}.mesh-a.global", svc.name));
            assert_eq!(svc.endpoints.len(), 1, "{svc:?}");
            assert_eq!(svc.endpoints[0].address, "127.0.0.1");
            assert_eq!(svc.endpoints[0].port, ADVERTISE_PORT);
            assert_eq!(svc.sans, vec![setup.a.gateway_id().to_string()]);
            assert!(!svc.instances.is_empty(), "{svc:?}");
            for inst in &svc.instances {
                assert!(!inst.id.is_empty(), "{svc:?}");
                assert_eq!(inst.protocol, protocol, "{svc:?}");
                assert_eq!(inst.metadata.get("SNI"), Some(&svc.fqdn), "{svc:?}");
            }
        }
        assert_eq!(seen, names(&["details", "ratings", "reviews"]));

        // NACK the last entry; the owner must record it with our reason.
        const REASON: &str = "scripted peer refuses this entry: unsupported label";
        stream.nack(&third.nonce, REASON).await.unwrap();
        let owner = wait_for("the owner to record the NACK", WAIT, || async {
            let owner = setup.gateway.owner(FOREIGN).await;
            (!owner["lastNack"].is_null()).then_some(owner)
        })
        .await;
        assert_eq!(
            owner["lastNack"]["service"],
            third.resource_id.as_str(),
            "{owner:#}"
        );
        assert_eq!(owner["lastNack"]["message"], REASON, "{owner:#}");
        assert_eq!(owner["acks"], 2, "{owner:#}");
        assert_eq!(owner["nacks"], 1, "{owner:#}");
        assert_eq!(owner["sent"], 3, "{owner:#}");
        // The other peer's counters are untouched.
        assert_eq!(setup.gateway.owner("other").await["nacks"], 0);

        setup.gateway.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_consumer_v1alpha1_snapshot_then_delete_on_reload() {
    run_test(async {
        let mut setup = OwnerSetup::start("v1alpha1").await;
        let channel = dial(
            setup.gateway.federation_addr,
            &setup.foreign_identity,
            &setup.elsinore_bundle(),
        )
        .await
        .unwrap();
        let mut stream = ConsumerV1::open(channel).await.unwrap();
        assert_eq!(header(&stream.headers, SNAPSHOT_SIZE_HEADER), Some("3"));

        let mut seen = BTreeSet::new();
        let mut nonces = BTreeSet::new();
        for _ in 0..3 {
            let r = stream.next().await.unwrap();
            assert_eq!(
                r.operation,
                rd1::stream_response::Operation::Create as i32,
                "{r:?}"
            );
            assert_eq!(r.resource_url, TYPE_URL_V1);
            assert!(nonces.insert(r.nonce.clone()), "nonce {} reused", r.nonce);
            let any = r.resource.as_ref().expect("CREATE without a resource");
            assert_eq!(any.type_url, TYPE_URL_V1);
            let svc = t1::FederatedService::decode(any.value.as_slice()).unwrap();
            let protocol = protocol_of(&svc.name);
            assert!(seen.insert(svc.name.clone()), "{} sent twice", svc.name);
            assert_eq!(svc.fqdn, format!("{}.mesh-a.global", svc.name));
            assert_eq!(svc.san, setup.a.gateway_id().to_string());
            assert_eq!(svc.protocols, vec![protocol.to_owned()]);
            assert_eq!(svc.endpoints.len(), 1, "{svc:?}");
            assert_eq!(svc.endpoints[0].address, "127.0.0.1");
            assert_eq!(svc.endpoints[0].port, ADVERTISE_PORT);
            // Without an elsinore-window header only one message is in flight
            // (bounded absence check, as in the v1alpha2 test).
            let early = stream
                .next_within(Duration::from_millis(300))
                .await
                .unwrap();
            assert!(
                early.is_none(),
                "response before the ACK of {}: {early:?}",
                svc.name
            );
            stream.ack(&r.nonce).await.unwrap();
        }
        assert_eq!(seen, names(&["details", "ratings", "reviews"]));

        // Stop exporting `ratings`: the gateway reloads its config file and
        // tells the consumer with a DELETE naming it inside the resource.
        setup.gateway.rewrite_exports(exports(Some("ratings")));
        let r = stream.next().await.unwrap();
        assert_eq!(
            r.operation,
            rd1::stream_response::Operation::Delete as i32,
            "{r:?}"
        );
        assert_eq!(r.resource_url, TYPE_URL_V1);
        assert!(!nonces.contains(&r.nonce), "nonce {} reused", r.nonce);
        let any = r
            .resource
            .as_ref()
            .expect("a v1alpha1 DELETE must carry the name in a resource");
        assert_eq!(any.type_url, TYPE_URL_V1);
        let gone = t1::FederatedService::decode(any.value.as_slice()).unwrap();
        assert_eq!(gone.name, "ratings");
        stream.ack(&r.nonce).await.unwrap();
        // Nothing else changed for this peer, so nothing else is sent.
        let extra = stream
            .next_within(Duration::from_millis(500))
            .await
            .unwrap();
        assert!(
            extra.is_none(),
            "unexpected response after the DELETE: {extra:?}"
        );

        setup.gateway.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// Foreign owner, Elsinore consumer.
// ---------------------------------------------------------------------------

/// Starts Elsinore mesh B dialing the foreign owner at `owner` in `api_version`.
async fn start_consumer(
    b: &MeshFixture,
    foreign: &MeshFixture,
    owner: std::net::SocketAddr,
    api_version: &str,
) -> GatewayHandle {
    let spec = ConfigSpec::new()
        .peer(
            foreign
                .peer()
                .federation(owner)
                .api_version(api_version)
                .any_identity(),
        )
        .snapshot_quiet_period("500ms");
    b.start(&spec).await
}

async fn wait_imports(gateway: &GatewayHandle, expected: &[&str]) {
    let want = names(expected);
    wait_for(
        &format!("imports from the foreign owner to be {want:?}"),
        WAIT,
        || async {
            let got = gateway.imported_names(FOREIGN).await;
            if got == want {
                Ok(())
            } else {
                Err(format!("imported {got:?}"))
            }
        },
    )
    .await;
}

fn assert_ack(request: &rd2::StreamRequest, nonce: &str) {
    assert_eq!(request.response_nonce, nonce, "{request:?}");
    let status = request.status.as_ref().expect("ACK without a status");
    assert_eq!(
        status.code, CODE_OK,
        "expected an ACK of {nonce}: {request:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_owner_v1alpha2_acks_valid_nacks_invalid_and_deletes() {
    run_test(async {
        let b = MeshFixture::new("mesh-b").await;
        let (foreign, foreign_identity) = foreign_mesh().await;
        let (server, mut streams) = serve_v2(&foreign_identity, &b.bundle()).await.unwrap();
        let gateway = start_consumer(&b, &foreign, server.addr, "v1alpha2").await;

        let mut stream = tokio::time::timeout(STEP, streams.recv())
            .await
            .expect("Elsinore never opened a stream to the foreign owner")
            .unwrap();
        // Elsinore offers its window extension; a foreign owner ignores it.
        assert!(header(&stream.metadata, WINDOW_HEADER).is_some());
        let first = stream.recv().await.unwrap();
        assert_eq!(first.resource_url, TYPE_URL_V2, "{first:?}");
        assert!(first.response_nonce.is_empty(), "{first:?}");
        assert!(first.status.is_none(), "{first:?}");
        assert!(
            !first.context.is_empty(),
            "Elsinore must set a context: {first:?}"
        );
        let ctx = first.context.clone();

        // One at a time, waiting for each ACK/NACK, as the spec asks.
        let reviews = service_v2("reviews", "reviews.foreign.global", 9080);
        stream.send(upsert_v2("f-1", &ctx, &reviews)).await.unwrap();
        let reply = stream.recv().await.unwrap();
        assert_ack(&reply, "f-1");
        assert_eq!(reply.resource_url, TYPE_URL_V2);

        let mut broken = service_v2("broken", "broken.foreign.global", 9081);
        broken.endpoints[0].port = 0;
        stream.send(upsert_v2("f-2", &ctx, &broken)).await.unwrap();
        let reply = stream.recv().await.unwrap();
        assert_eq!(reply.response_nonce, "f-2", "{reply:?}");
        let status = reply.status.as_ref().expect("NACK without a status");
        assert_ne!(status.code, CODE_OK, "port 0 was ACKed: {reply:?}");
        assert!(
            status.message.contains("port"),
            "the NACK should name the port: {status:?}"
        );

        let ratings = service_v2("ratings", "ratings.foreign.global", 9082);
        stream.send(upsert_v2("f-3", &ctx, &ratings)).await.unwrap();
        assert_ack(&stream.recv().await.unwrap(), "f-3");

        wait_imports(&gateway, &["ratings", "reviews"]).await;
        let imported = gateway.imported(FOREIGN).await;
        assert_eq!(
            imported["reviews"]["originalFqdn"], "reviews.foreign.global",
            "{imported:?}"
        );
        let svc = gateway
            .imported_service(FOREIGN, "ratings")
            .expect("ratings in B's shared state");
        assert_eq!(svc.endpoints[0].port, 9082);
        assert_eq!(svc.sans, vec![foreign::FOREIGN_INGRESS_SAN.to_owned()]);
        let consumer = gateway.consumer(FOREIGN).await;
        assert_eq!(consumer["lastNack"]["service"], "broken", "{consumer:#}");
        assert_eq!(consumer["nacks"], 1, "{consumer:#}");
        // No snapshot-size header from a foreign owner: the snapshot completes
        // after the quiet period (500 ms here), without any further message.
        gateway
            .wait_state(FOREIGN, "synced", Duration::from_secs(5))
            .await;
        let catalog = gateway.catalog().await;
        assert_eq!(
            catalog["imports"][FOREIGN]["snapshotComplete"], true,
            "{catalog:#}"
        );

        stream
            .send(delete_v2("f-4", &ctx, "reviews"))
            .await
            .unwrap();
        assert_ack(&stream.recv().await.unwrap(), "f-4");
        wait_imports(&gateway, &["ratings"]).await;

        gateway.stop().await;
        drop(server);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_owner_v1alpha1_create_update_delete() {
    run_test(async {
        use rd1::stream_response::Operation;
        let b = MeshFixture::new("mesh-b").await;
        let (foreign, foreign_identity) = foreign_mesh().await;
        let (server, mut streams) = serve_v1(&foreign_identity, &b.bundle()).await.unwrap();
        let gateway = start_consumer(&b, &foreign, server.addr, "v1alpha1").await;

        let mut stream = tokio::time::timeout(STEP, streams.recv())
            .await
            .expect("Elsinore never opened a v1alpha1 stream to the foreign owner")
            .unwrap();
        assert!(header(&stream.metadata, WINDOW_HEADER).is_some());
        let first = stream.recv().await.unwrap();
        assert_eq!(first.resource_url, TYPE_URL_V1, "{first:?}");
        assert!(first.response_nonce.is_empty(), "{first:?}");
        assert!(first.status.is_none(), "{first:?}");

        let ack = |r: &rd1::StreamRequest, nonce: &str| {
            assert_eq!(r.response_nonce, nonce, "{r:?}");
            assert_eq!(r.status.as_ref().map(|s| s.code), Some(CODE_OK), "{r:?}");
        };

        let reviews = service_v1("reviews", "reviews.foreign.global", 9080);
        stream
            .send(response_v1("g-1", Operation::Create, &reviews))
            .await
            .unwrap();
        ack(&stream.recv().await.unwrap(), "g-1");

        let mut broken = service_v1("broken", "broken.foreign.global", 9081);
        broken.protocols = vec!["CARRIER-PIGEON".to_owned()];
        stream
            .send(response_v1("g-2", Operation::Create, &broken))
            .await
            .unwrap();
        let reply = stream.recv().await.unwrap();
        assert_eq!(reply.response_nonce, "g-2", "{reply:?}");
        let status = reply.status.as_ref().expect("NACK without a status");
        assert_ne!(
            status.code, CODE_OK,
            "an unknown protocol was ACKed: {reply:?}"
        );
        assert!(
            status.message.contains("CARRIER-PIGEON"),
            "the NACK should name the bad protocol: {status:?}"
        );

        let ratings = service_v1("ratings", "ratings.foreign.global", 9082);
        stream
            .send(response_v1("g-3", Operation::Create, &ratings))
            .await
            .unwrap();
        ack(&stream.recv().await.unwrap(), "g-3");
        wait_imports(&gateway, &["ratings", "reviews"]).await;

        // UPDATE carries the full object; the new FQDN must replace the old.
        let mut moved = ratings.clone();
        moved.fqdn = "stars.foreign.global".to_owned();
        stream
            .send(response_v1("g-4", Operation::Update, &moved))
            .await
            .unwrap();
        ack(&stream.recv().await.unwrap(), "g-4");
        wait_for(
            "the UPDATE of ratings to show its new fqdn",
            WAIT,
            || async {
                let imported = gateway.imported(FOREIGN).await;
                let fqdn = imported.get("ratings").map(|e| e["originalFqdn"].clone());
                if fqdn == Some(Value::from("stars.foreign.global")) {
                    Ok(())
                } else {
                    Err(format!("ratings has originalFqdn {fqdn:?}"))
                }
            },
        )
        .await;

        stream.send(delete_v1("g-5", "reviews")).await.unwrap();
        ack(&stream.recv().await.unwrap(), "g-5");
        wait_imports(&gateway, &["ratings"]).await;

        gateway.stop().await;
        drop(server);
    })
    .await;
}
