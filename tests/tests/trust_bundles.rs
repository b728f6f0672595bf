//! Trust bundles that follow the peer (issue 13 item 4): mesh A rolls its
//! CA (publish old+new, move its certificate to the new CA, publish new
//! only) while mesh B, whose config for A names only the old CA and never
//! changes, keeps importing and routing with `followTrustBundle` on, and
//! survives a restart on what it learned. With the option off, the old
//! behaviour stays: B refuses A's new certificate.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use elsinore_certs::{Ca, Issued};
use elsinore_tests::{
    Backend, ConfigSpec, ExportSpec, GatewayHandle, MeshFixture, PeerSpec, WAIT, get, http1_send,
    run_test, wait_for,
};
use http::StatusCode;

const A: &str = "mesh-a";
const B: &str = "mesh-b";
const WEB: &str = "web.mesh-a.global";

/// A directory laid out as the kubelet mounts a Secret (`tls.crt` →
/// `..data/tls.crt`, `..data` → a versioned directory swapped in one rename).
struct SecretDir {
    dir: PathBuf,
    version: u32,
}

impl SecretDir {
    fn new(dir: PathBuf, issued: &Issued) -> SecretDir {
        std::fs::create_dir_all(&dir).unwrap();
        let mut secret = SecretDir { dir, version: 0 };
        secret.swap(issued);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(Path::new("..data").join(name), secret.dir.join(name))
                .unwrap();
        }
        secret
    }

    fn swap(&mut self, issued: &Issued) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        std::fs::create_dir(self.dir.join(&version)).unwrap();
        std::fs::write(self.dir.join(&version).join("tls.crt"), &issued.cert_pem).unwrap();
        std::fs::write(self.dir.join(&version).join("tls.key"), &issued.key_pem).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn issue(ca: &Ca, mesh: &MeshFixture) -> Issued {
    ca.issue(&mesh.gateway_id(), &["localhost".to_owned()], &[])
        .unwrap()
}

