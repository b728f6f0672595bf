//! Rotation, refusal and learned-bundle tests of the TLS material, on real
//! files in a temporary directory and certificates minted per test.

#![allow(clippy::unwrap_used)]

use elsinore_certs::{Ca, SpiffeId};
use rustls::pki_types::pem::PemObject;

use super::*;
use crate::credentials::follow::LearnOutcome;
use crate::credentials::status::epoch_secs;
use std::time::SystemTime;

struct Files {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    bundle: PathBuf,
    td: TrustDomain,
    creds: Credentials,
}

fn td(s: &str) -> TrustDomain {
    s.parse().unwrap()
}

fn write_identity(f: &Files, ca: &Ca, id: &SpiffeId) {
    let issued = ca.issue(id, &[], &[]).unwrap();
    std::fs::write(&f.cert, issued.cert_pem).unwrap();
    std::fs::write(&f.key, issued.key_pem).unwrap();
}

/// Mesh a.test with peer b (bundle: b's CA), all in files.
fn setup() -> (Files, Ca, Ca) {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (td("a.test"), td("b.test"));
    let (ca_a, ca_b) = (Ca::new(&a).unwrap(), Ca::new(&b).unwrap());
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    let bundle = dir.path().join("b.pem");
    let issued = ca_a.issue(&SpiffeId::gateway(a.clone()), &[], &[]).unwrap();
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    std::fs::write(&key, &issued.key_pem).unwrap();
    std::fs::write(&bundle, ca_b.cert_pem()).unwrap();
    let sources = Sources {
        files: true,
        certificate: cert.clone(),
        private_key: key.clone(),
        trust_domain: a.clone(),
        peers: vec![PeerSource {
            name: "b".into(),
            trust_domain: b.clone(),
            file: bundle.clone(),
            follow: false,
        }],
        pins: HashMap::new(),
        own_bundle: None,
        cache_dir: None,
    };
    let identity = Identity::load(&cert, &key).unwrap();
    let bundles = HashMap::from([(
        "b".to_owned(),
        TrustBundle::load(b.clone(), &bundle).unwrap(),
    )]);
    let creds = Credentials::from_sources(sources, identity, bundles, Arc::default()).unwrap();
    let files = Files {
        _dir: dir,
        cert,
        key,
        bundle,
        td: a,
        creds,
    };
    (files, ca_a, ca_b)
}

#[test]
fn a_new_certificate_from_a_new_ca_is_published_whole() {
    let (f, _, ca_b) = setup();
    let before = f.creds.current();
    assert!(
        f.creds.reload().is_empty(),
        "unchanged files: nothing to do"
    );
    assert_eq!(f.creds.generation(), 1);

    let ca_a2 = Ca::new(&f.td).unwrap();
    write_identity(&f, &ca_a2, &SpiffeId::gateway(f.td.clone()));
    assert_eq!(f.creds.reload(), vec![]);
    let after = f.creds.current();
    assert_eq!(after.generation, 2);
    assert_ne!(after.identity.cert_chain(), before.identity.cert_chain());
    assert!(!Arc::ptr_eq(
        &after.federation_server,
        &before.federation_server
    ));

    // Old + new CA in the peer's bundle, then the new one alone.
    let ca_b2 = Ca::new(&td("b.test")).unwrap();
    std::fs::write(&f.bundle, ca_b.cert_pem() + &ca_b2.cert_pem()).unwrap();
    assert_eq!(f.creds.reload(), vec![]);
    assert_eq!(f.creds.current().bundles["b"].roots().len(), 2);
    std::fs::write(&f.bundle, ca_b2.cert_pem()).unwrap();
    assert_eq!(f.creds.reload(), vec![]);
    assert_eq!(f.creds.current().bundles["b"].roots().len(), 1);
    let status = f.creds.status.snapshot();
    assert_eq!(status.rotations[&Kind::Identity], 1);
    assert_eq!(status.rotations[&Kind::Bundle], 2);
    assert_eq!(f.creds.generation(), 4);
}

