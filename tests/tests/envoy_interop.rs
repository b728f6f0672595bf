//! Interoperability of Elsinore's data plane with a real Envoy (1.40), in
//! both directions: Envoy as another mesh's egress dialing an Elsinore
//! ingress with a SPIFFE client certificate over HTTP/2, and Envoy as a
//! foreign mesh's mTLS ingress that an Elsinore egress dials after
//! importing the service from a scripted Hamlet owner. Certificates are
//! minted per test; Envoy runs on loopback ports it picks itself. Envoy
//! must be on `PATH` at the version pinned in `.ci/tools.env` (`.ci/run`
//! installs it; the tests never install anything). Without it each test
//! fails under `CI=true`, saying why; outside CI it says loudly that it
//! skipped, and nextest shows that output (`.config/nextest.toml`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::atomic::Ordering;

use elsinore_gateway::proxy::ingress::Refusal;
use elsinore_tests::envoy::{Envoy, envoy_binary};
use elsinore_tests::scripted::{Advertised, ScriptedOwner};
use elsinore_tests::{
    Backend, ConfigSpec, ExportSpec, MeshFixture, PeerSpec, WAIT, get, http1_send, names, run_test,
    wait_for,
};
use http::StatusCode;

const A: &str = "mesh-a";
const B: &str = "mesh-b";
const C: &str = "mesh-c";
const E: &str = "mesh-e";

/// A YAML double-quoted scalar (JSON strings are a subset).
fn q(s: impl std::fmt::Display) -> String {
    serde_json::to_string(&s.to_string()).unwrap()
}

fn qp(p: &Path) -> String {
    q(p.display())
}

/// The HTTP router filter, as every HCM below uses it.
const ROUTER: &str = r#"
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"#;

/// One upstream cluster to an Elsinore ingress over mTLS + HTTP/2.
fn elsinore_cluster(
    name: &str,
    ingress: std::net::SocketAddr,
    sni: &str,
    cert: &Path,
    key: &Path,
    ca: &Path,
    san: &str,
) -> String {
    format!(
        r#"
  - name: {name}
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: {ip}, port_value: {port} }}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {sni}
        common_tls_context:
          alpn_protocols: ["h2"]
          tls_certificates:
          - certificate_chain: {{ filename: {cert} }}
            private_key: {{ filename: {key} }}
          validation_context:
            trusted_ca: {{ filename: {ca} }}
            match_typed_subject_alt_names:
            - san_type: URI
              matcher: {{ exact: {san} }}"#,
        ip = ingress.ip(),
        port = ingress.port(),
        sni = q(sni),
        cert = qp(cert),
        key = qp(key),
        ca = qp(ca),
        san = q(san),
    )
}

