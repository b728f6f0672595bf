//! The YAML config model: raw serde structs (camelCase, unknown keys
//! rejected) are validated into the typed [`Config`] below, with every error
//! naming its YAML path. `elsinore check` runs exactly this path. Defaults
//! live in one place ([`defaults`]).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use elsinore_certs::{SpiffeId, TrustDomain};
pub use elsinore_federation_api::ApiVersion;
use elsinore_federation_api::Protocol;

pub mod defaults;
pub mod effective;
mod locate;
mod names;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

pub use names::parse_host_port;
pub use names::{ReservedZone, reserved_zone};

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
    pub proxy: ProxyTuning,
    pub drain: Drain,
}

/// What SIGTERM does (config key `drain`, all optional): `/ready` fails at
/// once, every listener keeps serving for `delay`, then stops accepting
/// while in-flight requests and streams get up to `timeout` to finish.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Drain {
    /// Default 5s; 0 is allowed.
    pub delay: Duration,
    /// Default 30s; must be greater than 0.
    pub timeout: Duration,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            delay: defaults::DRAIN_DELAY,
            timeout: defaults::DRAIN_TIMEOUT,
        }
    }
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
    /// Our own CA bundle (the CAs our certificate chains to), published to
    /// Elsinore consumers that follow it; `None` = nothing published.
    pub trust_bundle: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listeners {
    /// Hamlet API (gRPC over mTLS), faces peers. Default 0.0.0.0:8008.
    pub federation: SocketAddr,
    /// Admin HTTP. Default 127.0.0.1:15000.
    pub admin: SocketAddr,
    /// Peers' data-plane traffic (mTLS); `None` = off. Default 0.0.0.0:15443.
    pub ingress: Option<SocketAddr>,
    /// Local apps' traffic to imports; `None` = off. Default 127.0.0.1:15001.
    pub egress: Option<SocketAddr>,
    /// DNS answers for imported names; `None` = off. Default 127.0.0.1:15053.
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
    /// The SPIFFE IDs of this peer allowed to open the federation stream,
    /// reach the ingress, and answer our dials. Default: the peer's
    /// Elsinore gateway ID only.
    pub identities: PeerIdentities,
    /// Accept the CA bundle this peer publishes on our stream to it (see
    /// docs/federation.md). Default false.
    pub follow_trust_bundle: bool,
    /// Which side of each stream between us is the gRPC client.
    pub dial: DialMode,
    /// DNS suffixes the peer's imports must fall under (lower case, no
    /// leading or trailing dot); a name equal to a suffix is under it.
    /// Default `[global]`; empty = the peer may claim no name.
    pub allowed_names: Vec<String>,
    /// How much the peer may make us hold (`limits`).
    pub limits: PeerLimits,
}

/// Which SPIFFE IDs of a peer's trust domain may act for that peer
/// (`peers[].identities`). A verified certificate of the right trust domain
/// is not enough: any workload of that mesh holds one, and only the
/// identities listed here (by default the peer's gateway) speak for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentities {
    /// `spiffe://<trustDomain>/*`: any identity of the peer's trust domain
    /// (for foreign peers whose gateway ID is unknown or varies).
    AnyInTrustDomain,
    /// Exactly these IDs (all in the peer's trust domain, never empty).
    Only(Vec<SpiffeId>),
}

impl PeerIdentities {
    /// The default: the peer's Elsinore gateway ID,
    /// `spiffe://<trustDomain>/ns/elsinore/sa/gateway`, the one every
    /// Elsinore gateway presents (`elsinore certs init`, the demo).
    pub fn gateway_of(trust_domain: &TrustDomain) -> PeerIdentities {
        PeerIdentities::Only(vec![SpiffeId::gateway(trust_domain.clone())])
    }

    /// Whether `id` may act for a peer whose trust domain is `trust_domain`.
    /// Compared as types: the trust domain must match exactly too.
    pub fn allows(&self, trust_domain: &TrustDomain, id: &SpiffeId) -> bool {
        if id.trust_domain() != trust_domain {
            return false;
        }
        match self {
            PeerIdentities::AnyInTrustDomain => true,
            PeerIdentities::Only(ids) => ids.contains(id),
        }
    }