#[test]
fn bad_new_files_are_refused_naming_the_file_and_the_old_material_stays() {
    let (f, ca_a, _) = setup();
    let check = |what: &str, kind: Kind, reason: &str, file: &Path| {
        let refused = f.creds.reload();
        assert_eq!(refused.len(), 1, "{what}: {refused:?}");
        assert_eq!(
            (refused[0].kind, refused[0].reason),
            (kind, reason),
            "{what}"
        );
        assert_eq!(refused[0].file, file, "{what}");
        assert!(
            refused[0]
                .to_string()
                .starts_with(&file.display().to_string()),
            "{what}: {}",
            refused[0]
        );
        assert_eq!(f.creds.generation(), 1, "{what}: old material kept");
        // Reported once: the same content is not refused again.
        assert!(f.creds.reload().is_empty(), "{what}");
    };

    std::fs::write(
        &f.cert,
        "-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    check("garbage certificate", Kind::Identity, "unparsable", &f.cert);

    // A valid certificate whose key is another one.
    let issued = ca_a
        .issue(&SpiffeId::gateway(f.td.clone()), &[], &[])
        .unwrap();
    std::fs::write(&f.cert, &issued.cert_pem).unwrap();
    check("mismatched key", Kind::Identity, "key_mismatch", &f.cert);

    // A valid pair for another trust domain.
    write_identity(&f, &ca_a, &SpiffeId::gateway(td("other.test")));
    check(
        "other trust domain",
        Kind::Identity,
        "trust_domain",
        &f.cert,
    );

    std::fs::write(&f.bundle, "not pem at all").unwrap();
    check(
        "bundle without a certificate",
        Kind::Bundle,
        "unparsable",
        &f.bundle,
    );

    std::fs::remove_file(&f.key).unwrap();
    let refused = f.creds.reload();
    assert_eq!(refused[0].reason, "unreadable");
    assert_eq!(refused[0].file, f.key);

    let status = f.creds.status.snapshot();
    assert_eq!(status.refused[&(Kind::Identity, "unparsable")], 1);
    assert_eq!(status.refused[&(Kind::Identity, "key_mismatch")], 1);
    assert_eq!(status.refused[&(Kind::Identity, "trust_domain")], 1);
    assert_eq!(status.refused[&(Kind::Bundle, "unparsable")], 1);
    assert!(status.rotations.is_empty());
    assert!(
        status
            .last_refusal
            .unwrap()
            .contains(&f.key.display().to_string())
    );

    // A good pair again is taken.
    write_identity(&f, &ca_a, &SpiffeId::gateway(f.td.clone()));
    std::fs::write(&f.bundle, Ca::new(&td("b.test")).unwrap().cert_pem()).unwrap();
    assert_eq!(f.creds.reload(), vec![]);
    assert_eq!(f.creds.generation(), 2);
}

#[test]
fn expiry_is_published_for_the_identity_and_each_bundle() {
    let (f, _, _) = setup();
    let status = f.creds.status.snapshot();
    let now = epoch_secs(SystemTime::now());
    let identity = status
        .expiry
        .iter()
        .find(|e| e.0 == Kind::Identity)
        .unwrap();
    assert_eq!(identity.1, SpiffeId::gateway(f.td.clone()).to_string());
    // 90-day leaf, one-year CA.
    assert!((now + 89 * 86_400..now + 91 * 86_400).contains(&identity.2));
    let bundle = status.expiry.iter().find(|e| e.0 == Kind::Bundle).unwrap();
    assert_eq!(bundle.1, "b");
    assert!((now + 364 * 86_400..now + 366 * 86_400).contains(&bundle.2));
}

/// Mesh a.test with peers b and c, both followed, a cache dir, and
/// a published bundle of our own.
struct Follow {
    _dir: tempfile::TempDir,
    cache: PathBuf,
    b_file: PathBuf,
    own: PathBuf,
    sources: Sources,
    ca_a: Ca,
    ca_b: Ca,
    ca_c: Ca,
}

fn follow_sources() -> Follow {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (td("a.test"), td("b.test"), td("c.test"));
    let (ca_a, ca_b, ca_c) = (
        Ca::new(&a).unwrap(),
        Ca::new(&b).unwrap(),
        Ca::new(&c).unwrap(),
    );
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    let issued = ca_a.issue(&SpiffeId::gateway(a.clone()), &[], &[]).unwrap();
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    std::fs::write(&key, &issued.key_pem).unwrap();
    let own = dir.path().join("own.pem");
    std::fs::write(&own, ca_a.cert_pem()).unwrap();
    let b_file = dir.path().join("b.pem");
    let c_file = dir.path().join("c.pem");
    std::fs::write(&b_file, ca_b.cert_pem()).unwrap();
    std::fs::write(&c_file, ca_c.cert_pem()).unwrap();
    let cache = dir.path().join("cache");
    let peer = |name: &str, trust_domain: &TrustDomain, file: &PathBuf| PeerSource {
        name: name.to_owned(),
        trust_domain: trust_domain.clone(),
        file: file.clone(),
        follow: true,
    };
    let sources = Sources {
        files: true,
        certificate: cert,
        private_key: key,
        trust_domain: a,
        peers: vec![peer("b", &b, &b_file), peer("c", &c, &c_file)],
        pins: HashMap::new(),
        own_bundle: Some(own.clone()),
        cache_dir: Some(cache.clone()),
    };
    Follow {
        _dir: dir,
        cache,
        b_file,
        own,
        sources,
        ca_a,
        ca_b,
        ca_c,
    }
}

impl Follow {
    fn start(&self) -> Credentials {
        let s = &self.sources;
        let sources = Sources {
            files: true,
            certificate: s.certificate.clone(),
            private_key: s.private_key.clone(),
            trust_domain: s.trust_domain.clone(),
            peers: s.peers.clone(),
            pins: HashMap::new(),
            own_bundle: s.own_bundle.clone(),
            cache_dir: s.cache_dir.clone(),
        };
        let identity = Identity::load(&s.certificate, &s.private_key).unwrap();
        let bundles = s
            .peers
            .iter()
            .map(|p| {
                let bundle = TrustBundle::load(p.trust_domain.clone(), &p.file).unwrap();
                (p.name.clone(), bundle)
            })
            .collect();
        Credentials::from_sources(sources, identity, bundles, Arc::default()).unwrap()
    }
}

fn roots(creds: &Credentials, peer: &str) -> Vec<String> {
    creds.current().bundles[peer]
        .roots()
        .iter()
        .map(|c| learned::sha256_hex(c))
        .collect()
}

fn fp(ca: &Ca) -> String {
    let der = rustls::pki_types::CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap();
    learned::sha256_hex(&der)
}

#[test]
fn a_bundle_published_by_one_peer_cannot_change_another_peers_trust() {
    let f = follow_sources();
    let creds = f.start();
    assert_eq!(
        creds.current().published_bundle.as_deref(),
        Some(f.ca_a.cert_pem().as_bytes())
    );
    // b publishes c's CA (trusted for c): refused, and
    // neither peer's trust moves.
    let err = creds
        .learn("b", f.ca_c.cert_pem().as_bytes(), None)
        .unwrap_err();
    assert!(
        err.contains(&format!("holds CA {} of peer c", fp(&f.ca_c))),
        "{err}"
    );
    assert_eq!(roots(&creds, "b"), [fp(&f.ca_b)]);
    assert_eq!(roots(&creds, "c"), [fp(&f.ca_c)]);
    assert_eq!(creds.generation(), 1);
    // b's own new CA, published on a stream still using its old one:
    // b trusts both, c is untouched.
    let b2 = Ca::new(&td("b.test")).unwrap();
    let outcome = creds.learn("b", b2.cert_pem().as_bytes(), None).unwrap();
    assert_eq!(
        outcome,
        LearnOutcome::Updated {
            fingerprints: vec![fp(&b2), fp(&f.ca_b)]
        }
    );
    assert_eq!(roots(&creds, "b"), [fp(&b2), fp(&f.ca_b)]);
    assert_eq!(roots(&creds, "c"), [fp(&f.ca_c)]);
    let view = creds.status.snapshot().trust["b"].clone();
    assert_eq!(
        (view.source, view.kept.clone()),
        ("learned", vec![fp(&f.ca_b)])
    );
    assert_eq!(creds.status.snapshot().trust["c"].source, "file");
    // The client config for dialing b verifies against the new CA.
    let b2_gateway = b2
        .issue(&SpiffeId::gateway(td("b.test")), &[], &[])
        .unwrap();
    let chain = Identity::from_pem(
        b2_gateway.cert_pem.as_bytes(),
        b2_gateway.key_pem.as_bytes(),
    )
    .unwrap();
    assert!(elsinore_certs::chain_verifies(
        &creds.current().bundles["b"],
        chain.cert_chain()
    ));
    // A stream whose certificate chains to b2 alone drops the old CA.
    let outcome = creds
        .learn("b", b2.cert_pem().as_bytes(), Some(chain.cert_chain()))
        .unwrap();
    assert!(
        matches!(outcome, LearnOutcome::Updated { .. }),
        "{outcome:?}"
    );
    assert_eq!(roots(&creds, "b"), [fp(&b2)]);
    assert_eq!(
        creds
            .learn("b", b2.cert_pem().as_bytes(), Some(chain.cert_chain()))
            .unwrap(),
        LearnOutcome::Unchanged
    );
}

#[test]
fn an_unfollowed_peer_ignores_what_it_publishes() {
    let mut f = follow_sources();
    f.sources.peers[0].follow = false;
    let creds = f.start();
    let b2 = Ca::new(&td("b.test")).unwrap();
    assert_eq!(
        creds.learn("b", b2.cert_pem().as_bytes(), None).unwrap(),
        LearnOutcome::NotFollowed
    );
    assert_eq!(
        creds.learn("z", b2.cert_pem().as_bytes(), None).unwrap(),
        LearnOutcome::NotFollowed
    );
    assert_eq!(roots(&creds, "b"), [fp(&f.ca_b)]);
    assert_eq!(creds.generation(), 1);
}

#[test]
fn a_learned_bundle_survives_a_restart_until_the_file_changes() {
    let f = follow_sources();
    let creds = f.start();
    let b2 = Ca::new(&td("b.test")).unwrap();
    creds.learn("b", b2.cert_pem().as_bytes(), None).unwrap();
    assert!(learned::path(&f.cache, "b").exists());
    drop(creds);
    let creds = f.start();
    assert_eq!(
        roots(&creds, "b"),
        [fp(&b2), fp(&f.ca_b)],
        "restored at start"
    );
    // The operator writes a new file: it wins, and the learned file goes.
    let b3 = Ca::new(&td("b.test")).unwrap();
    std::fs::write(&f.b_file, b3.cert_pem()).unwrap();
    assert_eq!(creds.reload(), vec![]);
    assert_eq!(roots(&creds, "b"), [fp(&b3)]);
    assert_eq!(creds.status.snapshot().trust["b"].source, "file");
    assert!(!learned::path(&f.cache, "b").exists());
    drop(creds);
    assert_eq!(roots(&f.start(), "b"), [fp(&b3)]);
}

#[test]
fn our_published_bundle_must_vouch_for_us_and_a_change_is_announced() {
    let f = follow_sources();
    let creds = f.start();
    let changes = creds.published_changes();
    // A CA of ours that did not sign our certificate: refused.
    let other = Ca::new(&td("a.test")).unwrap();
    std::fs::write(&f.own, other.cert_pem()).unwrap();
    let refused = creds.reload();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].message.contains("does not chain"),
        "{}",
        refused[0]
    );
    assert!(!changes.has_changed().unwrap());
    // Old and new together (a rollover's first step): published.
    std::fs::write(&f.own, f.ca_a.cert_pem() + &other.cert_pem()).unwrap();
    assert_eq!(creds.reload(), vec![]);
    assert!(changes.has_changed().unwrap());
    let published = creds.current().published_bundle.clone().unwrap();
    assert_eq!(
        &published[..],
        (f.ca_a.cert_pem() + &other.cert_pem()).as_bytes()
    );
}
