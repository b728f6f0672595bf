//! Trust bundles learned from peers (`peers[].followTrustBundle`): the rule
//! that decides which CAs of a peer we trust after it publishes a bundle,
//! and their file beside the import cache so they survive a restart. Pure
//! decisions plus small atomic file writes; [`super::Credentials`] calls
//! them under its lock and publishes the result.
//!
//! The rule. A published bundle `P` is only ever offered on a stream whose
//! TLS handshake verified the owner against the peer's bundle in use (the
//! consumer dials with the current material), so `P` is vouched for by
//! the CAs it replaces. We then trust `P`, plus the CAs we trusted before
//! that are not in `P` ("kept") unless that very handshake's certificate
//! chains to `P` alone. Kept CAs are dropped at the first later stream
//! whose certificate chains to `P` alone. So a peer that publishes its
//! new CA before switching certificates (the usual rollover) is never
//! locked out, and one that publishes a bundle its own certificate does not
//! chain to yet keeps its old CA until it switches.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

/// The most a published bundle may weigh (bytes of PEM) and hold (CAs).
pub const MAX_PUBLISHED_BYTES: usize = 64 * 1024;
pub const MAX_PUBLISHED_CAS: usize = 16;

/// What we hold from one peer that publishes its bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learned {
    /// The CAs the peer published last.
    pub published: Vec<CertificateDer<'static>>,
    /// CAs trusted before `published` that the peer's certificates may
    /// still chain to (see the module's rule).
    pub kept: Vec<CertificateDer<'static>>,
    /// When `published` was first accepted.
    pub since: SystemTime,
    /// SHA-256 of the `trustBundle` file this was learned on top of: a
    /// different file (the operator's reset) discards it.
    pub file_sha256: String,
}

impl Learned {
    /// The CAs trusted for the peer: published, then kept.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        let mut roots = self.published.clone();
        roots.extend(self.kept.iter().cloned());
        roots
    }
}

/// What a newly published bundle changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing: the same bundle, and nothing kept to drop.
    Unchanged,
    /// Trust this from now on.
    Update(Learned),
}

/// Applies the rule to a bundle `published` on a stream whose owner
/// certificate chains to `published` alone (`chains_to_published`), given
/// what we trust now (`trusted`) and learned before (`previous`).
pub fn decide(
    trusted: &[CertificateDer<'static>],
    previous: Option<&Learned>,
    published: Vec<CertificateDer<'static>>,
    chains_to_published: bool,
    file_sha256: &str,
    now: SystemTime,
) -> Decision {
    let same_set = |a: &[CertificateDer<'_>], b: &[CertificateDer<'_>]| {
        a.len() == b.len() && a.iter().all(|c| b.contains(c))
    };
    if let Some(prev) = previous
        && same_set(&prev.published, &published)
    {
        if prev.kept.is_empty() || !chains_to_published {
            return Decision::Unchanged;
        }
        return Decision::Update(Learned {
            kept: Vec::new(),
            ..prev.clone()
        });
    }
    if previous.is_none() && same_set(trusted, &published) {
        // The peer publishes what the file already says: nothing learned.
        return Decision::Unchanged;
    }
    let kept = if chains_to_published {
        Vec::new()
    } else {
        trusted
            .iter()
            .filter(|c| !published.contains(c))
            .cloned()
            .collect()
    };
    Decision::Update(Learned {
        published,
        kept,
        since: now,
        file_sha256: file_sha256.to_owned(),
    })
}

/// Lower-case hex SHA-256 of `bytes` (a certificate's DER: its fingerprint).
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// `<cache dir>/trust-bundle-<peer>.json`.
pub fn path(dir: &Path, peer: &str) -> PathBuf {
    dir.join(format!("trust-bundle-{peer}.json"))
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct File {
    version: u32,
    peer: String,
    since_unix: u64,
    file_sha256: String,
    /// Base64-free: DER as lower-case hex, one string per CA.
    published: Vec<String>,
    kept: Vec<String>,
}

fn hex(der: &CertificateDer<'_>) -> String {
    der.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<CertificateDer<'static>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some(CertificateDer::from(bytes))
}

/// Writes `learned` atomically (temporary file, fsync, rename, fsync of the
/// directory), like the import cache.
pub fn save(dir: &Path, peer: &str, learned: &Learned) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let file = File {
        version: 1,
        peer: peer.to_owned(),
        since_unix: learned
            .since
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        file_sha256: learned.file_sha256.clone(),
        published: learned.published.iter().map(hex).collect(),
        kept: learned.kept.iter().map(hex).collect(),
    };
    let json = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
    let target = path(dir, peer);
    let tmp = dir.join(format!(".trust-bundle-{peer}.json.tmp"));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &target)?;
    fs::File::open(dir).and_then(|d| d.sync_all())
}

