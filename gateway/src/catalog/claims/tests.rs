//! Each claim rule and its boundaries: label-wise suffixes (`global` vs
//! `xglobal`), trailing dots and case, the most specific suffix deciding
//! shadowing, instance names, and every limit at and just over its value.

use super::*;
use elsinore_federation_api::{Endpoint, Instance, Protocol};

fn svc(fqdn: &str) -> FederatedService {
    FederatedService {
        name: "svc".to_owned(),
        description: String::new(),
        tags: Vec::new(),
        labels: StringMap::new(),
        fqdn: fqdn.to_owned(),
        endpoints: vec![Endpoint {
            address: "192.0.2.1".to_owned(),
            port: 15443,
            labels: Vec::new(),
            description: String::new(),
        }],
        sans: vec!["spiffe://mesh-b.example/gateway".to_owned()],
        instances: vec![instance("v1")],
    }
}

fn instance(id: &str) -> Instance {
    Instance {
        id: id.to_owned(),
        protocol: Protocol::Http,
        metadata: StringMap::from([("PORT".to_owned(), "9080".to_owned())]),
        endpoint_selector: Vec::new(),
        description: String::new(),
    }
}

/// Peer mesh-b may claim `global`; mesh-c `mesh-c.global`; mesh-d
/// `global` too; our export is `reviews.mesh-a.global`.
fn claims_b() -> Claims {
    let mut c = Claims::new(
        "mesh-b",
        ["global".to_owned()],
        vec![
            ("mesh-c".to_owned(), "mesh-c.global".to_owned()),
            ("mesh-d".to_owned(), "global".to_owned()),
        ],
        PeerLimits::default(),
    );
    c.set_local(["Reviews.Mesh-A.Global.".to_owned()]);
    c
}

#[track_caller]
fn refused(c: &Claims, fqdn: &str) -> Refusal {
    c.check(&svc(fqdn), 0, false)
        .expect_err(&format!("{fqdn} should be refused"))
}

#[track_caller]
fn assert_refused(c: &Claims, fqdn: &str, rule: Rule, needles: &[&str]) {
    let r = refused(c, fqdn);
    assert_eq!(r.rule, rule, "{fqdn}: {r}");
    for needle in needles {
        assert!(r.message.contains(needle), "{r:?} lacks {needle:?}");
    }
}

#[test]
fn names_under_an_allowed_suffix_pass() {
    let c = claims_b();
    c.check(&svc("reviews.mesh-b.global"), 0, false).unwrap();
    c.check(&svc("a.b.c.global"), 0, false).unwrap();
    // Case and one trailing dot do not matter.
    c.check_name("fqdn", "Reviews.Mesh-B.GLOBAL.").unwrap();
}

#[test]
fn suffixes_match_whole_labels() {
    let c = claims_b();
    assert_refused(
        &c,
        "reviews.xglobal",
        Rule::NotAllowed,
        &[
            "fqdn \"reviews.xglobal\" is not under any name peer mesh-b may claim",
            "allowedNames: global",
        ],
    );
    assert_refused(&c, "global.example", Rule::NotAllowed, &["global.example"]);
    // A name equal to a suffix is under it.
    let pinned = Claims::new(
        "p",
        [".Reviews.Mesh-B.Global.".to_owned()],
        vec![],
        PeerLimits::default(),
    );
    pinned.check_name("fqdn", "reviews.mesh-b.global").unwrap();
    assert_eq!(
        pinned
            .check_name("fqdn", "ratings.mesh-b.global")
            .unwrap_err()
            .rule,
        Rule::NotAllowed
    );
    let none = Claims::new("p", Vec::new(), vec![], PeerLimits::default());
    let r = none.check_name("fqdn", "a.global").unwrap_err();
    assert!(r.message.contains("allowedNames: none"), "{r}");
}

#[test]
fn cluster_local_names_are_never_claimable() {
    // Even a peer configured to claim everything under `local`.
    let c = Claims::new("p", ["local".to_owned()], vec![], PeerLimits::default());
    assert_refused(
        &c,
        "kubernetes.default.svc.cluster.local",
        Rule::ClusterLocal,
        &[
            "fqdn \"kubernetes.default.svc.cluster.local\" is under the cluster-local zone cluster.local, which no peer may claim",
        ],
    );
    c.check_name("fqdn", "printer.local").unwrap();
    let svc_zone = Claims::new("p", ["svc".to_owned()], vec![], PeerLimits::default());
    assert_refused(
        &svc_zone,
        "reviews.default.svc",
        Rule::ClusterLocal,
        &["cluster-local zone svc"],
    );
}

