//! The gateway's TLS material: its identity (certificate chain and key) and
//! each peer's trust bundle, read at start and again whenever one of their
//! files changes, so a rotation needs no restart. The files' directories
//! are watched, not the files: Kubernetes swaps a `..data` link under a
//! Secret, cert-manager and SPIRE's helper rename new files into place.
//! SIGHUP re-reads them too.
//!
//! Every accepted change builds a whole new [`Material`] (with new rustls
//! configs, hence new session caches) and publishes it; handshakes load
//! the current one, connections keep the one they started with. A new file
//! that cannot be read or parsed, whose key does not match its certificate,
//! or whose SPIFFE ID names another trust domain is refused with an error
//! naming the file, and the material in use stays. This module must not
//! reach into the data plane: proxies derive their own configs from
//! [`Material`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use elsinore_certs::{CertError, Identity, SpiffeId, TrustBundle, TrustDomain};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::reload::{Trigger, is_change};

/// One consistent set of TLS material, replaced whole on rotation.
pub struct Material {
    /// Counts up from 1 with every published rotation.
    pub generation: u64,
    pub identity: Identity,
    /// Each peer's trust bundle, by peer name.
    pub bundles: HashMap<String, TrustBundle>,
    /// The federation API's server config. Federation connections are few
    /// and long-lived, so they never resume a TLS session: a handshake
    /// always verifies the current chain.
    pub federation_server: Arc<rustls::ServerConfig>,
    /// Client configs for dialing each peer's federation API, by peer name.
    pub federation_clients: HashMap<String, Arc<rustls::ClientConfig>>,
}

impl Material {
    /// `pins`: per peer name, the only SPIFFE IDs its federation server may
    /// present when we dial it (`peers[].identities`); a peer without an
    /// entry may present any ID of its trust domain.
    fn build(
        generation: u64,
        identity: Identity,
        bundles: HashMap<String, TrustBundle>,
        pins: &HashMap<String, Vec<SpiffeId>>,
    ) -> Result<Material, CertError> {
        let list: Vec<TrustBundle> = bundles.values().cloned().collect();
        let server = elsinore_certs::server_config(&identity, &list, &[b"h2"])?;
        let mut server = (*server).clone();
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        let mut federation_clients = HashMap::with_capacity(bundles.len());
        for (peer, bundle) in &bundles {
            let pinned = pins.get(peer).map(Vec::as_slice);
            let client = elsinore_certs::client_config(&identity, bundle, pinned, &[b"h2"])?;
            let mut client = (*client).clone();
            client.resumption = rustls::client::Resumption::disabled();
            federation_clients.insert(peer.clone(), Arc::new(client));
        }
        Ok(Material {
            generation,
            identity,
            bundles,
            federation_server: Arc::new(server),
            federation_clients,
        })
    }
}

/// What a rotation was about: the label of the rotation metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Identity,
    Bundle,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Identity => "identity",
            Kind::Bundle => "bundle",
        }
    }
}

/// Every reason a new file can be refused (metric labels).
pub const REFUSAL_REASONS: [&str; 5] = [
    "unreadable",
    "unparsable",
    "key_mismatch",
    "trust_domain",
    "unusable",
];

/// Why a new file was refused (a bounded metric label).
fn reason_of(e: &CertError) -> &'static str {
    match e {
        CertError::Io { .. } => "unreadable",
        CertError::KeyMismatch { .. } => "key_mismatch",
        CertError::NoUriSan
        | CertError::MultipleUriSans(_)
        | CertError::NotSpiffe { .. }
        | CertError::WrongTrustDomain { .. } => "trust_domain",
        _ => "unparsable",
    }
}

/// A refused new file, for the log and for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub kind: Kind,
    /// The file at fault.
    pub file: PathBuf,
    pub reason: &'static str,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.message)
    }
}

/// Rotation counters and certificate expiry, for `/metrics`.
#[derive(Debug, Default)]
pub struct TlsStatus {
    inner: Mutex<StatusInner>,
}

