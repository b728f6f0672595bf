//! Certificate rotation without restart, end to end: two gateways on
//! loopback carry HTTP requests and TCP streams while both identities move
//! to certificates of new CAs, as Kubernetes delivers them (a Secret's
//! `..data` link swapped), and each side's bundle for the other goes from
//! the old CA to old+new to new only (a file renamed into place, as
//! cert-manager and SPIRE's helper do). No request may fail; a test client
//! sees the new certificate on its next handshake; a broken new file is
//! refused (the error names it, the metric moves) and traffic carries on.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use elsinore_certs::{Ca, Identity, Issued, TrustBundle};
use elsinore_gateway::proxy::ingress::Refusal;
use elsinore_tests::{
    Backend, ConfigSpec, ExportSpec, MeshFixture, PeerSpec, WAIT, admin_get, get, http1_send,
    run_test, tls_connect, tls_connect_sni, wait_for,
};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const A: &str = "mesh-a";
const B: &str = "mesh-b";

/// A directory laid out as the kubelet mounts a Secret: `<name>` links to
/// `..data/<name>`, `..data` links to a versioned directory, and an update
/// swaps `..data` in one rename.
struct SecretDir {
    dir: PathBuf,
    version: u32,
}

impl SecretDir {
    fn new(dir: PathBuf, files: &[(&str, &str)]) -> SecretDir {
        std::fs::create_dir_all(&dir).unwrap();
        let mut secret = SecretDir { dir, version: 0 };
        secret.swap(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(Path::new("..data").join(name), secret.dir.join(name))
                .unwrap();
        }
        secret
    }

    fn swap(&mut self, files: &[(&str, &str)]) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        std::fs::create_dir(self.dir.join(&version)).unwrap();
        for (name, text) in files {
            std::fs::write(self.dir.join(&version).join(name), text).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn identity_files(issued: &Issued) -> [(&'static str, &str); 2] {
    [("tls.crt", &issued.cert_pem), ("tls.key", &issued.key_pem)]
}

/// Replaces `path` by a rename, as cert-manager and the SPIRE helper do.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn issue(ca: &Ca, mesh: &MeshFixture) -> Issued {
    ca.issue(&mesh.gateway_id(), &["localhost".to_owned()], &[])
        .unwrap()
}

fn leaf(issued: &Issued) -> CertificateDer<'static> {
    identity(issued).cert_chain()[0].clone()
}

fn identity(issued: &Issued) -> Identity {
    Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap()
}

/// Traffic that runs until stopped: one loop of HTTP requests, one of TCP
/// streams (each a new connection, hence a new mTLS handshake between the
/// gateways), counting successes and keeping every failure.
#[derive(Default)]
struct Traffic {
    http_ok: AtomicU64,
    tcp_ok: AtomicU64,
    failures: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Traffic {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }

    async fn http_loop(self: Arc<Self>, vip: SocketAddr) {
        let mut n = 0u64;
        while !self.stop.load(Ordering::SeqCst) {
            n += 1;
            match http1_send(vip, get("web.mesh-a.global", &format!("/r{n}"))).await {
                Ok(reply) if reply.status.is_success() => {
                    self.http_ok.fetch_add(1, Ordering::SeqCst);
                }
                Ok(reply) => self.fail(format!("request {n}: {} {}", reply.status, reply.text())),
                Err(e) => self.fail(format!("request {n}: {e}")),
            }
        }
    }

    async fn tcp_loop(self: Arc<Self>, vip: SocketAddr) {
        let mut n = 0u64;
        while !self.stop.load(Ordering::SeqCst) {
            n += 1;
            let payload = format!("stream {n} ").repeat(100).into_bytes();
            match tokio::time::timeout(Duration::from_secs(10), echo(vip, &payload)).await {
                Ok(Ok(back)) if back == payload => {
                    self.tcp_ok.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Ok(back)) => self.fail(format!("stream {n}: {} bytes back", back.len())),
                Ok(Err(e)) => self.fail(format!("stream {n}: {e}")),
                Err(_) => self.fail(format!("stream {n}: timed out")),
            }
        }
    }