#[test]
fn ip_literals_and_localhost_are_never_claimable() {
    let c = Claims::new(
        "p",
        ["1".to_owned(), "localhost".to_owned(), "0x7f".to_owned()],
        vec![],
        PeerLimits::default(),
    );
    assert_refused(
        &c,
        "10.0.0.1",
        Rule::IpLiteral,
        &["fqdn \"10.0.0.1\" is an IP literal"],
    );
    assert_refused(&c, "a.0x7f", Rule::IpLiteral, &["IP literal"]);
    assert_eq!(
        c.check_name("fqdn", "[::1]").unwrap_err().rule,
        Rule::IpLiteral
    );
    assert_refused(&c, "db.localhost", Rule::Localhost, &["under localhost"]);
    assert_eq!(
        c.check_name("fqdn", "LOCALHOST.").unwrap_err().rule,
        Rule::Localhost
    );
}

#[test]
fn our_own_export_names_are_never_claimable() {
    let c = claims_b();
    assert_refused(
        &c,
        "reviews.mesh-a.global",
        Rule::LocalExport,
        &["one of this mesh's own exports"],
    );
    c.check_name("fqdn", "ratings.mesh-a.global").unwrap();
    // An instance name that spells our export is refused too.
    let mut s = svc("mesh-a.global");
    s.instances.push(instance("reviews"));
    let r = c.check(&s, 0, false).unwrap_err();
    assert_eq!(r.rule, Rule::LocalExport, "{r}");
    assert!(
        r.message
            .starts_with("instances[1] name \"reviews.mesh-a.global\""),
        "{r}"
    );
}

#[test]
fn no_peer_shadows_a_more_specific_suffix_of_another() {
    let c = claims_b();
    assert_refused(
        &c,
        "stars.mesh-c.global",
        Rule::OtherPeer,
        &[
            "under mesh-c.global, which peer mesh-c may claim and is more specific than this peer's global",
        ],
    );
    // The apex of the other peer's suffix too.
    assert_eq!(
        c.check_name("fqdn", "mesh-c.global").unwrap_err().rule,
        Rule::OtherPeer
    );
    // Through an instance name: `x.stars.global` is claimable, but not its
    // instance `mesh-c` when a peer owns `mesh-c.stars.global`.
    let mut s = svc("stars.global");
    s.instances = vec![instance("mesh-c")];
    c.check(&s, 0, false).unwrap();
    let strict = Claims::new(
        "mesh-b",
        ["global".to_owned()],
        vec![("mesh-c".to_owned(), "mesh-c.stars.global".to_owned())],
        PeerLimits::default(),
    );
    let r = strict.check(&s, 0, false).unwrap_err();
    assert_eq!(r.rule, Rule::OtherPeer, "{r}");
    assert!(
        r.message
            .starts_with("instances[0] name \"mesh-c.stars.global\""),
        "{r}"
    );
    // A peer allowed that very name as well shadows nobody.
    let also = Claims::new(
        "mesh-b",
        ["global".to_owned(), "mesh-c.stars.global".to_owned()],
        vec![("mesh-c".to_owned(), "mesh-c.stars.global".to_owned())],
        PeerLimits::default(),
    );
    also.check(&s, 0, false).unwrap();
    // A name only label-wise alike is not under it.
    c.check_name("fqdn", "x.xmesh-c.global").unwrap();
    // The same suffix on two peers is no shadowing: aliasing sorts it out.
    c.check_name("fqdn", "stars.mesh-d.global").unwrap();
    // mesh-c itself, and a peer that may claim the specific suffix too.
    let mesh_c = Claims::new(
        "mesh-c",
        ["mesh-c.global".to_owned()],
        vec![("mesh-b".to_owned(), "global".to_owned())],
        PeerLimits::default(),
    );
    mesh_c.check_name("fqdn", "stars.mesh-c.global").unwrap();
    let both = Claims::new(
        "mesh-e",
        ["global".to_owned(), "mesh-c.global".to_owned()],
        vec![("mesh-c".to_owned(), "mesh-c.global".to_owned())],
        PeerLimits::default(),
    );
    both.check_name("fqdn", "stars.mesh-c.global").unwrap();
}