// ---------------------------------------------------------------------------
// 11. Envoy as mesh-c's egress, Elsinore A's ingress.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_egress_with_spiffe_client_cert_reaches_elsinore_ingress() {
    run_test(async {
        let Some(binary) = envoy_binary().await else {
            return;
        };
        let a = MeshFixture::data_plane(A).await;
        let b = MeshFixture::data_plane(B).await;
        let c = MeshFixture::data_plane(C).await;
        let reviews = Backend::http1("reviews").await;
        let secret = Backend::http1("secret").await;
        let ga = a
            .start(
                &ConfigSpec::new()
                    .export(
                        ExportSpec::new("reviews", &[C])
                            .port(9080)
                            .backend(&reviews.host_port()),
                    )
                    .export(
                        ExportSpec::new("secret", &[B])
                            .port(9081)
                            .backend(&secret.host_port()),
                    )
                    .peer(b.peer())
                    // Envoy is mesh-c's gateway here: its ID is allowed to
                    // speak for mesh-c (peers[].identities).
                    .peer(c.peer().identity("spiffe://mesh-c.test/ns/envoy/sa/egress")),
            )
            .await;

        // Envoy's identity: a workload of mesh-c, minted by mesh-c's CA.
        let envoy_id = MeshFixture::spiffe_id("mesh-c.test", "/ns/envoy/sa/egress");
        let (cert, key) = c.write_identity("envoy-egress", &c.issue(&envoy_id));
        let a_gateway = a.gateway_id().to_string();
        let ingress = ga.ingress_addr();
        let bootstrap = format!(
            r#"
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 0 }}
static_resources:
  listeners:
  - name: app
    address:
      socket_address: {{ address: 127.0.0.1, port_value: 0 }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: app
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/secret" }}
                route: {{ cluster: secret, host_rewrite_literal: secret.mesh-a.global }}
              - match: {{ prefix: "/" }}
                route: {{ cluster: reviews, host_rewrite_literal: reviews.mesh-a.global }}{ROUTER}
  clusters:{reviews_cluster}{secret_cluster}
"#,
            reviews_cluster = elsinore_cluster(
                "reviews",
                ingress,
                "reviews.mesh-a.global",
                &cert,
                &key,
                &a.ca_pem,
                &a_gateway
            ),
            secret_cluster = elsinore_cluster(
                "secret",
                ingress,
                "secret.mesh-a.global",
                &cert,
                &key,
                &a.ca_pem,
                &a_gateway
            ),
        );
        let envoy = Envoy::start(&binary, &bootstrap).await;
        let app = envoy.listener("app").await;

        let reply = http1_send(app, get("whatever.local", "/hello"))
            .await
            .unwrap_or_else(|e| panic!("request through Envoy: {e}\n{}", envoy.log_tail()));
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{}\n--- envoy log:\n{}",
            reply.text(),
            envoy.log_tail()
        );
        let seen = reply.json();
        assert_eq!(seen["backend"], "reviews", "{seen}");
        assert_eq!(seen["identity"], envoy_id.to_string(), "{seen}");
        assert_eq!(seen["host"], "reviews.mesh-a.global", "{seen}");
        assert_eq!(seen["path"], "/hello", "{seen}");
        // Envoy really spoke HTTP/2 over its TLS connection to Elsinore.
        assert!(envoy.counter("cluster.reviews.upstream_cx_http2_total").await >= 1);
        assert!(envoy.counter("cluster.reviews.ssl.handshake").await >= 1);

        // What A exports only to mesh-b is closed to Envoy's mesh-c identity.
        let refused = ga.ingress_stats().refused(Refusal::Unauthorized);
        let reply = http1_send(app, get("whatever.local", "/secret"))
            .await
            .expect("an answer from Envoy");
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
        assert!(ga.ingress_stats().refused(Refusal::Unauthorized) > refused);
        assert_eq!(secret.hits(), 0);
        assert_eq!(reviews.hits(), 1);
        assert!(ga.ingress_stats().authorized.load(Ordering::Relaxed) >= 1);

        drop(envoy);
        ga.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 12. Envoy as a foreign mesh's ingress, Elsinore B's egress.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elsinore_egress_reaches_a_foreign_mesh_through_envoy_ingress() {
    run_test(async {
        let Some(binary) = envoy_binary().await else {
            return;
        };
        let b = MeshFixture::data_plane(B).await;
        let e = MeshFixture::data_plane(E).await;
        let catalogue = Backend::http1("catalogue").await;
        let envoy_id = MeshFixture::spiffe_id("mesh-e.test", "/ns/envoy/sa/ingress");
        let (cert, key) = e.write_identity("envoy-ingress", &e.issue(&envoy_id));
        let sni = "catalogue.mesh-e.internal";

        let bootstrap = format!(
            r#"
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 0 }}
static_resources:
  listeners:
  - name: ingress
    address:
      socket_address: {{ address: 127.0.0.1, port_value: 0 }}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector
    filter_chains:
    - filter_chain_match:
        server_names: [{sni}]
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: ["h2"]
            tls_certificates:
            - certificate_chain: {{ filename: {cert} }}
              private_key: {{ filename: {key} }}
            validation_context:
              trusted_ca: {{ filename: {b_ca} }}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: AUTO
          forward_client_cert_details: SANITIZE_SET
          set_current_client_cert_details: {{ uri: true }}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: catalogue }}{ROUTER}
  clusters:
  - name: catalogue
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: catalogue
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {backend_port} }}
"#,
            sni = q(sni),
            cert = qp(&cert),
            key = qp(&key),
            b_ca = qp(&b.ca_pem),
            backend_port = catalogue.addr.port(),
        );
        let envoy = Envoy::start(&binary, &bootstrap).await;
        let envoy_ingress = envoy.listener("ingress").await;

        // Mesh-e's catalog comes from a scripted Hamlet owner.
        let mut owner = ScriptedOwner::start(&e, &b.bundle()).await;
        let gb = b
            .start(
                &ConfigSpec::new()
                    .snapshot_quiet_period("300ms")
                    .peer(
                        PeerSpec::new(E, e.trust_domain.as_str(), &e.ca_pem)
                            .federation(owner.addr())
                            .any_identity(),
                    ),
            )
            .await;
        owner.accept().await;
        owner
            .publish(&[Advertised {
                name: "catalogue",
                fqdn: "catalogue.mesh-e.global",
                endpoint: envoy_ingress,
                sni,
                sans: vec![envoy_id.to_string()],
                port: 9090,
                protocol: "HTTP",
            }])
            .await;
        wait_for("B to import catalogue from mesh-e", WAIT, || async {
            gb.imported_names(E).await == names(&["catalogue"])
        })
        .await;
        let vip = gb.wait_vip("catalogue.mesh-e.global").await;

        let reply = http1_send(vip, get("catalogue.mesh-e.global", "/items"))
            .await
            .unwrap_or_else(|err| panic!("request through B's egress: {err}\n{}", envoy.log_tail()));
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{}\n--- envoy log:\n{}",
            reply.text(),
            envoy.log_tail()
        );
        let seen = reply.json();
        assert_eq!(seen["backend"], "catalogue", "{seen}");
        assert_eq!(seen["path"], "/items", "{seen}");
        assert_eq!(seen["host"], "catalogue.mesh-e.global", "{seen}");
        // Envoy verified B's gateway certificate and says whose it was.
        let request = catalogue.requests().pop().expect("the backend saw it");
        let xfcc = request
            .headers
            .get("x-forwarded-client-cert")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            xfcc.contains(&format!("URI={}", b.gateway_id())),
            "x-forwarded-client-cert: {xfcc:?}"
        );
        // B's egress negotiated h2 with Envoy's listener.
        assert!(envoy.counter("http.ingress.downstream_cx_http2_total").await >= 1);
        assert!(gb.egress_stats().upstream_connects >= 1);

        owner.cut();
        gb.stop().await;
        drop(envoy);
    })
    .await;
}
