//! Real mTLS handshakes over 127.0.0.1 with certificates minted per test:
//! what the server and client configs of `elsinore-certs` accept and refuse.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use elsinore_certs::{
    Ca, CertError, Identity, SpiffeId, TrustBundle, TrustDomain, client_config, init,
    peer_spiffe_id, server_config, spiffe_id_of,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const ALPN: &[&[u8]] = &[b"h2"];

fn td(s: &str) -> TrustDomain {
    s.parse().unwrap()
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn identity(ca: &Ca, spiffe_id: &str) -> Identity {
    let issued = ca.issue(&id(spiffe_id), &[], &[]).unwrap();
    Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap()
}

fn bundle(trust_domain: &str, ca: &Ca) -> TrustBundle {
    TrustBundle::from_pem(td(trust_domain), ca.cert_pem().as_bytes()).unwrap()
}

/// Both sides of one connection: the peer ID each side saw, or its error.
struct Outcome {
    server: Result<SpiffeId, std::io::Error>,
    client: Result<SpiffeId, std::io::Error>,
    alpn: Option<Vec<u8>>,
}

/// Runs one handshake over real TCP. The server writes two bytes once its
/// handshake is done and the client reads them, so a rejection by the server
/// (which in TLS 1.3 happens after the client's handshake has completed)
/// reaches the client as an error.
async fn run(server: Arc<rustls::ServerConfig>, client: Arc<rustls::ClientConfig>) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = TlsAcceptor::from(server).accept(tcp).await?;
        let peer =
            peer_spiffe_id(tls.get_ref().1.peer_certificates()).map_err(std::io::Error::other)?;
        tls.write_all(b"ok").await?;
        tls.shutdown().await?;
        Ok::<_, std::io::Error>(peer)
    });
    let client_side = async {
        let tcp = TcpStream::connect(addr).await?;
        // Deliberately a name the certificates do not carry: SPIFFE
        // authentication must not depend on it.
        let name = ServerName::try_from("not-in-any-cert.invalid").unwrap();
        let mut tls = TlsConnector::from(client).connect(name, tcp).await?;
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let peer =
            peer_spiffe_id(tls.get_ref().1.peer_certificates()).map_err(std::io::Error::other)?;
        let mut buf = [0u8; 2];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"ok");
        Ok::<_, std::io::Error>((peer, alpn))
    };
    let (server, client) = tokio::time::timeout(Duration::from_secs(10), async {
        let client = client_side.await;
        (server_task.await.unwrap(), client)
    })
    .await
    .expect("handshake timed out");
    let (client, alpn) = match client {
        Ok((peer, alpn)) => (Ok(peer), alpn),
        Err(e) => (Err(e), None),
    };
    Outcome {
        server,
        client,
        alpn,
    }
}

/// The `CertError` our verifier put inside the rustls error, if any.
fn cert_error(e: &std::io::Error) -> Option<&CertError> {
    let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) =
        e.get_ref()?.downcast_ref::<rustls::Error>()?
    else {
        return None;
    };
    other.0.downcast_ref::<CertError>()
}

struct Mesh {
    ca: Ca,
    bundle: TrustBundle,
    gateway: Identity,
}

fn mesh(name: &str) -> Mesh {
    let ca = Ca::new(&td(name)).unwrap();
    let gateway = identity(&ca, &SpiffeId::gateway(td(name)).to_string());
    Mesh {
        bundle: bundle(name, &ca),
        ca,
        gateway,
    }
}

#[tokio::test]
async fn mtls_handshake_succeeds_and_both_sides_see_each_other() {
    let a = mesh("mesh-a");
    let b = mesh("mesh-b");
    let server = server_config(&a.gateway, std::slice::from_ref(&b.bundle), ALPN).unwrap();
    let allowed = [SpiffeId::gateway(td("mesh-a"))];
    let client = client_config(&b.gateway, &a.bundle, Some(&allowed), ALPN).unwrap();
    let out = run(server, client).await;
    assert_eq!(out.server.unwrap(), SpiffeId::gateway(td("mesh-b")));
    assert_eq!(out.client.unwrap(), SpiffeId::gateway(td("mesh-a")));
    assert_eq!(out.alpn.as_deref(), Some(&b"h2"[..]));
}