#[test]
fn for_peer_takes_the_other_peers_suffixes_from_config() {
    let cfg = crate::config::Config::from_yaml_str(
        "mesh: { name: mesh-a, trustDomain: mesh-a.example }
identity: { certificate: c.pem, privateKey: k.pem }
peers:
  - { name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem }
  - { name: mesh-c, trustDomain: mesh-c.example, trustBundle: c.pem, allowedNames: [mesh-c.global], limits: { services: 3 } }
",
        std::path::Path::new("/"),
    )
    .unwrap();
    let b = Claims::for_peer(&cfg.peers[0], &cfg.peers);
    assert_eq!(
        b.check_name("fqdn", "x.mesh-c.global").unwrap_err().rule,
        Rule::OtherPeer
    );
    let c = Claims::for_peer(&cfg.peers[1], &cfg.peers);
    c.check_name("fqdn", "x.mesh-c.global").unwrap();
    assert_eq!(c.limits().services, 3);
    assert_eq!(
        c.check(&svc("x.mesh-c.global"), 3, false).unwrap_err().rule,
        Rule::Services
    );
}

fn limited(limits: PeerLimits) -> Claims {
    Claims::new("mesh-b", ["global".to_owned()], vec![], limits)
}

#[test]
fn services_limit_refuses_new_names_only() {
    let c = limited(PeerLimits {
        services: 2,
        ..PeerLimits::default()
    });
    c.check(&svc("a.global"), 1, false).unwrap();
    let r = c.check(&svc("a.global"), 2, false).unwrap_err();
    assert_eq!(r.rule, Rule::Services);
    assert!(
        r.message
            .contains("3, more than limits.services allows for peer mesh-b (2)"),
        "{r}"
    );
    // An update of a held service is fine at the limit.
    c.check(&svc("a.global"), 2, true).unwrap();
}

#[test]
fn per_service_limits_at_and_over_their_value() {
    let c = limited(PeerLimits {
        instances_per_service: 2,
        endpoints_per_service: 2,
        metadata_entries: 2,
        metadata_bytes: 20,
        ..PeerLimits::default()
    });
    let mut s = svc("a.global");
    s.instances.push(instance("v2"));
    c.check(&s, 0, false).unwrap();
    s.instances.push(instance("v3"));
    let r = c.check(&s, 0, false).unwrap_err();
    assert_eq!(r.rule, Rule::InstancesPerService);
    assert!(
        r.message
            .contains("instances: 3, more than limits.instancesPerService"),
        "{r}"
    );

    let mut s = svc("a.global");
    s.endpoints.push(s.endpoints[0].clone());
    c.check(&s, 0, false).unwrap();
    s.endpoints.push(s.endpoints[0].clone());
    assert_eq!(
        c.check(&s, 0, false).unwrap_err().rule,
        Rule::EndpointsPerService
    );

    let mut s = svc("a.global");
    // PORT 9080 (8 bytes) + SNI a.global (11 bytes) = 19 bytes, 2 entries;
    // with SNI abc.global, 21 bytes.
    s.instances[0]
        .metadata
        .insert("SNI".to_owned(), "a.global".to_owned());
    c.check(&s, 0, false).unwrap();
    s.instances[0]
        .metadata
        .insert("SNI".to_owned(), "abc.global".to_owned());
    let r = c.check(&s, 0, false).unwrap_err();
    assert_eq!(r.rule, Rule::MetadataBytes, "{r}");
    assert!(
        r.message
            .starts_with("instances[0].metadata bytes (keys and values): 21"),
        "{r}"
    );
    s.instances[0]
        .metadata
        .insert("X".to_owned(), String::new());
    assert_eq!(
        c.check(&s, 0, false).unwrap_err().rule,
        Rule::MetadataEntries
    );

    let mut s = svc("a.global");
    s.labels = StringMap::from([
        ("a".to_owned(), String::new()),
        ("b".to_owned(), String::new()),
        ("c".to_owned(), String::new()),
    ]);
    let r = c.check(&s, 0, false).unwrap_err();
    assert_eq!(r.rule, Rule::MetadataEntries);
    assert!(r.message.starts_with("labels entries: 3"), "{r}");
}

#[test]
fn names_are_checked_before_limits() {
    let c = limited(PeerLimits {
        services: 1,
        ..PeerLimits::default()
    });
    assert_eq!(
        c.check(&svc("a.cluster.local"), 5, false).unwrap_err().rule,
        Rule::ClusterLocal
    );
}

#[test]
fn rule_labels_are_distinct() {
    let labels: HashSet<&str> = Rule::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(labels.len(), Rule::ALL.len());
}
