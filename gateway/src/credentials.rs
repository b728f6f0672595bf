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
//!
//! A peer followed with `peers[].followTrustBundle` may also replace its
//! bundle by publishing one on our authenticated stream to it
//! ([`Credentials::learn`], rule and file in [`learned`]); its file then
//! only bootstraps it, and a change of that file resets what was learned.
//! Our own `identity.trustBundle` is read and watched here too, for the
//! owner to publish.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;

use arc_swap::ArcSwap;
use elsinore_certs::{CertError, Identity, SpiffeId, TrustBundle, TrustDomain};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::learned::Learned;

use crate::config::Config;
use crate::reload::{Trigger, is_change};

mod follow;
pub mod learned;
pub mod status;

use follow::{effective_bundles, restore_learned};
use status::reason_of;
pub use status::{Kind, REFUSAL_REASONS, Refused, TlsStatus};

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
    /// Our own CA bundle (`identity.trustBundle`) as PEM, which the owner
    /// publishes to Elsinore consumers; `None` = nothing published.
    pub published_bundle: Option<Arc<[u8]>>,
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
        published_bundle: Option<Arc<[u8]>>,
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
            published_bundle,
        })
    }
}

#[derive(Debug, Clone)]
struct PeerSource {
    name: String,
    trust_domain: TrustDomain,
    file: PathBuf,
    /// `peers[].followTrustBundle`.
    follow: bool,
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
    /// `identity.trustBundle`: our own CAs, published to consumers.
    own_bundle: Option<PathBuf>,
    /// `imports.cacheDir`: where learned bundles are kept.
    cache_dir: Option<PathBuf>,
}

#[derive(Default)]
struct Seen {
    identity: Option<(Vec<u8>, Vec<u8>)>,
    bundles: HashMap<String, Vec<u8>>,
    own_bundle: Option<Vec<u8>>,
    /// Each peer's bundle from its file (what `learned` is layered on).
    file_bundles: HashMap<String, TrustBundle>,
    /// Bundles learned from peers that publish theirs, by peer name.
    learned: HashMap<String, Learned>,
}

