//! The YAML config model: raw serde structs (camelCase, unknown keys
//! rejected) are validated into the typed [`Config`] below, with every error
//! naming its YAML path. `elsinore check` runs exactly this path. Defaults
//! live in one place ([`defaults`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use elsinore_certs::TrustDomain;
pub use elsinore_federation_api::ApiVersion;
use elsinore_federation_api::Protocol;

/// A fully validated gateway configuration. Paths are already resolved
/// relative to the config file's directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub mesh: Mesh,
    pub identity: IdentityFiles,
    pub listeners: Listeners,
    pub advertise: Advertise,
    pub exports: Vec<Export>,
    pub peers: Vec<Peer>,
    pub imports: Imports,
    pub federation: FederationTuning,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Mesh {
    /// A DNS label, e.g. `mesh-a`; used in default FQDNs `<export>.<mesh>.global`.
    pub name: String,
    pub trust_domain: TrustDomain,
}

#[derive(Debug, Clone, PartialEq)]
pub struct IdentityFiles {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listeners {
    /// Hamlet API (gRPC over mTLS), faces peers. Default 0.0.0.0:8008.
    pub federation: SocketAddr,
    /// Admin HTTP. Default 127.0.0.1:15000.
    pub admin: SocketAddr,
    /// Data plane listeners (later issues). Default 0.0.0.0:15443.
    pub ingress: Option<SocketAddr>,
    /// Default 127.0.0.1:15001.
    pub egress: Option<SocketAddr>,
    /// Default 127.0.0.1:15053.
    pub dns: Option<SocketAddr>,
}

/// What peers are told to send data-plane traffic to.
#[derive(Debug, Clone, PartialEq)]
pub struct Advertise {
    /// IP address or DNS name.
    pub address: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Export {
    /// A DNS label, unique among exports.
    pub name: String,
    /// Defaults to `<name>.<mesh name>.global`; lower-cased, no trailing dot.
    pub fqdn: String,
    pub protocol: Protocol,
    /// The port consumers call; defaults to the first backend's port.
    pub port: u16,
    pub backends: Vec<HostPort>,
    /// Names of peers (from `peers`) allowed to see and reach it.
    pub peers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    /// A DNS label, unique among peers.
    pub name: String,
    /// Unique among peers and different from our own.
    pub trust_domain: TrustDomain,
    pub trust_bundle: PathBuf,
    /// Address of the peer's federation API to dial; `None` = only serve this peer.
    pub federation: Option<HostPort>,
    pub api_version: ApiVersion,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Imports {
    /// How long imports are kept after their stream is lost. Default 5m.
    pub stale_after: Duration,
    /// Where imports are persisted; `None` = no cache.
    pub cache_dir: Option<PathBuf>,
}

/// Federation tuning (config key `federation`, all optional).
#[derive(Debug, Clone, PartialEq)]
pub struct FederationTuning {
    /// Max in-flight messages we offer/accept with another Elsinore. Default 256.
    pub window: u32,
    /// A message unacknowledged for this long ends the stream (owner side). Default 30s.
    pub ack_timeout: Duration,
    /// Without a snapshot-size header (foreign owner), the snapshot is complete after
    /// this long without a message. Default 2s.
    pub snapshot_quiet_period: Duration,
    /// Reconnect backoff: first delay (>= 1s) and cap. Defaults 1s and 30s.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}