#[tokio::test]
async fn server_accepts_tls12_client_with_valid_svid() {
    // A stock rustls client restricted to TLS 1.2 exercises the server's
    // TLS 1.2 client-signature path.
    let a = Ca::new(&td("mesh-a")).unwrap();
    let b = mesh("mesh-b");
    let issued = a
        .issue(
            &SpiffeId::gateway(td("mesh-a")),
            &["not-in-any-cert.invalid".to_owned()],
            &[],
        )
        .unwrap();
    let server_id =
        Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
    let server = server_config(&server_id, std::slice::from_ref(&b.bundle), ALPN).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(bundle("mesh-a", &a).roots()[0].clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(b.gateway.cert_chain().to_vec(), b.gateway.private_key())
    .unwrap();
    let out = run(server, Arc::new(client)).await;
    assert_eq!(out.server.unwrap(), SpiffeId::gateway(td("mesh-b")));
    assert_eq!(out.client.unwrap(), SpiffeId::gateway(td("mesh-a")));
}

#[tokio::test]
async fn server_rejects_client_without_certificate() {
    let a = Ca::new(&td("mesh-a")).unwrap();
    let b = mesh("mesh-b");
    let issued = a
        .issue(
            &SpiffeId::gateway(td("mesh-a")),
            &["not-in-any-cert.invalid".to_owned()],
            &[],
        )
        .unwrap();
    let server_id =
        Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
    let server = server_config(&server_id, std::slice::from_ref(&b.bundle), ALPN).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(bundle("mesh-a", &a).roots()[0].clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let out = run(server, Arc::new(client)).await;
    let err = out.server.unwrap_err();
    assert!(
        matches!(
            err.get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>()),
            Some(rustls::Error::NoCertificatesPresented)
        ),
        "{err}"
    );
    assert!(out.client.is_err());
}

#[tokio::test]
async fn server_rejects_client_from_unrelated_ca() {
    let a = mesh("mesh-a");
    let b = mesh("mesh-b");
    // Same trust domain name as a configured peer, different CA.
    let impostor = mesh("mesh-b");
    let server = server_config(&a.gateway, std::slice::from_ref(&b.bundle), ALPN).unwrap();
    let client = client_config(&impostor.gateway, &a.bundle, None, ALPN).unwrap();
    let out = run(server, client).await;
    let err = out.server.unwrap_err();
    match cert_error(&err) {
        Some(CertError::ChainInvalid { id, against, .. }) => {
            assert_eq!(id, &SpiffeId::gateway(td("mesh-b")));
            assert!(against.contains("mesh-b"), "{against}");
        }
        other => panic!("expected ChainInvalid, got {other:?} ({err})"),
    }
    assert!(out.client.is_err());

    // An unrelated CA claiming a trust domain we have no bundle for.
    let stranger = mesh("mesh-x");
    let server = server_config(&a.gateway, std::slice::from_ref(&b.bundle), ALPN).unwrap();
    let client = client_config(&stranger.gateway, &a.bundle, None, ALPN).unwrap();
    let err = run(server, client).await.server.unwrap_err();
    assert!(
        matches!(cert_error(&err), Some(CertError::UnknownTrustDomain { .. })),
        "{err}"
    );
}

#[tokio::test]
async fn server_rejects_one_peers_ca_minting_another_peers_identity() {
    let a = mesh("mesh-a");
    let b = mesh("mesh-b");
    let c = mesh("mesh-c");
    let bundles = [b.bundle.clone(), c.bundle.clone()];

    // Control: mesh-c's own identity is accepted by this very server setup.
    let server = server_config(&a.gateway, &bundles, ALPN).unwrap();
    let client = client_config(&c.gateway, &a.bundle, None, ALPN).unwrap();
    assert_eq!(
        run(server, client).await.server.unwrap(),
        SpiffeId::gateway(td("mesh-c"))
    );

    // mesh-c's CA signing a mesh-b identity: it chains to a configured
    // bundle, but not to mesh-b's.
    let forged = identity(&c.ca, "spiffe://mesh-b/ns/elsinore/sa/gateway");
    let server = server_config(&a.gateway, &bundles, ALPN).unwrap();
    let client = client_config(&forged, &a.bundle, None, ALPN).unwrap();
    let out = run(server, client).await;
    let err = out.server.unwrap_err();
    match cert_error(&err) {
        Some(CertError::ChainInvalid { id, against, .. }) => {
            assert_eq!(id.trust_domain(), &td("mesh-b"));
            assert_eq!(against, "the trust bundle of mesh-b");
        }
        other => panic!("expected ChainInvalid, got {other:?} ({err})"),
    }
    assert!(out.client.is_err());
}

#[tokio::test]
async fn unknown_trust_domain_from_configured_ca_completes_handshake() {
    let a = mesh("mesh-a");
    let b = mesh("mesh-b");
    let c = mesh("mesh-c");
    let unknown = identity(&c.ca, "spiffe://mesh-z/ns/app/sa/client");
    let server = server_config(&a.gateway, &[b.bundle.clone(), c.bundle.clone()], ALPN).unwrap();
    let client = client_config(&unknown, &a.bundle, None, ALPN).unwrap();
    let out = run(server, client).await;
    let peer = out.server.unwrap();
    assert_eq!(peer.trust_domain(), &td("mesh-z"));
    assert_eq!(peer.path(), "/ns/app/sa/client");
    out.client.unwrap();
}

#[tokio::test]
async fn client_rejects_server_of_wrong_trust_domain() {
    let a = mesh("mesh-a");
    let b = mesh("mesh-b");
    // Signed by mesh-a's CA, but claiming another trust domain.
    let server_id = identity(&a.ca, "spiffe://mesh-q/ns/elsinore/sa/gateway");
    let server = server_config(&server_id, std::slice::from_ref(&b.bundle), ALPN).unwrap();
    let client = client_config(&b.gateway, &a.bundle, None, ALPN).unwrap();
    let err = run(server, client).await.client.unwrap_err();
    match cert_error(&err) {
        Some(CertError::WrongTrustDomain { expected, got }) => {
            assert_eq!(expected, &td("mesh-a"));
            assert_eq!(got.trust_domain(), &td("mesh-q"));
        }
        other => panic!("expected WrongTrustDomain, got {other:?} ({err})"),
    }
}

#[tokio::test]
async fn client_rejects_server_not_in_allowed_ids() {
    let a = mesh("mesh-a");
    let b = mesh("mesh-b");
    let server_id = identity(&a.ca, "spiffe://mesh-a/ns/other/sa/web");
    let allowed = [SpiffeId::gateway(td("mesh-a"))];

    // Control: without the allow-list the same server is accepted.
    let server = server_config(&server_id, std::slice::from_ref(&b.bundle), ALPN).unwrap();
    let client = client_config(&b.gateway, &a.bundle, None, ALPN).unwrap();
    run(server, client).await.client.unwrap();

    let server = server_config(&server_id, std::slice::from_ref(&b.bundle), ALPN).unwrap();
    let client = client_config(&b.gateway, &a.bundle, Some(&allowed), ALPN).unwrap();
    let err = run(server, client).await.client.unwrap_err();
    match cert_error(&err) {
        Some(e @ CertError::SanMismatch { expected, got }) => {
            assert_eq!(got, &id("spiffe://mesh-a/ns/other/sa/web"));
            assert_eq!(expected, "spiffe://mesh-a/ns/elsinore/sa/gateway");
            let msg = e.to_string();
            assert!(msg.contains("spiffe://mesh-a/ns/other/sa/web"), "{msg}");
        }
        other => panic!("expected SanMismatch, got {other:?} ({err})"),
    }
}

#[tokio::test]
async fn client_rejects_server_from_another_ca() {
    let a = mesh("mesh-a");
    let b = mesh("mesh-b");
    // mesh-b's CA minting mesh-a's gateway identity.
    let forged = identity(&b.ca, "spiffe://mesh-a/ns/elsinore/sa/gateway");
    let server = server_config(&forged, std::slice::from_ref(&b.bundle), ALPN).unwrap();
    let client = client_config(&b.gateway, &a.bundle, None, ALPN).unwrap();
    let err = run(server, client).await.client.unwrap_err();
    assert!(
        matches!(cert_error(&err), Some(CertError::ChainInvalid { .. })),
        "{err}"
    );
}

#[test]
fn spiffe_id_of_requires_exactly_one_spiffe_uri() {
    let ca = Ca::new(&td("mesh-a")).unwrap();
    let leaf = |uris: &[&str]| {
        let issued = ca
            .issue_with_uris(uris, &["x.test".to_owned()], &[])
            .unwrap();
        CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()
    };

    assert_eq!(
        spiffe_id_of(&leaf(&["spiffe://mesh-a/x"])).unwrap(),
        id("spiffe://mesh-a/x")
    );
    assert!(matches!(spiffe_id_of(&leaf(&[])), Err(CertError::NoUriSan)));
    match spiffe_id_of(&leaf(&["spiffe://mesh-a/x", "spiffe://mesh-a/y"])) {
        Err(e @ CertError::MultipleUriSans(_)) => {
            let msg = e.to_string();
            assert!(msg.contains("2 URI SANs"), "{msg}");
            assert!(msg.contains("spiffe://mesh-a/y"), "{msg}");
        }
        other => panic!("expected MultipleUriSans, got {other:?}"),
    }
    assert!(matches!(
        spiffe_id_of(&leaf(&["https://mesh-a/x"])),
        Err(CertError::NotSpiffe { .. })
    ));
}

#[tokio::test]
async fn server_rejects_client_cert_that_is_not_an_svid() {
    let a = mesh("mesh-a");
    let b = mesh("mesh-b");
    let issued =
        b.ca.issue_with_uris(&["spiffe://mesh-b/x", "spiffe://mesh-b/y"], &[], &[])
            .unwrap();
    // Identity refuses to load a non-SVID, so build the client by hand.
    let chain = vec![CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()];
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    assert!(matches!(
        Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()),
        Err(CertError::MultipleUriSans(_))
    ));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(a.bundle.roots()[0].clone()).unwrap();
    let a_server =
        a.ca.issue(
            &SpiffeId::gateway(td("mesh-a")),
            &["not-in-any-cert.invalid".to_owned()],
            &[],
        )
        .unwrap();
    let server_id =
        Identity::from_pem(a_server.cert_pem.as_bytes(), a_server.key_pem.as_bytes()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    let server = server_config(&server_id, std::slice::from_ref(&b.bundle), ALPN).unwrap();
    let err = run(server, Arc::new(client)).await.server.unwrap_err();
    assert!(
        matches!(cert_error(&err), Some(CertError::MultipleUriSans(_))),
        "{err}"
    );
}

#[tokio::test]
async fn init_writes_a_ca_and_a_gateway_identity_that_chains_to_it() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fresh/certs");
    let mesh_a = td("mesh-a");
    let files = init(
        &mesh_a,
        &out,
        &["gw.mesh-a.test".to_owned()],
        &["127.0.0.1".parse().unwrap()],
    )
    .unwrap();
    assert_eq!(files.ca_cert, out.join("ca.pem"));
    assert_eq!(files.ca_key, out.join("ca.key"));
    assert_eq!(files.gateway_cert, out.join("gateway.pem"));
    assert_eq!(files.gateway_key, out.join("gateway.key"));
    for key in [&files.ca_key, &files.gateway_key] {
        let mode = std::fs::metadata(key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }

    let gateway = Identity::load(&files.gateway_cert, &files.gateway_key).unwrap();
    assert_eq!(gateway.spiffe_id(), &SpiffeId::gateway(mesh_a.clone()));
    assert_eq!(
        gateway.spiffe_id().to_string(),
        "spiffe://mesh-a/ns/elsinore/sa/gateway"
    );
    let left = gateway
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(
        left > Duration::from_secs(89 * 86400) && left <= Duration::from_secs(90 * 86400),
        "{left:?}"
    );

    // The gateway certificate chains to ca.pem: a client trusting only that
    // file accepts it, and the CA files load back as a working CA.
    let ca_bundle = TrustBundle::load(mesh_a.clone(), &files.ca_cert).unwrap();
    let ca = Ca::from_pem(
        &std::fs::read_to_string(&files.ca_cert).unwrap(),
        &std::fs::read_to_string(&files.ca_key).unwrap(),
    )
    .unwrap();
    let b = mesh("mesh-b");
    let allowed = [SpiffeId::gateway(mesh_a.clone())];
    let server = server_config(&gateway, std::slice::from_ref(&b.bundle), ALPN).unwrap();
    let client = client_config(&b.gateway, &ca_bundle, Some(&allowed), ALPN).unwrap();
    assert_eq!(run(server, client).await.client.unwrap(), allowed[0]);

    // A leaf issued by the reloaded CA is trusted by the original bundle.
    let reissued = identity(&ca, "spiffe://mesh-a/ns/elsinore/sa/gateway");
    let server = server_config(&reissued, std::slice::from_ref(&b.bundle), ALPN).unwrap();
    let client = client_config(&b.gateway, &ca_bundle, Some(&allowed), ALPN).unwrap();
    run(server, client).await.client.unwrap();
}

#[test]
fn init_refuses_to_overwrite_a_ca_key() {
    let dir = tempfile::tempdir().unwrap();
    let mesh_a = td("mesh-a");
    let files = init(&mesh_a, dir.path(), &[], &[]).unwrap();
    let before = std::fs::read(&files.ca_key).unwrap();
    match init(&mesh_a, dir.path(), &[], &[]) {
        Err(e @ CertError::AlreadyExists(_)) => {
            assert!(e.to_string().contains("ca.key"), "{e}");
        }
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    assert_eq!(std::fs::read(&files.ca_key).unwrap(), before);
}

#[test]
fn loading_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let err = Identity::load(&missing, &missing).unwrap_err();
    assert!(matches!(err, CertError::Io { .. }));
    assert!(err.to_string().contains("missing.pem"), "{err}");

    let empty = dir.path().join("empty-bundle.pem");
    std::fs::write(&empty, "").unwrap();
    let err = TrustBundle::load(td("mesh-b"), &empty).unwrap_err();
    assert!(matches!(err, CertError::NoCertificates { .. }));
    assert!(err.to_string().contains("empty-bundle.pem"), "{err}");

    // A key that belongs to a different certificate.
    let ca = Ca::new(&td("mesh-a")).unwrap();
    let one = ca.issue(&id("spiffe://mesh-a/one"), &[], &[]).unwrap();
    let two = ca.issue(&id("spiffe://mesh-a/two"), &[], &[]).unwrap();
    let cert = dir.path().join("one.pem");
    let key = dir.path().join("two.key");
    std::fs::write(&cert, &one.cert_pem).unwrap();
    std::fs::write(&key, &two.key_pem).unwrap();
    let err = Identity::load(&cert, &key).unwrap_err();
    assert!(matches!(err, CertError::KeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("two.key"), "{err}");

    let no_key = dir.path().join("no-key.pem");
    std::fs::write(&no_key, &one.cert_pem).unwrap();
    let err = Identity::load(&cert, &no_key).unwrap_err();
    assert!(matches!(err, CertError::NoPrivateKey { .. }), "{err}");
    assert!(err.to_string().contains("no-key.pem"), "{err}");
}

#[test]
fn server_config_needs_distinct_bundles() {
    let a = mesh("mesh-a");
    let b = mesh("mesh-b");
    assert!(matches!(
        server_config(&a.gateway, &[], ALPN),
        Err(CertError::NoTrustBundles)
    ));
    assert!(matches!(
        server_config(&a.gateway, &[b.bundle.clone(), b.bundle.clone()], ALPN),
        Err(CertError::DuplicateTrustDomain(_))
    ));
}
