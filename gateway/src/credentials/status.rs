//! What the TLS material reports: rotation and refusal counters and
//! certificate expiry for `/metrics`, and which CAs each peer is trusted by
//! for `/peers`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use elsinore_certs::CertError;

use super::{Material, PeerSource, Seen, Sources, learned};

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
pub(super) fn reason_of(e: &CertError) -> &'static str {
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
    /// Which CAs each peer is trusted by, and where they came from (`/peers`).
    pub trust: HashMap<String, TrustView>,
}

/// The CAs one peer is trusted by, for `/peers`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrustView {
    /// `file` (`peers[].trustBundle`) or `learned` (published by the peer).
    pub source: &'static str,
    /// `peers[].followTrustBundle`.
    pub follow: bool,
    /// Since when the learned bundle is in use (Unix seconds).
    pub since: Option<u64>,
    /// SHA-256 of each trusted CA (DER), lower-case hex.
    pub fingerprints: Vec<String>,
    /// Those of them kept from before the peer's last published bundle.
    pub kept: Vec<String>,
}

impl TlsStatus {
    pub fn snapshot(&self) -> StatusInner {
        self.lock().clone()
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn set_expiry(&self, material: &Material, peers: &[PeerSource]) {
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

impl TlsStatus {
    pub(super) fn set_trust(&self, sources: &Sources, seen: &Seen, material: &Material) {
        let mut trust = HashMap::new();
        for peer in &sources.peers {
            let Some(bundle) = material.bundles.get(&peer.name) else {
                continue;
            };
            let learned = seen.learned.get(&peer.name);
            trust.insert(
                peer.name.clone(),
                TrustView {
                    source: if learned.is_some() { "learned" } else { "file" },
                    follow: peer.follow,
                    since: learned.map(|l| epoch_secs(l.since)),
                    fingerprints: bundle
                        .roots()
                        .iter()
                        .map(|c| learned::sha256_hex(c))
                        .collect(),
                    kept: learned
                        .map(|l| l.kept.iter().map(|c| learned::sha256_hex(c)).collect())
                        .unwrap_or_default(),
                },
            );
        }
        self.lock().trust = trust;
    }
}

pub(super) fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
