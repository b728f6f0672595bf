//! Replicas agree (issue 15, item 6): two replicas of one mesh's gateway
//! that receive the same catalog in different orders — one watching the
//! owner's exports arrive in three steps (and one withdrawn and re-added on
//! the way), the other getting the final catalog in one snapshot — answer
//! every imported name with the same address over DNS and hold the same
//! route for it. The catalog is dense enough in its VIP range that many
//! names collide on their first-choice address, so an allocation that
//! depended on arrival order would disagree.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use elsinore_gateway::config::Config;
use elsinore_gateway::runtime::{Gateway, StartOptions};
use elsinore_tests::dataplane::dns_resolve;
use elsinore_tests::{ConfigSpec, ExportSpec, MeshFixture, WAIT, run_test, wait_for};

const SERVICES: usize = 180;

fn exports(range: std::ops::Range<usize>) -> Vec<ExportSpec> {
    range
        .map(|i| {
            let (protocol, port) = if i % 5 == 0 {
                ("TCP", 9000 + i as u16)
            } else {
                ("HTTP", 8080)
            };
            ExportSpec::new(&format!("s{i:03}"), &["mesh-b"])
                .protocol(protocol)
                .port(port)
                .backend("127.0.0.1:9")
        })
        .collect()
}

/// A replica of mesh B: same identity and peers, its own listeners. Egress
/// is off so the two replicas in this one process never race for the same
/// VIP sockets; the table DNS answers from is built all the same.
fn replica(a: &MeshFixture, b: &MeshFixture, range: &str) -> Config {
    let text = format!(
        "mesh: {{ name: mesh-b, trustDomain: {td} }}\n\
         identity: {{ certificate: {cert:?}, privateKey: {key:?} }}\n\
         listeners: {{ federation: \"127.0.0.1:0\", admin: \"127.0.0.1:0\", ingress: \"off\", egress: \"off\", dns: \"127.0.0.1:0\" }}\n\
         peers:\n  - {{ name: mesh-a, trustDomain: {atd}, trustBundle: {abundle:?}, federation: {afed:?} }}\n\
         federation: {{ backoff: {{ initial: 1s, max: 2s }} }}\n\
         proxy: {{ vipRange: {range:?} }}\n",
        td = b.trust_domain,
        cert = b.cert.display().to_string(),
        key = b.key.display().to_string(),
        atd = a.trust_domain,
        abundle = a.ca_pem.display().to_string(),
        afed = a.federation_addr.to_string(),
    );
    Config::from_yaml_str(&text, &b.dir).expect("replica config")
}

fn imported(g: &Gateway) -> usize {
    g.shared.vips.borrow().len()
}

/// Every name's (address, port) in a replica's table.
fn routes(g: &Gateway) -> BTreeMap<String, (std::net::Ipv4Addr, u16)> {
    g.shared
        .vips
        .borrow()
        .iter()
        .map(|e| (e.fqdn.clone(), (e.vip, e.port)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_fed_in_different_orders_answer_alike() {
    run_test(async {
        let a = MeshFixture::new("mesh-a").await;
        let b = MeshFixture::new("mesh-b").await;
        // A /24 (254 addresses) for 180 names: first choices collide often.
        let r1: u8 = 100 + u8::try_from(std::process::id() % 150).unwrap_or(0);
        let range = format!("127.{r1}.77.0/24");
        // The owner starts with the last third.
        let mut owner = a
            .start(
                &ConfigSpec::new()
                    .peer(b.peer())
                    .with_exports(exports(120..SERVICES)),
            )
            .await;
        let early = Gateway::start(replica(&a, &b, &range), StartOptions::default())
            .await
            .expect("early replica starts");
        wait_for("early replica has the first batch", WAIT, || async {
            imported(&early) == SERVICES - 120
        })
        .await;
        // Then the first third, one withdrawn, then everything.
        let mut step: Vec<ExportSpec> = exports(0..60)
            .into_iter()
            .chain(exports(121..SERVICES))
            .collect();
        owner.rewrite_exports(step.clone());
        let want = step.len();
        wait_for("early replica has the second batch", WAIT, || async {
            imported(&early) == want
        })
        .await;
        step = exports(0..SERVICES).into_iter().rev().collect();
        owner.rewrite_exports(step);
        wait_for("early replica has every service", WAIT, || async {
            imported(&early) == SERVICES
        })
        .await;
        // The late replica gets the final catalog in one snapshot.
        let late = Gateway::start(replica(&a, &b, &range), StartOptions::default())
            .await
            .expect("late replica starts");
        wait_for("late replica has every service", WAIT, || async {
            imported(&late) == SERVICES
        })
        .await;

        let (early_routes, late_routes) = (routes(&early), routes(&late));
        assert_eq!(early_routes.len(), SERVICES);
        assert_eq!(early_routes, late_routes, "replicas hold the same routes");
        let distinct: std::collections::BTreeSet<_> =
            early_routes.values().map(|(ip, _)| *ip).collect();
        assert_eq!(distinct.len(), SERVICES, "every name its own VIP");
        // And say so over DNS, name by name.
        let (dns_early, dns_late) = (early.dns_addr.unwrap(), late.dns_addr.unwrap());
        for (fqdn, (vip, _)) in &early_routes {
            let x = dns_resolve(dns_early, fqdn).await;
            let y = dns_resolve(dns_late, fqdn).await;
            assert_eq!(x, Ok(*vip), "{fqdn} on the early replica");
            assert_eq!(y, Ok(*vip), "{fqdn} on the late replica");
        }
        early.shutdown().await;
        late.shutdown().await;
    })
    .await;
}
