//! Following a peer's published trust bundle (`peers[].followTrustBundle`):
//! taking a bundle a peer published on an authenticated stream
//! ([`Credentials::learn`]), forgetting it when the peer's `trustBundle`
//! file changes, restoring it after a restart, and which bundle of each
//! peer is in use. The rule of what is trusted and kept, and its file, are
//! in [`super::learned`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use elsinore_certs::TrustBundle;
use rustls::pki_types::CertificateDer;

use super::learned::{self, Decision, Learned};
use super::{Credentials, Kind, Material, PeerSource, Seen, Sources, load_bundle};

/// What [`Credentials::learn`] did with a published bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LearnOutcome {
    /// The peer is not followed (`followTrustBundle` off): ignored.
    NotFollowed,
    Unchanged,
    /// New material was published with the peer's new CAs.
    Updated {
        fingerprints: Vec<String>,
    },
}

impl Credentials {
    /// A bundle `pem` that `peer` published on our stream to it, whose TLS
    /// handshake verified the owner against the material in use then (the
    /// consumer dials with [`Credentials::current`]): the only way a
    /// bundle reaches this function, so it is always vouched for by the
    /// peer's current CAs and names no other peer. `server_chain` is the
    /// certificate chain the owner presented on that stream. Applies the
    /// rule of [`learned`], persists the result beside the import cache and
    /// publishes new material. Blocks on file I/O: call it off the async
    /// workers.
    pub fn learn(
        &self,
        peer: &str,
        pem: &[u8],
        server_chain: Option<&[CertificateDer<'_>]>,
    ) -> Result<LearnOutcome, String> {
        let Some(source) = self.sources.peers.iter().find(|p| p.name == peer) else {
            return Ok(LearnOutcome::NotFollowed);
        };
        if !source.follow {
            return Ok(LearnOutcome::NotFollowed);
        }
        let bundle = published_bundle(source, pem)?;
        let chains = server_chain.is_some_and(|c| elsinore_certs::chain_verifies(&bundle, c));
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = self.current.load_full();
        // A CA we trust for another peer would let that peer's CA mint
        // this peer's identities: a peer publishes its own CAs only.
        for (other, theirs) in current.bundles.iter().filter(|(name, _)| *name != peer) {
            if let Some(shared) = bundle.roots().iter().find(|c| theirs.roots().contains(c)) {
                return Err(format!(
                    "the bundle peer {peer} published holds CA {} of peer {other}; a peer may publish only its own CAs",
                    learned::sha256_hex(shared)
                ));
            }
        }
        let trusted: Vec<CertificateDer<'static>> = current
            .bundles
            .get(peer)
            .map(|b| b.roots().to_vec())
            .unwrap_or_default();
        let file_sha = seen
            .bundles
            .get(peer)
            .map(|b| learned::sha256_hex(b))
            .unwrap_or_default();
        let decision = learned::decide(
            &trusted,
            seen.learned.get(peer),
            bundle.roots().to_vec(),
            chains,
            &file_sha,
            SystemTime::now(),
        );
        let Decision::Update(new) = decision else {
            return Ok(LearnOutcome::Unchanged);
        };
        let previous = seen.learned.insert(peer.to_owned(), new.clone());
        let bundles = effective_bundles(&self.sources, &seen);
        let material = match Material::build(
            current.generation + 1,
            current.identity.clone(),
            bundles,
            &self.sources.pins,
            current.published_bundle.clone(),
        ) {
            Ok(m) => m,
            Err(e) => {
                match previous {
                    Some(p) => seen.learned.insert(peer.to_owned(), p),
                    None => seen.learned.remove(peer),
                };
                return Err(format!("the bundle peer {peer} published: {e}"));
            }
        };
        if let Some(dir) = &self.sources.cache_dir
            && let Err(e) = learned::save(dir, peer, &new)
        {
            // Trusted for now; a restart would fall back to the file.
            tracing::error!(peer, error = %e, "cannot persist the trust bundle learned from the peer");
        }
        let fingerprints: Vec<String> =
            new.roots().iter().map(|c| learned::sha256_hex(c)).collect();
        self.status.set_expiry(&material, &self.sources.peers);
        self.status.set_trust(&self.sources, &seen, &material);
        *self
            .status
            .lock()
            .rotations
            .entry(Kind::Bundle)
            .or_default() += 1;
        tracing::info!(
            peer,
            generation = material.generation,
            trusted = ?fingerprints,
            kept = new.kept.len(),
            "trust bundle learned from the peer; new handshakes use it"
        );
        self.current.store(Arc::new(material));
        Ok(LearnOutcome::Updated { fingerprints })
    }

    pub(super) fn forget_learned(&self, peer: &str) {
        tracing::warn!(
            peer,
            "peers[].trustBundle changed: the bundle learned from the peer is discarded"
        );
        if let Some(dir) = &self.sources.cache_dir
            && let Err(e) = learned::remove(dir, peer)
        {
            tracing::error!(peer, error = %e, "cannot remove the learned trust bundle file");
        }
    }
}

/// The bundle `source`'s peer published, in `pem`: at most
/// [`learned::MAX_PUBLISHED_BYTES`], CAs of its trust domain, at most
/// [`learned::MAX_PUBLISHED_CAS`] of them.
fn published_bundle(source: &PeerSource, pem: &[u8]) -> Result<TrustBundle, String> {
    let peer = &source.name;
    if pem.len() > learned::MAX_PUBLISHED_BYTES {
        return Err(format!(
            "the bundle peer {peer} published is {} bytes, more than {}",
            pem.len(),
            learned::MAX_PUBLISHED_BYTES
        ));
    }
    let origin = PeerSource {
        file: PathBuf::from(format!("<the bundle published by peer {peer}>")),
        ..source.clone()
    };
    let bundle = load_bundle(&origin, pem).map_err(|r| r.to_string())?;
    if bundle.roots().len() > learned::MAX_PUBLISHED_CAS {
        return Err(format!(
            "the bundle peer {peer} published holds {} CAs, more than {}",
            bundle.roots().len(),
            learned::MAX_PUBLISHED_CAS
        ));
    }
    Ok(bundle)
}

/// Each peer's bundle in use: what it published (followed peers that did),
/// else its file.
pub(super) fn effective_bundles(sources: &Sources, seen: &Seen) -> HashMap<String, TrustBundle> {
    let mut out = seen.file_bundles.clone();
    for peer in &sources.peers {
        let Some(learned) = seen.learned.get(&peer.name) else {
            continue;
        };
        let origin = format!("the bundle learned from peer {}", peer.name);
        match TrustBundle::from_der(peer.trust_domain.clone(), learned.roots(), &origin) {
            Ok(bundle) => {
                out.insert(peer.name.clone(), bundle);
            }
            Err(e) => {
                tracing::error!(peer = %peer.name, error = %e, "learned trust bundle unusable; using the file's")
            }
        }
    }
    out
}

/// What was learned from `peer` before a restart, if it still applies:
/// learned on top of the same `trustBundle` file (`file_bytes`).
pub(super) fn restore_learned(
    sources: &Sources,
    peer: &PeerSource,
    file_bytes: Option<&Vec<u8>>,
) -> Option<Learned> {
    let dir = sources.cache_dir.as_ref()?;
    match learned::load(dir, &peer.name) {
        Ok(None) => None,
        Ok(Some(l)) => {
            let file_sha = file_bytes
                .map(|b| learned::sha256_hex(b))
                .unwrap_or_default();
            if l.file_sha256 != file_sha {
                tracing::warn!(peer = %peer.name, "peers[].trustBundle changed since the peer's bundle was learned: discarding it");
                let _ = learned::remove(dir, &peer.name);
                return None;
            }
            let origin = format!("the bundle learned from peer {}", peer.name);
            match TrustBundle::from_der(peer.trust_domain.clone(), l.roots(), &origin) {
                Ok(_) => {
                    tracing::info!(peer = %peer.name, cas = l.roots().len(), "restored the trust bundle learned from the peer");
                    Some(l)
                }
                Err(e) => {
                    tracing::error!(peer = %peer.name, error = %e, "learned trust bundle unusable; using the file's");
                    None
                }
            }
        }
        Err(e) => {
            tracing::error!(peer = %peer.name, error = %e, "learned trust bundle unreadable; using the file's");
            None
        }
    }
}
