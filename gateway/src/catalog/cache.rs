//! The on-disk import cache: one JSON file per peer,
//! `<cache dir>/imports-<peer>.json`, so imports survive a restart while the
//! peer is unreachable. Writes are atomic (temporary file, fsync, rename,
//! fsync of the directory): a crash leaves the old file or the new one,
//! never half of one. This module only reads and writes files; deciding
//! what is stale is the federation room's job.
//!
//! The functions block on file I/O; call them from `spawn_blocking`. Exactly
//! one writer per peer is assumed (the consumer task of that peer), since
//! the temporary file name is fixed.

use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use elsinore_federation_api::FederatedService;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The file format version this build writes and reads.
const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("peer name {0:?} cannot be used in a cache file name")]
    InvalidPeerName(String),
    #[error("cannot create cache directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write cache file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read cache file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode cache file {path}: {source}")]
    Encode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cache file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cache file {path} has version {version}, this build reads version {VERSION}")]
    UnsupportedVersion { path: PathBuf, version: u64 },
    #[error("cache file {path} belongs to peer {found:?}, expected {expected:?}")]
    PeerMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("cache file {path}, entry {index}: {source}")]
    InvalidEntry {
        path: PathBuf,
        index: usize,
        source: serde_json::Error,
    },
}

/// The cache file of `peer` in `dir`. Peer names are DNS labels (config
/// validates that), but this is a file name, so anything that could leave
/// the directory is refused here as well.
fn path_for(dir: &Path, peer: &str) -> Result<PathBuf, CacheError> {
    if peer.is_empty() || peer.contains(['/', '\\', '\0']) || peer.contains("..") {
        return Err(CacheError::InvalidPeerName(peer.to_owned()));
    }
    Ok(dir.join(format!("imports-{peer}.json")))
}

/// Replaces the cache file of `peer` with `entries` (each with when it was
/// last confirmed by the peer), atomically. Creates `dir` if missing.
///
/// The JSON is streamed to the file through a buffer straight from the
/// shared services: with 100,000 imports, a copy of every service plus the
/// whole document in memory would cost more than the imports themselves.
pub fn save(
    dir: &Path,
    peer: &str,
    entries: &[(std::sync::Arc<FederatedService>, SystemTime)],
) -> Result<(), CacheError> {
    let path = path_for(dir, peer)?;
    fs::create_dir_all(dir).map_err(|source| CacheError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    let file = CacheFile {
        version: u64::from(VERSION),
        peer,
        saved_at: unix_seconds(SystemTime::now()),
        entries: EntriesOut(entries),
    };

    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let result = write_synced(&tmp, &file).and_then(|()| {
        fs::rename(&tmp, &path).map_err(|source| CacheError::Write {
            path: path.clone(),
            source,
        })
    });
    if let Err(error) = result {
        // Best effort: a leftover .tmp is harmless (the next save truncates
        // it) but would confuse an operator looking at the directory.
        let _ = fs::remove_file(&tmp);
        return Err(error.named(&path));
    }
    // The rename is durable only once the directory entry is on disk.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| CacheError::Write {
            path: dir.to_owned(),
            source,
        })
}

