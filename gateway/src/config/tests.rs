//! Tests of the config module: the example shapes parse to the expected
//! typed values, defaults apply, and every rule reports its YAML path.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

const BASE: &str = "/etc/elsinore";

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::from_yaml_str(text, Path::new(BASE))
}

fn ok(text: &str) -> Config {
    match parse(text) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got:\n{e}\n--- yaml:\n{text}"),
    }
}

fn errs(text: &str) -> Vec<ConfigError> {
    match parse(text) {
        Ok(c) => panic!("expected errors, got {c:#?}\n--- yaml:\n{text}"),
        Err(ConfigErrors(e)) => {
            assert!(!e.is_empty(), "an error result must hold errors");
            e
        }
    }
}

/// Asserts that `text` is rejected with an error at exactly `path` whose
/// message contains every one of `needles`.
#[track_caller]
fn assert_err(text: &str, path: &str, needles: &[&str]) {
    let errors = errs(text);
    let hit = errors
        .iter()
        .any(|e| e.path == path && needles.iter().all(|n| e.message.contains(n)));
    assert!(
        hit,
        "no error at {path:?} containing {needles:?}; got:\n{}\n--- yaml:\n{text}",
        ConfigErrors(errors.clone())
    );
}

const HEAD: &str = "mesh: { name: mesh-a, trustDomain: mesh-a.example }
identity: { certificate: certs/gw.pem, privateKey: certs/gw.key }
";
const ADVERTISE: &str = "advertise: { address: gw.mesh-a.example }\n";
const PEER_B: &str = "peers:
  - { name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem }
";

fn doc(rest: &str) -> String {
    format!("{HEAD}{rest}")
}

/// A config with advertise, peer mesh-b, and the given exports (flow maps).
fn with_exports(exports: &[&str]) -> String {
    let mut s = doc(ADVERTISE);
    s.push_str(PEER_B);
    s.push_str("exports:\n");
    for e in exports {
        s.push_str(&format!("  - {e}\n"));
    }
    s
}

fn with_peers(peers: &[&str]) -> String {
    let mut s = doc("peers:\n");
    for p in peers {
        s.push_str(&format!("  - {p}\n"));
    }
    s
}

fn hp(host: &str, port: u16) -> HostPort {
    HostPort {
        host: host.to_owned(),
        port,
    }
}

const FULL: &str = r#"
mesh: { name: mesh-a, trustDomain: mesh-a.example }
identity: { certificate: certs/a/gateway.pem, privateKey: certs/a/gateway.key }
listeners: { federation: "0.0.0.0:8008", admin: "127.0.0.1:15000", ingress: "0.0.0.0:15443", egress: "127.0.0.1:15001", dns: "127.0.0.1:15053" }
advertise: { address: gw.mesh-a.example, port: 15443 }
exports:
  - name: reviews
    fqdn: reviews.mesh-a.global
    protocol: HTTP
    port: 9080
    backends: ["reviews.default.svc.cluster.local:9080", "10.0.0.1:9080", "[::1]:9080"]
    peers: [mesh-b]
peers:
  - name: mesh-b
    trustDomain: mesh-b.example
    trustBundle: certs/b/ca.pem
    federation: "gw.mesh-b.example:8008"
    apiVersion: v1alpha2
imports: { staleAfter: 5m, cacheDir: /var/lib/elsinore }
federation: { window: 256, ackTimeout: 30s, snapshotQuietPeriod: 2s, backoff: { initial: 1s, max: 30s } }
drain: { delay: 10s, timeout: 45s }
"#;

#[test]
fn full_example_parses_to_typed_values() {
    let expected = Config {
        mesh: Mesh {
            name: "mesh-a".to_owned(),
            trust_domain: "mesh-a.example".parse().unwrap(),
        },
        identity: IdentityFiles {
            certificate: PathBuf::from("/etc/elsinore/certs/a/gateway.pem"),
            private_key: PathBuf::from("/etc/elsinore/certs/a/gateway.key"),
            trust_bundle: None,
        },
        listeners: Listeners {
            federation: "0.0.0.0:8008".parse().unwrap(),
            admin: "127.0.0.1:15000".parse().unwrap(),
            ingress: Some("0.0.0.0:15443".parse().unwrap()),
            egress: Some("127.0.0.1:15001".parse().unwrap()),
            dns: Some("127.0.0.1:15053".parse().unwrap()),
        },
        advertise: Advertise {
            address: "gw.mesh-a.example".to_owned(),
            port: 15443,
        },
        exports: vec![Export {
            name: "reviews".to_owned(),
            fqdn: "reviews.mesh-a.global".to_owned(),
            protocol: Protocol::Http,
            port: 9080,
            backends: vec![
                hp("reviews.default.svc.cluster.local", 9080),
                hp("10.0.0.1", 9080),
                hp("::1", 9080),
            ],
            peers: vec!["mesh-b".to_owned()],
        }],
        peers: vec![Peer {
            name: "mesh-b".to_owned(),
            trust_domain: "mesh-b.example".parse().unwrap(),
            trust_bundle: PathBuf::from("/etc/elsinore/certs/b/ca.pem"),
            federation: Some(hp("gw.mesh-b.example", 8008)),
            api_version: ApiVersion::V1alpha2,
            identities: PeerIdentities::gateway_of(&"mesh-b.example".parse().unwrap()),
            follow_trust_bundle: false,
            dial: crate::config::DialMode::Consumer,
            allowed_names: vec!["global".to_owned()],
            limits: crate::config::PeerLimits::default(),
        }],
        imports: Imports {
            stale_after: Duration::from_secs(300),
            cache_dir: Some(PathBuf::from("/var/lib/elsinore")),
            port_overrides: Default::default(),
        },
        federation: FederationTuning {
            window: 256,
            ack_timeout: Duration::from_secs(30),
            snapshot_quiet_period: Duration::from_secs(2),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
        },
        proxy: crate::config::ProxyTuning::default(),
        drain: crate::config::Drain {
            delay: Duration::from_secs(10),
            timeout: Duration::from_secs(45),
        },
    };
    assert_eq!(ok(FULL), expected);
}