    /// The IDs to pin when we dial the peer; `None` = any of its trust domain.
    pub fn pinned(&self) -> Option<&[SpiffeId]> {
        match self {
            PeerIdentities::AnyInTrustDomain => None,
            PeerIdentities::Only(ids) => Some(ids),
        }
    }

    /// As written in the config (and shown by `/config`).
    pub fn to_strings(&self, trust_domain: &TrustDomain) -> Vec<String> {
        match self {
            PeerIdentities::AnyInTrustDomain => vec![format!("spiffe://{trust_domain}/*")],
            PeerIdentities::Only(ids) => ids.iter().map(ToString::to_string).collect(),
        }
    }
}

impl Peer {
    /// Whether `id` may act for this peer (see [`PeerIdentities::allows`]).
    pub fn allows(&self, id: &SpiffeId) -> bool {
        self.identities.allows(&self.trust_domain, id)
    }
}

/// Which side dials the Hamlet streams with one peer (`peers[].dial`).
/// Both streams between us go the same way: the one carrying our imports
/// from the peer and the one carrying our exports to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DialMode {
    /// The usual direction: the consumer dials the owner. We dial the peer
    /// (at `federation`) for our imports; it dials us for our exports.
    #[default]
    Consumer,
    /// The owner dials the consumer and pushes (Hamlet v1alpha2 only): we
    /// dial the peer (at `federation`) to push our exports; it dials us to
    /// push its own, and we accept as the consumer.
    Owner,
}

impl DialMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DialMode::Consumer => "consumer",
            DialMode::Owner => "owner",
        }
    }
}