#[derive(Debug, Default, Clone)]
pub struct StatusInner {
    /// (kind, name) → notAfter in seconds since the epoch. The name is the
    /// SPIFFE ID for the identity, the peer for a bundle (whose earliest
    /// CA expiry counts).
    pub expiry: Vec<(Kind, String, u64)>,
    pub rotations: HashMap<Kind, u64>,
    pub refused: HashMap<(Kind, &'static str), u64>,
    /// The last refusal, as logged (it names the file).
    pub last_refusal: Option<String>,
}

impl TlsStatus {
    pub fn snapshot(&self) -> StatusInner {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_expiry(&self, material: &Material, peers: &[PeerSource]) {
        let mut expiry = vec![(
            Kind::Identity,
            material.identity.spiffe_id().to_string(),
            epoch_secs(material.identity.not_after()),
        )];
        for peer in peers {
            let Some(bundle) = material.bundles.get(&peer.name) else {
                continue;
            };
            let earliest = bundle
                .roots()
                .iter()
                .filter_map(|c| elsinore_certs::not_after(c).ok())
                .min();
            if let Some(at) = earliest {
                expiry.push((Kind::Bundle, peer.name.clone(), epoch_secs(at)));
            }
        }
        self.lock().expiry = expiry;
    }
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, Clone)]
struct PeerSource {
    name: String,
    trust_domain: TrustDomain,
    file: PathBuf,
}

/// Where the material comes from, and the bytes last seen in each file
/// (applied or refused: a refused file is not reported again until it
/// changes).
struct Sources {
    /// False for material given in memory (tests): nothing to re-read.
    files: bool,
    certificate: PathBuf,
    private_key: PathBuf,
    trust_domain: TrustDomain,
    peers: Vec<PeerSource>,
    /// Which IDs each peer's federation server may present (see
    /// [`Material::build`]).
    pins: HashMap<String, Vec<SpiffeId>>,
}

#[derive(Default)]
struct Seen {
    identity: Option<(Vec<u8>, Vec<u8>)>,
    bundles: HashMap<String, Vec<u8>>,
}

/// The published material and how to reload it.
pub struct Credentials {
    current: ArcSwap<Material>,
    sources: Sources,
    seen: Mutex<Seen>,
    status: Arc<TlsStatus>,
}

impl Credentials {
    /// Publishes the material the gateway started with (already loaded
    /// and checked by the caller, which reports start-up errors its own way).
    pub fn new(
        config: &Config,
        identity: Identity,
        bundles: HashMap<String, TrustBundle>,
        status: Arc<TlsStatus>,
    ) -> Result<Credentials, CertError> {
        let sources = Sources {
            files: true,
            certificate: config.identity.certificate.clone(),
            private_key: config.identity.private_key.clone(),
            trust_domain: config.mesh.trust_domain.clone(),
            peers: config
                .peers
                .iter()
                .map(|p| PeerSource {
                    name: p.name.clone(),
                    trust_domain: p.trust_domain.clone(),
                    file: p.trust_bundle.clone(),
                })
                .collect(),
            pins: config
                .peers
                .iter()
                .filter_map(|p| Some((p.name.clone(), p.identities.pinned()?.to_vec())))
                .collect(),
        };
        Self::from_sources(sources, identity, bundles, status)
    }

    fn from_sources(
        sources: Sources,
        identity: Identity,
        bundles: HashMap<String, TrustBundle>,
        status: Arc<TlsStatus>,
    ) -> Result<Credentials, CertError> {
        let material = Material::build(1, identity, bundles, &sources.pins)?;
        status.set_expiry(&material, &sources.peers);
        // What the files hold now; a later read that differs is a rotation.
        let seen = Seen {
            identity: std::fs::read(&sources.certificate)
                .ok()
                .zip(std::fs::read(&sources.private_key).ok()),
            bundles: sources
                .peers
                .iter()
                .filter_map(|p| Some((p.name.clone(), std::fs::read(&p.file).ok()?)))
                .collect(),
        };
        Ok(Credentials {
            current: ArcSwap::from_pointee(material),
            sources,
            seen: Mutex::new(seen),
            status,
        })
    }

    /// Material that never rotates (tests that build identities in memory).
    pub fn fixed(
        identity: Identity,
        bundles: HashMap<String, TrustBundle>,
    ) -> Result<Credentials, CertError> {
        let sources = Sources {
            files: false,
            certificate: PathBuf::new(),
            private_key: PathBuf::new(),
            trust_domain: identity.spiffe_id().trust_domain().clone(),
            peers: Vec::new(),
            pins: HashMap::new(),
        };
        Ok(Credentials {
            current: ArcSwap::from_pointee(Material::build(1, identity, bundles, &sources.pins)?),
            sources,
            seen: Mutex::new(Seen::default()),
            status: Arc::default(),
        })
    }