#[test]
fn defaults_apply_to_a_minimal_config() {
    let c = ok(HEAD);
    assert_eq!(c.listeners, Listeners::default());
    assert_eq!(c.listeners.federation, "0.0.0.0:8008".parse().unwrap());
    assert_eq!(c.listeners.admin, "127.0.0.1:15000".parse().unwrap());
    assert_eq!(c.listeners.ingress, Some("0.0.0.0:15443".parse().unwrap()));
    assert_eq!(c.listeners.egress, Some("127.0.0.1:15001".parse().unwrap()));
    assert_eq!(c.listeners.dns, Some("127.0.0.1:15053".parse().unwrap()));
    // No exports: advertise may be omitted and is never shown to anyone.
    assert_eq!(
        c.advertise,
        Advertise {
            address: "localhost".to_owned(),
            port: 15443
        }
    );
    assert!(c.exports.is_empty() && c.peers.is_empty());
    assert_eq!(c.imports.stale_after, Duration::from_secs(300));
    assert_eq!(c.imports.cache_dir, None);
    assert_eq!(c.imports, Imports::default());
    assert_eq!(c.federation, FederationTuning::default());
    assert_eq!(c.federation.window, 256);
    assert_eq!(c.federation.ack_timeout, Duration::from_secs(30));
    assert_eq!(c.federation.snapshot_quiet_period, Duration::from_secs(2));
    assert_eq!(c.federation.backoff_initial, Duration::from_secs(1));
    assert_eq!(c.federation.backoff_max, Duration::from_secs(30));
    // What nginx advertises (HAProxy 100): each stream may hold a backend
    // exchange, so a larger default lets one peer connection hold more.
    assert_eq!(c.proxy.http2_max_concurrent_streams, 128);
}

