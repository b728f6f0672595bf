//! The DNS responder's answering rules (`gateway/src/dns/responder.rs`):
//! the input (after a first byte whose low bit picks TCP over UDP) is one
//! query packet as received, answered from a small fixed VIP table with
//! names under `global`, under a cluster domain, and a single label.
//!
//! Beyond "does not crash": an answer is a well-formed DNS response with
//! the query's ID; responses are never answered; an answer over UDP fits
//! 512 bytes without EDNS and 1232 with it; every A record answers the
//! question's name with the VIP the table holds for it.
#![no_main]

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use elsinore_federation_api::{Endpoint, FederatedService, Instance, Protocol};
use elsinore_gateway::catalog::imports::resolve;
use elsinore_gateway::catalog::routes::{VipAllocator, VipTable};
use elsinore_gateway::fuzzing::dns::Responder;
use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::RData;
use libfuzzer_sys::fuzz_target;

fn svc(name: &str, fqdn: &str) -> Arc<FederatedService> {
    Arc::new(FederatedService {
        name: name.into(),
        description: String::new(),
        tags: vec![],
        labels: Default::default(),
        fqdn: fqdn.into(),
        endpoints: vec![Endpoint {
            address: "127.0.0.1".into(),
            port: 15443,
            labels: vec![],
            description: String::new(),
        }],
        sans: vec!["spiffe://a.example/gw".into()],
        instances: vec![Instance {
            id: "gw-1".into(),
            protocol: Protocol::Http,
            metadata: [("PORT".to_owned(), "8080".to_owned())]
                .into_iter()
                .collect(),
            endpoint_selector: vec![],
            description: String::new(),
        }],
    })
}

fn fixture() -> &'static (Arc<VipTable>, Responder) {
    static FIXTURE: OnceLock<(Arc<VipTable>, Responder)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let range = "127.77.0.0/16".parse().expect("a VIP range");
        let services = vec![
            svc("reviews", "reviews.default.global"),
            svc("ratings", "ratings.bookinfo.svc.cluster.local"),
            svc("db", "db.a.b.c.global"),
            svc("single", "single"),
        ];
        let view = resolve(&BTreeSet::new(), &[("mesh-a".to_owned(), services)]);
        let table = Arc::new(VipAllocator::new(range).update(&view));
        assert!(table.len() >= 3, "the fixture table has its names");
        (table.clone(), Responder::new(table))
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&flags, packet)) = input.split_first() else {
        return;
    };
    let tcp = flags & 1 == 1;
    let (table, responder) = fixture();
    let query = Message::from_vec(packet).ok();
    let Some(answer) = responder.respond(packet, tcp) else {
        return;
    };
    let response = Message::from_vec(&answer)
        .unwrap_or_else(|e| panic!("our answer does not parse: {e}: {answer:02x?}"));
    assert_eq!(response.metadata.message_type, MessageType::Response);
    assert!(
        packet.len() >= 12,
        "answered a packet shorter than a header"
    );
    assert_eq!(
        response.metadata.id,
        u16::from_be_bytes([packet[0], packet[1]]),
        "answer ID"
    );
    if let Some(q) = &query {
        assert_eq!(
            q.metadata.message_type,
            MessageType::Query,
            "answered a response"
        );
    }
    if !tcp {
        let limit = if query.as_ref().is_some_and(|q| q.edns.is_some()) {
            1232
        } else {
            512
        };
        assert!(
            answer.len() <= limit,
            "{}-byte UDP answer over {limit}",
            answer.len()
        );
    }
    for record in &response.answers {
        let RData::A(a) = &record.data else { continue };
        let q = response
            .queries
            .first()
            .expect("an answer has its question");
        assert_eq!(&record.name, q.name(), "A record for another name");
        let key = record
            .name
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let entry = table
            .lookup_name(&key)
            .unwrap_or_else(|| panic!("A record for {key}, which is not in the table"));
        assert_eq!(a.0, entry.vip, "A record for {key}");
    }
});
