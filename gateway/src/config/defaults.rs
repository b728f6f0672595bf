//! Every default the config applies, in one place, so the docs, the
//! validation and the rest of the gateway agree on them; and, at the end,
//! the fixed settings no config key changes (timeouts and sizes of the
//! federation transport and the proxy), so every tunable number of the
//! gateway is found here. Constants only: no statics, no logic.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use super::ApiVersion;

/// Hamlet federation API listener (gRPC over mTLS, faces peers).
pub const FEDERATION_LISTENER: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8008));
/// Admin HTTP listener (operators and probes only, hence loopback).
pub const ADMIN_LISTENER: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15000));
/// Data-plane ingress listener (mTLS from peers).
pub const INGRESS_LISTENER: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 15443));
/// Data-plane egress listener (plaintext from local apps, hence loopback).
pub const EGRESS_LISTENER: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001));
/// DNS responder for imported names.
pub const DNS_LISTENER: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15053));

/// Advertised address when `advertise` is omitted (allowed only without
/// exports, so no peer is ever told to dial it) and the ingress listener
/// binds the unspecified address.
pub const ADVERTISE_ADDRESS: &str = "localhost";

/// Suffix of default export FQDNs: `<export>.<mesh>.global`.
pub const FQDN_SUFFIX: &str = "global";

/// Wire version spoken to a peer unless `apiVersion` says otherwise.
pub const API_VERSION: ApiVersion = ApiVersion::V1alpha2;

/// Which side dials a peer's streams unless `dial` says otherwise: the
/// consumer, as the spec's usual case.
pub const DIAL: super::DialMode = super::DialMode::Consumer;

/// DNS suffixes a peer's imports must fall under unless its `allowedNames`
/// say otherwise: the `.global` zone every Elsinore export defaults to.
pub const ALLOWED_NAMES: &[&str] = &[FQDN_SUFFIX];

/// Services held from one peer: twice the catalog the `catalog` benchmark
/// imports from one peer (100,000, which peaks at 142 MiB of consumer RSS
/// in BENCHMARKS.md), so about 300 MiB at the sizes measured there. Lower
/// it for peers that export a handful.
pub const LIMIT_SERVICES: usize = 200_000;
/// Instances of one imported service.
pub const LIMIT_INSTANCES_PER_SERVICE: usize = 256;
/// Endpoints of one imported service.
pub const LIMIT_ENDPOINTS_PER_SERVICE: usize = 256;
/// Encoded size of one federation message: gRPC's customary default.
pub const LIMIT_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Smallest and largest `limits.messageBytes` the config accepts.
pub const MIN_MESSAGE_BYTES: usize = 1024;
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;
/// Entries of one metadata map (service labels, instance metadata).
pub const LIMIT_METADATA_ENTRIES: usize = 64;
/// Bytes of keys and values of one metadata map.
pub const LIMIT_METADATA_BYTES: usize = 16 * 1024;

/// How long imports outlive a lost stream.
pub const STALE_AFTER: Duration = Duration::from_secs(5 * 60);

/// In-flight message window offered to and accepted from another Elsinore.
pub const WINDOW: u32 = 256;
/// Largest window the config accepts.
pub const MAX_WINDOW: u32 = 4096;
/// An unacknowledged message older than this ends the stream (owner side).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Silence after which a foreign owner's snapshot counts as complete.
pub const SNAPSHOT_QUIET_PERIOD: Duration = Duration::from_secs(2);
/// First reconnect delay.
pub const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// The spec forbids reconnecting faster than this.
pub const MIN_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Reconnect delay cap.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Egress VIP range: inside 127.0.0.0/8, usable without privileges.
pub const VIP_RANGE: super::VipRange = super::VipRange {
    network: Ipv4Addr::new(127, 77, 0, 0),
    prefix: 16,
};
/// Dialing a backend or a remote gateway.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Completing a TLS handshake; also the wait for an HTTP/2 preface.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Closing connections without traffic.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Waiting for an HTTP response's headers.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Concurrent connections per listener.
pub const MAX_CONNECTIONS: usize = 10_000;
/// Open connections (idle or busy) from ingress to the backends of one
/// HTTP export; requests beyond wait for one. Envoy's default circuit
/// breaker allows as many per cluster.
pub const MAX_BACKEND_CONNECTIONS: usize = 1024;
/// HTTP/2 max concurrent streams per connection we serve: what nginx
/// advertises (HAProxy 100). Each stream may hold a backend exchange, so
/// this bounds the backend work one peer connection can have in flight.
pub const HTTP2_MAX_CONCURRENT_STREAMS: u32 = 128;

/// Where shared-mode egress listeners bind when `proxy.shared.bind` is omitted.
pub const SHARED_BIND: std::net::IpAddr = std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED);
/// After SIGTERM, how long `/ready` fails while every listener still
/// serves, so load balancers and endpoint controllers take us out first.
pub const DRAIN_DELAY: Duration = Duration::from_secs(5);
/// Then, how long in-flight requests and streams get to finish once the
/// listeners stopped accepting; what is left is cut.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

// Fixed settings: not configurable, but kept here with the defaults so a
// tuning change has one place to go.

/// How long a peer may take to complete the TLS handshake on the federation
/// listener (the proxy's is `proxy.handshakeTimeout`).
pub const FEDERATION_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an ingress backend whose connect failed is skipped.
pub const BACKEND_DEAD_FOR: Duration = Duration::from_secs(5);

/// Egress: HTTP/2 connections to one remote endpoint (per SNI, peer and SANs).
pub const EGRESS_MAX_CONNS_PER_KEY: usize = 4;
/// Egress: streams on one pooled connection before a second one is worth opening.
pub const EGRESS_STREAMS_PER_CONN: usize = 100;
/// Egress: client configs cached at most; a catalog with more distinct
/// (peer, SANs) pairs just rebuilds some (cheap next to the handshake that
/// follows).
pub const EGRESS_TLS_CACHE_MAX: usize = 256;
/// Egress: first retry of a failed listener bind; doubles per failure of
/// that address up to [`EGRESS_BIND_RETRY_MAX`].
pub const EGRESS_BIND_RETRY: Duration = Duration::from_secs(1);
/// Egress: the longest wait between two binds of one address.
pub const EGRESS_BIND_RETRY_MAX: Duration = Duration::from_secs(60);

/// DNS over TCP: a connection with no complete query for this long is closed.
pub const DNS_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// DNS over TCP: connections served at once; more are closed on accept, so
/// a flood of idle connections cannot exhaust file descriptors.
pub const DNS_MAX_TCP_CONNECTIONS: usize = 256;