    /// Waits until both loops completed `n` more exchanges.
    async fn progress(&self, n: u64, when: &str) {
        let (h, t) = (
            self.http_ok.load(Ordering::SeqCst),
            self.tcp_ok.load(Ordering::SeqCst),
        );
        wait_for(
            &format!("{n} requests and streams {when}"),
            WAIT,
            || async {
                let (h2, t2) = (
                    self.http_ok.load(Ordering::SeqCst),
                    self.tcp_ok.load(Ordering::SeqCst),
                );
                if h2 >= h + n && t2 >= t + n {
                    Ok(())
                } else {
                    Err(format!("{} requests, {} streams", h2 - h, t2 - t))
                }
            },
        )
        .await;
    }
}

/// One TCP stream through the echo export: write, half-close, read it all.
async fn echo(vip: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut tcp = TcpStream::connect(vip).await?;
    tcp.write_all(payload).await?;
    tcp.shutdown().await?;
    let mut back = Vec::new();
    tcp.read_to_end(&mut back).await?;
    Ok(back)
}

/// The leaf certificate `addr` presents to a fresh handshake, verified
/// against `ca` alone, with `client` as our identity.
async fn served_leaf(
    addr: SocketAddr,
    sni: Option<&str>,
    ca: &Ca,
    owner: &MeshFixture,
    client: &Identity,
) -> Result<CertificateDer<'static>, String> {
    let bundle = TrustBundle::from_pem(owner.trust_domain.clone(), ca.cert_pem().as_bytes())
        .map_err(|e| e.to_string())?;
    let config = elsinore_certs::client_config(client, &bundle, None, &[b"h2"])
        .map_err(|e| e.to_string())?;
    let tls = match sni {
        Some(sni) => tls_connect_sni(addr, config, sni).await,
        None => tls_connect(addr, config).await,
    }
    .map_err(|e| format!("handshake with {addr}: {e}"))?;
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .ok_or("no certificate")?;
    Ok(certs[0].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_and_bundles_rotate_under_traffic_without_a_failed_request() {
    run_test(async {
        let a = MeshFixture::data_plane(A).await;
        let b = MeshFixture::data_plane(B).await;
        let web = Backend::http1("web").await;
        let echo_backend = Backend::tcp_echo("echo").await;

        // Identities in Secret-style directories; bundles as plain files.
        let (a1, b1) = (issue(&a.ca, &a), issue(&b.ca, &b));
        let mut a_secret = SecretDir::new(a.dir.join("secret"), &identity_files(&a1));
        let mut b_secret = SecretDir::new(b.dir.join("secret"), &identity_files(&b1));
        let a_trusts_b = a.dir.join("trust-mesh-b.pem");
        let b_trusts_a = b.dir.join("trust-mesh-a.pem");
        replace_file(&a_trusts_b, &b.ca.cert_pem());
        replace_file(&b_trusts_a, &a.ca.cert_pem());

        let ga = a
            .start(
                &ConfigSpec::new()
                    .identity(&a_secret.path("tls.crt"), &a_secret.path("tls.key"))
                    .export(
                        ExportSpec::new("web", &[B])
                            .protocol("HTTP")
                            .port(8080)
                            .backend(&web.host_port()),
                    )
                    .export(
                        ExportSpec::new("echo", &[B])
                            .protocol("TCP")
                            .port(7000)
                            .backend(&echo_backend.host_port()),
                    )
                    .peer(PeerSpec::new(B, b.trust_domain.as_str(), &a_trusts_b)),
            )
            .await;
        let gb = b
            .start(
                &ConfigSpec::new()
                    .identity(&b_secret.path("tls.crt"), &b_secret.path("tls.key"))
                    .peer(
                        PeerSpec::new(A, a.trust_domain.as_str(), &b_trusts_a)
                            .federation(a.federation_addr),
                    ),
            )
            .await;
        gb.wait_imported(A, &["echo", "web"]).await;
        let web_vip = gb.wait_vip("web.mesh-a.global").await;
        let echo_vip = gb.wait_vip("echo.mesh-a.global").await;

        let traffic = Arc::new(Traffic::default());
        let loops = [
            tokio::spawn(traffic.clone().http_loop(web_vip)),
            tokio::spawn(traffic.clone().tcp_loop(echo_vip)),
        ];
        traffic.progress(3, "before the rotation").await;
        // A stream opened on the old material and finished on the new.
        let mut long = TcpStream::connect(echo_vip).await.unwrap();
        long.write_all(b"opened before the rotation; ")
            .await
            .unwrap();

        // Step 1: each side trusts the other's old and new CA.
        let (a_ca2, b_ca2) = (
            Ca::new(&a.trust_domain).unwrap(),
            Ca::new(&b.trust_domain).unwrap(),
        );
        replace_file(&a_trusts_b, &(b.ca.cert_pem() + &b_ca2.cert_pem()));
        replace_file(&b_trusts_a, &(a.ca.cert_pem() + &a_ca2.cert_pem()));
        ga.wait_generation(2, "A to take B's old+new bundle").await;
        gb.wait_generation(2, "B to take A's old+new bundle").await;
        traffic.progress(3, "with old+new bundles").await;

        // Step 2: both identities move to certificates of the new CAs.
        let (a2, b2) = (issue(&a_ca2, &a), issue(&b_ca2, &b));
        a_secret.swap(&identity_files(&a2));
        b_secret.swap(&identity_files(&b2));
        ga.wait_generation(3, "A to take its new identity").await;
        gb.wait_generation(3, "B to take its new identity").await;
        // The next handshake presents the new certificate, on the data
        // plane and on the federation API, verified against the new CA alone.
        let client = identity(&b2);
        let served = served_leaf(
            ga.ingress_addr(),
            Some("web.mesh-a.global"),
            &a_ca2,
            &a,
            &client,
        )
        .await
        .unwrap();
        assert_eq!(served, leaf(&a2), "ingress presents A's new certificate");
        let served = served_leaf(ga.federation_addr, None, &a_ca2, &a, &client)
            .await
            .unwrap();
        assert_eq!(served, leaf(&a2), "federation presents A's new certificate");
        let old = served_leaf(
            ga.ingress_addr(),
            Some("web.mesh-a.global"),
            &a.ca,
            &a,
            &client,
        )
        .await;
        assert!(
            old.is_err(),
            "A still serves a certificate of its old CA: {old:?}"
        );
        traffic.progress(3, "with the new identities").await;

        // Step 3: the old CAs leave the bundles. Only the new certificates
        // can pass now, so traffic after this proves both sides present them.
        replace_file(&a_trusts_b, &b_ca2.cert_pem());
        replace_file(&b_trusts_a, &a_ca2.cert_pem());
        ga.wait_generation(4, "A to take B's new-only bundle").await;
        gb.wait_generation(4, "B to take A's new-only bundle").await;
        traffic.progress(3, "with new-only bundles").await;

        // A broken new certificate is refused, naming the file; A keeps
        // serving its good one.
        let broken =
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n";
        a_secret.swap(&[("tls.crt", broken), ("tls.key", &a2.key_pem)]);
        let refusal = wait_for("A to refuse the broken certificate", WAIT, || async {
            ga.gateway
                .shared
                .tls_status
                .snapshot()
                .last_refusal
                .ok_or("no refusal yet")
        })
        .await;
        let cert_path = a_secret.path("tls.crt").display().to_string();
        assert!(
            refusal.starts_with(&cert_path),
            "refusal names the file: {refusal}"
        );
        let (_, metrics) = admin_get(ga.admin_addr, "/metrics").await;
        assert!(
            metrics.contains(
                "elsinore_tls_rotations_refused_total{kind=\"identity\",cause=\"unparsable\"} 1"
            ),
            "{metrics}"
        );
        assert!(
            metrics.contains("elsinore_tls_rotations_total{kind=\"identity\"} 1"),
            "{metrics}"
        );
        assert!(
            metrics.contains("elsinore_tls_rotations_total{kind=\"bundle\"} 2"),
            "{metrics}"
        );
        assert_eq!(ga.gateway.credentials.generation(), 4);
        traffic.progress(3, "after the refused file").await;
        let served = served_leaf(
            ga.ingress_addr(),
            Some("web.mesh-a.global"),
            &a_ca2,
            &a,
            &client,
        )
        .await
        .unwrap();
        assert_eq!(served, leaf(&a2), "the refused file changed nothing");

        // The stream opened before any of this finishes on its old session.
        long.write_all(b"closed after it").await.unwrap();
        long.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(WAIT, long.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, b"opened before the rotation; closed after it");

        traffic.stop.store(true, Ordering::SeqCst);
        for task in loops {
            tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        }
        let failures = traffic.failures.lock().unwrap().clone();
        assert!(failures.is_empty(), "failed exchanges: {failures:#?}");
        let (h, t) = (
            traffic.http_ok.load(Ordering::SeqCst),
            traffic.tcp_ok.load(Ordering::SeqCst),
        );
        println!("rotation under traffic: {h} requests, {t} streams, 0 failed");
        gb.stop().await;
        ga.stop().await;
    })
    .await;
}

/// A session resumed after a rotation would carry an identity the new
/// material no longer accepts: a peer whose CA left the bundle must do a
/// full handshake, and fail it, even with a ticket from before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_resumes_across_a_rotation() {
    run_test(async {
        let a = MeshFixture::data_plane(A).await;
        let b = MeshFixture::new(B).await;
        let echo_backend = Backend::tcp_echo("echo").await;
        let a_trusts_b = a.dir.join("trust-mesh-b.pem");
        replace_file(&a_trusts_b, &b.ca.cert_pem());
        let ga = a
            .start(
                &ConfigSpec::new()
                    .export(
                        ExportSpec::new("echo", &[B])
                            .protocol("TCP")
                            .port(7000)
                            .backend(&echo_backend.host_port()),
                    )
                    .peer(PeerSpec::new(B, b.trust_domain.as_str(), &a_trusts_b)),
            )
            .await;
        // One client config: one session cache for every connection.
        let b1 = issue(&b.ca, &b);
        let config = elsinore_certs::client_config(&identity(&b1), &a.bundle(), None, &[]).unwrap();
        let ingress = ga.ingress_addr();
        let exchange = |config: Arc<rustls::ClientConfig>| async move {
            let mut tls = tls_connect_sni(ingress, config, "echo.mesh-a.global")
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            let kind = tls.get_ref().1.handshake_kind();
            tls.write_all(b"ping")
                .await
                .map_err(|e| format!("write: {e}"))?;
            tls.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
            let mut back = Vec::new();
            match tokio::time::timeout(WAIT, tls.read_to_end(&mut back)).await {
                Ok(Ok(_)) if back == b"ping" => Ok(kind),
                Ok(Ok(_)) => Err(format!("{kind:?}: got {back:?}")),
                Ok(Err(e)) => Err(format!("{kind:?}: read: {e}")),
                Err(_) => Err(format!("{kind:?}: no answer")),
            }
        };
        // Before the rotation the second connection resumes: the setup
        // does exercise resumption.
        assert_eq!(
            exchange(config.clone()).await,
            Ok(Some(rustls::HandshakeKind::Full))
        );
        assert_eq!(
            exchange(config.clone()).await,
            Ok(Some(rustls::HandshakeKind::Resumed))
        );

        // B's CA leaves A's bundle.
        let b_ca2 = Ca::new(&b.trust_domain).unwrap();
        replace_file(&a_trusts_b, &b_ca2.cert_pem());
        ga.wait_generation(2, "A to take B's new bundle").await;
        let refused_before = ga.ingress_stats().refused(Refusal::HandshakeFailed);
        let after = exchange(config.clone()).await;
        assert!(
            after.is_err(),
            "a B1 client got through after the rotation: {after:?}"
        );
        assert_eq!(
            ga.ingress_stats().refused(Refusal::HandshakeFailed),
            refused_before + 1,
            "refused by the new chain check ({after:?})"
        );
        ga.stop().await;
    })
    .await;
}
