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
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use elsinore_certs::{CertError, Identity, TrustBundle, TrustDomain};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

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
    fn build(
        generation: u64,
        identity: Identity,
        bundles: HashMap<String, TrustBundle>,
    ) -> Result<Material, CertError> {
        let list: Vec<TrustBundle> = bundles.values().cloned().collect();
        let server = elsinore_certs::server_config(&identity, &list, &[b"h2"])?;
        let mut server = (*server).clone();
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        let mut federation_clients = HashMap::with_capacity(bundles.len());
        for (peer, bundle) in &bundles {
            let client = elsinore_certs::client_config(&identity, bundle, None, &[b"h2"])?;
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
        };
        let material = Material::build(1, identity, bundles)?;
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
        };
        Ok(Credentials {
            current: ArcSwap::from_pointee(Material::build(1, identity, bundles)?),
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
            tracing::error!(file = %r.file.display(), kind = r.kind.label(), reason = r.reason, "certificate rotation refused; keeping the material in use: {}", r.message);
            *self
                .status
                .lock()
                .refused
                .entry((r.kind, r.reason))
                .or_default() += 1;
        }
        if rotated.is_empty() {
            return refused;
        }
        match Material::build(current.generation + 1, identity, bundles) {
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
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        use notify::EventKind;
        // Our own reads show up as access events: never a reason to re-read.
        if matches!(
            event.kind,
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any
        ) {
            let _ = tx.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => Some(w),
        Err(error) => {
            tracing::warn!(%error, "no file watcher; certificates reload on SIGHUP only");
            None
        }
    };
    if let Some(w) = watcher.as_mut() {
        for dir in credentials.directories() {
            if let Err(error) = w.watch(&dir, RecursiveMode::NonRecursive) {
                tracing::warn!(%error, dir = %dir.display(), "cannot watch a certificate directory; its files reload on SIGHUP only");
            }
        }
    }
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let sighup = async {
            match hup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let sighup = std::future::pending::<()>();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = rx.recv() => {}
            _ = sighup => {}
        }
        // A rotation writes several files; let the burst settle.
        tokio::time::sleep(Duration::from_millis(100)).await;
        while rx.try_recv().is_ok() {}
        let creds = Arc::clone(&credentials);
        // File reads and certificate parsing: off the async workers.
        let _ = tokio::task::spawn_blocking(move || creds.reload()).await;
    }
}