/// How much one peer may make us hold (config key `peers[].limits`, all
/// optional). Checked per entry by the consumer (`catalog::claims`);
/// `message_bytes` by the gRPC decoder, before a message is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerLimits {
    /// Services held from this peer. Default 200,000.
    pub services: usize,
    /// Instances of one service. Default 256.
    pub instances_per_service: usize,
    /// Endpoints of one service. Default 256.
    pub endpoints_per_service: usize,
    /// Encoded size of one message on the stream. Default 4 MiB.
    pub message_bytes: usize,
    /// Entries of one metadata map (a service's labels, an instance's
    /// metadata). Default 64.
    pub metadata_entries: usize,
    /// Bytes of keys and values of one metadata map. Default 16 KiB.
    pub metadata_bytes: usize,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            services: defaults::LIMIT_SERVICES,
            instances_per_service: defaults::LIMIT_INSTANCES_PER_SERVICE,
            endpoints_per_service: defaults::LIMIT_ENDPOINTS_PER_SERVICE,
            message_bytes: defaults::LIMIT_MESSAGE_BYTES,
            metadata_entries: defaults::LIMIT_METADATA_ENTRIES,
            metadata_bytes: defaults::LIMIT_METADATA_BYTES,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Imports {
    /// How long imports are kept after their stream is lost. Default 5m.
    pub stale_after: Duration,
    /// Where imports are persisted; `None` = no cache.
    pub cache_dir: Option<PathBuf>,
    /// Registered FQDN (lower case, no trailing dot) → the port local apps
    /// call that import on, instead of the port its owner published. How a
    /// TCP import that lost its port in shared mode is moved.
    pub port_overrides: std::collections::BTreeMap<String, u16>,
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

impl Default for Listeners {
    fn default() -> Self {
        Listeners {
            federation: defaults::FEDERATION_LISTENER,
            admin: defaults::ADMIN_LISTENER,
            ingress: Some(defaults::INGRESS_LISTENER),
            egress: Some(defaults::EGRESS_LISTENER),
            dns: Some(defaults::DNS_LISTENER),
        }
    }
}

impl Default for Imports {
    fn default() -> Self {
        Imports {
            stale_after: defaults::STALE_AFTER,
            cache_dir: None,
            port_overrides: std::collections::BTreeMap::new(),
        }
    }
}

impl Default for FederationTuning {
    fn default() -> Self {
        FederationTuning {
            window: defaults::WINDOW,
            ack_timeout: defaults::ACK_TIMEOUT,
            snapshot_quiet_period: defaults::SNAPSHOT_QUIET_PERIOD,
            backoff_initial: defaults::BACKOFF_INITIAL,
            backoff_max: defaults::BACKOFF_MAX,
        }
    }
}

/// One problem in a config, located by its YAML path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// E.g. `exports[0].backends[1]` or `peers[2].trustDomain`; empty for
    /// the document as a whole (unreadable file, YAML syntax).
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a config, in document order, never empty when
/// returned as an error. Displays one `<path>: <message>` per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

/// Parser limits: serde-saphyr's defaults (250,000 nodes, 1,000,000 events)
/// cap a config at about 30,000 exports; a gateway may export far more, so
/// the node and event budgets are raised while the alias and depth limits
/// that stop malicious documents stay as they are.
pub(crate) fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = 20_000_000;
    budget.max_events = 50_000_000;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

impl Config {
    /// Parses and validates YAML text. Pure: relative paths are joined to
    /// `base_dir` but nothing is read, so `elsinore check` and tests can run
    /// it anywhere; [`Config::check_files`] does the filesystem half.
    pub fn from_yaml_str(text: &str, base_dir: &Path) -> Result<Config, ConfigErrors> {
        let raw: raw::RawConfig = serde_saphyr::from_str_with_options(text, yaml_options())
            .map_err(|e| locate::serde_error(text, &e))?;
        validate::validate(raw, base_dir)
    }

    /// Checks that the identity certificate and key and every peer's trust
    /// bundle are readable regular files. Their content is the certs
    /// module's business.
    pub fn check_files(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let mut check = |path: String, file: &Path| {
            if let Err(message) = readable_file(file) {
                errors.push(ConfigError::new(path, message));
            }
        };
        check(
            "identity.certificate".to_owned(),
            &self.identity.certificate,
        );
        check("identity.privateKey".to_owned(), &self.identity.private_key);
        for (i, peer) in self.peers.iter().enumerate() {
            check(format!("peers[{i}].trustBundle"), &peer.trust_bundle);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Reads, validates and checks the files of the config at `path`;
    /// relative paths inside it are relative to its directory.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                "",
                format!("cannot read config file \"{}\": {e}", path.display()),
            )
        })?;
        Config::from_file_text(path, &text)
    }

    /// Validates `text`, the content of the config file at `path`: relative
    /// paths resolve against the file's directory, and the files it names
    /// must exist. What [`Config::load`] does after reading the file.
    pub fn from_file_text(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        let base_dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let config = Config::from_yaml_str(text, base_dir)?;
        config.check_files()?;
        Ok(config)
    }
}

fn readable_file(file: &Path) -> Result<(), String> {
    let meta =
        std::fs::metadata(file).map_err(|e| format!("cannot read \"{}\": {e}", file.display()))?;
    if !meta.is_file() {
        return Err(format!("\"{}\" is not a regular file", file.display()));
    }
    // Metadata alone does not prove we may read it (permissions, ACLs).
    std::fs::File::open(file)
        .map(drop)
        .map_err(|e| format!("cannot read \"{}\": {e}", file.display()))
}