#[test]
fn export_and_peer_defaults() {
    let c = ok(&with_exports(&[
        r#"{ name: ratings, protocol: tcp, backends: ["ratings:9081", "10.0.0.2:1"] }"#,
    ]));
    let e = &c.exports[0];
    assert_eq!(e.fqdn, "ratings.mesh-a.global");
    assert_eq!(e.port, 9081, "port defaults to the first backend's");
    assert_eq!(e.protocol, Protocol::Tcp);
    assert!(e.peers.is_empty(), "no peers: allowed, visible to no one");
    // advertise.port defaults to the ingress listener's port.
    assert_eq!(c.advertise.port, 15443);
    let p = &c.peers[0];
    assert_eq!(p.api_version, ApiVersion::V1alpha2);
    assert_eq!(p.federation, None);
    assert_eq!(
        p.dial,
        crate::config::DialMode::Consumer,
        "the consumer dials by default"
    );

    let c = ok(&format!(
        "{}listeners: {{ ingress: \"127.0.0.1:18443\" }}\n",
        with_exports(&[r#"{ name: a, protocol: HTTP, backends: ["a:1"] }"#])
    ));
    assert_eq!(c.advertise.port, 18443);
}

#[test]
fn mesh_name_must_be_a_dns_label() {
    for bad in [
        "Mesh-A",
        "-mesh",
        "mesh-",
        "mesh_a",
        "mesh.a",
        &"m".repeat(64),
    ] {
        let text = HEAD.replace("name: mesh-a", &format!("name: \"{bad}\""));
        assert_err(
            &text,
            "mesh.name",
            &[&format!("{bad:?} is not a DNS label")],
        );
    }
    ok(&HEAD.replace("name: mesh-a", &format!("name: {}", "m".repeat(63))));
}

#[test]
fn trust_domains_are_parsed() {
    let text = HEAD.replace("trustDomain: mesh-a.example", "trustDomain: Mesh-A.example");
    assert_err(&text, "mesh.trustDomain", &["\"Mesh-A.example\""]);
    let text = HEAD.replace("trustDomain: mesh-a.example", "trustDomain: \"\"");
    assert_err(&text, "mesh.trustDomain", &["empty"]);
    assert_err(
        &with_peers(&["{ name: mesh-b, trustDomain: \"mesh b\", trustBundle: b.pem }"]),
        "peers[0].trustDomain",
        &["\"mesh b\""],
    );
}

#[test]
fn a_listener_that_is_off_does_not_claim_its_default_address() {
    // 0.0.0.0:15443 is ingress's default; with ingress off it is free.
    let c = ok(&doc(
        "listeners: { ingress: \"off\", federation: \"0.0.0.0:15443\" }\n",
    ));
    assert_eq!(c.listeners.ingress, None);
    assert_eq!(c.listeners.federation, "0.0.0.0:15443".parse().unwrap());
}

#[test]
fn listeners_must_be_socket_addresses() {
    assert_err(
        &doc("listeners: { admin: \"localhost:15000\" }\n"),
        "listeners.admin",
        &["\"localhost:15000\" is not a socket address"],
    );
    assert_err(
        &doc("listeners: { dns: \"127.0.0.1\" }\n"),
        "listeners.dns",
        &["\"127.0.0.1\""],
    );
    assert_err(
        &doc("listeners: { egress: \"127.0.0.1:15000\" }\n"),
        "listeners.egress",
        &["127.0.0.1:15000 is already used by listeners.admin"],
    );
    // Port 0 (any free port) may repeat; tests bind everything that way.
    let c = ok(&doc(
        "listeners: { federation: \"127.0.0.1:0\", admin: \"127.0.0.1:0\", ingress: \"[::1]:0\" }\n",
    ));
    assert_eq!(c.listeners.ingress, Some("[::1]:0".parse().unwrap()));
}

#[test]
fn advertise_is_required_with_exports_and_checked() {
    let text = format!(
        "{HEAD}{PEER_B}exports:\n  - {{ name: reviews, protocol: HTTP, backends: [\"r:1\"] }}\n"
    );
    assert_err(
        &text,
        "advertise",
        &["required when there are exports", "\"reviews\""],
    );

    let text = with_exports(&[r#"{ name: a, protocol: HTTP, backends: ["a:1"] }"#]);
    for (bad, path, needle) in [
        (
            "address: bad_host",
            "advertise.address",
            "\"bad_host\" is not an IP address or DNS name",
        ),
        (
            "address: gw.example, port: 0",
            "advertise.port",
            "0 is not a port in 1..=65535",
        ),
        (
            "address: gw.example, port: 70000",
            "advertise.port",
            "70000 is not a port",
        ),
    ] {
        let t = text.replace("address: gw.mesh-a.example", bad);
        assert_err(&t, path, &[needle]);
    }
    let t = format!("{text}listeners: {{ ingress: \"127.0.0.1:0\" }}\n");
    assert_err(
        &t,
        "advertise.port",
        &["required when listeners.ingress has port 0"],
    );
    let c = ok(&text.replace("address: gw.mesh-a.example", "address: \"::1\", port: 443"));
    assert_eq!(
        c.advertise,
        Advertise {
            address: "::1".to_owned(),
            port: 443
        }
    );
}

#[test]
fn export_names_are_unique_dns_labels() {
    assert_err(
        &with_exports(&[r#"{ name: Reviews, protocol: HTTP, backends: ["r:1"] }"#]),
        "exports[0].name",
        &["\"Reviews\" is not a DNS label"],
    );
    assert_err(
        &with_exports(&[
            r#"{ name: reviews, protocol: HTTP, backends: ["r:1"] }"#,
            r#"{ name: details, protocol: HTTP, backends: ["d:1"] }"#,
            r#"{ name: reviews, fqdn: other.example, protocol: HTTP, backends: ["r:1"] }"#,
        ]),
        "exports[2].name",
        &["duplicate export name \"reviews\" (also exports[0])"],
    );
}

#[test]
fn fqdns_are_valid_lowercased_and_unique() {
    let c = ok(&with_exports(&[
        r#"{ name: reviews, fqdn: Reviews.Mesh-A.Global., protocol: HTTP, backends: ["r:1"] }"#,
    ]));
    assert_eq!(c.exports[0].fqdn, "reviews.mesh-a.global");
    for bad in [
        "reviews..global",
        "-reviews.global",
        "reviews_x.global",
        "10.0.0.1",
    ] {
        assert_err(
            &with_exports(&[&format!(
                r#"{{ name: reviews, fqdn: "{bad}", protocol: HTTP, backends: ["r:1"] }}"#
            )]),
            "exports[0].fqdn",
            &[&format!("{bad:?} is not a valid DNS name")],
        );
    }
    // An explicit fqdn colliding with another export's default one.
    assert_err(
        &with_exports(&[
            r#"{ name: reviews, protocol: HTTP, backends: ["r:1"] }"#,
            r#"{ name: details, fqdn: REVIEWS.mesh-a.global, protocol: HTTP, backends: ["d:1"] }"#,
        ]),
        "exports[1].fqdn",
        &["duplicate fqdn \"reviews.mesh-a.global\" (also exports[0])"],
    );
    assert_err(
        &with_exports(&[
            r#"{ name: details, fqdn: reviews.mesh-a.global, protocol: HTTP, backends: ["d:1"] }"#,
            r#"{ name: reviews, protocol: HTTP, backends: ["r:1"] }"#,
        ]),
        "exports[1].fqdn",
        &["duplicate fqdn \"reviews.mesh-a.global\" (the default for this name)"],
    );
}

#[test]
fn protocol_must_parse() {
    assert_err(
        &with_exports(&[r#"{ name: reviews, protocol: SOAP, backends: ["r:1"] }"#]),
        "exports[0].protocol",
        &["unknown protocol \"SOAP\"", "HTTP, HTTPS, GRPC"],
    );
    for (p, want) in [
        ("HTTP", Protocol::Http),
        ("HTTPS", Protocol::Https),
        ("GRPC", Protocol::Grpc),
        ("HTTP2", Protocol::Http2),
        ("MONGO", Protocol::Mongo),
        ("TCP", Protocol::Tcp),
        ("TLS", Protocol::Tls),
        ("MTLS", Protocol::Mtls),
    ] {
        let c = ok(&with_exports(&[&format!(
            r#"{{ name: x, protocol: {p}, backends: ["x:1"] }}"#
        )]));
        assert_eq!(c.exports[0].protocol, want);
    }
}

#[test]
fn backends_are_required_host_ports() {
    assert_err(
        &with_exports(&["{ name: reviews, protocol: HTTP, port: 80, backends: [] }"]),
        "exports[0].backends",
        &["at least one backend is required"],
    );
    assert_err(
        &with_exports(&["{ name: reviews, protocol: HTTP, port: 80 }"]),
        "exports[0].backends",
        &["at least one backend is required"],
    );
    for (bad, needle) in [
        ("reviews", "has no port"),
        ("reviews:0", "port \"0\""),
        ("reviews:99999", "port \"99999\""),
        ("::1:80", "without brackets"),
        ("bad_host:80", "host \"bad_host\""),
    ] {
        assert_err(
            &with_exports(&[&format!(
                r#"{{ name: reviews, protocol: HTTP, port: 80, backends: ["ok:1", "{bad}"] }}"#
            )]),
            "exports[0].backends[1]",
            &[needle, &format!("{bad:?}")],
        );
    }
}

#[test]
fn export_port_defaults_and_range() {
    let c = ok(&with_exports(&[
        r#"{ name: a, protocol: HTTP, backends: ["[::1]:8443", "b:1"] }"#,
        r#"{ name: b, protocol: HTTP, port: 80, backends: ["b:9000"] }"#,
    ]));
    assert_eq!((c.exports[0].port, c.exports[1].port), (8443, 80));
    assert_eq!(c.exports[0].backends[0], hp("::1", 8443));
    for bad in ["0", "65536", "-1"] {
        assert_err(
            &with_exports(&[&format!(
                r#"{{ name: a, protocol: HTTP, port: {bad}, backends: ["a:1"] }}"#
            )]),
            "exports[0].port",
            &[&format!("{bad} is not a port in 1..=65535")],
        );
    }
}

#[test]
fn export_peers_must_be_configured() {
    let errors = errs(&with_exports(&[
        r#"{ name: reviews, protocol: HTTP, backends: ["r:1"], peers: [mesh-b, mesh-z] }"#,
    ]));
    assert_eq!(
        errors,
        vec![ConfigError::new(
            "exports[0].peers[1]",
            "unknown peer \"mesh-z\" (configured peers: mesh-b)"
        )]
    );
    assert_eq!(
        ConfigErrors(errors).to_string(),
        "exports[0].peers[1]: unknown peer \"mesh-z\" (configured peers: mesh-b)"
    );
    let text = format!(
        "{HEAD}{ADVERTISE}exports:\n  - {{ name: r, protocol: HTTP, backends: [\"r:1\"], peers: [mesh-b] }}\n"
    );
    assert_err(&text, "exports[0].peers[0]", &["(configured peers: none)"]);
    assert_err(
        &with_exports(&[
            r#"{ name: r, protocol: HTTP, backends: ["r:1"], peers: [mesh-b, mesh-b] }"#,
        ]),
        "exports[0].peers[1]",
        &["\"mesh-b\" is listed twice"],
    );
}

#[test]
fn peer_names_are_unique_dns_labels() {
    assert_err(
        &with_peers(&["{ name: Mesh-B, trustDomain: mesh-b.example, trustBundle: b.pem }"]),
        "peers[0].name",
        &["\"Mesh-B\" is not a DNS label"],
    );
    assert_err(
        &with_peers(&[
            "{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem }",
            "{ name: mesh-b, trustDomain: mesh-c.example, trustBundle: c.pem }",
        ]),
        "peers[1].name",
        &["duplicate peer name \"mesh-b\" (also peers[0])"],
    );
}

#[test]
fn peer_trust_domains_are_unique_and_not_ours() {
    assert_err(
        &with_peers(&[
            "{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem }",
            "{ name: mesh-c, trustDomain: mesh-b.example, trustBundle: c.pem }",
        ]),
        "peers[1].trustDomain",
        &["duplicate trust domain \"mesh-b.example\" (also peers[0])"],
    );
    assert_err(
        &with_peers(&["{ name: mesh-b, trustDomain: mesh-a.example, trustBundle: b.pem }"]),
        "peers[0].trustDomain",
        &["\"mesh-a.example\" is our own trust domain"],
    );
}

#[test]
fn peer_federation_address_and_api_version() {
    let c = ok(&with_peers(&[
        "{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem, federation: \"[::1]:8008\", apiVersion: v1alpha1 }",
    ]));
    assert_eq!(c.peers[0].federation, Some(hp("::1", 8008)));
    assert_eq!(c.peers[0].api_version, ApiVersion::V1alpha1);
    assert_err(
        &with_peers(&[
            "{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem, federation: gw.mesh-b.example }",
        ]),
        "peers[0].federation",
        &["\"gw.mesh-b.example\" has no port"],
    );
    assert_err(
        &with_peers(&[
            "{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem, apiVersion: V1alpha2 }",
        ]),
        "peers[0].apiVersion",
        &["unknown API version \"V1alpha2\" (expected one of v1alpha2, v1alpha1)"],
    );
    assert_err(
        &with_peers(&["{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: \"\" }"]),
        "peers[0].trustBundle",
        &["must not be empty"],
    );
}

#[test]
fn drain_rules() {
    let c = ok(HEAD);
    assert_eq!(c.drain.delay, Duration::from_secs(5));
    assert_eq!(c.drain.timeout, Duration::from_secs(30));
    let c = ok(&doc("drain: { delay: 0s, timeout: 2m }\n"));
    assert_eq!(c.drain.delay, Duration::ZERO);
    assert_eq!(c.drain.timeout, Duration::from_secs(120));
    assert_err(
        &doc("drain: { timeout: 0s }\n"),
        "drain.timeout",
        &["\"0s\" must be greater than 0"],
    );
    assert_err(
        &doc("drain: { delay: later }\n"),
        "drain.delay",
        &["\"later\" is not a duration"],
    );
    assert_err(
        &doc("drain: { grace: 1s }\n"),
        "drain.grace",
        &["unknown field `grace`"],
    );
}

#[test]
fn imports_rules() {
    assert_err(
        &doc("imports: { staleAfter: 0s }\n"),
        "imports.staleAfter",
        &["\"0s\" must be greater than 0"],
    );
    assert_err(
        &doc("imports: { staleAfter: soon }\n"),
        "imports.staleAfter",
        &["\"soon\" is not a duration"],
    );
    let c = ok(&doc("imports: { staleAfter: 1h30m, cacheDir: cache }\n"));
    assert_eq!(c.imports.stale_after, Duration::from_secs(90 * 60));
    assert_eq!(
        c.imports.cache_dir,
        Some(PathBuf::from("/etc/elsinore/cache"))
    );
}

#[test]
fn federation_tuning_rules() {
    for bad in ["0", "4097", "-3"] {
        assert_err(
            &doc(&format!("federation: {{ window: {bad} }}\n")),
            "federation.window",
            &[&format!("{bad} is out of range 1..=4096")],
        );
    }
    assert_eq!(
        ok(&doc("federation: { window: 4096 }\n")).federation.window,
        4096
    );
    assert_eq!(ok(&doc("federation: { window: 1 }\n")).federation.window, 1);
    assert_err(
        &doc("federation: { ackTimeout: 30 parsecs }\n"),
        "federation.ackTimeout",
        &["\"30 parsecs\" is not a duration"],
    );
    assert_err(
        &doc("federation: { ackTimeout: 0s }\n"),
        "federation.ackTimeout",
        &["must be greater than 0"],
    );
    assert_err(
        &doc("federation: { snapshotQuietPeriod: 0ms }\n"),
        "federation.snapshotQuietPeriod",
        &["\"0ms\" must be greater than 0"],
    );
    assert_err(
        &doc("federation: { backoff: { initial: 500ms } }\n"),
        "federation.backoff.initial",
        &["\"500ms\" is below the minimum of 1s"],
    );
    assert_err(
        &doc("federation: { backoff: { initial: 10s, max: 5s } }\n"),
        "federation.backoff.max",
        &["5s is less than federation.backoff.initial (10s)"],
    );
    // max defaults to 30s, so an initial above it is caught at max.
    assert_err(
        &doc("federation: { backoff: { initial: 1m } }\n"),
        "federation.backoff.max",
        &["30s is less than federation.backoff.initial (1m)"],
    );
    let c = ok(&doc(
        "federation: { window: 16, ackTimeout: 5s, snapshotQuietPeriod: 250ms, backoff: { initial: 2s, max: 2s } }\n",
    ));
    assert_eq!(
        c.federation,
        FederationTuning {
            window: 16,
            ack_timeout: Duration::from_secs(5),
            snapshot_quiet_period: Duration::from_millis(250),
            backoff_initial: Duration::from_secs(2),
            backoff_max: Duration::from_secs(2),
        }
    );
}

#[test]
fn unknown_keys_are_rejected_with_their_path() {
    let e = errs(&doc("exprots: []\n"));
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].path, "exprots");
    assert!(e[0].message.contains("unknown field `exprots`"), "{}", e[0]);
    assert!(
        e[0].message.contains("exports"),
        "names the expected keys: {}",
        e[0]
    );
    assert!(e[0].message.contains("(line 3, column 1)"), "{}", e[0]);

    let text = with_exports(&[r#"{ name: a, protocol: HTTP, backends: ["a:1"] }"#])
        .replace("- { name: a,", "- { name: a, prot: 3,");
    assert_err(
        &text,
        "exports[0].prot",
        &["unknown field `prot`", "backends"],
    );

    let text = doc("federation:\n  backoff:\n    initial: 1s\n    maximum: 1m\n");
    assert_err(
        &text,
        "federation.backoff.maximum",
        &["unknown field `maximum`", "(line 6, column 5)"],
    );
}

#[test]
fn missing_keys_and_wrong_types_are_located() {
    assert_err(
        "mesh: { name: mesh-a }\nidentity: { certificate: c, privateKey: k }\n",
        "mesh",
        &["missing field `trustDomain`"],
    );
    assert_err(
        &doc("peers:\n  - name: mesh-b\n    trustDomain: mesh-b.example\n"),
        "peers[0]",
        &["missing field `trustBundle`"],
    );
    assert_err(
        &with_exports(&[r#"{ name: a, protocol: HTTP, port: eighty, backends: ["a:1"] }"#]),
        "exports[0].port",
        &["expected an integer (line 7, column 38)"],
    );
    assert_err(&doc("exports: 3\n"), "exports", &["sequence"]);
}

#[test]
fn syntax_errors_and_empty_documents() {
    let e = errs("mesh: [\n");
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].path, "");
    assert!(e[0].message.contains("line"), "{}", e[0]);
    let e = errs("# nothing yet\n");
    assert_eq!(
        e,
        [ConfigError::new(
            "",
            "the config is empty (it needs at least mesh and identity)"
        )]
    );
    // Document-level errors print without a leading ": ".
    assert!(!ConfigErrors(e).to_string().starts_with(':'));
    assert_err(
        "mesh: { name: a, trustDomain: a.example, name: b }\n",
        "mesh.name",
        &["duplicate mapping key: name (line 1, column 42)"],
    );
    let e = errs("mesh: { name: a, trustDomain: a.example, name: b }\n");
    assert!(!e[0].message.contains("DuplicateKeyPolicy"), "{}", e[0]);
}

#[test]
fn all_errors_are_reported_one_per_line() {
    let text = r#"
mesh: { name: Mesh-A, trustDomain: mesh-a.example }
identity: { certificate: c.pem, privateKey: "" }
listeners: { admin: nowhere }
exports:
  - { name: reviews, protocol: SOAP, backends: ["r"], peers: [mesh-z] }
peers:
  - { name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem, apiVersion: v2 }
imports: { staleAfter: 0s }
federation: { window: 0, backoff: { initial: 100ms } }
"#;
    let errors = errs(text);
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "mesh.name",
            "identity.privateKey",
            "listeners.admin",
            "advertise",
            "exports[0].protocol",
            "exports[0].backends[0]",
            "exports[0].peers[0]",
            "peers[0].apiVersion",
            "imports.staleAfter",
            "federation.window",
            "federation.backoff.initial",
        ]
    );
    let shown = ConfigErrors(errors.clone()).to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), errors.len());
    for (line, e) in lines.iter().zip(&errors) {
        assert_eq!(*line, format!("{}: {}", e.path, e.message));
    }
}

#[test]
fn relative_paths_resolve_against_base_dir() {
    let text = doc(&format!(
        "{PEER_B}imports: {{ cacheDir: /var/cache/elsinore }}\n"
    ))
    .replace("certificate: certs/gw.pem", "certificate: /abs/gw.pem");
    let c = Config::from_yaml_str(&text, Path::new("/srv/gw")).unwrap();
    assert_eq!(c.identity.certificate, PathBuf::from("/abs/gw.pem"));
    assert_eq!(
        c.identity.private_key,
        PathBuf::from("/srv/gw/certs/gw.key")
    );
    assert_eq!(c.peers[0].trust_bundle, PathBuf::from("/srv/gw/b.pem"));
    assert_eq!(
        c.imports.cache_dir,
        Some(PathBuf::from("/var/cache/elsinore"))
    );
    let c = Config::from_yaml_str(&text, Path::new("conf")).unwrap();
    assert_eq!(c.identity.private_key, PathBuf::from("conf/certs/gw.key"));
}

#[test]
fn check_files_reports_missing_and_unreadable_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    std::fs::write(dir.path().join("certs/gw.pem"), "cert").unwrap();
    std::fs::write(dir.path().join("certs/gw.key"), "key").unwrap();
    std::fs::create_dir(dir.path().join("c.pem")).unwrap();
    let text = doc("peers:
  - { name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem }
  - { name: mesh-c, trustDomain: mesh-c.example, trustBundle: c.pem }
");
    let c = Config::from_yaml_str(&text, dir.path()).unwrap();
    let ConfigErrors(errors) = c.check_files().unwrap_err();
    assert_eq!(errors.len(), 2, "{errors:?}");
    let missing = dir.path().join("b.pem");
    assert_eq!(errors[0].path, "peers[0].trustBundle");
    assert!(
        errors[0]
            .message
            .contains(&format!("cannot read \"{}\"", missing.display())),
        "{}",
        errors[0]
    );
    assert_eq!(errors[1].path, "peers[1].trustBundle");
    assert!(
        errors[1].message.contains("is not a regular file"),
        "{}",
        errors[1]
    );

    std::fs::write(&missing, "bundle").unwrap();
    std::fs::remove_dir(dir.path().join("c.pem")).unwrap();
    std::fs::write(dir.path().join("c.pem"), "bundle").unwrap();
    c.check_files().unwrap();

    std::fs::remove_file(dir.path().join("certs/gw.key")).unwrap();
    let ConfigErrors(errors) = c.check_files().unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].path, "identity.privateKey");
}

#[test]
fn load_reads_resolves_and_checks() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    for f in ["certs/gw.pem", "certs/gw.key", "b.pem"] {
        std::fs::write(dir.path().join(f), "x").unwrap();
    }
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, doc(PEER_B)).unwrap();
    let c = Config::load(&file).unwrap();
    assert_eq!(c.identity.certificate, dir.path().join("certs/gw.pem"));
    assert_eq!(c.peers[0].trust_bundle, dir.path().join("b.pem"));

    std::fs::remove_file(dir.path().join("b.pem")).unwrap();
    let e = Config::load(&file).unwrap_err();
    assert_eq!(e.0[0].path, "peers[0].trustBundle");

    let nowhere = dir.path().join("nope.yaml");
    let e = Config::load(&nowhere).unwrap_err();
    assert_eq!(e.0.len(), 1);
    assert_eq!(e.0[0].path, "");
    assert!(e.0[0].message.contains("cannot read config file"), "{}", e);
    assert!(
        e.0[0].message.contains(&nowhere.display().to_string()),
        "{}",
        e
    );

    std::fs::write(&file, "mesh: {}\n").unwrap();
    let e = Config::load(&file).unwrap_err();
    assert!(e.to_string().contains("missing field"), "{e}");
}