/// Waits until B's `/peers` shows A trusted from `source` by CAs whose
/// SHA-256 fingerprints satisfy `check`; returns them.
async fn wait_trust(
    gb: &GatewayHandle,
    source: &str,
    check: impl Fn(&[String]) -> bool,
    what: &str,
) -> Vec<String> {
    wait_for(what, WAIT, || async {
        let trust = gb.peer_entry(A).await["trust"].clone();
        let seen: Vec<String> = trust["fingerprints"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if trust["source"] == source && check(&seen) {
            Ok(seen)
        } else {
            Err(trust.to_string())
        }
    })
    .await
}

async fn request_ok(gb: &GatewayHandle, what: &str) {
    let vip = gb.wait_vip(WEB).await;
    let reply = http1_send(vip, get(WEB, "/"))
        .await
        .unwrap_or_else(|e| panic!("{what}: request through B's egress: {e}"));
    assert_eq!(reply.status, StatusCode::OK, "{what}: {}", reply.text());
}

/// Mesh A (identity in a Secret-style directory, its own bundle published
/// from `own.pem`) exporting `web` to B; B's config for A names A's first
/// CA only, in `trust-mesh-a.pem`, which no step of the test touches.
struct Setup {
    a: MeshFixture,
    b: MeshFixture,
    _web: Backend,
    a_secret: SecretDir,
    a_own: PathBuf,
    b_trusts_a: PathBuf,
    ga: GatewayHandle,
    b_spec: ConfigSpec,
}

/// `dial`: who dials both streams (`peers[].dial`); with `owner`, A dials B
/// and publishes its bundle in its request headers.
async fn setup(follow: bool, dial: &str) -> Setup {
    let a = MeshFixture::data_plane(A).await;
    let b = MeshFixture::data_plane(B).await;
    let web = Backend::http1("web").await;
    let a_secret = SecretDir::new(a.dir.join("secret"), &issue(&a.ca, &a));
    let a_own = a.dir.join("own.pem");
    replace_file(&a_own, &a.ca.cert_pem());
    let b_trusts_a = b.dir.join("trust-mesh-a.pem");
    replace_file(&b_trusts_a, &a.ca.cert_pem());
    let ga = a
        .start(
            &ConfigSpec::new()
                .identity(&a_secret.dir.join("tls.crt"), &a_secret.dir.join("tls.key"))
                .own_bundle(&a_own)
                .export(
                    ExportSpec::new("web", &[B])
                        .protocol("HTTP")
                        .port(8080)
                        .backend(&web.host_port()),
                )
                // Only a dialing owner needs B's address.
                .peer(if dial == "owner" { b.dial() } else { b.peer() }.dial_by(dial)),
        )
        .await;
    let mut peer = PeerSpec::new(A, a.trust_domain.as_str(), &b_trusts_a)
        .federation(a.federation_addr)
        .dial_by(dial);
    if follow {
        peer = peer.follow_trust_bundle();
    }
    let b_spec = ConfigSpec::new().cache_dir(&b.cache_dir()).peer(peer);
    Setup {
        a,
        b,
        _web: web,
        a_secret,
        a_own,
        b_trusts_a,
        ga,
        b_spec,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_ca_rollover_needs_no_edit_on_a_consumer_that_follows_it() {
    rollover_followed("consumer").await;
}

/// The same rollover when the owner dials and pushes (`dial: owner`): the
/// bundle comes in A's request headers, judged against the client
/// certificate B's listener verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rollover_is_followed_when_the_owner_dials() {
    rollover_followed("owner").await;
}

async fn rollover_followed(dial: &str) {
    run_test(async {
        let mut s = setup(true, dial).await;
        let gb = s.b.start(&s.b_spec).await;
        gb.wait_imported(A, &["web"]).await;
        request_ok(&gb, "before the rollover").await;
        // A publishes what B's file says: nothing is learned.
        let old = wait_trust(&gb, "file", |f| f.len() == 1, "B on its file").await;

        // Step 1: A publishes old+new. Its streams end; B reconnects over
        // a handshake verified by the old CA and learns both.
        let ca2 = Ca::new(&s.a.trust_domain).unwrap();
        replace_file(&s.a_own, &(s.a.ca.cert_pem() + &ca2.cert_pem()));
        let both = wait_trust(
            &gb,
            "learned",
            |f| f.len() == 2 && f[0] == old[0],
            "B to learn A's old+new bundle",
        )
        .await;
        let new = both[1].clone();
        gb.wait_state(A, "synced", WAIT).await;
        request_ok(&gb, "with old+new").await;

        // Step 2: A's certificate moves to the new CA.
        s.a_secret.swap(&issue(&ca2, &s.a));
        s.ga.wait_generation(3, "A to take its new identity").await;
        request_ok(&gb, "A on its new certificate").await;

        // Step 3: A publishes the new CA only. B reconnects (A presents the
        // new certificate, which B's file alone would refuse), learns it,
        // and drops the old CA since A's certificate chains to the new one.
        replace_file(&s.a_own, &ca2.cert_pem());
        wait_trust(
            &gb,
            "learned",
            |f| f == [new.clone()],
            "B to trust A's new CA only",
        )
        .await;
        gb.wait_state(A, "synced", WAIT).await;
        gb.wait_imported(A, &["web"]).await;
        request_ok(&gb, "after the rollover").await;
        assert_eq!(
            std::fs::read_to_string(&s.b_trusts_a).unwrap(),
            s.a.ca.cert_pem(),
            "B's config for A was not edited"
        );

        // A restart of B starts from what it learned (its file still names
        // only A's old CA, which A no longer uses).
        gb.stop().await;
        let gb = s.b.start(&s.b_spec).await;
        wait_trust(
            &gb,
            "learned",
            |f| f == [new.clone()],
            "B to restore A's bundle",
        )
        .await;
        gb.wait_state(A, "synced", WAIT).await;
        gb.wait_imported(A, &["web"]).await;
        request_ok(&gb, "after B's restart").await;
        gb.stop().await;
        s.ga.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_follow_a_peers_new_ca_is_refused_as_before() {
    run_test(async {
        let mut s = setup(false, "consumer").await;
        let gb = s.b.start(&s.b_spec).await;
        gb.wait_imported(A, &["web"]).await;

        let ca2 = Ca::new(&s.a.trust_domain).unwrap();
        replace_file(&s.a_own, &(s.a.ca.cert_pem() + &ca2.cert_pem()));
        s.ga.wait_generation(2, "A to publish old+new").await;
        // The change ended B's stream; B is back on A's old certificate.
        wait_for("B's second stream to A", WAIT, || async {
            let total = s.ga.owner(B).await["streamsTotal"].as_u64().unwrap_or(0);
            if total >= 2 { Ok(()) } else { Err(total) }
        })
        .await;
        gb.wait_state(A, "synced", WAIT).await;
        s.a_secret.swap(&issue(&ca2, &s.a));
        s.ga.wait_generation(3, "A to take its new identity").await;
        let before = gb.consumer(A).await["reconnects"].as_u64().unwrap_or(0);
        // A's streams end; B's redials meet A's new certificate, which its
        // file's CA does not vouch for.
        replace_file(&s.a_own, &ca2.cert_pem());
        wait_for("B to fail to reconnect to A twice", WAIT, || async {
            let consumer = gb.consumer(A).await;
            let reconnects = consumer["reconnects"].as_u64().unwrap_or(0);
            if reconnects >= before + 2 && consumer["state"] != "synced" {
                Ok(())
            } else {
                Err(consumer.to_string())
            }
        })
        .await;
        wait_trust(&gb, "file", |f| f.len() == 1, "B still on its file").await;
        assert_eq!(
            s.ga.owner(B).await["streamsOpen"],
            0,
            "{}",
            s.ga.owner(B).await
        );
        gb.stop().await;
        s.ga.stop().await;
    })
    .await;
}