/// Data-plane tuning (config key `proxy`, all optional).
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyTuning {
    /// The IPv4 range egress VIPs are allocated from. Default 127.77.0.0/16
    /// (inside 127.0.0.0/8, so it works without privileges on Linux).
    pub vip_range: VipRange,
    /// Dialing a backend or a remote gateway. Default 5s.
    pub connect_timeout: Duration,
    /// Completing a TLS handshake, either side, and receiving an HTTP/2
    /// client's connection preface. Default 10s.
    pub handshake_timeout: Duration,
    /// A connection (TCP splice or idle HTTP keep-alive) with no traffic this long is closed. Default 5m.
    pub idle_timeout: Duration,
    /// An HTTP request waiting this long for its response headers gets 504. Default 60s.
    pub request_timeout: Duration,
    /// Concurrent connections per listener; beyond this, new connections are closed at once. Default 10000.
    pub max_connections: usize,
    /// HTTP/2 max concurrent streams advertised on every HTTP/2 connection we serve. Default 128.
    pub http2_max_concurrent_streams: u32,
    /// TLS 1.3 session resumption between gateways (ingress issues tickets,
    /// egress reuses them). A resumed session keeps the peer identity of the
    /// full handshake it came from. Default true; benchmarks that must pay a
    /// full handshake per connection turn it off.
    pub tls_resumption: bool,
    /// Yield the core after every 16 responses written to HTTP/1.1
    /// clients, so that a client sharing this gateway's core starts on them
    /// at once (see `elsinore_transport::handoff`). Default false: it pays off only where
    /// the gateway is pinned to a core with the apps it serves, and costs
    /// next to a busy neighbour.
    pub yield_to_clients: bool,
    /// How local apps reach imports: a VIP per import (default) or one
    /// shared address with a listener per distinct port.
    pub mode: EgressMode,
    /// Most per-import listening sockets egress holds (VIP mode: one per
    /// import; shared mode: one per port). `None` = derived from the
    /// open-file limit at start ([`crate::proxy::budget`]).
    pub vip_listener_budget: Option<usize>,
}

/// How imported names are answered in DNS and reached through egress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressMode {
    /// Every import gets its own address from `vipRange`; egress listens on
    /// each (VIP, port).
    Vip,
    /// Every import is answered with one address (or a CNAME); egress has
    /// one listener per distinct port on `bind`, routing HTTP by Host and
    /// TCP by port.
    Shared {
        answer: SharedAnswer,
        bind: std::net::IpAddr,
    },
}

/// What DNS answers for every imported name in shared mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedAnswer {
    /// An A record with this address (e.g. the egress Service's ClusterIP).
    Address(std::net::Ipv4Addr),
    /// A CNAME to this name (lower case, no trailing dot), e.g. the egress
    /// Service's cluster DNS name.
    Cname(String),
}

/// An IPv4 CIDR range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VipRange {
    pub network: std::net::Ipv4Addr,
    pub prefix: u8,
}

impl VipRange {
    /// Number of addresses in the range.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// The `i`-th address of the range (wrapping).
    pub fn nth(&self, i: u64) -> std::net::Ipv4Addr {
        let base = u32::from(self.network);
        let offset = (i % self.size()) as u32;
        std::net::Ipv4Addr::from(base.wrapping_add(offset))
    }

    pub fn contains(&self, ip: std::net::Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        };
        u32::from(ip) & mask == u32::from(self.network) & mask
    }
}

impl std::fmt::Display for VipRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl std::str::FromStr for VipRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR range like 127.77.0.0/16"))?;
        let network: std::net::Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| format!("prefix {prefix:?} must be between 8 and 30"))?;
        let mask = u32::MAX << (32 - u32::from(prefix));
        if u32::from(network) & !mask != 0 {
            return Err(format!("{s} has host bits set"));
        }
        Ok(VipRange { network, prefix })
    }
}

impl Default for ProxyTuning {
    fn default() -> Self {
        ProxyTuning {
            vip_range: defaults::VIP_RANGE,
            connect_timeout: defaults::CONNECT_TIMEOUT,
            handshake_timeout: defaults::HANDSHAKE_TIMEOUT,
            idle_timeout: defaults::IDLE_TIMEOUT,
            request_timeout: defaults::REQUEST_TIMEOUT,
            max_connections: defaults::MAX_CONNECTIONS,
            http2_max_concurrent_streams: defaults::HTTP2_MAX_CONCURRENT_STREAMS,
            tls_resumption: true,
            yield_to_clients: false,
            mode: EgressMode::Vip,
            vip_listener_budget: None,
        }
    }
}