#[test]
fn deploy_examples_parse() {
    let base = Path::new("/examples");
    let a = Config::from_yaml_str(include_str!("../../../deploy/examples/mesh-a.yaml"), base)
        .unwrap_or_else(|e| panic!("mesh-a.yaml:\n{e}"));
    let b = Config::from_yaml_str(include_str!("../../../deploy/examples/mesh-b.yaml"), base)
        .unwrap_or_else(|e| panic!("mesh-b.yaml:\n{e}"));

    assert_eq!(a.mesh.name, "mesh-a");
    assert_eq!(b.mesh.name, "mesh-b");
    let names = |c: &Config| c.exports.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&a), ["reviews", "ratings"]);
    assert_eq!(names(&b), ["details"]);
    assert_eq!(a.exports[0].protocol, Protocol::Http);
    assert_eq!(a.exports[0].backends, [hp("127.0.0.1", 9080)]);
    assert_eq!(a.exports[1].protocol, Protocol::Tcp);
    assert!(a.exports.iter().all(|e| e.peers == ["mesh-b"]));
    assert!(b.exports.iter().all(|e| e.peers == ["mesh-a"]));

    // Each dials the other's federation listener and trusts the other's CA.
    assert_eq!(a.peers[0].trust_domain, b.mesh.trust_domain);
    assert_eq!(b.peers[0].trust_domain, a.mesh.trust_domain);
    assert_eq!(
        a.peers[0].federation.as_ref().map(ToString::to_string),
        Some(b.listeners.federation.to_string())
    );
    assert_eq!(
        b.peers[0].federation.as_ref().map(ToString::to_string),
        Some(a.listeners.federation.to_string())
    );
    assert_eq!(a.peers[0].trust_bundle, base.join("certs/mesh-b/ca.pem"));
    assert_eq!(b.peers[0].trust_bundle, base.join("certs/mesh-a/ca.pem"));
    assert_eq!(
        a.identity.certificate,
        base.join("certs/mesh-a/gateway.pem")
    );
    assert_eq!(
        Some(a.advertise.port),
        a.listeners.ingress.map(|s| s.port())
    );
    assert_eq!(
        Some(b.advertise.port),
        b.listeners.ingress.map(|s| s.port())
    );

    // Both run on one machine: no listener address is shared.
    let all = |c: &Config| {
        let l = &c.listeners;
        [
            Some(l.federation),
            Some(l.admin),
            l.ingress,
            l.egress,
            l.dns,
        ]
    };
    let mut seen = std::collections::HashSet::new();
    for addr in all(&a).into_iter().chain(all(&b)) {
        let addr = addr.unwrap();
        assert!(addr.ip().is_loopback(), "{addr}");
        assert!(seen.insert(addr), "{addr} used twice");
    }
}