/// Reads what was learned from `peer`; `Ok(None)` when there is no file.
pub fn load(dir: &Path, peer: &str) -> Result<Option<Learned>, String> {
    let at = path(dir, peer);
    let bytes = match fs::read(&at) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", at.display())),
    };
    let file: File =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", at.display()))?;
    if file.version != 1 || file.peer != peer {
        return Err(format!(
            "{}: version {} for peer {:?}, expected version 1 for {peer:?}",
            at.display(),
            file.version,
            file.peer
        ));
    }
    let decode = |list: &[String]| {
        list.iter()
            .map(|s| unhex(s))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| format!("{}: a certificate is not hex DER", at.display()))
    };
    let published = decode(&file.published)?;
    if published.is_empty() {
        return Err(format!("{}: no published CA", at.display()));
    }
    Ok(Some(Learned {
        published,
        kept: decode(&file.kept)?,
        since: UNIX_EPOCH + Duration::from_secs(file.since_unix),
        file_sha256: file.file_sha256,
    }))
}

/// Forgets what was learned from `peer` (the operator's reset).
pub fn remove(dir: &Path, peer: &str) -> std::io::Result<()> {
    match fs::remove_file(path(dir, peer)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn der(n: u8) -> CertificateDer<'static> {
        CertificateDer::from(vec![n; 4])
    }

    #[test]
    fn old_cas_are_kept_until_the_peer_chains_to_the_published_bundle_alone() {
        let now = SystemTime::now();
        let (old, new) = (der(1), der(2));
        // Same as the file: nothing learned.
        assert_eq!(
            decide(
                std::slice::from_ref(&old),
                None,
                vec![old.clone()],
                true,
                "f",
                now
            ),
            Decision::Unchanged
        );
        // {old, new} published while the peer still uses old: nothing kept
        // (old is in the published set).
        let Decision::Update(first) = decide(
            std::slice::from_ref(&old),
            None,
            vec![old.clone(), new.clone()],
            true,
            "f",
            now,
        ) else {
            panic!("a new bundle is learned")
        };
        assert!(first.kept.is_empty());
        // {new} published over a handshake still chaining to old: old kept.
        let Decision::Update(second) = decide(
            &first.roots(),
            Some(&first),
            vec![new.clone()],
            false,
            "f",
            now,
        ) else {
            panic!("a new bundle is learned")
        };
        assert_eq!(second.published, vec![new.clone()]);
        assert_eq!(second.kept, vec![old.clone()]);
        assert_eq!(second.roots(), vec![new.clone(), old.clone()]);
        // The same bundle again, the peer still on old: unchanged.
        assert_eq!(
            decide(
                &second.roots(),
                Some(&second),
                vec![new.clone()],
                false,
                "f",
                now
            ),
            Decision::Unchanged
        );
        // Now its certificate chains to {new}: old is dropped.
        let Decision::Update(third) = decide(
            &second.roots(),
            Some(&second),
            vec![new.clone()],
            true,
            "f",
            now,
        ) else {
            panic!("old is dropped")
        };
        assert_eq!(third.roots(), vec![new]);
        assert_eq!(third.since, second.since, "same bundle, same since");
    }

    #[test]
    fn learned_bundles_round_trip_through_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let learned = Learned {
            published: vec![der(7), der(8)],
            kept: vec![der(9)],
            since: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            file_sha256: sha256_hex(b"file"),
        };
        assert_eq!(load(dir.path(), "b").unwrap(), None);
        save(dir.path(), "b", &learned).unwrap();
        assert_eq!(load(dir.path(), "b").unwrap(), Some(learned));
        assert!(load(dir.path(), "c").unwrap().is_none());
        std::fs::copy(path(dir.path(), "b"), path(dir.path(), "c")).unwrap();
        assert!(
            load(dir.path(), "c")
                .unwrap_err()
                .contains("for peer \"b\"")
        );
        remove(dir.path(), "b").unwrap();
        assert_eq!(load(dir.path(), "b").unwrap(), None);
    }
}