    /// The material new handshakes use.
    pub fn current(&self) -> Arc<Material> {
        self.current.load_full()
    }

    /// The generation of the current material, without cloning it.
    pub fn generation(&self) -> u64 {
        self.current.load().generation
    }

    /// Reads every file again and publishes new material if one changed
    /// and all changed files are acceptable. Returns what was refused
    /// (each also logged and counted); unchanged files cost one read each.
    /// Long because identity and every peer bundle go through the same
    /// read, compare, validate and refuse steps in one pass, and the new
    /// material is published whole or not at all.
    pub fn reload(&self) -> Vec<Refused> {
        if !self.sources.files {
            return Vec::new();
        }
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = self.current.load_full();
        let mut refused = Vec::new();
        let mut rotated: Vec<Kind> = Vec::new();

        let mut identity = current.identity.clone();
        match self.read_identity(&seen) {
            Ok(None) => {}
            Ok(Some((bytes, new))) => {
                seen.identity = Some(bytes);
                identity = new;
                rotated.push(Kind::Identity);
            }
            Err((bytes, r)) => {
                if let Some(bytes) = bytes {
                    seen.identity = Some(bytes);
                }
                refused.push(r);
            }
        }

        let mut bundles = current.bundles.clone();
        for peer in &self.sources.peers {
            let bytes = match std::fs::read(&peer.file) {
                Ok(b) => b,
                Err(source) => {
                    // A file missing for a moment while it is replaced is
                    // not yet a new bundle: report it, keep the old one.
                    refused.push(refusal(
                        Kind::Bundle,
                        &peer.file,
                        &CertError::Io {
                            path: peer.file.clone(),
                            source,
                        },
                    ));
                    continue;
                }
            };
            if seen.bundles.get(&peer.name) == Some(&bytes) {
                continue;
            }
            let checked = load_bundle(peer, &bytes);
            seen.bundles.insert(peer.name.clone(), bytes);
            match checked {
                Ok(bundle) => {
                    bundles.insert(peer.name.clone(), bundle);
                    if !rotated.contains(&Kind::Bundle) {
                        rotated.push(Kind::Bundle);
                    }
                }
                Err(r) => refused.push(r),
            }
        }
        // A refused file's content is remembered, so it is reported once,
        // not on every event in its directory; an unreadable file is
        // reported on every attempt.
        for r in &refused {
            tracing::error!(file = %r.file.display(), kind = r.kind.label(), cause = r.reason, "certificate rotation refused; keeping the material in use: {}", r.message);
            let mut status = self.status.lock();
            *status.refused.entry((r.kind, r.reason)).or_default() += 1;
            status.last_refusal = Some(r.to_string());
        }
        if rotated.is_empty() {
            return refused;
        }
        match Material::build(
            current.generation + 1,
            identity,
            bundles,
            &self.sources.pins,
        ) {
            Ok(material) => {
                self.status.set_expiry(&material, &self.sources.peers);
                let mut status = self.status.lock();
                for kind in &rotated {
                    *status.rotations.entry(*kind).or_default() += 1;
                }
                drop(status);
                tracing::info!(
                    generation = material.generation,
                    identity = %material.identity.spiffe_id(),
                    rotated = ?rotated.iter().map(|k| k.label()).collect::<Vec<_>>(),
                    "TLS material rotated; new handshakes use it"
                );
                self.current.store(Arc::new(material));
            }
            Err(e) => {
                // Cannot happen for material that passed the checks above;
                // still, never publish half of it.
                let r = Refused {
                    kind: rotated[0],
                    file: self.sources.certificate.clone(),
                    reason: "unusable",
                    message: format!("building the TLS configs: {e}"),
                };
                tracing::error!(kind = r.kind.label(), "certificate rotation refused: {r}");
                *self
                    .status
                    .lock()
                    .refused
                    .entry((r.kind, r.reason))
                    .or_default() += 1;
                refused.push(r);
            }
        }
        refused
    }