#[test]
fn large_configs_are_not_cut_off_by_the_parser_budget() {
    // serde-saphyr's default budget (250,000 nodes) stops at ~30,000 exports.
    let mut text = String::from(
        "mesh: { name: mesh-a, trustDomain: mesh-a.example }\n\
         identity: { certificate: gw.pem, privateKey: gw.key }\n\
         advertise: { address: 127.0.0.1, port: 15443 }\n\
         peers: [{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem }]\n\
         exports:\n",
    );
    for i in 0..40_000 {
        text.push_str(&format!(
            "  - {{ name: s{i}, protocol: HTTP, backends: [\"127.0.0.1:9080\"], peers: [mesh-b] }}\n"
        ));
    }
    let config = Config::from_yaml_str(&text, Path::new("/etc/elsinore")).unwrap();
    assert_eq!(config.exports.len(), 40_000);
}

#[test]
fn proxy_section_parses_and_checks_its_values() {
    let base = "mesh: { name: mesh-a, trustDomain: mesh-a.example }\n\
                identity: { certificate: gw.pem, privateKey: gw.key }\n";
    let config = Config::from_yaml_str(
        &format!(
            "{base}proxy: {{ vipRange: 127.90.0.0/16, connectTimeout: 2s, maxConnections: 10, tlsResumption: false, yieldToClients: true }}\n"
        ),
        Path::new("/etc/elsinore"),
    )
    .unwrap();
    assert_eq!(config.proxy.vip_range.to_string(), "127.90.0.0/16");
    assert_eq!(config.proxy.connect_timeout, Duration::from_secs(2));
    assert_eq!(config.proxy.max_connections, 10);
    assert!(!config.proxy.tls_resumption);
    assert!(config.proxy.yield_to_clients);
    let defaults = Config::from_yaml_str(base, Path::new("/")).unwrap().proxy;
    assert!(defaults.tls_resumption);
    assert!(!defaults.yield_to_clients);

    let errors = Config::from_yaml_str(
        &format!("{base}proxy: {{ vipRange: 127.90.0.1/16, maxConnections: 0 }}\n"),
        Path::new("/etc/elsinore"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        errors.contains("proxy.vipRange: 127.90.0.1/16 has host bits set"),
        "{errors}"
    );
    assert!(
        errors.contains("proxy.maxConnections: 0 is out of range"),
        "{errors}"
    );
}

#[test]
fn data_plane_listeners_can_be_switched_off() {
    let config = Config::from_yaml_str(
        "mesh: { name: mesh-a, trustDomain: mesh-a.example }\n\
         identity: { certificate: gw.pem, privateKey: gw.key }\n\
         listeners: { egress: \"off\", dns: \"off\" }\n",
        Path::new("/etc/elsinore"),
    )
    .unwrap();
    assert_eq!(config.listeners.egress, None);
    assert_eq!(config.listeners.dns, None);
    assert!(
        config.listeners.ingress.is_some(),
        "ingress stays on by default"
    );
}

#[test]
fn egress_mode_and_port_overrides() {
    let c = ok(&doc("proxy: { vipRange: 10.231.99.0/24 }\n"));
    assert_eq!(c.proxy.mode, super::EgressMode::Vip);
    assert_eq!(c.proxy.vip_range.to_string(), "10.231.99.0/24");
    let c = ok(&doc(
        "proxy: { mode: shared, shared: { answer: 10.96.0.53 }, vipListenerBudget: 100 }\nimports: { portOverrides: { PG.Mesh-A.Global.: 15432 } }\n",
    ));
    assert_eq!(
        c.proxy.mode,
        super::EgressMode::Shared {
            answer: super::SharedAnswer::Address("10.96.0.53".parse().unwrap()),
            bind: "0.0.0.0".parse().unwrap(),
        }
    );
    assert_eq!(c.proxy.vip_listener_budget, Some(100));
    assert_eq!(c.imports.port_overrides["pg.mesh-a.global"], 15432);
    let c = ok(&doc(
        "proxy: { mode: shared, shared: { answer: Egress.Elsinore.svc.cluster.local., bind: 10.0.0.7 } }\n",
    ));
    assert_eq!(
        c.proxy.mode,
        super::EgressMode::Shared {
            answer: super::SharedAnswer::Cname("egress.elsinore.svc.cluster.local".into()),
            bind: "10.0.0.7".parse().unwrap(),
        }
    );
    for (text, path) in [
        ("proxy: { mode: shared }\n", "proxy.shared"),
        ("proxy: { mode: vipp }\n", "proxy.mode"),
        ("proxy: { shared: { answer: 10.0.0.1 } }\n", "proxy.shared"),
        (
            "proxy: { mode: shared, shared: { answer: \"not a name!\" } }\n",
            "proxy.shared.answer",
        ),
        (
            "proxy: { mode: shared, shared: { answer: 10.0.0.1, bind: nowhere } }\n",
            "proxy.shared.bind",
        ),
        (
            "proxy: { vipListenerBudget: -1 }\n",
            "proxy.vipListenerBudget",
        ),
        (
            "imports: { portOverrides: { pg.mesh-a.global: 0 } }\n",
            "imports.portOverrides.pg.mesh-a.global",
        ),
        (
            "imports: { portOverrides: { \"bad name\": 80 } }\n",
            "imports.portOverrides.bad name",
        ),
    ] {
        let errors =
            Config::from_yaml_str(&doc(text), std::path::Path::new("/etc/elsinore")).unwrap_err();
        assert!(
            errors.0.iter().any(|e| e.path == path),
            "{text}: expected an error at {path}, got {errors}"
        );
    }
}

#[test]
fn peer_identities_default_to_the_peers_gateway_and_are_checked() {
    let c = ok(&with_peers(&[
        "{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem }",
    ]));
    let gateway: SpiffeId = "spiffe://mesh-b.example/ns/elsinore/sa/gateway"
        .parse()
        .unwrap();
    let workload: SpiffeId = "spiffe://mesh-b.example/ns/prod/sa/web".parse().unwrap();
    assert_eq!(
        c.peers[0].identities,
        PeerIdentities::Only(vec![gateway.clone()])
    );
    assert!(c.peers[0].allows(&gateway));
    assert!(!c.peers[0].allows(&workload), "safe by default");

    let c = ok(&with_peers(&[
        "{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem, identities: [\"spiffe://mesh-b.example/ns/prod/sa/web\"] }",
    ]));
    assert!(c.peers[0].allows(&workload));
    assert!(!c.peers[0].allows(&gateway), "a list replaces the default");

    let c = ok(&with_peers(&[
        "{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem, identities: [\"spiffe://mesh-b.example/*\"] }",
    ]));
    assert_eq!(c.peers[0].identities, PeerIdentities::AnyInTrustDomain);
    assert!(c.peers[0].allows(&workload) && c.peers[0].allows(&gateway));
    let other: SpiffeId = "spiffe://mesh-c.example/ns/elsinore/sa/gateway"
        .parse()
        .unwrap();
    assert!(
        !c.peers[0].allows(&other),
        "the wildcard stays in the peer's trust domain"
    );
    assert_eq!(
        effective::to_json(&c)["peers"][0]["identities"],
        serde_json::json!(["spiffe://mesh-b.example/*"])
    );

    let bad = |list: &str, path: &str, msg: &str| {
        assert_err(
            &with_peers(&[&format!(
                "{{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem, identities: {list} }}"
            )]),
            path,
            &[msg],
        );
    };
    bad("[]", "peers[0].identities", "must not be empty");
    bad(
        "[\"spiffe://mesh-c.example/ns/elsinore/sa/gateway\"]",
        "peers[0].identities[0]",
        "is in trust domain \"mesh-c.example\", not the peer's (\"mesh-b.example\"",
    );
    bad(
        "[\"spiffe://mesh-b.example/ns/elsinore/sa/gateway\", \"http://mesh-b.example/x\"]",
        "peers[0].identities[1]",
        "does not start with spiffe://",
    );
    bad(
        "[\"spiffe://mesh-b.example/ns/*\"]",
        "peers[0].identities[0]",
        "the only wildcard is \"spiffe://mesh-b.example/*\"",
    );
    bad(
        "[\"spiffe://mesh-c.example/*\"]",
        "peers[0].identities[0]",
        "the only wildcard is \"spiffe://mesh-b.example/*\"",
    );
    bad(
        "[\"spiffe://mesh-b.example/x\", \"spiffe://mesh-b.example/x\"]",
        "peers[0].identities[1]",
        "is listed twice",
    );
}

#[test]
fn follow_trust_bundle_needs_a_cache_and_our_bundle_is_a_path() {
    let c = ok(&with_peers(&[
        "{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem }",
    ]));
    assert!(!c.peers[0].follow_trust_bundle, "off by default");
    assert_eq!(c.identity.trust_bundle, None);
    assert_err(
        &with_peers(&[
            "{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem, followTrustBundle: true }",
        ]),
        "peers[0].followTrustBundle",
        &["requires imports.cacheDir"],
    );
    let text = with_peers(&[
        "{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem, followTrustBundle: true }",
    ])
    .replace(
        "identity: {",
        "imports: { cacheDir: /var/lib/elsinore }\nidentity: { trustBundle: certs/own.pem, ",
    );
    let c = ok(&text);
    assert!(c.peers[0].follow_trust_bundle);
    let own = c.identity.trust_bundle.clone().unwrap();
    assert!(
        own.is_absolute() && own.ends_with("certs/own.pem"),
        "{own:?}"
    );
    let v = effective::to_json(&c);
    assert_eq!(v["peers"][0]["followTrustBundle"], true);
    assert!(
        v["identity"]["trustBundle"]
            .as_str()
            .unwrap()
            .ends_with("certs/own.pem")
    );
}

/// `peers[].dial`: which side of the peer's streams dials; the owner's push
/// exists only in v1alpha2, so v1alpha1 with `dial: owner` is refused.
#[test]
fn peer_dial_direction() {
    use crate::config::DialMode;
    let c = ok(&with_peers(&[
        "{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem, federation: \"gw.b:8008\", dial: owner }",
        "{ name: mesh-c, trustDomain: mesh-c.example, trustBundle: c.pem, dial: consumer }",
        "{ name: mesh-d, trustDomain: mesh-d.example, trustBundle: d.pem, dial: owner }",
    ]));
    assert_eq!(c.peers[0].dial, DialMode::Owner);
    assert_eq!(c.peers[1].dial, DialMode::Consumer);
    assert_eq!(
        c.peers[2].dial,
        DialMode::Owner,
        "no federation: we only accept its pushes"
    );
    assert_eq!(
        crate::config::effective::to_json(&c)["peers"][0]["dial"],
        "owner"
    );
    assert_err(
        &with_peers(&[
            "{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem, federation: \"gw.b:8008\", apiVersion: v1alpha1, dial: owner }",
        ]),
        "peers[0].dial",
        &["owner needs apiVersion v1alpha2", "v1alpha1"],
    );
    assert_err(
        &with_peers(&[
            "{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem, dial: Owner }",
        ]),
        "peers[0].dial",
        &["unknown dial direction \"Owner\" (expected one of consumer, owner)"],
    );
}

#[test]
fn peer_allowed_names_default_normalize_and_refuse_reserved_zones() {
    let c = ok(&with_peers(&[
        "{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem }",
        "{ name: mesh-c, trustDomain: mesh-c.example, trustBundle: c.pem, allowedNames: [.Mesh-C.Global., example.com] }",
        "{ name: mesh-d, trustDomain: mesh-d.example, trustBundle: d.pem, allowedNames: [] }",
    ]));
    assert_eq!(c.peers[0].allowed_names, ["global"]);
    assert_eq!(c.peers[1].allowed_names, ["mesh-c.global", "example.com"]);
    assert!(c.peers[2].allowed_names.is_empty());
    let peer = |names: &str| {
        with_peers(&[&format!(
            "{{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem, allowedNames: [{names}] }}"
        )])
    };
    for (names, path, needle) in [
        (
            "global, cluster.local",
            "peers[0].allowedNames[1]",
            "\"cluster.local\" is under the cluster-local zone cluster.local, which no peer may claim",
        ),
        (
            "default.svc",
            "peers[0].allowedNames[0]",
            "cluster-local zone svc",
        ),
        (
            "\"10.0.0.0\"",
            "peers[0].allowedNames[0]",
            "\"10.0.0.0\" is an IP literal",
        ),
        ("\"[::1]\"", "peers[0].allowedNames[0]", "IP literal"),
        ("LocalHost", "peers[0].allowedNames[0]", "under localhost"),
        (
            "\"\"",
            "peers[0].allowedNames[0]",
            "not a DNS name or label",
        ),
        (
            "a_b.global",
            "peers[0].allowedNames[0]",
            "\"a_b.global\" is not a DNS name",
        ),
        (
            "global, Global.",
            "peers[0].allowedNames[1]",
            "\"global\" is listed twice (also peers[0].allowedNames[0])",
        ),
    ] {
        assert_err(&peer(names), path, &[needle]);
    }
}

#[test]
fn peer_limits_default_and_ranges() {
    let c = ok(&with_peers(&[
        "{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem }",
        "{ name: mesh-c, trustDomain: mesh-c.example, trustBundle: c.pem, limits: { services: 10, instancesPerService: 2, endpointsPerService: 3, messageBytes: 65536, metadataEntries: 4, metadataBytes: 512 } }",
    ]));
    assert_eq!(c.peers[0].limits, PeerLimits::default());
    assert_eq!(c.peers[0].limits.services, 200_000);
    assert_eq!(c.peers[0].limits.message_bytes, 4 * 1024 * 1024);
    assert_eq!(
        c.peers[1].limits,
        PeerLimits {
            services: 10,
            instances_per_service: 2,
            endpoints_per_service: 3,
            message_bytes: 65536,
            metadata_entries: 4,
            metadata_bytes: 512,
        }
    );
    let peer = |limits: &str| {
        with_peers(&[&format!(
            "{{ name: mesh-b, trustDomain: mesh-b.example, trustBundle: b.pem, limits: {{ {limits} }} }}"
        )])
    };
    assert_err(
        &peer("services: 0"),
        "peers[0].limits.services",
        &["0 is out of range 1..=10000000"],
    );
    assert_err(
        &peer("messageBytes: 100"),
        "peers[0].limits.messageBytes",
        &["100 is out of range 1024..=268435456"],
    );
    assert_err(
        &peer("metadataEntries: -1"),
        "peers[0].limits.metadataEntries",
        &["-1 is out of range"],
    );
    let errors = errs(&peer("instancesPerService: 1, bogus: 2"));
    assert!(
        errors.iter().any(|e| e.message.contains("bogus")),
        "{}",
        ConfigErrors(errors.clone())
    );
}
