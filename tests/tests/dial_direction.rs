//! Both dial directions of Hamlet v1alpha2 (`peers[].dial`). In v1alpha2
//! one wrapper carries requests and responses, so the owner may be the gRPC
//! client and push (the spec's owner behind NAT). These tests drive real
//! gateways over real mTLS on loopback: a scripted foreign peer built only
//! from the generated stubs plays each role the other way round (an owner
//! that dials an Elsinore consumer and pushes; a consumer that an Elsinore
//! owner dials), two Elsinore gateways federate with the owner dialing both
//! ways and carry traffic, and a stream in the direction a peer's config
//! does not expect is refused with the key to change.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::time::Duration;

use elsinore_certs::Identity;
use elsinore_federation_api::proto::federation::resourcediscovery::v1alpha2 as rd2;
use elsinore_federation_api::proto::federation::types::v1alpha2 as t2;
use elsinore_tests::foreign::{
    CODE_INVALID_ARGUMENT, CODE_OK, ConsumerV1, DialedConsumerV2, PushingOwnerV2, STEP,
    TYPE_URL_V2, delete_v2, dial, serve_consumer_v2, serve_consumer_v2_granting, service_v2,
    upsert_v2,
};
use elsinore_tests::{
    Backend, ConfigSpec, ExportSpec, GatewayHandle, MeshFixture, WAIT, dns_resolve,
    establish_v1alpha2, http_request, http1_send, names, run_test, wait_for,
};
use hickory_proto::op::ResponseCode;
use http::{Method, StatusCode};
use prost::Message;
use tokio::sync::mpsc;

const FOREIGN: &str = "foreign";
const SNAPSHOT_SIZE_HEADER: &str = "elsinore-snapshot-size";
const WINDOW_HEADER: &str = "elsinore-window";

/// The path of the scripted peer's SPIFFE ID in its trust domain.
const SCRIPTED_PEER: &str = "/ns/hamlet/sa/scripted-peer";

/// The foreign mesh as our peer, pinned to the scripted peer's identity
/// (not an Elsinore gateway's, so `identities` must name it).
fn scripted_peer(mesh: &MeshFixture) -> elsinore_tests::PeerSpec {
    mesh.peer().identity(MeshFixture::spiffe_id(
        mesh.trust_domain.as_str(),
        SCRIPTED_PEER,
    ))
}

/// A foreign mesh's CA and the scripted peer's identity in it (a workload
/// of that trust domain, not an Elsinore gateway path).
async fn foreign_mesh(name: &str) -> (MeshFixture, Identity) {
    let mesh = MeshFixture::new(name).await;
    let id = MeshFixture::spiffe_id(mesh.trust_domain.as_str(), SCRIPTED_PEER);
    let issued = mesh.issue(&id);
    let identity =
        Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
    (mesh, identity)
}