    /// `Ok(None)`: unchanged. `Err`: refused, with the bytes to remember if
    /// both files could be read.
    #[allow(clippy::type_complexity)]
    fn read_identity(
        &self,
        seen: &Seen,
    ) -> Result<Option<((Vec<u8>, Vec<u8>), Identity)>, (Option<(Vec<u8>, Vec<u8>)>, Refused)> {
        let s = &self.sources;
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| {
                let e = CertError::Io {
                    path: path.to_owned(),
                    source,
                };
                (None, refusal(Kind::Identity, path, &e))
            })
        };
        let cert = read(&s.certificate)?;
        let key = read(&s.private_key)?;
        let bytes = (cert, key);
        if seen.identity.as_ref() == Some(&bytes) {
            return Ok(None);
        }
        let identity =
            match Identity::from_pem_files(&bytes.0, &bytes.1, &s.certificate, &s.private_key) {
                Ok(identity) => identity,
                Err(e) => {
                    // Which file: the key for a key that does not parse, the
                    // certificate otherwise (a mismatch names both).
                    let file = match &e {
                        CertError::NoPrivateKey { .. } => &s.private_key,
                        CertError::Pem { path, .. } if Path::new(path) == s.private_key => {
                            &s.private_key
                        }
                        _ => &s.certificate,
                    };
                    let r = refusal(Kind::Identity, file, &e);
                    return Err((Some(bytes), r));
                }
            };
        if identity.spiffe_id().trust_domain() != &s.trust_domain {
            let r = Refused {
                kind: Kind::Identity,
                file: s.certificate.clone(),
                reason: "trust_domain",
                message: format!(
                    "SPIFFE ID {} is not in this mesh's trust domain {}",
                    identity.spiffe_id(),
                    s.trust_domain
                ),
            };
            return Err((Some(bytes), r));
        }
        Ok(Some((bytes, identity)))
    }

    /// The directories to watch: every file's parent, once.
    fn directories(&self) -> Vec<PathBuf> {
        let s = &self.sources;
        let mut dirs: Vec<PathBuf> = std::iter::once(&s.certificate)
            .chain(std::iter::once(&s.private_key))
            .chain(s.peers.iter().map(|p| &p.file))
            .map(|f| parent_dir(f))
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }
}

fn refusal(kind: Kind, file: &Path, e: &CertError) -> Refused {
    Refused {
        kind,
        file: file.to_owned(),
        reason: reason_of(e),
        message: e.to_string(),
    }
}

/// A peer's bundle from `bytes`: every certificate must be a usable CA,
/// and one that names a trust domain (SPIFFE CAs carry `spiffe://<td>`)
/// must name the peer's.
fn load_bundle(peer: &PeerSource, bytes: &[u8]) -> Result<TrustBundle, Refused> {
    let bundle = TrustBundle::from_pem_file_bytes(peer.trust_domain.clone(), bytes, &peer.file)
        .map_err(|e| refusal(Kind::Bundle, &peer.file, &e))?;
    for (index, root) in bundle.roots().iter().enumerate() {
        let claimed = elsinore_certs::claimed_trust_domain(root)
            .map_err(|e| refusal(Kind::Bundle, &peer.file, &e))?;
        if let Some(td) = claimed
            && td != peer.trust_domain.as_str()
        {
            return Err(Refused {
                kind: Kind::Bundle,
                file: peer.file.clone(),
                reason: "trust_domain",
                message: format!(
                    "certificate {index} names trust domain {td}, but peer {} is {}",
                    peer.name, peer.trust_domain
                ),
            });
        }
    }
    Ok(bundle)
}

fn parent_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Watches the material's directories (and SIGHUP) until `shutdown`,
/// reloading after each burst of changes.
pub async fn watch(credentials: Arc<Credentials>, shutdown: CancellationToken) {
    let mut trigger = Trigger::new(credentials.directories(), "certificate", is_change);
    // A first pass catches a rotation between the start-up read and the
    // watch (unchanged files are not a rotation). Inline: a few small files
    // once at start-up, and no blocking thread for a gateway that has none.
    credentials.reload();
    while trigger.next(&shutdown).await.is_some() {
        let creds = Arc::clone(&credentials);
        // File reads and certificate parsing: off the async workers.
        let _ = tokio::task::spawn_blocking(move || creds.reload()).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use elsinore_certs::{Ca, SpiffeId};

    use super::*;

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
            }],
            pins: HashMap::new(),
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
}