/// Writes `file` as pretty JSON to `path` and syncs it. Errors name `path`
/// for now; [`save`] renames them to the real cache file.
fn write_synced(path: &Path, file: &CacheFile<&str, EntriesOut<'_>>) -> Result<(), CacheError> {
    let io = |source| CacheError::Write {
        path: path.to_owned(),
        source,
    };
    let mut out = BufWriter::with_capacity(64 * 1024, File::create(path).map_err(io)?);
    serde_json::to_writer_pretty(&mut out, file).map_err(|source| {
        if source.is_io() {
            CacheError::Write {
                path: path.to_owned(),
                source: source.into(),
            }
        } else {
            CacheError::Encode {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    let f = out.into_inner().map_err(|e| io(e.into_error()))?;
    f.sync_all().map_err(io)
}

impl CacheError {
    /// The same error about `path` (the cache file, not its temporary twin).
    fn named(self, path: &Path) -> CacheError {
        let path = path.to_owned();
        match self {
            CacheError::Write { source, .. } => CacheError::Write { path, source },
            CacheError::Encode { source, .. } => CacheError::Encode { path, source },
            other => other,
        }
    }
}

/// Reads the cache file of `peer`. A missing file is an empty cache; any
/// other problem is an error naming the file, which the caller logs before
/// starting empty.
pub fn load(dir: &Path, peer: &str) -> Result<Vec<(FederatedService, SystemTime)>, CacheError> {
    let path = path_for(dir, peer)?;
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(CacheError::Read { path, source }),
    };
    let corrupt = |source| CacheError::Corrupt {
        path: path.clone(),
        source,
    };
    // Check the version before the shape, so a file from a newer build says
    // "unsupported version" rather than some missing-field message.
    let probe: VersionProbe = serde_json::from_slice(&bytes).map_err(corrupt)?;
    if probe.version != u64::from(VERSION) {
        return Err(CacheError::UnsupportedVersion {
            path,
            version: probe.version,
        });
    }
    // Entries are kept as slices of the text and read one by one, so an
    // error names the entry it is in.
    let file: CacheFile<String, Vec<&RawValue>> =
        serde_json::from_slice(&bytes).map_err(corrupt)?;
    if file.peer != peer {
        return Err(CacheError::PeerMismatch {
            path,
            expected: peer.to_owned(),
            found: file.peer,
        });
    }
    let mut loaded = Vec::with_capacity(file.entries.len());
    for (index, raw) in file.entries.into_iter().enumerate() {
        let entry: CachedEntry<FederatedService> =
            serde_json::from_str(raw.get()).map_err(|source| CacheError::InvalidEntry {
                path: path.clone(),
                index,
                source,
            })?;
        loaded.push((
            entry.service,
            UNIX_EPOCH + Duration::from_secs(entry.confirmed_at),
        ));
    }
    Ok(loaded)
}

/// Seconds since the epoch; times before it (a broken clock) count as 0.
fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[derive(Deserialize)]
struct VersionProbe {
    version: u64,
}

/// The file: `save` writes it borrowed from the shared services (`P` a
/// `&str`, `E` [`EntriesOut`]); `load` reads it owned, its entries left as
/// text until each is read.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CacheFile<P, E> {
    version: u64,
    peer: P,
    saved_at: u64,
    entries: E,
}

/// One import: the service in its JSON form ([`elsinore_federation_api::json`])
/// and when the peer last confirmed it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CachedEntry<S> {
    confirmed_at: u64,
    service: S,
}

struct EntriesOut<'a>(&'a [(std::sync::Arc<FederatedService>, SystemTime)]);

impl Serialize for EntriesOut<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|(service, confirmed)| CachedEntry {
            confirmed_at: unix_seconds(*confirmed),
            service: &**service,
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use elsinore_federation_api::{Endpoint, Instance, Protocol, StringMap};