/// The published material and how to reload it.
pub struct Credentials {
    current: ArcSwap<Material>,
    sources: Sources,
    seen: Mutex<Seen>,
    status: Arc<TlsStatus>,
    /// Bumped whenever the published bundle changes: owner streams end so
    /// consumers reconnect and read the new one.
    published_changes: watch::Sender<u64>,
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
                    follow: p.follow_trust_bundle,
                })
                .collect(),
            pins: config
                .peers
                .iter()
                .filter_map(|p| Some((p.name.clone(), p.identities.pinned()?.to_vec())))
                .collect(),
            own_bundle: config.identity.trust_bundle.clone(),
            cache_dir: config.imports.cache_dir.clone(),
        };
        Self::from_sources(sources, identity, bundles, status)
    }

    fn from_sources(
        sources: Sources,
        identity: Identity,
        bundles: HashMap<String, TrustBundle>,
        status: Arc<TlsStatus>,
    ) -> Result<Credentials, CertError> {
        // What the files hold now; a later read that differs is a rotation.
        let mut seen = Seen {
            identity: std::fs::read(&sources.certificate)
                .ok()
                .zip(std::fs::read(&sources.private_key).ok()),
            bundles: sources
                .peers
                .iter()
                .filter_map(|p| Some((p.name.clone(), std::fs::read(&p.file).ok()?)))
                .collect(),
            own_bundle: None,
            file_bundles: bundles,
            learned: HashMap::new(),
        };
        let published = match &sources.own_bundle {
            None => None,
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|source| CertError::Io {
                    path: path.clone(),
                    source,
                })?;
                let published =
                    check_own_bundle(&sources, &identity, path, &bytes).map_err(|r| {
                        CertError::Io {
                            path: r.file.clone(),
                            source: std::io::Error::other(r.message),
                        }
                    })?;
                seen.own_bundle = Some(bytes);
                Some(published)
            }
        };
        for peer in sources.peers.iter().filter(|p| p.follow) {
            if let Some(learned) = restore_learned(&sources, peer, seen.bundles.get(&peer.name)) {
                seen.learned.insert(peer.name.clone(), learned);
            }
        }
        let effective = effective_bundles(&sources, &seen);
        let material = Material::build(1, identity, effective, &sources.pins, published)?;
        status.set_expiry(&material, &sources.peers);
        status.set_trust(&sources, &seen, &material);
        Ok(Credentials {
            current: ArcSwap::from_pointee(material),
            sources,
            seen: Mutex::new(seen),
            status,
            published_changes: watch::Sender::new(0),
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
            own_bundle: None,
            cache_dir: None,
        };
        let material = Material::build(1, identity, bundles, &sources.pins, None)?;
        Ok(Credentials {
            current: ArcSwap::from_pointee(material),
            sources,
            seen: Mutex::new(Seen::default()),
            status: Arc::default(),
            published_changes: watch::Sender::new(0),
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
                    seen.file_bundles.insert(peer.name.clone(), bundle);
                    // The operator's word wins: a new file discards what
                    // was learned from the peer (how a follow is reset).
                    if seen.learned.remove(&peer.name).is_some() {
                        self.forget_learned(&peer.name);
                    }
                    if !rotated.contains(&Kind::Bundle) {
                        rotated.push(Kind::Bundle);
                    }
                }
                Err(r) => refused.push(r),
            }
        }
        let mut published = current.published_bundle.clone();
        let mut published_changed = false;
        if let Some(path) = &self.sources.own_bundle {
            match std::fs::read(path) {
                Err(source) => refused.push(refusal(
                    Kind::Bundle,
                    path,
                    &CertError::Io {
                        path: path.clone(),
                        source,
                    },
                )),
                Ok(bytes) if seen.own_bundle.as_ref() == Some(&bytes) => {}
                Ok(bytes) => {
                    match check_own_bundle(&self.sources, &identity, path, &bytes) {
                        Ok(pem) => {
                            published = Some(pem);
                            published_changed = true;
                            if !rotated.contains(&Kind::Bundle) {
                                rotated.push(Kind::Bundle);
                            }
                        }
                        Err(r) => refused.push(r),
                    }
                    seen.own_bundle = Some(bytes);
                }
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
        let bundles = effective_bundles(&self.sources, &seen);
        match Material::build(
            current.generation + 1,
            identity,
            bundles,
            &self.sources.pins,
            published,
        ) {
            Ok(material) => {
                self.status.set_expiry(&material, &self.sources.peers);
                self.status.set_trust(&self.sources, &seen, &material);
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
                if published_changed {
                    self.published_changes.send_modify(|n| *n += 1);
                }
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
            .chain(s.own_bundle.iter())
            .map(|f| parent_dir(f))
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// Changes every time the published bundle does (owner streams watch it).
    pub fn published_changes(&self) -> watch::Receiver<u64> {
        self.published_changes.subscribe()
    }
}

/// Our own bundle (`identity.trustBundle`) from `bytes`: CAs of our trust
/// domain that our certificate chains to (publishing CAs that do not vouch
/// for us would lock following consumers out).
fn check_own_bundle(
    sources: &Sources,
    identity: &Identity,
    path: &Path,
    bytes: &[u8],
) -> Result<Arc<[u8]>, Refused> {
    let own = PeerSource {
        name: "this mesh".to_owned(),
        trust_domain: sources.trust_domain.clone(),
        file: path.to_owned(),
        follow: false,
    };
    if bytes.len() > learned::MAX_PUBLISHED_BYTES {
        return Err(Refused {
            kind: Kind::Bundle,
            file: path.to_owned(),
            reason: "unusable",
            message: format!(
                "{} bytes, more than the {} a published bundle may hold",
                bytes.len(),
                learned::MAX_PUBLISHED_BYTES
            ),
        });
    }
    let bundle = load_bundle(&own, bytes)?;
    if !elsinore_certs::chain_verifies(&bundle, identity.cert_chain()) {
        return Err(Refused {
            kind: Kind::Bundle,
            file: path.to_owned(),
            reason: "unusable",
            message: format!(
                "our certificate ({}) does not chain to any CA of this bundle; consumers that follow it would refuse us",
                identity.spiffe_id()
            ),
        });
    }
    Ok(Arc::from(bytes))
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
mod tests;