fn header<'a>(headers: &'a tonic::metadata::MetadataMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The foreign owner dials `consumer` (an Elsinore gateway) and opens a
/// push stream with `metadata`.
async fn push_to(
    consumer: &GatewayHandle,
    consumer_mesh: &MeshFixture,
    identity: &Identity,
    metadata: &[(&'static str, &str)],
) -> PushingOwnerV2 {
    let channel = dial(consumer.federation_addr, identity, &consumer_mesh.bundle())
        .await
        .unwrap();
    PushingOwnerV2::open_with(channel, metadata).await.unwrap()
}

/// Reads Elsinore's first request on a push stream; returns its context.
async fn first_request(push: &mut PushingOwnerV2) -> String {
    let first = push.recv().await.unwrap();
    assert_eq!(first.resource_url, TYPE_URL_V2, "{first:?}");
    assert!(first.response_nonce.is_empty(), "{first:?}");
    assert!(first.status.is_none(), "{first:?}");
    assert!(
        !first.context.is_empty(),
        "Elsinore sets a context: {first:?}"
    );
    first.context
}

/// Pushes `response` and returns the status code Elsinore answered it with.
async fn push_one(push: &mut PushingOwnerV2, response: rd2::StreamResponse) -> (i32, String) {
    let nonce = response.nonce.clone();
    push.send(response).await.unwrap();
    let reply = push.recv().await.unwrap();
    assert_eq!(reply.response_nonce, nonce, "{reply:?}");
    let status = reply.status.expect("an ACK/NACK carries a status");
    (status.code, status.message)
}

// ---------------------------------------------------------------------------
// (a) A foreign owner dials the Elsinore consumer and pushes.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_owner_dials_elsinore_consumer_and_pushes() {
    run_test(async {
        let b = MeshFixture::new("mesh-b").await;
        let (foreign, identity) = foreign_mesh(FOREIGN).await;
        // No `federation` address: we never dial this peer, it dials us.
        let spec = ConfigSpec::new()
            .peer(
                scripted_peer(&foreign)
                    .dial_by("owner")
                    .key("allowedNames", "[foreign.global]"),
            )
            .stale_after("4s")
            .snapshot_quiet_period("300ms")
            .cache_dir(&b.cache_dir());
        let gb = b.start(&spec).await;
        assert_eq!(gb.consumer(FOREIGN).await["state"], "connecting");
        assert_eq!(gb.peer_entry(FOREIGN).await["dial"], "owner");

        let mut push = push_to(&gb, &b, &identity, &[]).await;
        // A foreign owner offered no window: none is granted.
        assert_eq!(header(&push.headers, WINDOW_HEADER), None);
        let ctx = first_request(&mut push).await;

        let alpha = service_v2("alpha", "alpha.foreign.global", 9001);
        assert_eq!(
            push_one(&mut push, upsert_v2("n1", &ctx, &alpha)).await.0,
            CODE_OK
        );
        // A bad entry is NACKed with a reason; the stream goes on.
        let mut broken = service_v2("broken", "broken.foreign.global", 9002);
        broken.endpoints.clear();
        let (code, message) = push_one(&mut push, upsert_v2("n2", &ctx, &broken)).await;
        assert_eq!(code, CODE_INVALID_ARGUMENT, "{message}");
        assert!(
            message.contains("broken"),
            "the NACK names the entry: {message}"
        );
        // The peer's claim rules hold on a pushed stream too: a name
        // outside its allowedNames is refused naming the rule.
        let outside = service_v2("outside", "outside.elsewhere.global", 9004);
        let (code, message) = push_one(&mut push, upsert_v2("n2b", &ctx, &outside)).await;
        assert_eq!(code, CODE_INVALID_ARGUMENT, "{message}");
        assert!(message.contains("allowedNames"), "{message}");
        let beta = service_v2("beta", "beta.foreign.global", 9003);
        assert_eq!(
            push_one(&mut push, upsert_v2("n3", &ctx, &beta)).await.0,
            CODE_OK
        );
        gb.wait_imported(FOREIGN, &["alpha", "beta"]).await;
        // No size announced: the quiet period completes the snapshot.
        gb.wait_state(FOREIGN, "synced", WAIT).await;
        wait_for("B's DNS to answer alpha.foreign.global", WAIT, || async {
            dns_resolve(gb.dns_addr(), "alpha.foreign.global")
                .await
                .map_err(|code| format!("answer code {code}"))
        })
        .await;

        // Updates and deletes.
        let alpha2 = service_v2("alpha", "alpha.foreign.global", 9011);
        assert_eq!(
            push_one(&mut push, upsert_v2("n4", &ctx, &alpha2)).await.0,
            CODE_OK
        );
        wait_for("alpha's update to be imported", WAIT, || async {
            let port = gb
                .imported_service(FOREIGN, "alpha")
                .map(|s| s.endpoints[0].port);
            (port == Some(9011))
                .then_some(())
                .ok_or(format!("port {port:?}"))
        })
        .await;
        assert_eq!(
            push_one(&mut push, delete_v2("n5", &ctx, "beta")).await.0,
            CODE_OK
        );
        gb.wait_imported(FOREIGN, &["alpha"]).await;
        wait_for("beta to leave B's DNS", WAIT, || async {
            dns_resolve(gb.dns_addr(), "beta.foreign.global").await == Err(ResponseCode::NXDomain)
        })
        .await;

        // The foreign side drops: the imports stay (stale) until it dials
        // again; its new snapshot reconciles them.
        drop(push);
        gb.wait_state(FOREIGN, "disconnected", WAIT).await;
        assert_eq!(gb.imported_names(FOREIGN).await, names(&["alpha"]));
        let mut push = push_to(&gb, &b, &identity, &[]).await;
        let ctx = first_request(&mut push).await;
        let gamma = service_v2("gamma", "gamma.foreign.global", 9004);
        assert_eq!(
            push_one(&mut push, upsert_v2("m1", &ctx, &gamma)).await.0,
            CODE_OK
        );
        gb.wait_imported(FOREIGN, &["gamma"]).await;
        gb.wait_state(FOREIGN, "synced", WAIT).await;
        assert!(
            gb.consumer(FOREIGN).await["reconnects"].as_u64() >= Some(1),
            "{}",
            gb.consumer(FOREIGN).await
        );

        // The cache: after a restart the import is back before any stream,
        // and goes once staleAfter has passed without the owner.
        drop(push);
        gb.stop().await;
        let gb = b.start(&spec).await;
        wait_for("gamma back from the cache", WAIT, || async {
            gb.imported_names(FOREIGN).await == names(&["gamma"])
        })
        .await;
        assert_eq!(gb.consumer(FOREIGN).await["state"], "disconnected");
        wait_for("gamma to expire (staleAfter 4s)", WAIT, || async {
            gb.imported_names(FOREIGN).await.is_empty()
        })
        .await;
        gb.stop().await;
    })
    .await;
}

/// An owner that knows the extensions (another Elsinore, played here by
/// the script): the window it offers is granted up to ours, and the
/// snapshot size it announces completes the snapshot without a quiet
/// period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushing_owner_gets_window_and_snapshot_size_through_metadata() {
    run_test(async {
        let b = MeshFixture::new("mesh-b").await;
        let (foreign, identity) = foreign_mesh(FOREIGN).await;
        let spec = ConfigSpec::new()
            .peer(scripted_peer(&foreign).dial_by("owner"))
            .window(16)
            .snapshot_quiet_period("1h");
        let gb = b.start(&spec).await;
        let mut push = push_to(
            &gb,
            &b,
            &identity,
            &[(WINDOW_HEADER, "64"), (SNAPSHOT_SIZE_HEADER, "3")],
        )
        .await;
        assert_eq!(header(&push.headers, WINDOW_HEADER), Some("16"));
        let ctx = first_request(&mut push).await;
        // Three in flight before any answer: the consumer takes them all.
        for (i, name) in ["one", "two", "three"].iter().enumerate() {
            let svc = service_v2(name, &format!("{name}.foreign.global"), 9000 + i as u32);
            push.send(upsert_v2(&format!("w{i}"), &ctx, &svc))
                .await
                .unwrap();
        }
        let mut acked = BTreeSet::new();
        for _ in 0..3 {
            let reply = push.recv().await.unwrap();
            assert_eq!(reply.status.as_ref().map(|s| s.code), Some(CODE_OK));
            acked.insert(reply.response_nonce);
        }
        assert_eq!(acked, names(&["w0", "w1", "w2"]));
        // Complete by the announced size, not by a quiet period of an hour.
        gb.wait_state(FOREIGN, "synced", WAIT).await;
        gb.wait_imported(FOREIGN, &["one", "three", "two"]).await;
        gb.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// (b) The Elsinore owner dials a foreign consumer.
// ---------------------------------------------------------------------------

async fn next_stream(streams: &mut mpsc::Receiver<DialedConsumerV2>) -> DialedConsumerV2 {
    tokio::time::timeout(STEP, streams.recv())
        .await
        .expect("Elsinore never dialed the foreign consumer")
        .expect("the foreign consumer's server stopped")
}

fn decode(response: &rd2::StreamResponse) -> t2::FederatedService {
    let any = response
        .resource
        .as_ref()
        .expect("UPSERT without a resource");
    assert_eq!(any.type_url, TYPE_URL_V2);
    t2::FederatedService::decode(any.value.as_slice()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elsinore_owner_dials_foreign_consumer_and_pushes_the_filtered_catalog() {
    run_test(async {
        let a = MeshFixture::new("mesh-a").await;
        let other = MeshFixture::new("other").await;
        let (foreign, identity) = foreign_mesh(FOREIGN).await;
        let (server, mut streams) = serve_consumer_v2(&identity, &a.bundle()).await.unwrap();
        let exports = |with_reviews: bool| {
            let mut out = vec![
                ExportSpec::new("details", &[FOREIGN, "other"]),
                ExportSpec::new("ratings", &[FOREIGN]),
                // Not for the foreign mesh: it must never see it.
                ExportSpec::new("secret", &["other"]),
            ];
            if with_reviews {
                out.push(ExportSpec::new("reviews", &[FOREIGN]));
            }
            out
        };
        let mut spec = ConfigSpec::new()
            .peer(
                scripted_peer(&foreign)
                    .federation(server.addr)
                    .dial_by("owner"),
            )
            .peer(other.peer());
        spec.exports = exports(true);
        let mut ga = a.start(&spec).await;

        let mut stream = next_stream(&mut streams).await;
        // Elsinore's extensions ride in the request metadata; a foreign
        // consumer ignores them and answers none.
        assert_eq!(header(&stream.metadata, SNAPSHOT_SIZE_HEADER), Some("3"));
        assert!(header(&stream.metadata, WINDOW_HEADER).is_some());
        const CONTEXT: &str = "foreign-consumer/ctx-7";
        stream.start(CONTEXT).await.unwrap();

        let first = stream.next().await.unwrap();
        // One in flight: nothing more until the first is answered.
        let early = stream
            .next_within(Duration::from_millis(500))
            .await
            .unwrap();
        assert!(
            early.is_none(),
            "a second response before the first was answered: {early:?}"
        );
        stream.nack(&first.nonce, "scripted refusal").await.unwrap();
        let second = stream.next().await.unwrap();
        stream.ack(&second.nonce).await.unwrap();
        let third = stream.next().await.unwrap();
        stream.ack(&third.nonce).await.unwrap();
        let mut seen = BTreeSet::new();
        for r in [&first, &second, &third] {
            assert_eq!(r.context, CONTEXT, "context not echoed: {r:?}");
            assert_eq!(r.operation, rd2::stream_response::Operation::Upsert as i32);
            let svc = decode(r);
            assert_eq!(svc.name, r.resource_id);
            seen.insert(svc.name);
        }
        assert_eq!(seen, names(&["details", "ratings", "reviews"]));
        wait_for("A to count the NACK", WAIT, || async {
            let owner = ga.owner(FOREIGN).await;
            (owner["nacks"] == 1 && owner["acks"] == 2)
                .then_some(())
                .ok_or(owner.to_string())
        })
        .await;
        let owner = ga.owner(FOREIGN).await;
        assert_eq!(owner["lastNack"]["service"], first.resource_id.as_str());
        assert_eq!(owner["lastNack"]["message"], "scripted refusal");
        assert_eq!(owner["window"], 1, "a foreign consumer gets one in flight");

        // A change of the exports reaches the consumer on the open stream.
        ga.rewrite_exports(exports(false));
        let gone = stream.next().await.unwrap();
        assert_eq!(
            gone.operation,
            rd2::stream_response::Operation::Delete as i32
        );
        assert_eq!(gone.resource_id, "reviews");
        stream.ack(&gone.nonce).await.unwrap();

        // The consumer drops the stream: Elsinore dials again and sends
        // the whole (filtered) catalog once more.
        drop(stream);
        let mut stream = next_stream(&mut streams).await;
        assert_eq!(header(&stream.metadata, SNAPSHOT_SIZE_HEADER), Some("2"));
        stream.start(CONTEXT).await.unwrap();
        let mut seen = BTreeSet::new();
        for _ in 0..2 {
            let r = stream.next().await.unwrap();
            seen.insert(decode(&r).name);
            stream.ack(&r.nonce).await.unwrap();
        }
        assert_eq!(seen, names(&["details", "ratings"]));
        ga.stop().await;
        drop(server);
    })
    .await;
}

/// A consumer that grants a window (as another Elsinore does in its
/// response metadata) gets that many in flight from the dialing owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialing_owner_uses_the_window_the_consumer_grants() {
    run_test(async {
        let a = MeshFixture::new("mesh-a").await;
        let (foreign, identity) = foreign_mesh(FOREIGN).await;
        let (server, mut streams) = serve_consumer_v2_granting(&identity, &a.bundle(), Some(2))
            .await
            .unwrap();
        let mut spec = ConfigSpec::new()
            .peer(
                scripted_peer(&foreign)
                    .federation(server.addr)
                    .dial_by("owner"),
            )
            .window(8);
        spec.exports = ["e1", "e2", "e3"]
            .iter()
            .map(|n| ExportSpec::new(n, &[FOREIGN]))
            .collect();
        let ga = a.start(&spec).await;
        let mut stream = next_stream(&mut streams).await;
        assert_eq!(header(&stream.metadata, WINDOW_HEADER), Some("8"));
        stream.start("ctx").await.unwrap();
        let one = stream.next().await.unwrap();
        let two = stream.next().await.unwrap();
        let early = stream
            .next_within(Duration::from_millis(500))
            .await
            .unwrap();
        assert!(
            early.is_none(),
            "more than the granted 2 in flight: {early:?}"
        );
        stream.ack(&one.nonce).await.unwrap();
        let three = stream.next().await.unwrap();
        stream.ack(&two.nonce).await.unwrap();
        stream.ack(&three.nonce).await.unwrap();
        assert_eq!(ga.owner(FOREIGN).await["window"], 2);
        ga.stop().await;
        drop(server);
    })
    .await;
}

// ---------------------------------------------------------------------------
// Two Elsinore gateways, the owner dialing both ways.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_with_the_owner_dialing_both_ways_federate_and_route() {
    run_test(async {
        let a = MeshFixture::data_plane("mesh-a").await;
        let b = MeshFixture::data_plane("mesh-b").await;
        let ratings = Backend::http1("ratings").await;
        // Each dials the other only to push its own exports.
        let ga = a
            .start(
                &ConfigSpec::new()
                    .export(ExportSpec::new("reviews", &["mesh-b"]))
                    .peer(b.dial().dial_by("owner")),
            )
            .await;
        let gb = b
            .start(
                &ConfigSpec::new()
                    .export(
                        ExportSpec::new("ratings", &["mesh-a"])
                            .port(9081)
                            .backend(&ratings.host_port()),
                    )
                    .peer(a.dial().dial_by("owner")),
            )
            .await;
        ga.wait_imported("mesh-b", &["ratings"]).await;
        gb.wait_imported("mesh-a", &["reviews"]).await;
        ga.wait_state("mesh-b", "synced", WAIT).await;
        gb.wait_state("mesh-a", "synced", WAIT).await;
        // Two Elsinores negotiate a window through the metadata, as in
        // the usual direction (default 256 on both sides).
        assert_eq!(ga.owner("mesh-b").await["window"], 256);
        assert_eq!(gb.owner("mesh-a").await["window"], 256);

        // A request from A's egress reaches B's backend.
        let vip = ga.wait_vip("ratings.mesh-b.global").await;
        let reply = http1_send(
            vip,
            http_request(Method::GET, Some("ratings.mesh-b.global"), "/r", &[], ""),
        )
        .await
        .expect("request through A's egress");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["backend"], "ratings");
        assert_eq!(
            reply.json()["identity"],
            a.gateway_id().to_string().as_str()
        );
        assert_eq!(ratings.hits(), 1);
        gb.stop().await;
        ga.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// Streams in the unexpected direction.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_in_the_unexpected_direction_is_refused_naming_the_key() {
    run_test(async {
        let b = MeshFixture::new("mesh-b").await;
        // peers[0]: the consumer dials (default); peers[1]: the owner dials.
        let (usual, usual_id) = foreign_mesh("usual").await;
        let (pushing, pushing_id) = foreign_mesh("pushing").await;
        let gb = b
            .start(
                &ConfigSpec::new()
                    .peer(scripted_peer(&usual))
                    .peer(scripted_peer(&pushing).dial_by("owner")),
            )
            .await;

        // A peer expected to consume pushes a response instead.
        let mut push = push_to(&gb, &b, &usual_id, &[]).await;
        let svc = service_v2("alpha", "alpha.usual.global", 9001);
        push.send(upsert_v2("n1", "", &svc)).await.unwrap();
        let refused = push.recv().await.expect_err("the push must be refused");
        let status = refused
            .downcast_ref::<tonic::Status>()
            .unwrap_or_else(|| panic!("not a gRPC status: {refused:#}"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("peers[0].dial: consumer")
                && status.message().contains("set peers[0].dial: owner"),
            "{status:?}"
        );
        assert!(gb.imported_names("usual").await.is_empty());

        // A peer expected to push dials as a consumer: it gets our first
        // request, then the refusal of its own.
        let channel = dial(gb.federation_addr, &pushing_id, &b.bundle())
            .await
            .unwrap();
        let mut stream = establish_v1alpha2(channel, "ctx", &[]).await.unwrap();
        let ours = tokio::time::timeout(STEP, stream.rx.message())
            .await
            .expect("Elsinore's first request in time")
            .unwrap()
            .unwrap();
        assert!(ours.request.is_some(), "{ours:?}");
        let status = tokio::time::timeout(STEP, stream.rx.message())
            .await
            .expect("the refusal in time")
            .expect_err("the consumer's request must be refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("peers[1].dial: owner")
                && status.message().contains("set peers[1].dial: consumer"),
            "{status:?}"
        );
        // v1alpha1 cannot carry a push at all.
        let channel = dial(gb.federation_addr, &pushing_id, &b.bundle())
            .await
            .unwrap();
        let status = match ConsumerV1::open(channel).await {
            Ok(_) => panic!("a v1alpha1 stream from a pushing peer must be refused"),
            Err(e) => e.downcast::<tonic::Status>().expect("a gRPC status"),
        };
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("peers[1].dial"), "{status:?}");
        gb.stop().await;
    })
    .await;
}

/// Two gateways that disagree: A's owner expects to push to B, B's
/// consumer dials A as usual. B gets A's first request where it waits for
/// responses: it stops with the key to fix instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_answered_the_wrong_way_stops_naming_the_key() {
    run_test(async {
        let a = MeshFixture::new("mesh-a").await;
        let b = MeshFixture::new("mesh-b").await;
        let ga = a
            .start(
                &ConfigSpec::new()
                    .export(ExportSpec::new("reviews", &["mesh-b"]))
                    .peer(b.peer().dial_by("owner")),
            )
            .await;
        let gb = b.start(&ConfigSpec::new().peer(a.dial())).await;
        let consumer = wait_for("B's consumer of A to stop", WAIT, || async {
            let consumer = gb.consumer("mesh-a").await;
            (consumer["state"] == "failed")
                .then(|| consumer.clone())
                .ok_or(consumer.to_string())
        })
        .await;
        let detail = consumer["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(
                "sent a request on the stream we dialed as its consumer (peers[0].dial: consumer)"
            ),
            "{consumer}"
        );
        gb.stop().await;
        ga.stop().await;
    })
    .await;
}

/// One accepted stream per peer: a second stream from the same owner
/// replaces the open one (which ends with ABORTED) and carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_push_stream_from_the_same_owner_replaces_the_open_one() {
    run_test(async {
        let b = MeshFixture::new("mesh-b").await;
        let (foreign, identity) = foreign_mesh(FOREIGN).await;
        let gb = b
            .start(
                &ConfigSpec::new()
                    .peer(scripted_peer(&foreign).dial_by("owner"))
                    .snapshot_quiet_period("300ms"),
            )
            .await;
        let mut old = push_to(&gb, &b, &identity, &[]).await;
        let ctx = first_request(&mut old).await;
        let alpha = service_v2("alpha", "alpha.foreign.global", 9001);
        assert_eq!(
            push_one(&mut old, upsert_v2("o1", &ctx, &alpha)).await.0,
            CODE_OK
        );
        gb.wait_imported(FOREIGN, &["alpha"]).await;

        let mut new = push_to(&gb, &b, &identity, &[]).await;
        let ctx = first_request(&mut new).await;
        let ended = old.recv().await.expect_err("the old stream must end");
        let status = ended
            .downcast_ref::<tonic::Status>()
            .unwrap_or_else(|| panic!("not a gRPC status: {ended:#}"));
        assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
        assert!(
            status.message().contains("replaced by a newer stream"),
            "{status:?}"
        );
        let beta = service_v2("beta", "beta.foreign.global", 9002);
        assert_eq!(
            push_one(&mut new, upsert_v2("n1", &ctx, &beta)).await.0,
            CODE_OK
        );
        // The new stream's snapshot (beta only) reconciles alpha away.
        gb.wait_imported(FOREIGN, &["beta"]).await;
        assert_eq!(gb.consumer(FOREIGN).await["reconnects"], 1);
        gb.stop().await;
    })
    .await;
}