    fn service(name: &str, protocol: Protocol) -> FederatedService {
        FederatedService {
            name: name.to_owned(),
            description: "the reviews".to_owned(),
            tags: vec!["t1".to_owned()],
            labels: StringMap::from([("elsinore.io/mesh".to_owned(), "mesh-b".to_owned())]),
            fqdn: format!("{name}.mesh-b.global"),
            endpoints: vec![Endpoint {
                address: "gw.mesh-b.example".to_owned(),
                port: 15443,
                labels: vec!["zone=a".to_owned()],
                description: "ingress".to_owned(),
            }],
            sans: vec!["spiffe://mesh-b.example/ns/elsinore/sa/gateway".to_owned()],
            instances: vec![Instance {
                id: "mesh-b".to_owned(),
                protocol,
                metadata: StringMap::from([
                    ("SNI".to_owned(), format!("{name}.mesh-b.global")),
                    ("PORT".to_owned(), "9080".to_owned()),
                ]),
                endpoint_selector: vec!["zone=a".to_owned()],
                description: "i".to_owned(),
            }],
        }
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// A version 1 file as `save` writes it (`SAVED_AT` stands for the time).
    const GOLDEN: &str = r#"{
  "version": 1,
  "peer": "mesh-b",
  "savedAt": SAVED_AT,
  "entries": [
    {
      "confirmedAt": 7,
      "service": {
        "name": "reviews",
        "description": "the reviews",
        "tags": [
          "t1"
        ],
        "labels": {
          "elsinore.io/mesh": "mesh-b"
        },
        "fqdn": "reviews.mesh-b.global",
        "endpoints": [
          {
            "address": "gw.mesh-b.example",
            "port": 15443,
            "labels": [
              "zone=a"
            ],
            "description": "ingress"
          }
        ],
        "sans": [
          "spiffe://mesh-b.example/ns/elsinore/sa/gateway"
        ],
        "instances": [
          {
            "id": "mesh-b",
            "protocol": "HTTP",
            "metadata": {
              "PORT": "9080",
              "SNI": "reviews.mesh-b.global"
            },
            "endpointSelector": [
              "zone=a"
            ],
            "description": "i"
          }
        ]
      }
    },
    {
      "confirmedAt": 8,
      "service": {
        "name": "odd",
        "description": "the reviews",
        "tags": [
          "t1"
        ],
        "labels": {},
        "fqdn": "odd.mesh-b.global",
        "endpoints": [
          {
            "address": "gw.mesh-b.example",
            "port": 15443,
            "labels": [
              "zone=a"
            ],
            "description": "ingress"
          },
          {
            "address": "10.0.0.2",
            "port": 1,
            "labels": [],
            "description": ""
          }
        ],
        "sans": [
          "spiffe://mesh-b.example/ns/elsinore/sa/gateway"
        ],
        "instances": []
      }
    }
  ]
}"#;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let entries = vec![
            (
                Arc::new(service("reviews", Protocol::Http)),
                at(1_700_000_000),
            ),
            (
                Arc::new(service("ratings", Protocol::Grpc)),
                at(1_700_000_123),
            ),
        ];
        save(dir.path(), "mesh-b", &entries).unwrap();
        let loaded = load(dir.path(), "mesh-b").unwrap();
        let expected: Vec<_> = entries.iter().map(|(s, t)| ((**s).clone(), *t)).collect();
        assert_eq!(loaded, expected);

        // The documented format: camelCase keys, protocol as its name.
        let text = fs::read_to_string(dir.path().join("imports-mesh-b.json")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["peer"], "mesh-b");
        assert!(json["savedAt"].as_u64().unwrap() > 1_700_000_000);
        assert_eq!(json["entries"][0]["confirmedAt"], 1_700_000_000);
        let inst = &json["entries"][1]["service"]["instances"][0];
        assert_eq!(inst["protocol"], "GRPC");
        assert_eq!(inst["endpointSelector"][0], "zone=a");

        // Sub-second precision is not kept, by design.
        let fractional = vec![(entries[0].0.clone(), at(5) + Duration::from_millis(900))];
        save(dir.path(), "mesh-b", &fractional).unwrap();
        assert_eq!(load(dir.path(), "mesh-b").unwrap()[0].1, at(5));
    }

    /// The file format, to the byte: a change to the JSON form of the
    /// domain types (`elsinore_federation_api::json`) that would change
    /// what a cache file says fails here. And a restored service has no
    /// spare vector room.
    #[test]
    fn the_file_is_the_documented_format() {
        let dir = tempfile::tempdir().unwrap();
        let mut odd = service("odd", Protocol::Tcp);
        odd.labels = StringMap::new();
        odd.endpoints.push(Endpoint {
            address: "10.0.0.2".to_owned(),
            port: 1,
            labels: vec![],
            description: String::new(),
        });
        odd.instances.clear();
        let entries = vec![
            (Arc::new(service("reviews", Protocol::Http)), at(7)),
            (Arc::new(odd), at(8)),
        ];
        save(dir.path(), "mesh-b", &entries).unwrap();
        let text = fs::read_to_string(dir.path().join("imports-mesh-b.json")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let saved_at = json["savedAt"].as_u64().unwrap();
        let expected = GOLDEN.replace("SAVED_AT", &saved_at.to_string());
        assert_eq!(text, expected);

        let loaded = load(dir.path(), "mesh-b").unwrap();
        assert_eq!(loaded[0].0, *entries[0].0);
        let svc = &loaded[0].0;
        assert_eq!(svc.endpoints.capacity(), svc.endpoints.len());
        assert_eq!(svc.tags.capacity(), svc.tags.len());
        assert_eq!(svc.sans.capacity(), svc.sans.len());
        assert_eq!(svc.instances.capacity(), svc.instances.len());
        assert_eq!(
            svc.instances[0].endpoint_selector.capacity(),
            svc.instances[0].endpoint_selector.len()
        );
        assert_eq!(
            svc.endpoints[0].labels.capacity(),
            svc.endpoints[0].labels.len()
        );
    }

    #[test]
    fn save_creates_dir_replaces_and_leaves_no_tmp() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("nested").join("cache");
        save(
            &dir,
            "mesh-b",
            &[(Arc::new(service("a", Protocol::Tcp)), at(1))],
        )
        .unwrap();
        save(
            &dir,
            "mesh-b",
            &[(Arc::new(service("b", Protocol::Tls)), at(2))],
        )
        .unwrap();
        let loaded = load(&dir, "mesh-b").unwrap();
        assert_eq!(loaded, vec![(service("b", Protocol::Tls), at(2))]);
        let files: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(files, ["imports-mesh-b.json"]);

        // Saving nothing is a valid (empty) cache, distinct per peer.
        save(&dir, "mesh-c", &[]).unwrap();
        assert!(load(&dir, "mesh-c").unwrap().is_empty());
        assert_eq!(load(&dir, "mesh-b").unwrap().len(), 1);
    }

    #[test]
    fn failed_save_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        save(
            dir.path(),
            "mesh-b",
            &[(Arc::new(service("a", Protocol::Tcp)), at(1))],
        )
        .unwrap();
        // A directory squatting on the temporary name makes the write fail
        // before the rename: the old file must be untouched.
        fs::create_dir(dir.path().join("imports-mesh-b.json.tmp")).unwrap();
        let err = save(dir.path(), "mesh-b", &[]).unwrap_err();
        assert!(matches!(err, CacheError::Write { .. }), "{err}");
        assert!(err.to_string().contains("imports-mesh-b.json"), "{err}");
        assert_eq!(load(dir.path(), "mesh-b").unwrap().len(), 1);
    }

    #[test]
    fn missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path(), "mesh-b").unwrap().is_empty());
        assert!(
            load(&dir.path().join("absent"), "mesh-b")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("imports-mesh-b.json");
        for garbage in [
            "{\"version\": 1, \"peer\": \"mesh-b\", \"entr",
            "not json",
            "{}",
        ] {
            fs::write(&path, garbage).unwrap();
            let err = load(dir.path(), "mesh-b").unwrap_err();
            assert!(matches!(err, CacheError::Corrupt { .. }), "{err}");
            assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        }
    }

    #[test]
    fn unknown_version_wrong_peer_and_bad_protocol_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("imports-mesh-b.json");
        fs::write(&path, r#"{"version": 2, "whatever": true}"#).unwrap();
        let err = load(dir.path(), "mesh-b").unwrap_err();
        assert!(
            matches!(err, CacheError::UnsupportedVersion { version: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("imports-mesh-b.json"));

        save(dir.path(), "mesh-c", &[]).unwrap();
        fs::rename(dir.path().join("imports-mesh-c.json"), &path).unwrap();
        let err = load(dir.path(), "mesh-b").unwrap_err();
        assert!(matches!(err, CacheError::PeerMismatch { .. }), "{err}");

        save(
            dir.path(),
            "mesh-b",
            &[(Arc::new(service("a", Protocol::Http)), at(1))],
        )
        .unwrap();
        let text = fs::read_to_string(&path)
            .unwrap()
            .replace("\"HTTP\"", "\"SMTP\"");
        fs::write(&path, text).unwrap();
        let err = load(dir.path(), "mesh-b").unwrap_err();
        assert!(
            matches!(err, CacheError::InvalidEntry { index: 0, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("SMTP"), "{err}");
    }

    #[test]
    fn unsafe_peer_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "../x", "a/b", "..", "a\\b"] {
            assert!(matches!(
                save(dir.path(), bad, &[]),
                Err(CacheError::InvalidPeerName(_))
            ));
            assert!(matches!(
                load(dir.path(), bad),
                Err(CacheError::InvalidPeerName(_))
            ));
        }
        assert!(fs::read_dir(dir.path()).unwrap().next().is_none());
    }
}
